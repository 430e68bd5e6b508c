"""CSV import beyond one chunk, on SQLite and PostgreSQL: what lands in the database (and
what does not) when files are larger than the import's working set, repeat addresses, or
hold values that need escaping on their way through COPY."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from sqlalchemy import ColumnElement, func, select

from newsletter import import_rows, imports, subscriptions
from newsletter.errors import InvalidInput
from newsletter.models import Event, Subscriber, Subscription, SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.suppression import SUPPRESSED_ROW

KEY = "test-secret-key"
ROWS = import_rows._CHUNK_ROWS * 2 + 17  # three chunks
# Read by this process alone, and by two helper processes in blocks of 4 KB (PostgreSQL; on
# SQLite the rows are read here either way).
HELPED = pytest.mark.parametrize("helpers", [0, 2], ids=["alone", "helpers"])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(import_rows, "_BLOCK_CHARS", 4096)


@pytest.fixture
def rt(db_url: str, make_runtime: Callable[..., Runtime]) -> Runtime:
    rt = make_runtime(db_url)
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
    return rt


def count(rt: Runtime, model: type, *where: ColumnElement[bool]) -> int:
    with rt.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def do_import(
    rt: Runtime, data: str, list_slug: str = "world", key: str = KEY, **kw: object
) -> imports.ImportReport:
    with rt.sessions() as s, s.begin():
        return imports.import_csv(
            s,
            import_rows.read_text_stream(data.encode("utf-8"), "in.csv"),
            list_slug,
            suppression_key=key,
            name="in.csv",
            **kw,  # type: ignore[arg-type]
        )


def many(n: int = ROWS, start: int = 0) -> str:
    return "".join(f"reader{i}@example.org,Reader {i}\n" for i in range(start, start + n))


@HELPED
def test_strict_import_of_several_chunks_with_a_bad_last_row_writes_nothing(
    rt: Runtime, helpers: int
) -> None:
    data = "email,name\n" + many() + "not-an-address,Last\n"
    with pytest.raises(InvalidInput, match=rf"1 bad row\(s\), nothing imported .*line {ROWS + 2}"):
        do_import(rt, data, strict=True, confirmed=True, helpers=helpers)
    assert count(rt, Subscriber) == count(rt, Subscription) == count(rt, Event) == 0
    # Without --strict the same file imports every good row.
    report = do_import(rt, data, confirmed=True, helpers=helpers)
    assert (report.imported, report.rejected) == (ROWS, [(ROWS + 2, report.rejected[0][1])])
    assert count(rt, Subscription, Subscription.status == SubscriptionStatus.ACTIVE) == ROWS
    assert count(rt, Event, Event.kind == "imported") == 1  # the import, once
    assert count(rt, Subscription, Subscription.import_event_id.is_not(None)) == ROWS


@HELPED
def test_strict_refuses_a_repeated_address_even_chunks_apart(rt: Runtime, helpers: int) -> None:
    data = "email,name\n" + many() + "reader3@EXAMPLE.org,Again\n"
    with pytest.raises(InvalidInput, match=r"nothing imported \(first: line .*duplicate of line 5"):
        do_import(rt, data, strict=True, helpers=helpers)
    assert count(rt, Subscriber) == count(rt, Event) == 0


@HELPED
def test_repeats_in_the_file_keep_the_first_row(rt: Runtime, helpers: int) -> None:
    data = (
        "email,name\n"
        "Ann@example.org,Ann Upper\n"  # line 2: the form the reader typed is kept
        "ann@example.org,Ann Lower\n"  # line 3: the same mailbox in another case: folded
        + many()
        + "ann@EXAMPLE.ORG,Ann Again\n"  # folded too: one identity, whatever the case
        "Ann@Example.Org,Ann Twice\n"  # repeat of line 2 (domains are normalised)
    )
    report = do_import(rt, data, helpers=helpers)
    last = ROWS + 4
    assert report.rejected == [(last + 1, "duplicate of line 2 (Ann@example.org)")]
    assert (report.imported, report.updated, report.unchanged) == (ROWS + 1, 0, 0)
    assert report.folded == 2
    with rt.sessions() as s:
        query = select(Subscriber.email, Subscriber.name).where(Subscriber.email_key.like("ann@%"))
        names = {email: name for email, name in s.execute(query)}
    assert names == {"Ann@example.org": "Ann Upper"}


@HELPED
def test_values_that_need_escaping_arrive_unchanged(rt: Runtime, helpers: int) -> None:
    data = (
        "email,name,note\n"
        'tab@example.org,Tab\there,"quote "" and \\ backslash"\n'
        "plain@example.org,Zoë Ünïcode,東京\n"
        "o'neil+news@example.org,,\n"
    )
    assert do_import(rt, data, helpers=helpers).imported == 3
    with rt.sessions() as s:
        people = {p.email: p for p in s.scalars(select(Subscriber))}
    assert people["tab@example.org"].name == "Tab\there"
    assert people["tab@example.org"].attributes == {"note": 'quote " and \\ backslash'}
    assert people["plain@example.org"].name == "Zoë Ünïcode"
    assert people["plain@example.org"].attributes == {"note": "東京"}
    assert people["o'neil+news@example.org"].name is None
    assert people["o'neil+news@example.org"].attributes is None


@HELPED
def test_imported_tokens_are_random_and_distinct(rt: Runtime, helpers: int) -> None:
    do_import(rt, "email\n" + "".join(f"t{i}@example.org\n" for i in range(ROWS)), helpers=helpers)
    with rt.sessions() as s:
        tokens = list(s.scalars(select(Subscription.token).order_by(Subscription.id)))
    assert len(tokens) == len(set(tokens)) == ROWS
    # A counting prefix (the index is filled at its end), then 96 random bits, URL-safe.
    assert all(re.fullmatch(r"[0-9a-f]{16}[A-Za-z0-9_-]{16}", t) for t in tokens)
    assert len({t[16:] for t in tokens}) == ROWS
    assert tokens == sorted(tokens)


def test_reimport_counts_each_row_once_and_leaves_who_left_alone(rt: Runtime) -> None:
    do_import(rt, "email,name\nstay@example.org,Stay\nleft@example.org,Left\n", confirmed=True)
    with rt.sessions() as s, s.begin():
        subscriptions.unsubscribe(s, "left@example.org", "world", source="page")
        subscriptions.create_list(s, "other", "Other", "Desk <desk@example.org>")
    data = (
        "email,name\n"
        "stay@example.org,Stay Renamed\n"  # on the list: updated
        "left@example.org,Left Renamed\n"  # left the list: rejected, untouched
        "new@example.org,New\n"  # imported
    )
    report = do_import(rt, data)
    assert (report.imported, report.updated, report.unchanged) == (1, 1, 0)
    assert report.rejected == [(3, "left@example.org is unsubscribed; not re-added")]
    with rt.sessions() as s:
        names = {e: n for e, n in s.execute(select(Subscriber.email, Subscriber.name))}
    assert names["left@example.org"] == "Left"
    assert names["stay@example.org"] == "Stay Renamed"
    # Known people joining another list (one of them with a new name) are imported there,
    # once each: not also counted as updated.
    report = do_import(rt, data.replace("Stay Renamed", "Stay Again"), list_slug="other")
    assert (report.imported, report.updated, report.unchanged, report.rejected) == (3, 0, 0, [])
    assert count(rt, Subscriber) == 3
    # One event per import that added someone, named by what it added.
    assert count(rt, Event, Event.kind == "imported") == 3
    with rt.sessions() as s:
        added = s.execute(
            select(Event.detail, func.count(Subscription.id))
            .join(Subscription, Subscription.import_event_id == Event.id)
            .group_by(Event.detail)
        ).all()
    assert sorted(added) == [
        ("1 reader(s) from in.csv as pending", 1),
        ("2 reader(s) from in.csv as active", 2),
        ("3 reader(s) from in.csv as pending", 3),
    ]


def test_erased_addresses_stay_out_with_a_long_key(rt: Runtime) -> None:
    key = "k" * 100  # longer than SHA-256's block: HMAC hashes the key first
    do_import(rt, "email\ngone@example.org\nkept@example.org\n", key=key)
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(s, "gone@example.org", suppression_key=key, source="cli")
    report = do_import(rt, "email\nkept@example.org\nGone@Example.org\ngone@EXAMPLE.org\n", key=key)
    # Suppression is case-blind on the whole address (the hash is of the lower-cased form).
    assert report.rejected == [
        (3, SUPPRESSED_ROW),
        (4, SUPPRESSED_ROW),
    ]
    assert (report.imported, report.unchanged) == (0, 1)
