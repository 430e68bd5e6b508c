"""Redaction of an erased address in kept texts (newsletter.erasure.redact)."""

from __future__ import annotations

import pytest

from newsletter.erasure import MARKER, redact

ADDRESS = "Vic.Tim@example.org"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.1.1 <vic.tim@example.org>: unknown", f"550 5.1.1 <{MARKER}>: unknown"),
        ("VIC.TIM@EXAMPLE.ORG and Vic.Tim@example.org", f"{MARKER} and {MARKER}"),
        ("550 user vic.tim unknown", f"550 user {MARKER} unknown"),
        ("550 mailbox full", "550 mailbox full"),
        ("", ""),
    ],
)
def test_the_address_and_its_local_part_go_in_any_case(text: str, expected: str) -> None:
    assert redact(text, ADDRESS) == expected


def test_the_address_is_matched_literally_not_as_a_pattern() -> None:
    assert redact("550 <aab@example.org>", "a+b@example.org") == "550 <aab@example.org>"
    assert redact("550 <vicxtim@example.org>", ADDRESS) == "550 <vicxtim@example.org>"
    assert redact("550 <a+b@example.org>", "a+b@example.org") == f"550 <{MARKER}>"


def test_an_address_without_a_local_part_redacts_only_itself() -> None:
    assert redact("x @example.org y", "@example.org") == f"x {MARKER} y"
