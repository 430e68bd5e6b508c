"""Signed link tokens verify only in the exact form the signer wrote (pure)."""

from __future__ import annotations

import time
from unittest import mock

import pytest

from newsletter.tokens import LinkSigner, Purpose, TokenError, exact_form

KEYS = ["k" * 40, "old-" + "o" * 36]
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture
def signer() -> LinkSigner:
    return LinkSigner(KEYS)


@pytest.mark.parametrize("purpose", list(Purpose))
def test_the_exact_token_verifies(signer: LinkSigner, purpose: Purpose) -> None:
    signed = signer.sign(purpose, "tok_EN-123")
    assert exact_form(signed, timestamped=purpose is Purpose.CONFIRM)
    assert signer.unsign(purpose, signed) == "tok_EN-123"


def test_an_old_keys_token_still_verifies(signer: LinkSigner) -> None:
    old = LinkSigner(KEYS[1:]).sign(Purpose.UNSUBSCRIBE, "tok")
    assert signer.unsign(Purpose.UNSUBSCRIBE, old) == "tok"


@pytest.mark.parametrize(
    "junk", ["=", "==", "!", "!!!!", "~", "%3D", " ", "\n", ".", "A", "AAAA", "\u00e9"]
)
@pytest.mark.parametrize("purpose", list(Purpose))
def test_junk_appended_is_refused(signer: LinkSigner, purpose: Purpose, junk: str) -> None:
    signed = signer.sign(purpose, "tok")
    assert not exact_form(signed + junk, timestamped=purpose is Purpose.CONFIRM)
    with pytest.raises(TokenError, match="not valid"):
        signer.unsign(purpose, signed + junk)


@pytest.mark.parametrize("purpose", list(Purpose))
def test_a_changed_last_character_is_refused_even_when_it_decodes_alike(
    signer: LinkSigner, purpose: Purpose
) -> None:
    """The 43rd character of a SHA-256 signature holds 4 bits of it and 2 unused bits: its
    three siblings decode to the same bytes and must not verify."""
    signed = signer.sign(purpose, "tok")
    last = B64.index(signed[-1])
    siblings = [B64[(last & ~3) | low] for low in range(4) if (last & ~3) | low != last]
    assert len(siblings) == 3
    for other in siblings:
        with pytest.raises(TokenError):
            signer.unsign(purpose, signed[:-1] + other)


@pytest.mark.parametrize(
    ("value", "timestamped", "ok"),
    [
        ("tok." + "A" * 43, False, True),
        ("tok." + "A" * 42, False, False),  # short signature
        ("tok." + "A" * 44, False, False),  # long signature
        ("tok" + "A" * 43, False, False),  # no separator
        ("." + "A" * 43, False, False),  # no token
        ("tok.A." + "A" * 43, False, False),  # a timestamp where none belongs
        ("tok.AAAA." + "A" * 43, True, True),
        ("tok." + "A" * 43, True, False),  # no timestamp
        ("tok.AAA=." + "A" * 43, True, False),  # padded timestamp
        ("tok.AAB." + "A" * 43, True, False),  # non-canonical timestamp (unused bits set)
        ("tok.AAA." + "A" * 43, True, True),
        ("tok." + "A" * 42 + "B", False, False),  # non-canonical signature
        ("tok." + "A" * 42 + "E", False, True),
        ("to k." + "A" * 43, False, False),
    ],
)
def test_exact_form_table(value: str, timestamped: bool, ok: bool) -> None:
    assert exact_form(value, timestamped=timestamped) is ok


def test_an_expired_confirm_link_says_so(signer: LinkSigner) -> None:
    signed = signer.sign(Purpose.CONFIRM, "tok")
    with (
        mock.patch("time.time", return_value=time.time() + 8 * 24 * 3600),
        pytest.raises(TokenError, match="expired"),
    ):
        signer.unsign(Purpose.CONFIRM, signed)


def test_a_link_for_another_purpose_is_refused(signer: LinkSigner) -> None:
    with pytest.raises(TokenError):
        signer.unsign(Purpose.PREFERENCES, signer.sign(Purpose.UNSUBSCRIBE, "tok"))
