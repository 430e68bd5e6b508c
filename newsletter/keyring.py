"""Keys kept in the database, sealed under SECRET_KEY (pure: no I/O).

A key that must outlive SECRET_KEY's rotations (the suppression key: erased addresses are
kept only as hashes under it, and a new key would forget them all) is a random value stored
sealed (Fernet: AES-128-CBC and HMAC-SHA256) under the key derived from SECRET_KEY for its
purpose. Any key of SECRET_KEY opens it; whenever the newest key did not seal it, the caller
seals it again under the newest (`unseal` says so), so once every process has run with the
new key first, the old key can go.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from newsletter.config import ConfigError
from newsletter.keys import derive_all


class SealedKeyError(ConfigError):
    """No key of SECRET_KEY opens a sealed key: it was sealed under keys since removed."""


def new_key() -> str:
    """A fresh random key (256 bits, as 64 hex digits)."""
    return secrets.token_hex(32)


def _fernets(secret_keys: Sequence[str], purpose: str) -> list[Fernet]:
    if not secret_keys:
        raise ConfigError("SECRET_KEY holds no key")
    return [
        Fernet(base64.urlsafe_b64encode(bytes.fromhex(key)))
        for key in derive_all(secret_keys, purpose)
    ]


def seal(value: str, secret_keys: Sequence[str], purpose: str) -> str:
    """`value` sealed under the newest key's derived key for `purpose`."""
    return _fernets(secret_keys, purpose)[0].encrypt(value.encode()).decode("ascii")


def unseal(sealed: str, secret_keys: Sequence[str], purpose: str) -> tuple[str, bool]:
    """(the value, whether to seal it again: the newest key did not seal it)."""
    fernets = _fernets(secret_keys, purpose)
    try:
        return fernets[0].decrypt(sealed.encode()).decode(), False
    except InvalidToken:
        pass
    try:
        return MultiFernet(fernets[1:]).decrypt(sealed.encode()).decode(), True
    except (InvalidToken, ValueError):  # ValueError: no older key to try
        raise SealedKeyError(
            f"the {purpose} key in the database was sealed under a SECRET_KEY that is no "
            "longer configured; put the previous key back after the new one "
            "(SECRET_KEY=new,old) and run `newsletter init` once before dropping it"
        ) from None
