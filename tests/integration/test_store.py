"""The subscription store on SQLite and PostgreSQL: lists, subscribers, CSV import/export."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from newsletter import import_rows, imports, subscriptions
from newsletter.errors import Conflict, InvalidInput, NotFound
from newsletter.models import Event, MailingList, Subscriber, Subscription, SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.suppression import SUPPRESSED_ROW

KEY = "test-secret-key"


@pytest.fixture
def rt(db_url: str, make_runtime: Callable[..., Runtime]) -> Runtime:
    rt = make_runtime(db_url)
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
    return rt


def count(rt: Runtime, model: type, *where: object) -> int:
    with rt.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def do_import(rt: Runtime, data: str, **kw: object) -> imports.ImportReport:
    with rt.sessions() as s, s.begin():
        return imports.import_csv(
            s,
            import_rows.read_text_stream(data.encode("utf-8"), "in.csv"),
            "world",
            suppression_key=KEY,
            name="in.csv",
            **kw,  # type: ignore[arg-type]
        )


def test_lists_refuse_duplicates_and_bad_input(rt: Runtime) -> None:
    with rt.sessions() as s, s.begin(), pytest.raises(Conflict, match="already exists"):
        subscriptions.create_list(s, "world", "Again", "desk@example.org")
    with rt.sessions() as s, s.begin(), pytest.raises(InvalidInput, match="slug"):
        subscriptions.create_list(s, "Bad Slug", "X", "desk@example.org")
    with rt.sessions() as s, s.begin(), pytest.raises(InvalidInput):
        subscriptions.create_list(s, "ok", "X", "Desk <desk@example.org>\r\nBcc: x@y.org")
    with rt.sessions() as s, pytest.raises(NotFound, match="unknown list 'nope'"):
        subscriptions.get_list(s, "nope")


def test_one_mailbox_is_one_reader_whatever_its_case(rt: Runtime) -> None:
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(s, "Ada@Example.COM", "world", suppression_key=KEY)
        subscriptions.add_subscriber(s, "Ada@example.com", "world", suppression_key=KEY)
        subscriptions.add_subscriber(s, "ada@example.com", "world", suppression_key=KEY)
    with rt.sessions() as s:
        people = s.execute(select(Subscriber.email, Subscriber.email_key)).all()
    # The first form typed stays (domain normalised), for display and the envelope.
    assert people == [("Ada@example.com", "ada@example.com")]


def test_operator_cannot_resubscribe_someone_who_left(rt: Runtime) -> None:
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(
            s, "left@example.org", "world", confirmed=True, suppression_key=KEY
        )
        assert subscriptions.unsubscribe(s, "left@example.org", "world", source="page")
    with rt.sessions() as s, s.begin(), pytest.raises(Conflict, match="unsubscribed"):
        subscriptions.add_subscriber(
            s, "left@example.org", "world", confirmed=True, suppression_key=KEY
        )
    assert count(rt, Event, Event.kind == "unsubscribed", Event.source == "page") == 1


def test_import_reports_every_bad_row_and_keeps_the_good(rt: Runtime) -> None:
    data = (
        "\ufeffEmail,Name,City\n"  # BOM and a capitalised header
        "ann@example.org,Ann,Oslo\n"  # line 2 ok
        "not-an-address,Bob,\n"  # line 3 invalid
        "ann@EXAMPLE.org,Ann again,\n"  # line 4 duplicate of line 2
        '"eve@example.org","Eve\r\nBcc: x@evil.test",\n'  # lines 5-6: CR/LF in a field
        ",No Email,\n"  # line 7 missing email
        "nul@example.org,Nu\x00l,\n"  # line 8 NUL
        "zoe@example.org,Zoë,Zürich\n"  # line 9 ok, non-ASCII
    )
    report = do_import(rt, data)
    assert (report.imported, report.updated) == (2, 0)
    reasons = dict(report.rejected)
    assert sorted(reasons) == [3, 4, 6, 7, 8]
    assert "invalid email" in reasons[3]
    assert "duplicate of line 2" in reasons[4]
    assert "line break or NUL" in reasons[6]
    assert reasons[7] == "missing email"
    assert "line break or NUL" in reasons[8]
    with rt.sessions() as s:
        people = {p.email: p for p in s.scalars(select(Subscriber))}
    assert set(people) == {"ann@example.org", "zoe@example.org"}
    assert people["zoe@example.org"].name == "Zoë"
    assert people["ann@example.org"].attributes == {"city": "Oslo"}
    assert count(rt, Subscription, Subscription.status == SubscriptionStatus.PENDING) == 2


def test_strict_import_writes_nothing_when_a_row_is_bad(rt: Runtime) -> None:
    with pytest.raises(InvalidInput, match=r"nothing imported .*line 3"):
        do_import(rt, "email\na@example.org\nbroken\n", strict=True)
    assert count(rt, Subscriber) == 0
    assert count(rt, Event) == 0


def test_broken_csv_structure_is_one_error_and_writes_nothing(rt: Runtime) -> None:
    with pytest.raises(InvalidInput, match=r"in\.csv"):
        do_import(rt, 'email,name\na@example.org,"unterminated\n')
    with pytest.raises(InvalidInput, match="no 'email' column"):
        do_import(rt, "mail,name\na@example.org,A\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        import_rows.read_text_stream(b"email\n\xff\xfe@x.org\n", "in.csv")
    assert count(rt, Subscriber) == 0


def test_reimport_updates_names_and_confirms_pending(rt: Runtime) -> None:
    do_import(rt, "email,name\na@example.org,A\nb@example.org,B\n")
    report = do_import(rt, "email,name\na@example.org,Alice\nb@example.org,B\n", confirmed=True)
    assert (report.imported, report.updated, report.unchanged) == (0, 2, 0)
    assert count(rt, Subscription, Subscription.status == SubscriptionStatus.ACTIVE) == 2
    report = do_import(rt, "email,name\na@example.org,Alice\n", confirmed=True)
    assert (report.imported, report.updated, report.unchanged) == (0, 0, 1)


def test_import_of_ten_thousand_rows_in_one_go(rt: Runtime) -> None:
    n = 10_017
    rows = "\n".join(f"user{i}@example.org,User {i}" for i in range(n))
    report = do_import(rt, "email,name\n" + rows + "\n", confirmed=True)
    assert report.imported == n and not report.rejected
    assert count(rt, Subscription, Subscription.status == SubscriptionStatus.ACTIVE) == n
    # One event records the import; every subscription it added names it.
    with rt.sessions() as s:
        event = s.scalars(select(Event).where(Event.kind == "imported")).one()
        linked = s.scalar(
            select(func.count())
            .select_from(Subscription)
            .where(Subscription.import_event_id == event.id)
        )
    assert (event.detail, event.source, event.subscriber_id) == (
        f"{n} reader(s) from in.csv as active",
        "import",
        None,
    )
    assert linked == n
    # An import that adds nobody records nothing.
    assert do_import(rt, "email\nuser1@example.org\n", confirmed=True).imported == 0
    assert count(rt, Event, Event.kind == "imported") == 1


def test_export_defuses_spreadsheet_formulas(rt: Runtime) -> None:
    do_import(
        rt,
        'email,name\nx@example.org,"=HYPERLINK(""http://evil.test"")"\n'
        "y@example.org,+1 555\nz@example.org,@SUM(A1)\nw@example.org,-2\n",
    )
    out = io.StringIO()
    with rt.sessions() as s:
        assert subscriptions.export_csv(s, "world", out) == 4
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    names = {r["email"]: r["name"] for r in rows}
    assert names["x@example.org"].startswith("'=")
    assert names["y@example.org"] == "'+1 555"
    assert names["z@example.org"] == "'@SUM(A1)"
    assert names["w@example.org"] == "'-2"


def test_erased_address_stays_out_of_later_imports(rt: Runtime) -> None:
    do_import(rt, "email,name\ngone@example.org,Gone\n", confirmed=True)
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(
            s, "gone@example.org", suppression_key=KEY, source="operator"
        )
    assert count(rt, Subscriber) == 0
    report = do_import(rt, "email\ngone@example.org\n", confirmed=True)
    assert report.imported == 0
    assert report.rejected == [(2, SUPPRESSED_ROW)]


def test_the_event_log_forgets_erased_readers_and_deleted_lists(rt: Runtime) -> None:
    """`events` has no foreign keys; triggers do what their ON DELETE did: an erased reader's
    events stay, without the reader; a deleted list's events go with it, and so do the
    subscriptions that named its import events."""
    do_import(rt, "email\ngone@example.org\nstays@example.org\n", confirmed=True)
    with rt.sessions() as s, s.begin():
        other_id = subscriptions.create_list(s, "local", "Local", "desk@example.org").id
        for email in ("stays@example.org", "gone@example.org"):  # an event naming each
            subscriptions.add_subscriber(
                s, email, "local", confirmed=True, source="api", suppression_key=KEY
            )
        gone_id = s.scalar(select(Subscriber.id).where(Subscriber.email == "gone@example.org"))
    assert count(rt, Event, Event.subscriber_id == gone_id) == 1
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(
            s, "gone@example.org", suppression_key=KEY, source="operator"
        )
    assert count(rt, Event, Event.subscriber_id == gone_id) == 0
    # Kept without the reader: the two confirmations on `local` are still there.
    assert count(rt, Event, Event.kind == "confirmed", Event.list_id == other_id) == 2
    # The import's record stays: it names nobody, and says how many it added.
    assert count(rt, Event, Event.kind == "imported", Event.detail.startswith("2 reader")) == 1
    with rt.sessions() as s, s.begin():
        data = import_rows.read_text_stream(b"email\nnew@example.org\n", "local.csv")
        imports.import_csv(s, data, "local", suppression_key=KEY, name="local.csv")
    local_events = count(rt, Event, Event.list_id == other_id)
    assert local_events >= 2
    with rt.sessions() as s, s.begin():
        s.delete(s.get(MailingList, other_id))
    assert count(rt, Event, Event.list_id == other_id) == 0
    assert count(rt, Subscription, Subscription.list_id == other_id) == 0
    assert count(rt, Event, Event.kind == "imported") == 1  # the other list's log is intact


def _subscribe_row(conn: Connection, subscriber_id: int, list_id: int, token: str) -> None:
    conn.execute(
        text(
            "INSERT INTO subscriptions (subscriber_id, list_id, status, token, paused, "
            "soft_bounces, created_at, updated_at) "
            "VALUES (:s, :l, 'active', :t, false, 0, :now, :now)"
        ),
        {"s": subscriber_id, "l": list_id, "t": token, "now": datetime.now(UTC)},
    )


def test_a_subscription_needs_its_reader_and_list_and_goes_with_them(rt: Runtime) -> None:
    """No foreign keys on `subscriptions` (an import inserts a million at once); triggers
    refuse what the keys refused and delete what their ON DELETE CASCADE deleted."""
    do_import(rt, "email\nann@example.org\n", confirmed=True)
    with rt.sessions() as s:
        ann = s.scalars(select(Subscription)).one()
    with rt.sessions() as s, s.begin():
        local_id = subscriptions.create_list(s, "local", "Local", "desk@example.org").id
    for subscriber_id, list_id in (
        (ann.subscriber_id + 1000, ann.list_id),
        (ann.subscriber_id, 999),
    ):
        with rt.engine.connect() as conn, pytest.raises(IntegrityError, match="does not exist"):
            _subscribe_row(conn, subscriber_id, list_id, "orphan")
    with rt.engine.connect() as conn, pytest.raises(IntegrityError, match="cannot be moved"):
        conn.execute(
            text("UPDATE subscriptions SET list_id = :l WHERE id = :id"),
            {"l": local_id, "id": ann.id},
        )
    with rt.engine.connect() as conn:  # other columns change freely
        conn.execute(
            text("UPDATE subscriptions SET status = 'unsubscribed', list_id = list_id"), {}
        )
        conn.commit()
    assert count(rt, Subscription) == 1
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(s, "ann@example.org", "local", suppression_key=KEY)
    assert count(rt, Subscription, Subscription.subscriber_id == ann.subscriber_id) == 2
    with rt.sessions() as s, s.begin():
        s.delete(s.get(MailingList, local_id))
    assert count(rt, Subscription) == 1
    with rt.sessions() as s, s.begin():
        subscriptions.erase_subscriber(s, "ann@example.org", suppression_key=KEY, source="t")
    assert count(rt, Subscription) == 0


def test_an_erasure_and_a_subscription_to_the_same_reader_do_not_cross(
    pg_url: str, make_runtime: Callable[..., Runtime]
) -> None:
    """What a foreign key's check guaranteed under concurrency, kept by the trigger's lock:
    a reader erased while a subscription to them is being added either waits for it and
    then takes it along, or comes first and makes the insert fail. Never an orphan."""
    rt = make_runtime(pg_url)  # SQLite has one writer at a time: nothing interleaves
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "desk@example.org")
    do_import(rt, "email\nann@example.org\nbob@example.org\n", confirmed=True)
    with rt.sessions() as s, s.begin():
        local_id = subscriptions.create_list(s, "local", "Local", "desk@example.org").id
        ids = {email: id_ for email, id_ in s.execute(select(Subscriber.email, Subscriber.id))}
    ann, bob = ids["ann@example.org"], ids["bob@example.org"]
    timeout = text("SET LOCAL lock_timeout = '300ms'")

    # The insert comes first: the erasure waits for it, then deletes the new subscription too.
    with rt.engine.connect() as adding, rt.engine.connect() as erasing:
        _subscribe_row(adding, ann, local_id, "ann-local")
        erasing.execute(timeout)
        with pytest.raises(OperationalError, match="lock timeout"):
            erasing.execute(text("DELETE FROM subscribers WHERE id = :id"), {"id": ann})
        erasing.rollback()
        adding.commit()
        erasing.execute(text("DELETE FROM subscribers WHERE id = :id"), {"id": ann})
        erasing.commit()
    assert count(rt, Subscription, Subscription.subscriber_id == ann) == 0

    # The erasure comes first: the insert waits for it, then fails.
    with rt.engine.connect() as adding, rt.engine.connect() as erasing:
        erasing.execute(text("DELETE FROM subscribers WHERE id = :id"), {"id": bob})
        adding.execute(timeout)
        with pytest.raises(OperationalError, match="lock timeout"):
            _subscribe_row(adding, bob, local_id, "bob-local")
        adding.rollback()
        erasing.commit()
        with pytest.raises(IntegrityError, match="does not exist"):
            _subscribe_row(adding, bob, local_id, "bob-local")
    assert count(rt, Subscription) == 0
    with rt.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM subscribers")) == 0


def test_an_import_holds_its_list_and_the_readers_it_did_not_create(
    pg_url: str, make_runtime: Callable[..., Runtime]
) -> None:
    """The import's new readers skip the parents trigger (migration 0007): it created them,
    and it locked its list itself. What that trigger guarded still holds: while the import's
    transaction is open, deleting the list or erasing a reader who was there before waits
    for it; the setting is off again for whatever the transaction does next; afterwards,
    deleting the list takes everything the import added along."""
    rt = make_runtime(pg_url)
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "desk@example.org")
        local_id = subscriptions.create_list(s, "local", "Local", "desk@example.org").id
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(s, "bob@example.org", "local", suppression_key=KEY)
    with rt.sessions() as s:
        bob = s.scalar(select(Subscriber.id).where(Subscriber.email == "bob@example.org"))
    timeout = text("SET LOCAL lock_timeout = '300ms'")

    # Only new readers (the list's lock is the import's own), then a reader who was there.
    for data, waits in (
        (b"email\nann@example.org\n", text("DELETE FROM lists WHERE slug = 'world'")),
        (b"email\nbob@example.org\n", text(f"DELETE FROM subscribers WHERE id = {bob}")),
    ):
        with rt.sessions() as importing, rt.engine.connect() as other:
            importing.begin()
            report = imports.import_csv(
                importing,
                import_rows.read_text_stream(data, "f"),
                "world",
                confirmed=True,
                suppression_key=KEY,
            )
            assert report.imported == 1
            with pytest.raises(IntegrityError, match="does not exist"), importing.begin_nested():
                _subscribe_row(importing.connection(), bob + 1000, local_id, "orphan")
            other.execute(timeout)
            with pytest.raises(OperationalError, match="lock timeout"):
                other.execute(waits)
            other.rollback()
            importing.commit()
    assert count(rt, Subscription) == 3
    with rt.sessions() as s, s.begin():
        s.delete(s.scalars(select(MailingList).where(MailingList.slug == "world")).one())
    assert count(rt, Subscription) == 1  # bob's on the local list


def test_a_reader_or_list_keeps_its_id(rt: Runtime) -> None:
    """Subscriptions name their reader and list by id, without foreign keys: changing a
    parent's id, which a key refused, is refused by a trigger."""
    do_import(rt, "email\nann@example.org\n", confirmed=True)
    for table in ("subscribers", "lists"):
        with rt.engine.connect() as conn, pytest.raises(IntegrityError, match="never changes"):
            conn.execute(text(f"UPDATE {table} SET id = id + 1000"))
    with rt.engine.begin() as conn:  # other columns change freely
        conn.execute(text("UPDATE subscribers SET name = 'Ann', id = id"))
    assert count(rt, Subscription, Subscription.subscriber_id.in_(select(Subscriber.id))) == 1
