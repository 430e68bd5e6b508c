"""Personalize an issue and build its MIME bytes: compile once per issue, build per recipient.

Pure and fast. :meth:`CompiledMessage.compile` does every per-issue step (validating and
RFC 2047-encoding the headers, choosing the MIME boundary, encoding both bodies and splitting
them at the issue's own markers, :mod:`newsletter.placeholders`) so that
:meth:`CompiledMessage.build` only validates the recipient, encodes a handful of short values
and joins precomputed byte chunks. Python's ``EmailMessage`` costs milliseconds per message;
this costs microseconds.

The message (RFC 5322 / MIME):

* headers From, To, Subject, Date, Message-ID, [Reply-To], MIME-Version, List-Id,
  List-Unsubscribe (https URI, then mailto URI, folded between the two),
  List-Unsubscribe-Post (RFC 8058), Precedence: bulk; non-ASCII text as RFC 2047
  encoded-words, folded at 78 columns where a fold point exists;
* multipart/alternative: text/plain (quoted-printable), then text/html (7bit: non-ASCII
  written as numeric character references and lines wrapped at spaces; quoted-printable
  instead when some line cannot be wrapped, e.g. a long run of CJK text);
* every line ends in CRLF and is at most 998 octets;
* a DKIM-Signature field first when the message is compiled with a signer
  (:meth:`CompiledMessage.compile` ``dkim=``, or :meth:`CompiledMessage.signed_by`): the
  body canonicalization is done once per issue, per message only the private-key operation
  and a few short values (see :mod:`newsletter.dkim`).

Per-recipient values: the reader's name (``NAME_FALLBACK`` when there is none; HTML-escaped
in the html part, plain in the text part, at most ``MAX_NAME_CHARS`` characters), the
unsubscribe URL and the preferences URL.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import html as html_lib
import re
import secrets
import time
from dataclasses import dataclass
from email import policy as email_policy
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, Final

from newsletter import placeholders

if TYPE_CHECKING:
    from newsletter.dkim import BodyHashPlan, DkimSigner

NAME_FALLBACK: Final = "there"
"""Greeting word used when a reader has no name: "Hello there,"."""

MAX_NAME_CHARS: Final = 200
MAX_HTML_NAME_OCTETS: Final = 600
MAX_URL_OCTETS: Final = 400
HEADER_WIDTH: Final = 78
HTML_LINE_LIMIT: Final = 800
"""Longest html line allowed at compile time, counting each placeholder at its largest
substituted size; with the limits above no line can pass 998 octets after substitution."""

_TO: Final = 0
_DATE: Final = 1
_MESSAGE_ID: Final = 2
_UNSUBSCRIBE_HEADER: Final = 3
_MAILTO_HEADER: Final = 4
_TEXT_NAME: Final = 5
_TEXT_UNSUBSCRIBE: Final = 6
_TEXT_PREFERENCES: Final = 7
_HTML_NAME: Final = 8
_HTML_UNSUBSCRIBE: Final = 9
_HTML_PREFERENCES: Final = 10
_SLOT_COUNT: Final = 11

# Slots and html line budgets by marker kind; each issue's markers carry its own key
# (newsletter.placeholders), so the split pattern is made per compile (_Layout).
_TEXT_SLOTS: Final = {
    placeholders.NAME: _TEXT_NAME,
    placeholders.UNSUBSCRIBE_URL: _TEXT_UNSUBSCRIBE,
    placeholders.PREFERENCES_URL: _TEXT_PREFERENCES,
}
_HTML_SLOTS: Final = {
    placeholders.NAME: _HTML_NAME,
    placeholders.UNSUBSCRIBE_URL: _HTML_UNSUBSCRIBE,
    placeholders.PREFERENCES_URL: _HTML_PREFERENCES,
}
_HTML_BUDGET: Final = {
    placeholders.NAME: MAX_HTML_NAME_OCTETS,
    placeholders.UNSUBSCRIBE_URL: MAX_URL_OCTETS,
    placeholders.PREFERENCES_URL: MAX_URL_OCTETS,
}


@dataclass(frozen=True)
class _Layout:
    """Where one issue's markers are, and which slot each becomes."""

    split: re.Pattern[str]
    text_slots: dict[str, int]
    html_slots: dict[str, int]
    budget: dict[str, int]

    @classmethod
    def of(cls, markers: placeholders.Markers) -> _Layout:
        kinds = {markers.marker(kind): kind for kind in placeholders.KINDS}
        return cls(
            re.compile("(" + "|".join(map(re.escape, kinds)) + ")"),
            {marker: _TEXT_SLOTS[kind] for marker, kind in kinds.items()},
            {marker: _HTML_SLOTS[kind] for marker, kind in kinds.items()},
            {marker: _HTML_BUDGET[kind] for marker, kind in kinds.items()},
        )


_ATEXT: Final = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ATOM_PHRASE: Final = re.compile(rf"[{_ATEXT}]{{1,76}}(?: [{_ATEXT}]{{1,76}})*")
_ADDR_SPEC: Final = re.compile(
    rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
# Printable ASCII without space, "<" and ">": safe inside <...> in a header.
_URI_CHARS: Final = r"!-;=?-~"
_HTTP_URL: Final = re.compile(rf"[Hh][Tt][Tt][Pp][Ss]?://[{_URI_CHARS}]+")
_MAILTO_URL: Final = re.compile(rf"[Mm][Aa][Ii][Ll][Tt][Oo]:[{_URI_CHARS}]+")
_MESSAGE_ID_RE: Final = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
_DOT_ATOM: Final = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_NONCE: Final = re.compile(r"[A-Za-z0-9_-]+")
_LIST_ID: Final = re.compile(r"(.*?)\s*<([^<>\s]+)>")
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# base64 of 39 bytes is 52 characters; with "=?utf-8?b?" and "?=" an encoded-word is 64, which
# fits after the longest field name that carries one ("Reply-To: ") within 78 columns.
_ENCODED_WORD_BYTES: Final = 39
_BREAK: Final = "\ue000"  # marks a breakable space; never present in the ASCII-only html


class HeaderValueError(ValueError):
    """A header value that would corrupt or smuggle headers (CR, LF, NUL, encoded-words) or
    is not a valid value for its field."""


def check_header_value(value: str, field: str) -> str:
    """Return ``value``, refusing CR, LF, NUL and '=?' (RFC 2047 encoded-word smuggling)."""
    if "\r" in value or "\n" in value or "\x00" in value:
        raise HeaderValueError(f"{field} must not contain CR, LF or NUL characters")
    if "=?" in value:
        raise HeaderValueError(f"{field} must not contain '=?' (RFC 2047 encoded-word syntax)")
    return value


@dataclass(frozen=True)
class IssueMessageSpec:
    subject: str
    from_address: str
    reply_to: str | None
    list_id: str
    html: str
    text: str
    message_id_domain: str
    markers: placeholders.Markers  # the issue's own (issues.marker_key)


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None
    unsubscribe_url: str
    preferences_url: str
    unsubscribe_mailto: str
    message_id: str


def make_message_id(delivery_id: int, tag: str, domain: str) -> str:
    """The Message-ID of one delivery: ``<d{delivery_id}.{tag}@{domain}>``, where the tag is
    the delivery's MAC (newsletter.provenance), the same every time it is built (a retried
    send keeps its id)."""
    if delivery_id < 0:
        raise ValueError("delivery_id must not be negative")
    if not _NONCE.fullmatch(tag):
        raise ValueError("a message id tag must be letters, digits, '-' or '_'")
    if not _DOT_ATOM.fullmatch(domain) or not domain.isascii():
        raise ValueError(f"message id domain is not a valid ASCII domain: {domain!r}")
    return f"<d{delivery_id}.{tag}@{domain}>"


def format_date(timestamp: float | None = None) -> str:
    """An RFC 5322 date in UTC, e.g. 'Sat, 28 Nov 2026 18:44:00 +0000' (now by default)."""
    moment = time.time() if timestamp is None else timestamp
    return format_datetime(datetime.datetime.fromtimestamp(int(moment), tz=datetime.UTC))


def clean_name(name: str | None) -> str:
    """The reader's name as used in the message: '' when absent; otherwise checked with
    check_header_value, cut to MAX_NAME_CHARS, controls dropped, whitespace collapsed."""
    if not name:
        return ""
    check_header_value(name, "recipient name")
    if len(name) > MAX_NAME_CHARS:
        name = name[:MAX_NAME_CHARS]
    if not name.isprintable() or "  " in name or name[0] == " " or name[-1] == " ":
        name = " ".join(_CONTROL_CHARS.sub("", name).split())
    return name


def fill_placeholders(
    body: str,
    *,
    name: str | None,
    unsubscribe_url: str,
    preferences_url: str,
    html: bool,
    markers: placeholders.Markers,
) -> str:
    """Substitute the placeholders of a stored html or text body for one reader, exactly as
    the message builder does (for previews and the web archive; not used per message)."""
    shown = clean_name(name) or NAME_FALLBACK
    if html:
        shown = html_lib.escape(shown)
        unsubscribe_url = html_lib.escape(unsubscribe_url)
        preferences_url = html_lib.escape(preferences_url)
    return (
        body.replace(markers.name, shown)
        .replace(markers.unsubscribe_url, unsubscribe_url)
        .replace(markers.preferences_url, preferences_url)
    )


class CompiledMessage:
    """One issue's message, ready to be built for each recipient."""

    __slots__ = (
        "_dkim",
        "_dkim_first_body",
        "_dkim_head_index",
        "_dkim_head_tail",
        "_dkim_memo",
        "_dkim_plan",
        "_html_7bit",
        "_needs_html_name",
        "_needs_html_urls",
        "_needs_text_name",
        "_needs_text_urls",
        "_parts",
        "_slots",
        "boundary",
        "html_transfer_encoding",
        "message_id_domain",
    )

    def __init__(
        self,
        parts: list[bytes],
        slots: list[tuple[int, int]],
        boundary: str,
        html_transfer_encoding: str,
        message_id_domain: str,
    ) -> None:
        self._parts = parts
        self._slots = slots
        self.boundary = boundary
        self.html_transfer_encoding = html_transfer_encoding
        self._html_7bit = html_transfer_encoding == "7bit"
        self.message_id_domain = message_id_domain
        kinds = {kind for _, kind in slots}
        self._needs_text_name = _TEXT_NAME in kinds
        self._needs_text_urls = bool(kinds & {_TEXT_UNSUBSCRIBE, _TEXT_PREFERENCES})
        self._needs_html_name = _HTML_NAME in kinds
        self._needs_html_urls = bool(kinds & {_HTML_UNSUBSCRIBE, _HTML_PREFERENCES})
        self._dkim: DkimSigner | None = None
        self._dkim_plan: BodyHashPlan | None = None
        self._dkim_head_index = 0
        self._dkim_head_tail = b""
        self._dkim_first_body = b""
        self._dkim_memo: dict[bytes, tuple[bytes, bytes]] = {}

    @property
    def dkim(self) -> DkimSigner | None:
        """The signer every built message is signed with, if any."""
        return self._dkim

    def signed_by(self, signer: DkimSigner | None) -> CompiledMessage:
        """This message, built signed by ``signer`` (None: unsigned). The per-issue half of
        the signing (the relaxed canonicalization of every constant body chunk) is done
        here, once."""
        twin = CompiledMessage(
            self._parts,
            self._slots,
            self.boundary,
            self.html_transfer_encoding,
            self.message_id_domain,
        )
        if signer is None:
            return twin
        slot_at = {index for index, _kind in self._slots}
        # The header block ends in the first constant part holding the blank line; the
        # last header slot (the mailto URI) comes before it, every body slot after it.
        head_index = next(
            i for i, p in enumerate(self._parts) if i not in slot_at and b"\r\n\r\n" in p
        )
        split = self._parts[head_index].index(b"\r\n\r\n")
        assert all((index < head_index) == (kind <= _MAILTO_HEADER) for index, kind in self._slots)
        twin._dkim = signer
        twin._dkim_head_index = head_index
        twin._dkim_head_tail = self._parts[head_index][: split + 2]
        twin._dkim_first_body = self._parts[head_index][split + 4 :]
        chunks: list[bytes | None] = [twin._dkim_first_body]
        for index in range(head_index + 1, len(self._parts)):
            chunks.append(None if index in slot_at else self._parts[index])
        twin._dkim_plan = signer.body_plan(chunks)
        return twin

    @classmethod
    def compile(cls, spec: IssueMessageSpec, *, dkim: DkimSigner | None = None) -> CompiledMessage:
        """Do all per-issue work; raise HeaderValueError for an unusable header value.

        With ``dkim``, every message :meth:`build` returns is DKIM-signed."""
        subject = " ".join(check_header_value(spec.subject, "subject").split())
        if not subject:
            raise HeaderValueError("subject must not be empty")
        domain = spec.message_id_domain
        if not domain.isascii() or not _DOT_ATOM.fullmatch(domain):
            raise HeaderValueError(f"message id domain is not a valid ASCII domain: {domain!r}")

        text = _normalize_newlines(spec.text)
        html = _normalize_newlines(spec.html).replace("\x00", "\ufffd")
        layout = _Layout.of(spec.markers)
        html_pieces = _html_7bit_pieces(html, layout)
        html_encoding = "7bit" if html_pieces is not None else "quoted-printable"
        if html_pieces is None:
            html_pieces = _qp_pieces(html, layout.split, layout.html_slots)
        text_pieces = _qp_pieces(text, layout.split, layout.text_slots)

        literal = b"".join(p for p in (*text_pieces, *html_pieces) if isinstance(p, bytes))
        boundary = "=_nl" + secrets.token_hex(12)
        while boundary.encode("ascii") in literal:  # pragma: no cover - 96 random bits
            boundary = "=_nl" + secrets.token_hex(12)
        delimiter = b"--" + boundary.encode("ascii")

        head = [_address_header("From", spec.from_address)]
        after_to = [_unstructured_header("Subject", subject), "Date: "]
        middle = ["\r\nMessage-ID: "]
        after_message_id = ["\r\n"]
        if spec.reply_to:
            after_message_id.append(_address_header("Reply-To", spec.reply_to))
        after_message_id += [
            "MIME-Version: 1.0\r\n",
            _list_id_header(spec.list_id),
            "List-Unsubscribe: <",
        ]
        between_uris = [">,\r\n <"]
        after_uris = [
            ">\r\n",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            "Precedence: bulk\r\n",
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n',
            "\r\n",
        ]
        text_head = (
            delimiter + b"\r\n"
            b'Content-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        )
        html_head = (
            b"\r\n" + delimiter + b"\r\n"
            b'Content-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: " + html_encoding.encode("ascii") + b"\r\n\r\n"
        )
        closing = b"\r\n" + delimiter + b"--\r\n"

        sequence: list[bytes | int] = [
            _ascii("".join(head)),
            _TO,
            _ascii("".join(after_to)),
            _DATE,
            _ascii("".join(middle)),
            _MESSAGE_ID,
            _ascii("".join(after_message_id)),
            _UNSUBSCRIBE_HEADER,
            _ascii("".join(between_uris)),
            _MAILTO_HEADER,
            _ascii("".join(after_uris)) + text_head,
            *text_pieces,
            html_head,
            *html_pieces,
            closing,
        ]
        parts, slots = _merge(sequence)
        compiled = cls(parts, slots, boundary, html_encoding, domain)
        return compiled.signed_by(dkim) if dkim is not None else compiled

    def build(self, recipient: Recipient, *, date: str) -> bytes:
        """The complete message for one recipient (RFC 5322 bytes, CRLF line endings).

        Raises HeaderValueError when a recipient field would break the message.
        """
        address = recipient.email
        check_header_value(address, "recipient email")
        if not _ADDR_SPEC.fullmatch(address):
            raise HeaderValueError(f"recipient email is not an ASCII address: {address!r}")
        name = clean_name(recipient.name)
        unsubscribe_url = recipient.unsubscribe_url
        preferences_url = recipient.preferences_url
        if len(unsubscribe_url) > MAX_URL_OCTETS or not _HTTP_URL.fullmatch(unsubscribe_url):
            raise HeaderValueError(f"unsubscribe URL is not an http(s) URL: {unsubscribe_url!r}")
        if len(preferences_url) > MAX_URL_OCTETS or not _HTTP_URL.fullmatch(preferences_url):
            raise HeaderValueError(f"preferences URL is not an http(s) URL: {preferences_url!r}")
        mailto = recipient.unsubscribe_mailto
        if len(mailto) > MAX_URL_OCTETS or not _MAILTO_URL.fullmatch(mailto):
            raise HeaderValueError(f"unsubscribe mailto is not a mailto: URI: {mailto!r}")
        message_id = recipient.message_id
        if len(message_id) > MAX_URL_OCTETS or not _MESSAGE_ID_RE.fullmatch(message_id):
            raise HeaderValueError(f"message id is not of the form <left@right>: {message_id!r}")
        check_header_value(date, "date")
        if not date.isascii():
            raise HeaderValueError(f"date must be an ASCII RFC 5322 date: {date!r}")

        values: list[bytes] = [b""] * _SLOT_COUNT
        if not name:
            values[_TO] = b"To: " + address.encode("ascii") + b"\r\n"
        elif name.isascii() and _ATOM_PHRASE.fullmatch(name) and len(name) + len(address) <= 71:
            values[_TO] = f"To: {name} <{address}>\r\n".encode("ascii")
        else:
            values[_TO] = _ascii(_fold("To", [*_phrase_tokens(name), f"<{address}>"]) + "\r\n")
        values[_DATE] = date.encode("ascii")
        values[_MESSAGE_ID] = message_id.encode("ascii")
        unsubscribe_bytes = unsubscribe_url.encode("ascii")
        preferences_bytes = preferences_url.encode("ascii")
        values[_UNSUBSCRIBE_HEADER] = unsubscribe_bytes
        values[_MAILTO_HEADER] = mailto.encode("ascii")
        shown = name or NAME_FALLBACK
        if self._needs_text_name:
            values[_TEXT_NAME] = _qp_value(shown.encode("utf-8"))
        if self._needs_text_urls:
            values[_TEXT_UNSUBSCRIBE] = _qp_value(unsubscribe_bytes)
            values[_TEXT_PREFERENCES] = _qp_value(preferences_bytes)
        if self._html_7bit:
            if self._needs_html_name:
                values[_HTML_NAME] = _html_name(shown)
            if self._needs_html_urls:
                values[_HTML_UNSUBSCRIBE] = _html_url(unsubscribe_url)
                values[_HTML_PREFERENCES] = _html_url(preferences_url)
        else:
            if self._needs_html_name:
                values[_HTML_NAME] = _qp_value(html_lib.escape(shown).encode("utf-8"))
            if self._needs_html_urls:
                values[_HTML_UNSUBSCRIBE] = _qp_value(_html_url(unsubscribe_url))
                values[_HTML_PREFERENCES] = _qp_value(_html_url(preferences_url))

        parts = self._parts.copy()
        for index, kind in self._slots:
            parts[index] = values[kind]
        if self._dkim is None:
            return b"".join(parts)
        return self._sign(parts)

    def _sign(self, parts: list[bytes]) -> bytes:
        assert self._dkim is not None
        at = self._dkim_head_index
        head = b"".join(parts[:at]) + self._dkim_head_tail
        pieces = [self._dkim_first_body, *parts[at + 1 :]]
        if self._dkim_plan is not None:
            digest = self._dkim_plan.digest(pieces)
        else:  # pragma: no cover - a body that ends in a per-recipient value
            from newsletter.dkim import body_hash

            digest = body_hash(b"".join(pieces))
        signature = self._dkim.signature_header(head, digest, memo=self._dkim_memo)
        return b"".join((signature, *parts))


# --- headers ---------------------------------------------------------------------------


def _ascii(text: str) -> bytes:
    return text.encode("ascii")


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 base64 encoded-words for ``text``, each at most 75 characters, split only
    between whole UTF-8 characters."""
    data = text.encode("utf-8")
    words = []
    start, size = 0, len(data)
    while start < size:
        end = min(start + _ENCODED_WORD_BYTES, size)
        while end < size and (data[end] & 0xC0) == 0x80:
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(data[start:end]).decode("ascii") + "?=")
        start = end
    return words


def _phrase_tokens(name: str) -> list[str]:
    """A display name as phrase tokens (RFC 5322 section 3.2.5), space-separated when
    folded: plain atoms, a quoted-string, or encoded-words when not ASCII."""
    if name.isascii() and name.isprintable():
        if _ATOM_PHRASE.fullmatch(name):
            return name.split(" ")
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return quoted.split(" ")
    return _encoded_words(name)


def _fold(field: str, tokens: list[str]) -> str:
    """``Field: tok tok ...`` folded (CRLF + space) before a token that would pass 78
    columns. A token longer than a line stays whole on its own line."""
    line = field + ":"
    lines = []
    bare = True
    for token in tokens:
        if not bare and len(line) + 1 + len(token) > HEADER_WIDTH:
            lines.append(line)
            line = " " + token
        else:
            line += " " + token
            bare = False
    lines.append(line)
    return "\r\n".join(lines)


def _unstructured_header(field: str, text: str) -> str:
    """An unstructured header (Subject): ASCII words as they are, each run of words that
    need it (non-ASCII, unprintable or too long to fold) as encoded-words."""
    tokens: list[str] = []
    run: list[str] = []
    for word in text.split():
        if word.isascii() and word.isprintable() and len(word) <= HEADER_WIDTH - 2:
            if run:
                tokens += _encoded_words(" ".join(run))
                run = []
            tokens.append(word)
        else:
            run.append(word)
    if run:
        tokens += _encoded_words(" ".join(run))
    return _fold(field, tokens) + "\r\n"


def _address_header(field: str, value: str) -> str:
    check_header_value(value, field)
    parsed = email_policy.default.header_factory(field, value)
    addresses: tuple[Any, ...] = tuple(getattr(parsed, "addresses", ()))
    if parsed.defects or len(addresses) != 1:
        raise HeaderValueError(f"{field} must be one valid address: {value!r}")
    address = addresses[0]
    addr_spec = address.addr_spec
    if not addr_spec.isascii() or not _ADDR_SPEC.fullmatch(addr_spec):
        raise HeaderValueError(f"{field} address must be a plain ASCII address: {value!r}")
    display = " ".join(_CONTROL_CHARS.sub("", address.display_name).split())
    if not display:
        return _fold(field, [addr_spec]) + "\r\n"
    return _fold(field, [*_phrase_tokens(display), f"<{addr_spec}>"]) + "\r\n"


def _list_id_header(value: str) -> str:
    """List-Id (RFC 2919): 'description <list-label.namespace>'; an ASCII description is
    kept as given (quoted if it needs to be), a non-ASCII one becomes encoded-words."""
    check_header_value(value, "List-Id")
    match = _LIST_ID.fullmatch(value.strip())
    if not match or not _DOT_ATOM.fullmatch(match.group(2)) or "." not in match.group(2):
        raise HeaderValueError(
            f"List-Id must look like 'Description <list.example.org>': {value!r}"
        )
    description = " ".join(match.group(1).split())
    identifier = f"<{match.group(2)}>"
    if not description:
        return f"List-Id: {identifier}\r\n"
    quoted = len(description) >= 2 and description[0] == description[-1] == '"'
    if description.isascii() and description.isprintable():
        if quoted or _ATOM_PHRASE.fullmatch(description):
            return _fold("List-Id", [*description.split(" "), identifier]) + "\r\n"
        return _fold("List-Id", [*_phrase_tokens(description), identifier]) + "\r\n"
    if quoted:
        description = re.sub(r"\\(.)", r"\1", description[1:-1])
    return _fold("List-Id", [*_encoded_words(description), identifier]) + "\r\n"


# --- bodies ----------------------------------------------------------------------------


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _merge(sequence: list[bytes | int]) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Join adjacent literal chunks; return the parts (slots left empty) and, for each
    slot, its index in the parts and its kind."""
    parts: list[bytes] = []
    slots: list[tuple[int, int]] = []
    pending: list[bytes] = []
    for item in sequence:
        if isinstance(item, bytes):
            pending.append(item)
            continue
        parts.append(b"".join(pending))
        pending = []
        slots.append((len(parts), item))
        parts.append(b"")
    parts.append(b"".join(pending))
    return parts, slots


def _qp_soft_break(encoded: bytes) -> bytes:
    """``encoded`` (quoted-printable, ending mid-line) followed by a soft line break, keeping
    every encoded line within 76 characters and never splitting an =XX escape."""
    line_start = encoded.rfind(b"\n") + 1
    if len(encoded) - line_start <= 75:
        return encoded + b"=\r\n"
    cut = line_start + 75
    if encoded[cut - 1 : cut] == b"=":
        cut -= 1
    elif encoded[cut - 2 : cut - 1] == b"=":
        cut -= 2
    return encoded[:cut] + b"=\r\n" + encoded[cut:] + b"=\r\n"


def _qp_value(data: bytes) -> bytes:
    """A per-recipient value (no newlines) quoted-printable encoded, starting at column 0
    and ending with a soft line break, so the next literal chunk starts at column 0."""
    if b"=" not in data and data.isascii():
        # Printable ASCII (the caller's values have no controls, CR/LF or edge blanks)
        # needs no escaping, only soft breaks: the common case, done without b2a_qp.
        size = len(data)
        if size <= 75:
            return data + b"=\r\n"
        if size <= 150:
            return b"".join((data[:75], b"=\r\n", data[75:], b"=\r\n"))
        return b"".join([data[i : i + 75] + b"=\r\n" for i in range(0, size, 75)])
    encoded = binascii.b2a_qp(data, istext=True)
    if b"\n" in encoded:
        encoded = encoded.replace(b"\n", b"\r\n")
    return _qp_soft_break(encoded)


_FROM_LINE: Final = re.compile(rb"^From ", re.MULTILINE)


def _qp_pieces(
    body: str, split_pattern: re.Pattern[str], slot_for: dict[str, int]
) -> list[bytes | int]:
    """``body`` quoted-printable encoded per literal chunk, with a slot for each placeholder.

    Each chunk and each substituted value starts at column 0 and ends either at a line end
    or with a soft line break, so chunks can be encoded once and joined in any order.
    """
    pieces: list[bytes | int] = []
    split = split_pattern.split(body)
    for index, piece in enumerate(split):
        if index % 2:
            pieces.append(slot_for[piece])
            continue
        if not piece:
            continue
        encoded = binascii.b2a_qp(piece.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
        # Some mbox-style delivery agents rewrite a line starting "From " to ">From ".
        encoded = _FROM_LINE.sub(b"=46rom ", encoded)
        if index + 1 < len(split) and not piece.endswith("\n"):
            encoded = _qp_soft_break(encoded)
        pieces.append(encoded)
    return pieces


def _html_7bit_pieces(html: str, layout: _Layout) -> list[bytes | int] | None:
    """The html as 7bit pieces with a slot for each placeholder: non-ASCII as character
    references (CSS escapes inside <style>), long lines wrapped at rendering-neutral spaces.

    None when some line cannot be wrapped under HTML_LINE_LIMIT (the caller then falls back
    to quoted-printable).
    """
    marked = _mark_breakable_spaces(_html_to_ascii(html))
    lines: list[str] = []
    for line in marked.split("\n"):
        if _measure(line, layout.budget) <= HTML_LINE_LIMIT:
            lines.append(line.replace(_BREAK, " "))
            continue
        words = line.split(_BREAK)
        current = words[0]
        width = _measure(current, layout.budget)
        for word in words[1:]:
            word_width = _measure(word, layout.budget)
            if width + 1 + word_width <= HTML_LINE_LIMIT:
                current += " " + word
                width += 1 + word_width
            else:
                if width > HTML_LINE_LIMIT:
                    return None
                lines.append(current)
                current, width = word, word_width
        if width > HTML_LINE_LIMIT:
            return None
        lines.append(current)
    wrapped = "\r\n".join(lines)
    pieces: list[bytes | int] = []
    for index, piece in enumerate(layout.split.split(wrapped)):
        if index % 2:
            pieces.append(layout.html_slots[piece])
        elif piece:
            pieces.append(piece.encode("ascii"))
    return pieces


def _measure(line: str, budget: dict[str, int]) -> int:
    """Length of a line once substituted, counting each placeholder at its largest size."""
    width = len(line)
    for marker, size in budget.items():
        if marker in line:
            width += line.count(marker) * (size - len(marker))
    return width


_STYLE_BLOCK: Final = re.compile(r"(<style\b[^>]*>.*?</style\s*>)", re.IGNORECASE | re.DOTALL)
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")


def _html_to_ascii(html: str) -> str:
    pieces = _STYLE_BLOCK.split(html)
    for index, piece in enumerate(pieces):
        if index % 2:
            # Character references mean nothing inside <style>: use CSS escapes there.
            pieces[index] = _NON_ASCII.sub(lambda m: f"\\{ord(m.group()):06x}", piece)
        else:
            pieces[index] = piece.encode("ascii", "xmlcharrefreplace").decode("ascii")
    return "".join(pieces)


_HTML_TOKEN: Final = re.compile(
    r"""<!--.*?-->|<[A-Za-z/!?](?:"[^"]*"|'[^']*'|[^'">])*>|[^<]+|<""", re.DOTALL
)
_TAG_NAME: Final = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
_TAG_SPACE: Final = re.compile(r"""("[^"]*"|'[^']*')| """)
_WHITESPACE_SENSITIVE: Final = frozenset(
    {"pre", "textarea", "style", "script", "xmp", "listing", "plaintext"}
)


def _mark_breakable_spaces(html: str) -> str:
    """Mark the spaces where a line break renders the same as the space: spaces in text
    (outside pre, textarea, style and script) and between the attributes of a tag (not
    inside quoted attribute values, nor in comments)."""
    out = []
    sensitive: str | None = None
    for match in _HTML_TOKEN.finditer(html):
        piece = match.group()
        if piece.startswith("<!--") or piece == "<":
            out.append(piece)
            continue
        tag = _TAG_NAME.match(piece)
        if tag:
            closing, name = tag.group(1), tag.group(2).lower()
            if sensitive is None and not closing and name in _WHITESPACE_SENSITIVE:
                sensitive = name
            elif closing and name == sensitive:
                sensitive = None
            out.append(_TAG_SPACE.sub(lambda m: m.group(1) or _BREAK, piece))
        elif piece.startswith("<"):
            out.append(piece)  # <!DOCTYPE ...> and other declarations
        elif sensitive is None:
            out.append(piece.replace(" ", _BREAK))
        else:
            out.append(piece)
    return "".join(out)


def _html_name(shown: str) -> bytes:
    escaped = html_lib.escape(shown).encode("ascii", "xmlcharrefreplace")
    while len(escaped) > MAX_HTML_NAME_OCTETS:
        shown = shown[: max(1, len(shown) * MAX_HTML_NAME_OCTETS // len(escaped)) - 1]
        escaped = html_lib.escape(shown).encode("ascii", "xmlcharrefreplace")
    return escaped


def _html_url(url: str) -> bytes:
    escaped = html_lib.escape(url).encode("ascii")
    if len(escaped) > MAX_URL_OCTETS:
        raise HeaderValueError("URL too long once HTML-escaped")
    return escaped
