"""Derived keys: one per purpose and per secret, stable, never the secret itself."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from newsletter.addresses import address_key
from newsletter.keys import derive, derive_all


def test_derive_is_hmac_sha256_of_the_labelled_purpose() -> None:
    expected = hmac.new(
        b"s3cret", b"newsletter key derivation v1: links", hashlib.sha256
    ).hexdigest()
    assert derive("s3cret", "links") == expected
    assert len(derive("s3cret", "links")) == 64


def test_purposes_and_secrets_give_different_keys() -> None:
    keys = {derive(s, p) for s in ("a" * 32, "b" * 32) for p in ("links", "verp", "suppression")}
    assert len(keys) == 6
    assert derive("a" * 32, "links") != "a" * 32


def test_derive_all_keeps_the_order_of_the_secrets() -> None:
    assert derive_all(["new", "old"], "verp") == [derive("new", "verp"), derive("old", "verp")]
    assert derive_all([], "verp") == []


@pytest.mark.parametrize(("secret", "purpose"), [("", "links"), ("secret", "")])
def test_empty_secret_or_purpose_is_refused(secret: str, purpose: str) -> None:
    with pytest.raises(ValueError, match=r"empty secret|needs a purpose"):
        derive(secret, purpose)


@pytest.mark.parametrize(
    ("stored", "key"),
    [
        ("Dup@example.org", "dup@example.org"),
        ("DUP@example.org", "dup@example.org"),
        ("dup@example.org", "dup@example.org"),
        (" K7@example.org ", "k7@example.org"),
    ],
)
def test_address_key_folds_case_of_the_whole_address(stored: str, key: str) -> None:
    assert address_key(stored) == key


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("550 <Vic.Tim@example.org>: rejected", "550 <[address]>: rejected"),
        ("550 user vic.tim unknown", "550 user [address] unknown"),
        ("550 VIC.TIM@EXAMPLE.ORG and vic.tim", "550 [address] and [address]"),
        ("550 nobody here", "550 nobody here"),
    ],
)
def test_mask_address_hides_the_address_and_its_local_part(text: str, masked: str) -> None:
    from newsletter.addresses import mask_address

    assert mask_address(text, "vic.tim@example.org") == masked
    assert mask_address("a+b@x.org", "a+b@x.org", "*") == "*"  # no regex meaning in the address
