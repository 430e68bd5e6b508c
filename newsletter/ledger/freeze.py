"""Freeze an issue's audience into delivery rows and cut them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    and_,
    case,
    func,
    insert,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from newsletter.errors import Conflict, NotFound
from newsletter.ledger.batches import BATCHES, DELIVERIES, rowcount
from newsletter.models import (
    Batch,
    DeliveryStatus,
    Issue,
    IssueStatus,
    IssueVariant,
    Subscription,
    SubscriptionStatus,
    utcnow,
)

NO_ARTICLE_REASON = "no article in this issue is in the reader's chosen sections"


def start_send(session: Session, issue_id: int, *, batch_size: int) -> list[int]:
    """Freeze the audience and cut it into batches, in the caller's transaction.

    Returns the batch ids; the caller commits and only then enqueues them.
    """
    issue = session.get(Issue, issue_id)
    if issue is None:
        raise NotFound(f"unknown issue {issue_id}")
    now = utcnow()
    won = rowcount(
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
    # this, in the same transaction, by issues.ensure_variants); NULL: the full digest. A
    # reader whose choice selects no article of this issue is frozen `skipped`, saying why,
    # in the same statement. In subscription order, read from the index on (list, status,
    # id): readers subscribe in about the order they are created, so the indexes on (issue,
    # subscriber) and (subscriber) are filled nearly in order rather than at random.
    empty = IssueVariant.article_count == 0
    audience = (
        select(
            literal(issue_id, Integer()),
            Subscription.subscriber_id,
            case(
                (empty, literal(DeliveryStatus.SKIPPED.value, String())),
                else_=literal(DeliveryStatus.QUEUED.value, String()),
            ),
            literal(0, Integer()),
            IssueVariant.id,
            case((empty, literal(NO_ARTICLE_REASON, String())), else_=null()),
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
        .order_by(Subscription.id)
    )
    freeze = insert(DELIVERIES).from_select(
        ["issue_id", "subscriber_id", "status", "attempts", "variant_id", "last_error"], audience
    )
    # Batches are cut by arithmetic on the ids the freeze produced: every `batch_size`
    # consecutive ids from the issue's first one make a batch, whose range is the least and
    # greatest id in it. Ids of one INSERT are consecutive unless another transaction took
    # some meanwhile (a concurrent freeze): a batch then holds fewer rows, never a row of
    # another batch. Each batch starts with its rows' counts (issue_status sums them).
    if session.get_bind().dialect.name == "postgresql":
        # One statement: the frozen rows come back from the INSERT into a CTE and are
        # counted there, instead of being read again from the table.
        frozen: Any = freeze.returning(DELIVERIES.c.id, DELIVERIES.c.status).cte("frozen")
    else:
        session.execute(freeze)
        frozen = (
            select(DELIVERIES.c.id, DELIVERIES.c.status)
            .where(DELIVERIES.c.issue_id == issue_id)
            .subquery("frozen")
        )
    queued = func.count(case((frozen.c.status == DeliveryStatus.QUEUED.value, 1)))
    skipped = func.count(case((frozen.c.status == DeliveryStatus.SKIPPED.value, 1)))
    offset = select(func.min(frozen.c.id)).scalar_subquery()
    cut = (
        select(
            literal(issue_id, Integer()),
            func.min(frozen.c.id),
            func.max(frozen.c.id),
            # Counted as enqueued from the start: the caller enqueues them right after the
            # commit, and the reconciler must not race it into enqueuing them a second time.
            case((queued > 0, literal(now, DateTime(timezone=True))), else_=null()),
            queued,
            skipped,
            *(literal(0, Integer()) for _ in range(4)),
        )
        .group_by((frozen.c.id - offset) // batch_size)
        .order_by(func.min(frozen.c.id))
    )
    counts = ["n_queued", "n_skipped", "n_claimed", "n_sent", "n_failed", "n_cancelled"]
    batches = session.execute(
        insert(BATCHES)
        .from_select(["issue_id", "first_id", "last_id", "enqueued_at", *counts], cut)
        .returning(BATCHES.c.id, BATCHES.c.n_queued)
    ).all()
    if session.get_bind().dialect.name == "postgresql":
        # The planner has no statistics for the rows just written (autovacuum analyses a
        # table later, or never): without them a claim reads the whole issue through
        # (issue_id, status) instead of its batch's id range, and the reconciler's search
        # for batches with work took minutes at a million. ANALYZE samples ~30,000 rows
        # (~0.3 s at 1M) and counts this transaction's own rows.
        session.execute(text("ANALYZE deliveries"))
    # Batches with nothing queued (every reader in them skipped) are never enqueued: they
    # only keep their rows' counts.
    ids = sorted(batch_id for batch_id, n in batches if n)
    if not ids:
        issue.status = IssueStatus.SENT
        issue.finished_at = now
        issue.status_reason = "nobody to send to (no confirmed reader wants this issue)"
        session.flush()
    return ids


def mark_enqueued(
    session: Session, batch_ids: Sequence[int], *, at: datetime | None = None
) -> None:
    """Note when the batches were handed to the broker (`at`: when a delayed task is due), so
    that the reconciler does not enqueue them again while their task is still out there."""
    if batch_ids:
        session.execute(
            update(Batch).where(Batch.id.in_(batch_ids)).values(enqueued_at=at or utcnow())
        )
