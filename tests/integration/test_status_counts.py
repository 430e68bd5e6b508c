"""`issues status` reads its counts from the batches (a sum over a few thousand rows at a
million deliveries, plus a live count of the batches being sent), not from a count over the
deliveries. Whatever changes the ledger, the figures it shows must be the ledger's: each test
compares them with a real GROUP BY after every step. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from newsletter import issues, subscriptions
from newsletter.db import make_engine, upgrade
from newsletter.ledger.batches import refresh_batch_counts
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.claims import BatchLease, ClaimedDelivery, claim_batch, release_claims
from newsletter.ledger.control import cancel_issue, pause_issue, reconcile, resume_issue
from newsletter.ledger.freeze import start_send
from newsletter.ledger.outcomes import record_outcome
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.ledger.sender import BatchReport, run_in_process, send_batch
from newsletter.ledger.status import issue_status
from newsletter.models import Batch, Delivery, DeliveryStatus, IssueStatus
from newsletter.runtime import Runtime
from newsletter.transport import Outcome, SendResult
from tests.conftest import SmtpServer
from tests.integration.helpers import KEY, issue_row, seed_world


@pytest.fixture
def rt(db_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(db_url, smtp_url=smtp_server.url)


def ledger(rt: Runtime, issue_id: int) -> dict[str, int]:
    """The truth: the issue's deliveries counted by status."""
    counts = {s.value: 0 for s in DeliveryStatus}
    with rt.sessions() as s:
        for status, n in s.execute(
            select(Delivery.status, func.count())
            .where(Delivery.issue_id == issue_id)
            .group_by(Delivery.status)
        ):
            counts[DeliveryStatus(status).value] = n
    return counts


def status(rt: Runtime, issue_id: int) -> dict[str, int]:
    """What `issues status` shows, checked against the ledger."""
    with rt.sessions() as s:
        shown = issue_status(s, issue_id)
    assert shown["counts"] == ledger(rt, issue_id)
    assert shown["total"] == sum(shown["counts"].values())
    return {k: v for k, v in shown["counts"].items() if v}


def live_batches(rt: Runtime, issue_id: int) -> int:
    """Batches counted live (being sent): none once nothing is in flight."""
    with rt.sessions() as s:
        return (
            s.scalar(
                select(func.count())
                .select_from(Batch)
                .where(Batch.issue_id == issue_id, Batch.n_claimed > 0)
            )
            or 0
        )


def freeze(rt: Runtime, issue_id: int, batch_size: int) -> list[int]:
    with rt.sessions() as s, s.begin():
        return start_send(s, issue_id, batch_size=batch_size)


def send(rt: Runtime, batch_id: int) -> BatchReport:
    return send_batch(rt.sessions, batch_id, rt.transport, rt.links, rt.policy, IssueCache())


def record_sent(rt: Runtime, s: Session, row: ClaimedDelivery) -> None:
    """What a worker writes when the server took the message (caller commits)."""
    record_outcome(
        s,
        row,
        SendResult(Outcome.SENT, 250, "2.0.0 queued", "data"),
        message_id=f"<d{row.id}@example.org>",
        policy=rt.policy,
        started_at=None,
        lease=[row.lease] if row.lease else [],
    )


def test_counts_agree_through_a_normal_send(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=12, pending=2, unsubscribed=2)
    batch_ids = freeze(rt, issue_id, batch_size=5)
    assert len(batch_ids) == 3
    assert status(rt, issue_id) == {"queued": 12}
    send(rt, batch_ids[0])
    assert status(rt, issue_id) == {"sent": 5, "queued": 7}
    run_in_process(rt.sessions, issue_id, batch_ids[1:], rt.transport, rt.links, rt.policy)
    assert status(rt, issue_id) == {"sent": 12}
    assert issue_row(rt, issue_id).status == IssueStatus.SENT
    assert live_batches(rt, issue_id) == 0


def test_counts_move_while_a_batch_is_in_flight(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=6)
    [batch_id] = freeze(rt, issue_id, batch_size=10)
    with rt.sessions() as s:
        _batch, claimed = claim_batch(s, batch_id, rt.policy)
    assert status(rt, issue_id) == {"claimed": 6}
    # The worker writes each outcome as it goes, without touching the batch row.
    with rt.sessions() as s:
        for number, row in enumerate(claimed[:3], start=1):
            record_sent(rt, s, row)
            s.commit()
            assert status(rt, issue_id) == {"sent": number, "claimed": 6 - number}
    assert live_batches(rt, issue_id) == 1


@pytest.mark.parametrize("action", ["cancel", "pause"])
def test_counts_follow_an_operator_stopping_a_batch_midway(rt: Runtime, action: str) -> None:
    issue_id = seed_world(rt, confirmed=12)
    batch_ids = freeze(rt, issue_id, batch_size=5)
    send(rt, batch_ids[0])
    # A worker holds the second batch and has sent two of its five readers.
    with rt.sessions() as s:
        batch, claimed = claim_batch(s, batch_ids[1], rt.policy)
    with rt.sessions() as s:
        for row in claimed[:2]:
            record_sent(rt, s, row)
            s.commit()
    assert status(rt, issue_id) == {"sent": 7, "claimed": 3, "queued": 2}
    with rt.sessions() as s, s.begin():
        if action == "cancel":
            assert cancel_issue(s, issue_id) == 2  # the third batch, not yet claimed
        else:
            pause_issue(s, issue_id)
    after = {"sent": 7, "claimed": 3, "cancelled": 2} if action == "cancel" else None
    assert status(rt, issue_id) == (after or {"sent": 7, "claimed": 3, "queued": 2})
    # The worker notices within a second, gives back its untried rows and ends its pass.
    to = DeliveryStatus.CANCELLED if action == "cancel" else DeliveryStatus.QUEUED
    lease = BatchLease(rt.sessions, batch, claimed, rt.policy)
    with rt.sessions() as s:
        assert release_claims(s, lease, claimed[2].id, to) == 3
        s.commit()
    expected = {"sent": 7, "cancelled": 5} if action == "cancel" else {"sent": 7, "queued": 5}
    assert status(rt, issue_id) == expected
    with rt.sessions() as s:
        refresh_batch_counts(s, batch.id)
        s.commit()
    assert status(rt, issue_id) == expected
    assert live_batches(rt, issue_id) == 0
    if action == "pause":
        with rt.sessions() as s, s.begin():
            todo = resume_issue(s, issue_id)
        run_in_process(rt.sessions, issue_id, todo, rt.transport, rt.links, rt.policy)
        assert status(rt, issue_id) == {"sent": 12}
    else:
        # The reconciler finds nothing left to fix.
        with rt.sessions() as s, s.begin():
            reconcile(s, requeue_after=timedelta(0), broker_idle=True)
        assert status(rt, issue_id) == expected


def test_counts_follow_retries_and_refusals(rt: Runtime, smtp_server: SmtpServer) -> None:
    issue_id = seed_world(rt, confirmed=6)
    refused: list[str] = []

    def once(address: str) -> bool:
        if address == "reader2@example.org" and not refused:
            refused.append(address)
            return True
        return False

    smtp_server.recorder.rules.append(("rcpt", once, "451 4.7.1 greylisted, try again"))
    smtp_server.recorder.rules.append(
        ("rcpt", lambda a: a == "reader4@example.org", "550 5.1.1 no such user")
    )
    [batch_id] = freeze(rt, issue_id, batch_size=10)
    report = send(rt, batch_id)
    assert (report.sent, report.retrying, report.failed) == (4, 1, 1)
    assert status(rt, issue_id) == {"sent": 4, "queued": 1, "failed": 1}
    assert live_batches(rt, issue_id) == 0
    with rt.sessions() as s:
        errors = [e["error"] for e in issue_status(s, issue_id)["last_errors"]]
    assert len(errors) == 2
    assert any("451" in e for e in errors) and any("550" in e for e in errors)
    run_in_process(rt.sessions, issue_id, [], rt.transport, rt.links, rt.policy)
    assert status(rt, issue_id) == {"sent": 5, "failed": 1}
    with rt.sessions() as s:
        shown = issue_status(s, issue_id)
    assert [e["error"] for e in shown["last_errors"]] == ["permanent: 550 5.1.1 no such user"]
    assert shown["feedback"]["sent"] == 5


def test_counts_follow_an_expired_lease(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=3)
    [batch_id] = freeze(rt, issue_id, batch_size=100)
    dead = DeliveryPolicy(lease_seconds=-1)  # already expired: a dead worker's claim
    with rt.sessions() as s:
        _batch, claimed = claim_batch(s, batch_id, dead)
    assert len(claimed) == 3
    assert status(rt, issue_id) == {"claimed": 3}
    with rt.sessions() as s, s.begin():
        assert reconcile(s, requeue_after=timedelta(0), broker_idle=True) == [batch_id]
    assert status(rt, issue_id) == {"queued": 3}
    assert live_batches(rt, issue_id) == 0
    send(rt, batch_id)
    assert status(rt, issue_id) == {"sent": 3}


def test_a_worker_that_died_after_its_last_outcome_is_still_counted_right(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=2)
    [batch_id] = freeze(rt, issue_id, batch_size=10)
    with rt.sessions() as s:
        _batch, claimed = claim_batch(s, batch_id, rt.policy)
        for row in claimed:
            record_sent(rt, s, row)
            s.commit()
    # ... and never ended its pass: the batch is still counted live, and right.
    assert status(rt, issue_id) == {"sent": 2}
    with rt.sessions() as s, s.begin():
        reconcile(s, requeue_after=timedelta(0), broker_idle=True)
    assert status(rt, issue_id) == {"sent": 2}
    assert live_batches(rt, issue_id) == 0
    assert issue_row(rt, issue_id).status == IssueStatus.SENT


def test_counts_of_skipped_readers(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=8)
    with rt.sessions() as s, s.begin():
        for number in (1, 5):  # a section no article of this issue is in
            sub = subscriptions.find_subscription(s, f"reader{number}@example.org", "world")
            subscriptions.set_preferences(
                s, sub, name=None, sections=["Sport"], paused=False, source="page"
            )
        sub = subscriptions.find_subscription(s, "reader7@example.org", "world")
        subscriptions.set_preferences(s, sub, name=None, sections=None, paused=True, source="page")
    with rt.sessions() as s, s.begin():
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=3,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    assert status(rt, issue_id) == {"queued": 5, "skipped": 2}  # the paused reader is not in
    # Unsubscribed between the freeze and the claim: skipped when the batch is claimed.
    with rt.sessions() as s, s.begin():
        subscriptions.unsubscribe(s, "reader0@example.org", "world", source="one-click")
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)
    assert status(rt, issue_id) == {"sent": 4, "skipped": 3}
    with rt.sessions() as s:
        reasons = set(
            s.scalars(
                select(Delivery.last_error).where(
                    Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.SKIPPED
                )
            )
        )
    assert reasons == {
        "no article in this issue is in the reader's chosen sections",
        "unsubscribed before send",
    }


def test_nobody_to_send_to_still_shows_who_was_skipped(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=3)
    with rt.sessions() as s, s.begin():
        for number in range(3):
            sub = subscriptions.find_subscription(s, f"reader{number}@example.org", "world")
            subscriptions.set_preferences(
                s, sub, name=None, sections=["Sport"], paused=False, source="page"
            )
    with rt.sessions() as s, s.begin():
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=2,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    assert batch_ids == []  # nothing to enqueue
    issue = issue_row(rt, issue_id)
    assert issue.status == IssueStatus.SENT
    assert issue.status_reason and "nobody to send to" in issue.status_reason
    assert status(rt, issue_id) == {"skipped": 3}


def test_an_empty_audience_freezes_nothing(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=0, pending=1)
    assert freeze(rt, issue_id, batch_size=5) == []
    assert issue_row(rt, issue_id).status == IssueStatus.SENT
    assert status(rt, issue_id) == {}


def test_batches_cover_every_delivery_once(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=10)
    batch_ids = freeze(rt, issue_id, batch_size=4)
    with rt.sessions() as s:
        batches = s.execute(
            select(Batch.first_id, Batch.last_id, Batch.n_queued)
            .where(Batch.issue_id == issue_id)
            .order_by(Batch.first_id)
        ).all()
        ids = list(s.scalars(select(Delivery.id).where(Delivery.issue_id == issue_id)))
    assert len(batch_ids) == 3
    assert [n for _a, _b, n in batches] == [4, 4, 2]
    for delivery_id in ids:
        assert sum(a <= delivery_id <= b for a, b, _n in batches) == 1
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)
    assert status(rt, issue_id) == {"sent": 10}


def test_an_erased_reader_leaves_an_anonymous_delivery(rt: Runtime) -> None:
    issue_id = seed_world(rt, confirmed=2)
    batch_ids = freeze(rt, issue_id, batch_size=10)
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(
            s, "reader0@example.org", suppression_key=KEY, source="operator"
        )
    with rt.sessions() as s:
        kept = list(s.scalars(select(Delivery.subscriber_id).where(Delivery.issue_id == issue_id)))
    assert len(kept) == 2 and kept.count(None) == 1  # the delivery stays, anonymous
    assert status(rt, issue_id) == {"sent": 2}


def test_the_models_match_the_migrations(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from newsletter.models import Base

    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    tables = ("'deliveries'", "'batches'", "'events'", "'subscriptions'")
    assert [d for d in diff if any(t in repr(d) for t in tables)] == []


def test_the_migration_counts_batches_frozen_before_it(rt: Runtime) -> None:
    """Issues frozen by the old code: batches covered only the queued rows, and an issue
    whose readers were all skipped had none. After the upgrade every delivery is in one
    batch and the counts are the ledger's."""
    sent_issue = seed_world(rt, confirmed=12)
    with rt.sessions() as s, s.begin():
        nobody = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(1970, 1, 1, tzinfo=UTC),
        ).id
    from alembic import command

    from newsletter.db import alembic_config

    command.downgrade(alembic_config(rt.engine), "0002")
    try:
        statuses = ["skipped", "skipped"] + ["sent", "failed", "queued", "claimed"] * 2
        statuses += ["skipped", "skipped"]
        with rt.engine.begin() as conn:
            subscribers = list(conn.scalars(text("SELECT id FROM subscribers ORDER BY id")))
            for subscriber_id, state in zip(subscribers, statuses, strict=True):
                conn.execute(
                    text(
                        "INSERT INTO deliveries (issue_id, subscriber_id, status, attempts) "
                        "VALUES (:i, :s, :st, 1)"
                    ),
                    {"i": sent_issue, "s": subscriber_id, "st": state},
                )
            ids = list(conn.scalars(text("SELECT id FROM deliveries ORDER BY id")))
            conn.execute(
                text(
                    "INSERT INTO batches (issue_id, first_id, last_id) "
                    "VALUES (:i, :a, :b), (:i, :c, :d)"
                ),
                {"i": sent_issue, "a": ids[2], "b": ids[5], "c": ids[6], "d": ids[9]},
            )
            for subscriber_id in subscribers[:3]:
                conn.execute(
                    text(
                        "INSERT INTO deliveries (issue_id, subscriber_id, status, attempts) "
                        "VALUES (:i, :s, 'skipped', 0)"
                    ),
                    {"i": nobody, "s": subscriber_id},
                )
            # A bounce about one of those deliveries keeps naming it, and its subscription,
            # after the upgrade (SQLite rebuilds both tables).
            subscription = conn.scalar(text("SELECT MIN(id) FROM subscriptions"))
            conn.execute(
                text(
                    "INSERT INTO bounce_events (key, kind, source, outcome, created_at, "
                    "issue_id, delivery_id, subscription_id) VALUES ('k', 'hard_bounce', "
                    "'dsn', 'suppressed', :now, :i, :d, :sub)"
                ),
                {"now": datetime.now(UTC), "i": sent_issue, "d": ids[3], "sub": subscription},
            )
    finally:
        upgrade(rt.engine)
    with rt.engine.connect() as conn:
        kept = conn.execute(text("SELECT delivery_id, subscription_id FROM bounce_events")).one()
        assert tuple(kept) == (ids[3], subscription)
    assert status(rt, sent_issue) == {
        "skipped": 4,
        "sent": 2,
        "failed": 2,
        "queued": 2,
        "claimed": 2,
    }
    assert status(rt, nobody) == {"skipped": 3}
    with rt.sessions() as s:
        for issue_id in (sent_issue, nobody):
            ranges = s.execute(
                select(Batch.first_id, Batch.last_id).where(Batch.issue_id == issue_id)
            ).all()
            for delivery_id in s.scalars(select(Delivery.id).where(Delivery.issue_id == issue_id)):
                assert sum(a <= delivery_id <= b for a, b in ranges) == 1
