"""import events: one per import, named by the subscriptions it added

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 07:00:00

An import wrote one `imported` event per reader: a million identical rows for a million
readers, 2.5-2.9 s and ~250 MB of WAL of the import (docs/benchmarks.md, fourth pass). It
now writes one event per import, whose detail says how many readers came from what file as
which status, and each subscription it added names that event in import_event_id. Events
written before stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.add_column("subscriptions", sa.Column("import_event_id", big, nullable=True))


def downgrade() -> None:
    # SQLite (3.35 and later) drops a column in place: no rebuild of `subscriptions`,
    # which would make bounce_events forget their subscriptions (see migration 0006).
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE subscriptions DROP COLUMN import_event_id")
    else:
        op.drop_column("subscriptions", "import_event_id")
