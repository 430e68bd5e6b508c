"""POST /api/webhooks/bounces: a returned mail posted by an MTA or a provider's webhook."""

from __future__ import annotations

from urllib.parse import unquote

import httpx

from newsletter import subscriptions
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.web.conftest import ADMIN_TOKEN
from tests.web.helpers import Served, make_list, send_next_issue, subscription_of, wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EVENT_FIELDS = (
    "type", "source", "status", "outcome", "subscriber", "delivery", "issue", "paused_issue",
    "summary",
)  # fmt: skip


def post(web: Served, raw: bytes, **headers: str) -> httpx.Response:
    return web.client.post(
        "/api/webhooks/bounces",
        content=raw,
        headers={**AUTH, "Content-Type": "message/rfc822", **headers},
    )


def test_a_mail_to_the_list_unsubscribe_address_unsubscribes_once(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    make_list(rt)
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(
            s, "ann@example.org", "world", confirmed=True, suppression_key=rt.suppression_key
        )
    send_next_issue(rt)
    [digest] = wait_for(smtp_server.recorder, 1)
    mailto = digest["List-Unsubscribe"].split("<mailto:", 1)[1].split(">", 1)[0]
    address, _, query = mailto.partition("?")
    subject = unquote(query.removeprefix("subject="))
    raw = (
        f"From: Ann <ann@example.org>\r\nTo: {address}\r\nSubject: {subject}\r\n"
        "Date: Sat, 28 Nov 2026 19:02:44 +0000\r\nMessage-ID: <u1@example.org>\r\n"
        "\r\nPlease take me off.\r\n"
    ).encode()

    first = post(web, raw)
    assert first.status_code == 200
    [event] = first.json()["events"]
    assert event["type"] == "unsubscribe"
    assert set(event) == set(EVENT_FIELDS)  # bounces ingest --json prints the same objects
    assert subscription_of(rt, "ann@example.org").status == SubscriptionStatus.UNSUBSCRIBED

    again = post(web, raw).json()["events"]
    assert again[0]["outcome"] != first.json()["events"][0]["outcome"]


def test_the_webhook_refuses_empty_bodies_and_missing_tokens(rt: Runtime, web: Served) -> None:
    empty = post(web, b"  ")
    assert empty.status_code == 422
    assert "empty" in empty.json()["error"]
    anonymous = web.client.post("/api/webhooks/bounces", content=b"From: x@example.org\r\n\r\nhi")
    assert anonymous.status_code == 401
