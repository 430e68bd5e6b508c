"""The SMTP transport against a real SMTP server: bytes arrive exactly as built."""

from __future__ import annotations

import pytest

from newsletter.config import SmtpConfig
from newsletter.transport import Outcome, SmtpTransport, session_of
from tests.conftest import SmtpServer

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
