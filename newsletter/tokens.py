"""Signed link tokens (pure). A link carries the subscription's opaque random token, signed
with a salt per purpose so that an unsubscribe link cannot confirm and a confirm link cannot
open preferences. Unsubscribe and preferences links never expire; confirm links do."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Sequence

from itsdangerous import BadSignature, SignatureExpired, Signer, TimestampSigner
from itsdangerous.encoding import base64_decode, base64_encode

from newsletter.errors import InvalidInput

CONFIRM_MAX_AGE = 7 * 24 * 3600

# The exact form of a signed link: the opaque token, for confirm links a timestamp, and the
# SHA-256 signature, each unpadded URL-safe base64 joined by ".". base64 decoding ignores
# padding and characters outside its alphabet, and the signature's last character carries
# two unused bits, so without this a link with "=" or "!!!!" appended, or its last character
# changed, would carry the same signature.
_SEGMENT = r"[A-Za-z0-9_-]+"
_SIGNATURE_CHARS = 43  # 32 bytes of SHA-256, unpadded
_FORM = {
    False: re.compile(rf"{_SEGMENT}\.([A-Za-z0-9_-]{{{_SIGNATURE_CHARS}}})"),
    True: re.compile(rf"{_SEGMENT}\.({_SEGMENT})\.([A-Za-z0-9_-]{{{_SIGNATURE_CHARS}}})"),
}


class Purpose(enum.StrEnum):
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"


class TokenError(InvalidInput):
    """A link token that is tampered, truncated, expired or meant for another purpose."""


class LinkSigner:
    """Signs with the first of `secret_keys` and accepts any of them (key rotation)."""

    def __init__(self, secret_keys: Sequence[str]) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        # itsdangerous signs with the LAST key of the list and verifies with all.
        keys = list(reversed(secret_keys))
        # One signer per purpose, built once: every message signs two links.
        self._signers: dict[Purpose, Signer] = {
            purpose: (TimestampSigner if purpose is Purpose.CONFIRM else Signer)(
                keys, salt=f"newsletter.{purpose.value}", digest_method=hashlib.sha256
            )
            for purpose in Purpose
        }

    def _signer(self, purpose: Purpose) -> Signer:
        return self._signers[purpose]

    def sign(self, purpose: Purpose, token: str) -> str:
        return self._signer(purpose).sign(token).decode("ascii")

    def unsign(self, purpose: Purpose, signed: str) -> str:
        signer = self._signer(purpose)
        if not exact_form(signed, timestamped=isinstance(signer, TimestampSigner)):
            raise TokenError("this link is not valid (it may be incomplete or altered)")
        try:
            if isinstance(signer, TimestampSigner):
                raw = signer.unsign(signed, max_age=CONFIRM_MAX_AGE)
            else:
                raw = signer.unsign(signed)
        except SignatureExpired:
            raise TokenError("this link has expired; subscribe again to get a new one") from None
        except BadSignature:
            raise TokenError("this link is not valid (it may be incomplete or altered)") from None
        return raw.decode("ascii")


def exact_form(signed: str, *, timestamped: bool) -> bool:
    """Whether `signed` has the one form our signer writes (pure; the MAC is checked apart):
    URL-safe base64 segments with no padding, no stray character, and each encoded part in
    its canonical encoding (decoding and encoding again gives it back)."""
    found = _FORM[timestamped].fullmatch(signed)
    if found is None:
        return False
    return all(
        base64_encode(base64_decode(part)).decode("ascii") == part for part in found.groups()
    )


def link(base_url: str, purpose: Purpose, signed: str) -> str:
    return f"{base_url}/{purpose.value}/{signed}"
