"""list pages by status: drop (list_id, id)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 06:55:00

A page of a whole list now reads the next ids of each status from
ix_subscriptions_list_status_page (list_id, status, id) and merges them
(subscriptions.iter_subscriptions), so ix_subscriptions_list_id_page (list_id, id) goes: every
new subscription filled it, ~1 s of a million-reader import (docs/benchmarks.md, fourth
pass).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_subscriptions_list_id_page", table_name="subscriptions")


def downgrade() -> None:
    op.create_index(
        "ix_subscriptions_list_id_page", "subscriptions", ["list_id", "id"], unique=False
    )
