"""The per-recipient message bytes, checked the way a receiving mail system reads them."""

from __future__ import annotations

import datetime
import email
import email.policy
import html as html_lib
import re
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from newsletter.compose import DigestArticle, DigestContext, make_environment, render_issue
from newsletter.message import (
    MAX_NAME_CHARS,
    NAME_FALLBACK,
    CompiledMessage,
    HeaderValueError,
    IssueMessageSpec,
    Recipient,
    check_header_value,
    fill_placeholders,
    format_date,
    make_message_id,
)
from newsletter.placeholders import Markers

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
DATE = "Sat, 28 Nov 2026 09:00:00 +0000"
UNSUBSCRIBE = "https://news.example.org/unsubscribe/Ab1.cD2-eF3_gH4"
PREFERENCES = "https://news.example.org/preferences/Ab1.cD2-eF3_gH4"
MAILTO = "mailto:unsubscribe@example.org?subject=unsubscribe%20Ab1.cD2-eF3_gH4"

TEXT = (
    f"World Digest\n\nHello {MARKERS.name},\n\nZürich votes — and “wins”.\n\n"
    f"Manage preferences: {MARKERS.preferences_url}\n"
    f"Unsubscribe: {MARKERS.unsubscribe_url}\n"
)
HTML = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>World</title>'
    "<style>@media (max-width: 620px) { .c { width: 100% !important } }</style></head>\n"
    f'<body><p class="greeting">Hello {MARKERS.name},</p>\n'
    "<p>Zürich votes — and “wins”.</p>\n"
    f'<p><a href="{MARKERS.preferences_url}">Manage preferences</a>\n'
    f'<a href="{MARKERS.unsubscribe_url}">Unsubscribe</a></p>\n</body></html>'
)


def spec(**changes: object) -> IssueMessageSpec:
    values: dict[str, object] = {
        "subject": "World Digest, 28 Nov 2026: Talks resume",
        "from_address": "World Desk <desk@example.org>",
        "reply_to": "Letters <letters@example.org>",
        "list_id": '"World Digest" <world.example.org>',
        "html": HTML,
        "text": TEXT,
        "message_id_domain": "example.org",
        "markers": MARKERS,
    }
    values.update(changes)
    return IssueMessageSpec(**values)  # type: ignore[arg-type]


def recipient(**changes: object) -> Recipient:
    values: dict[str, object] = {
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "unsubscribe_url": UNSUBSCRIBE,
        "preferences_url": PREFERENCES,
        "unsubscribe_mailto": MAILTO,
        "message_id": make_message_id(1234, "n0nce", "example.org"),
    }
    values.update(changes)
    return Recipient(**values)  # type: ignore[arg-type]


def build(message_spec: IssueMessageSpec | None = None, **changes: object) -> bytes:
    compiled = CompiledMessage.compile(message_spec or spec())
    return compiled.build(recipient(**changes), date=DATE)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    for part in message.walk():
        assert not part.defects, part.defects
        for value in part.values():
            assert not getattr(value, "defects", ()), (value, value.defects)
    return message


def parts(message: EmailMessage) -> tuple[EmailMessage, EmailMessage]:
    text, html = message.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    return text, html


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def rendered(markup: str) -> str:
    """What a reader sees of some html, roughly: entities decoded, whitespace collapsed."""
    return " ".join(html_lib.unescape(markup).split())


def display_name(data: bytes, field: str) -> str:
    """The display name of an address header, decoded as RFC 2047 section 6.2 says: the
    white space between adjacent encoded-words is dropped. (CPython before gh-128110 keeps
    it in address headers, so policy.default alone would show a long non-ASCII name with
    extra spaces.)"""
    raw = re.search(rf"^{field}: (.*?)\r\n(?! )".encode(), data, re.MULTILINE | re.DOTALL)
    assert raw is not None
    value = raw.group(1).decode("ascii").replace("\r\n", "")
    if value.startswith("=?"):
        phrase = value.rsplit(" <", 1)[0]
        return str(make_header(decode_header(phrase)))
    message = parse(data)
    (address,) = message[field].addresses
    return str(address.display_name)


def assert_wire_format(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert data.isascii()
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


# --- the message as a whole -------------------------------------------------------------


def test_every_required_header_is_present() -> None:
    message = parse(build())

    assert message["From"] == "World Desk <desk@example.org>"
    assert message["To"] == "Ada Lovelace <ada@example.com>"
    assert message["Subject"] == "World Digest, 28 Nov 2026: Talks resume"
    assert message["Date"] == DATE
    assert message["Message-ID"] == "<d1234.n0nce@example.org>"
    assert message["MIME-Version"] == "1.0"
    assert message["List-Id"] == '"World Digest" <world.example.org>'
    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>, <{MAILTO}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Precedence"] == "bulk"
    assert message["Reply-To"] == "Letters <letters@example.org>"


def test_reply_to_is_left_out_when_not_given() -> None:
    message = parse(build(spec(reply_to=None)))

    assert "Reply-To" not in message


def test_lines_end_in_crlf_and_stay_short() -> None:
    data = build()

    assert_wire_format(data)
    for line in header_block(data).split(b"\r\n"):
        assert len(line) <= 78, line


def test_list_unsubscribe_is_folded_between_the_two_uris() -> None:
    data = build()

    assert f"List-Unsubscribe: <{UNSUBSCRIBE}>,\r\n <{MAILTO}>\r\n".encode() in header_block(data)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data
    uris = re.findall(r"<([^<>]+)>", parse(data)["List-Unsubscribe"])
    assert uris == [UNSUBSCRIBE, MAILTO]


def test_alternative_parts_are_text_then_html_in_utf8() -> None:
    message = parse(build())

    assert message.get_content_type() == "multipart/alternative"
    text, html = parts(message)
    assert text.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert text.get_content_charset() == "utf-8"
    assert html.get_content_charset() == "utf-8"


def test_bodies_carry_the_substituted_values() -> None:
    text, html = parts(parse(build()))

    expected_text = fill_placeholders(
        TEXT,
        markers=MARKERS,
        name="Ada Lovelace",
        unsubscribe_url=UNSUBSCRIBE,
        preferences_url=PREFERENCES,
        html=False,
    )
    assert text.get_content().replace("\r\n", "\n") == expected_text
    assert "Hello Ada Lovelace,\n" in expected_text
    expected_html = fill_placeholders(
        HTML,
        markers=MARKERS,
        name="Ada Lovelace",
        unsubscribe_url=UNSUBSCRIBE,
        preferences_url=PREFERENCES,
        html=True,
    )
    assert rendered(html.get_content()) == rendered(expected_html)
    assert f'<a href="{PREFERENCES}">Manage preferences</a>' in html.get_content()
    assert f'<a href="{UNSUBSCRIBE}">Unsubscribe</a>' in html.get_content()
    assert "Zürich votes — and “wins”." in rendered(html.get_content())


def test_html_is_sent_as_7bit_ascii_with_character_references() -> None:
    data = build()

    assert b"Content-Transfer-Encoding: 7bit" in data
    assert b"Z&#252;rich votes &#8212; and &#8220;wins&#8221;." in data
    # Character references mean nothing in CSS, so <style> content is left as it was.
    assert b"@media (max-width: 620px) { .c { width: 100% !important } }" in data


def test_no_placeholder_reaches_the_reader() -> None:
    data = build()

    for marker in MARKERS.all:
        assert marker.encode() not in data
    text, html = parts(parse(data))
    for marker in MARKERS.all:
        assert marker not in text.get_content()
        assert marker not in html.get_content()


def test_each_build_is_personal_and_the_compiled_issue_is_reusable() -> None:
    compiled = CompiledMessage.compile(spec())
    first = compiled.build(recipient(), date=DATE)
    second = compiled.build(
        recipient(email="bob@example.net", name="Bob", message_id="<d2.n0nce@example.org>"),
        date=DATE,
    )

    assert compiled.build(recipient(), date=DATE) == first
    bob = parse(second)
    assert bob["To"] == "Bob <bob@example.net>"
    assert bob["Message-ID"] == "<d2.n0nce@example.org>"
    assert "Hello Bob," in parts(bob)[0].get_content()
    assert b"Ada" not in second


def test_boundary_is_random_per_issue_and_absent_from_the_bodies() -> None:
    first = CompiledMessage.compile(spec())
    second = CompiledMessage.compile(spec())

    assert first.boundary != second.boundary
    data = first.build(recipient(), date=DATE)
    assert data.count(first.boundary.encode()) == 4  # Content-Type, two parts, the close


# --- non-ASCII headers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "World Digest, 28 Nov 2026: Zürich votes",
        "Résumé: élections — 東京 et São Paulo, “quoted” and 🌍 emoji",
        "Très " * 40 + "long",
        "東京" * 80,
        "x" * 150 + " plain-ascii-word-that-is-long",
    ],
)
def test_subject_is_encoded_and_round_trips(subject: str) -> None:
    data = build(spec(subject=subject))

    assert_wire_format(data)
    for line in header_block(data).split(b"\r\n"):
        assert len(line) <= 78, line
    assert parse(data)["Subject"] == subject


def test_non_ascii_from_display_name_is_encoded() -> None:
    data = build(spec(from_address="Rédaction Monde — 世界 <desk@example.org>"))

    assert b"From: =?utf-8?" in data
    (sender,) = parse(data)["From"].addresses
    assert sender.addr_spec == "desk@example.org"
    assert display_name(data, "From") == "Rédaction Monde — 世界"


def test_non_ascii_list_id_description_is_encoded() -> None:
    message = parse(build(spec(list_id='"Weltüberblick" <welt.example.org>')))

    assert message["List-Id"] == "Weltüberblick <welt.example.org>"


# --- the recipient's name -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("Ada Lovelace", "Ada Lovelace"),
        ("José Ñúñez", "José Ñúñez"),
        ("李小龍", "李小龍"),
        ("O'Neil, Bob (Jr.)", "O'Neil, Bob (Jr.)"),
        ('<b>Bob & "Co"</b>', '<b>Bob & "Co"</b>'),
        ("back\\slash", "back\\slash"),
        ("  Ada \t  Lovelace  ", "Ada Lovelace"),
        ("Ada " * 30 + "Lovelace", ("Ada " * 30 + "Lovelace")),
        ("Zoë " * 30, ("Zoë " * 30).strip()),
        ("x" * 300, "x" * MAX_NAME_CHARS),
    ],
)
def test_to_header_shows_the_name(name: str, shown: str) -> None:
    data = build(name=name)

    assert_wire_format(data)
    message = parse(data)
    (to,) = message["To"].addresses
    assert to.addr_spec == "ada@example.com"
    assert display_name(data, "To") == shown
    to_lines = re.search(rb"\r\nTo: .*?\r\n(?=\S)", data, re.DOTALL)
    assert to_lines is not None
    if " " in shown or not shown.isascii():
        assert max(len(line) for line in to_lines.group().split(b"\r\n")) <= 78


@pytest.mark.parametrize("name", [None, "", "   "])
def test_no_name_falls_back_to_a_neutral_greeting(name: str | None) -> None:
    message = parse(build(name=name))

    assert message["To"] == "ada@example.com"
    text, html = parts(message)
    assert f"Hello {NAME_FALLBACK}," in text.get_content()
    assert f"Hello {NAME_FALLBACK}," in html.get_content()


def test_name_is_html_escaped_in_html_and_plain_in_text() -> None:
    text, html = parts(parse(build(name='<b>Bob & "Co"</b>')))

    assert 'Hello <b>Bob & "Co"</b>,' in text.get_content()
    assert "<b>Bob" not in html.get_content()
    assert "Hello &lt;b&gt;Bob &amp; &quot;Co&quot;&lt;/b&gt;," in html.get_content()


def test_non_ascii_name_in_html_becomes_character_references() -> None:
    text, html = parts(parse(build(name="Zoë 李")))

    assert "Hello Zoë 李," in text.get_content()
    assert "Hello Zo&#235; &#26446;," in html.get_content()


def test_very_long_name_without_spaces_keeps_html_lines_short() -> None:
    data = build(name="龍" * 500)

    assert_wire_format(data)
    text, html = parts(parse(data))
    assert "Hello " + "龍" * MAX_NAME_CHARS + "," in text.get_content()
    assert "龍" * 20 in rendered(html.get_content())


# --- header injection -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Bob\r\nBcc: victim@example.net",
        "Bob\nBcc: victim@example.net",
        "Bob\rX: y",
        "Bob\x00",
        "=?utf-8?b?Qm9i?=",
        "Bob =?utf-8?q?x?= Smith",
    ],
)
def test_check_header_value_refuses_smuggling(value: str) -> None:
    with pytest.raises(HeaderValueError) as excinfo:
        check_header_value(value, "recipient name")

    message = str(excinfo.value)
    assert "recipient name" in message
    assert "\n" not in message and "\r" not in message


def test_check_header_value_returns_good_values() -> None:
    assert check_header_value("José Ñúñez = ? fine", "name") == "José Ñúñez = ? fine"


@pytest.mark.parametrize(
    "name", ["Bob\r\nBcc: victim@example.net", "Bob\nX: y", "Bob\x00", "=?utf-8?b?Qm9i?="]
)
def test_recipient_name_injection_is_refused(name: str) -> None:
    with pytest.raises(HeaderValueError, match="recipient name"):
        build(name=name)


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com\r\nBcc: victim@example.net",
        "ada@example.com\n",
        "=?utf-8?b?YQ==?=@example.com",
        "ada@example.com>, <victim@example.net",
        "Ada <ada@example.com>",
        "ádá@example.com",
        "ada@exämple.com",
    ],
)
def test_bad_recipient_address_is_refused(address: str) -> None:
    with pytest.raises(HeaderValueError, match="recipient email"):
        build(email=address)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unsubscribe_url", "javascript:alert(1)"),
        ("unsubscribe_url", "https://x.example/u>, <https://evil.example/"),
        ("unsubscribe_url", "https://x.example/u\r\nBcc: victim@example.net"),
        ("preferences_url", "https://x.example/p q"),
        ("unsubscribe_mailto", "https://x.example/not-mailto"),
        ("message_id", "d1@example.org"),
        ("message_id", "<d1@example.org>\r\nBcc: victim@example.net"),
    ],
)
def test_bad_recipient_links_are_refused(field: str, value: str) -> None:
    compiled = CompiledMessage.compile(spec())

    with pytest.raises(HeaderValueError):
        compiled.build(recipient(**{field: value}), date=DATE)


@pytest.mark.parametrize("date", [DATE + "\r\nBcc: victim@example.net", "Sam, 28 Növ 2026"])
def test_bad_date_is_refused(date: str) -> None:
    compiled = CompiledMessage.compile(spec())

    with pytest.raises(HeaderValueError, match="date"):
        compiled.build(recipient(), date=date)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Hello\r\nBcc: victim@example.net"),
        ("subject", "=?utf-8?b?SGk=?="),
        ("subject", "   "),
        ("from_address", "Desk <desk@example.org>\nBcc: victim@example.net"),
        ("from_address", "not an address"),
        ("from_address", "a@example.org, b@example.org"),
        ("from_address", "Desk <dësk@example.org>"),
        ("reply_to", "Letters <letters@example.org>\r\nX: y"),
        ("list_id", "World Digest"),
        ("list_id", '"World" <world.example.org>\r\nX: y'),
        ("message_id_domain", "example.org>"),
    ],
)
def test_compile_refuses_bad_issue_headers(field: str, value: str) -> None:
    with pytest.raises(HeaderValueError):
        CompiledMessage.compile(spec(**{field: value}))


# --- long lines and awkward bodies --------------------------------------------------------


def test_long_html_paragraph_is_wrapped_at_spaces() -> None:
    paragraph = "<p>" + "Zürich word " * 1500 + "</p>"
    data = build(spec(html=f"<html><body>{paragraph}\n<p>Hello {MARKERS.name}</p></body></html>"))

    assert_wire_format(data)
    assert b"Content-Transfer-Encoding: 7bit" in data
    _, html = parts(parse(data))
    assert rendered(html.get_content()) == rendered(
        f"<html><body>{paragraph}\n<p>Hello Ada Lovelace</p></body></html>"
    )


def test_preformatted_text_is_never_rewrapped() -> None:
    pre = "<html><body><pre>" + "col1  col2  " * 100 + "</pre>\n<p>" + "word " * 400 + "</p>"
    compiled = CompiledMessage.compile(spec(html=pre + "</body></html>"))
    data = compiled.build(recipient(), date=DATE)

    assert compiled.html_transfer_encoding == "quoted-printable"  # the <pre> line is too long
    assert_wire_format(data)
    _, html = parts(parse(data))
    assert html.get_content().replace("\r\n", "\n") == pre + "</body></html>"


def test_unbreakable_html_falls_back_to_quoted_printable() -> None:
    cjk = "<p>" + "東京の天気は晴れです。" * 400 + f"</p><p>Hello {MARKERS.name}</p>"
    compiled = CompiledMessage.compile(spec(html=cjk))
    data = compiled.build(recipient(name="李小龍"), date=DATE)

    assert compiled.html_transfer_encoding == "quoted-printable"
    assert_wire_format(data)
    for line in data.split(b"\r\n"):
        assert len(line) <= 78
    _, html = parts(parse(data))
    assert html.get_content() == cjk.replace(MARKERS.name, "李小龍")


def test_text_part_round_trips_exactly_with_long_and_odd_lines() -> None:
    text = (
        f"{MARKERS.name}{MARKERS.name}\n"
        + "trailing spaces   \n"
        + "x" * 2000
        + f"\n.leading dot and = sign {MARKERS.unsubscribe_url}"
    )
    data = build(spec(text=text), name="Ada " * 40)

    assert_wire_format(data)
    for line in data.split(b"\r\n\r\n", 2)[2].split(b"\r\n--")[0].split(b"\r\n"):
        assert len(line) <= 76
    plain, _ = parts(parse(data))
    name = ("Ada " * 40).strip()
    assert plain.get_content().replace("\r\n", "\n") == (
        text.replace(MARKERS.name, name).replace(MARKERS.unsubscribe_url, UNSUBSCRIBE)
    )


@pytest.mark.parametrize("length", [1, 74, 75, 76, 149, 150, 151, 200])
def test_quoted_printable_values_of_any_length_round_trip(length: int) -> None:
    name = ("Ada Lovelace " * 20)[:length].strip() or "A"
    query_url = UNSUBSCRIBE + "?a=1&b=" + "x" * length
    data = build(name=name, unsubscribe_url=query_url[:400])

    body = data.split(b"\r\n\r\n", 2)[2].split(b"\r\n--")[0]
    for line in body.split(b"\r\n"):
        assert len(line) <= 76
    plain, html = parts(parse(data))
    assert f"Hello {name},\n" in plain.get_content().replace("\r\n", "\n")
    assert f"Unsubscribe: {query_url[:400]}\n" in plain.get_content().replace("\r\n", "\n")
    assert f'href="{html_lib.escape(query_url[:400])}"' in html.get_content()


def test_lines_starting_with_from_are_protected_in_the_text_part() -> None:
    data = build(spec(text=f"Hello {MARKERS.name},\nFrom Monday, trains run again.\n"))

    assert b"\r\nFrom " not in data.split(b"\r\n\r\n", 1)[1]
    plain, _ = parts(parse(data))
    assert "\nFrom Monday, trains run again.\n" in plain.get_content().replace("\r\n", "\n")


def test_real_digest_builds_cleanly() -> None:
    env = make_environment(TEMPLATES)
    articles = [
        DigestArticle(
            section="World",
            title=f"Story {number}: Zürich <votes> & “wins”",
            summary="Delegations met for six hours — and agreed to meet again. " * 5,
            url=f"https://news.example.com/story-{number}?a=1&b=2",
        )
        for number in range(10)
    ]
    issue = render_issue(
        DigestContext(
            markers=MARKERS,
            list_name="World Digest",
            list_slug="world",
            issue_date=datetime.date(2026, 11, 28),
            subject="World Digest, 28 Nov 2026: Story 0",
            articles=articles,
            postal_address="Example News Ltd\n1 Harbour Street",
            archive_url="https://news.example.org/archive/world/7",
        ),
        env,
    )
    compiled = CompiledMessage.compile(
        spec(subject=issue.subject, html=issue.html, text=issue.text)
    )
    data = compiled.build(recipient(name="José <Admin>"), date=DATE)

    assert compiled.html_transfer_encoding == "7bit"
    assert_wire_format(data)
    text, html = parts(parse(data))
    assert "Hello José <Admin>," in text.get_content()
    assert "Hello Jos&#233; &lt;Admin&gt;," in " ".join(html.get_content().split())
    assert f'href="{UNSUBSCRIBE}"' in html.get_content()
    assert f"Unsubscribe: {UNSUBSCRIBE}" in text.get_content()
    assert "Story 9: Zürich <votes> & “wins”" in rendered(html.get_content())
    assert "@media (max-width: 620px)" in html.get_content()


# --- ids and dates --------------------------------------------------------------------------


def test_message_id_is_deterministic_per_delivery() -> None:
    first = make_message_id(42, "iss7-x", "example.org")

    assert first == "<d42.iss7-x@example.org>"
    assert make_message_id(42, "iss7-x", "example.org") == first
    assert make_message_id(43, "iss7-x", "example.org") != first


@pytest.mark.parametrize(
    ("delivery_id", "nonce", "domain"),
    [(-1, "n", "example.org"), (1, "a b", "example.org"), (1, "n", "exa mple.org"), (1, "n", "")],
)
def test_message_id_refuses_bad_parts(delivery_id: int, nonce: str, domain: str) -> None:
    with pytest.raises(ValueError):
        make_message_id(delivery_id, nonce, domain)


def test_format_date_is_rfc5322_utc() -> None:
    stamp = 1795856400.0  # 2026-11-28 09:00:00 UTC
    formatted = format_date(stamp)

    assert formatted == "Sat, 28 Nov 2026 09:00:00 +0000"
    assert parsedate_to_datetime(formatted) == datetime.datetime(
        2026, 11, 28, 9, 0, tzinfo=datetime.UTC
    )
    assert parsedate_to_datetime(format_date()).tzinfo is not None
