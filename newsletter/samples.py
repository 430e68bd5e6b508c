"""The sample reader of previews, checks and test copies (pure).

A preview or a test copy is the issue as a reader gets it, but for nobody: an address that
cannot be anyone's (``.invalid`` is reserved, RFC 2606), a sample name, and a token that no
subscription has (real tokens are 22 or 32 URL-safe characters). Its signed links open a page
that says it was a test copy and changes nothing (see newsletter/web).
"""

from __future__ import annotations

from typing import Final

SAMPLE_EMAIL: Final = "reader@example.invalid"
SAMPLE_NAME: Final = "Sample Reader"
SAMPLE_TOKEN: Final = "sample-copy"  # noqa: S105 - public by design: it acts on nobody


def is_sample_token(token: str) -> bool:
    return token == SAMPLE_TOKEN
