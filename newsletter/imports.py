"""The CSV import into a list: load the file's rows into a temporary table, refuse what
may not be imported, merge the rest, set-based, in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.orm import Session

from newsletter.errors import InvalidInput, NotFound
from newsletter.import_rows import (
    ImportRows,
    _copy_texts,
    _ImportTokens,
    _suppression_hasher,
    parse_csv,
)
from newsletter.models import SubscriptionStatus, utcnow
from newsletter.subscriptions import get_list
from newsletter.suppression import SUPPRESSED_ROW


@dataclass
class ImportReport:
    imported: int = 0  # new subscriptions
    updated: int = 0  # readers already on the list whose name changed or who were confirmed
    unchanged: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    # Rows whose address an earlier row of the file had in another capitalisation: the
    # same reader (address_key), so the earlier row stands for both.
    folded: int = 0

    def summary(self) -> str:
        folded = f"folded {self.folded}, " if self.folded else ""
        return (
            f"imported {self.imported}, updated {self.updated}, unchanged {self.unchanged}, "
            f"{folded}rejected {len(self.rejected)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "folded": self.folded,
            "rejected": [{"line": line, "reason": reason} for line, reason in self.rejected],
        }


# Readers who left a list: an import does not put them back (only they can).
_LEFT = "('unsubscribed', 'bounced', 'complained')"


def import_csv(
    session: Session,
    stream: IO[str],
    list_slug: str,
    *,
    confirmed: bool = False,
    strict: bool = False,
    suppression_key: str,
    source: str = "import",
    name: str = "import.csv",
    helpers: int = 0,
) -> ImportReport:
    """Validate every row, then import the good ones set-based, in the caller's transaction.

    Every check (the row itself, duplicates in the file, erased or suppressed addresses,
    readers who left the list) is made before anything is written, so with strict=True any
    bad row raises InvalidInput and nothing is written at all. On PostgreSQL, `helpers`
    forked processes read and check the rows (see import_helpers and _copy_texts); the
    result is the same as without them.
    """
    mlist = get_list(session, list_slug)
    rows = parse_csv(stream, name)
    status = SubscriptionStatus.ACTIVE if confirmed else SubscriptionStatus.PENDING
    report = ImportReport()
    _bulk_import(
        session, mlist.id, rows, status, report, source, suppression_key, strict, name, helpers
    )
    report.rejected.sort()
    return report


def _refuse_strict(name: str, report: ImportReport) -> None:
    report.rejected.sort()
    line, reason = report.rejected[0]
    raise InvalidInput(
        f"{name}: {len(report.rejected)} bad row(s), nothing imported "
        f"(first: line {line}: {reason})"
    )


# The identities that occur more than once in the file, with the line of their first row.
_REPEATED = (
    "SELECT email_key, MIN(line) AS first_line FROM nl_import "
    "GROUP BY email_key HAVING COUNT(*) > 1"
)
# The file's table: each row's identity is address_key(email), which for the ASCII addresses
# normalize_email lets through is SQL's lower() on both databases.
_IMPORT_KEY = "email_key TEXT GENERATED ALWAYS AS (lower(email)) STORED"


ANALYZE_AFTER = 10_000  # rows imported at once


def _bulk_import(
    session: Session,
    list_id: int,
    rows: ImportRows,
    status: SubscriptionStatus,
    report: ImportReport,
    source: str,
    suppression_key: str,
    strict: bool,
    name: str,
    helpers: int,
) -> None:
    """Stream the rows into a temporary table (COPY on PostgreSQL) and let the database do
    the rest in a handful of set-based statements: per-row round trips and per-row ORM
    work are what make naive imports take minutes.

    Order: load; drop repeated, then erased or suppressed addresses; find who is already a
    subscriber and who left this list; refuse (strict) or write. Every check comes before
    the first write. On PostgreSQL the new subscribers' ids are drawn from their sequence
    while loading (tokens are made in Python), so that their subscribers and subscriptions
    rows are two plain INSERT ... SELECTs from the file's table, with no join back from
    what was inserted; the import itself is one event (migration 0009). What remains is
    the database's own per-row work: heap rows and index entries, and, for readers who
    were there before, one set-based check of the subscriptions' parents (migrations 0006
    and 0007; benchmarks/bench_import.py).
    """
    conn = session.connection()
    pg = conn.dialect.name == "postgresql"
    now = utcnow()
    ts = DateTime(timezone=True)
    confirming = status == SubscriptionStatus.ACTIVE

    # Only this module's constant SQL fragments are interpolated into statements (S608).
    def sql(statement: str, **params: Any) -> Any:
        stamps = [k for k in ("now", "confirmed_at") if f":{k}" in statement]
        used = {k: v for k, v in params.items() if f":{k}" in statement}
        return conn.execute(
            text(statement).bindparams(*[bindparam(k, type_=ts) for k in stamps]), used
        )

    sql("DROP TABLE IF EXISTS nl_import")
    sql("DROP TABLE IF EXISTS nl_known")
    if pg:
        # The list stays while the import runs (a deletion waits for it to end), as the
        # trigger's lock would keep it for each statement; the import's new readers are
        # its own. Together they let the new readers' subscriptions skip that trigger.
        if sql("SELECT id FROM lists WHERE id = :list FOR KEY SHARE", list=list_id).first() is None:
            raise NotFound(f"the list was deleted while {name} was being read")
        # Room for the statements' hashes of a million rows (the default 4 MB spills them
        # to disk; 2.7 s less for a million rows); given back at the end.
        work_mem = sql("SELECT current_setting('work_mem')").scalar_one()
        sql("SELECT set_config('work_mem', '64MB', true)")
    tokens = _ImportTokens()
    if pg:
        sequence = sql("SELECT pg_get_serial_sequence('subscribers', 'id')").scalar_one()
        quoted = "'" + sequence.replace("'", "''") + "'"
        sql(
            "CREATE TEMPORARY TABLE nl_import (line INTEGER NOT NULL, email TEXT NOT NULL, "
            "name TEXT, attributes TEXT, token TEXT NOT NULL, email_hash TEXT NOT NULL, "
            f"new_id BIGINT NOT NULL DEFAULT nextval({quoted}), {_IMPORT_KEY})"
        )
        raw: Any = conn.connection.driver_connection
        with (
            raw.cursor() as cursor,
            cursor.copy(
                "COPY nl_import (line, email, name, attributes, token, email_hash) "
                "FROM STDIN (NULL '')"
            ) as copy,
        ):
            for data in _copy_texts(rows, tokens, suppression_key, helpers):
                copy.write(data)
        sql("ANALYZE nl_import")
    else:
        sql(
            "CREATE TEMPORARY TABLE nl_import (line INTEGER NOT NULL, email TEXT NOT NULL, "
            "name TEXT, attributes TEXT, token TEXT NOT NULL, email_hash TEXT NOT NULL, "
            f"{_IMPORT_KEY})"
        )
        email_hash = _suppression_hasher(suppression_key)
        for chunk in rows.chunks():
            conn.exec_driver_sql(
                "INSERT INTO nl_import (line, email, name, attributes, token, email_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (*row, token, email_hash(row[1]))
                    for row, token in zip(chunk, tokens.take(len(chunk)), strict=True)
                ],
            )
    rejected = report.rejected
    rejected.extend(rows.rejected)

    # Erased or suppressed: every row of such an address says so, whatever its case.
    suppressed = sql(
        "DELETE FROM nl_import WHERE email_hash IN (SELECT email_hash FROM suppressions) "
        "RETURNING line"
    ).all()
    rejected.extend((line, SUPPRESSED_ROW) for (line,) in suppressed)

    # A repeated reader: the first row counts. A row repeating an earlier one exactly is
    # rejected; one in another capitalisation is the same reader, folded into it.
    if pg:
        duplicates = sql(
            f"DELETE FROM nl_import d USING ({_REPEATED}) f, nl_import o "  # noqa: S608
            "WHERE d.email_key = f.email_key AND d.line > f.first_line AND o.line = f.first_line "
            "RETURNING d.line, f.first_line, d.email, o.email"
        ).all()
    else:
        repeats = (
            f"SELECT d.line, f.first_line, d.email, o.email FROM nl_import d JOIN ({_REPEATED}) f "  # noqa: S608
            "ON d.email_key = f.email_key JOIN nl_import o ON o.line = f.first_line "
            "WHERE d.line > f.first_line"
        )
        duplicates = sql(repeats).all()
        if duplicates:
            sql(f"DELETE FROM nl_import WHERE line IN (SELECT line FROM ({repeats}) r)")  # noqa: S608
    rejected.extend(
        (line, f"duplicate of line {first} ({email})")
        for line, first, email, first_email in duplicates
        if email == first_email
    )
    report.folded += sum(1 for _l, _f, email, first_email in duplicates if email != first_email)

    # Who is a subscriber already, and their subscription to this list if any.
    sql(
        "CREATE TEMPORARY TABLE nl_known (line INTEGER NOT NULL, name TEXT, token TEXT NOT NULL,"
        " subscriber_id BIGINT NOT NULL, renamed INTEGER NOT NULL, subscription_id BIGINT,"
        " status VARCHAR(20))"
    )
    sql(
        "INSERT INTO nl_known SELECT i.line, i.name, i.token, s.id, "
        "CASE WHEN i.name IS NOT NULL AND (s.name IS NULL OR s.name <> i.name) THEN 1 ELSE 0 END,"
        " sub.id, sub.status FROM nl_import i JOIN subscribers s ON s.email_key = i.email_key "
        "LEFT JOIN subscriptions sub ON sub.subscriber_id = s.id AND sub.list_id = :list",
        list=list_id,
    )
    left = sql(
        "SELECT k.line, i.email, k.status FROM nl_known k "  # noqa: S608
        f"JOIN nl_import i ON i.line = k.line WHERE k.status IN {_LEFT}"
    ).all()
    rejected.extend((line, f"{email} is {current}; not re-added") for line, email, current in left)

    if strict and rejected:
        _refuse_strict(name, report)

    # Rows of people who are on the list and did not leave: a new name, pending -> active.
    updated = sql(
        f"SELECT COUNT(*) FROM nl_known k WHERE k.status NOT IN {_LEFT} "  # noqa: S608
        "AND (k.renamed = 1 OR (k.status = 'pending' AND :confirming = 1))",
        confirming=int(confirming),
    ).scalar_one()
    sql(
        "UPDATE subscribers SET name = k.name FROM nl_known k "  # noqa: S608
        "WHERE subscribers.id = k.subscriber_id AND k.renamed = 1 "
        f"AND (k.status IS NULL OR k.status NOT IN {_LEFT})"
    )
    if confirming:
        sql(
            "INSERT INTO events (created_at, kind, source, subscriber_id, list_id, detail) "
            "SELECT :now, 'confirmed', :source, k.subscriber_id, :list, NULL FROM nl_known k "
            "WHERE k.status = 'pending'",
            now=now,
            source=source,
            list=list_id,
        )
        sql(
            "UPDATE subscriptions SET status = 'active', confirmed_at = :now, updated_at = :now "
            "WHERE id IN (SELECT subscription_id FROM nl_known WHERE status = 'pending')",
            now=now,
        )

    # New subscriptions: for new people, and for known people not yet on this list.
    # Each statement reads the temporary tables, none reads what another wrote (one
    # statement with RETURNING chaining them measured 10-20% slower at a million rows).
    new_people = "WHERE NOT EXISTS (SELECT 1 FROM nl_known k WHERE k.line = i.line)"
    if pg:  # the ids were drawn from the subscribers' sequence while loading
        sql(
            "INSERT INTO subscribers (id, email, email_key, name, attributes, created_at) "  # noqa: S608
            "SELECT i.new_id, i.email, i.email_key, i.name, CAST(i.attributes AS JSON), :now "
            f"FROM nl_import i {new_people}",
            now=now,
        )
        person, new_rows = "i.new_id", f"nl_import i {new_people}"
    else:
        sql(
            "INSERT INTO subscribers (email, email_key, name, attributes, created_at) "  # noqa: S608
            "SELECT i.email, i.email_key, i.name, i.attributes, :now "
            f"FROM nl_import i {new_people}",
            now=now,
        )
        person = "s.id"
        new_rows = f"nl_import i JOIN subscribers s ON s.email_key = i.email_key {new_people}"
    # One `imported` event for the whole import, which each subscription it adds names
    # (migration 0009): a row per reader was a million identical rows. Its detail gets the
    # count once it is known; an import that adds nobody leaves no event.
    event = sql(
        "INSERT INTO events (created_at, kind, source, subscriber_id, list_id, detail) "
        "VALUES (:now, 'imported', :source, NULL, :list, NULL) RETURNING id",
        now=now,
        source=source,
        list=list_id,
    ).scalar_one()
    imported = 0
    for who, token, rows_from, created_here in (
        (person, "i.token", new_rows, True),
        ("k.subscriber_id", "k.token", "nl_known k WHERE k.subscription_id IS NULL", False),
    ):
        # Readers created above, by this transaction, and a list locked at the start: the
        # parents trigger has nothing to lock or find (migration 0007). Readers who were
        # there before take the trigger's path, lock included.
        held = pg and created_here
        if held:
            sql("SELECT set_config('newsletter.parents_held', 'on', true)")
        imported += sql(
            "INSERT INTO subscriptions (subscriber_id, list_id, status, token, soft_bounces, "  # noqa: S608
            "paused, created_at, updated_at, confirmed_at, import_event_id) "
            f"SELECT {who}, :list, :status, {token}, 0, :paused, :now, :now, :confirmed_at, "
            f":event FROM {rows_from}",
            list=list_id,
            status=status.value,
            paused=False,
            now=now,
            confirmed_at=now if confirming else None,
            event=event,
        ).rowcount
        if held:
            sql("SELECT set_config('newsletter.parents_held', 'off', true)")
    if imported:
        shown = name if len(name) <= 400 else "..." + name[-397:]
        sql(
            "UPDATE events SET detail = :detail WHERE id = :event",
            detail=f"{imported} reader(s) from {shown} as {status.value}",
            event=event,
        )
    else:
        sql("DELETE FROM events WHERE id = :event", event=event)
    sql("DROP TABLE nl_known")
    sql("DROP TABLE nl_import")
    if pg:
        sql("SELECT set_config('work_mem', :value, true)", value=work_mem)
    if pg and imported >= ANALYZE_AFTER:
        # Fresh statistics for the freeze that usually follows a big import: without them
        # the planner guesses the list's size from before the import (~0.3 s at 1M).
        sql("ANALYZE subscriptions")
    report.imported += imported
    report.updated += updated
    report.unchanged += (
        rows.good - len(duplicates) - len(suppressed) - len(left) - imported - updated
    )
