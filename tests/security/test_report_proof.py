"""Finding 2 of issue 13: a bounce or complaint report changes a reader only when it proves it
is about our message (a VERP address with a valid MAC, or our per-delivery Message-ID with a
valid MAC in the returned headers), or comes through the authenticated webhook.

A reader of an issue being sent (the attacker) has her own copy: its Message-ID and its
envelope sender. Message-IDs used to be `<d{delivery id}.{issue nonce}@domain>`, the same nonce
in every copy and ids counting up, so she could name any other reader's message. Reports go
in through `newsletter bounces ingest`, as the operator feeds the bounce mailbox; the
figures come out of `newsletter issues status`.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from newsletter import subscriptions
from newsletter.ledger.freeze import start_send
from newsletter.ledger.sender import send_batch
from newsletter.models import Batch, SubscriptionStatus
from newsletter.runtime import Runtime
from tests.conftest import cli_env, run_cli
from tests.integration.helpers import seed_world

READERS = 40
BOUNCE_DOMAIN = "bounces.example.org"


@pytest.fixture
def rt(pg_url: str, tmp_path: Path, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(pg_url, outbox_dir=str(tmp_path / "outbox"), batch_size=4)


def env_of(rt: Runtime, **extra: str) -> dict[str, str]:
    return cli_env(
        database_url=rt.settings.database_url, outbox_dir=str(rt.settings.outbox_dir), **extra
    )


def sending_issue(rt: Runtime) -> int:
    """An issue of READERS readers being sent: its first batch (reader0..reader3) delivered,
    the rest still queued, as when a big send is under way."""
    issue_id = seed_world(rt, confirmed=READERS)
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
    with rt.sessions() as s:
        first = s.scalar(select(Batch.id).where(Batch.id.in_(batch_ids)).order_by(Batch.first_id))
    assert first is not None
    send_batch(rt.sessions, first, rt.transport, rt.links, rt.policy, rt.issue_cache())
    return issue_id


def copy_of(rt: Runtime, address: str) -> email.message.EmailMessage:
    """The copy `address` received (from the outbox)."""
    for path in sorted((Path(rt.settings.outbox_dir) / "new").iterdir()):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if str(msg["Delivered-To"]) == address:
            assert isinstance(msg, email.message.EmailMessage)
            return msg
    raise AssertionError(f"no copy for {address}")


def derived_message_id(own: str, steps: int) -> str:
    """Another reader's Message-ID as the attacker derives it from her own."""
    number, rest = re.fullmatch(r"<d(\d+)(\..*)>", own).groups()  # type: ignore[union-attr]
    return f"<d{int(number) + steps}{rest}>"


def dsn(message_id: str | None, *recipients: str, envelope: str = "bounces@example.org") -> bytes:
    blocks = "".join(
        f"Final-Recipient: rfc822; {r}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{r}>... User unknown\r\n\r\n"
        for r in recipients
    )
    original = f"Message-ID: {message_id}\r\n" if message_id else ""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@evil.example>\r\n"
        f"To: {envelope}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <forged-dsn-" + str(abs(hash((message_id, recipients)))) + "@evil.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.evil.example\r\n\r\n"
        f"{blocks}"
        "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: World Desk <desk@example.org>\r\n"
        f"{original}"
        'List-Id: "World Digest" <world.example.org>\r\n'
        "\r\n--b1--\r\n"
    ).encode()


def arf(message_id: str, recipient: str, *, mail_from: str = "") -> bytes:
    return (
        "From: Feedback Loop <fbl@attacker.example>\r\n"
        "To: abuse@example.org\r\n"
        "Subject: FW: World Digest\r\n"
        f"Message-ID: <forged-arf-{abs(hash(message_id))}@attacker.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b2"\r\n\r\n'
        "--b2\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        "--b2\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: FBL/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        + (f"Original-Mail-From: <{mail_from}>\r\n" if mail_from else "")
        + "\r\n--b2\r\nContent-Type: message/rfc822\r\n\r\n"
        "From: World Desk <desk@example.org>\r\n"
        f"To: {recipient}\r\n"
        f"Message-ID: {message_id}\r\n"
        'List-Id: "World Digest" <world.example.org>\r\n'
        "Subject: World Digest\r\n\r\nHello\r\n"
        "--b2--\r\n"
    ).encode()


def ingest(rt: Runtime, tmp_path: Path, raw: bytes, name: str, **extra: str) -> list[dict]:
    path = tmp_path / f"{name}.eml"
    path.write_bytes(raw)
    out = run_cli("bounces", "ingest", str(path), "--json", env=env_of(rt, **extra)).stdout
    return list(json.loads(out))


def status_of(rt: Runtime, address: str) -> SubscriptionStatus:
    with rt.sessions() as s:
        return subscriptions.find_subscription(s, address, "world").status


def issue_status(rt: Runtime, issue_id: int) -> tuple[dict, str]:
    env = env_of(rt)
    as_json = json.loads(run_cli("issues", "status", str(issue_id), "--json", env=env).stdout)
    return as_json, run_cli("issues", "status", str(issue_id), env=env).stdout


def test_a_forged_dsn_naming_a_derived_message_id_changes_nobody(
    rt: Runtime, tmp_path: Path
) -> None:
    issue_id = sending_issue(rt)
    own = str(copy_of(rt, "reader0@example.org")["Message-ID"])
    for steps, victim in ((1, "reader1@example.org"), (9, "reader9@example.org")):
        forged = dsn(derived_message_id(own, steps), victim)
        ingest(rt, tmp_path, forged, f"dsn{steps}")
        assert status_of(rt, victim) is SubscriptionStatus.ACTIVE, victim

    # Nor does one naming readers by address only, two at once.
    ingest(rt, tmp_path, dsn(None, "reader2@example.org", "reader3@example.org"), "two")
    assert status_of(rt, "reader2@example.org") is SubscriptionStatus.ACTIVE
    assert status_of(rt, "reader3@example.org") is SubscriptionStatus.ACTIVE

    figures, shown = issue_status(rt, issue_id)
    assert figures["feedback"]["hard_bounces"] == 0
    # Stored and shown: one per address each report named.
    assert figures["feedback"]["unverified_reports"] == 4
    assert "unverified reports 4" in shown


def test_a_forged_complaint_does_not_pause_a_send(rt: Runtime, tmp_path: Path) -> None:
    issue_id = sending_issue(rt)
    own = str(copy_of(rt, "reader0@example.org")["Message-ID"])
    ingest(rt, tmp_path, arf(derived_message_id(own, 2), "reader2@example.org"), "arf")

    figures, shown = issue_status(rt, issue_id)
    assert figures["status"] == "sending", figures["reason"]
    assert figures["feedback"]["complaints"] == 0
    assert status_of(rt, "reader2@example.org") is SubscriptionStatus.ACTIVE
    assert "unverified reports 1" in shown


def test_one_report_naming_two_addresses_changes_only_the_one_it_proves(
    rt: Runtime, tmp_path: Path
) -> None:
    sending_issue(rt)
    own = str(copy_of(rt, "reader0@example.org")["Message-ID"])
    ingest(rt, tmp_path, dsn(own, "reader0@example.org", "reader5@example.org"), "pair")
    assert status_of(rt, "reader0@example.org") is SubscriptionStatus.BOUNCED
    assert status_of(rt, "reader5@example.org") is SubscriptionStatus.ACTIVE


def test_genuine_reports_still_apply(rt: Runtime, tmp_path: Path) -> None:
    """A DSN returned to the VERP address of reader1's copy bounces reader1; an ARF report
    returning reader2's copy (its Message-ID) marks reader2 complained and, past the rate,
    pauses the send."""
    rt.settings.bounce_domain = BOUNCE_DOMAIN
    rt.__dict__.pop("verp", None)
    issue_id = sending_issue(rt)
    envelope = str(copy_of(rt, "reader1@example.org")["Return-Path"]).strip("<>")
    assert envelope.endswith("@" + BOUNCE_DOMAIN)
    ingest(
        rt,
        tmp_path,
        dsn(None, "reader1@example.org", envelope=envelope),
        "verp",
        bounce_domain=BOUNCE_DOMAIN,
    )
    assert status_of(rt, "reader1@example.org") is SubscriptionStatus.BOUNCED

    genuine = str(copy_of(rt, "reader2@example.org")["Message-ID"])
    ingest(rt, tmp_path, arf(genuine, "reader2@example.org"), "arf", bounce_domain=BOUNCE_DOMAIN)
    assert status_of(rt, "reader2@example.org") is SubscriptionStatus.COMPLAINED
    figures, _shown = issue_status(rt, issue_id)
    assert figures["status"] == "paused"
    assert figures["feedback"]["complaints"] == 1
    assert figures["feedback"]["hard_bounces"] == 1
    assert figures["feedback"]["unverified_reports"] == 0
