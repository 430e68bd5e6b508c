"""The merge of case variants into one reader (newsletter.identity, pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from newsletter.addresses import address_key
from newsletter.identity import Reader, Sub, describe, most_restrictive, plan_merge

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(days: int) -> datetime:
    return T0 + timedelta(days=days)


def reader(id: int, name: str | None = None, attributes: Any = None, created: int = 0) -> Reader:
    return Reader(id, name, attributes, at(created))


def sub(id: int, reader_id: int, list_id: int, status: str = "active", created: int = 0,
        **more: Any) -> Sub:  # fmt: skip
    values: dict[str, Any] = {"paused": False, "soft_bounces": 0, "updated_at": at(created),
                              "confirmed_at": None, "unsubscribed_at": None}  # fmt: skip
    values.update(more)
    return Sub(id, reader_id, list_id, status, created_at=at(created), **values)


def test_address_key_folds_every_capitalisation_and_nothing_else() -> None:
    assert address_key("Dup@Example.org") == address_key("DUP@example.org") == "dup@example.org"
    assert address_key(" dup@example.org ") == "dup@example.org"
    assert address_key("dup+x@example.org") != address_key("dup@example.org")


@pytest.mark.parametrize(
    ("statuses", "winner"),
    [
        (["active"], "active"),
        (["active", "pending"], "pending"),
        (["pending", "unsubscribed"], "unsubscribed"),
        (["unsubscribed", "bounced"], "bounced"),
        (["bounced", "complained", "active"], "complained"),
        (["active", "active"], "active"),
    ],
)
def test_the_most_restrictive_status_wins(statuses: list[str], winner: str) -> None:
    assert most_restrictive(statuses) == winner
    assert most_restrictive(list(reversed(statuses))) == winner


def test_most_restrictive_refuses_nothing_and_unknown_statuses() -> None:
    with pytest.raises(ValueError, match="no status"):
        most_restrictive([])
    with pytest.raises(ValueError, match="'gone'"):
        most_restrictive(["active", "gone"])


def test_the_earliest_reader_survives_with_the_first_name_and_merged_attributes() -> None:
    plan = plan_merge(
        [
            reader(7, None, {"city": "Rome", "lang": "it"}, created=2),
            reader(3, None, {"city": "Oslo"}, created=5),
            reader(9, "Nine", None, created=1),
            reader(8, "Eight", {"age": "40"}, created=3),
        ],
        [],
    )
    assert plan.survivor == 3 and plan.absorbed == (7, 8, 9)
    assert plan.name == "Eight"  # the survivor had none: the earliest reader's that has one
    assert plan.attributes == {"city": "Oslo", "lang": "it", "age": "40"}
    assert plan.created_at == at(1)
    assert plan.kept == () and plan.dropped == ()


def test_the_survivors_own_name_stays() -> None:
    plan = plan_merge([reader(1, "One"), reader(2, "Two")], [])
    assert plan.name == "One" and plan.attributes is None


def test_per_list_the_earliest_subscription_stays_with_the_strictest_state() -> None:
    plan = plan_merge(
        [reader(1), reader(2), reader(3)],
        [
            sub(10, 1, 1, "active", created=5, confirmed_at=at(5), updated_at=at(9)),
            sub(11, 2, 1, "unsubscribed", created=2, confirmed_at=at(2), unsubscribed_at=at(9)),
            sub(12, 3, 1, "bounced", created=8, paused=True, soft_bounces=3,
                unsubscribed_at=at(8)),
            sub(20, 2, 2, "pending", created=3),
            sub(30, 1, 3, "active", created=4, confirmed_at=at(4)),
            sub(31, 3, 3, "pending", created=1),
        ],
    )  # fmt: skip
    kept = {k.id: k for k in plan.kept}
    assert sorted(kept) == [11, 20, 31]
    one = kept[11]
    assert one.moved_from == 2 and one.status == "bounced"
    assert one.created_at == at(2) and one.confirmed_at == at(2)
    assert one.unsubscribed_at == at(8)  # when the winning status came, not the last leaving
    assert one.paused and one.soft_bounces == 3 and one.updated_at == at(9)
    assert kept[20].moved_from == 2 and kept[20].status == "pending"
    three = kept[31]
    assert three.moved_from == 3 and three.status == "pending"
    assert three.confirmed_at == at(4) and three.unsubscribed_at is None
    assert sorted(plan.dropped) == [(10, 11), (12, 11), (30, 31)]


def test_a_survivors_subscription_does_not_move() -> None:
    plan = plan_merge([reader(1), reader(2)], [sub(10, 1, 1, created=1), sub(11, 2, 1, created=1)])
    assert [(k.id, k.moved_from) for k in plan.kept] == [(10, None)]  # same time: lower id
    assert plan.dropped == ((11, 10),)


def test_a_merge_needs_a_group_and_its_own_subscriptions() -> None:
    with pytest.raises(ValueError, match="at least two"):
        plan_merge([reader(1)], [])
    with pytest.raises(ValueError, match="subscription 5"):
        plan_merge([reader(1), reader(2)], [sub(5, 9, 1)])


def test_the_description_has_ids_and_counts_only() -> None:
    plan = plan_merge(
        [reader(1), reader(2), reader(3)],
        [sub(10, 1, 1, created=1), sub(11, 2, 1, created=0), sub(12, 3, 2)],
    )
    assert describe(plan) == (
        "merged subscriber(s) 2, 3 into 1: 2 subscription(s) kept (2 moved), 1 merged away"
    )
