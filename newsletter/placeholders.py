"""Per-recipient markers shared by the composer (which places them) and the message builder
(which substitutes them) (pure).

The composer renders and inlines each issue once; the stored html and text carry a marker
where a per-recipient value goes (the reader's name, unsubscribe URL, preferences URL). Only
markers the composer itself placed may ever be substituted, whatever the templates do to the
content around them (``upper``, ``lower``, ``title``, ``urlencode``, escaping...). So a marker
is not a fixed word content could spell: each issue has its own random key
(``issues.marker_key``), drawn after the issue's content is known and checked against it
(:func:`new_markers`), and every marker of the issue carries it. Content cannot name a
marker it cannot know, and a key that any content field contains, in any case or encoding,
is never used.

Markers are plain ASCII letters and digits, untouched by HTML escaping, CSS inlining or
quoted-printable encoding, so they survive every per-issue step byte for byte.
"""

from __future__ import annotations

import html
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

KEY_BYTES: Final = 10
"""80 random bits per issue: 20 lower-case hex digits."""
KEY_PATTERN: Final = re.compile(r"[0-9a-f]{20}")

# What a marker says it stands for; the key makes it the issue's own.
NAME: Final = "NAME"
UNSUBSCRIBE_URL: Final = "UNSUB"
PREFERENCES_URL: Final = "PREFS"
KINDS: Final = (NAME, UNSUBSCRIBE_URL, PREFERENCES_URL)

ANY_MARKER: Final = re.compile(r"XXNL(?:NAME|UNSUB|PREFS)[0-9a-f]*XX", re.IGNORECASE)
"""Any marker of any issue (and the fixed ones of issues composed before markers had keys):
what a finished message must never contain."""

_NOT_ALNUM: Final = re.compile(r"[^0-9a-z]+")
_DECODE_ROUNDS: Final = 4


@dataclass(frozen=True)
class Markers:
    """The markers of one issue."""

    key: str

    def __post_init__(self) -> None:
        if not KEY_PATTERN.fullmatch(self.key):
            raise ValueError("a marker key is 20 lower-case hex digits")

    def marker(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown marker kind {kind!r}")
        return f"XXNL{kind}{self.key}XX"

    @property
    def name(self) -> str:
        return self.marker(NAME)

    @property
    def unsubscribe_url(self) -> str:
        return self.marker(UNSUBSCRIBE_URL)

    @property
    def preferences_url(self) -> str:
        return self.marker(PREFERENCES_URL)

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.name, self.unsubscribe_url, self.preferences_url)


def fold(text: str) -> str:
    """``text`` reduced to what no template filter or client decoding can change: HTML
    entities and percent-escapes decoded (repeatedly), compatibility forms folded (NFKC:
    full-width letters are letters), lower-cased, only ASCII letters and digits kept."""
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(html.unescape(text))
        if decoded == text:
            break
        text = decoded
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold())


def appears_in(key: str, content: Iterable[str]) -> bool:
    """Whether any content text contains ``key`` in any case, encoding or spacing."""
    return any(key in fold(text) for text in content)


def new_markers(
    content: Iterable[str], *, draw: Callable[[int], str] = secrets.token_hex
) -> Markers:
    """Fresh markers for an issue whose content (every text field that reaches a template)
    is ``content``: a random key that no content field contains."""
    folded = [fold(text) for text in content]
    while True:
        key = draw(KEY_BYTES)
        if not any(key in text for text in folded):
            return Markers(key)


def check_content(markers: Markers, content: Iterable[str]) -> None:
    """Refuse (ValueError) content that contains the issue's marker key in any form."""
    if appears_in(markers.key, content):
        raise ValueError("the content contains this issue's marker key; compose it again")
