"""The delivery ledger: freeze the audience, claim batches, record outcomes, reconcile.

The database is the only source of truth. A broker message only says "look at batch N";
losing it loses nothing because the reconciler finds queued rows nobody is working on, and
running it twice sends nothing twice because a claim only takes rows still `queued`.

Life of a delivery row (one transition function per cause, no ad-hoc updates elsewhere):

    queued --claim--> claimed --250--> sent
       ^                 |---4xx/socket--> queued (next_attempt_at = backoff) or failed
       |                 |---5xx---------> failed (a 5xx at RCPT also bounces the address)
       +--lease expired--+---unsubscribed since the freeze--> skipped
    queued --cancel--> cancelled
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Integer,
    String,
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from newsletter.addresses import domain_of, parse_from_address
from newsletter.errors import Conflict, NotFound
from newsletter.message import CompiledMessage, IssueMessageSpec, Recipient, format_date
from newsletter.message import make_message_id as _make_message_id
from newsletter.models import (
    Batch,
    Delivery,
    DeliveryStatus,
    Issue,
    IssueStatus,
    IssueVariant,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from newsletter.subscriptions import set_status
from newsletter.tokens import LinkSigner, Purpose, link
from newsletter.transport import Outcome, SendResult, Transport, session_of

log = logging.getLogger(__name__)

DELIVERIES = cast(Table, Delivery.__table__)
PENDING_STATES = (DeliveryStatus.QUEUED, DeliveryStatus.CLAIMED)


@dataclass(frozen=True)
class DeliveryPolicy:
    lease_seconds: int = 600
    retry_base_seconds: float = 60
    retry_max_seconds: float = 1800
    retry_deadline: timedelta = timedelta(hours=24)
    max_consecutive_failures: int = 50

    def backoff(self, attempts: int) -> float:
        """Exponential with full jitter in its upper half: spreads retries of a batch."""
        ceiling = min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(attempts - 1, 0))
        return ceiling / 2 + random.random() * ceiling / 2


@dataclass(frozen=True)
class Links:
    """Builds a reader's personal links from the subscription's opaque token."""

    base_url: str
    signer: LinkSigner

    def unsubscribe(self, token: str) -> str:
        return link(
            self.base_url, Purpose.UNSUBSCRIBE, self.signer.sign(Purpose.UNSUBSCRIBE, token)
        )

    def preferences(self, token: str) -> str:
        return link(
            self.base_url, Purpose.PREFERENCES, self.signer.sign(Purpose.PREFERENCES, token)
        )

    def confirm(self, token: str) -> str:
        return link(self.base_url, Purpose.CONFIRM, self.signer.sign(Purpose.CONFIRM, token))

    def unsubscribe_mailto(self, list_address: str, token: str) -> str:
        # Mail to the list's own From address with the signed token in the subject; the
        # bounce/inbox processor turns it into an unsubscribe.
        signed = self.signer.sign(Purpose.UNSUBSCRIBE, token)
        return f"mailto:{list_address}?subject=unsubscribe%20{signed}"

    def archive(self, slug: str, issue_id: int) -> str:
        return f"{self.base_url}/archive/{slug}/{issue_id}"


# --- per-issue message preparation ---


@dataclass(frozen=True)
class PreparedIssue:
    """Everything per issue that per-recipient sending needs; built once per worker process."""

    issue_id: int
    list_id: int
    envelope_from: str
    list_address: str
    domain: str
    nonce: str
    compiled: CompiledMessage


def prepare_issue(
    issue: Issue,
    mlist: MailingList,
    *,
    subject_prefix: str = "",
    variant: IssueVariant | None = None,
) -> PreparedIssue:
    _name, address = parse_from_address(mlist.from_address)
    domain = domain_of(address)
    safe_name = mlist.name.replace('"', "").replace("\\", "")
    list_id = (
        f'"{safe_name}" <{mlist.slug}.{domain}>'
        if safe_name.isascii()
        else f"<{mlist.slug}.{domain}>"
    )
    spec = IssueMessageSpec(
        subject=subject_prefix + issue.subject,
        from_address=mlist.from_address,
        reply_to=mlist.reply_to,
        list_id=list_id,
        html=variant.html if variant is not None else issue.html,
        text=variant.text if variant is not None else issue.text,
        message_id_domain=domain,
    )
    return PreparedIssue(
        issue_id=issue.id,
        list_id=mlist.id,
        envelope_from=address,
        list_address=address,
        domain=domain,
        nonce=issue.nonce,
        compiled=CompiledMessage.compile(spec),
    )


def build_for(
    prepared: PreparedIssue,
    links: Links,
    *,
    delivery_id: int,
    email: str,
    name: str | None,
    token: str,
    date: str,
) -> tuple[bytes, str]:
    message_id = _make_message_id(delivery_id, prepared.nonce, prepared.domain)
    recipient = Recipient(
        email=email,
        name=name,
        unsubscribe_url=links.unsubscribe(token),
        preferences_url=links.preferences(token),
        unsubscribe_mailto=links.unsubscribe_mailto(prepared.list_address, token),
        message_id=message_id,
    )
    return prepared.compiled.build(recipient, date=date), message_id


class IssueCache:
    """Per-process cache of prepared issues and variants: each is compiled once per worker
    process and reused by every batch."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: dict[tuple[int, int | None], PreparedIssue] = {}

    def get(self, session: Session, issue_id: int, variant_id: int | None = None) -> PreparedIssue:
        prepared = self._items.get((issue_id, variant_id))
        if prepared is None:
            issue = session.get(Issue, issue_id)
            if issue is None:
                raise NotFound(f"unknown issue {issue_id}")
            mlist = session.get(MailingList, issue.list_id)
            assert mlist is not None
            variant = session.get(IssueVariant, variant_id) if variant_id is not None else None
            prepared = prepare_issue(issue, mlist, variant=variant)
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[(issue_id, variant_id)] = prepared
        return prepared


# --- freeze ---


def start_send(session: Session, issue_id: int, *, batch_size: int) -> list[int]:
    """Freeze the audience and cut it into batches, in the caller's transaction.

    Returns the batch ids; the caller commits and only then enqueues them.
    """
    issue = session.get(Issue, issue_id)
    if issue is None:
        raise NotFound(f"unknown issue {issue_id}")
    now = utcnow()
    won = _rowcount(
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id, Issue.status == IssueStatus.DRAFT)
            .values(status=IssueStatus.SENDING, send_started_at=now, status_reason=None)
            .execution_options(synchronize_session=False)
        )
    )
    if not won:
        session.refresh(issue)
        raise Conflict(f"issue {issue_id} is {issue.status.value}; only a draft can be sent")
    # Each reader is frozen with the variant for their section choice (rendered before
    # this, in the same transaction, by issues.ensure_variants); NULL: the full digest.
    audience = (
        select(
            literal(issue_id, Integer()),
            Subscription.subscriber_id,
            literal(DeliveryStatus.QUEUED.value, String()),
            literal(0, Integer()),
            IssueVariant.id,
        )
        .select_from(Subscription)
        .join(
            IssueVariant,
            and_(
                IssueVariant.issue_id == issue_id,
                IssueVariant.sections_key == Subscription.sections,
            ),
            isouter=True,
        )
        .where(
            Subscription.list_id == issue.list_id,
            Subscription.status == SubscriptionStatus.ACTIVE,
            Subscription.paused.is_(False),
        )
    )
    session.execute(
        insert(DELIVERIES).from_select(
            ["issue_id", "subscriber_id", "status", "attempts", "variant_id"], audience
        )
    )
    empty = select(IssueVariant.id).where(
        IssueVariant.issue_id == issue_id, IssueVariant.article_count == 0
    )
    session.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.issue_id == issue_id, DELIVERIES.c.variant_id.in_(empty))
        .values(
            status=DeliveryStatus.SKIPPED.value,
            last_error="no article in this issue is in the reader's chosen sections",
        )
    )
    starts = (
        select(Delivery.id, func.row_number().over(order_by=Delivery.id).label("rn"))
        .where(Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.QUEUED)
        .subquery()
    )
    first_ids = list(
        session.scalars(
            select(starts.c.id).where((starts.c.rn - 1) % batch_size == 0).order_by(starts.c.id)
        )
    )
    last_id = session.scalar(
        select(func.max(Delivery.id)).where(
            Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.QUEUED
        )
    )
    bounds = [(a, b - 1) for a, b in itertools.pairwise(first_ids)]
    if first_ids:
        assert last_id is not None
        bounds.append((first_ids[-1], last_id))
    if not bounds:
        issue.status = IssueStatus.SENT
        issue.finished_at = now
        issue.status_reason = "nobody to send to (no confirmed reader wants this issue)"
        session.flush()
        return []
    ids = session.scalars(
        insert(Batch).returning(Batch.id, sort_by_parameter_order=True),
        [{"issue_id": issue_id, "first_id": a, "last_id": b} for a, b in bounds],
    ).all()
    return list(ids)


def mark_enqueued(session: Session, batch_ids: Sequence[int]) -> None:
    if batch_ids:
        session.execute(update(Batch).where(Batch.id.in_(batch_ids)).values(enqueued_at=utcnow()))


# --- claim ---


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: int
    email: str
    name: str | None
    token: str
    variant_id: int | None = None


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
    now = utcnow()
    claimed = (
        session.execute(
            update(DELIVERIES)
            .where(
                DELIVERIES.c.issue_id == issue_id,
                DELIVERIES.c.id.between(batch.first_id, batch.last_id),
                DELIVERIES.c.status == DeliveryStatus.QUEUED.value,
                or_(DELIVERIES.c.next_attempt_at.is_(None), DELIVERIES.c.next_attempt_at <= now),
                exists().where(Issue.id == issue_id, Issue.status == IssueStatus.SENDING),
            )
            .values(
                status=DeliveryStatus.CLAIMED.value,
                lease_expires_at=now + timedelta(seconds=policy.lease_seconds),
                attempts=DELIVERIES.c.attempts + 1,
            )
            .returning(DELIVERIES.c.id)
        )
        .scalars()
        .all()
    )
    if not claimed:
        session.commit()
        return batch, []
    list_id = session.scalar(select(Issue.list_id).where(Issue.id == issue_id))
    rows = session.execute(
        select(
            Delivery.id,
            Subscriber.email,
            Subscriber.name,
            Subscription.token,
            Subscription.status,
            Delivery.variant_id,
        )
        .select_from(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id, isouter=True)
        .join(
            Subscription,
            and_(
                Subscription.subscriber_id == Delivery.subscriber_id,
                Subscription.list_id == list_id,
            ),
            isouter=True,
        )
        .where(Delivery.id.in_(claimed))
        .order_by(Delivery.id)
    ).all()
    ready: list[ClaimedDelivery] = []
    skipped: list[dict[str, Any]] = []
    for delivery_id, email, name, token, status, variant_id in rows:
        if email is None or token is None:
            skipped.append({"b_id": delivery_id, "reason": "subscriber erased before send"})
        elif status != SubscriptionStatus.ACTIVE:
            skipped.append(
                {"b_id": delivery_id, "reason": f"{SubscriptionStatus(status).value} before send"}
            )
        else:
            ready.append(ClaimedDelivery(delivery_id, email, name, token, variant_id))
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
    session.commit()
    return batch, ready


# --- record ---


def record_outcome(
    session: Session,
    delivery: ClaimedDelivery,
    outcome: SendResult,
    *,
    message_id: str,
    policy: DeliveryPolicy,
    started_at: datetime | None,
    attempts: int,
) -> DeliveryStatus:
    """Write one outcome, only if the row is still ours (claimed). Caller commits."""
    now = utcnow()
    values: dict[str, Any] = {
        "smtp_code": outcome.code,
        "smtp_reply": outcome.reply[:1000],
        "lease_expires_at": None,
        "message_id": message_id,
    }
    if outcome.outcome is Outcome.SENT:
        status = DeliveryStatus.SENT
        values.update(sent_at=now, last_error=None, next_attempt_at=None)
    elif outcome.outcome is Outcome.TEMPORARY:
        retry_at = now + timedelta(seconds=policy.backoff(attempts))
        deadline = (_aware(started_at) if started_at else now) + policy.retry_deadline
        if retry_at > deadline:
            status = DeliveryStatus.FAILED
            values.update(last_error=f"gave up at the retry deadline: {outcome.describe()}")
        else:
            status = DeliveryStatus.QUEUED
            values.update(next_attempt_at=retry_at, last_error=f"temporary: {outcome.describe()}")
    else:
        status = DeliveryStatus.FAILED
        values.update(last_error=f"permanent: {outcome.describe()}")
    values["status"] = status.value
    session.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == delivery.id, DELIVERIES.c.status == DeliveryStatus.CLAIMED.value)
        .values(**values)
    )
    return status


def _bounce(session: Session, list_id: int, delivery: ClaimedDelivery, outcome: SendResult) -> None:
    sub = session.scalar(
        select(Subscription).where(
            Subscription.token == delivery.token, Subscription.list_id == list_id
        )
    )
    if sub is not None:
        set_status(session, sub, SubscriptionStatus.BOUNCED, "bounce")


@dataclass
class BatchReport:
    issue_id: int
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retrying: int = 0
    retry_at: datetime | None = None
    counts: dict[str, int] = field(default_factory=dict)


def send_batch(
    sessions: sessionmaker[Session],
    batch_id: int,
    transport: Transport,
    links: Links,
    policy: DeliveryPolicy,
    cache: IssueCache,
    *,
    throttle: Callable[[], None] | None = None,
) -> BatchReport:
    """Claim a batch, send it over ONE transport session, record each outcome as it goes."""
    with sessions() as session:
        batch, claimed = claim_batch(session, batch_id, policy)
        issue_id = batch.issue_id
        report = BatchReport(issue_id=issue_id, claimed=len(claimed))
        if not claimed:
            finish_if_done(session, issue_id)
            session.commit()
            return report
        by_variant = {v: cache.get(session, issue_id, v) for v in {d.variant_id for d in claimed}}
        started_at = session.scalar(select(Issue.send_started_at).where(Issue.id == issue_id))
        attempts = dict(
            session.execute(
                select(Delivery.id, Delivery.attempts).where(
                    Delivery.id.in_([d.id for d in claimed])
                )
            ).all()
        )
        session.commit()
        streak = 0
        date = format_date()
        date_at = time.monotonic()
        with session_of(transport) as conn:
            for delivery in claimed:
                if time.monotonic() - date_at > 1:
                    date, date_at = format_date(), time.monotonic()
                prepared = by_variant[delivery.variant_id]
                try:
                    data, message_id = build_for(
                        prepared,
                        links,
                        delivery_id=delivery.id,
                        email=delivery.email,
                        name=delivery.name,
                        token=delivery.token,
                        date=date,
                    )
                except ValueError as exc:
                    # A message that cannot be built will not build next time either: park it.
                    outcome = SendResult(
                        Outcome.PERMANENT, 0, f"cannot build message: {exc}", "build"
                    )
                    message_id = ""
                else:
                    if throttle is not None:
                        throttle()
                    outcome = conn.send(prepared.envelope_from, delivery.email, data)
                status = record_outcome(
                    session,
                    delivery,
                    outcome,
                    message_id=message_id,
                    policy=policy,
                    started_at=started_at,
                    attempts=attempts.get(delivery.id, 1),
                )
                if outcome.hard_bounce:
                    _bounce(session, prepared.list_id, delivery, outcome)
                session.commit()
                if status is DeliveryStatus.SENT:
                    report.sent += 1
                    streak = 0
                else:
                    streak += 1
                    if status is DeliveryStatus.FAILED:
                        report.failed += 1
                    else:
                        report.retrying += 1
        _after_batch(session, issue_id, report, streak, policy)
        report.retry_at = session.scalar(
            select(func.min(Delivery.next_attempt_at)).where(
                Delivery.issue_id == issue_id,
                Delivery.id.between(batch.first_id, batch.last_id),
                Delivery.status == DeliveryStatus.QUEUED,
                Delivery.next_attempt_at.is_not(None),
            )
        )
        finish_if_done(session, issue_id)
        session.commit()
    return report


def _after_batch(
    session: Session, issue_id: int, report: BatchReport, streak: int, policy: DeliveryPolicy
) -> None:
    """Track consecutive failures across batches; pause the issue when they pile up."""
    if report.sent:
        value: Any = streak
    else:
        value = Issue.consecutive_failures + streak
    session.execute(update(Issue).where(Issue.id == issue_id).values(consecutive_failures=value))
    failures = session.scalar(select(Issue.consecutive_failures).where(Issue.id == issue_id)) or 0
    if failures >= policy.max_consecutive_failures:
        last = session.scalars(
            select(Delivery.last_error)
            .where(Delivery.issue_id == issue_id, Delivery.last_error.is_not(None))
            .order_by(Delivery.id.desc())
            .limit(1)
        ).first()
        pause_issue(
            session, issue_id, reason=f"paused after {failures} consecutive failures; last: {last}"
        )


def finish_if_done(session: Session, issue_id: int) -> bool:
    """Mark a sending issue sent once no row is queued or claimed."""
    pending = session.scalar(
        select(Delivery.id)
        .where(Delivery.issue_id == issue_id, Delivery.status.in_(PENDING_STATES))
        .limit(1)
    )
    if pending is not None:
        return False
    done = _rowcount(
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id, Issue.status == IssueStatus.SENDING)
            .values(status=IssueStatus.SENT, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    )
    return bool(done)


# --- operator control and reconciliation ---


def pause_issue(session: Session, issue_id: int, *, reason: str = "paused by the operator") -> None:
    issue = _issue(session, issue_id)
    if issue.status != IssueStatus.SENDING:
        raise Conflict(
            f"issue {issue_id} is {issue.status.value}; only a sending issue can be paused"
        )
    session.execute(
        update(Issue)
        .where(Issue.id == issue_id, Issue.status == IssueStatus.SENDING)
        .values(status=IssueStatus.PAUSED, status_reason=reason[:500])
        .execution_options(synchronize_session=False)
    )


def resume_issue(session: Session, issue_id: int) -> list[int]:
    """Continue a paused issue (or nudge a sending one after a crash): expire dead leases and
    return every batch that still has queued rows, for the caller to enqueue after commit."""
    issue = _issue(session, issue_id)
    if issue.status not in (IssueStatus.PAUSED, IssueStatus.SENDING):
        raise Conflict(
            f"issue {issue_id} is {issue.status.value}; only a paused or sending issue can resume"
        )
    session.execute(
        update(Issue)
        .where(Issue.id == issue_id)
        .values(status=IssueStatus.SENDING, status_reason=None, consecutive_failures=0)
        .execution_options(synchronize_session=False)
    )
    expire_leases(session, issue_id=issue_id)
    return batches_with_work(session, issue_id=issue_id, due_only=False)


def cancel_issue(session: Session, issue_id: int) -> int:
    issue = _issue(session, issue_id)
    if issue.status not in (IssueStatus.SENDING, IssueStatus.PAUSED, IssueStatus.DRAFT):
        raise Conflict(f"issue {issue_id} is {issue.status.value} and cannot be cancelled")
    session.execute(
        update(Issue)
        .where(Issue.id == issue_id)
        .values(
            status=IssueStatus.CANCELLED,
            finished_at=utcnow(),
            status_reason="cancelled by the operator",
        )
        .execution_options(synchronize_session=False)
    )
    return _rowcount(
        session.execute(
            update(DELIVERIES)
            .where(
                DELIVERIES.c.issue_id == issue_id,
                DELIVERIES.c.status == DeliveryStatus.QUEUED.value,
            )
            .values(status=DeliveryStatus.CANCELLED.value)
        )
    )


def expire_leases(session: Session, *, issue_id: int | None = None) -> int:
    """Claimed rows whose worker died go back to queued. This is the one place a message can
    be sent twice: the worker may have had its 250 and died before recording it."""
    now = utcnow()
    query = update(DELIVERIES).where(
        DELIVERIES.c.status == DeliveryStatus.CLAIMED.value, DELIVERIES.c.lease_expires_at < now
    )
    if issue_id is not None:
        query = query.where(DELIVERIES.c.issue_id == issue_id)
    return _rowcount(
        session.execute(
            query.values(
                status=DeliveryStatus.QUEUED.value,
                lease_expires_at=None,
                last_error="lease expired",
            )
        )
    )


def batches_with_work(
    session: Session,
    *,
    issue_id: int | None = None,
    due_only: bool = True,
    stale_before: datetime | None = None,
) -> list[int]:
    """Batches of sending issues that still hold queued rows (due now, if due_only)."""
    now = utcnow()
    cond = [
        Delivery.issue_id == Batch.issue_id,
        Delivery.id.between(Batch.first_id, Batch.last_id),
        Delivery.status == DeliveryStatus.QUEUED,
    ]
    if due_only:
        cond.append(or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
    query = (
        select(Batch.id)
        .join(Issue, Issue.id == Batch.issue_id)
        .where(Issue.status == IssueStatus.SENDING, exists().where(*cond))
        .order_by(Batch.id)
    )
    if issue_id is not None:
        query = query.where(Batch.issue_id == issue_id)
    if stale_before is not None:
        query = query.where(or_(Batch.enqueued_at.is_(None), Batch.enqueued_at < stale_before))
    return list(session.scalars(query))


def reconcile(session: Session, *, requeue_after: timedelta, broker_idle: bool) -> list[int]:
    """One pass of the periodic reconciler. Expires dead leases, finishes issues with nothing
    left, and returns batches to re-enqueue: those with due rows not enqueued for a while,
    only when the broker queue is empty (a busy queue still holds their tasks)."""
    expire_leases(session)
    for issue_id in session.scalars(select(Issue.id).where(Issue.status == IssueStatus.SENDING)):
        finish_if_done(session, issue_id)
    if not broker_idle:
        return []
    return batches_with_work(session, stale_before=utcnow() - requeue_after)


def _issue(session: Session, issue_id: int) -> Issue:
    issue = session.get(Issue, issue_id)
    if issue is None:
        raise NotFound(f"unknown issue {issue_id}")
    return issue


def delivery_counts(session: Session, issue_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.issue_id == issue_id)
        .group_by(Delivery.status)
    ).all()
    counts = {s.value: 0 for s in DeliveryStatus}
    for status, n in rows:
        counts[DeliveryStatus(status).value] = n
    return counts


def issue_status(session: Session, issue_id: int) -> dict[str, Any]:
    issue = _issue(session, issue_id)
    counts = delivery_counts(session, issue_id)
    errors = session.execute(
        select(Delivery.id, Delivery.last_error)
        .where(
            Delivery.issue_id == issue_id,
            Delivery.status.in_((DeliveryStatus.FAILED, DeliveryStatus.QUEUED)),
            Delivery.last_error.is_not(None),
        )
        .order_by(Delivery.id.desc())
        .limit(5)
    ).all()
    return {
        "id": issue.id,
        "subject": issue.subject,
        "status": issue.status.value,
        "reason": issue.status_reason,
        "total": sum(counts.values()),
        "counts": counts,
        "send_started_at": issue.send_started_at.isoformat() if issue.send_started_at else None,
        "finished_at": issue.finished_at.isoformat() if issue.finished_at else None,
        "last_errors": [{"delivery": i, "error": e} for i, e in errors],
    }


# --- in-process runner (no broker) ---


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
    throttle: Callable[[], None] | None = None,
) -> None:
    """Deliver every batch here, then wait for and run retries until nothing is left."""
    cache = IssueCache()
    todo = list(batch_ids)
    while todo:
        retry_at: datetime | None = None
        for batch_id in todo:
            report = send_batch(
                sessions, batch_id, transport, links, policy, cache, throttle=throttle
            )
            if on_batch:
                on_batch(report)
            if report.retry_at and (retry_at is None or report.retry_at < retry_at):
                retry_at = report.retry_at
        with sessions() as session:
            status = session.scalar(select(Issue.status).where(Issue.id == issue_id))
            if status != IssueStatus.SENDING:
                return
            if retry_at is not None:
                wait = (_aware(retry_at) - utcnow()).total_seconds()
                if wait > 0:
                    sleep(wait)
            todo = batches_with_work(session, issue_id=issue_id)


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def new_nonce() -> str:
    return secrets.token_hex(6)
