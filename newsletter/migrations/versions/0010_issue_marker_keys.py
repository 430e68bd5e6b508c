"""issue marker keys: per-reader markers carry a random key of their issue

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 17:00:00

The stored html and text of an issue held fixed markers (XXNLNAMEXX, XXNLUNSUBXX,
XXNLPREFSXX) where a reader's name and links go, and content that a template filter turned
into one (an RSS category `xxnlunsubxx` through `upper`) collected every reader's link
(issue 13, finding 1). Each issue now has a random marker_key that its markers carry
(newsletter.placeholders). Issues composed before get a key too, and their stored bodies'
fixed markers become keyed ones, so they still send; their content was checked only by the
old rules: compose drafts again to have them checked by the new ones.
"""

import re
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FIXED = {"NAME": "XXNLNAMEXX", "UNSUB": "XXNLUNSUBXX", "PREFS": "XXNLPREFSXX"}


def _keyed(body: str, key: str) -> str:
    for kind, fixed in _FIXED.items():
        body = body.replace(fixed, f"XXNL{kind}{key}XX")
    return body


def upgrade() -> None:
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    # SQLite would rebuild the table to make the column NOT NULL afterwards, and dropping the
    # old issues table would cascade to its variants, articles and bounce events: there it
    # is added NOT NULL with an empty default, which no issue keeps.
    op.add_column(
        "issues",
        sa.Column(
            "marker_key",
            sa.String(length=20),
            nullable=not sqlite,
            server_default="" if sqlite else None,
        ),
    )
    issues = sa.table(
        "issues",
        sa.column("id", sa.Integer()),
        sa.column("html", sa.Text()),
        sa.column("text", sa.Text()),
        sa.column("marker_key", sa.String()),
    )
    variants = sa.table(
        "issue_variants",
        sa.column("id", sa.Integer()),
        sa.column("issue_id", sa.Integer()),
        sa.column("html", sa.Text()),
        sa.column("text", sa.Text()),
    )
    for issue_id, html, text in conn.execute(sa.select(issues.c.id, issues.c.html, issues.c.text)):
        key = secrets.token_hex(10)
        conn.execute(
            issues.update()
            .where(issues.c.id == issue_id)
            .values(html=_keyed(html, key), text=_keyed(text, key), marker_key=key)
        )
        for variant_id, vhtml, vtext in conn.execute(
            sa.select(variants.c.id, variants.c.html, variants.c.text).where(
                variants.c.issue_id == issue_id
            )
        ).all():
            conn.execute(
                variants.update()
                .where(variants.c.id == variant_id)
                .values(html=_keyed(vhtml, key), text=_keyed(vtext, key))
            )
    if not sqlite:
        op.alter_column("issues", "marker_key", existing_type=sa.String(length=20), nullable=False)


def downgrade() -> None:
    conn = op.get_bind()
    keyed = re.compile(r"XXNL(NAME|UNSUB|PREFS)[0-9a-f]{20}XX")
    for table in ("issues", "issue_variants"):
        rows = sa.table(
            table,
            sa.column("id", sa.Integer()),
            sa.column("html", sa.Text()),
            sa.column("text", sa.Text()),
        )
        for row_id, html, text in conn.execute(
            sa.select(rows.c.id, rows.c.html, rows.c.text)
        ).all():
            conn.execute(
                rows.update()
                .where(rows.c.id == row_id)
                .values(
                    html=keyed.sub(lambda m: _FIXED[m.group(1)], html),
                    text=keyed.sub(lambda m: _FIXED[m.group(1)], text),
                )
            )
    op.drop_column("issues", "marker_key")  # SQLite 3.35+ drops it in place
