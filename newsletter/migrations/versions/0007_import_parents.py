"""import parents: an import's new readers need no lock, and parents keep their ids

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 06:20:00

Migration 0006's statement-level trigger locks every parent of the new subscriptions FOR KEY
SHARE, so that an erasure or a list deletion at the same time cannot leave one behind. For
the readers an import has just created in its own transaction that lock guards nothing (no
other transaction can see them, let alone delete them), yet it writes every one of those
rows again and logs it: ~2 s and ~170 MB of WAL for a million readers
(docs/benchmarks.md, fourth pass).

So the trigger now skips its checks for a statement run while the transaction-local
setting `newsletter.parents_held` is 'on'. Only the import sets it, around the one INSERT
whose readers it created in the same transaction and whose list it has locked FOR KEY
SHARE itself, and sets it back right after. Every other insert, the import's subscriptions
of readers who existed before included, is checked and locked as before.

What the keys also did and 0006 left out: a parent's id could not change while it was
referenced. Nothing updates an id, and now triggers refuse it on both databases.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHECK_PARENTS = """
    CREATE OR REPLACE FUNCTION subscriptions_check_parents() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        wanted bigint;
        found bigint;
    BEGIN
        {held}
        SELECT count(*) INTO wanted FROM nl_new;
        PERFORM 1 FROM lists l WHERE l.id IN (SELECT list_id FROM nl_new) FOR KEY SHARE OF l;
        SELECT count(*) INTO found FROM nl_new n JOIN lists l ON l.id = n.list_id;
        IF found = wanted THEN
            SELECT count(*) INTO found FROM (
                SELECT 1 FROM nl_new n JOIN subscribers s ON s.id = n.subscriber_id
                FOR KEY SHARE OF s
            ) locked;
        END IF;
        IF found <> wanted THEN
            RAISE foreign_key_violation USING MESSAGE = 'a subscription names a subscriber or list that does not exist';
        END IF;
        RETURN NULL;
    END $$
"""
_HELD = """
        -- Set only by the import, for its readers created in this very transaction
        -- and its list locked beforehand (migration 0007).
        IF current_setting('newsletter.parents_held', true) = 'on' THEN
            RETURN NULL;
        END IF;"""

PG_UP = (
    _CHECK_PARENTS.format(held=_HELD),
    """
    CREATE FUNCTION parents_keep_ids() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE foreign_key_violation USING MESSAGE = 'a subscriber''s or list''s id never changes';
    END $$
    """,
    """
    CREATE TRIGGER tr_subscribers_keep_id BEFORE UPDATE OF id ON subscribers
    FOR EACH ROW WHEN (OLD.id <> NEW.id) EXECUTE FUNCTION parents_keep_ids()
    """,
    """
    CREATE TRIGGER tr_lists_keep_id BEFORE UPDATE OF id ON lists
    FOR EACH ROW WHEN (OLD.id <> NEW.id) EXECUTE FUNCTION parents_keep_ids()
    """,
)
PG_DOWN = (
    "DROP TRIGGER IF EXISTS tr_lists_keep_id ON lists",
    "DROP TRIGGER IF EXISTS tr_subscribers_keep_id ON subscribers",
    "DROP FUNCTION IF EXISTS parents_keep_ids()",
    _CHECK_PARENTS.format(held=""),
)
SQLITE_UP = tuple(
    f"""
    CREATE TRIGGER tr_{table}_keep_id BEFORE UPDATE OF id ON {table}
    FOR EACH ROW WHEN OLD.id <> NEW.id
    BEGIN
        SELECT RAISE(ABORT, 'a subscriber''s or list''s id never changes');
    END
    """
    for table in ("subscribers", "lists")
)
SQLITE_DOWN = (
    "DROP TRIGGER IF EXISTS tr_lists_keep_id",
    "DROP TRIGGER IF EXISTS tr_subscribers_keep_id",
)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_UP if sqlite else PG_UP:
        op.execute(statement)


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_DOWN if sqlite else PG_DOWN:
        op.execute(statement)
