"""The links in every message: a GET never changes anything, a bad token gets a 400 page and
changes nothing, unsubscribe works from the page and from a mail client's one-click button,
and preferences save what the reader ticks."""

from __future__ import annotations

import hashlib
import time
from unittest import mock

import httpx
import pytest
from sqlalchemy import select

from newsletter import subscriptions
from newsletter.models import Subscriber, SubscriptionStatus, sections_key
from newsletter.runtime import Runtime
from newsletter.tokens import LinkSigner, Purpose
from tests.web.helpers import (
    Served,
    compose_draft,
    events_of,
    make_list,
    snapshot,
    subscription_of,
)

ACTIVE = "ada@example.org"
PENDING = "pia@example.org"


def readers(rt: Runtime) -> dict[str, str]:
    """A list with one active and one pending reader; their opaque tokens by address."""
    make_list(rt)
    with rt.sessions() as s, s.begin():
        active = subscriptions.add_subscriber(
            s, ACTIVE, "world", name="Ada", confirmed=True, suppression_key="k"
        )
        pending = subscriptions.add_subscriber(s, PENDING, "world", suppression_key="k")
        return {ACTIVE: active.token, PENDING: pending.token}


def signed(rt: Runtime, purpose: Purpose, token: str) -> str:
    return rt.links.signer.sign(purpose, token)


def test_a_get_on_any_link_changes_nothing(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    before = snapshot(rt)
    for purpose, who in (
        (Purpose.CONFIRM, PENDING),
        (Purpose.UNSUBSCRIBE, ACTIVE),
        (Purpose.PREFERENCES, ACTIVE),
        (Purpose.UNSUBSCRIBE, PENDING),
    ):
        page = web.client.get(f"/{purpose.value}/{signed(rt, purpose, tokens[who])}")
        assert page.status_code == 200
        assert "<form" in page.text and "<script" not in page.text
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "set-cookie" not in page.headers
    assert snapshot(rt) == before


def _bad_tokens(rt: Runtime, token: str, purpose: Purpose) -> dict[str, str]:
    good = signed(rt, purpose, token)
    value, signature = good.split(".", 1)
    # Change the FIRST character: all six of its bits are signature bits. The last one of
    # 43 base64 characters carries two padding bits, so changing it could leave the decoded
    # signature the same and the "tampered" token valid (a flaky test, seen once).
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with mock.patch("time.time", return_value=time.time() - 8 * 24 * 3600):
        expired = signed(rt, Purpose.CONFIRM, token)
    bad = {
        "tampered": f"{value}.{flipped}",
        "truncated": good[:-6],
        "signature missing": value,
        "other reader's signature": f"{subscriptions.new_token()}.{signature}",
        "foreign key": LinkSigner(["another-installation"]).sign(purpose, token),
    }
    for other in Purpose:
        if other is not purpose:
            bad[f"signed for {other.value}"] = signed(rt, other, token)
    if purpose is Purpose.CONFIRM:
        bad["expired"] = expired
    return bad


@pytest.mark.parametrize("purpose", [Purpose.CONFIRM, Purpose.UNSUBSCRIBE, Purpose.PREFERENCES])
def test_bad_tokens_get_a_400_page_and_change_nothing(
    rt: Runtime, web: Served, purpose: Purpose
) -> None:
    tokens = readers(rt)
    token = tokens[PENDING if purpose is Purpose.CONFIRM else ACTIVE]
    before = snapshot(rt)
    for why, bad in _bad_tokens(rt, token, purpose).items():
        url = f"/{purpose.value}/{bad}"
        for response in (
            web.client.get(url),
            web.client.post(url, data={"action": "unsubscribe", "name": "Mallory"}),
            web.client.post(url, data={"List-Unsubscribe": "One-Click"}),
        ):
            assert response.status_code == 400, (why, response.status_code)
            assert response.headers["content-type"].startswith("text/html"), why
            assert "This link does not work" in response.text, why
            assert "Nothing was changed." in response.text, why
    assert snapshot(rt) == before


def test_an_expired_confirm_link_says_so(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    with mock.patch("time.time", return_value=time.time() - 8 * 24 * 3600):
        old = signed(rt, Purpose.CONFIRM, tokens[PENDING])
    page = web.client.post(f"/confirm/{old}")
    assert page.status_code == 400 and "expired" in page.text
    assert subscription_of(rt, PENDING).status == SubscriptionStatus.PENDING


def test_a_link_of_an_erased_reader_finds_nothing(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(s, ACTIVE, suppression_key="k", source="operator")
    page = web.client.post(f"/unsubscribe/{signed(rt, Purpose.UNSUBSCRIBE, tokens[ACTIVE])}")
    assert page.status_code == 404 and "does not match any subscription" in page.text


def _multipart_one_click() -> tuple[bytes, str]:
    boundary = "----nlTestBoundary" + hashlib.sha1(b"x").hexdigest()[:8]
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        "One-Click\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_one_click_works_with_multipart_and_repeating_is_harmless(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    url = f"{web.url}/unsubscribe/{signed(rt, Purpose.UNSUBSCRIBE, tokens[ACTIVE])}"
    body, content_type = _multipart_one_click()
    for _ in range(2):
        with httpx.Client(follow_redirects=False) as mail_client:  # no cookies, no session
            answer = mail_client.post(url, content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 200
        assert "You have been unsubscribed" in answer.text
    assert subscription_of(rt, ACTIVE).status == SubscriptionStatus.UNSUBSCRIBED
    assert events_of(rt, ACTIVE).count(("unsubscribed", "one-click")) == 1


def test_unsubscribe_page_then_resubscribe_then_preferences(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    path = f"/unsubscribe/{signed(rt, Purpose.UNSUBSCRIBE, tokens[ACTIVE])}"
    page = web.client.get(path)
    assert "Unsubscribe from World Digest?" in page.text
    assert f'action="{path}"' in page.text

    done = web.client.post(path, data={"action": "unsubscribe"})
    assert done.status_code == 200 and "You have been unsubscribed" in done.text
    assert subscription_of(rt, ACTIVE).status == SubscriptionStatus.UNSUBSCRIBED
    assert events_of(rt, ACTIVE)[-1] == ("unsubscribed", "page")
    assert 'value="resubscribe"' in done.text and "/preferences/" in done.text
    assert "You are not subscribed" in web.client.get(path).text

    back = web.client.post(path, data={"action": "resubscribe"})
    assert back.status_code == 200 and "Welcome back" in back.text
    assert subscription_of(rt, ACTIVE).status == SubscriptionStatus.ACTIVE
    assert events_of(rt, ACTIVE)[-1] == ("resubscribed", "page")

    prefs = back.text.split('href="', 1)[1].split('"', 1)[0]
    assert prefs.startswith("/preferences/")
    assert web.client.get(prefs).status_code == 200


def test_a_pending_reader_cannot_skip_confirmation_through_resubscribe(
    rt: Runtime, web: Served
) -> None:
    tokens = readers(rt)
    path = f"/unsubscribe/{signed(rt, Purpose.UNSUBSCRIBE, tokens[PENDING])}"
    refused = web.client.post(path, data={"action": "resubscribe"})
    assert refused.status_code == 409 and "confirm your subscription first" in refused.text
    assert subscription_of(rt, PENDING).status == SubscriptionStatus.PENDING


def test_preferences_save_name_sections_and_pause(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    compose_draft(rt)  # the list's sections are those its issues carried
    path = f"/preferences/{signed(rt, Purpose.PREFERENCES, tokens[ACTIVE])}"
    page = web.client.get(path)
    sections = ["Africa", "Americas", "Asia", "Climate", "Europe", "World"]
    for section in sections:
        assert f'value="{section}" checked' in page.text
    assert 'value="Ada"' in page.text

    saved = web.client.post(
        path, data={"name": "Ada L.", "sections_shown": "1", "sections": ["Europe", "World"]}
    )
    assert saved.status_code == 200 and "Your preferences are saved." in saved.text
    assert 'value="Europe" checked' in saved.text and 'value="Asia" checked' not in saved.text
    sub = subscription_of(rt, ACTIVE)
    assert sub.sections == sections_key(["Europe", "World"]) and not sub.paused
    with rt.sessions() as s:
        assert s.scalar(select(Subscriber.name).where(Subscriber.email == ACTIVE)) == "Ada L."
    assert events_of(rt, ACTIVE)[-1] == ("preferences", "page")

    web.client.post(
        path, data={"name": "Ada L.", "sections_shown": "1", "sections": sections, "paused": "1"}
    )
    sub = subscription_of(rt, ACTIVE)
    assert sub.sections is None and sub.paused  # every section ticked: all, also future ones

    before = snapshot(rt)
    none = web.client.post(path, data={"name": "Ada", "sections_shown": "1"})
    assert none.status_code == 400 and "Tick at least one section" in none.text
    bad_name = web.client.post(
        path, data={"name": "=?utf-8?q?x?=", "sections_shown": "1", "sections": ["World"]}
    )
    assert bad_name.status_code == 400 and "Name contains" in bad_name.text
    assert snapshot(rt) == before

    unsubscribe = page.text.split('<form method="post" action="', 2)[2].split('"', 1)[0]
    assert unsubscribe.startswith("/unsubscribe/")
    web.client.post(unsubscribe, data={"action": "unsubscribe"})
    assert subscription_of(rt, ACTIVE).status == SubscriptionStatus.UNSUBSCRIBED


def test_pages_escape_what_readers_typed(rt: Runtime, web: Served) -> None:
    tokens = readers(rt)
    path = f"/preferences/{signed(rt, Purpose.PREFERENCES, tokens[ACTIVE])}"
    web.client.post(path, data={"name": '<script>alert("x")</script>'})
    page = web.client.get(path)
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
