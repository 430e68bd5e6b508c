"""The SMTP transport against a real SMTP server: bytes arrive exactly as built."""

from __future__ import annotations

import pytest

from newsletter.config import SmtpConfig
from newsletter.transport import Outcome, SmtpTransport, session_of
from tests.conftest import SmtpServer, free_port

PLAIN = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nline one\r\nline two\r\n"
DOTTED = PLAIN + b".a line that starts with a dot\r\n.\r\n..two dots\r\nend\r\n"


@pytest.mark.parametrize("data", [PLAIN, DOTTED], ids=["plain", "lines-starting-with-dots"])
def test_message_bytes_arrive_unchanged(smtp_server: SmtpServer, data: bytes) -> None:
    transport = SmtpTransport(SmtpConfig.parse(smtp_server.url))
    with session_of(transport) as conn:
        first = conn.send("a@example.org", "b@example.org", data)
        second = conn.send("a@example.org", "c@example.org", data)  # same connection
    assert first.outcome is Outcome.SENT and second.outcome is Outcome.SENT
    received = smtp_server.recorder.messages
    assert [r.rcpt_tos for r in received] == [["b@example.org"], ["c@example.org"]]
    assert all(r.data == data for r in received)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-a-time"])
def test_refusals_are_told_apart_and_the_connection_goes_on(
    smtp_server: SmtpServer, pipelining: bool
) -> None:
    """With PIPELINING, MAIL, RCPT and DATA go in one write; each refusal still comes back
    at its own stage, and the next message goes over the same connection."""
    smtp_server.recorder.pipelining = pipelining
    smtp_server.recorder.rules += [
        ("rcpt", lambda a: a == "gone@example.org", "550 5.1.1 no such user"),
        ("rcpt", lambda a: a == "busy@example.org", "451 4.3.0 try later"),
        ("data", lambda a: a == "full@example.org", "552 5.2.2 mailbox full"),
    ]
    transport = SmtpTransport(SmtpConfig.parse(smtp_server.url))
    with session_of(transport) as conn:
        gone = conn.send("a@example.org", "gone@example.org", PLAIN)
        busy = conn.send("a@example.org", "busy@example.org", PLAIN)
        full = conn.send("a@example.org", "full@example.org", PLAIN)
        fine = conn.send("a@example.org", "fine@example.org", DOTTED)
    assert (gone.outcome, gone.code, gone.stage) == (Outcome.PERMANENT, 550, "rcpt")
    assert gone.hard_bounce
    assert (busy.outcome, busy.code, busy.stage) == (Outcome.TEMPORARY, 451, "rcpt")
    assert (full.outcome, full.code, full.stage) == (Outcome.TEMPORARY, 552, "data")
    assert (fine.outcome, fine.code) == (Outcome.SENT, 250)
    received = smtp_server.recorder.messages
    assert [r.rcpt_tos for r in received] == [["fine@example.org"]]
    assert received[0].data == DOTTED


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-a-time"])
def test_an_abandoned_message_never_arrives(smtp_server: SmtpServer, pipelining: bool) -> None:
    """begin() hands over all but the final "."; abandon() takes the message back (the
    server never sees it end), and the next message still goes, over a new connection."""
    smtp_server.recorder.pipelining = pipelining
    transport = SmtpTransport(SmtpConfig.parse(smtp_server.url))
    with session_of(transport) as conn:
        assert conn.begin("a@example.org", "dropped@example.org", PLAIN) is None
        conn.abandon()
        assert conn.begin("a@example.org", "kept@example.org", PLAIN) is None
        kept = conn.finish()
    assert kept.outcome is Outcome.SENT
    assert smtp_server.recorder.recipients() == ["kept@example.org"]


def test_ready_connects_first_or_gives_the_connect_failure(smtp_server: SmtpServer) -> None:
    """ready() opens the connection before a rate limit's token is taken; when nothing
    answers it gives the very failure begin() then gives, without trying again per message."""
    transport = SmtpTransport(SmtpConfig.parse(smtp_server.url))
    with session_of(transport) as conn:
        assert conn.ready() is None
        assert conn.send("a@example.org", "b@example.org", PLAIN).outcome is Outcome.SENT
    assert smtp_server.recorder.recipients() == ["b@example.org"]

    nobody = SmtpTransport(SmtpConfig.parse(f"smtp://127.0.0.1:{free_port()}"))
    with session_of(nobody) as conn:
        refused = conn.ready()
        assert refused is not None
        assert (refused.outcome, refused.stage) == (Outcome.TEMPORARY, "connect")
        assert conn.begin("a@example.org", "b@example.org", PLAIN) is refused
