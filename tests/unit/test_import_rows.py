"""Reading an import file (pure: no database): rows, rejections, line numbers, and the
values as they are handed to PostgreSQL's COPY."""

from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path

import pytest

from newsletter import import_rows, subscriptions
from newsletter.errors import InvalidInput


def read(data: str, size: int = 5000) -> tuple[list[tuple], list[tuple[int, str]], int]:
    rows = import_rows.parse_csv(io.StringIO(data, newline=""), "in.csv")
    good = [row for chunk in rows.chunks(size) for row in chunk]
    return good, rows.rejected, rows.good


def test_rows_come_in_chunks_with_their_line_numbers() -> None:
    data = "email,name\n" + "".join(f"u{i}@example.org,U {i}\n" for i in range(12))
    rows = import_rows.parse_csv(io.StringIO(data, newline=""), "in.csv")
    sizes = [len(chunk) for chunk in rows.chunks(5)]
    assert sizes == [5, 5, 2] and rows.good == 12
    good, _, _ = read(data)
    assert good[0] == (2, "u0@example.org", "U 0", None)
    assert good[-1][0] == 13


def test_quoted_commas_and_line_breaks_and_physical_line_numbers() -> None:
    data = (
        "email,name\n"
        'a@example.org,"Doe, Jane"\n'  # line 2: a comma inside quotes is data
        'b@example.org,"Two\nlines"\n'  # lines 3-4: refused, reported at its last line
        "c@example.org,C\n"  # line 5
        "\n"  # line 6: blank, not a row
        " , \n"  # line 7: only blanks, not a row
        "d@example.org,D,extra\n"  # line 8: more fields than the header
        ",Nobody\n"  # line 9
    )
    good, rejected, count = read(data)
    assert [(r[0], r[1], r[2]) for r in good] == [
        (2, "a@example.org", "Doe, Jane"),
        (5, "c@example.org", "C"),
    ]
    assert count == 2
    assert rejected == [
        (4, "a field contains a line break or NUL"),
        (8, "3 fields where the header has 2"),
        (9, "missing email"),
    ]


def test_header_with_a_bom_the_caller_kept_and_in_any_case() -> None:
    good, rejected, _ = read("\ufeff Email ,NAME\nA@Example.ORG,Ann\n")
    assert good == [(2, "A@example.org", "Ann", None)] and rejected == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "the file is empty"),
        ("mail,name\n", "no 'email' column"),
        ("email,Email\n", "repeats a column name"),
    ],
)
def test_a_broken_header_is_one_error_at_once(data: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        import_rows.parse_csv(io.StringIO(data, newline=""), "in.csv")


def test_an_unterminated_quote_is_one_error_naming_the_file() -> None:
    rows = import_rows.parse_csv(
        io.StringIO('email,name\na@example.org,"open\n', newline=""), "in.csv"
    )
    with pytest.raises(InvalidInput, match=r"^in\.csv: line \d+: "):
        list(rows.chunks())


def test_names_with_encoded_words_or_too_long_are_refused() -> None:
    good, rejected, _ = read(
        "email,name\na@example.org,=?utf-8?q?x?=\nb@example.org," + "x" * 201 + "\n"
        "c@example.org," + "y" * 200 + "\n"
    )
    assert [r[1] for r in good] == ["c@example.org"]
    assert [line for line, _ in rejected] == [2, 3]
    assert "'=?'" in rejected[0][1] and "longer than 200" in rejected[1][1]


def test_other_columns_become_the_same_json_as_json_dumps() -> None:
    odd = 'Say "hi"\\ \t tab, ünï \x01'
    good, _, _ = read(
        'email,city,note\na@example.org,Oslo,"' + odd.replace('"', '""') + '"\nb@example.org,,\n'
    )
    assert good[0][3] == json.dumps({"city": "Oslo", "note": odd}, ensure_ascii=False)
    assert json.loads(good[0][3]) == {"city": "Oslo", "note": odd}
    assert good[1][3] is None


def copy_fields(text: str) -> list[list[str | None]]:
    """Parse COPY text format as PostgreSQL does with NULL '' (enough for these values)."""
    unescape = {"\\\\": "\\", "\\t": "\t"}
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        rows.append(
            [re.sub(r"\\[\\t]", lambda m: unescape[m.group()], f) if f else None for f in fields]
        )
    return rows


@pytest.mark.parametrize(
    ("name", "attributes"),
    [
        ("Plain Name", '{"k": "v"}'),
        ("Tab\there", '{"k": "v"}'),
        ("Back\\slash", None),
        (None, '{"k": "a \\"quote\\""}'),
    ],
)
def test_copy_text_escapes_what_needs_it(name: str | None, attributes: str | None) -> None:
    chunk = [(2, "a@example.org", name, attributes), (3, "b@example.org", None, None)]
    tokens = import_rows._ImportTokens().take(2)
    text = import_rows._copy_text(chunk, tokens, lambda e: "h-" + e)
    assert copy_fields(text) == [
        ["2", "a@example.org", name, attributes, tokens[0], "h-a@example.org"],
        ["3", "b@example.org", None, None, tokens[1], "h-b@example.org"],
    ]


def test_tokens_are_url_safe_unguessable_distinct_and_in_order() -> None:
    source = import_rows._ImportTokens(started=1_800_000_000)
    tokens = source.take(5000) + source.take(5000)
    assert len(set(tokens)) == 10_000
    # 16 hex digits counting up, then 16 base64 characters: 96 random bits, URL-safe.
    assert all(re.fullmatch(r"[0-9a-f]{16}[A-Za-z0-9_-]{16}", t) for t in tokens)
    assert len({t[16:] for t in tokens}) == 10_000
    # In byte order as they are made, across chunks: the unique index is filled at its end.
    assert tokens == sorted(tokens)
    assert tokens[0].startswith(f"{1_800_000_000 << 32:016x}")
    # A later import starts after an earlier one.
    assert import_rows._ImportTokens(started=1_800_000_001).take(1)[0] > tokens[-1]


@pytest.mark.parametrize("key", ["k", "test-secret-key", "x" * 64, "long-" * 40, "ключ"])
def test_bulk_suppression_hash_is_the_same_hmac(key: str) -> None:
    fast = import_rows._suppression_hasher(key)
    for email in ("Ann@example.org", "ann@example.org", "o'neil+tag@xn--bcher-kva.de"):
        assert fast(email) == subscriptions.suppression_hash(email, key)


def test_utf8_is_checked_up_front_with_the_offset_in_the_file() -> None:
    with pytest.raises(InvalidInput, match=r"^in\.csv: not UTF-8 \(byte 9\)$"):
        import_rows.read_text_stream(b"\xef\xbb\xbfemail\n\xff@x.org\n", "in.csv")
    # Checked a slice at a time: a character split by a slice edge is fine, a bad byte far
    # into the file is found where it is.
    big = b"email,name\n" + "z@example.org,Zoë\n".encode() * 120_000
    assert sum(1 for _ in import_rows.read_text_stream(big, "in.csv")) == 120_001
    with pytest.raises(InvalidInput, match=rf"byte {len(big)}\)"):
        import_rows.read_text_stream(big + b"\xc3(", "in.csv")


def test_utf8_check_completes_characters_cut_by_a_slice_edge() -> None:
    data = "Zoë,東京,😀\n".encode()
    for size in (1, 2, 3, 5):
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        import_rows._check_utf8(pieces, "in.csv")  # no error
        with pytest.raises(InvalidInput, match=rf"byte {len(data)}\)"):
            import_rows._check_utf8([*pieces, b"\xe6\x9d"], "in.csv")  # ends mid-character


def test_a_file_is_opened_for_import_after_its_check(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_bytes("\ufeffemail,name\na@example.org,Zoë\n".encode())
    with import_rows.open_text_file(good, "good.csv") as stream:
        assert list(import_rows.parse_csv(stream, "good.csv").chunks()) == [
            [(2, "a@example.org", "Zoë", None)]
        ]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"email\n\xff@x.org\n")
    with pytest.raises(InvalidInput, match=r"^bad\.csv: not UTF-8 \(byte 6\)$"):
        import_rows.open_text_file(bad, "bad.csv")
    with pytest.raises(InvalidInput, match=r"^gone\.csv: No such file"):
        import_rows.open_text_file(tmp_path / "gone.csv", "gone.csv")


def test_the_text_stream_drops_the_bom_and_keeps_line_breaks_in_quotes() -> None:
    stream = import_rows.read_text_stream(
        '\ufeffemail,name\r\na@example.org,"x\r\ny"\r\n'.encode(), "in.csv"
    )
    assert stream.read() == 'email,name\r\na@example.org,"x\r\ny"\r\n'


def read_copy(data: str, helpers: int, block_chars: int = 64) -> tuple[list, list, int]:
    """What an import hands to COPY: the rows without their tokens, which must increase
    through the file; the rejected rows, in file order; the number of good rows."""
    rows = import_rows.parse_csv(io.StringIO(data, newline=""), "in.csv")
    texts = import_rows._copy_texts(
        rows, import_rows._ImportTokens(), "key", helpers, block_chars=block_chars
    )
    fields = [row for text in texts for row in copy_fields(text)]
    tokens = [row.pop(4) for row in fields]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    return fields, sorted(rows.rejected), rows.good


CITIES = ["", "Paris", "Tab\there", "Back\\slash"]


def messy_file(rows: int, seed: int) -> str:
    """A file whose rows run over block edges every which way: quoted line breaks (refused
    rows that must still be read right), CRLF and CR endings, blank lines, bad rows."""
    rnd = random.Random(seed)
    out = ["email,name,city\r\n"]
    for i in range(rows):
        end = rnd.choice(["\n", "\r\n", "\r", "\n"])
        kind = rnd.randrange(12)
        if kind == 0:
            out.append(f'q{i}@example.org,"{"long line " * rnd.randrange(1, 30)}\n\nmore",x{end}')
        elif kind == 1:
            out.append(end)  # blank
        elif kind == 2:
            out.append(f"not-an-address-{i},N,{end}")
        elif kind == 3:
            out.append(f'c{i}@example.org,"Doe, ""J""",Köln{end}')
        elif kind == 4:
            out.append(f"e{i}@example.org,too,many,fields{end}")
        else:
            city = rnd.choice(CITIES)
            out.append(f"u{i}@Example.ORG,Name {i},{city}{end}")
    return "".join(out)


@pytest.mark.parametrize("seed", range(6))
def test_helpers_read_the_file_exactly_as_one_reader_does(seed: int) -> None:
    data = messy_file(400, seed)
    alone = read_copy(data, helpers=0)
    assert alone[2] > 200 and len(alone[1]) > 50
    for block_chars in (7, 64, 300, 1 << 18):
        assert read_copy(data, helpers=2, block_chars=block_chars) == alone


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ('email,name\na@example.org,A\nb@example.org,"B\n', r"line 3: unexpected end of data"),
        ('email,name\na@example.org,"A"x\nb@example.org,B\n', r"line 2: ',' expected after"),
        ('email,name\na@example.org,A\n"b@example.org" ,B\nc@example.org,C\n', r"line 3: "),
    ],
)
def test_helpers_report_a_broken_file_as_one_reader_does(data: str, error: str) -> None:
    for helpers, block_chars in ((0, 64), (2, 5), (2, 20), (2, 1 << 18)):
        with pytest.raises(InvalidInput, match=rf"^in\.csv: {error}"):
            read_copy(data, helpers, block_chars)


def test_only_a_big_file_is_read_with_helpers() -> None:
    assert import_rows.import_helpers(100_000) == 0
    cores = len(os.sched_getaffinity(0))
    assert import_rows.import_helpers(64 << 20) == (cores if cores > 1 else 0)
