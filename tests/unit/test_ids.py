"""The one id type of the web routes: ASCII digits that fit the column, nothing else."""

from __future__ import annotations

import pytest

from newsletter.web.ids import INT32_MAX, INT64_MAX, parse_id, shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1), ("007", 7), (str(INT32_MAX), INT32_MAX), (5, 5), (INT32_MAX, INT32_MAX)],
)
def test_ids_that_fit(value: object, expected: int) -> None:
    assert parse_id(value, minimum=1, maximum=INT32_MAX) == expected


@pytest.mark.parametrize(
    "value",
    [
        "0",
        0,
        str(INT32_MAX + 1),
        INT32_MAX + 1,
        "-1",
        "+1",
        " 1",
        "1 ",
        "1_0",
        "1e3",
        "1.0",
        "²",
        "١",  # Arabic-Indic one
        "",
        "x",
        "9" * 21,
        None,
        1.0,
        True,
    ],
)
def test_ids_that_do_not(value: object) -> None:
    with pytest.raises(ValueError):
        parse_id(value, minimum=1, maximum=INT32_MAX)


def test_the_bounds_are_inclusive() -> None:
    assert parse_id("0", minimum=0, maximum=INT64_MAX) == 0
    assert parse_id(str(INT64_MAX), minimum=0, maximum=INT64_MAX) == INT64_MAX
    with pytest.raises(ValueError):
        parse_id(str(INT64_MAX + 1), minimum=0, maximum=INT64_MAX)
    with pytest.raises(ValueError):
        parse_id("4", minimum=5, maximum=9)
    with pytest.raises(ValueError):
        parse_id("10", minimum=5, maximum=9)


def test_a_long_rejected_value_is_shortened() -> None:
    assert shown("12") == "12"
    assert shown("9" * 40) == "9" * 40
    assert shown("9" * 41) == "9" * 37 + "..."
