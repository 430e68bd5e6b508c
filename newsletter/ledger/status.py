"""An issue's delivery figures for `issues status` and the API: counts and reporting."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, case, func, null, or_, select
from sqlalchemy.orm import Session

from newsletter.errors import NotFound
from newsletter.feedback_figures import issue_feedback
from newsletter.ledger.batches import BATCHES, COUNTS, DELIVERIES, LIVE
from newsletter.models import DELIVERY_ERRORS, DeliveryStatus, Issue


def delivery_counts(session: Session, issue_id: int) -> dict[str, int]:
    """The issue's deliveries by status, without counting them: the sum of its batches'
    counts (a few thousand rows at a million deliveries), except that a batch being sent
    right now (n_claimed > 0, a handful) is counted live over its id range, so the figures
    move while it is in flight."""
    live_key = case((LIVE, BATCHES.c.id), else_=null())
    groups = session.execute(
        select(
            live_key,
            func.min(BATCHES.c.first_id),
            func.max(BATCHES.c.last_id),
            *(func.coalesce(func.sum(column), 0) for column in COUNTS.values()),
        )
        .where(BATCHES.c.issue_id == issue_id)
        .group_by(live_key)
    ).all()
    counts = dict.fromkeys((s.value for s in DeliveryStatus), 0)
    live: list[tuple[int, int]] = []
    for live_id, first_id, last_id, *sums in groups:
        if live_id is not None:
            live.append((first_id, last_id))
            continue
        for status, n in zip(COUNTS, sums, strict=True):
            counts[status.value] += int(n)
    if live:
        for status, n in session.execute(
            select(DELIVERIES.c.status, func.count())
            .where(
                DELIVERIES.c.issue_id == issue_id,
                or_(*(DELIVERIES.c.id.between(a, b) for a, b in live)),
            )
            .group_by(DELIVERIES.c.status)
        ):
            counts[DeliveryStatus(status).value] += n
    return counts


def issue_status(session: Session, issue_id: int) -> dict[str, Any]:
    # Core tables only, no ORM entity: `issues status` runs in a new process each time, where
    # setting up the ORM's mappers would cost more than the queries.
    issues = cast(Table, Issue.__table__).c
    issue = session.execute(
        select(
            issues.id,
            issues.subject,
            issues.status,
            issues.status_reason,
            issues.consecutive_failures,
            issues.send_started_at,
            issues.finished_at,
        ).where(issues.id == issue_id)
    ).first()
    if issue is None:
        raise NotFound(f"unknown issue {issue_id}")
    counts = delivery_counts(session, issue_id)
    # The newest five, read backwards from a partial index that holds only such rows.
    errors = session.execute(
        select(DELIVERIES.c.id, DELIVERIES.c.last_error)
        .where(DELIVERIES.c.issue_id == issue_id, DELIVERY_ERRORS)
        .order_by(DELIVERIES.c.id.desc())
        .limit(5)
    ).all()
    return {
        "id": issue.id,
        "subject": issue.subject,
        "status": issue.status.value,
        "reason": issue.status_reason,
        "total": sum(counts.values()),
        "counts": counts,
        "consecutive_failures": issue.consecutive_failures,
        "send_started_at": issue.send_started_at.isoformat() if issue.send_started_at else None,
        "finished_at": issue.finished_at.isoformat() if issue.finished_at else None,
        "last_errors": [{"delivery": i, "error": e} for i, e in errors],
        "feedback": issue_feedback(session, issue_id, sent=counts["sent"]),
    }
