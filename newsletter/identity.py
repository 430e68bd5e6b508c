"""One reader per mailbox: how case variants of one address merge into one reader (pure).

Before addresses were compared by their identity (newsletter.addresses.address_key), `Dup@`,
`dup@` and `DUP@` could be three subscribers, each on its lists. Migration 0011 finds such
groups and merges each into one reader with `plan_merge`; the migration does the writes.

The rules, per group:
- the survivor is the earliest reader (lowest id): its typed address stays, for display and
  the envelope; its name, or else the earliest name given; attributes merged, the
  survivor's values first; created_at the earliest;
- per list, one subscription stays: the earliest (so its token, in links already mailed,
  goes on working). It takes the most restrictive status of the group's subscriptions on
  that list (complained over bounced over unsubscribed over pending over active: a reader
  who left through any variant has left), the earliest consent (created_at, confirmed_at),
  paused if any was, the most soft bounces;
- the other subscriptions on that list go, and what named them (bounce events) names the
  one that stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Higher is more restrictive: the merged subscription takes the highest of its group.
STRICTNESS = {"active": 0, "pending": 1, "unsubscribed": 2, "bounced": 3, "complained": 4}
LEFT = frozenset({"unsubscribed", "bounced", "complained"})


@dataclass(frozen=True)
class Reader:
    id: int
    name: str | None
    attributes: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class Sub:
    id: int
    subscriber_id: int
    list_id: int
    status: str
    paused: bool
    soft_bounces: int
    created_at: datetime
    updated_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None


@dataclass(frozen=True)
class KeptSub:
    """The one subscription of a list that stays, with its merged values."""

    id: int
    moved_from: int | None  # the absorbed reader it belonged to, or None (the survivor's)
    status: str
    paused: bool
    soft_bounces: int
    created_at: datetime
    updated_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None


@dataclass(frozen=True)
class MergePlan:
    survivor: int
    absorbed: tuple[int, ...]
    name: str | None
    attributes: dict[str, Any] | None
    created_at: datetime
    kept: tuple[KeptSub, ...]
    dropped: tuple[tuple[int, int], ...]  # (subscription that goes, the one that stays)


def most_restrictive(statuses: Sequence[str]) -> str:
    """The status a merged subscription takes; ValueError for none or an unknown one."""
    if not statuses:
        raise ValueError("no status to merge")
    unknown = [s for s in statuses if s not in STRICTNESS]
    if unknown:
        raise ValueError(f"unknown subscription status {unknown[0]!r}")
    return max(statuses, key=STRICTNESS.__getitem__)


def plan_merge(readers: Sequence[Reader], subs: Sequence[Sub]) -> MergePlan:
    """How one group of readers (two or more with one identity) becomes one reader."""
    if len(readers) < 2:
        raise ValueError("a merge needs at least two readers")
    ordered = sorted(readers, key=lambda r: r.id)
    survivor, absorbed = ordered[0], ordered[1:]
    ids = {r.id for r in ordered}
    strangers = [s.id for s in subs if s.subscriber_id not in ids]
    if strangers:
        raise ValueError(f"subscription {strangers[0]} belongs to no reader of the group")

    name = next((r.name for r in ordered if r.name), None)
    attributes: dict[str, Any] = {}
    for reader in reversed(ordered):  # the survivor's values last, so they win
        attributes.update(reader.attributes or {})

    by_list: dict[int, list[Sub]] = {}
    for sub in subs:
        by_list.setdefault(sub.list_id, []).append(sub)
    kept: list[KeptSub] = []
    dropped: list[tuple[int, int]] = []
    for list_id in sorted(by_list):
        group = sorted(by_list[list_id], key=lambda s: (s.created_at, s.id))
        first = group[0]
        status = most_restrictive([s.status for s in group])
        confirmed = [s.confirmed_at for s in group if s.confirmed_at is not None]
        # The moment the reader left: that of the subscription whose status won.
        left_at = None
        if status in LEFT:
            left_at = max(
                (s.unsubscribed_at for s in group if s.status == status and s.unsubscribed_at),
                default=None,
            )
        kept.append(
            KeptSub(
                id=first.id,
                moved_from=first.subscriber_id if first.subscriber_id != survivor.id else None,
                status=status,
                paused=any(s.paused for s in group),
                soft_bounces=max(s.soft_bounces for s in group),
                created_at=first.created_at,
                updated_at=max(s.updated_at for s in group),
                confirmed_at=min(confirmed) if confirmed else None,
                unsubscribed_at=left_at,
            )
        )
        dropped.extend((s.id, first.id) for s in group[1:])
    return MergePlan(
        survivor=survivor.id,
        absorbed=tuple(r.id for r in absorbed),
        name=name,
        attributes=attributes or None,
        created_at=min(r.created_at for r in ordered),
        kept=tuple(kept),
        dropped=tuple(dropped),
    )


def describe(plan: MergePlan) -> str:
    """What a merge did, in ids and counts only (no address: this goes to logs)."""
    absorbed = ", ".join(str(i) for i in plan.absorbed)
    moved = sum(1 for k in plan.kept if k.moved_from is not None)
    return (
        f"merged subscriber(s) {absorbed} into {plan.survivor}: "
        f"{len(plan.kept)} subscription(s) kept ({moved} moved), {len(plan.dropped)} merged away"
    )
