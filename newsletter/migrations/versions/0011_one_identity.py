"""one identity per mailbox: subscribers.email_key, and case variants merged into one reader

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 16:40:00

Addresses compare case-insensitively (newsletter.addresses.address_key): `Dup@example.org`,
`dup@example.org` and `DUP@example.org` are one mailbox, so one reader. Each subscriber gets
its identity in `email_key` (unique: a lookup by identity is one index probe), and `email`
keeps the form the reader typed, for display and the envelope.

Readers that are case variants of one another are merged first, one group at a time, by the
rules of newsletter.identity.plan_merge: the earliest reader stays; on each list the
earliest subscription stays, with the most restrictive status and the earliest consent; the
other subscriptions go, their tokens become aliases of the one that stays (so that links
already mailed, unsubscribe above all, go on working: `subscription_aliases`), and their
bounce events name the one that stays; events and
deliveries are re-pointed to the reader that stays (a delivery of an issue the survivor
has a delivery of too keeps no reader, as after an erasure). Each merge writes a `merged`
event and a log line of ids and counts (never an address).

On PostgreSQL the unique constraint on `email` goes: the one on `email_key` implies it, and
each imported reader filled both. SQLite cannot drop a table's constraint without rebuilding
the table (and its triggers): there the old one stays, as harmless, and `email_key` is
left nullable (every writer sets it).
"""

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from newsletter.identity import Reader, Sub, describe, plan_merge

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("newsletter.migrations")
LOGGED = 50  # merges logged one by one; the rest are counted (each is an event as well)

TS = sa.DateTime(timezone=True)
BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
subscribers = sa.table(
    "subscribers",
    sa.column("id", BIG),
    sa.column("email", sa.String),
    sa.column("email_key", sa.String),
    sa.column("name", sa.String),
    sa.column("attributes", sa.JSON),
    sa.column("created_at", TS),
)
subscriptions = sa.table(
    "subscriptions",
    sa.column("id", BIG),
    sa.column("subscriber_id", BIG),
    sa.column("list_id", sa.Integer),
    sa.column("status", sa.String),
    sa.column("paused", sa.Boolean),
    sa.column("soft_bounces", sa.Integer),
    sa.column("created_at", TS),
    sa.column("updated_at", TS),
    sa.column("confirmed_at", TS),
    sa.column("unsubscribed_at", TS),
)
events = sa.table(
    "events",
    sa.column("id", BIG),
    sa.column("created_at", TS),
    sa.column("kind", sa.String),
    sa.column("source", sa.String),
    sa.column("subscriber_id", BIG),
    sa.column("list_id", sa.Integer),
    sa.column("detail", sa.String),
)
aliases = sa.table(
    "subscription_aliases", sa.column("token", sa.String), sa.column("subscription_id", BIG)
)
bounce_events = sa.table("bounce_events", sa.column("id", BIG), sa.column("subscription_id", BIG))

# The trigger of migration 0006 that refuses moving a subscription: a merge moves some,
# with the trigger off for the moment.
SQLITE_STAY = """
    CREATE TRIGGER tr_subscriptions_stay BEFORE UPDATE OF subscriber_id, list_id
    ON subscriptions FOR EACH ROW
    WHEN OLD.subscriber_id <> NEW.subscriber_id OR OLD.list_id <> NEW.list_id
    BEGIN
        SELECT RAISE(ABORT, 'a subscription belongs to one subscriber and one list: it cannot be moved');
    END
    """


def _merge_group(conn: sa.Connection, ids: list[int]) -> str:
    readers = [
        Reader(r.id, r.name, r.attributes, r.created_at)
        for r in conn.execute(
            sa.select(
                subscribers.c.id,
                subscribers.c.name,
                subscribers.c.attributes,
                subscribers.c.created_at,
            ).where(subscribers.c.id.in_(ids))
        )
    ]
    subs = [
        Sub(
            r.id,
            r.subscriber_id,
            r.list_id,
            r.status,
            bool(r.paused),
            r.soft_bounces,
            r.created_at,
            r.updated_at,
            r.confirmed_at,
            r.unsubscribed_at,
        )
        for r in conn.execute(
            sa.select(*(c for c in subscriptions.c)).where(subscriptions.c.subscriber_id.in_(ids))
        )
    ]
    plan = plan_merge(readers, subs)
    tokens: dict[int, str] = dict(
        conn.execute(
            sa.text("SELECT id, token FROM subscriptions WHERE subscriber_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).all()
    )
    for gone, stays in plan.dropped:
        conn.execute(aliases.insert().values(token=tokens[gone], subscription_id=stays))
        conn.execute(
            bounce_events.update()
            .where(bounce_events.c.subscription_id == gone)
            .values(subscription_id=stays)
        )
        conn.execute(subscriptions.delete().where(subscriptions.c.id == gone))
    for kept in plan.kept:
        values: dict[str, Any] = {
            "status": kept.status,
            "paused": kept.paused,
            "soft_bounces": kept.soft_bounces,
            "created_at": kept.created_at,
            "updated_at": kept.updated_at,
            "confirmed_at": kept.confirmed_at,
            "unsubscribed_at": kept.unsubscribed_at,
        }
        if kept.moved_from is not None:
            values["subscriber_id"] = plan.survivor
        conn.execute(subscriptions.update().where(subscriptions.c.id == kept.id).values(values))
    for absorbed in plan.absorbed:
        # One absorbed reader at a time, so that two of them with a delivery of the same
        # issue do not both move onto the survivor.
        conn.execute(
            sa.text(
                "UPDATE deliveries SET subscriber_id = :survivor WHERE subscriber_id = :absorbed "
                "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.subscriber_id = :survivor "
                "AND d.issue_id = deliveries.issue_id)"
            ),
            {"survivor": plan.survivor, "absorbed": absorbed},
        )
    conn.execute(
        events.update()
        .where(events.c.subscriber_id.in_(plan.absorbed))
        .values(subscriber_id=plan.survivor)
    )
    conn.execute(
        subscribers.update()
        .where(subscribers.c.id == plan.survivor)
        .values(name=plan.name, attributes=plan.attributes, created_at=plan.created_at)
    )
    # Their subscriptions were moved or merged away; their deliveries that could not move
    # keep no reader (the delete triggers of migrations 0003, 0005 and 0006).
    conn.execute(subscribers.delete().where(subscribers.c.id.in_(plan.absorbed)))
    summary = describe(plan)
    conn.execute(
        events.insert().values(
            created_at=datetime.now(UTC),
            kind="merged",
            source="migration",
            subscriber_id=plan.survivor,
            list_id=None,
            detail=summary[:500],
        )
    )
    return summary


def merge_case_variants(conn: sa.Connection) -> list[str]:
    """Merge every group of readers whose addresses differ only in case; what was done.
    The groups are found in one pass over `subscribers`; each merge then works by ids."""
    rows = conn.execute(
        sa.text(
            "SELECT lower(email) AS k, id FROM subscribers WHERE lower(email) IN ("
            "SELECT lower(email) FROM subscribers GROUP BY lower(email) HAVING COUNT(*) > 1"
            ") ORDER BY 1, 2"
        )
    ).all()
    if not rows:
        return []
    groups: dict[str, list[int]] = {}
    for key, id_ in rows:
        groups.setdefault(key, []).append(id_)
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS tr_subscriptions_stay")
    else:
        conn.exec_driver_sql("ALTER TABLE subscriptions DISABLE TRIGGER tr_subscriptions_stay")
    done = [_merge_group(conn, ids) for ids in groups.values()]
    if sqlite:
        conn.exec_driver_sql(SQLITE_STAY)
    else:
        conn.exec_driver_sql("ALTER TABLE subscriptions ENABLE TRIGGER tr_subscriptions_stay")
    return done


def upgrade() -> None:
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    key_type = "VARCHAR(320)" if sqlite else 'VARCHAR(320) COLLATE "C"'
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "subscription_aliases",
        sa.Column(
            "token",
            sa.String(64).with_variant(sa.String(64, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("subscription_id", big, nullable=False),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name="fk_subscription_aliases_subscription_id_subscriptions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token", name="pk_subscription_aliases"),
    )
    op.create_index(
        "ix_subscription_aliases_subscription_id", "subscription_aliases", ["subscription_id"]
    )
    op.execute(f"ALTER TABLE subscribers ADD COLUMN email_key {key_type}")
    merged = merge_case_variants(conn)
    for line in merged[:LOGGED]:
        log.warning("migration 0011: %s", line)
    if len(merged) > LOGGED:
        log.warning("migration 0011: ... and %d more", len(merged) - LOGGED)
    if merged:
        log.warning(
            "migration 0011: %d group(s) of case variants merged, each recorded as a "
            "`merged` event",
            len(merged),
        )
    op.execute("UPDATE subscribers SET email_key = lower(email)")
    if sqlite:
        op.execute("CREATE UNIQUE INDEX uq_subscribers_email_key ON subscribers (email_key)")
    else:
        op.execute("ALTER TABLE subscribers ALTER COLUMN email_key SET NOT NULL")
        op.execute(
            "ALTER TABLE subscribers ADD CONSTRAINT uq_subscribers_email_key UNIQUE (email_key)"
        )
        op.execute("ALTER TABLE subscribers DROP CONSTRAINT uq_subscribers_email")


def downgrade() -> None:
    # The merges are not undone: the readers they joined were one person.
    op.drop_table("subscription_aliases")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP INDEX uq_subscribers_email_key")
        op.execute("ALTER TABLE subscribers DROP COLUMN email_key")
    else:
        op.execute("ALTER TABLE subscribers ADD CONSTRAINT uq_subscribers_email UNIQUE (email)")
        op.drop_column("subscribers", "email_key")
