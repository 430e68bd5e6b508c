"""Lists and subscriptions: create, add, import, export, unsubscribe, erase.

Functions take an open Session and flush but never commit: the caller (CLI command, web
request, task) owns the transaction, so a failure anywhere rolls back everything.
"""

from __future__ import annotations

import base64
import codecs
import csv
import io
import multiprocessing
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO, Any

from sqlalchemy import DateTime, bindparam, func, select, text, union_all
from sqlalchemy.orm import Session

from newsletter.addresses import (
    InvalidAddress,
    address_key,
    check_text,
    normalize_email,
    parse_from_address,
)
from newsletter.erasure import forget_address
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
    sections_key,
    sections_of,
    utcnow,
)
from newsletter.readers import find_subscriber, subscription_for_token
from newsletter.suppression import (
    ERASED,
    SUPPRESSED_ROW,
    hasher,
    lift,
    reason_for,
    refusal,
    suppress,
)
from newsletter.suppression import suppression_hash as suppression_hash  # re-exported

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def new_token() -> str:
    """The opaque per-subscription value that links carry (signed) instead of an address."""
    return secrets.token_urlsafe(16)


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
    suppressed = reason_for(session, address, suppression_key)
    if suppressed is not None:
        raise Conflict(refusal(address, suppressed))
    subscriber = find_subscriber(session, address)
    if subscriber is None:
        subscriber = Subscriber(email=address, name=name)
        session.add(subscriber)
        session.flush()
    # An existing reader keeps their name: only they change it (preferences page).
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
        .where(Subscriber.email_key == address_key(address), Subscription.list_id == mlist.id)
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
    subscriber = find_subscriber(session, address)
    if subscriber is None:
        raise NotFound(f"{address} is not a subscriber")
    suppress(session, address, suppression_key, ERASED)
    n = len(
        session.scalars(
            select(Subscription.id).where(Subscription.subscriber_id == subscriber.id)
        ).all()
    )
    # Replies, errors, reasons and event details that quote the address lose it.
    forget_address(session, address, [subscriber.id])
    log_event(session, "erased", source, subscriber_id=None, list_id=None)
    session.delete(subscriber)  # subscriptions cascade; deliveries and events keep no link
    session.flush()
    return n


# --- CSV import ----------------------------------------------------------------------------


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


# A row that passed validation, as it goes to the database:
# (line, email, name or None, the other columns as a JSON object or None).
_Row = tuple[int, str, str | None, str | None]
_Rejected = tuple[int, str]  # (line, reason)

_BAD_CELL = re.compile(r"[\r\n\x00]")
_CHUNK_ROWS = 5000  # rows per COPY write: memory stays flat, round trips stay few
# Readers who left a list: an import does not put them back (only they can).
_LEFT = "('unsubscribed', 'bounced', 'complained')"


@dataclass(frozen=True)
class _Columns:
    """What a row's cells mean (from the header): enough to check a row anywhere, in this
    process or in a helper process of a parallel import."""

    width: int
    email_at: int
    name_at: int | None
    extra: tuple[tuple[int, str], ...]  # (cell, '"key": ') of the attributes' columns

    def check(self, batch: list[tuple[int, list[str]]]) -> tuple[list[_Row], list[_Rejected]]:
        """The good rows of a batch of (line, cells), and (line, reason) for the bad ones."""
        width, email_at, name_at, extra = self.width, self.email_at, self.name_at, self.extra
        bad_cell = _BAD_CELL.search
        good: list[_Row] = []
        rejected: list[_Rejected] = []
        for line, cells in batch:
            if len(cells) != width or not cells[email_at].strip():
                if not cells or all(not c.strip() for c in cells):
                    continue  # blank lines are not rows
                if len(cells) > width:
                    rejected.append((line, f"{len(cells)} fields where the header has {width}"))
                    continue
                cells += [""] * (width - len(cells))
            if bad_cell("".join(cells)) is not None:
                rejected.append((line, "a field contains a line break or NUL"))
                continue
            if not cells[email_at].strip():
                rejected.append((line, "missing email"))
                continue
            try:
                email = normalize_email(cells[email_at])
                name = cells[name_at].strip() if name_at is not None else ""
                if "=?" in name or len(name) > 200:  # CR, LF and NUL are refused above
                    check_text(name, "name")
            except InvalidAddress as exc:
                rejected.append((line, str(exc)))
                continue
            attributes = None
            if extra:
                pairs = [key + encode_basestring(cells[i]) for i, key in extra if cells[i] != ""]
                if pairs:
                    attributes = "{" + ", ".join(pairs) + "}"
            good.append((line, email, name or None, attributes))
        return good, rejected


class ImportRows:
    """The rows of an import file, validated as they are read.

    One pass, a chunk at a time: a million-row file never exists as a million Python
    objects. A file whose structure is broken (no header, no email column, unterminated
    quote) is one error for the whole file; a bad row becomes (line, reason) in `rejected`.
    Duplicates within the file are left to the database (see _bulk_import): remembering
    every address here would take more memory than all the rest of the import.
    """

    def __init__(self, stream: IO[str], source: str) -> None:
        self.source = source
        self.rejected: list[_Rejected] = []
        self.good = 0  # rows yielded so far
        self.stream = stream
        self._reader = csv.reader(stream, strict=True)
        try:
            header = next(self._reader)
        except StopIteration:
            raise InvalidInput(f"{source}: the file is empty") from None
        except csv.Error as exc:
            raise InvalidInput(f"{source}: line 1: {exc}") from None
        columns = [h.strip().lower() for h in header]
        if columns:
            columns[0] = columns[0].removeprefix("\ufeff").strip()  # a BOM the caller kept
        if "email" not in columns:
            raise InvalidInput(f"{source}: the header row has no 'email' column")
        if len(set(columns)) != len(columns):
            raise InvalidInput(f"{source}: the header row repeats a column name")
        # The other columns become the subscriber's attributes, a JSON object written here
        # as json.dumps(..., ensure_ascii=False) would, without building a dict per row.
        self.columns = _Columns(
            width=len(columns),
            email_at=columns.index("email"),
            name_at=columns.index("name") if "name" in columns else None,
            extra=tuple(
                (i, encode_basestring(c) + ": ")
                for i, c in enumerate(columns)
                if c not in ("email", "name") and c
            ),
        )

    @property
    def lines_read(self) -> int:
        """Lines of the file read so far (the header's, until rows are read)."""
        return self._reader.line_num

    def batches(self, size: int = _CHUNK_ROWS) -> Iterator[list[tuple[int, list[str]]]]:
        """The file's rows unchecked, as (line, cells), `size` at a time."""
        reader = self._reader
        batch: list[tuple[int, list[str]]] = []
        try:
            for cells in reader:
                batch.append((reader.line_num, cells))
                if len(batch) >= size:
                    yield batch
                    batch = []
        except csv.Error as exc:
            raise InvalidInput(f"{self.source}: line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:  # a file that changed after open_text_file checked it
            raise InvalidInput(f"{self.source}: not UTF-8 (after line {reader.line_num})") from None
        if batch:
            yield batch

    def chunks(self, size: int = _CHUNK_ROWS) -> Iterator[list[_Row]]:
        """The good rows, `size` lines at a time; bad ones are appended to `rejected`."""
        for batch in self.batches(size):
            good, rejected = self.columns.check(batch)
            self.rejected += rejected
            if good:
                self.good += len(good)
                yield good


def parse_csv(stream: IO[str], source: str) -> ImportRows:
    """Read the header now (a broken one is an error at once) and the rows as they are used."""
    return ImportRows(stream, source)


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


class _ImportTokens:
    """The subscription tokens of one import (see new_token), in increasing byte order.

    Each is 16 hex digits that count up from the import's start time (seconds << 32) and 16
    base64url characters of 12 random bytes (96 bits) from the system's CSPRNG. Links carry
    them signed, so the counting part gives nothing away that a forger could use. In order,
    a million tokens go to the right-hand edge of the token's unique index instead of to a
    random leaf each: 3.6 s less for a million subscriptions (docs/benchmarks.md)."""

    def __init__(self, started: float | None = None) -> None:
        self._next = int(time.time() if started is None else started) << 32

    def take(self, n: int) -> list[str]:
        first, self._next = self._next, self._next + n
        return self.counting_from(first, n)

    def reserve(self, n: int) -> int:
        """Set aside n counts for tokens made elsewhere (counting_from), in this order."""
        first, self._next = self._next, self._next + n
        return first

    @staticmethod
    def counting_from(first: int, n: int) -> list[str]:
        blob = base64.urlsafe_b64encode(secrets.token_bytes(12 * n)).decode("ascii")
        return [f"{first + i:016x}{blob[16 * i : 16 * i + 16]}" for i in range(n)]


def _copy_text(chunk: list[_Row], tokens: list[str], email_hash: Callable[[str], str]) -> str:
    """The rows in COPY's text format, NULL written as an empty field (no value is empty).

    A value with a tab or a backslash needs escaping; rather than test each value, build
    the text and count: as many tabs as separators and no backslash means none has one.
    Rows with CR, LF or NUL never get this far.
    """
    rows = zip(chunk, tokens, strict=True)
    text = "".join(
        [
            f"{line}\t{email}\t{nm or ''}\t{attrs or ''}\t{token}\t{email_hash(email)}\n"
            for (line, email, nm, attrs), token in rows
        ]
    )
    if "\\" not in text and text.count("\t") == 5 * len(chunk):
        return text

    def esc(value: str | None) -> str:
        return (value or "").replace("\\", "\\\\").replace("\t", "\\t")

    return "".join(
        [
            f"{line}\t{esc(email)}\t{esc(nm)}\t{esc(attrs)}\t{token}\t{email_hash(email)}\n"
            for (line, email, nm, attrs), token in zip(chunk, tokens, strict=True)
        ]
    )


def _suppression_hasher(key: str) -> Callable[[str], str]:
    """suppression_hash(email, key) for many emails (suppression.hasher)."""
    return hasher(key)


_BLOCK_CHARS = 1 << 18  # of the file's text per helper task (~5,000 rows of a usual file)
# A block's COPY text, its rejected rows, its good rows' count, and, if its CSV is broken,
# (line, message, whether the break is at the block's very end).
_CheckedBlock = tuple[str, list[_Rejected], int, tuple[int, str, bool] | None]


def _blocks(stream: IO[str], size: int) -> Iterator[str]:
    """The rest of the stream in pieces of about `size` characters, each cut after a '\n'
    (the last one ends where the file does)."""
    rest = ""
    while piece := stream.read(size):
        piece = rest + piece
        cut = piece.rfind("\n") + 1
        rest, piece = piece[cut:], piece[:cut]
        if piece:
            yield piece
    if rest:
        yield rest


def _lines_in(text: str) -> int:
    """How many lines a reader (newline='') makes of text: '\r\n', '\r' and '\n' each end one."""
    ends = text.count("\n") + text.count("\r") - text.count("\r\n")
    return ends + (not text.endswith(("\n", "\r")))


def _check_block(
    columns: _Columns, email_hash: Callable[[str], str], block: tuple[str, int, int]
) -> _CheckedBlock:
    """Read, check and write as COPY text one block of (text, its first line's number, its
    first token's count), assuming the block starts a row."""
    text, first_line, first_token = block
    buffer = io.StringIO(text, newline="")
    reader = csv.reader(buffer, strict=True)
    batch: list[tuple[int, list[str]]] = []
    try:
        for cells in reader:
            batch.append((first_line - 1 + reader.line_num, cells))
    except csv.Error as exc:
        return "", [], 0, (first_line - 1 + reader.line_num, str(exc), buffer.read(1) == "")
    good, rejected = columns.check(batch)
    tokens = _ImportTokens.counting_from(first_token, len(good))
    return _copy_text(good, tokens, email_hash), rejected, len(good), None


_HELPED_FROM = 8 << 20  # bytes: below, forking costs more than the helpers save


def import_helpers(file_bytes: int) -> int:
    """How many helper processes import_csv should read a file of this size with: one per
    core this process may use, none for a small file or a single core. For a caller that
    runs no threads of its own (the CLI): helpers are forked."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores if cores and cores > 1 and file_bytes >= _HELPED_FROM else 0


# A helper process of a parallel import: the file's columns and the keyed hash.
_helper: tuple[_Columns, Callable[[str], str]] | None = None


def _start_helper(columns: _Columns, key: str) -> None:
    global _helper
    _helper = (columns, _suppression_hasher(key))


def _helper_check_block(block: tuple[str, int, int]) -> _CheckedBlock:
    assert _helper is not None, "not started by _start_helper"
    return _check_block(*_helper, block)


def _copy_texts(
    rows: ImportRows,
    tokens: _ImportTokens,
    suppression_key: str,
    helpers: int,
    block_chars: int | None = None,
) -> Iterator[str]:
    """The good rows of the file as COPY text, in file order, a piece at a time.

    Without helpers, this process does it all. With them, it only cuts the file's text
    into blocks at line ends and the helper processes read and check the rows, normalise
    the addresses, hash them and make the tokens: most of an import's Python time, then
    spread over the cores while PostgreSQL takes the COPY. A block is read as if it began
    a row, which it does unless a quoted field (with a line break in it: such rows are
    refused, but must be read right) runs over its first line end. Then the block before
    it ends inside quotes, its reader fails at its very end, and that block is read again
    joined with the next: every block is thus read from a row's start, as one reader
    reading the whole file would. Results come back in file order (Pool.imap), and each
    block's tokens count through a range set aside for it, so they increase through the
    file as without helpers.
    """
    email_hash = _suppression_hasher(suppression_key)
    if helpers < 1:
        for chunk in rows.chunks():
            yield _copy_text(chunk, tokens.take(len(chunk)), email_hash)
        return
    source, columns = rows.source, rows.columns
    sent: deque[tuple[str, int, int]] = deque()  # blocks handed out, not yet written

    def blocks() -> Iterator[tuple[str, int, int]]:
        line = rows.lines_read + 1
        try:
            for text in _blocks(rows.stream, block_chars or _BLOCK_CHARS):
                count = _lines_in(text)
                sent.append((text, line, tokens.reserve(count)))
                yield sent[-1]
                line += count
        except UnicodeDecodeError:  # a file that changed after open_text_file checked it
            raise InvalidInput(f"{source}: not UTF-8 (after line {line - 1})") from None

    # fork: the helpers need this module only, which is loaded; they use neither the
    # parent's database connection nor its files, only the pool's pipes.
    context = multiprocessing.get_context("fork")
    with context.Pool(helpers, _start_helper, (columns, suppression_key)) as pool:
        results = pool.imap(_helper_check_block, blocks())
        for result in results:
            block = sent.popleft()
            while result[3] is not None and result[3][2]:  # broken at its end: join the next
                if next(results, None) is None:
                    break  # the file's end: the break is real
                following = sent.popleft()
                block = (block[0] + following[0], block[1], block[2])
                result = _check_block(columns, email_hash, block)
            text, rejected, good, broken = result
            if broken is not None:
                raise InvalidInput(f"{source}: line {broken[0]}: {broken[1]}")
            rows.rejected += rejected
            rows.good += good
            yield text


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
    """Keyset-paged walk over a list's subscriptions in id order (never loads the list into
    memory). Each page reads its own rows from the (list_id, status, id) index: for one
    status, one range of it; for all, the next ids of each status, merged. No (list_id, id)
    index is kept for the second (migration 0008): every imported reader filled it, ~1 s
    per million, and a page of a few statuses' ranges costs as little."""
    mlist = get_list(session, list_slug)
    page = 2000 if limit is None else min(limit, 2000)
    remaining = limit
    last = after_id
    statuses = list(SubscriptionStatus) if status is None else [status]
    while remaining is None or remaining > 0:
        wanted = page if remaining is None else min(page, remaining)
        ranges = [
            select(Subscription.id)
            .where(
                Subscription.list_id == mlist.id,
                Subscription.status == one,
                Subscription.id > last,
            )
            .order_by(Subscription.id)
            .limit(wanted)
            for one in statuses
        ]
        if len(ranges) > 1:
            merged = union_all(*(select(r.subquery().c.id) for r in ranges)).subquery()
            ranges = [select(merged.c.id).order_by(merged.c.id).limit(wanted)]
        query = (
            select(Subscription, Subscriber)
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(Subscription.id.in_(ranges[0].scalar_subquery()))
            .order_by(Subscription.id)
        )
        batch = session.execute(query).all()
        yield from batch
        if len(batch) < wanted:
            # The end of the list: asking again would only scan to its end once more.
            return
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


def read_text_stream(data: bytes, source: str) -> IO[str]:
    """Decode an uploaded CSV (UTF-8, with or without BOM) or fail with one clear line.

    The bytes are checked here, a slice at a time, and decoded again as they are read: a
    StringIO of the whole text would hold a large file once more, at up to 4 bytes a
    character (a 60 MB file: 240 MB).
    """
    if not data.isascii():
        view = memoryview(data)
        _check_utf8((view[at : at + _SLICE] for at in range(0, len(data), _SLICE)), source)
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")


def open_text_file(path: Path, source: str) -> IO[str]:
    """A CSV file (UTF-8, with or without BOM) opened for import_csv, checked first a slice
    at a time, so that a file of any size costs a few MB of memory; or one clear line."""
    try:
        with open(path, "rb") as raw:
            _check_utf8(iter(lambda: raw.read(_SLICE), b""), source)
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InvalidInput(f"{source}: {exc.strerror}") from None


_SLICE = 1 << 20


def _check_utf8(slices: Iterable[bytes | memoryview], source: str) -> None:
    """Raise InvalidInput naming the offset of the first byte that is not UTF-8."""
    done, pending = 0, b""
    for piece in slices:
        data = pending + piece if pending else piece
        try:
            # final=False: a character cut by the slice's end is completed by the next one.
            used = codecs.utf_8_decode(data, "strict", False)[1]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{source}: not UTF-8 (byte {done + exc.start})") from None
        done += used
        pending = bytes(data[used:])
    if pending:  # the file ends inside a character
        raise InvalidInput(f"{source}: not UTF-8 (byte {done})")


# --- preferences ---


def subscription_by_token(session: Session, token: str) -> Subscription:
    """The subscription a (verified) link token names."""
    sub = subscription_for_token(session, token)
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


def lift_suppression(session: Session, sub: Subscription, *, suppression_key: str) -> bool:
    """A pending subscription is being confirmed by its reader's link: a new consent, which
    lets an erased or suppressed address in again. True if it was suppressed."""
    person = session.get(Subscriber, sub.subscriber_id)
    return person is not None and lift(session, person.email, suppression_key)


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
    the address is already active or complained. An erased address gets one: confirming it
    is the new consent that lets the address back in. The caller answers the same
    in every case, so the form cannot tell who subscribes. Nothing that a stranger could
    abuse changes: no name is kept from a form (the reader names themselves when confirming),
    and a reader who left stays out until they press "Subscribe again" on the page the new
    link opens (only their section choice is recorded).
    """
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    if name is not None:
        name = check_text(name.strip(), "name") or None
    for section in sections or []:
        check_text(section, "section")
    # An erased or suppressed address may ask again: this is the new consent that lets it
    # back in, once confirmed by link (the confirmation lifts the suppression).
    subscriber = find_subscriber(session, address)
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
