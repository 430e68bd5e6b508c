"""Keep link tokens out of logs (pure). A signed token in a path is a key to someone's
subscription; uvicorn's access log prints the raw path, as the client spelled it.

So the scrubber matches every spelling that could reach (or be meant for) a link page: any
case (`/PREFERENCES/`), percent-encoded letters or slashes (`/%70references/`,
`/preferences%2F`), encoded more than once (`/%2570references/`), and repeated slashes.
Whatever follows the link word up to the next `/`, `?`, `#`, space or quote is replaced.
"""

from __future__ import annotations

import logging
import re

LINK_WORDS = ("confirm", "unsubscribe", "preferences")
MARK = "[token]"


def _spellings(char: str) -> str:
    """A regex for one character, literally or percent-encoded (any number of times)."""
    codes = {f"{ord(char.lower()):02x}", f"{ord(char.upper()):02x}"}
    encoded = "|".join(sorted(codes))
    return f"(?:{re.escape(char)}|%(?:25)*(?:{encoded}))"


_SLASH = _spellings("/")
_WORD = "|".join("".join(_spellings(c) for c in word) for word in LINK_WORDS)
_TOKEN_IN_PATH = re.compile(
    rf"((?:{_SLASH})+(?:{_WORD})(?:{_SLASH})+)[^/?#\s\"]+",
    re.IGNORECASE,
)


def redact_tokens(text: str) -> str:
    """`text` with the token after every spelling of a link path replaced by [token]."""
    return _TOKEN_IN_PATH.sub(lambda m: m.group(1) + MARK, text)


class RedactLinkTokens(logging.Filter):
    """Replaces link tokens in a record's message and arguments (uvicorn's access log passes
    the path as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact_tokens(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True
