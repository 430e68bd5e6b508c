"""What the reports about an issue add up to, and the brake on complaints.

Applying reports is :mod:`newsletter.feedback`'s job; this module reads what it recorded in
``bounce_events``: the per-issue figures ``issues status`` shows (verified reports only, and
how many unverified ones claim the issue), and the complaint rate that pauses a send. Both
the feedback path and the delivery ledger use it; it uses neither.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, Table, func, select, update
from sqlalchemy.orm import Session

from newsletter.bounces import EventType
from newsletter.models import BounceEvent, Delivery, DeliveryStatus, Issue, IssueStatus


class EventOutcome(enum.StrEnum):
    """What applying one event did."""

    SUPPRESSED = "suppressed"  # a subscription became bounced or complained
    COUNTED = "counted"  # a soft bounce was counted, below the limit
    UNSUBSCRIBED = "unsubscribed"  # the mailto unsubscribe took effect
    RESET = "reset"  # a positive DSN reset the soft-bounce count
    UNCHANGED = "unchanged"  # understood and matched, but already in that state
    DUPLICATE = "duplicate"  # the same event was applied before
    UNMATCHED = "unmatched"  # about nobody we know (or a token that does not verify)
    IGNORED = "ignored"  # not actionable: auto-reply, delay warning, unknown mail
    UNVERIFIED = "unverified"  # proves no message of ours: stored, changes nothing


@dataclass(frozen=True)
class FeedbackPolicy:
    soft_bounce_limit: int = 5
    complaint_pause_rate: float = 0.003
    complaint_pause_min: int = 1
    # The suppression store's key (newsletter.suppression): a hard bounce or a complaint
    # puts the address there, so no list imports or mails it again until the reader signs
    # up again themselves. None: no suppression.
    suppression_key: str | None = field(default=None, repr=False)


def issue_feedback(session: Session, issue_id: int, *, sent: int | None = None) -> dict[str, Any]:
    """Bounce and complaint counts of one issue and their rates over the messages sent:
    ``{"sent", "hard_bounces", "soft_bounces", "complaints", "unsubscribes",
    "unverified_reports", "hard_bounce_rate", "complaint_rate"}``; the counts and rates are
    of verified reports only, ``unverified_reports`` counts the others that claim it. Pass
    `sent` when it is known (issue_status has it from the batch counts): counting it is a
    scan of the issue's sent deliveries."""
    events = cast(Table, BounceEvent.__table__).c  # Core: see ledger.status.issue_status
    rows = session.execute(
        select(events.kind, events.outcome, func.count())
        .where(
            events.issue_id == issue_id,
            events.outcome.not_in((EventOutcome.DUPLICATE.value, EventOutcome.IGNORED.value)),
        )
        .group_by(events.kind, events.outcome)
    ).all()
    by_kind: dict[str, int] = {}
    unverified = 0
    for kind, outcome, n in rows:
        if outcome == EventOutcome.UNVERIFIED.value:
            unverified += n
        else:
            by_kind[kind] = by_kind.get(kind, 0) + n
    if sent is None:
        sent = _sent(session, issue_id)
    figures: dict[str, Any] = {
        "sent": sent,
        "hard_bounces": by_kind.get(EventType.HARD_BOUNCE.value, 0),
        "soft_bounces": by_kind.get(EventType.SOFT_BOUNCE.value, 0),
        "complaints": by_kind.get(EventType.COMPLAINT.value, 0),
        "unsubscribes": by_kind.get(EventType.UNSUBSCRIBE.value, 0),
        "unverified_reports": unverified,
    }
    figures["hard_bounce_rate"] = figures["hard_bounces"] / sent if sent else 0.0
    figures["complaint_rate"] = figures["complaints"] / sent if sent else 0.0
    return figures


def complaint_rate_exceeded(
    session: Session, issue_id: int, policy: FeedbackPolicy | None = None
) -> str | None:
    """Why a sending issue should pause for its complaints, or None when it should not."""
    policy = policy or FeedbackPolicy()
    status = session.scalar(select(Issue.status).where(Issue.id == issue_id))
    if status != IssueStatus.SENDING:
        return None
    complaints = session.scalar(
        select(func.count()).where(
            BounceEvent.issue_id == issue_id,
            BounceEvent.kind == EventType.COMPLAINT.value,
            BounceEvent.outcome.not_in(
                (EventOutcome.DUPLICATE.value, EventOutcome.UNVERIFIED.value)
            ),
        )
    )
    sent = _sent(session, issue_id)
    if not complaints or complaints < policy.complaint_pause_min:
        return None
    rate = complaints / max(sent, 1)
    if rate <= policy.complaint_pause_rate:
        return None
    return (
        f"paused: complaint rate {rate:.2%} passed {policy.complaint_pause_rate:.1%} "
        f"({complaints} complaint(s) for {sent} sent)"
    )


def pause_for_complaints(session: Session, issue_id: int, policy: FeedbackPolicy) -> bool:
    """Pause the issue if it is sending and its complaint rate passed the policy's; whether
    it paused. The same transition as ledger.control.pause_issue: new claims stop at once, batches
    in flight within about a second."""
    reason = complaint_rate_exceeded(session, issue_id, policy)
    if reason is None:
        return False
    paused = session.execute(
        update(Issue)
        .where(Issue.id == issue_id, Issue.status == IssueStatus.SENDING)
        .values(status=IssueStatus.PAUSED, status_reason=reason[:500])
        .execution_options(synchronize_session=False)
    )
    return bool(cast(CursorResult[Any], paused).rowcount)


def _sent(session: Session, issue_id: int) -> int:
    return (
        session.scalar(
            select(func.count()).where(
                Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.SENT
            )
        )
        or 0
    )
