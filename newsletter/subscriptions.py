"""Lists and subscriptions: create, add, import, export, unsubscribe, erase.

Functions take an open Session and flush but never commit: the caller (CLI command, web
request, task) owns the transaction, so a failure anywhere rolls back everything.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import DateTime, bindparam, func, insert, select, text
from sqlalchemy.orm import Session

from newsletter.addresses import InvalidAddress, check_text, normalize_email, parse_from_address
from newsletter.errors import Conflict, InvalidInput, NotFound
from newsletter.models import (
    Article,
    Event,
    Issue,
    IssueArticle,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    Suppression,
    sections_key,
    sections_of,
    utcnow,
)

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def new_token() -> str:
    """The opaque per-subscription value that links carry (signed) instead of an address."""
    return secrets.token_urlsafe(16)


def suppression_hash(email: str, key: str) -> str:
    """Keyed hash kept after erasure, so that the address stays out without being stored."""
    return hmac.new(key.encode(), email.lower().encode(), hashlib.sha256).hexdigest()


def log_event(
    session: Session,
    kind: str,
    source: str,
    *,
    subscriber_id: int | None,
    list_id: int | None,
    detail: str | None = None,
) -> None:
    session.add(
        Event(
            kind=kind,
            source=source,
            subscriber_id=subscriber_id,
            list_id=list_id,
            detail=detail[:500] if detail else None,
        )
    )


# --- lists ---


def create_list(
    session: Session, slug: str, name: str, from_address: str, reply_to: str | None = None
) -> MailingList:
    if not SLUG.match(slug):
        raise InvalidInput(
            f"invalid list slug {slug!r}: use lower-case letters, digits and '-' (max 63)"
        )
    check_text(name, "list name")
    if not name.strip():
        raise InvalidInput("list name is empty")
    display, addr = parse_from_address(from_address)
    reply = parse_from_address(reply_to)[1] if reply_to else None
    if session.scalar(select(MailingList.id).where(MailingList.slug == slug)) is not None:
        raise Conflict(f"list {slug!r} already exists")
    mlist = MailingList(
        slug=slug,
        name=name.strip(),
        from_address=f"{display} <{addr}>" if display else addr,
        reply_to=reply,
    )
    session.add(mlist)
    session.flush()
    return mlist


def get_list(session: Session, slug: str) -> MailingList:
    mlist = session.scalar(select(MailingList).where(MailingList.slug == slug))
    if mlist is None:
        raise NotFound(f"unknown list {slug!r}")
    return mlist


def list_counts(session: Session) -> list[tuple[MailingList, dict[str, int]]]:
    rows = session.execute(
        select(Subscription.list_id, Subscription.status, func.count()).group_by(
            Subscription.list_id, Subscription.status
        )
    ).all()
    counts: dict[int, dict[str, int]] = {}
    for list_id, status, n in rows:
        counts.setdefault(list_id, {})[SubscriptionStatus(status).value] = n
    lists = session.scalars(select(MailingList).order_by(MailingList.slug)).all()
    return [(m, counts.get(m.id, {})) for m in lists]


# --- single subscriber ---


def is_suppressed(session: Session, email: str, key: str) -> bool:
    h = suppression_hash(email, key)
    return session.scalar(select(Suppression.id).where(Suppression.email_hash == h)) is not None


def add_subscriber(
    session: Session,
    email: str,
    list_slug: str,
    *,
    name: str | None = None,
    confirmed: bool = False,
    source: str = "operator",
    suppression_key: str,
) -> Subscription:
    """Add (or update) one subscriber on a list.

    Someone who unsubscribed, bounced or complained is not put back by an operator: they
    must resubscribe themselves, which is what consent means.
    """
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    if name is not None:
        name = check_text(name.strip(), "name") or None
    if is_suppressed(session, address, suppression_key):
        raise Conflict(f"{address} was erased or suppressed and cannot be added again")
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if subscriber is None:
        subscriber = Subscriber(email=address, name=name)
        session.add(subscriber)
        session.flush()
    elif name:
        subscriber.name = name
    sub = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber.id, Subscription.list_id == mlist.id
        )
    )
    now = utcnow()
    if sub is None:
        status = SubscriptionStatus.ACTIVE if confirmed else SubscriptionStatus.PENDING
        sub = Subscription(
            subscriber_id=subscriber.id,
            list_id=mlist.id,
            status=status,
            token=new_token(),
            soft_bounces=0,
            paused=False,
            created_at=now,
            updated_at=now,
            confirmed_at=now if confirmed else None,
        )
        session.add(sub)
        session.flush()
        log_event(
            session,
            "subscribed" if not confirmed else "confirmed",
            source,
            subscriber_id=subscriber.id,
            list_id=mlist.id,
        )
        return sub
    if sub.status in (
        SubscriptionStatus.UNSUBSCRIBED,
        SubscriptionStatus.BOUNCED,
        SubscriptionStatus.COMPLAINED,
    ):
        raise Conflict(
            f"{address} is {sub.status.value} on {list_slug!r}; only the reader can resubscribe"
        )
    if confirmed and sub.status == SubscriptionStatus.PENDING:
        sub.status = SubscriptionStatus.ACTIVE
        sub.confirmed_at = sub.updated_at = now
        log_event(session, "confirmed", source, subscriber_id=subscriber.id, list_id=mlist.id)
    session.flush()
    return sub


def find_subscription(session: Session, email: str, list_slug: str) -> Subscription:
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    sub = session.scalar(
        select(Subscription)
        .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
        .where(Subscriber.email == address, Subscription.list_id == mlist.id)
    )
    if sub is None:
        raise NotFound(f"{address} is not on list {list_slug!r}")
    return sub


def set_status(
    session: Session, sub: Subscription, status: SubscriptionStatus, source: str
) -> bool:
    """The one transition function for subscription status. Returns False if unchanged."""
    if sub.status == status:
        return False
    now = utcnow()
    previous = sub.status
    sub.status = status
    sub.updated_at = now
    if status == SubscriptionStatus.ACTIVE:
        sub.confirmed_at = sub.confirmed_at or now
        sub.unsubscribed_at = None
    elif status in (
        SubscriptionStatus.UNSUBSCRIBED,
        SubscriptionStatus.BOUNCED,
        SubscriptionStatus.COMPLAINED,
    ):
        sub.unsubscribed_at = now
    kind = {
        SubscriptionStatus.ACTIVE: "confirmed" if previous == "pending" else "resubscribed",
        SubscriptionStatus.UNSUBSCRIBED: "unsubscribed",
        SubscriptionStatus.BOUNCED: "bounced",
        SubscriptionStatus.COMPLAINED: "complained",
        SubscriptionStatus.PENDING: "pending",
    }[status]
    log_event(session, kind, source, subscriber_id=sub.subscriber_id, list_id=sub.list_id)
    session.flush()
    return True


def unsubscribe(session: Session, email: str, list_slug: str, *, source: str) -> bool:
    sub = find_subscription(session, email, list_slug)
    return set_status(session, sub, SubscriptionStatus.UNSUBSCRIBED, source)


def erase_subscriber(session: Session, email: str, *, suppression_key: str, source: str) -> int:
    """Remove every personal datum of an address; keep a keyed hash so it stays out."""
    address = normalize_email(email)
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if subscriber is None:
        raise NotFound(f"{address} is not a subscriber")
    h = suppression_hash(address, suppression_key)
    if session.scalar(select(Suppression.id).where(Suppression.email_hash == h)) is None:
        session.add(Suppression(email_hash=h, reason="erased"))
    n = len(
        session.scalars(
            select(Subscription.id).where(Subscription.subscriber_id == subscriber.id)
        ).all()
    )
    log_event(session, "erased", source, subscriber_id=None, list_id=None)
    session.delete(subscriber)  # subscriptions cascade; deliveries and events keep no link
    session.flush()
    return n


# --- CSV import ----------------------------------------------------------------------------


@dataclass
class ImportReport:
    imported: int = 0  # new subscriptions
    updated: int = 0  # existing subscribers whose name or status changed
    unchanged: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def summary(self) -> str:
        return (
            f"imported {self.imported}, updated {self.updated}, unchanged {self.unchanged}, "
            f"rejected {len(self.rejected)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": [{"line": line, "reason": reason} for line, reason in self.rejected],
        }


@dataclass(frozen=True)
class _Row:
    line: int
    email: str
    name: str | None
    attributes: dict[str, str] | None


_BAD_CELL = re.compile(r"[\r\n\x00]")


def parse_csv(stream: IO[str], source: str) -> tuple[list[_Row], list[tuple[int, str]]]:
    """Validate every row; return the good rows and (line, reason) for each bad one.

    A file whose structure is broken (no header, no email column, unterminated quote) is one
    error for the whole file.
    """
    reader = csv.reader(stream, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput(f"{source}: the file is empty") from None
    except csv.Error as exc:
        raise InvalidInput(f"{source}: line 1: {exc}") from None
    columns = [h.strip().lower() for h in header]
    if "email" not in columns:
        raise InvalidInput(f"{source}: the header row has no 'email' column")
    if len(set(columns)) != len(columns):
        raise InvalidInput(f"{source}: the header row repeats a column name")
    email_at = columns.index("email")
    name_at = columns.index("name") if "name" in columns else None
    extra = [(i, c) for i, c in enumerate(columns) if c not in ("email", "name") and c]
    good: list[_Row] = []
    bad: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InvalidInput(f"{source}: line {reader.line_num}: {exc}") from None
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue  # blank lines are not rows
        if len(cells) > len(columns):
            bad.append((line, f"{len(cells)} fields where the header has {len(columns)}"))
            continue
        cells += [""] * (len(columns) - len(cells))
        if any(_BAD_CELL.search(c) for c in cells):
            bad.append((line, "a field contains a line break or NUL"))
            continue
        raw_email = cells[email_at].strip()
        if not raw_email:
            bad.append((line, "missing email"))
            continue
        try:
            email = normalize_email(raw_email)
            name = check_text(cells[name_at].strip(), "name") if name_at is not None else ""
        except InvalidAddress as exc:
            bad.append((line, str(exc)))
            continue
        first = seen.get(email)
        if first is not None:
            bad.append((line, f"duplicate of line {first} ({email})"))
            continue
        seen[email] = line
        attributes = {col: cells[i] for i, col in extra if cells[i] != ""} or None
        good.append(_Row(line, email, name or None, attributes))
    return good, bad


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
) -> ImportReport:
    """Validate every row, then import the good ones set-based, in the caller's transaction.

    With strict=True any bad row aborts the import and nothing is written (rows refused
    because of their current state, such as an unsubscribed reader, raise after the writes,
    so the caller's rollback undoes them).
    """
    mlist = get_list(session, list_slug)
    rows, rejected = parse_csv(stream, name)
    report = ImportReport(rejected=rejected)
    if strict and rejected:
        _refuse_strict(name, report)
    if rows:
        status = SubscriptionStatus.ACTIVE if confirmed else SubscriptionStatus.PENDING
        _bulk_import(session, mlist.id, rows, status, report, source, suppression_key)
    report.rejected.sort()
    if strict and report.rejected:
        _refuse_strict(name, report)
    return report


def _refuse_strict(name: str, report: ImportReport) -> None:
    report.rejected.sort()
    line, reason = report.rejected[0]
    raise InvalidInput(
        f"{name}: {len(report.rejected)} bad row(s), nothing imported "
        f"(first: line {line}: {reason})"
    )


_LEFT = ("unsubscribed", "bounced", "complained")


def _bulk_import(
    session: Session,
    list_id: int,
    rows: Sequence[_Row],
    status: SubscriptionStatus,
    report: ImportReport,
    source: str,
    suppression_key: str,
) -> None:
    """Load the rows into a temporary table (COPY on PostgreSQL) and let the database do
    the rest in a handful of set-based statements: per-row round trips and per-row ORM
    work are what make naive imports take minutes."""
    conn = session.connection()
    pg = conn.dialect.name == "postgresql"
    now = utcnow()
    ts = DateTime(timezone=True)

    def sql(statement: str, **params: Any) -> Any:
        binds = [bindparam(k, type_=ts) for k in params if k in ("now", "confirmed_at")]
        return conn.execute(text(statement).bindparams(*binds), params)

    sql("DROP TABLE IF EXISTS nl_import")
    sql(
        "CREATE TEMPORARY TABLE nl_import (line INTEGER NOT NULL, email VARCHAR(320) NOT NULL,"
        " name VARCHAR(200), attributes TEXT, email_hash VARCHAR(64) NOT NULL)"
    )
    loaded = (
        (
            r.line,
            r.email,
            r.name,
            json.dumps(r.attributes, ensure_ascii=False) if r.attributes else None,
            suppression_hash(r.email, suppression_key),
        )
        for r in rows
    )
    if pg:
        raw: Any = conn.connection.driver_connection
        with (
            raw.cursor() as cursor,
            cursor.copy(
                "COPY nl_import (line, email, name, attributes, email_hash) FROM STDIN"
            ) as copy,
        ):
            for row in loaded:
                copy.write_row(row)
        sql("ANALYZE nl_import")
    else:
        conn.exec_driver_sql("INSERT INTO nl_import VALUES (?, ?, ?, ?, ?)", list(loaded))

    for (line,) in sql(
        "DELETE FROM nl_import WHERE email_hash IN (SELECT email_hash FROM suppressions) "
        "RETURNING line"
    ):
        report.rejected.append((line, "address was erased or suppressed"))

    attributes = "CAST(i.attributes AS JSON)" if pg else "i.attributes"
    # Only the dialect's constant cast/token expression is interpolated below (S608).
    sql(
        "INSERT INTO subscribers (email, name, attributes, created_at) "  # noqa: S608
        f"SELECT i.email, i.name, {attributes}, :now FROM nl_import i "
        "WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email = i.email)",
        now=now,
    )
    renamed = {
        sid
        for (sid,) in sql(
            "UPDATE subscribers SET name = i.name FROM nl_import i "
            "WHERE subscribers.email = i.email AND i.name IS NOT NULL "
            "AND (subscribers.name IS NULL OR subscribers.name <> i.name) "
            "RETURNING subscribers.id"
        )
    }
    for line, email, current in sql(
        "SELECT i.line, i.email, sub.status FROM nl_import i "
        "JOIN subscribers s ON s.email = i.email "
        "JOIN subscriptions sub ON sub.subscriber_id = s.id AND sub.list_id = :list "
        "WHERE sub.status IN ('unsubscribed', 'bounced', 'complained')",
        list=list_id,
    ):
        report.rejected.append((line, f"{email} is {current}; not re-added"))

    confirmed_ids: set[int] = set()
    if status == SubscriptionStatus.ACTIVE:
        confirmed_ids = {
            sid
            for (sid,) in sql(
                "UPDATE subscriptions SET status = 'active', confirmed_at = :now, "
                "updated_at = :now WHERE list_id = :list AND status = 'pending' "
                "AND subscriber_id IN (SELECT s.id FROM subscribers s "
                "JOIN nl_import i ON i.email = s.email) RETURNING subscriber_id",
                now=now,
                list=list_id,
            )
        }
        if confirmed_ids:
            session.execute(
                insert(Event),
                [
                    {
                        "kind": "confirmed",
                        "source": source,
                        "subscriber_id": sid,
                        "list_id": list_id,
                        "created_at": now,
                    }
                    for sid in confirmed_ids
                ],
            )

    token = (
        "replace(CAST(gen_random_uuid() AS TEXT), '-', '')" if pg else "lower(hex(randomblob(16)))"
    )
    imported = sql(
        "INSERT INTO subscriptions (subscriber_id, list_id, status, token, soft_bounces, paused,"  # noqa: S608
        " created_at, updated_at, confirmed_at) "
        f"SELECT s.id, :list, :status, {token}, 0, :paused, :now, :now, :confirmed_at "
        "FROM nl_import i JOIN subscribers s ON s.email = i.email "
        "WHERE NOT EXISTS (SELECT 1 FROM subscriptions x "
        "WHERE x.subscriber_id = s.id AND x.list_id = :list)",
        list=list_id,
        status=status.value,
        paused=False,
        now=now,
        confirmed_at=now if status == SubscriptionStatus.ACTIVE else None,
    ).rowcount
    if imported:
        sql(
            "INSERT INTO events (created_at, kind, source, subscriber_id, list_id, detail) "
            "SELECT :now, 'imported', :source, sub.subscriber_id, :list, :status "
            "FROM subscriptions sub WHERE sub.list_id = :list AND sub.created_at = :now",
            now=now,
            source=source,
            list=list_id,
            status=status.value,
        )
    left = sum(1 for _line, reason in report.rejected if reason.endswith("; not re-added"))
    suppressed = sum(1 for _l, r in report.rejected if r == "address was erased or suppressed")
    existing_ids = {
        sid
        for (sid,) in sql(
            "SELECT s.id FROM subscribers s JOIN nl_import i ON i.email = s.email "
            "WHERE s.created_at <> :now",
            now=now,
        )
    }
    report.imported += imported
    report.updated += len((renamed & existing_ids) | confirmed_ids)
    report.unchanged += len(rows) - suppressed - imported - left - report.updated
    sql("DROP TABLE nl_import")


# --- export and listing ---

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection): prefix a quote to risky cells."""
    return "'" + value if value.startswith(_FORMULA_START) else value


EXPORT_COLUMNS = ("email", "name", "status", "subscribed_at", "confirmed_at")


def iter_subscriptions(
    session: Session,
    list_slug: str,
    *,
    status: SubscriptionStatus | None = None,
    after_id: int = 0,
    limit: int | None = None,
) -> Iterator[tuple[Subscription, Subscriber]]:
    """Keyset-paged walk over a list's subscriptions (never loads the list into memory)."""
    mlist = get_list(session, list_slug)
    page = 2000 if limit is None else min(limit, 2000)
    remaining = limit
    last = after_id
    while remaining is None or remaining > 0:
        query = (
            select(Subscription, Subscriber)
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(Subscription.list_id == mlist.id, Subscription.id > last)
            .order_by(Subscription.id)
            .limit(page if remaining is None else min(page, remaining))
        )
        if status is not None:
            query = query.where(Subscription.status == status)
        batch = session.execute(query).all()
        if not batch:
            return
        yield from batch
        last = batch[-1][0].id
        if remaining is not None:
            remaining -= len(batch)


def export_csv(session: Session, list_slug: str, out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(EXPORT_COLUMNS)
    n = 0
    for sub, person in iter_subscriptions(session, list_slug):
        writer.writerow(
            [
                csv_safe(person.email),
                csv_safe(person.name or ""),
                sub.status.value,
                sub.created_at.isoformat() if sub.created_at else "",
                sub.confirmed_at.isoformat() if sub.confirmed_at else "",
            ]
        )
        n += 1
    return n


def read_text_stream(data: bytes, source: str) -> io.StringIO:
    """Decode an uploaded CSV (UTF-8, with or without BOM) or fail with one clear line."""
    try:
        return io.StringIO(data.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{source}: not UTF-8 (byte {exc.start})") from None


# --- preferences ---


def subscription_by_token(session: Session, token: str) -> Subscription:
    """The subscription a (verified) link token names."""
    sub = session.scalar(select(Subscription).where(Subscription.token == token))
    if sub is None:
        raise NotFound("this link does not match any subscription")
    return sub


def list_sections(session: Session, list_id: int) -> list[str]:
    """The sections a list has carried: those of the articles in its issues."""
    return sorted(
        session.scalars(
            select(Article.section)
            .join(IssueArticle, IssueArticle.article_id == Article.id)
            .join(Issue, Issue.id == IssueArticle.issue_id)
            .where(Issue.list_id == list_id)
            .distinct()
        )
    )


def chosen_sections(sub: Subscription) -> list[str] | None:
    """The reader's section choice; None means every section (also future ones)."""
    return sections_of(sub.sections)


def set_preferences(
    session: Session,
    sub: Subscription,
    *,
    name: str | None,
    sections: list[str] | None,
    paused: bool,
    source: str,
) -> None:
    """Update a reader's name, section choice (None: all) and pause flag, logging changes."""
    if name is not None:
        name = check_text(name.strip(), "name") or None
        person = session.get(Subscriber, sub.subscriber_id)
        if person is not None and person.name != name:
            person.name = name
    if sections is not None:
        for section in sections:
            check_text(section, "section")
    key = sections_key(sections)
    changes = []
    if key != sub.sections:
        sub.sections = key
        changes.append(
            "sections=" + ("all" if key is None else ", ".join(sections or []) or "none")
        )
    if paused != sub.paused:
        sub.paused = paused
        changes.append("paused" if paused else "resumed")
    if changes:
        sub.updated_at = utcnow()
        log_event(
            session,
            "preferences",
            source,
            subscriber_id=sub.subscriber_id,
            list_id=sub.list_id,
            detail="; ".join(changes),
        )
    session.flush()


# --- the public subscribe form (double opt-in) ---


def request_subscription(
    session: Session,
    list_slug: str,
    email: str,
    *,
    name: str | None,
    sections: list[str] | None,
    suppression_key: str,
    source: str = "page",
) -> Subscription | None:
    """Record a reader's request to join a list; confirmation by link comes later.

    Returns the subscription a confirmation email should go to, or None when none should:
    the address is already active, complained, or was erased. The caller answers the same
    in every case, so the form cannot tell who subscribes. Nothing that a stranger could
    abuse changes: an existing reader's name is never touched, and a reader who left stays
    out until they confirm the new link (only their section choice is recorded).
    """
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    if name is not None:
        name = check_text(name.strip(), "name") or None
    for section in sections or []:
        check_text(section, "section")
    if is_suppressed(session, address, suppression_key):
        return None
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if subscriber is None:
        subscriber = Subscriber(email=address, name=name)
        session.add(subscriber)
        session.flush()
    sub = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber.id, Subscription.list_id == mlist.id
        )
    )
    now = utcnow()
    if sub is None:
        sub = Subscription(
            subscriber_id=subscriber.id,
            list_id=mlist.id,
            status=SubscriptionStatus.PENDING,
            token=new_token(),
            sections=sections_key(sections),
            soft_bounces=0,
            paused=False,
            created_at=now,
            updated_at=now,
        )
        session.add(sub)
        session.flush()
        log_event(session, "subscribed", source, subscriber_id=subscriber.id, list_id=mlist.id)
        return sub
    if sub.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.COMPLAINED):
        return None
    key = sections_key(sections)
    if key != sub.sections:
        sub.sections = key
        sub.updated_at = now
    session.flush()
    return sub
