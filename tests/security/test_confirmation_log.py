"""Issue 13, finding 5 (logs): a confirmation mail the server refuses is logged by its
subscription id; the server's reply, which usually quotes the address, must not carry the
address into the log either."""

from __future__ import annotations

import logging
import time

import pytest

from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.security import _web
from tests.web.helpers import Served, make_list

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures
READER = "Vic.Tim@example.org"


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]


def test_a_refused_confirmation_logs_no_address(
    web_rt: Runtime, web_app: Served, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    make_list(web_rt)
    smtp_server.recorder.rules.append(
        ("rcpt", lambda _a: True, "550 5.1.1 <vic.tim@example.org>: Recipient address rejected")
    )
    with caplog.at_level(logging.WARNING):
        web_app.client.post("/subscribe/world", data={"email": READER})
        deadline = time.monotonic() + 15  # the confirmation may go out after the answer
        while time.monotonic() < deadline and not _refusals(caplog):
            time.sleep(0.1)
    refusals = _refusals(caplog)
    assert refusals, "the refused confirmation was not logged at all"
    for line in refusals:
        assert "vic.tim" not in line.lower(), line
        assert "550" in line  # the reply's code stays: the operator needs to know why
