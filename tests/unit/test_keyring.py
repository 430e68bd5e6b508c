"""Sealed keys (newsletter.keyring): open under any configured key, sealed again under the
newest, refused with the way out when no configured key opens them."""

from __future__ import annotations

import re

import pytest

from newsletter.config import ConfigError
from newsletter.keyring import SealedKeyError, new_key, seal, unseal

OLD, NEW, OTHER = "old-key", "new-key", "other-key"


def test_a_key_sealed_under_the_newest_key_opens_and_needs_no_new_seal() -> None:
    sealed = seal("the value", [NEW, OLD], "suppression")
    assert unseal(sealed, [NEW, OLD], "suppression") == ("the value", False)
    assert unseal(sealed, [NEW], "suppression") == ("the value", False)


def test_a_key_sealed_under_an_older_key_opens_and_asks_to_be_sealed_again() -> None:
    sealed = seal("the value", [OLD], "suppression")
    assert unseal(sealed, [NEW, OLD], "suppression") == ("the value", True)
    assert unseal(sealed, [NEW, OTHER, OLD], "suppression") == ("the value", True)
    again = seal("the value", [NEW, OLD], "suppression")
    assert unseal(again, [NEW], "suppression") == ("the value", False)


@pytest.mark.parametrize("keys", [[NEW], [NEW, OTHER], [OTHER]])
def test_no_configured_key_opens_it_is_refused_with_the_way_out(keys: list[str]) -> None:
    sealed = seal("the value", [OLD], "suppression")
    with pytest.raises(SealedKeyError, match=r"SECRET_KEY=new,old") as caught:
        unseal(sealed, keys, "suppression")
    assert isinstance(caught.value, ConfigError)
    assert "\n" not in str(caught.value)


def test_a_key_sealed_for_one_purpose_does_not_open_for_another() -> None:
    sealed = seal("the value", [NEW], "suppression")
    with pytest.raises(SealedKeyError):
        unseal(sealed, [NEW], "links")


def test_a_tampered_seal_does_not_open() -> None:
    sealed = seal("the value", [NEW], "suppression")
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(SealedKeyError):
        unseal(tampered, [NEW], "suppression")


def test_no_keys_at_all_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError):
        seal("the value", [], "suppression")
    with pytest.raises(ConfigError):
        unseal("anything", [], "suppression")


def test_new_keys_are_256_random_bits() -> None:
    a, b = new_key(), new_key()
    assert re.fullmatch(r"[0-9a-f]{64}", a) and a != b
