"""Mail sent to a list's own address (pure): the mailto: half of List-Unsubscribe.

Every digest's List-Unsubscribe header offers
``mailto:LIST-ADDRESS?subject=unsubscribe%20SIGNED-TOKEN``; a mail client that honours it
sends a message whose subject is ``unsubscribe SIGNED-TOKEN``. This module finds that token.
Verifying it (``LinkSigner.unsign(Purpose.UNSUBSCRIBE, ...)``) and acting on it is the
caller's job, exactly as for the https link.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import Message

# A signed token: the opaque value and its signature, both URL-safe base64, joined by a dot.
_SIGNED = r"[A-Za-z0-9_-]{8,128}\.[A-Za-z0-9_-]{16,128}"
# "unsubscribe TOKEN", perhaps behind reply or forward prefixes some clients add.
_SUBJECT = re.compile(
    r"^(?:(?:re|fw|fwd|aw|sv|wg|tr)\s*:\s*)*unsubscribe\s+(" + _SIGNED + r")\s*$",
    re.IGNORECASE,
)


def unsubscribe_token(message: bytes | Message) -> str | None:
    """The signed unsubscribe token carried by a mail to the list address, or None when the
    message is not such a request (a bounce, a reply, anything else)."""
    parsed: Message = (
        email.message_from_bytes(message, policy=email.policy.default)
        if isinstance(message, bytes)
        else message
    )
    try:
        raw = parsed.get("Subject")
    except (ValueError, IndexError):  # a header too broken to decode
        return None
    if raw is None:
        return None
    subject = " ".join(str(raw).split())
    match = _SUBJECT.match(subject)
    return match.group(1) if match else None
