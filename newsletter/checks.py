"""`newsletter issues check ID`: build an issue's message for a sample reader and list every
problem a mailbox provider or a mail client would have with it.

:func:`check_message` is pure (bytes in, problems out; the DKIM signature is verified with
dkimpy against the public half of our own key, no DNS, and links are checked for form only,
no network). :func:`check_issue` builds the message exactly as delivery does.
"""

from __future__ import annotations

import email
import email.policy
import html as html_lib
import re
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from newsletter import placeholders, production
from newsletter.dkim import REQUIRED_SIGNED, DkimSigner
from newsletter.errors import Conflict
from newsletter.message import format_date

HTML_LIMIT: Final = 100 * 1024
"""Gmail clips a message whose HTML passes 102 KB; we keep a margin."""

REQUIRED_HEADERS: Final = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Precedence",
)
SINGLE_HEADERS: Final = ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe")
UNSUPPORTED_TAGS: Final = ("script", "iframe", "form", "object", "embed", "video", "audio")
_FLEX_GRID: Final = re.compile(r"display\s*:\s*(?:inline-)?(?:flex|grid)\b", re.IGNORECASE)
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.?"
)
_ADDR: Final = re.compile(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+")


@dataclass(frozen=True)
class Problem:
    code: str  # a stable name: missing-header, long-line, dkim, broken-link, ...
    message: str
    severity: str = "error"  # error: fix before sending; warning: worth a look

    def __str__(self) -> str:
        return f"{self.severity}: {self.code}: {self.message}"


@dataclass
class CheckReport:
    issue_id: int
    reader: str
    message_bytes: int
    html_bytes: int
    signed: bool
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "issue": self.issue_id,
            "reader": self.reader,
            "message_bytes": self.message_bytes,
            "html_bytes": self.html_bytes,
            "dkim_signed": self.signed,
            "ok": not self.errors,
            "problems": [
                {"severity": p.severity, "code": p.code, "message": p.message}
                for p in self.problems
            ],
        }


def check_issue(
    session: Session,
    issue_id: int,
    links: Any,
    *,
    signer: DkimSigner | None,
    postal_address: str | None,
    in_production: bool = False,
) -> CheckReport:
    """Build the issue's message for the sample reader (newsletter/samples.py) exactly as a
    delivery would, signed when DKIM is configured, and check it (the production gate's
    problems are errors when `in_production`, warnings otherwise)."""
    from newsletter.issues import get_issue, sample_reader
    from newsletter.models import MailingList
    from newsletter.outgoing import build_for, prepare_issue

    issue = get_issue(session, issue_id)
    mlist = session.get(MailingList, issue.list_id)
    assert mlist is not None
    prepared = prepare_issue(issue, mlist)
    if signer is not None:
        prepared = replace(prepared, compiled=prepared.compiled.signed_by(signer))
    reader = sample_reader()
    data, _message_id = build_for(
        prepared,
        links,
        delivery_id=0,
        email=reader.email,
        name=reader.name,
        token=reader.token,
        date=format_date(),
    )
    problems = check_message(
        data, signer=signer, postal_address=postal_address, in_production=in_production
    )
    html = _html_of(data)
    return CheckReport(
        issue_id=issue_id,
        reader=reader.email,
        message_bytes=len(data),
        html_bytes=len(html.encode("utf-8")),
        signed=data.startswith(b"DKIM-Signature:"),
        problems=problems,
    )


def check_message(
    data: bytes,
    *,
    signer: DkimSigner | None = None,
    postal_address: str | None = None,
    html_limit: int = HTML_LIMIT,
    in_production: bool = False,
) -> list[Problem]:
    """Every problem of one built message (RFC 5322 bytes). The production gate's problems
    (no DKIM, http or localhost links, the placeholder postal address) are errors when
    `in_production` and warnings otherwise."""
    gate = "error" if in_production else "warning"
    problems: list[Problem] = []
    problems += _raw_problems(data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    problems += _header_problems(msg)
    problems += _dkim_problems(data, msg, signer, gate)
    html, text = "", ""
    for part in msg.walk():
        for defect in part.defects:
            problems.append(Problem("mime", f"{part.get_content_type()}: {defect!r}"))
        if part.get_content_type() == "text/html" and not html:
            html = str(part.get_content())
        elif part.get_content_type() == "text/plain" and not text:
            text = str(part.get_content())
    if not text.strip():
        problems.append(Problem("no-text-part", "the message has no plain-text part"))
    if not html.strip():
        problems.append(Problem("no-html-part", "the message has no HTML part"))
    else:
        problems += html_problems(html, limit=html_limit)
    for marker in sorted({m.group() for m in placeholders.ANY_MARKER.finditer(html + text)}):
        problems.append(Problem("placeholder", f"unsubstituted placeholder {marker!r}"))
    if postal_address:
        problems += _postal_problems(postal_address, text, html)
    if production.carries_placeholder_postal_address(
        text
    ) or production.carries_placeholder_postal_address(_visible(html)):
        problems.append(
            Problem(
                "postal-address",
                "the footer carries the placeholder postal address: set "
                "NEWSLETTER_POSTAL_ADDRESS and compose the issue again",
                gate,
            )
        )
    problems += _gate_link_problems(msg, text, html, gate)
    unsubscribe = _unsubscribe_https(msg)
    if (
        unsubscribe
        and html
        and html_lib.escape(unsubscribe) not in html
        and unsubscribe not in html
    ):
        problems.append(
            Problem("unsubscribe", "the HTML has no link to the List-Unsubscribe https URL")
        )
    return problems


# --- the raw bytes -------------------------------------------------------------------------------


def _raw_problems(data: bytes) -> list[Problem]:
    problems = []
    if b"\n" in data.replace(b"\r\n", b"") or b"\r" in data.replace(b"\r\n", b""):
        problems.append(Problem("line-ending", "a line ends in a bare LF or CR, not CRLF"))
    end = data.find(b"\r\n\r\n")
    header = data[: end + 2] if end >= 0 else data
    lines = data.split(b"\r\n")
    long_lines = [n for n, line in enumerate(lines, 1) if len(line) > 998]
    if long_lines:
        problems.append(
            Problem(
                "long-line",
                f"{len(long_lines)} line(s) over 998 octets (RFC 5322), first at line "
                f"{long_lines[0]}",
            )
        )
    if not header.isascii():
        bad = next(line for line in header.split(b"\r\n") if not line.isascii())
        problems.append(
            Problem(
                "non-ascii-header",
                f"raw non-ASCII bytes in a header (use RFC 2047): {bad[:60]!r}",
            )
        )
    # A line over 78 columns is only a fault where it could have been folded: a long URI
    # in List-Unsubscribe cannot be.
    wide = [
        line
        for line in header.split(b"\r\n")
        if len(line) > 78 and max(len(token) for token in line.split()) + 1 <= 78
    ]
    if wide:
        problems.append(
            Problem(
                "wide-header",
                f"{len(wide)} header line(s) over 78 characters, e.g. {wide[0][:40]!r}",
                "warning",
            )
        )
    return problems


def _header_problems(msg: EmailMessage) -> list[Problem]:
    problems = []
    for name in REQUIRED_HEADERS:
        if msg.get(name) is None:
            problems.append(Problem("missing-header", f"no {name} header"))
    for name in SINGLE_HEADERS:
        if len(msg.get_all(name) or []) > 1:
            problems.append(Problem("duplicate-header", f"more than one {name} header"))
    for name, value in msg.items():
        defects = getattr(value, "defects", ())
        if defects:
            problems.append(Problem("header", f"{name}: {defects[0]!r}"))
    post = msg.get("List-Unsubscribe-Post")
    if post is not None and str(post).strip() != "List-Unsubscribe=One-Click":
        problems.append(
            Problem("list-unsubscribe-post", "List-Unsubscribe-Post is not the RFC 8058 value")
        )
    precedence = msg.get("Precedence")
    if precedence is not None and str(precedence).strip().lower() != "bulk":
        problems.append(Problem("precedence", "Precedence is not 'bulk'"))
    unsubscribe = msg.get("List-Unsubscribe")
    if unsubscribe is not None:
        value = str(unsubscribe)
        if "<https://" not in value and "<http://" not in value:
            problems.append(Problem("list-unsubscribe", "List-Unsubscribe has no https URL"))
        if "<mailto:" not in value:
            problems.append(
                Problem("list-unsubscribe", "List-Unsubscribe has no mailto URI", "warning")
            )
    from_domain = _from_domain(msg)
    message_id = str(msg.get("Message-ID") or "")
    if from_domain and message_id and not message_id.rstrip(">").lower().endswith(from_domain):
        problems.append(
            Problem(
                "message-id", f"Message-ID {message_id} is not on the sending domain", "warning"
            )
        )
    return problems


def _dkim_problems(
    data: bytes, msg: EmailMessage, signer: DkimSigner | None, missing_severity: str = "warning"
) -> list[Problem]:
    signatures = msg.get_all("DKIM-Signature") or []
    if signer is None:
        if not signatures:
            return [
                Problem(
                    "dkim",
                    "not DKIM-signed: set NEWSLETTER_DKIM_DOMAIN, _SELECTOR and _KEY_FILE "
                    "(Gmail and Yahoo require DKIM for bulk mail)",
                    missing_severity,
                )
            ]
        return []
    if not signatures:
        return [Problem("dkim", "DKIM is configured but the message is not signed")]
    import dkim as dkimpy

    record = signer.dns_txt().encode("ascii")
    expected = f"{signer.dns_name}.".encode("ascii").lower()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.lower() == expected else None

    problems = []
    try:
        verified = dkimpy.verify(data, dnsfunc=dnsfunc)
    except Exception as exc:  # dkimpy raises many kinds for a malformed signature
        verified = False
        problems.append(Problem("dkim", f"the DKIM signature cannot be checked: {exc}"))
    if not verified:
        problems.append(Problem("dkim", "the DKIM signature does not verify"))
    tags = dict(
        (k.strip(), v.strip())
        for k, _, v in (t.partition("=") for t in "".join(str(signatures[0]).split()).split(";"))
    )
    signed = {h.lower() for h in tags.get("h", "").split(":")}
    missing = [h for h in REQUIRED_SIGNED if h.lower() not in signed]
    if missing:
        problems.append(Problem("dkim", "the signature does not cover " + ", ".join(missing)))
    from_domain = _from_domain(msg)
    d = tags.get("d", "").lower()
    if from_domain and not (from_domain == d or from_domain.endswith("." + d)):
        problems.append(
            Problem(
                "dkim-alignment",
                f"DKIM d={d} is not aligned with the From domain {from_domain} (DMARC)",
            )
        )
    return problems


# --- the HTML ------------------------------------------------------------------------------------


class _HtmlAudit(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.anchors: set[str] = set()
        self.images: list[dict[str, str | None]] = []
        self.unsupported: set[str] = set()
        self.flex_or_grid = False
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in UNSUPPORTED_TAGS:
            self.unsupported.add(tag)
        if tag == "a" and "href" in values:
            self.links.append(values["href"] or "")
        if tag == "img":
            self.images.append(values)
        for key in ("id", "name"):
            if values.get(key):
                self.anchors.add(str(values[key]))
        if _FLEX_GRID.search(values.get("style") or ""):
            self.flex_or_grid = True
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style and _FLEX_GRID.search(data):
            self.flex_or_grid = True


def html_problems(html: str, *, limit: int = HTML_LIMIT) -> list[Problem]:
    """Problems of an email's HTML: size, links, images, and what mail clients ignore."""
    problems = []
    size = len(html.encode("utf-8"))
    if size > limit:
        problems.append(
            Problem(
                "html-size",
                f"the HTML is {size / 1024:.0f} KB; Gmail clips messages over 102 KB "
                f"(keep it under {limit // 1024} KB)",
            )
        )
    audit = _HtmlAudit()
    audit.feed(html)
    audit.close()
    for href in audit.links:
        reason = link_problem(href, audit.anchors)
        if reason:
            problems.append(Problem("broken-link", f"{reason}: {href[:120]!r}"))
    for image in audit.images:
        src = (image.get("src") or "")[:80]
        if image.get("alt") is None:
            problems.append(Problem("missing-alt", f"image without alt text: {src!r}"))
        if not image.get("width"):
            problems.append(Problem("image-width", f"image without width: {src!r}", "warning"))
        if src and link_problem(src, set(), images=True):
            problems.append(Problem("broken-image", f"image source is not an https URL: {src!r}"))
    for tag in sorted(audit.unsupported):
        problems.append(
            Problem("unsupported-html", f"<{tag}> is removed or ignored by mail clients")
        )
    if audit.flex_or_grid:
        problems.append(
            Problem(
                "unsupported-css", "display:flex/grid is ignored by Outlook and Gmail; use tables"
            )
        )
    return problems


def link_problem(href: str, anchors: set[str], *, images: bool = False) -> str | None:
    """Why a link in an email cannot work, or None. Form only: nothing is fetched."""
    value = href.strip()
    if not value:
        return "empty link"
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        return "white space or a control character in the URL"
    if value.startswith("#") and not images:
        return None if value[1:] in anchors else "link to a missing anchor"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return f"malformed URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme == "mailto" and not images:
        return None if _ADDR.search(parts.path) else "mailto: without an address"
    if scheme not in ("http", "https"):
        return (
            "not an absolute http(s) URL" if not scheme else f"{scheme}: links do not work in email"
        )
    host = parts.hostname or ""
    if not host or (not _HOST.fullmatch(host) and not _is_ip(host)):
        return "no valid host"
    if port == 0:
        return "port 0"
    return None


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- helpers -------------------------------------------------------------------------------------


def _postal_problems(postal_address: str, text: str, html: str) -> list[Problem]:
    lines = [" ".join(line.split()) for line in postal_address.splitlines() if line.strip()]
    flat_text = " ".join(text.split())
    flat_html = " ".join(_visible(html).split())
    problems = []
    for where, body in (("text", flat_text), ("HTML", flat_html)):
        if lines and not all(line in body for line in lines):
            problems.append(
                Problem("postal-address", f"the postal address is not in the {where} footer")
            )
    return problems


_URL_IN_TEXT: Final = re.compile(r"https?://[^\s<>\"')\]]+", re.IGNORECASE)


def _gate_link_problems(msg: EmailMessage, text: str, html: str, severity: str) -> list[Problem]:
    """Links a reader cannot safely follow (production.url_problem): http, or to localhost.
    One problem per kind, with how many and the first, from both parts and the headers."""
    audit = _HtmlAudit()
    audit.feed(html)
    audit.close()
    urls = [*audit.links, *(str(i.get("src") or "") for i in audit.images)]
    urls += _URL_IN_TEXT.findall(text)
    urls += re.findall(r"<(https?://[^>]+)>", str(msg.get("List-Unsubscribe") or ""))
    found: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        for reason in production.url_problems(url):
            found.setdefault(reason, []).append(url)
    problems = []
    for reason, code in (("on localhost", "local-link"), ("not https", "insecure-link")):
        if reason in found:
            first, n = found[reason][0], len(found[reason])
            problems.append(
                Problem(
                    code,
                    f"{n} link(s) {reason} (readers cannot use them), e.g. {first[:120]}",
                    severity,
                )
            )
    return problems


def _visible(html: str) -> str:
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", html))


def _from_domain(msg: EmailMessage) -> str:
    value = msg.get("From")
    addresses = getattr(value, "addresses", ())
    return str(addresses[0].domain).lower() if addresses else ""


def _unsubscribe_https(msg: EmailMessage) -> str | None:
    found = re.search(r"<(https?://[^>]+)>", str(msg.get("List-Unsubscribe") or ""))
    return found.group(1) if found else None


def _html_of(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    body = msg.get_body(("html",))
    return str(body.get_content()) if body is not None else ""


# --- the send gate -------------------------------------------------------------------------------


class SendRefused(Conflict):
    """A send in production that `issues check` finds errors in (409); nothing was changed."""

    def __init__(self, issue_id: int, problems: list[Problem]) -> None:
        self.issue_id = issue_id
        self.problems = problems
        listed = "; ".join(f"{p.code}: {p.message}" for p in problems)
        super().__init__(
            f"issue {issue_id} cannot be sent in production: {listed} "
            f"(see: newsletter issues check {issue_id})"
        )

    @property
    def details(self) -> dict[str, Any]:
        """What the API adds to its {"error": ...} answer."""
        return {
            "problems": [
                {"severity": p.severity, "code": p.code, "message": p.message}
                for p in self.problems
            ],
        }


def refuse_unsafe_send(
    session: Session,
    issue_id: int,
    links: Any,
    *,
    signer: DkimSigner | None,
    postal_address: str | None,
    in_production: bool,
) -> None:
    """In production, raise SendRefused while `issues check` reports an error for the issue
    (what `issues check` prints, it prints for the same reasons). Elsewhere, nothing."""
    if not in_production:
        return
    report = check_issue(
        session, issue_id, links, signer=signer, postal_address=postal_address, in_production=True
    )
    if report.errors:
        raise SendRefused(issue_id, report.errors)
