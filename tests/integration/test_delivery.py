"""Delivery through the ledger, in-process, to a real SMTP server that can be told to refuse.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from newsletter import subscriptions
from newsletter.errors import Conflict
from newsletter.ledger import sender
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.claims import claim_batch
from newsletter.ledger.control import cancel_issue, pause_issue, reconcile, resume_issue
from newsletter.ledger.freeze import start_send
from newsletter.ledger.outcomes import SentWriter, record_outcome
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.ledger.sender import run_in_process, send_batch
from newsletter.models import (
    Delivery,
    DeliveryStatus,
    Event,
    IssueStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.integration.helpers import (
    assert_well_formed,
    confirmed_addresses,
    deliveries,
    issue_row,
    seed_world,
)


@pytest.fixture
def rt(db_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(db_url, smtp_url=smtp_server.url, batch_size=7)


def send(rt: Runtime, issue_id: int) -> None:
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)


def test_every_confirmed_reader_gets_exactly_one_well_formed_digest(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=40, pending=5, unsubscribed=5)
    send(rt, issue_id)
    received = smtp_server.recorder.messages
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(40)
    message_ids = set()
    for r in received:
        msg = r.message()
        assert_well_formed(r.data, msg)
        assert msg["To"].addresses[0].addr_spec == r.rcpt_tos[0]
        unsubscribe = msg["List-Unsubscribe"]
        assert unsubscribe.startswith("<https://news.example.org/unsubscribe/")
        html = msg.get_body(("html",)).get_content()
        assert unsubscribe.split(">")[0][1:] in html  # the footer link is the reader's own
        message_ids.add(msg["Message-ID"])
    assert len(message_ids) == 40
    rows = deliveries(rt, issue_id)
    assert {d.status for d in rows} == {DeliveryStatus.SENT}
    assert all(d.smtp_code == 250 and d.message_id for d in rows)
    assert issue_row(rt, issue_id).status == IssueStatus.SENT


def test_unsubscribe_after_the_freeze_is_honoured(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=10)
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
        subscriptions.unsubscribe(s, "reader3@example.org", "world", source="one-click")
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)
    got = smtp_server.recorder.recipients()
    assert "reader3@example.org" not in got and len(got) == 9
    skipped = [d for d in deliveries(rt, issue_id) if d.status == DeliveryStatus.SKIPPED]
    assert len(skipped) == 1 and skipped[0].last_error == "unsubscribed before send"


def test_temporary_refusal_is_retried_and_delivered_once(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=5)
    refused: list[str] = []

    def once(address: str) -> bool:
        if address == "reader2@example.org" and not refused:
            refused.append(address)
            return True
        return False

    smtp_server.recorder.rules.append(("rcpt", once, "451 4.7.1 greylisted, try again"))
    sleeps: list[float] = []
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=rt.settings.batch_size)
    run_in_process(
        rt.sessions,
        issue_id,
        batch_ids,
        rt.transport,
        rt.links,
        rt.policy,
        sleep=lambda t: (sleeps.append(t), __import__("time").sleep(t)),  # type: ignore[func-returns-value]
    )
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(5)
    row = next(d for d in deliveries(rt, issue_id) if d.attempts == 2)
    assert row.status == DeliveryStatus.SENT
    assert sleeps and 0 < sleeps[0] <= rt.settings.retry_max_seconds


def test_permanent_refusal_fails_and_bounces_the_address(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=4)
    smtp_server.recorder.rules.append(
        ("rcpt", lambda a: a == "reader1@example.org", "550 5.1.1 no such user")
    )
    send(rt, issue_id)
    failed = [d for d in deliveries(rt, issue_id) if d.status == DeliveryStatus.FAILED]
    assert len(failed) == 1 and failed[0].smtp_code == 550
    assert "no such user" in (failed[0].last_error or "")
    with rt.sessions() as s:
        statuses = dict(s.execute(select(Subscription.token, Subscription.status)).all())
        bounced = [st for st in statuses.values() if st == SubscriptionStatus.BOUNCED]
        assert len(bounced) == 1
        assert s.scalar(select(Event.source).where(Event.kind == "bounced")) == "bounce"
    # A later issue does not go to the bounced address.
    assert issue_row(rt, issue_id).status == IssueStatus.SENT


def test_552_is_temporary_not_a_bounce(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=2)
    smtp_server.recorder.rules.append(
        ("data", lambda a: a == "reader0@example.org", "552 5.2.2 mailbox full")
    )
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=10)
    report = send_batch(rt.sessions, batch_ids[0], rt.transport, rt.links, rt.policy, IssueCache())
    assert (report.sent, report.retrying, report.failed) == (1, 1, 0)
    row = next(d for d in deliveries(rt, issue_id) if d.smtp_code == 552)
    assert row.status == DeliveryStatus.QUEUED and row.next_attempt_at is not None
    with rt.sessions() as s:
        assert SubscriptionStatus.BOUNCED not in set(s.scalars(select(Subscription.status)))


def test_a_batch_run_twice_sends_nothing_twice(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=6)
    with rt.sessions() as s, s.begin():
        [batch_id] = start_send(s, issue_id, batch_size=100)
    cache = IssueCache()
    first = send_batch(rt.sessions, batch_id, rt.transport, rt.links, rt.policy, cache)
    second = send_batch(rt.sessions, batch_id, rt.transport, rt.links, rt.policy, cache)
    assert (first.sent, second.claimed) == (6, 0)
    assert len(smtp_server.recorder.messages) == 6


def test_pause_resume_and_cancel(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=21)  # three batches of 7
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=7)
    cache = IssueCache()
    send_batch(rt.sessions, batch_ids[0], rt.transport, rt.links, rt.policy, cache)
    with rt.sessions() as s, s.begin():
        pause_issue(s, issue_id)
    paused = send_batch(rt.sessions, batch_ids[1], rt.transport, rt.links, rt.policy, cache)
    assert paused.claimed == 0 and len(smtp_server.recorder.messages) == 7
    with rt.sessions() as s, s.begin():
        todo = resume_issue(s, issue_id)
    assert todo == batch_ids[1:]
    send_batch(rt.sessions, todo[0], rt.transport, rt.links, rt.policy, cache)
    with rt.sessions() as s, s.begin():
        assert cancel_issue(s, issue_id) == 7
    with rt.sessions() as s, s.begin(), pytest.raises(Conflict):
        resume_issue(s, issue_id)
    assert len(smtp_server.recorder.messages) == 14
    assert len(set(smtp_server.recorder.recipients())) == 14
    counts = {d.status for d in deliveries(rt, issue_id)}
    assert counts == {DeliveryStatus.SENT, DeliveryStatus.CANCELLED}


def test_an_expired_lease_goes_back_to_the_queue(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=3)
    with rt.sessions() as s, s.begin():
        [batch_id] = start_send(s, issue_id, batch_size=100)
    short = DeliveryPolicy(lease_seconds=-1)  # already expired: a dead worker's claim
    with rt.sessions() as s:
        _batch, claimed = claim_batch(s, batch_id, short)
    assert len(claimed) == 3
    with rt.sessions() as s, s.begin():
        assert reconcile(
            s, requeue_after=__import__("datetime").timedelta(0), broker_idle=True
        ) == [batch_id]
    send_batch(rt.sessions, batch_id, rt.transport, rt.links, rt.policy, IssueCache())
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(3)
    assert issue_row(rt, issue_id).status == IssueStatus.SENT


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-a-time"])
def test_at_most_one_accepted_message_is_ever_unrecorded(
    rt: Runtime, smtp_server: SmtpServer, pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate bound, observed from the server: when a message's final "." arrives,
    every message accepted before it is already recorded `sent` in the ledger, as another
    connection reads it. So a worker that dies leaves at most one accepted message
    unrecorded (the last), though recording overlaps the next message's transfer."""
    issue_id = seed_world(rt, confirmed=24)
    seen: list[tuple[int, int]] = []  # (messages accepted before this one, rows recorded sent)
    count_sent = (
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.SENT)
    )

    # A slow database: each outcome takes 50 ms to record, far longer than a message takes
    # to travel, so a sender that let the server take messages ahead of their records
    # would be caught.
    def slowly(write: Callable[..., Any]) -> Callable[..., Any]:
        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.05)
            return write(*args, **kwargs)

        return slow

    monkeypatch.setattr(sender, "record_outcome", slowly(record_outcome))
    # On PostgreSQL the `sent` write is in flight while the next message travels: the
    # server itself takes 50 ms over it (a new statement name: the slow one is prepared
    # beside the normal one).
    monkeypatch.setattr(
        SentWriter,
        "SQL",
        SentWriter.SQL + " AND (SELECT 1 FROM pg_sleep(0.05)) = 1",
    )
    monkeypatch.setattr(SentWriter, "NAME", b"nl_record_sent_slowly")
    with rt.engine.connect() as reader:

        def at_final_dot(_envelope: object) -> None:
            recorded = reader.scalar(count_sent)
            reader.rollback()  # the next look sees what was committed since
            seen.append((len(smtp_server.recorder.messages), int(recorded or 0)))

        smtp_server.recorder.pipelining = pipelining
        smtp_server.recorder.on_data = at_final_dot
        send(rt, issue_id)
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(24)
    assert len(seen) == 24
    assert all(recorded >= accepted for accepted, recorded in seen), seen
    assert {d.status for d in deliveries(rt, issue_id)} == {DeliveryStatus.SENT}
