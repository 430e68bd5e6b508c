"""A reader's whole life through HTTP, against PostgreSQL, Redis and a real SMTP server:
subscribe -> confirmation mail -> confirm -> digest -> one-click unsubscribe -> no digest."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis

from newsletter import subscriptions
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.web.limits import RedisLimiter
from tests.conftest import SmtpServer
from tests.web.helpers import (
    Served,
    body_html,
    body_text,
    events_of,
    link_in,
    make_list,
    one_click_url,
    send_next_issue,
    settle,
    subscription_of,
    wait_for,
)


def test_subscribe_confirm_read_and_leave_by_one_click(
    rt: Runtime,
    redis_url: str,
    smtp_server: SmtpServer,
    start_app: Callable[..., Served],
) -> None:
    make_list(rt)
    web = start_app(rt, limiter=RedisLimiter(redis.Redis.from_url(redis_url)))
    with rt.sessions() as s, s.begin():  # another reader, so that every issue goes somewhere
        subscriptions.add_subscriber(
            s, "bob@example.org", "world", confirmed=True, suppression_key="k"
        )

    form = web.client.get("/subscribe/world")
    assert form.status_code == 200
    assert 'name="email"' in form.text and 'name="website"' in form.text  # + the honeypot

    done = web.client.post("/subscribe/world", data={"email": "ada@example.org"})
    assert done.status_code == 200 and "Check your inbox" in done.text
    [confirmation] = wait_for(smtp_server.recorder, 1)
    assert confirmation["To"] == "ada@example.org"
    assert confirmation["Subject"] == "Confirm your subscription to World Digest"
    assert "ada@example.org" not in link_in(confirmation, "confirm")  # opaque token only
    confirm_url = link_in(confirmation, "confirm")
    assert confirm_url in body_html(confirmation)
    assert subscription_of(rt, "ada@example.org").status == SubscriptionStatus.PENDING

    # A GET (a mail scanner, a preview) shows a button and changes nothing.
    page = web.client.get(confirm_url)
    assert page.status_code == 200 and "Confirm my subscription" in page.text
    assert subscription_of(rt, "ada@example.org").status == SubscriptionStatus.PENDING

    # The reader names themselves on the confirm page (the subscribe form takes no name).
    assert 'name="name"' in page.text
    confirmed = web.client.post(confirm_url, data={"name": "Ada"})
    assert confirmed.status_code == 200 and "You are subscribed" in confirmed.text
    assert subscription_of(rt, "ada@example.org").status == SubscriptionStatus.ACTIVE
    assert ("confirmed", "page") in events_of(rt, "ada@example.org")

    send_next_issue(rt)
    messages = wait_for(smtp_server.recorder, 3)
    [digest] = [m for m in messages if m["To"].addresses[0].addr_spec == "ada@example.org"][1:]
    assert "Hello Ada," in body_text(digest)
    assert digest["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # The mail client's one-click button: a bare POST, no cookie, no redirect.
    one_click = httpx_post_one_click(one_click_url(digest))
    assert one_click.status_code == 200
    assert "set-cookie" not in one_click.headers and "location" not in one_click.headers
    assert "You have been unsubscribed" in one_click.text
    assert subscription_of(rt, "ada@example.org").status == SubscriptionStatus.UNSUBSCRIBED
    assert events_of(rt, "ada@example.org")[-1] == ("unsubscribed", "one-click")

    before = settle(smtp_server.recorder)
    send_next_issue(rt, reuse_articles=True)
    after = wait_for(smtp_server.recorder, before + 1)
    assert len(after) == before + 1  # bob got the next digest ...
    assert after[-1]["To"].addresses[0].addr_spec == "bob@example.org"
    recipients = smtp_server.recorder.recipients()
    assert recipients.count("ada@example.org") == 2  # ... ada only had the confirmation + one


def httpx_post_one_click(url: str) -> httpx.Response:
    """Exactly what RFC 8058 says a mail client sends: a fresh client, no cookies."""
    with httpx.Client(follow_redirects=False, timeout=30) as client:
        return client.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
