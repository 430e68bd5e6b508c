"""Message-IDs whose MAC proves the delivery a report is about (newsletter.provenance)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from newsletter.keys import derive_all
from newsletter.message import make_message_id
from newsletter.provenance import MAC_CHARS, PURPOSE, MessageIds, claimed_delivery

KEYS = derive_all(["new-secret", "old-secret"], PURPOSE)
IDS = MessageIds(KEYS)
NONCE = "a1b2c3d4e5f6"


def test_the_tag_is_the_hmac_of_delivery_and_nonce_under_the_newest_key() -> None:
    expected = hmac.new(KEYS[0].encode(), b"message-id:42:" + NONCE.encode(), hashlib.sha256)
    assert IDS.tag(42, NONCE) == expected.hexdigest()[:MAC_CHARS]
    assert len(IDS.tag(42, NONCE)) == MAC_CHARS == 20


def test_the_tag_is_stable_and_differs_per_delivery_nonce_and_key() -> None:
    tag = IDS.tag(42, NONCE)
    assert IDS.tag(42, NONCE) == tag  # a retried send keeps its Message-ID
    assert IDS.tag(43, NONCE) != tag
    assert IDS.tag(42, "a1b2c3d4e5f7") != tag
    assert MessageIds(KEYS[1:]).tag(42, NONCE) != tag
    assert MessageIds(derive_all(["new-secret"], "verp")).tag(42, NONCE) != tag


def test_any_key_verifies_so_the_secret_can_rotate() -> None:
    before_rotation = MessageIds(KEYS[1:]).tag(7, NONCE)
    assert IDS.verify(7, NONCE, before_rotation)
    assert IDS.verify(7, NONCE, IDS.tag(7, NONCE).upper())  # MTAs that fold case
    assert not MessageIds(KEYS[:1]).verify(7, NONCE, before_rotation)


@pytest.mark.parametrize(
    ("delivery_id", "nonce", "mac"),
    [
        (8, NONCE, None),  # another delivery's MAC
        (7, "000000000000", None),  # another issue's
        (7, NONCE, "0" * MAC_CHARS),
        (7, NONCE, ""),
        (7, NONCE, "short"),
    ],
)
def test_a_wrong_mac_does_not_verify(delivery_id: int, nonce: str, mac: str | None) -> None:
    genuine = IDS.tag(7, NONCE)
    assert not IDS.verify(delivery_id, nonce, genuine if mac is None else mac)


def test_negative_ids_and_missing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        IDS.tag(-1, NONCE)
    with pytest.raises(ValueError, match="key"):
        MessageIds([])
    with pytest.raises(ValueError, match="key"):
        MessageIds([""])


def test_a_message_id_claims_its_delivery_and_mac() -> None:
    tag = IDS.tag(197, NONCE)
    message_id = make_message_id(197, tag, "example.org")
    assert message_id == f"<d197.{tag}@example.org>"
    assert claimed_delivery(message_id) == (197, tag)
    assert claimed_delivery(f"  {message_id}\r\n") == (197, tag)


@pytest.mark.parametrize(
    "message_id",
    [
        f"<d197.{NONCE}@example.org>",  # the old form: the issue nonce, no MAC
        "<d197.0123456789abcdef012@example.org>",  # 19 digits
        "<d197.0123456789abcdef01234@example.org>",  # 21
        "<dx.0123456789abcdef0123@example.org>",
        "<d197.0123456789abcdef0123>",
        "d197.0123456789abcdef0123@example.org",
        "<e197.0123456789abcdef0123@example.org>",
        "",
    ],
)
def test_other_message_ids_claim_nothing(message_id: str) -> None:
    assert claimed_delivery(message_id) is None
