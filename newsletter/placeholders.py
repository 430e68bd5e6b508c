"""Per-recipient placeholders shared by the composer (which writes them) and the message
builder (which substitutes them).

The composer renders and inlines each issue once; the stored html and text carry these
markers where a per-recipient value goes. They are plain ASCII without characters that
HTML escaping, CSS inlining or quoted-printable encoding would touch, so they survive every
per-issue step byte for byte.
"""

from typing import Final

NAME: Final = "XXNLNAMEXX"
UNSUBSCRIBE_URL: Final = "XXNLUNSUBXX"
PREFERENCES_URL: Final = "XXNLPREFSXX"

ALL: Final = (NAME, UNSUBSCRIBE_URL, PREFERENCES_URL)
