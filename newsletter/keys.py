"""One key per purpose, derived from SECRET_KEY (pure).

SECRET_KEY holds one or more operator secrets, newest first. No purpose uses them raw: each
purpose (links, VERP, Message-IDs, suppression, rate limits, ...) gets its own key, an
HMAC-SHA256 of the purpose's name under the secret, so a MAC made for one purpose is never valid
for another and a leaked derived key reveals neither the secret nor another purpose's key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

_LABEL = b"newsletter key derivation v1: "


def derive(secret: str, purpose: str) -> str:
    """The key for `purpose` under one operator secret (64 hex characters)."""
    if not secret:
        raise ValueError("cannot derive a key from an empty secret")
    if not purpose:
        raise ValueError("a derived key needs a purpose")
    return hmac.new(secret.encode(), _LABEL + purpose.encode(), hashlib.sha256).hexdigest()


def derive_all(secrets: Sequence[str], purpose: str) -> list[str]:
    """The key for `purpose` under every secret, in the same order (newest first)."""
    return [derive(secret, purpose) for secret in secrets]
