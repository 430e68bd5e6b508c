"""subscription parents: one set-based check per statement instead of a query per row

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 03:40:00

An import of a million readers inserts a million subscriptions in one statement, and
PostgreSQL checked both of their foreign keys with one query per inserted row: 12.4 s for
the key to `subscribers` alone, of a 40 s INSERT (a scratch table of the same rows on
2026-11-29: docs/benchmarks.md, third pass). The keys go, and on PostgreSQL a statement-level trigger does what they did,
once per statement, over the statement's new rows (a transition table):

- it locks every parent row FOR KEY SHARE, the lock a key's check takes, so that an erasure
  or a list deletion running at the same time waits for this transaction to end and then
  removes what it added, or, if it came first, makes this statement fail;
- after the lock it counts the parents found: fewer than the new rows name (a parent that
  never existed, or was deleted by a transaction that committed first) raises
  foreign_key_violation, as the key did.

It is two hash joins for a million rows (4.2 s with its lock, measured) and two index
look-ups for one. A subscription never moves to another reader or list: an UPDATE of
either column is refused. What the keys' ON DELETE CASCADE did is a trigger on each
parent, as migrations 0003 and 0005 did for deliveries and events. On SQLite, where a
key costs little, triggers do the same per row, so that both databases have one schema.

ix_subscriptions_list_status (list_id, status, subscriber_id) goes too: the freeze now reads
a list's active readers in subscription order, from ix_subscriptions_list_status_page
(list_id, status, id), which the list pages use already. Each imported reader filled both.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_TRIGGERS = (
    """
    CREATE FUNCTION subscriptions_check_parents() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        wanted bigint;
        found bigint;
    BEGIN
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
    """,
    """
    CREATE TRIGGER tr_subscriptions_parents AFTER INSERT ON subscriptions
    REFERENCING NEW TABLE AS nl_new
    FOR EACH STATEMENT EXECUTE FUNCTION subscriptions_check_parents()
    """,
    """
    CREATE FUNCTION subscriptions_refuse_move() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE foreign_key_violation USING MESSAGE = 'a subscription belongs to one subscriber and one list: it cannot be moved';
    END $$
    """,
    """
    CREATE TRIGGER tr_subscriptions_stay BEFORE UPDATE OF subscriber_id, list_id
    ON subscriptions FOR EACH ROW
    WHEN (OLD.subscriber_id <> NEW.subscriber_id OR OLD.list_id <> NEW.list_id)
    EXECUTE FUNCTION subscriptions_refuse_move()
    """,
    """
    CREATE FUNCTION subscriptions_forget_subscriber() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM subscriptions WHERE subscriber_id = OLD.id;
        RETURN OLD;
    END $$
    """,
    """
    CREATE TRIGGER tr_subscribers_subscriptions AFTER DELETE ON subscribers
    FOR EACH ROW EXECUTE FUNCTION subscriptions_forget_subscriber()
    """,
    """
    CREATE FUNCTION subscriptions_forget_list() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM subscriptions WHERE list_id = OLD.id;
        RETURN OLD;
    END $$
    """,
    """
    CREATE TRIGGER tr_lists_subscriptions AFTER DELETE ON lists
    FOR EACH ROW EXECUTE FUNCTION subscriptions_forget_list()
    """,
)
PG_DROP_TRIGGERS = (
    "DROP TRIGGER IF EXISTS tr_lists_subscriptions ON lists",
    "DROP FUNCTION IF EXISTS subscriptions_forget_list()",
    "DROP TRIGGER IF EXISTS tr_subscribers_subscriptions ON subscribers",
    "DROP FUNCTION IF EXISTS subscriptions_forget_subscriber()",
    "DROP TRIGGER IF EXISTS tr_subscriptions_stay ON subscriptions",
    "DROP FUNCTION IF EXISTS subscriptions_refuse_move()",
    "DROP TRIGGER IF EXISTS tr_subscriptions_parents ON subscriptions",
    "DROP FUNCTION IF EXISTS subscriptions_check_parents()",
)
SQLITE_TRIGGERS = (
    """
    CREATE TRIGGER tr_subscriptions_parents BEFORE INSERT ON subscriptions
    FOR EACH ROW WHEN NOT EXISTS (SELECT 1 FROM subscribers WHERE id = NEW.subscriber_id)
        OR NOT EXISTS (SELECT 1 FROM lists WHERE id = NEW.list_id)
    BEGIN
        SELECT RAISE(ABORT, 'a subscription names a subscriber or list that does not exist');
    END
    """,
    """
    CREATE TRIGGER tr_subscriptions_stay BEFORE UPDATE OF subscriber_id, list_id
    ON subscriptions FOR EACH ROW
    WHEN OLD.subscriber_id <> NEW.subscriber_id OR OLD.list_id <> NEW.list_id
    BEGIN
        SELECT RAISE(ABORT, 'a subscription belongs to one subscriber and one list: it cannot be moved');
    END
    """,
    """
    CREATE TRIGGER tr_subscribers_subscriptions AFTER DELETE ON subscribers
    FOR EACH ROW BEGIN
        DELETE FROM subscriptions WHERE subscriber_id = OLD.id;
    END
    """,
    """
    CREATE TRIGGER tr_lists_subscriptions AFTER DELETE ON lists
    FOR EACH ROW BEGIN
        DELETE FROM subscriptions WHERE list_id = OLD.id;
    END
    """,
)
SQLITE_DROP_TRIGGERS = (
    "DROP TRIGGER IF EXISTS tr_lists_subscriptions",
    "DROP TRIGGER IF EXISTS tr_subscribers_subscriptions",
    "DROP TRIGGER IF EXISTS tr_subscriptions_stay",
    "DROP TRIGGER IF EXISTS tr_subscriptions_parents",
)


@contextmanager
def _rebuilding_subscriptions() -> Iterator[None]:
    """SQLite alters `subscriptions` by building a new table and dropping the old one, and
    the drop deletes every row first: bounce_events' ON DELETE SET NULL would then forget
    which subscription each bounce was about. Keep those links aside and put them back
    (as migration 0003 does for deliveries)."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    op.execute(
        "CREATE TEMP TABLE keep_bounce_subscriptions AS "
        "SELECT id, subscription_id FROM bounce_events WHERE subscription_id IS NOT NULL"
    )
    yield
    op.execute(
        "UPDATE bounce_events SET subscription_id = ("
        "SELECT k.subscription_id FROM keep_bounce_subscriptions k "
        "WHERE k.id = bounce_events.id) "
        "WHERE id IN (SELECT id FROM keep_bounce_subscriptions)"
    )
    op.execute("DROP TABLE keep_bounce_subscriptions")


def upgrade() -> None:
    with _rebuilding_subscriptions(), op.batch_alter_table("subscriptions") as batch_op:
        batch_op.drop_constraint("fk_subscriptions_subscriber_id_subscribers", type_="foreignkey")
        batch_op.drop_constraint("fk_subscriptions_list_id_lists", type_="foreignkey")
        batch_op.drop_index("ix_subscriptions_list_status")
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_TRIGGERS if sqlite else PG_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_DROP_TRIGGERS if sqlite else PG_DROP_TRIGGERS:
        op.execute(statement)
    with _rebuilding_subscriptions(), op.batch_alter_table("subscriptions") as batch_op:
        batch_op.create_index(
            "ix_subscriptions_list_status", ["list_id", "status", "subscriber_id"], unique=False
        )
        batch_op.create_foreign_key(
            "fk_subscriptions_list_id_lists", "lists", ["list_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_foreign_key(
            "fk_subscriptions_subscriber_id_subscribers",
            "subscribers",
            ["subscriber_id"],
            ["id"],
            ondelete="CASCADE",
        )
