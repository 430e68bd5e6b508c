"""The sending loop: claim a batch, then for each reader build -> throttle -> transmit ->
record over one transport session; and the in-process runner that needs no broker.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.feedback import apply_rejection
from newsletter.ledger.batches import TRANSIENT_DB_ERRORS, refresh_batch_counts
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.claims import BatchLease, ClaimedDelivery, claim_batch, release_claims
from newsletter.ledger.control import (
    batches_with_work,
    expire_leases,
    finish_if_done,
    next_check_at,
    next_pending_at,
)
from newsletter.ledger.outcomes import SentWriter, note_outcome, record_outcome
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.message import format_date
from newsletter.models import Batch, Delivery, DeliveryStatus, Issue, IssueStatus, utcnow
from newsletter.outgoing import Links, PreparedIssue, build_for
from newsletter.ratelimit import Throttle
from newsletter.transport import Outcome, SendResult, Transport, TransportSession, session_of

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    issue_id: int
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retrying: int = 0
    # When this batch next needs a look: its earliest retry, or the lease expiry of rows
    # someone else holds. None: nothing left in it (or the issue is not sending).
    retry_at: datetime | None = None
    paused_itself: bool = False
    counts: dict[str, int] = field(default_factory=dict)


def send_batch(
    sessions: sessionmaker[Session],
    batch_id: int,
    transport: Transport,
    links: Links,
    policy: DeliveryPolicy,
    cache: IssueCache,
    *,
    throttle: Throttle | None = None,
) -> BatchReport:
    """Claim a batch, send it over ONE transport session, record each outcome as it goes.

    The batch keeps its database connections for all its commits (one per message): its
    session's, and on PostgreSQL the `sent` writer's (SentWriter); handing them back to
    the pool after each commit would cost a checkout and a pre-ping per message. A
    connection that dies is invalidated by the failed statement and reconnects on the next
    one, which the outcome writer retries."""
    engine = sessions.kw["bind"]
    with engine.connect() as connection, sessions(bind=connection) as session:
        batch, claimed = claim_batch(session, batch_id, policy)
        report = BatchReport(issue_id=batch.issue_id, claimed=len(claimed))
        if claimed:
            _BatchSender(sessions, session, batch, claimed, policy, report).run(
                transport, links, cache, throttle
            )
            refresh_batch_counts(session, batch_id)  # the pass's outcomes, into its counts
        report.retry_at = next_check_at(session, batch)
        finish_if_done(session, batch.issue_id)
        session.commit()
    return report


class _BatchSender:
    """One batch, one SMTP session: build, throttle, send and record each message in turn."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        session: Session,
        batch: Batch,
        claimed: list[ClaimedDelivery],
        policy: DeliveryPolicy,
        report: BatchReport,
    ) -> None:
        self.sessions = sessions
        self.session = session
        self.batch = batch
        self.claimed = claimed
        self.policy = policy
        self.report = report
        self.lease = BatchLease(sessions, batch, claimed, policy)
        self.started_at: datetime | None = None
        self.untried = 0  # index of the first delivery not yet handed to the transport
        # A success resets the issue's consecutive-failure count. Writing that on every
        # message is a hot-row UPDATE per message; it is needed only after a failure this
        # sender saw, or about once a second for other workers' failures.
        self._reset_due = True
        self._last_reset = 0.0
        # A `sent` record sent to the database and not yet read back: (delivery, outcome,
        # message id, counted), see _send_record.
        self._pending: tuple[ClaimedDelivery, SendResult, str, bool] | None = None
        engine = sessions.kw["bind"]
        self.sent_writer = SentWriter(engine) if SentWriter.fits(engine) else None

    def run(
        self, transport: Transport, links: Links, cache: IssueCache, throttle: Throttle | None
    ) -> None:
        # Whatever stops the batch, the rows never handed to the transport go back at once
        # (the one in flight, if any, waits for its lease to run out: it may have arrived).
        try:
            prepared = self._prepare(cache)
            with self.lease, session_of(transport) as conn:
                self._loop(conn, prepared, links, throttle)
        finally:
            if self.sent_writer is not None:
                self.sent_writer.close()
            if self.untried < len(self.claimed):
                self._release(self.claimed[self.untried].id)

    def _prepare(self, cache: IssueCache) -> dict[int | None, PreparedIssue | str]:
        issue_id = self.batch.issue_id
        prepared: dict[int | None, PreparedIssue | str] = {}
        for variant_id in {d.variant_id for d in self.claimed}:
            try:
                prepared[variant_id] = cache.get(self.session, issue_id, variant_id)
            except TRANSIENT_DB_ERRORS:
                raise
            except Exception as exc:  # a template or header the message builder refuses
                log.exception("issue %d: cannot prepare variant %s", issue_id, variant_id)
                prepared[variant_id] = f"cannot build message: {exc}"
        self.started_at = self.session.scalar(
            select(Issue.send_started_at).where(Issue.id == issue_id)
        )
        self.session.commit()
        return prepared

    def _loop(
        self,
        conn: TransportSession,
        prepared: dict[int | None, PreparedIssue | str],
        links: Links,
        throttle: Throttle | None,
    ) -> None:
        """Send the claimed rows in order, overlapping each `sent` record with the next
        message: while message N's outcome is being written, message N+1 travels up to its
        final "." (which commits nothing at the server), and the "." goes only once N's
        record is in. So at most one accepted message is ever unrecorded, as when each
        outcome was written before the next message started, but the write's round trip
        and commit no longer stand between two messages."""
        date, date_at = format_date(), time.monotonic()
        connect_failure_counted = False
        try:
            for index, delivery in enumerate(self.claimed):
                self.untried = index
                if not self.lease.may_send(delivery.id):
                    if self.lease.halted is not None or self.lease.lapsed:
                        return
                    continue  # taken over by another worker after our lease lapsed
                self.lease.progress()
                if time.monotonic() - date_at > 1:
                    date, date_at = format_date(), time.monotonic()
                target = prepared[delivery.variant_id]
                outcome, message_id = self._send_one(
                    conn, index, delivery, target, links, date, throttle
                )
                if outcome is None:  # paused, cancelled or lease lapsed meanwhile
                    return
                self.lease.progress()
                # A server that refuses the connection fails the rest of the batch at
                # once with the same reply: one failure of the server, not one per reader.
                counted = not (outcome.stage == "connect" and connect_failure_counted)
                connect_failure_counted |= outcome.stage == "connect"
                self.untried = index + 1
                self._settle()
                if outcome.outcome is Outcome.SENT and self.sent_writer is not None:
                    self._send_record(delivery, outcome, message_id, counted)
                elif self._record(delivery, outcome, message_id, counted=counted):
                    # Failures are written at once and in order: the count of
                    # consecutive failures that pauses the issue sees each before the next.
                    self.lease.halt(IssueStatus.PAUSED)
                    return
            self.untried = len(self.claimed)
        finally:
            self._settle()

    def _send_one(
        self,
        conn: TransportSession,
        index: int,
        delivery: ClaimedDelivery,
        target: PreparedIssue | str,
        links: Links,
        date: str,
        throttle: Throttle | None,
    ) -> tuple[SendResult | None, str]:
        """One message: build -> throttle -> transmit. The outcome is None when the batch
        must stop before the message goes (paused, cancelled or lease lapsed meanwhile)."""
        built = self._build(delivery, target, links, date)
        if isinstance(built, SendResult):
            return built, ""
        data, message_id = built
        refused = self._throttle(conn, delivery, throttle)
        if refused is not None:
            return refused, message_id
        if not self.lease.may_send(delivery.id):  # the limiter may have waited
            return None, ""
        assert not isinstance(target, str)
        return self._transmit(conn, index, delivery, target, data), message_id

    def _build(
        self, delivery: ClaimedDelivery, target: PreparedIssue | str, links: Links, date: str
    ) -> tuple[bytes, str] | SendResult:
        """Step 1, build: the reader's bytes and Message-ID, or the permanent failure of a
        message that cannot be built (it will not build next time either: it is parked)."""
        if isinstance(target, str):
            return SendResult(Outcome.PERMANENT, 0, target, "build")
        try:
            return build_for(
                target,
                links,
                delivery_id=delivery.id,
                email=delivery.email,
                name=delivery.name,
                token=delivery.token,
                date=date,
            )
        except Exception as exc:
            log.warning("delivery %d: cannot build message: %s", delivery.id, exc)
            return SendResult(Outcome.PERMANENT, 0, f"cannot build message: {exc}", "build")

    def _throttle(
        self, conn: TransportSession, delivery: ClaimedDelivery, throttle: Throttle | None
    ) -> SendResult | None:
        """Step 2, throttle: wait for the rate limits. Connected before the token is taken:
        what follows the token is this message alone, so the spacing the limiter gives is the
        spacing the server sees. A server that refuses the connection is the outcome."""
        if throttle is None:
            return None
        refused = conn.ready()
        if refused is not None:
            return refused
        throttle(delivery.email)
        return None

    def _transmit(
        self,
        conn: TransportSession,
        index: int,
        delivery: ClaimedDelivery,
        target: PreparedIssue,
        data: bytes,
    ) -> SendResult | None:
        """Step 3, transmit: envelope and body up to the final "."; then, once the previous
        message's record is in, the "." itself. None: the batch stopped before the "."."""
        self.lease.progress()
        outcome = conn.begin(target.envelope_for(delivery.id), delivery.email, data)
        if outcome is not None:
            return outcome
        # The server holds all of this message but its final ".": the previous record must
        # be in before the server may take this one.
        try:
            self._settle()
        except BaseException:
            conn.abandon()
            raise
        if not self.lease.may_send(delivery.id):
            conn.abandon()
            return None
        self.untried = index + 1
        return conn.finish()

    def _send_record(
        self, delivery: ClaimedDelivery, outcome: SendResult, message_id: str, counted: bool
    ) -> None:
        """Step 4, record, overlapped: hand message N's `sent` record to the database and
        return: it travels while message N+1 does, and `_settle` reads it back before N+1's
        final ".". If it cannot even be sent, it is written now, with the usual retries."""
        assert self.sent_writer is not None
        lease = self.lease
        with lease.lock:
            lease.changed.wait_for(lambda: not lease.renewing)
            try:
                self.sent_writer.send(delivery.id, lease.values, outcome, message_id, utcnow())
            except TRANSIENT_DB_ERRORS:
                sent = False
            else:
                sent = lease.writing = True
        if sent:
            self._pending = (delivery, outcome, message_id, counted)
        else:
            self._record(delivery, outcome, message_id, counted=counted)

    def _settle(self) -> None:
        """Read back the `sent` record in flight, if any. If the database went away
        meanwhile, write it again (with retries; its errors are raised here)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        assert self.sent_writer is not None
        delivery, outcome, message_id, counted = pending
        written: list[DeliveryStatus | None] = []
        try:
            written.append(DeliveryStatus.SENT if self.sent_writer.collect() else None)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("delivery %d: recording failed (%s); retrying", delivery.id, exc)
        finally:
            with self.lease.lock:
                self.lease.writing = False
                self.lease.changed.notify_all()
        self._record(delivery, outcome, message_id, counted=counted, written=written)

    def _record(
        self,
        delivery: ClaimedDelivery,
        outcome: SendResult,
        message_id: str,
        *,
        counted: bool,
        written: list[DeliveryStatus | None] | None = None,
    ) -> bool:
        """Step 4, record: write -> feedback -> count -> commit (`_record_once`), retried
        while the database is briefly away, as long as the lease holds; then the report.
        `written` holds the `sent` write once it is done (by `_settle`, or by a try here that
        failed after it), so a retry never writes it twice. Returns True when this failure
        made the issue pause itself."""
        written = [] if written is None else written
        delay = 0.2
        while True:
            try:
                status, paused = self._record_once(delivery, outcome, message_id, counted, written)
                break
            except TRANSIENT_DB_ERRORS as exc:
                with contextlib.suppress(Exception):
                    self.session.rollback()
                if time.monotonic() + delay >= self.lease.valid_until:
                    raise
                log.warning("delivery %d: recording failed (%s); retrying", delivery.id, exc)
                time.sleep(delay)
                delay = min(2.0, delay * 2)
        self._report(delivery, outcome, status, paused)
        return paused

    def _record_once(
        self,
        delivery: ClaimedDelivery,
        outcome: SendResult,
        message_id: str,
        counted: bool,
        written: list[DeliveryStatus | None],
    ) -> tuple[DeliveryStatus | None, bool]:
        """One try, under the lease's lock: (the row's new status, or None when it was no
        longer ours; whether the issue paused itself)."""
        with self.lease.lock:
            status = self._write(delivery, outcome, message_id, written)
            paused = False
            if status is not None:
                self._apply_feedback(delivery, outcome)
                paused = self._count(status, outcome, counted)
            # Only what the steps above wrote through the session: a `sent` by the writer
            # is committed by itself, and the session's transaction then stays empty.
            if self.session.in_transaction():
                self.session.commit()
            self.lease.owned.discard(delivery.id)
        return status, paused

    def _write(
        self,
        delivery: ClaimedDelivery,
        outcome: SendResult,
        message_id: str,
        written: list[DeliveryStatus | None],
    ) -> DeliveryStatus | None:
        """The outcome onto the row, fenced by our lease (newsletter.ledger.outcomes)."""
        if self.sent_writer is not None and outcome.outcome is Outcome.SENT:
            if not written:
                rows = self.sent_writer.write(
                    delivery.id, self.lease.values, outcome, message_id, utcnow()
                )
                written.append(DeliveryStatus.SENT if rows else None)
            return written[0]
        return record_outcome(
            self.session,
            delivery,
            outcome,
            message_id=message_id,
            policy=self.policy,
            started_at=self.started_at,
            lease=self.lease.values,
        )

    def _apply_feedback(self, delivery: ClaimedDelivery, outcome: SendResult) -> None:
        """A refusal at RCPT is a hard bounce: the DSN policy applies (newsletter.feedback)."""
        if outcome.hard_bounce:
            apply_rejection(
                self.session, delivery.id, outcome.code, outcome.reply, policy=self.policy.feedback
            )

    def _count(self, status: DeliveryStatus, outcome: SendResult, counted: bool) -> bool:
        """The issue's consecutive-failure count: every failure, and a success's reset only
        when one is due. True when this failure made the issue pause itself."""
        failed = status is not DeliveryStatus.SENT
        if not counted or not (failed or self._reset_wanted()):
            return False
        paused = note_outcome(
            self.session,
            self.batch.issue_id,
            failed=failed,
            policy=self.policy,
            error=outcome.describe(),
        )
        self._reset_due = failed
        if not failed:
            self._last_reset = time.monotonic()
        return paused

    def _report(
        self,
        delivery: ClaimedDelivery,
        outcome: SendResult,
        status: DeliveryStatus | None,
        paused: bool,
    ) -> None:
        report = self.report
        if status is None:
            log.warning(
                "delivery %d was taken over after our lease lapsed; not recording %s",
                delivery.id,
                outcome.describe(),
            )
        elif status is DeliveryStatus.SENT:
            report.sent += 1
        elif status is DeliveryStatus.FAILED:
            report.failed += 1
        else:
            report.retrying += 1
        report.paused_itself |= paused

    def _reset_wanted(self) -> bool:
        return self._reset_due or time.monotonic() - self._last_reset >= 1.0

    def _release(self, from_id: int) -> None:
        try:
            with self.sessions() as session, self.lease.lock:
                status = session.scalar(select(Issue.status).where(Issue.id == self.batch.issue_id))
                to = (
                    DeliveryStatus.CANCELLED
                    if status in (IssueStatus.CANCELLED, None)
                    else DeliveryStatus.QUEUED
                )
                released = release_claims(session, self.lease, from_id, to)
                session.commit()
            log.info("issue %d: released %d untried deliveries", self.batch.issue_id, released)
        except Exception as exc:  # their lease runs out and the reconciler takes them back
            log.warning("issue %d: could not release claims (%s)", self.batch.issue_id, exc)


def run_in_process(
    sessions: sessionmaker[Session],
    issue_id: int,
    batch_ids: Sequence[int],
    transport: Transport,
    links: Links,
    policy: DeliveryPolicy,
    *,
    on_batch: Callable[[BatchReport], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    throttle: Throttle | None = None,
    cache: IssueCache | None = None,
) -> None:
    """Deliver every batch here, then wait for and run retries until nothing is left or the
    issue stops being `sending` (paused, cancelled). Pass `cache` to sign (DKIM) or to use
    VERP envelope senders: IssueCache(dkim=..., verp=...)."""
    cache = cache if cache is not None else IssueCache()
    todo = list(batch_ids)
    while True:
        for batch_id in todo:
            report = send_batch(
                sessions, batch_id, transport, links, policy, cache, throttle=throttle
            )
            if on_batch:
                on_batch(report)
        with sessions() as session:
            status = session.scalar(select(Issue.status).where(Issue.id == issue_id))
            if status != IssueStatus.SENDING:
                return
            expire_leases(session, issue_id=issue_id)
            session.commit()
            todo = batches_with_work(session, issue_id=issue_id)
            if todo:
                continue
            wake = next_pending_at(session, Delivery.issue_id == issue_id)
            if wake is None:
                finish_if_done(session, issue_id)
                session.commit()
                return
        wait = (wake - utcnow()).total_seconds()
        if wait > 0:
            sleep(wait)
