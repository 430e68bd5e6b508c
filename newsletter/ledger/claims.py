"""Claim a batch's due rows under a lease, hold the lease while the batch is sent,
and give rows back: released by their worker or expired after it died.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import DateTime, Table, and_, bindparam, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.errors import NotFound
from newsletter.ledger.batches import (
    BATCHES,
    DELIVERIES,
    ISSUES,
    lock_batches,
    rowcount,
    store_counts,
)
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.models import (
    Batch,
    DeliveryStatus,
    Issue,
    IssueStatus,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from newsletter.suppression import suppressed_among

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: int
    email: str
    name: str | None
    token: str
    variant_id: int | None = None
    attempts: int = 1
    # The lease expiry written by the claim: also the claim's fencing token (see BatchLease).
    lease: datetime | None = None


# The claim's two statements, built once (Core, not ORM: building and compiling them per
# batch cost more Python time than running them; see docs/benchmarks.md).
_CLAIM = (
    update(DELIVERIES)
    .where(
        DELIVERIES.c.issue_id == bindparam("b_issue"),
        DELIVERIES.c.id.between(bindparam("b_first"), bindparam("b_last")),
        DELIVERIES.c.status == DeliveryStatus.QUEUED.value,
        or_(
            DELIVERIES.c.next_attempt_at.is_(None),
            DELIVERIES.c.next_attempt_at <= bindparam("b_now", type_=DateTime(timezone=True)),
        ),
        exists().where(
            ISSUES.c.id == bindparam("b_issue"), ISSUES.c.status == IssueStatus.SENDING.value
        ),
    )
    .values(
        status=DeliveryStatus.CLAIMED.value,
        lease_expires_at=bindparam("b_lease", type_=DateTime(timezone=True)),
        attempts=DELIVERIES.c.attempts + 1,
    )
)
_SUBSCRIBERS = cast(Table, Subscriber.__table__)
_SUBSCRIPTIONS = cast(Table, Subscription.__table__)
_CLAIMED_READERS = (
    select(
        DELIVERIES.c.id,
        DELIVERIES.c.attempts,
        _SUBSCRIBERS.c.email,
        _SUBSCRIBERS.c.name,
        _SUBSCRIPTIONS.c.token,
        _SUBSCRIPTIONS.c.status,
        DELIVERIES.c.variant_id,
    )
    .select_from(DELIVERIES)
    .join(ISSUES, ISSUES.c.id == DELIVERIES.c.issue_id)
    .join(_SUBSCRIBERS, _SUBSCRIBERS.c.id == DELIVERIES.c.subscriber_id, isouter=True)
    .join(
        _SUBSCRIPTIONS,
        and_(
            _SUBSCRIPTIONS.c.subscriber_id == DELIVERIES.c.subscriber_id,
            _SUBSCRIPTIONS.c.list_id == ISSUES.c.list_id,
        ),
        isouter=True,
    )
    .where(
        DELIVERIES.c.issue_id == bindparam("b_issue"),
        DELIVERIES.c.id.between(bindparam("b_first"), bindparam("b_last")),
        DELIVERIES.c.status == DeliveryStatus.CLAIMED.value,
        DELIVERIES.c.lease_expires_at == bindparam("b_lease", type_=DateTime(timezone=True)),
    )
    .order_by(DELIVERIES.c.id)
)


def claim_batch(
    session: Session, batch_id: int, policy: DeliveryPolicy
) -> tuple[Batch, list[ClaimedDelivery]]:
    """Take the batch's due queued rows under a lease. Readers who left since the freeze are
    marked skipped in the same transaction, so an unsubscribe committed before the claim is
    always honoured. Commits."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFound(f"unknown batch {batch_id}")
    issue_id = batch.issue_id
    # The batch row first: its counts change with the claim, in the same transaction.
    locked = lock_batches(session, BATCHES.c.id == batch_id)
    now = utcnow()
    # A claim whose worker died is taken back here as well as by the reconciler: a batch task
    # that comes back after its worker was killed recovers the batch once the lease is over.
    expired = sum(expire_range(session, b, now) for b in locked)
    lease = now + timedelta(seconds=policy.lease_seconds)
    first_id, last_id = batch.first_id, batch.last_id
    where = {"b_issue": issue_id, "b_first": first_id, "b_last": last_id, "b_lease": lease}
    claimed = rowcount(session.execute(_CLAIM, {**where, "b_now": now}))
    if not claimed:
        if expired:
            store_counts(session, locked)
        session.commit()
        return batch, []
    # The rows just claimed are exactly the batch's rows carrying this lease (the batch row
    # is locked, so no other claim of this range can write the same instant).
    rows = session.execute(_CLAIMED_READERS, where).all()
    ready: list[ClaimedDelivery] = []
    skipped: list[dict[str, Any]] = []
    for delivery_id, attempts, email, name, token, status, variant_id in rows:
        if email is None or token is None:
            skipped.append({"b_id": delivery_id, "reason": "subscriber erased before send"})
        elif status != SubscriptionStatus.ACTIVE:
            skipped.append(
                {"b_id": delivery_id, "reason": f"{SubscriptionStatus(status).value} before send"}
            )
        else:
            ready.append(
                ClaimedDelivery(delivery_id, email, name, token, variant_id, attempts, lease)
            )
    if policy.suppression_key is not None and ready:
        barred = suppressed_among(session, [d.email for d in ready], policy.suppression_key)
        if barred:
            skipped += [
                {"b_id": d.id, "reason": "address suppressed before send"}
                for d in ready
                if d.email in barred
            ]
            ready = [d for d in ready if d.email not in barred]
    if skipped:
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id == bindparam("b_id"))
            .values(
                status=DeliveryStatus.SKIPPED.value,
                last_error=bindparam("reason"),
                lease_expires_at=None,
            ),
            skipped,
        )
    # n_claimed > 0 from here on: the batch is counted live while it is sent.
    store_counts(session, locked)
    session.commit()
    return batch, ready


class BatchLease:
    """A batch's hold on its claimed rows while one worker sends it.

    A background thread renews the lease (every `policy.renew_seconds`, while the sending loop
    makes progress) and reads the issue's status every `policy.status_check_seconds`, so a
    pause or a cancel stops the batch within about a second. The lease expiry written by the
    last claim or renewal is also the claim's fencing token: every write back (an outcome, a
    renewal, a release) only touches rows that still carry it, so a worker that lost its rows
    to an expired lease can never overwrite the state of whoever took them over.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        batch: Batch,
        claimed: Sequence[ClaimedDelivery],
        policy: DeliveryPolicy,
    ) -> None:
        self.sessions = sessions
        self.issue_id = batch.issue_id
        self.id_range = (batch.first_id, batch.last_id)
        self.policy = policy
        self.lock = threading.Lock()
        # The sending loop's `sent` write in flight (see _BatchSender._send_record): a renewal
        # waits for it, and no new one starts while a renewal waits or runs, so that a write
        # never meets rows whose lease changed under it.
        self.changed = threading.Condition(self.lock)
        self.writing = False
        self.renewing = False
        # Every value our rows may carry: normally one; two after a renewal whose commit
        # failed without our knowing whether it landed.
        self.values: list[datetime] = sorted({d.lease for d in claimed if d.lease is not None})
        self.owned = {d.id for d in claimed}
        self.halted: IssueStatus | None = None
        now = time.monotonic()
        self.valid_until = now + policy.lease_seconds - policy.lease_margin
        self._last_progress = now
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-issue-{self.issue_id}", daemon=True
        )

    def __enter__(self) -> BatchLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self) -> None:
        """The sending loop is alive. A hung loop stops renewing, and its lease runs out."""
        self._last_progress = time.monotonic()

    def may_send(self, delivery_id: int) -> bool:
        with self.lock:
            return (
                self.halted is None
                and time.monotonic() < self.valid_until
                and delivery_id in self.owned
            )

    def halt(self, status: IssueStatus) -> None:
        with self.lock:
            self.halted = status

    @property
    def lapsed(self) -> bool:
        return time.monotonic() >= self.valid_until

    def fenced(self) -> Any:
        """The SQL condition "this row is still ours"."""
        return and_(
            DELIVERIES.c.status == DeliveryStatus.CLAIMED.value,
            DELIVERIES.c.lease_expires_at.in_(self.values),
        )

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.policy.renew_seconds
        while not self._stop.wait(self.policy.status_check_seconds):
            try:
                with self.sessions() as session:
                    status = session.scalar(select(Issue.status).where(Issue.id == self.issue_id))
                    if status is not IssueStatus.SENDING:
                        self.halt(status or IssueStatus.CANCELLED)
                        return
                    now = time.monotonic()
                    alive = now - self._last_progress < self.policy.lease_seconds
                    if now >= next_renewal and alive and self._renew(session):
                        next_renewal = time.monotonic() + self.policy.renew_seconds
            except Exception as exc:  # the database is away: try again next tick
                log.warning("issue %d: lease check failed (%s); retrying", self.issue_id, exc)

    def _renew(self, session: Session) -> bool:
        """Renew, once the write in flight (if any) is in. False: none came back within a
        few seconds (a stuck loop; it stops making progress and its lease runs out)."""
        with self.lock:
            self.renewing = True
            try:
                if not self.changed.wait_for(lambda: not self.writing, timeout=5.0):
                    return False
                self._renew_rows(session)
                return True
            finally:
                self.renewing = False
                self.changed.notify_all()

    def _renew_rows(self, session: Session) -> None:
        """Move our rows to a new lease (the caller holds the lock)."""
        started = time.monotonic()
        new = utcnow() + timedelta(seconds=self.policy.lease_seconds)
        try:
            kept = session.scalars(
                update(DELIVERIES)
                .where(DELIVERIES.c.id.between(*self.id_range), self.fenced())
                .values(lease_expires_at=new)
                .returning(DELIVERIES.c.id)
            ).all()
            session.commit()
        except Exception:
            self.values = [*self.values[-2:], new]  # the write may have landed
            raise
        self.values = [new]
        self.owned &= set(kept)
        self.valid_until = started + self.policy.lease_seconds - self.policy.lease_margin


def release_claims(session: Session, lease: BatchLease, from_id: int, to: DeliveryStatus) -> int:
    """Give back the rows of a batch from `from_id` on that were claimed but never tried:
    to `queued` (paused; or stopped for any other reason) or `cancelled`. Caller commits."""
    first_id, last_id = lease.id_range
    locked = lock_batches(
        session,
        BATCHES.c.issue_id == lease.issue_id,
        BATCHES.c.first_id == first_id,
        BATCHES.c.last_id == last_id,
    )
    released = rowcount(
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.between(from_id, last_id), lease.fenced())
            .values(status=to.value, lease_expires_at=None, attempts=DELIVERIES.c.attempts - 1)
        )
    )
    store_counts(session, locked)
    return released


def expire_range(session: Session, batch: Any, now: datetime) -> int:
    """Expired claims of one (locked) batch back to queued, or cancelled if the issue is."""
    expired = [
        DELIVERIES.c.issue_id == batch.issue_id,
        DELIVERIES.c.id.between(batch.first_id, batch.last_id),
        DELIVERIES.c.status == DeliveryStatus.CLAIMED.value,
        DELIVERIES.c.lease_expires_at < now,
    ]
    cancelled = exists().where(Issue.id == batch.issue_id, Issue.status == IssueStatus.CANCELLED)
    count = rowcount(
        session.execute(
            update(DELIVERIES)
            .where(*expired, cancelled)
            .values(status=DeliveryStatus.CANCELLED.value, lease_expires_at=None)
        )
    )
    return count + rowcount(
        session.execute(
            update(DELIVERIES)
            .where(*expired)
            .values(
                status=DeliveryStatus.QUEUED.value,
                lease_expires_at=None,
                last_error="lease expired: its worker stopped before recording an outcome",
            )
        )
    )
