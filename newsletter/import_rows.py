"""Reading an import's CSV file: decode it, check each row, and write the good rows as
COPY text, in this process or in helper processes. No database."""

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
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO

from newsletter.addresses import InvalidAddress, check_text, normalize_email
from newsletter.errors import InvalidInput
from newsletter.suppression import hasher

# A row that passed validation, as it goes to the database:
# (line, email, name or None, the other columns as a JSON object or None).
_Row = tuple[int, str, str | None, str | None]
_Rejected = tuple[int, str]  # (line, reason)

_BAD_CELL = re.compile(r"[\r\n\x00]")
_CHUNK_ROWS = 5000  # rows per COPY write: memory stays flat, round trips stay few


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
