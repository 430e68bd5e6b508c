"""Migration 0011 on both databases: readers that were case variants of one address become
one reader per list, nothing about them is lost, and the log names ids, never addresses."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from newsletter import subscriptions
from newsletter.db import make_engine, make_sessionmaker, upgrade
from tests.conftest import PG_ADMIN_URL, service_unavailable

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TS = sa.DateTime(timezone=True)


def _at(days: int) -> datetime:
    return T0 + timedelta(days=days)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own (the session's is at head already)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    name = f"newsletter_mig_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_unavailable("PostgreSQL", exc)
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _table(name: str, *columns: tuple[str, Any]) -> sa.TableClause:
    return sa.table(name, *(sa.column(c, t) for c, t in columns))


LISTS = _table("lists", ("id", sa.Integer), ("slug", sa.String), ("name", sa.String),
               ("from_address", sa.String), ("created_at", TS))  # fmt: skip
SUBSCRIBERS = _table("subscribers", ("id", sa.Integer), ("email", sa.String),
                     ("name", sa.String), ("attributes", sa.JSON), ("created_at", TS))  # fmt: skip
SUBSCRIPTIONS = _table("subscriptions", ("id", sa.Integer), ("subscriber_id", sa.Integer),
                       ("list_id", sa.Integer), ("status", sa.String), ("token", sa.String),
                       ("paused", sa.Boolean), ("soft_bounces", sa.Integer),
                       ("created_at", TS), ("updated_at", TS), ("confirmed_at", TS),
                       ("unsubscribed_at", TS))  # fmt: skip
EVENTS = _table("events", ("id", sa.Integer), ("created_at", TS), ("kind", sa.String),
                ("source", sa.String), ("subscriber_id", sa.Integer),
                ("list_id", sa.Integer), ("detail", sa.String))  # fmt: skip
ISSUES = _table("issues", ("id", sa.Integer), ("list_id", sa.Integer), ("subject", sa.String),
                ("status", sa.String), ("html", sa.Text), ("text", sa.Text),
                ("nonce", sa.String), ("created_at", TS),
                ("consecutive_failures", sa.Integer))  # fmt: skip
DELIVERIES = _table("deliveries", ("id", sa.Integer), ("issue_id", sa.Integer),
                    ("subscriber_id", sa.Integer), ("status", sa.String),
                    ("attempts", sa.Integer))  # fmt: skip
BOUNCES = _table("bounce_events", ("id", sa.Integer), ("key", sa.String), ("kind", sa.String),
                 ("source", sa.String), ("outcome", sa.String), ("created_at", TS),
                 ("subscription_id", sa.Integer))  # fmt: skip


def _sub(
    id: int, reader: int, list_id: int, status: str, created: int, **more: Any
) -> dict[str, Any]:
    row = {"id": id, "subscriber_id": reader, "list_id": list_id, "status": status,
           "token": f"tok{id}", "paused": False, "soft_bounces": 0, "created_at": _at(created),
           "updated_at": _at(created), "confirmed_at": None, "unsubscribed_at": None}  # fmt: skip
    row.update(more)
    return row


def _old_world(conn: sa.Connection) -> None:
    """Three capitalisations of one address on three lists, and a reader of their own."""
    conn.execute(sa.insert(LISTS), [
        {"id": i, "slug": f"l{i}", "name": f"L{i}", "from_address": "d@example.org",
         "created_at": T0} for i in (1, 2, 3)])  # fmt: skip
    conn.execute(sa.insert(SUBSCRIBERS), [
        {"id": 1, "email": "Dup@example.org", "name": "Dee", "attributes": {"city": "Oslo"},
         "created_at": _at(1)},
        {"id": 2, "email": "dup@example.org", "name": None,
         "attributes": {"city": "Rome", "lang": "it"}, "created_at": _at(2)},
        {"id": 3, "email": "DUP@example.org", "name": "Shout", "attributes": None,
         "created_at": _at(3)},
        {"id": 4, "email": "solo@example.org", "name": "Solo", "attributes": None,
         "created_at": _at(1)},
    ])  # fmt: skip
    conn.execute(sa.insert(SUBSCRIPTIONS), [
        # list 1: active as Dup@, but unsubscribed as dup@ (whose consent came first)
        _sub(10, 1, 1, "active", 5, confirmed_at=_at(5)),
        _sub(11, 2, 1, "unsubscribed", 2, confirmed_at=_at(2), unsubscribed_at=_at(6)),
        # list 2: only dup@, pending
        _sub(12, 2, 2, "pending", 3, soft_bounces=2),
        # list 3: active as Dup@, pending (and paused) as DUP@
        _sub(13, 1, 3, "active", 4, confirmed_at=_at(4)),
        _sub(14, 3, 3, "pending", 7, paused=True),
        _sub(15, 4, 1, "active", 1, confirmed_at=_at(1)),
    ])  # fmt: skip
    conn.execute(sa.insert(EVENTS), [
        {"id": 100 + i, "created_at": _at(i), "kind": "subscribed", "source": "page",
         "subscriber_id": i, "list_id": 1, "detail": None} for i in (1, 2, 3, 4)])  # fmt: skip
    conn.execute(sa.insert(ISSUES), [
        {"id": i, "list_id": 1, "subject": "S", "status": "sent", "html": "", "text": "",
         "nonce": "n", "created_at": T0, "consecutive_failures": 0} for i in (1, 2)])  # fmt: skip
    conn.execute(sa.insert(DELIVERIES), [
        {"id": 1, "issue_id": 1, "subscriber_id": 1, "status": "sent", "attempts": 1},
        {"id": 2, "issue_id": 1, "subscriber_id": 2, "status": "sent", "attempts": 1},
        {"id": 3, "issue_id": 2, "subscriber_id": 3, "status": "sent", "attempts": 1},
    ])  # fmt: skip
    conn.execute(sa.insert(BOUNCES), [
        {"id": 1, "key": "k1", "kind": "soft", "source": "dsn", "outcome": "counted",
         "created_at": T0, "subscription_id": 14}])  # fmt: skip


def test_the_migration_merges_case_variants_into_one_reader_per_list(
    empty_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(empty_url)
    try:
        upgrade(engine, "0009")
        with engine.begin() as conn:
            _old_world(conn)
        with caplog.at_level(logging.WARNING, logger="newsletter.migrations"):
            upgrade(engine)

        with engine.connect() as conn:
            readers = conn.execute(
                text("SELECT id, email, email_key, name, attributes FROM subscribers ORDER BY id")
            ).all()
            subs = conn.execute(
                sa.select(SUBSCRIPTIONS.c.id, SUBSCRIPTIONS.c.subscriber_id,
                          SUBSCRIPTIONS.c.list_id, SUBSCRIPTIONS.c.status,
                          SUBSCRIPTIONS.c.token, SUBSCRIPTIONS.c.paused,
                          SUBSCRIPTIONS.c.soft_bounces, SUBSCRIPTIONS.c.created_at,
                          SUBSCRIPTIONS.c.confirmed_at).order_by(SUBSCRIPTIONS.c.id)
            ).all()  # fmt: skip
            events = conn.execute(
                text("SELECT subscriber_id, kind, source, detail FROM events ORDER BY id")
            ).all()
            deliveries = conn.execute(
                text("SELECT id, subscriber_id FROM deliveries ORDER BY id")
            ).all()
            bounce = conn.execute(text("SELECT subscription_id FROM bounce_events")).scalar()

        assert [(r.id, r.email, r.email_key, r.name) for r in readers] == [
            (1, "Dup@example.org", "dup@example.org", "Dee"),
            (4, "solo@example.org", "solo@example.org", "Solo"),
        ]
        attributes = readers[0].attributes
        attributes = (
            attributes if isinstance(attributes, dict) else __import__("json").loads(attributes)
        )
        assert attributes == {"city": "Oslo", "lang": "it"}
        assert [tuple(s[:7]) for s in subs] == [
            (11, 1, 1, "unsubscribed", "tok11", False, 0),  # the earliest consent, moved
            (12, 1, 2, "pending", "tok12", False, 2),
            (13, 1, 3, "pending", "tok13", True, 0),  # pending wins over active; paused
            (15, 4, 1, "active", "tok15", False, 0),
        ]
        assert subs[0].created_at.replace(tzinfo=None) == _at(2).replace(tzinfo=None)
        assert subs[0].confirmed_at.replace(tzinfo=None) == _at(2).replace(tzinfo=None)
        assert subs[2].confirmed_at.replace(tzinfo=None) == _at(4).replace(tzinfo=None)
        # Every event stays, now the one reader's; the merge is an event of its own.
        assert sorted((e.subscriber_id, e.kind) for e in events) == [
            (1, "merged"), (1, "subscribed"), (1, "subscribed"), (1, "subscribed"),
            (4, "subscribed"),
        ]  # fmt: skip
        [merge] = [e for e in events if e.kind == "merged"]
        assert merge.source == "migration" and "@" not in merge.detail
        assert "merged subscriber(s) 2, 3 into 1" in merge.detail
        # Issue 1 went to Dup@ and dup@ (both copies happened): one keeps the reader, the
        # other none; issue 2's copy to DUP@ is now the reader's.
        assert deliveries == [(1, 1), (2, None), (3, 1)]
        assert bounce == 13  # the bounce of DUP@'s subscription names the one that stayed

        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "merged subscriber(s) 2, 3 into 1" in logged and "1 group(s)" in logged
        assert "@" not in logged

        # One identity from now on: the database refuses a second capitalisation, the
        # code finds the reader by any, and subscriptions still cannot move.
        with engine.connect() as conn, pytest.raises(IntegrityError):
            conn.execute(
                text("INSERT INTO subscribers (email, email_key, created_at) "
                     "VALUES ('dUP@example.org', 'dup@example.org', :t)"), {"t": T0}
            )  # fmt: skip
        with make_sessionmaker(engine)() as s:
            found = subscriptions.find_subscriber(s, "DUP@EXAMPLE.ORG")
            assert found is not None and found.id == 1
            # Links mailed to a subscription that was merged away act on the one that stayed.
            for token, stays in (("tok10", 11), ("tok14", 13), ("tok11", 11), ("tok15", 15)):
                assert subscriptions.subscription_by_token(s, token).id == stays
        with engine.connect() as conn, pytest.raises(DBAPIError):
            conn.execute(text("UPDATE subscriptions SET subscriber_id = 4 WHERE id = 12"))
        # Erasing the reader takes the aliases of their tokens too.
        with make_sessionmaker(engine)() as s, s.begin():
            subscriptions.erase_subscriber(s, "dup@example.org", suppression_key="k", source="t")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM subscription_aliases")).scalar() == 0
    finally:
        engine.dispose()


def test_the_migration_without_variants_changes_no_reader(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        upgrade(engine, "0009")
        with engine.begin() as conn:
            conn.execute(sa.insert(SUBSCRIBERS), [
                {"id": 1, "email": "A@example.org", "name": None, "attributes": None,
                 "created_at": T0},
                {"id": 2, "email": "b@example.org", "name": None, "attributes": None,
                 "created_at": T0},
            ])  # fmt: skip
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, email, email_key FROM subscribers")).all()
            merged = conn.execute(text("SELECT COUNT(*) FROM events")).scalar()
        assert sorted(rows) == [(1, "A@example.org", "a@example.org"),
                                (2, "b@example.org", "b@example.org")]  # fmt: skip
        assert merged == 0
    finally:
        engine.dispose()


def test_the_subscribers_model_matches_the_migration_on_postgresql(pg_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from newsletter.models import Base

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert [
        d
        for d in diff
        if any(t in repr(d) for t in ("'subscribers'", "email", "'subscription_aliases'"))
    ] == []
