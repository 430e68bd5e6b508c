"""Address normalisation: the fast path must agree with email_validator on every verdict."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email

from newsletter.addresses import InvalidAddress, check_text, normalize_email

CASES = [
    "Foo.Bar@EXAMPLE.com",
    "a+tag@x.io",
    "o'neil@example.ie",
    "_a@x.com",
    "a@x.co",
    "a@bücher.de",
    "a@x.c0m",
    "x@localhost.localdomain",
    "a@b.test",
    "x@foo.local",
    "a..b@x.com",
    "a@-x.com",
    "a@x-.com",
    "a@x.123",
    "a@x.com.",
    ".a@x.com",
    "a.@x.com",
    "a@x..com",
    "a@" + "b" * 64 + ".com",
    "l" * 65 + "@x.com",
    "no-at-sign",
    "a@b",
    "ü@x.com",
    '"quoted"@x.com',
    "a@[127.0.0.1]",
]


def reference(address: str) -> str | None:
    try:
        r = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    local = r.ascii_email.rpartition("@")[0] if r.ascii_email else ""
    return f"{local}@{r.ascii_domain.lower()}"


@pytest.mark.parametrize("address", CASES)
def test_normalize_agrees_with_email_validator(address: str) -> None:
    expected = reference(address)
    if expected is None:
        with pytest.raises(InvalidAddress):
            normalize_email(address)
    else:
        assert normalize_email(address) == expected


def test_domain_is_lowercased_and_idna_encoded_local_part_kept() -> None:
    assert normalize_email("  Ada@Example.COM ") == "Ada@example.com"
    assert normalize_email("ada@Bücher.de") == "ada@xn--bcher-kva.de"


@pytest.mark.parametrize("value", ["a\r\nBcc: x@y.org", "a\nb", "nul\x00", "=?utf-8?q?x?="])
def test_header_smuggling_is_refused(value: str) -> None:
    with pytest.raises(InvalidAddress):
        check_text(value, "name")
