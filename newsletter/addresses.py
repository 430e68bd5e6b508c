"""Address validation and normalisation (pure: no DNS look-ups, no database)."""

from __future__ import annotations

import re
from email.utils import parseaddr
from functools import lru_cache

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from newsletter.errors import InvalidInput

_FORBIDDEN = re.compile(r"[\r\n\x00]|=\?")

# The common case, checked without email_validator (which costs ~100 us an address and
# dominated bulk imports): a dot-atom local part and an ASCII domain of LDH labels with an
# alphabetic TLD. It accepts a strict subset of what email_validator accepts; anything
# else (IDN, quoted local parts, odd TLDs, errors) goes to email_validator for its verdict
# and its error message.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")
_SPECIAL_TLDS = frozenset(SPECIAL_USE_DOMAIN_NAMES)


class InvalidAddress(InvalidInput):
    """An address or display name that cannot be used; the message is one line for the user."""


def check_text(value: str, field: str, *, max_length: int = 200) -> str:
    """Refuse CR, LF, NUL and RFC 2047 encoded-word openers in text that reaches a header."""
    if _FORBIDDEN.search(value):
        raise InvalidAddress(f"{field} contains a line break, NUL or '=?', which is not allowed")
    if len(value) > max_length:
        raise InvalidAddress(f"{field} is longer than {max_length} characters")
    return value


@lru_cache(maxsize=16384)
def _fast_domain(domain: str) -> str | None:
    """The stored form of a domain the fast path accepts (ASCII LDH labels, alphabetic TLD,
    not special-use), or None. Cached: a million addresses have a few thousand domains."""
    if len(domain) <= 253 and _DOMAIN.fullmatch(domain):
        lower = domain.lower()
        if lower.rpartition(".")[2] not in _SPECIAL_TLDS:
            return lower
    return None


def normalize_email(raw: str) -> str:
    """Return the canonical stored form: local part as given, domain lower-case IDNA (ASCII).

    Two addresses that differ only in the case of their domain are the same subscriber.
    Non-ASCII local parts (SMTPUTF8) are refused: most relays cannot carry them.
    """
    value = raw.strip()
    if not value:
        raise InvalidAddress("email is empty")
    # The fast path admits no CR, LF or NUL, so of check_text only '=?' and the length are
    # left to test here; anything else takes the full path, with its messages. This is the
    # per-row cost of an import: for a million rows, seconds rather than tens of seconds.
    local, at, domain = value.rpartition("@")
    if (
        at
        and len(local) <= 64
        and len(value) <= 320
        and "=?" not in local
        and _LOCAL.fullmatch(local)
        and (fast_domain := _fast_domain(domain)) is not None
    ):
        return f"{local}@{fast_domain}"
    check_text(value, "email", max_length=320)
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidAddress(f"invalid email address {value!r}: {exc}") from None
    local, _, _domain = result.ascii_email.rpartition("@") if result.ascii_email else ("", "", "")
    if not local:
        raise InvalidAddress(f"invalid email address {value!r}")
    return f"{local}@{result.ascii_domain.lower()}"


def parse_from_address(raw: str) -> tuple[str, str]:
    """Parse 'Desk <desk@example.org>' into (display name, normalised address)."""
    check_text(raw, "from address", max_length=320)
    name, addr = parseaddr(raw)
    if not addr:
        raise InvalidAddress(f"invalid from address {raw!r}: expected 'Name <user@domain>'")
    email = normalize_email(addr)
    return name.strip(), email


def domain_of(email: str) -> str:
    return email.rpartition("@")[2]


def address_key(email: str) -> str:
    """The identity of a mailbox: the stored address compared case-insensitively.

    The domain is already lower-case in the stored form; the local part is folded too, as every
    major mailbox provider (and listmonk) treats it. One key is one reader: import, forms, the
    API, erasure, suppression and rate limits look readers up by it, while the address the
    reader typed stays for display and for the envelope.
    """
    return email.strip().lower()


def mask_address(text: str, address: str, marker: str = "[address]") -> str:
    """`text` (a server's reply, an error) with `address`, in any case, and then its local
    part alone replaced by `marker`: what goes to a log must not carry a reader's address."""
    text = re.sub(re.escape(address), marker, text, flags=re.IGNORECASE)
    local = address.rpartition("@")[0]
    return re.sub(re.escape(local), marker, text, flags=re.IGNORECASE) if local else text
