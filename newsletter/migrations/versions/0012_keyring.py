"""keyring: keys that outlive SECRET_KEY's rotations, sealed under it

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 16:30:00

The suppression hash was keyed with SECRET_KEY's first key, so rotating SECRET_KEY (as the
docs say: a new key first) let erased addresses back in. The suppression key is now a random
key of its own, kept here sealed under SECRET_KEY (newsletter.keyring) and sealed again under
the new key after a rotation. An install that has suppressions already gets its current first
key as that key, so the hashes it holds keep matching.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keyring",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_keyring")),
    )


def downgrade() -> None:
    op.drop_table("keyring")
