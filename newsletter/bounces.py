"""What comes back, in our own words (pure): bounces, complaints and unsubscribe mails.

Mail that returns to the bounce address or the list address is translated at the edge into
:class:`FeedbackEvent` values of one small vocabulary (:class:`EventType`), with plain lookup
tables, whatever its dialect:

* RFC 3464 delivery status notifications (``multipart/report; report-type=delivery-status``):
  each per-recipient block's Action and Status fields (``ACTION_TYPES``, ``STATUS_CLASSES``,
  ``STATUS_DETAILS``);
* RFC 5965 ARF complaint reports (``report-type=feedback-report``): ``FEEDBACK_TYPES``;
* the bounces that are no DSN at all (old Exchange, qmail and Yahoo texts, and DSNs whose
  structure was mangled on the way): an enhanced status code, the phrases of
  ``TEXT_PATTERNS``, or a bare SMTP reply code (``SMTP_CODES``) in the human-readable text;
* a mail to the List-Unsubscribe ``mailto:`` (see :mod:`newsletter.inbound`);
* and, as not-bounces, auto-replies (RFC 3834) and read receipts.

Which delivery a report is about comes from, in order of trust: the VERP envelope sender
it was returned to (``bounces+ID-MAC@BOUNCE_DOMAIN``, see :class:`Verp`, an HMAC the sender
cannot forge), our Message-ID ``<dID.NONCE@domain>`` in the returned headers, the signed
unsubscribe token in the returned List-Unsubscribe, and last the recipient address the report
names. Applying the events to the database is :mod:`newsletter.feedback`'s job.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import enum
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.message import Message
from email.parser import HeaderParser
from typing import Final

from newsletter.inbound import unsubscribe_token as mailto_unsubscribe_token


class EventType(enum.StrEnum):
    """Our vocabulary for everything that comes back."""

    HARD_BOUNCE = "hard_bounce"  # the address does not work: suppress at once
    SOFT_BOUNCE = "soft_bounce"  # it failed this time (full mailbox, policy, gave up later)
    DEFERRED = "deferred"  # a delay warning: the remote side is still trying
    DELIVERED = "delivered"  # a positive DSN: it reached the mailbox
    COMPLAINT = "complaint"  # the reader marked it as spam (ARF)
    UNSUBSCRIBE = "unsubscribe"  # a mail to the List-Unsubscribe mailto: address
    AUTO_REPLY = "auto_reply"  # out of office, vacation, read receipt: not a bounce
    UNKNOWN = "unknown"  # nothing we understand (a human reply, spam to the bounce address)


ACTIONABLE: Final = frozenset(
    {
        EventType.HARD_BOUNCE,
        EventType.SOFT_BOUNCE,
        EventType.DELIVERED,
        EventType.COMPLAINT,
        EventType.UNSUBSCRIBE,
    }
)
"""The kinds that change something; the others are reported and otherwise ignored."""

# --- lookup tables -------------------------------------------------------------------------------

# RFC 3464 section 2.3.3 Action. None: decided by the status code.
ACTION_TYPES: Final[dict[str, EventType | None]] = {
    "failed": None,
    "delayed": EventType.DEFERRED,
    "delivered": EventType.DELIVERED,
    "relayed": EventType.UNKNOWN,  # handed to a system that sends no DSN: no news
    "expanded": EventType.UNKNOWN,  # delivered to a list or alias: no news about the reader
}

# RFC 3463 status classes.
STATUS_CLASSES: Final = {
    "2": EventType.DELIVERED,
    "4": EventType.SOFT_BOUNCE,
    "5": EventType.HARD_BOUNCE,
}

# Permanent failures that say nothing bad about the address itself: counted as soft, so a
# reader is not dropped for a full mailbox, a message too big, or our own reputation.
STATUS_DETAILS: Final = {
    "5.2.2": EventType.SOFT_BOUNCE,  # mailbox full
    "5.2.3": EventType.SOFT_BOUNCE,  # message longer than the mailbox accepts
    "5.3.4": EventType.SOFT_BOUNCE,  # message too big for the system
    "5.4.7": EventType.SOFT_BOUNCE,  # delivery time expired
    "5.7": EventType.SOFT_BOUNCE,  # 5.7.x security or policy: spam filters, blocklists
}

# RFC 5965 section 7.3 Feedback-Type.
FEEDBACK_TYPES: Final = {
    "abuse": EventType.COMPLAINT,
    "fraud": EventType.COMPLAINT,
    "other": EventType.COMPLAINT,
    "virus": EventType.UNKNOWN,
    "not-spam": EventType.UNKNOWN,
    "auth-failure": EventType.UNKNOWN,
}

# Bare SMTP reply codes (RFC 5321) in a text bounce with no enhanced status.
SMTP_CODES: Final = {
    "550": EventType.HARD_BOUNCE,
    "551": EventType.HARD_BOUNCE,
    "553": EventType.HARD_BOUNCE,
    "554": EventType.HARD_BOUNCE,
    "552": EventType.SOFT_BOUNCE,  # RFC 5321 4.5.3.1.10: treat as temporary
    "421": EventType.SOFT_BOUNCE,
    "450": EventType.SOFT_BOUNCE,
    "451": EventType.SOFT_BOUNCE,
    "452": EventType.SOFT_BOUNCE,
}

# The phrases receiving systems use, first match wins (a full mailbox before "unavailable").
TEXT_PATTERNS: Final[tuple[tuple[re.Pattern[str], EventType], ...]] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind)
    for pattern, kind in (
        (
            r"mailbox (?:is )?full|over ?quota|quota (?:exceeded|exhausted)|"
            r"exceeded (?:the|its|their) storage|insufficient (?:system )?storage|"
            r"mailbox has exceeded",
            EventType.SOFT_BOUNCE,
        ),
        (
            r"user unknown|unknown user|no such (?:user|recipient|mailbox|address)|"
            r"does ?n[o']t exist|address not found|recipient not found|recipnotfound|"
            r"(?:invalid|not a valid) (?:mailbox|recipient|address)|"
            r"unknown (?:recipient|mailbox|address)|"
            r"mailbox (?:is )?unavailable|no mailbox here|not our customer|"
            r"account (?:has been |is )?(?:disabled|deactivated|closed|suspended|inactive)|"
            r"addressee unknown|doesn't have an? [\w.-]+ account|unrouteable address|"
            r"recipient address rejected|couldn't be found",
            EventType.HARD_BOUNCE,
        ),
        (
            r"temporar(?:y|ily)|try again later|deferred|greylist|rate limit|"
            r"too many (?:connections|messages)|timed? ?out|connection (?:refused|reset)",
            EventType.SOFT_BOUNCE,
        ),
    )
)

# Who sends bounces, and what they call them.
_DAEMON_FROM: Final = re.compile(
    r"mailer-?daemon|postmaster|mail delivery (?:system|subsystem)|mail-?daemon",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT: Final = re.compile(
    r"undeliver|undelivered mail|delivery status notification|mail delivery fail|"
    r"failure notice|returned mail|delivery (?:has )?fail|could not be delivered|"
    r"non remis|unzustellbar|no se puede entregar|wasn't delivered",
    re.IGNORECASE,
)
_AUTO_SUBJECT: Final = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response)|auto:|out of (?:the )?office|autoreply|"
    r"vacation|abwesenheit|r[ée]ponse automatique|respuesta autom[áa]tica|away from)",
    re.IGNORECASE,
)
# Where the human-readable text of a bounce ends and the copy of our message begins.
_ORIGINAL_MARKERS: Final = re.compile(
    r"^(?:-+ ?(?:original message|this is a copy of|below this line)|"
    r"original message follows|-+ ?forwarded message|content-type: message/rfc822)",
    re.IGNORECASE | re.MULTILINE,
)
_ENHANCED_STATUS: Final = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE: Final = re.compile(r"(?<![\w.])([45][0-5]\d)(?=[ :-]|$)", re.MULTILINE)
_ADDRESS: Final = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,63}")
_OUR_MESSAGE_ID: Final = re.compile(r"<d(\d{1,19})\.([A-Za-z0-9_-]{1,32})@([A-Za-z0-9.-]+)>")
_UNSUBSCRIBE_LINK: Final = re.compile(
    r"/unsubscribe/([A-Za-z0-9_-]{8,128}\.[A-Za-z0-9_-]{16,128})|"
    r"subject=unsubscribe(?:%20|\+| )([A-Za-z0-9_-]{8,128}\.[A-Za-z0-9_-]{16,128})"
)
_LIST_ID: Final = re.compile(r"<([A-Za-z0-9][A-Za-z0-9-]*)\.([A-Za-z0-9.-]+)>")
_ENVELOPE_HEADERS: Final = (
    "To",
    "Delivered-To",
    "X-Original-To",
    "Envelope-To",
    "X-Envelope-To",
    "X-Original-Recipient",
    "Received",
)


# --- VERP ----------------------------------------------------------------------------------------


class Verp:
    """Envelope senders that name their delivery: ``bounces+ID-MAC@BOUNCE_DOMAIN``.

    MAC is 12 hex digits of an HMAC-SHA256 of the id under the first secret key (any of the
    keys verifies it, so SECRET_KEY can rotate). Lower-case hex survives the MTAs that fold
    the case of local parts; a bounce to a forged or mistyped address names no delivery.
    """

    LOCAL: Final = "bounces"

    def __init__(self, domain: str, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self.domain = domain.lower()
        self._keys = [k.encode("utf-8") for k in keys]
        self._pattern = re.compile(
            rf"{self.LOCAL}\+(\d{{1,19}})-([0-9a-f]{{12}})@{re.escape(self.domain)}\b",
            re.IGNORECASE,
        )

    def _mac(self, key: bytes, delivery_id: int) -> str:
        return hmac.new(key, b"verp:%d" % delivery_id, hashlib.sha256).hexdigest()[:12]

    def address(self, delivery_id: int) -> str:
        """The envelope sender for one delivery."""
        return f"{self.LOCAL}+{delivery_id}-{self._mac(self._keys[0], delivery_id)}@{self.domain}"

    def delivery_of(self, text: str) -> int | None:
        """The delivery id of the first genuine VERP address in ``text``, else None."""
        for match in self._pattern.finditer(text):
            delivery_id, mac = int(match.group(1)), match.group(2).lower()
            if any(hmac.compare_digest(mac, self._mac(k, delivery_id)) for k in self._keys):
                return delivery_id
        return None


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackEvent:
    """One thing a returned mail says about one recipient."""

    type: EventType
    source: str  # dsn, arf, text, mailto, auto-reply, unknown
    report_id: str  # identifies the returned mail itself (its Message-ID, or a hash)
    recipient: str | None = None  # the address the report names, domain lower-cased
    delivery_id: int | None = None  # from a genuine VERP address: trusted
    message_id: str | None = None  # Message-ID of our original message, if returned
    list_id: str | None = None  # the List-Id identifier of the original, e.g. world.example.org
    unsubscribe_token: str | None = None  # a signed unsubscribe token (mailto, or original)
    status: str | None = None  # enhanced status code, e.g. 5.1.1
    diagnostic: str | None = None  # what the remote side said, one line

    @property
    def actionable(self) -> bool:
        return self.type in ACTIONABLE


def parse(raw: bytes, *, verp: Verp | None = None) -> list[FeedbackEvent]:
    """Every event ``raw`` (one RFC 5322 message as received) carries; at least one (of
    type UNKNOWN when the message is nothing we understand)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    report_id = _report_id(msg, raw)
    delivery_id = _verp_delivery(msg, raw, verp)
    report_type = _report_type(msg)
    events: list[FeedbackEvent]
    if report_type == "delivery-status":
        events = _parse_dsn(msg, report_id)
    elif report_type == "feedback-report":
        events = _parse_arf(msg, report_id)
    elif report_type == "disposition-notification":
        events = [FeedbackEvent(EventType.AUTO_REPLY, "auto-reply", report_id)]
    else:
        events = _parse_other(msg, raw, report_id, verp_identified=delivery_id is not None)
    original = _original_references(msg, raw)
    return [
        replace(
            event,
            delivery_id=delivery_id,
            message_id=event.message_id or original.message_id,
            list_id=event.list_id or original.list_id,
            unsubscribe_token=event.unsubscribe_token or original.unsubscribe_token,
        )
        for event in events
    ]


def smtp_rejection(delivery_id: int, code: int, reply: str) -> FeedbackEvent:
    """A permanent refusal at RCPT time, in our own words: the event a DSN saying the same
    would be (5.1.1 hard, 5.2.2 or 5.7.x soft, a bare 550 with "user unknown" hard, ...),
    about the delivery that drew it. Never unknown: a refusal we cannot read is hard, as
    the SMTP code says."""
    text = _one_line(f"{code} {reply}")
    status = _status("", text)
    kind = _classify(status, text) or EventType.HARD_BOUNCE
    return FeedbackEvent(
        kind, "smtp", f"smtp:{delivery_id}", delivery_id=delivery_id, status=status, diagnostic=text
    )


# --- the parsers ---------------------------------------------------------------------------------


def _parse_dsn(msg: Message, report_id: str) -> list[FeedbackEvent]:
    status_part = _first_part(msg, ("message/delivery-status", "message/global-delivery-status"))
    blocks = _dsn_blocks(status_part) if status_part is not None else []
    events = []
    for block in blocks[1:] if len(blocks) > 1 else blocks:
        action = block.get("action", "").strip().lower()
        if not action and "final-recipient" not in block:
            continue
        recipient = _dsn_address(block.get("final-recipient") or block.get("original-recipient"))
        diagnostic = _one_line(block.get("diagnostic-code", ""))
        status = _status(block.get("status", ""), diagnostic)
        kind = ACTION_TYPES.get(action, None) if action else None
        if kind is None:
            kind = _classify(status, diagnostic) or (
                EventType.HARD_BOUNCE if action == "failed" else EventType.UNKNOWN
            )
        events.append(
            FeedbackEvent(
                kind,
                "dsn",
                report_id,
                recipient=recipient,
                status=status,
                diagnostic=diagnostic or None,
            )
        )
    if events:
        return events
    # A report without a readable per-recipient block: read it as a text bounce.
    return [_text_bounce(msg, report_id, verp_identified=True)]


def _parse_arf(msg: Message, report_id: str) -> list[FeedbackEvent]:
    part = _first_part(msg, ("message/feedback-report",))
    fields = _dsn_blocks(part)[0] if part is not None and _dsn_blocks(part) else {}
    feedback_type = fields.get("feedback-type", "").strip().lower()
    kind = FEEDBACK_TYPES.get(feedback_type, EventType.COMPLAINT)
    original = _original_headers(msg)
    recipient = _dsn_address(fields.get("original-rcpt-to") or fields.get("removal-recipient"))
    if recipient is None and original is not None:
        recipient = _dsn_address(_decode(original.get("To", "")))
    return [
        FeedbackEvent(
            kind,
            "arf",
            report_id,
            recipient=recipient,
            diagnostic=f"feedback-type {feedback_type or 'missing'}",
        )
    ]


def _parse_other(
    msg: Message, raw: bytes, report_id: str, *, verp_identified: bool
) -> list[FeedbackEvent]:
    token = mailto_unsubscribe_token(raw)
    if token is not None:
        return [
            FeedbackEvent(
                EventType.UNSUBSCRIBE,
                "mailto",
                report_id,
                recipient=_dsn_address(_decode(msg.get("From", ""))),
                unsubscribe_token=token,
            )
        ]
    if _is_daemon(msg):
        return [_text_bounce(msg, report_id, verp_identified=verp_identified)]
    if _is_auto_reply(msg):
        return [FeedbackEvent(EventType.AUTO_REPLY, "auto-reply", report_id)]
    return [FeedbackEvent(EventType.UNKNOWN, "unknown", report_id)]


def _text_bounce(msg: Message, report_id: str, *, verp_identified: bool) -> FeedbackEvent:
    """A bounce that is text for humans: find its status code or phrase, and the address."""
    text = _human_text(msg)
    status = _status("", text)
    diagnostic = _diagnostic_line(text, status)
    kind = _classify(status, text)
    if kind is None:
        # A failure notice we cannot read: never suppress on it at once.
        kind = EventType.SOFT_BOUNCE if verp_identified or _addresses(text) else EventType.UNKNOWN
    recipients = _addresses(text)
    return FeedbackEvent(
        kind,
        "text",
        report_id,
        recipient=recipients[0] if recipients else None,
        status=status,
        diagnostic=diagnostic,
    )


def _classify(status: str | None, text: str) -> EventType | None:
    """The event a status code and the remote side's words amount to (None: they say
    nothing we recognise)."""
    if status:
        for prefix in (status, status.rsplit(".", 1)[0]):
            if prefix in STATUS_DETAILS:
                return STATUS_DETAILS[prefix]
        by_class = STATUS_CLASSES[status[0]]
        if by_class is EventType.HARD_BOUNCE and _phrase(text) is EventType.SOFT_BOUNCE:
            return EventType.SOFT_BOUNCE  # "550 5.1.1 mailbox full" happens
        return by_class
    phrase = _phrase(text)
    if phrase is not None:
        return phrase
    code = _SMTP_CODE.search(text)
    return SMTP_CODES.get(code.group(1)) if code else None


def _phrase(text: str) -> EventType | None:
    for pattern, kind in TEXT_PATTERNS:
        if pattern.search(text):
            return kind
    return None


def _status(field: str, diagnostic: str) -> str | None:
    """The enhanced status code: the Status field's, unless it only says x.0.0 and the
    diagnostic names a more precise one."""
    found = _ENHANCED_STATUS.search(field)
    status = found.group(0) if found else None
    if status is None or status.endswith(".0.0"):
        precise = _ENHANCED_STATUS.search(diagnostic)
        if precise and (status is None or precise.group(1) == status[0]):
            status = precise.group(0)
    return status


# --- message anatomy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Original:
    message_id: str | None = None
    list_id: str | None = None
    unsubscribe_token: str | None = None


def _original_references(msg: Message, raw: bytes) -> _Original:
    """What identifies our original message inside a returned mail: our Message-ID, its
    List-Id and the signed token of its List-Unsubscribe, wherever they appear (a returned
    copy, text/rfc822-headers, a quoted copy in the text, In-Reply-To)."""
    original = _original_headers(msg)
    sources: list[str] = []
    if original is not None:
        sources.append(
            "\n".join(
                f"{k}: {_decode(v)}"
                for k, v in original.items()
                if k.lower() in ("message-id", "list-id", "list-unsubscribe")
            )
        )
    sources.append(raw.decode("utf-8", "replace"))
    message_id = list_id = token = None
    for text in sources:
        if message_id is None and (found := _OUR_MESSAGE_ID.search(text)):
            message_id = found.group(0)
        if token is None and (link := _UNSUBSCRIBE_LINK.search(text)):
            token = link.group(1) or link.group(2)
        if list_id is None:
            for line in text.splitlines():
                if line.lower().startswith("list-id:") and (ident := _LIST_ID.search(line)):
                    list_id = f"{ident.group(1)}.{ident.group(2)}".lower()
                    break
    return _Original(message_id, list_id, token)


def _original_headers(msg: Message) -> Message | None:
    """The header of the original message a report returns, if it returns one."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if kind in ("text/rfc822-headers", "text/global-headers"):
            body = _text_of(part)
            return HeaderParser(policy=email.policy.compat32).parsestr(body)
    return None


def _report_type(msg: Message) -> str | None:
    for part in msg.walk():
        if part.get_content_type() == "multipart/report":
            report = part.get_param("report-type")
            return str(report).lower() if isinstance(report, str) else None
        if part.get_content_type() == "message/feedback-report":
            return "feedback-report"
    if msg.get_content_type() == "message/delivery-status":
        return "delivery-status"
    return None


def _first_part(msg: Message, types: Sequence[str]) -> Message | None:
    for part in msg.walk():
        if part.get_content_type() in types:
            return part
    return None


def _dsn_blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a message/delivery-status or message/feedback-report part
    (per-message block first), field names lower-cased."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [
            {k.lower(): _decode(v) for k, v in block.items()}
            for block in payload
            if isinstance(block, Message)
        ]
    text = _text_of(part)
    blocks: list[dict[str, str]] = []
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text):
        fields = HeaderParser(policy=email.policy.compat32).parsestr(chunk.strip() + "\n")
        if len(fields):
            blocks.append({k.lower(): _decode(v) for k, v in fields.items()})
    return blocks


def _human_text(msg: Message) -> str:
    """The readable text of a bounce, without the copy of our message it may carry."""
    pieces = []
    for part in msg.walk():
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            break
        if part.get_content_maintype() == "text":
            pieces.append(_text_of(part))
    text = "\n".join(pieces) or _text_of(msg)
    cut = _ORIGINAL_MARKERS.search(text)
    return text[: cut.start()] if cut else text


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        charset = part.get_content_charset() or "utf-8"
        try:
            return payload.decode(charset, "replace")
        except LookupError:
            return payload.decode("utf-8", "replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""


def _diagnostic_line(text: str, status: str | None) -> str | None:
    """The line of a text bounce that carries the remote server's reply."""
    for line in text.splitlines():
        if (status and status in line) or _SMTP_CODE.search(line) or _phrase(line):
            return _one_line(line) or None
    return None


def _is_daemon(msg: Message) -> bool:
    sender = _decode(msg.get("From", ""))
    return bool(_DAEMON_FROM.search(sender)) or bool(
        _BOUNCE_SUBJECT.search(_decode(msg.get("Subject", "")))
    )


def _is_auto_reply(msg: Message) -> bool:
    auto = _decode(msg.get("Auto-Submitted", "")).strip().lower()
    if auto and auto != "no":
        return True
    if any(msg.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Autoresponder")):
        return True
    if _decode(msg.get("Precedence", "")).strip().lower() in ("auto_reply", "auto-reply"):
        return True
    subject = _decode(msg.get("Subject", "")).strip()
    return bool(_AUTO_SUBJECT.search(subject))


def _verp_delivery(msg: Message, raw: bytes, verp: Verp | None) -> int | None:
    """The delivery a genuine VERP address names: where the report was delivered to, else
    anywhere in it (an ARF report's Original-Mail-From, a returned Return-Path)."""
    if verp is None:
        return None
    for name in _ENVELOPE_HEADERS:
        for value in msg.get_all(name, []):
            found = verp.delivery_of(_decode(value))
            if found is not None:
                return found
    return verp.delivery_of(raw.decode("utf-8", "replace"))


def _report_id(msg: Message, raw: bytes) -> str:
    message_id = _decode(msg.get("Message-ID", "")).strip()
    if message_id and len(message_id) <= 200:
        return message_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# --- small helpers -------------------------------------------------------------------------------


def _decode(value: object) -> str:
    """A header value as text (RFC 2047 decoded); never raises."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        return str(value)
    text = str(value)
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _dsn_address(value: str | None) -> str | None:
    """The address of a Final-Recipient ('rfc822; a@b'), an address field or a bare
    address, domain lower-cased; None when there is none."""
    if not value:
        return None
    found = _addresses(value.rpartition(";")[2] if ";" in value else value)
    return found[0] if found else None


def _addresses(text: str) -> list[str]:
    found = []
    for match in _ADDRESS.finditer(text):
        local, _, domain = match.group(0).rpartition("@")
        address = f"{local}@{domain.lower().rstrip('.')}"
        if address not in found and not _DAEMON_FROM.search(local) and "+" not in local[:8]:
            found.append(address)
    return found


def redact(text: str | None) -> str | None:
    """``text`` with every email address replaced by <address> (for what we store)."""
    if text is None:
        return None
    return _ADDRESS.sub("<address>", text)[:500]
