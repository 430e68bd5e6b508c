"""batch counts: per-batch delivery counts, no per-row foreign key checks on deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 21:50:00

- batches get their rows' counts by status (n_queued ... n_cancelled), so that an issue's
  status is a sum over a few thousand batch rows instead of a count over a million
  deliveries. Backfilled: issues frozen before this revision get extra batches (never
  enqueued: nothing queued in them) for the deliveries outside every batch range (readers
  skipped at the freeze before the first or after the last queued row), so that every
  delivery lies in exactly one batch of its issue; then every batch is counted.
- deliveries lose their three foreign keys (PostgreSQL checks one with a query per inserted
  row: half of freezing a million readers). Their ON DELETE actions become triggers.
- the unique (issue_id, subscriber_id) becomes unique (subscriber_id, issue_id), which also
  finds a reader's deliveries: the index on subscriber_id alone goes (one index fewer to
  fill per inserted row).
- a partial index for `issues status`'s last errors.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = ("queued", "claimed", "sent", "failed", "skipped", "cancelled")
ERRORS = sa.text("last_error IS NOT NULL AND status IN ('failed', 'queued')")
BACKFILL_BATCH_SIZE = 500

# What the dropped foreign keys did ON DELETE, as triggers.
PG_TRIGGERS = (
    """
    CREATE FUNCTION deliveries_forget_subscriber() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE deliveries SET subscriber_id = NULL WHERE subscriber_id = OLD.id;
        RETURN OLD;
    END $$
    """,
    """
    CREATE TRIGGER tr_subscribers_deliveries AFTER DELETE ON subscribers
    FOR EACH ROW EXECUTE FUNCTION deliveries_forget_subscriber()
    """,
    """
    CREATE FUNCTION deliveries_forget_issue() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM deliveries WHERE issue_id = OLD.id;
        RETURN OLD;
    END $$
    """,
    """
    CREATE TRIGGER tr_issues_deliveries AFTER DELETE ON issues
    FOR EACH ROW EXECUTE FUNCTION deliveries_forget_issue()
    """,
    """
    CREATE FUNCTION deliveries_forget_variant() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE deliveries SET variant_id = NULL
        WHERE issue_id = OLD.issue_id AND variant_id = OLD.id;
        RETURN OLD;
    END $$
    """,
    """
    CREATE TRIGGER tr_issue_variants_deliveries AFTER DELETE ON issue_variants
    FOR EACH ROW EXECUTE FUNCTION deliveries_forget_variant()
    """,
)
PG_DROP_TRIGGERS = (
    "DROP TRIGGER IF EXISTS tr_issue_variants_deliveries ON issue_variants",
    "DROP FUNCTION IF EXISTS deliveries_forget_variant()",
    "DROP TRIGGER IF EXISTS tr_issues_deliveries ON issues",
    "DROP FUNCTION IF EXISTS deliveries_forget_issue()",
    "DROP TRIGGER IF EXISTS tr_subscribers_deliveries ON subscribers",
    "DROP FUNCTION IF EXISTS deliveries_forget_subscriber()",
)
SQLITE_TRIGGERS = (
    """
    CREATE TRIGGER tr_subscribers_deliveries AFTER DELETE ON subscribers
    FOR EACH ROW BEGIN
        UPDATE deliveries SET subscriber_id = NULL WHERE subscriber_id = OLD.id;
    END
    """,
    """
    CREATE TRIGGER tr_issues_deliveries AFTER DELETE ON issues
    FOR EACH ROW BEGIN
        DELETE FROM deliveries WHERE issue_id = OLD.id;
    END
    """,
    """
    CREATE TRIGGER tr_issue_variants_deliveries AFTER DELETE ON issue_variants
    FOR EACH ROW BEGIN
        UPDATE deliveries SET variant_id = NULL
        WHERE issue_id = OLD.issue_id AND variant_id = OLD.id;
    END
    """,
)
SQLITE_DROP_TRIGGERS = (
    "DROP TRIGGER IF EXISTS tr_issue_variants_deliveries",
    "DROP TRIGGER IF EXISTS tr_issues_deliveries",
    "DROP TRIGGER IF EXISTS tr_subscribers_deliveries",
)


@contextmanager
def _rebuilding_deliveries() -> Iterator[None]:
    """SQLite alters `deliveries` by building a new table and dropping the old one, and the
    drop deletes every row first: bounce_events' ON DELETE SET NULL would then forget which
    delivery each bounce was about (PRAGMA foreign_keys cannot be turned off inside the
    migration's transaction). Keep those links aside and put them back."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    op.execute(
        "CREATE TEMP TABLE keep_bounce_deliveries AS "
        "SELECT id, delivery_id FROM bounce_events WHERE delivery_id IS NOT NULL"
    )
    yield
    op.execute(
        "UPDATE bounce_events SET delivery_id = ("
        "SELECT k.delivery_id FROM keep_bounce_deliveries k WHERE k.id = bounce_events.id) "
        "WHERE id IN (SELECT id FROM keep_bounce_deliveries)"
    )
    op.execute("DROP TABLE keep_bounce_deliveries")


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for name in COUNTS:
            batch_op.add_column(
                sa.Column(f"n_{name}", sa.Integer(), nullable=False, server_default="0")
            )
    with _rebuilding_deliveries(), op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("fk_deliveries_issue_id_issues", type_="foreignkey")
        batch_op.drop_constraint("fk_deliveries_subscriber_id_subscribers", type_="foreignkey")
        batch_op.drop_constraint("fk_deliveries_variant_id_issue_variants", type_="foreignkey")
        batch_op.create_unique_constraint(
            "uq_deliveries_subscriber_id", ["subscriber_id", "issue_id"]
        )
        batch_op.drop_constraint("uq_deliveries_issue_id", type_="unique")
        batch_op.drop_index("ix_deliveries_subscriber_id")
        batch_op.create_index(
            "ix_deliveries_issue_errors",
            ["issue_id", "id"],
            unique=False,
            postgresql_where=ERRORS,
            sqlite_where=ERRORS,
        )
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_TRIGGERS if sqlite else PG_TRIGGERS:
        op.execute(statement)
    _backfill()


def _backfill() -> None:
    # Batches used to cover an issue's queued rows only, as one contiguous run of ranges from
    # the first queued id to the last: deliveries skipped at the freeze could lie before or
    # after it (or make up the whole issue, which then had no batch). They get batches of
    # their own, one per side and BACKFILL_BATCH_SIZE ids, so that no two ranges overlap.
    op.execute(
        sa.text(
            """
            INSERT INTO batches (issue_id, first_id, last_id, enqueued_at)
            SELECT d.issue_id, min(d.id), max(d.id), NULL
            FROM deliveries d
            LEFT JOIN (
                SELECT issue_id, min(first_id) AS lo, max(last_id) AS hi
                FROM batches GROUP BY issue_id
            ) r ON r.issue_id = d.issue_id
            WHERE r.issue_id IS NULL OR d.id < r.lo OR d.id > r.hi
            GROUP BY d.issue_id,
                CASE WHEN r.issue_id IS NULL THEN 0 WHEN d.id < r.lo THEN 1 ELSE 2 END,
                d.id / :size
            """
        ).bindparams(size=BACKFILL_BATCH_SIZE)
    )
    # One correlated count per batch over its id range (a primary-key range scan: the
    # "+ 0" keeps the planner off the index, which would read the whole issue for
    # every batch).
    op.execute(
        """
        UPDATE batches SET (n_queued, n_claimed, n_sent, n_failed, n_skipped, n_cancelled) = (
            SELECT count(CASE WHEN d.status = 'queued' THEN 1 END),
                   count(CASE WHEN d.status = 'claimed' THEN 1 END),
                   count(CASE WHEN d.status = 'sent' THEN 1 END),
                   count(CASE WHEN d.status = 'failed' THEN 1 END),
                   count(CASE WHEN d.status = 'skipped' THEN 1 END),
                   count(CASE WHEN d.status = 'cancelled' THEN 1 END)
            FROM deliveries d
            WHERE d.id BETWEEN batches.first_id AND batches.last_id
              AND d.issue_id + 0 = batches.issue_id
        )
        """
    )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_DROP_TRIGGERS if sqlite else PG_DROP_TRIGGERS:
        op.execute(statement)
    with _rebuilding_deliveries(), op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_deliveries_issue_errors", postgresql_where=ERRORS, sqlite_where=ERRORS
        )
        batch_op.create_index("ix_deliveries_subscriber_id", ["subscriber_id"], unique=False)
        batch_op.create_unique_constraint("uq_deliveries_issue_id", ["issue_id", "subscriber_id"])
        batch_op.drop_constraint("uq_deliveries_subscriber_id", type_="unique")
        batch_op.create_foreign_key(
            "fk_deliveries_variant_id_issue_variants",
            "issue_variants",
            ["variant_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_foreign_key(
            "fk_deliveries_subscriber_id_subscribers",
            "subscribers",
            ["subscriber_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_foreign_key(
            "fk_deliveries_issue_id_issues",
            "issues",
            ["issue_id"],
            ["id"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        for name in reversed(COUNTS):
            batch_op.drop_column(f"n_{name}")
