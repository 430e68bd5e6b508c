"""Pure parts of the web package: the confirmation email, the archive's public html and the
in-memory rate limiter (no services)."""

from __future__ import annotations

import email
import email.policy
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from newsletter.compose import make_environment
from newsletter.config import REPO_TEMPLATES, Settings
from newsletter.optin import build_confirmation
from newsletter.placeholders import Markers
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from newsletter.web.archive import public_html
from newsletter.web.limits import MemoryLimiter

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

CONFIRM_URL = "https://news.example.org/confirm/abc.def-ghi"


def test_the_confirmation_email_is_well_formed_and_carries_the_link() -> None:
    mail = build_confirmation(
        make_environment(Path(REPO_TEMPLATES)),
        list_name="Weltspiegel – Täglich",
        from_address="World Desk <desk@example.org>",
        reply_to="help@example.org",
        to_email="ada@example.org",
        confirm_url=CONFIRM_URL,
    )
    assert (mail.sender, mail.recipient) == ("desk@example.org", "ada@example.org")
    lines = mail.data.split(b"\r\n")
    assert b"\n" not in mail.data.replace(b"\r\n", b"") and max(map(len, lines)) <= 998
    headers = mail.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert max(map(len, headers)) <= 78 and all(h.isascii() for h in headers)
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert not msg.defects
    assert msg["Subject"] == "Confirm your subscription to Weltspiegel – Täglich"
    assert msg["To"] == "ada@example.org" and msg["Reply-To"] == "help@example.org"
    assert msg["Message-ID"].endswith("@example.org>")
    assert msg["List-Unsubscribe"] is None  # a transactional message, not a list message
    assert msg["Auto-Submitted"] == "auto-generated"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert CONFIRM_URL in text.get_content()
    assert f'href="{CONFIRM_URL}"' in html.get_content()


def test_the_archive_html_keeps_nobodys_links() -> None:
    stored = (
        f'<html><body class="b"><p>Hello {MARKERS.name},</p><p class="f">'
        f'<a class="l" href="{MARKERS.preferences_url}" style="x">Manage preferences</a>\n'
        " \u00b7 \n"
        f'<a class="l" href="{MARKERS.unsubscribe_url}" style="x">Unsubscribe</a>'
        f"</p><p>{MARKERS.unsubscribe_url}</p></body></html>"
    )
    shown = public_html(
        stored,
        markers=MARKERS,
        subscribe_url="https://news.example.org/subscribe/world",
        index_url="/archive/world",
        list_name="<World>",
    )
    assert "XXNL" not in shown and "Manage preferences" not in shown and "\u00b7" not in shown
    assert "Hello reader," in shown
    assert (
        '<a class="l" href="https://news.example.org/subscribe/world" style="x">Subscribe</a>'
        in shown
    )
    assert shown.index('<body class="b">') < shown.index("All issues of &lt;World&gt;")


def test_the_memory_limiter_counts_per_key_and_window() -> None:
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    assert [limiter.hit("a", 2, 60) for _ in range(3)] == [True, True, False]
    assert limiter.hit("b", 2, 60)
    now[0] = 61
    assert limiter.hit("a", 2, 60)


def test_link_tokens_never_reach_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    create_app(Runtime(Settings(database_url="sqlite://", secret_key=SecretStr("k"))))
    access = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        for path in (
            "/unsubscribe/dvYyNvhK8T2knu.7GbKa6y9ZxqJ9",
            "/confirm/abc.def.ghi?x=1",
            "/preferences/abc.def",
        ):
            access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST", path, "1.1", 200)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "dvYy" not in logged and "abc" not in logged
    assert '"POST /unsubscribe/[token] HTTP/1.1" 200' in logged
    assert '"POST /confirm/[token]?x=1 HTTP/1.1" 200' in logged
