"""Message-IDs that prove which delivery a report is about (pure).

Every message we send has the Message-ID ``<d{delivery id}.{mac}@{domain}>``. The MAC is an
HMAC-SHA256 of the delivery id and its issue's nonce under the key derived for the purpose
"message-id" (:func:`newsletter.keys.derive_all`), cut to ``MAC_CHARS`` lower-case hex
digits: the same every time the delivery is built (a retried send keeps its id), unique
across installs (the nonce and the key differ), and unguessable from any other Message-ID,
so a reader who knows her own cannot name another reader's message. A bounce or complaint
report that returns our headers proves its delivery only when the MAC verifies, under any of
the keys (SECRET_KEY may be rotating).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

PURPOSE: Final = "message-id"
MAC_CHARS: Final = 20  # 80 bits
_OURS: Final = re.compile(rf"<d(\d{{1,19}})\.([0-9A-Fa-f]{{{MAC_CHARS}}})@[^<>@\s]+>")


class MessageIds:
    """Makes and checks our Message-IDs' MACs; ``keys`` are the derived keys, newest first."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys or not all(keys):
            raise ValueError("at least one non-empty key is needed")
        # One keyed HMAC state per key, copied per message: half the cost of hmac.new.
        self._keys = [hmac.new(key.encode("utf-8"), digestmod=hashlib.sha256) for key in keys]

    def _mac(self, key: hmac.HMAC, delivery_id: int, nonce: str) -> str:
        mac = key.copy()
        mac.update(f"{PURPOSE}:{delivery_id}:{nonce}".encode())
        return mac.hexdigest()[:MAC_CHARS]

    def tag(self, delivery_id: int, nonce: str) -> str:
        """The MAC that goes after ``d{delivery_id}.`` (under the newest key)."""
        if delivery_id < 0:
            raise ValueError("delivery_id must not be negative")
        return self._mac(self._keys[0], delivery_id, nonce)

    def verify(self, delivery_id: int, nonce: str, mac: str) -> bool:
        """Whether ``mac`` is the MAC of this delivery under one of the keys."""
        mac = mac.lower()
        return any(
            hmac.compare_digest(mac, self._mac(key, delivery_id, nonce)) for key in self._keys
        )


def claimed_delivery(message_id: str) -> tuple[int, str] | None:
    """(delivery id, MAC) that a Message-ID of our form claims, else None. A claim, not a
    proof: check it with :meth:`MessageIds.verify` against the delivery's issue nonce."""
    match = _OURS.fullmatch(message_id.strip())
    if match is None:
        return None
    return int(match.group(1)), match.group(2)
