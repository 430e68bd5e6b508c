"""Issue 13, finding 9: a replayed confirm link reactivated a reader who had complained (also
one who unsubscribed or bounced). A confirm link acts on a pending subscription only; for any
other status it changes nothing and the page says why. Nor can the unsubscribe link's
"subscribe again" bring back a reader who complained or bounced."""

from __future__ import annotations

import pytest

from newsletter import subscriptions
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.tokens import Purpose
from tests.security import _web
from tests.web.helpers import Served, make_list, snapshot, subscription_of

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures

ADDRESS = "ada@example.org"


def _reader_who_confirmed_then(rt: Runtime, web: Served, status: SubscriptionStatus) -> str:
    """A reader who confirmed by link and later left with `status`; their confirm link."""
    make_list(rt, articles=0)
    with rt.sessions() as s, s.begin():
        sub = subscriptions.add_subscriber(s, ADDRESS, "world", suppression_key="k")
        link = f"/confirm/{rt.links.signer.sign(Purpose.CONFIRM, sub.token)}"
    assert web.client.post(link).status_code == 200
    assert subscription_of(rt, ADDRESS).status == SubscriptionStatus.ACTIVE
    with rt.sessions() as s, s.begin():
        sub = subscriptions.find_subscription(s, ADDRESS, "world")
        subscriptions.set_status(s, sub, status, "test")
    return link


HONEST = {
    SubscriptionStatus.COMPLAINED: "reported",
    SubscriptionStatus.UNSUBSCRIBED: "unsubscribed",
    SubscriptionStatus.BOUNCED: "bounced",
}


@pytest.mark.parametrize("status", list(HONEST))
def test_a_replayed_confirm_link_changes_nothing(
    web_rt: Runtime, web_app: Served, status: SubscriptionStatus
) -> None:
    link = _reader_who_confirmed_then(web_rt, web_app, status)
    before = snapshot(web_rt)
    page = web_app.client.get(link)
    assert page.status_code == 200 and "Confirm my subscription" not in page.text
    replay = web_app.client.post(link)
    assert subscription_of(web_rt, ADDRESS).status == status
    assert snapshot(web_rt) == before
    assert replay.status_code == 409, replay.status_code
    assert "You are subscribed" not in replay.text and HONEST[status] in replay.text


def test_an_active_reader_replaying_the_link_is_told_so(web_rt: Runtime, web_app: Served) -> None:
    make_list(web_rt, articles=0)
    with web_rt.sessions() as s, s.begin():
        sub = subscriptions.add_subscriber(s, ADDRESS, "world", suppression_key="k")
        link = f"/confirm/{web_rt.links.signer.sign(Purpose.CONFIRM, sub.token)}"
    assert "You are subscribed" in web_app.client.post(link).text
    before = snapshot(web_rt)
    again = web_app.client.post(link)
    assert again.status_code == 200 and "already subscribed" in again.text
    assert snapshot(web_rt) == before


@pytest.mark.parametrize("status", [SubscriptionStatus.COMPLAINED, SubscriptionStatus.BOUNCED])
def test_the_unsubscribe_link_cannot_bring_back_a_complaint_or_a_bounce(
    web_rt: Runtime, web_app: Served, status: SubscriptionStatus
) -> None:
    _reader_who_confirmed_then(web_rt, web_app, status)
    token = subscription_of(web_rt, ADDRESS).token
    path = f"/unsubscribe/{web_rt.links.signer.sign(Purpose.UNSUBSCRIBE, token)}"
    before = snapshot(web_rt)
    web_app.client.post(path, data={"List-Unsubscribe": "One-Click"})
    web_app.client.post(path, data={"action": "unsubscribe"})
    back = web_app.client.post(path, data={"action": "resubscribe"})
    assert subscription_of(web_rt, ADDRESS).status == status
    assert snapshot(web_rt) == before
    assert back.status_code == 409 and "Welcome back" not in back.text


def test_an_unsubscribed_reader_still_rejoins_by_pressing_subscribe_again(
    web_rt: Runtime, web_app: Served
) -> None:
    link = _reader_who_confirmed_then(web_rt, web_app, SubscriptionStatus.UNSUBSCRIBED)
    page = web_app.client.post(link)
    action = page.text.split('<form method="post" action="', 1)[1].split('"', 1)[0]
    assert action.startswith("/unsubscribe/")
    back = web_app.client.post(action, data={"action": "resubscribe"})
    assert back.status_code == 200 and "Welcome back" in back.text
    assert subscription_of(web_rt, ADDRESS).status == SubscriptionStatus.ACTIVE
