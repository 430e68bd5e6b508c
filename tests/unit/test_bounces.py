"""Returned mail in our own words: every sample shape in tests/data/bounces (RFC 3464 DSNs,
Postfix, Exchange and Outlook NDRs, Gmail, Yahoo, an ARF complaint, an auto-reply, a mail to
the unsubscribe address, a DSN mangled down to its VERP address, a human reply) maps to the
right event about the right delivery or address."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.bounces import (
    ACTIONABLE,
    EventType,
    FeedbackEvent,
    Verp,
    _classify,
    parse,
    redact,
    smtp_rejection,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "bounces"
VERP = Verp("bounces.example.org", ["test-secret-key"])
NONCE = "a1b2c3d4e5f6"

# file: (event, recipient, VERP delivery, status)
EXPECTED: dict[str, tuple[EventType, str | None, int | None, str | None]] = {
    "rfc3464_hard.eml": (EventType.HARD_BOUNCE, "ann@example.com", 1201, "5.1.1"),
    "rfc3464_soft.eml": (EventType.SOFT_BOUNCE, "ben@example.net", 1202, "4.2.2"),
    "postfix_hard.eml": (EventType.HARD_BOUNCE, "carol@example.com", 1203, "5.1.1"),
    "postfix_delayed.eml": (EventType.DEFERRED, "dan@example.com", 1204, "4.4.1"),
    "exchange_ndr.eml": (EventType.HARD_BOUNCE, "erin@contoso.example", 1205, "5.1.10"),
    "exchange_legacy_text.eml": (EventType.HARD_BOUNCE, "frank@fabrikam.example", 1206, "5.1.1"),
    "gmail_hard.eml": (EventType.HARD_BOUNCE, "gina.example@gmail.com", 1207, "5.1.1"),
    "gmail_over_quota.eml": (EventType.SOFT_BOUNCE, "hugo.example@gmail.com", 1208, "4.2.2"),
    "yahoo_text.eml": (EventType.HARD_BOUNCE, "frank.example@yahoo.com", 1209, None),
    "arf_complaint.eml": (EventType.COMPLAINT, None, 1210, None),
    "auto_reply.eml": (EventType.AUTO_REPLY, None, 1211, None),
    "mailto_unsubscribe.eml": (EventType.UNSUBSCRIBE, "jane@example.com", None, None),
    "mangled_dsn.eml": (EventType.HARD_BOUNCE, None, 1212, "5.1.1"),
    "human_reply.eml": (EventType.UNKNOWN, None, 1201, None),
}


def events(name: str, verp: Verp | None = VERP) -> list[FeedbackEvent]:
    return parse((SAMPLES / name).read_bytes(), verp=verp)


def test_there_is_a_sample_of_every_shape() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.eml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 10


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_maps_to_the_right_event(name: str) -> None:
    kind, recipient, delivery_id, status = EXPECTED[name]
    found = events(name)
    assert len(found) == 1
    event = found[0]
    assert event.type is kind
    assert event.recipient == recipient
    assert event.delivery_id == delivery_id
    assert event.status == status
    assert event.report_id  # every event can be told apart from every other report


@pytest.mark.parametrize(
    "name",
    [n for n, e in EXPECTED.items() if e[0] in (EventType.HARD_BOUNCE, EventType.SOFT_BOUNCE)],
)
def test_bounces_carry_the_remote_servers_words(name: str) -> None:
    event = events(name)[0]
    assert event.diagnostic and len(event.diagnostic) <= 500 and "\n" not in event.diagnostic


@pytest.mark.parametrize(
    "name",
    [
        "rfc3464_hard.eml",
        "rfc3464_soft.eml",
        "postfix_hard.eml",
        "exchange_ndr.eml",
        "gmail_hard.eml",
        "gmail_over_quota.eml",
        "yahoo_text.eml",
        "arf_complaint.eml",
    ],
)
def test_the_original_message_is_recognised_without_verp(name: str) -> None:
    """Without BOUNCE_DOMAIN the returned copy of our message still names its delivery
    (our Message-ID) and the list (List-Id)."""
    event = events(name, verp=None)[0]
    assert event.delivery_id is None
    assert event.message_id is not None
    assert event.message_id.startswith("<d12") and event.message_id.endswith(
        f".{NONCE}@example.org>"
    )
    assert event.type is EXPECTED[name][0]


def test_a_complaint_with_a_redacted_recipient_keeps_the_signed_unsubscribe_token() -> None:
    event = events("arf_complaint.eml", verp=None)[0]
    assert event.recipient is None
    assert event.list_id == "world.example.org"
    assert event.unsubscribe_token == (
        "K7mN2pQ4rS6tU8vW0xY2zB.Vd4xQm1LrT9Zp0sKcH7aNf3WbE6uJy2GiOq5RtMl"
    )


def test_the_mailto_unsubscribe_carries_its_token() -> None:
    event = events("mailto_unsubscribe.eml")[0]
    assert (
        event.unsubscribe_token
        == "Q3Jx9mB2kLw8VtZ1nHc4dA.uO0OSe46V6aUYi4G9snnGXMqXvnNUctVbakLw4PmgI8"
    )
    assert event.source == "mailto"


def test_the_mangled_dsn_is_identified_only_by_verp() -> None:
    with_verp = events("mangled_dsn.eml")[0]
    without = events("mangled_dsn.eml", verp=None)[0]
    assert with_verp.delivery_id == 1212
    assert without.delivery_id is None and without.recipient is None
    assert without.message_id is None and without.unsubscribe_token is None


def test_not_bounces_are_not_actionable() -> None:
    for name in ("auto_reply.eml", "postfix_delayed.eml", "human_reply.eml"):
        assert not events(name)[0].actionable, name
    for name in ("rfc3464_hard.eml", "arf_complaint.eml", "mailto_unsubscribe.eml"):
        assert events(name)[0].actionable, name


def test_a_reply_saying_does_not_exist_is_no_bounce() -> None:
    """Bounce phrases count only in mail from a mail system, not in what a reader writes."""
    assert events("human_reply.eml")[0].type is EventType.UNKNOWN


# --- VERP ------------------------------------------------------------------------------------


def test_verp_round_trips_and_refuses_forgeries() -> None:
    address = VERP.address(123456)
    assert address.startswith("bounces+123456-") and address.endswith("@bounces.example.org")
    assert VERP.delivery_of(f"<{address}>") == 123456
    assert VERP.delivery_of(address.upper()) == 123456  # some MTAs fold the case
    assert VERP.delivery_of(address.replace("123456", "123457")) is None
    assert VERP.delivery_of(address.replace("bounces.example.org", "evil.example")) is None
    assert Verp("bounces.example.org", ["another-key"]).delivery_of(address) is None


def test_verp_keeps_working_across_a_key_rotation() -> None:
    old = VERP.address(77)
    rotated = Verp("bounces.example.org", ["new-key", "test-secret-key"])
    assert rotated.delivery_of(old) == 77
    assert rotated.address(77) != old


def test_verp_addresses_are_plain_smtp_local_parts() -> None:
    import re

    for n in (0, 1, 10**12):
        assert re.fullmatch(r"bounces\+\d+-[0-9a-f]{12}@bounces\.example\.org", VERP.address(n))


# --- the lookup tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "text", "kind"),
    [
        ("5.1.1", "", EventType.HARD_BOUNCE),
        ("5.1.10", "", EventType.HARD_BOUNCE),
        ("5.2.2", "mailbox full", EventType.SOFT_BOUNCE),
        ("5.3.4", "message too big", EventType.SOFT_BOUNCE),
        ("5.7.1", "blocked by policy: spam", EventType.SOFT_BOUNCE),
        ("5.1.1", "552 mailbox full", EventType.SOFT_BOUNCE),
        ("4.4.7", "", EventType.SOFT_BOUNCE),
        ("2.0.0", "", EventType.DELIVERED),
        (None, "550 Requested action not taken: mailbox unavailable", EventType.HARD_BOUNCE),
        (None, "user is over quota", EventType.SOFT_BOUNCE),
        (None, "421 Service not available, try again later", EventType.SOFT_BOUNCE),
        (None, "554: delivery error", EventType.HARD_BOUNCE),
        (None, "thank you for your message", None),
    ],
)
def test_status_codes_and_phrases(status: str | None, text: str, kind: EventType | None) -> None:
    assert _classify(status, text) is kind


def test_a_dsn_for_a_delivered_message_is_good_news() -> None:
    raw = (SAMPLES / "postfix_delayed.eml").read_bytes()
    raw = raw.replace(b"Action: delayed", b"Action: delivered").replace(b"4.4.1", b"2.0.0")
    event = parse(raw, verp=VERP)[0]
    assert event.type is EventType.DELIVERED and event.type in ACTIONABLE


def test_a_report_with_several_recipients_gives_one_event_each() -> None:
    raw = (SAMPLES / "rfc3464_hard.eml").read_bytes()
    block = (
        b"Final-Recipient: RFC822; zed@example.com\nAction: failed\nStatus: 4.2.2\n"
        b"Diagnostic-Code: SMTP; 452 4.2.2 Mailbox full\n\n"
    )
    headers_part = b"--5ASIq6xK018311.1795891926/mx.example.com\nContent-Type: text/rfc822"
    raw = raw.replace(headers_part, block + headers_part)
    found = parse(raw, verp=VERP)
    assert [(e.type, e.recipient) for e in found] == [
        (EventType.HARD_BOUNCE, "ann@example.com"),
        (EventType.SOFT_BOUNCE, "zed@example.com"),
    ]


def test_garbage_is_unknown_not_an_exception() -> None:
    for raw in (b"", b"\x00\xff\xfe", b"Subject: =?bogus?Q?=ZZ?=\n\nhello", b"From:\n\n\n"):
        assert [e.type for e in parse(raw, verp=VERP)] == [EventType.UNKNOWN]


def test_stored_details_keep_no_address() -> None:
    assert (
        redact("550 5.1.1 <ann@example.com>: User unknown") == "550 5.1.1 <<address>>: User unknown"
    )
    assert redact(None) is None


# --- a refusal at RCPT, in the same words as a DSN ---------------------------------------------


@pytest.mark.parametrize(
    ("code", "reply", "kind", "status"),
    [
        (550, "5.1.1 <a@example.org>: Recipient address rejected: User unknown", "hard", "5.1.1"),
        (550, "User unknown in virtual mailbox table", "hard", None),
        (554, "delivery error: dd This user doesn't have a yahoo.com account", "hard", None),
        (553, "sorry, that domain isn't in my list of allowed rcpthosts", "hard", None),
        (550, "5.2.2 mailbox full", "soft", "5.2.2"),
        (550, "5.7.1 Service unavailable; client host blocked using Spamhaus", "soft", "5.7.1"),
        (551, "not local", "hard", None),
        (550, "no", "hard", None),  # unreadable: hard, as the code says
    ],
)
def test_an_rcpt_refusal_is_classified_as_a_dsn_saying_the_same_would_be(
    code: int, reply: str, kind: str, status: str | None
) -> None:
    event = smtp_rejection(41, code, reply)
    expected = EventType.HARD_BOUNCE if kind == "hard" else EventType.SOFT_BOUNCE
    assert event.type is expected
    assert event.status == status
    assert (event.source, event.report_id, event.delivery_id) == ("smtp", "smtp:41", 41)
    assert event.diagnostic == f"{code} {reply}"
    assert event.actionable


def test_an_rcpt_refusal_keeps_one_line_of_diagnostic() -> None:
    event = smtp_rejection(7, 550, "5.1.1 line one\r\n  line two " + "x" * 600)
    assert event.diagnostic is not None
    assert "\n" not in event.diagnostic and len(event.diagnostic) == 500
