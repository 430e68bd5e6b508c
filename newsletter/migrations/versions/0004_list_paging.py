"""list paging: indexes for a page of a list's readers at a million subscribers

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 22:30:00

A page of subscribers is keyset-paged on the subscription id (`id > after ORDER BY id`),
optionally in one status. With only (list_id, status, subscriber_id) to go on, the first
page of a small list created after a big one read 1,000,202 rows (133-183 ms), and a page
of a rare status ~100,000 rows; with these two each page reads its own rows
(benchmarks/bench_list_page.py).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_subscriptions_list_id_page", "subscriptions", ["list_id", "id"])
    op.create_index(
        "ix_subscriptions_list_status_page", "subscriptions", ["list_id", "status", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_subscriptions_list_status_page", table_name="subscriptions")
    op.drop_index("ix_subscriptions_list_id_page", table_name="subscriptions")
