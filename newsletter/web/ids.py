"""Ids in paths and queries (pure): one validated type for every route.

An id is ASCII digits only (no sign, no spaces, no underscores, no other scripts' digits such
as "²") and fits the column it is looked up in; anything else never reaches the database.
In a path it names something that does not exist (404); in a query it is a bad value (422).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL (lists, issues, articles)
INT64_MAX = 2**63 - 1  # a BigInteger column (subscribers, subscriptions, deliveries)
ERROR_TYPE = "invalid_id"

_DIGITS = re.compile(r"[0-9]{1,20}")


def parse_id(value: object, *, minimum: int, maximum: int) -> int:
    """`value` (a path or query string, or an int) as an id in [minimum, maximum], or
    ValueError."""
    if isinstance(value, bool):
        raise ValueError("not an id")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        raise ValueError("not an id")
    if not minimum <= number <= maximum:
        raise ValueError("out of range")
    return number


def _validator(thing: str, minimum: int, maximum: int) -> BeforeValidator:
    def check(value: Any) -> int:
        try:
            return parse_id(value, minimum=minimum, maximum=maximum)
        except ValueError:
            raise PydanticCustomError(
                ERROR_TYPE,
                "must be a whole number from {minimum} to {maximum}",
                {"thing": thing, "minimum": minimum, "maximum": maximum},
            ) from None

    return BeforeValidator(check)


def shown(value: object, limit: int = 40) -> str:
    """A rejected id as an error message may quote it."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


IssueId = Annotated[int, _validator("issue", 1, INT32_MAX)]
# A paging cursor: 0 is "from the start".
SubscriptionCursor = Annotated[int, _validator("subscription", 0, INT64_MAX)]
