"""Strict headers, as the receiving SMTP server sees them: header injection through every
input path (CSV import, the subscribe form, the operator API and CLI, article titles that
become subjects) is refused or encoded, never emitted as a header line of its own; Unicode
is RFC 2047-encoded and international domains IDNA-encoded in headers and envelope; DKIM
signatures survive the trip through an SMTP server; `issues check` finds what is wrong."""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from email.header import decode_header, make_header
from pathlib import Path

import dkim as dkimpy
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from newsletter import imports, issues, subscriptions
from newsletter.addresses import check_text
from newsletter.articles import parse_source
from newsletter.dkim import DkimSigner, generate_private_key
from newsletter.errors import InvalidInput
from newsletter.ledger.freeze import start_send
from newsletter.ledger.sender import run_in_process
from newsletter.message import CompiledMessage, HeaderValueError, IssueMessageSpec, Recipient
from newsletter.models import Issue, MailingList, Subscriber
from newsletter.outgoing import build_for, prepare_issue
from newsletter.placeholders import Markers
from newsletter.runtime import Runtime
from newsletter.transport import Outcome, session_of
from tests.conftest import Received, SmtpServer, cli_env, run_cli
from tests.integration.helpers import KEY, assert_well_formed, seed_world

MARKERS = Markers("0123456789abcdef0123")  # an issue's markers

ADMIN = "test-admin-token-headers"
POSTAL = "World Desk, 1 Test Street, Testville"
INJECTED = ("Bcc", "X-Injected", "Content-Type: text/html")


@pytest.fixture
def rt(pg_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(pg_url, smtp_url=smtp_server.url, admin_token=ADMIN)


@pytest.fixture
def api(rt: Runtime) -> Iterator[TestClient]:
    from newsletter.web.app import create_app

    with TestClient(create_app(rt)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client


def send(rt: Runtime, issue_id: int) -> None:
    with rt.sessions() as s, s.begin():
        batch_ids = start_send(s, issue_id, batch_size=50)
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)


def header_names(raw: bytes) -> list[str]:
    """The names of the header fields exactly as a receiving server splits them."""
    block = raw[: raw.index(b"\r\n\r\n")].decode("ascii")
    return [line.split(":", 1)[0] for line in block.split("\r\n") if line[:1] not in (" ", "\t")]


def assert_no_injection(received: list[Received]) -> None:
    assert received
    for message in received:
        names = header_names(message.data)
        for name in ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe"):
            assert names.count(name) == 1, (name, names)
        assert not any(n.lower() in ("bcc", "x-injected", "cc") for n in names), names
        block = message.data[: message.data.index(b"\r\n\r\n")]
        assert block.isascii()
        assert not re.search(rb"\r\n(?:Bcc|X-Injected|Cc):", message.data, re.I)


# --- injection attempts, path by path ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Eve\r\nBcc: victim@example.net",
        "Eve\nX-Injected: yes",
        "Eve\rBcc: victim@example.net",
        "Eve\x00Bcc",
        "=?utf-8?b?RXZlDQpCY2M6IHZpY3RpbUBleGFtcGxlLm5ldA==?=",
        "=?utf-8?q?Eve=0D=0ABcc:_victim@example.net?=",
    ],
)
def test_csv_import_refuses_injected_names(rt: Runtime, name: str) -> None:
    seed_world(rt, confirmed=1)
    buffer = io.StringIO()
    import csv

    csv.writer(buffer).writerows([["email", "name"], ["eve@example.org", name]])
    with rt.sessions() as s, s.begin():
        report = imports.import_csv(
            s, io.StringIO(buffer.getvalue()), "world", confirmed=True, suppression_key=KEY
        )
    assert report.imported == 0 and len(report.rejected) == 1
    with rt.sessions() as s:
        assert s.scalar(select(Subscriber).where(Subscriber.email == "eve@example.org")) is None


def test_csv_import_refuses_injected_addresses(rt: Runtime) -> None:
    seed_world(rt, confirmed=1)
    data = (
        'email,name\n"eve@example.org\r\nBcc: x@example.net",Eve\n"=?utf-8?q?a?=@example.org",A\n'
    )
    with rt.sessions() as s, s.begin():
        report = imports.import_csv(
            s, io.StringIO(data), "world", confirmed=True, suppression_key=KEY
        )
    assert report.imported == 0 and len(report.rejected) == 2


def test_subscribe_form_refuses_injection_with_a_clear_error(rt: Runtime, api: TestClient) -> None:
    seed_world(rt, confirmed=1)
    attempts = [
        {"email": "mallory@example.org", "name": "Mallory\r\nBcc: victim@example.net"},
        {"email": "mallory@example.org", "name": "=?utf-8?b?TWFsbG9yeQ==?="},
        {"email": "mallory@example.org\r\nBcc: victim@example.net", "name": "Mallory"},
        {"email": "mallory@example.org", "name": "Mallory\x00"},
    ]
    for form in attempts:
        response = api.post("/subscribe/world", data=form)
        assert response.status_code == 400, form
        assert "not allowed" in response.text or "invalid" in response.text.lower()
    with rt.sessions() as s:
        assert s.scalar(select(Subscriber).where(Subscriber.email.like("mallory%"))) is None


def test_operator_api_refuses_injection(rt: Runtime, api: TestClient) -> None:
    seed_world(rt, confirmed=1)
    for body in (
        {"email": "eve@example.org", "name": "Eve\nBcc: victim@example.net", "confirmed": True},
        {"email": "eve@example.org", "name": "=?utf-8?q?Eve?=", "confirmed": True},
        {"email": "eve@example.org\r\nBcc: x@example.net", "confirmed": True},
    ):
        response = api.post("/api/lists/world/subscribers", json=body)
        assert response.status_code in (400, 422), body
    response = api.post(
        "/api/lists",
        json={"slug": "evil", "name": "Evil", "from_address": "E <e@example.org>\r\nBcc: x@y.org"},
    )
    assert response.status_code in (400, 422)
    response = api.post("/api/issues", json={"list": "world", "subject": "=?utf-8?b?SGk=?="})
    assert response.status_code in (400, 422)


def test_operator_subject_with_line_breaks_never_becomes_a_header(
    rt: Runtime, api: TestClient, smtp_server: SmtpServer
) -> None:
    """A subject with CR/LF is refused or flattened into one Subject line: never a Bcc."""
    seed_world(rt, confirmed=2)
    response = api.post(
        "/api/issues",
        json={"list": "world", "since": "2000-01-01", "subject": "Hi\r\nBcc: victim@example.net"},
    )
    if response.status_code in (400, 422):
        return
    assert response.status_code == 201, response.text
    send(rt, response.json()["id"])
    assert_no_injection(smtp_server.recorder.messages)


def test_cli_refuses_injected_list_names_and_subjects(rt: Runtime, pg_url: str) -> None:
    env = cli_env(database_url=pg_url)
    bad_name = run_cli(
        "lists", "create", "evil", "--name", "Evil\nBcc: x@example.net",
        "--from-address", "Evil <evil@example.org>", env=env, check=False,
    )  # fmt: skip
    assert bad_name.returncode == 1 and "Traceback" not in bad_name.stderr
    assert "line break" in bad_name.stderr
    seed_world(rt, confirmed=1)
    bad_subject = run_cli(
        "issues", "compose", "--list", "world", "--since", "2000-01-01",
        "--subject", "=?utf-8?b?QmNjOiB4?=", env=env, check=False,
    )  # fmt: skip
    assert bad_subject.returncode == 1 and "=?" in bad_subject.stderr


def test_article_titles_that_become_subjects_are_neutralised(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    feed = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Desk</title><link>https://news.example.org/</link>
<description>d</description>
<item><title>=?utf-8?b?QmNjOiB2aWN0aW1AZXhhbXBsZS5uZXQ=?= Harbour talks&#13;&#10;Bcc:
victim@example.net&#13;&#10;X-Injected: yes</title>
<link>https://news.example.org/a</link><description>Negotiators met.</description></item>
</channel></rss>"""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        subscriptions.add_subscriber(
            s, "reader@example.org", "world", confirmed=True, suppression_key=KEY
        )
        issues.store_articles(s, parse_source("feed.xml", feed), source="feed")
        issue = issues.compose_issue(
            s, rt.templates, "world", base_url=rt.settings.base_url, postal_address=POSTAL
        )
        issue_id = issue.id
    send(rt, issue_id)
    assert_no_injection(smtp_server.recorder.messages)
    subject = str(smtp_server.recorder.messages[0].message()["Subject"])
    assert "=?" not in subject and "Harbour talks" in subject


# --- Unicode and international domains ---------------------------------------------------------


def test_unicode_names_subjects_and_idn_domains_are_encoded(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    names = {
        "zoe@bücher.example": "Zoë 李小龍",
        "nel@example.org": "Line\u2028Separator\x85Next",
        "quote@example.org": 'Bob "The Builder" O\'Neil',
    }
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(
            s, "welt", "Welt-Übersicht", "Redaktion Zürich <desk@zeitung.bücher.example>"
        )
        for address, name in names.items():
            subscriptions.add_subscriber(
                s, address, "welt", name=name, confirmed=True, suppression_key=KEY
            )
        seed = Path(__file__).resolve().parents[1] / "data" / "seed_world.txt"
        issues.store_articles(s, parse_source(seed.name, seed.read_bytes()), source="seed")
        issue = issues.compose_issue(
            s,
            rt.templates,
            "welt",
            base_url=rt.settings.base_url,
            postal_address=POSTAL,
            subject="Die Welt — Ausgabe für Zürich 🌍",
        )
        issue_id = issue.id
    send(rt, issue_id)
    received = smtp_server.recorder.messages
    assert sorted(r.rcpt_tos[0] for r in received) == [
        "nel@example.org",
        "quote@example.org",
        "zoe@xn--bcher-kva.example",
    ]
    for message in received:
        assert message.mail_from == "desk@zeitung.xn--bcher-kva.example"
        assert message.data[: message.data.index(b"\r\n\r\n")].isascii()
        msg = message.message()
        assert_well_formed(message.data, msg)
        assert str(msg["Subject"]) == "Die Welt — Ausgabe für Zürich 🌍"
        assert b"=?utf-8?" in message.data.split(b"\r\nSubject:", 1)[1].split(b"\r\n")[0]
        sender = msg["From"].addresses[0]
        assert sender.display_name == "Redaktion Zürich"
        assert sender.addr_spec == "desk@zeitung.xn--bcher-kva.example"
        assert str(msg["Message-ID"]).endswith("@zeitung.xn--bcher-kva.example>")
        to = msg["To"].addresses[0]
        decoded = str(make_header(decode_header(to.display_name)))
        assert not set(decoded) & set("\r\n\x85\u2028\u2029"), decoded
        if to.addr_spec == "zoe@xn--bcher-kva.example":
            assert decoded == "Zoë 李小龍"
        elif to.addr_spec == "quote@example.org":
            assert decoded == 'Bob "The Builder" O\'Neil'
        else:
            assert decoded.replace(" ", "") == "LineSeparatorNext"
        assert header_names(message.data).count("To") == 1
    assert_no_injection(received)


def test_every_message_has_list_id_precedence_text_part_unique_id_and_postal_address(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=6)
    send(rt, issue_id)
    ids = set()
    for message in smtp_server.recorder.messages:
        msg = message.message()
        assert_well_formed(message.data, msg)
        assert str(msg["List-Id"]).endswith("<world.example.org>")
        assert str(msg["Precedence"]) == "bulk"
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        assert rt.settings.postal_address in " ".join(text.split())
        assert rt.settings.postal_address in " ".join(html.split())
        assert str(msg["Message-ID"]).endswith("@example.org>")
        ids.add(str(msg["Message-ID"]))
    assert len(ids) == 6


# --- DKIM through a real SMTP server ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_dkim_signatures_verify_after_the_smtp_server(
    rt: Runtime, smtp_server: SmtpServer, kind: str
) -> None:
    signer = DkimSigner(generate_private_key(kind), domain="example.org", selector="news")
    record = signer.dns_txt().encode()
    issue_id = seed_world(rt, confirmed=4)
    with rt.sessions() as s:
        issue = s.get(Issue, issue_id)
        mlist = s.get(MailingList, issue.list_id) if issue else None
        assert issue is not None and mlist is not None
        prepared = prepare_issue(issue, mlist)
        readers = s.execute(select(Subscriber.email, Subscriber.name).order_by(Subscriber.id)).all()
    prepared = replace(prepared, compiled=prepared.compiled.signed_by(signer))
    # A body with lines a relay rewrites if it can: leading dots (SMTP dot-stuffing), "From ",
    # trailing blanks, tabs, runs of spaces.
    odd = CompiledMessage.compile(
        IssueMessageSpec(
            markers=MARKERS,
            subject="Odd lines",
            from_address="World Desk <desk@example.org>",
            reply_to=None,
            list_id="<world.example.org>",
            html="<p>.dot</p>\n.\n..two\nFrom here   on\t tabs  \n",
            text=".\n.leading dot\nFrom the desk\ntrailing   \n\n\n",
            message_id_domain="example.org",
        ),
        dkim=signer,
    )
    sent = []
    with session_of(rt.transport) as conn:
        for number, (address, name) in enumerate(readers):
            data, _mid = build_for(
                prepared, rt.links, delivery_id=number + 1, email=address, name=name,
                token=f"tok{number}", date="Sat, 28 Nov 2026 18:00:00 +0000",
            )  # fmt: skip
            assert conn.send(prepared.envelope_from, address, data).outcome is Outcome.SENT
            sent.append(data)
        odd_data = odd.build(
            Recipient(
                email="reader0@example.org",
                name="Ada",
                unsubscribe_url="https://news.example.org/unsubscribe/x.y",
                preferences_url="https://news.example.org/preferences/x.y",
                unsubscribe_mailto="mailto:desk@example.org?subject=unsubscribe%20x.y",
                message_id="<d99.n@example.org>",
            ),
            date="Sat, 28 Nov 2026 18:00:00 +0000",
        )
        assert conn.send("desk@example.org", "reader0@example.org", odd_data).outcome is (
            Outcome.SENT
        )
    received = smtp_server.recorder.messages
    assert len(received) == len(readers) + 1
    for message in received:
        assert dkimpy.verify(message.data, dnsfunc=lambda name, timeout=5: record)
    one_click = b"List-Unsubscribe=One-Click"
    tampered = received[0].data.replace(one_click, one_click.replace(b"Click", b"Clack"))
    assert not dkimpy.verify(tampered, dnsfunc=lambda name, timeout=5: record)


# --- issues check --------------------------------------------------------------------------------


def test_issues_check_passes_a_good_signed_issue_and_fails_a_broken_one(
    rt: Runtime, pg_url: str, tmp_path: Path
) -> None:
    issue_id = seed_world(rt, confirmed=2)
    key_file = tmp_path / "news.pem"
    env = cli_env(database_url=pg_url, postal_address=rt.settings.postal_address)
    run_cli(
        "dkim", "keygen", "--selector", "news", "--domain", "example.org", "--out",
        str(key_file), env=env,
    )  # fmt: skip
    signed_env = {
        **env,
        "NEWSLETTER_DKIM_DOMAIN": "example.org",
        "NEWSLETTER_DKIM_SELECTOR": "news",
        "NEWSLETTER_DKIM_KEY_FILE": str(key_file),
    }
    good = run_cli("issues", "check", str(issue_id), env=signed_env, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "DKIM-signed" in good.stdout and "no problems found" in good.stdout
    unsigned = run_cli("issues", "check", str(issue_id), "--json", env=env, check=False)
    report = json.loads(unsigned.stdout)
    assert unsigned.returncode == 0 and report["ok"] and not report["dkim_signed"]
    assert [p["code"] for p in report["problems"]] == ["dkim"]  # a warning only

    filler = "<p>" + "Lorem ipsum dolor sit amet. " * 40 + "</p>\n"
    broken = (
        '<p><a href="javascript:alert(1)">click</a> <a href="#nowhere">jump</a>'
        ' <a href="https://exa mple.org/x">spaced</a> <a href="ftp://example.org/f">ftp</a>'
        ' <img src="https://news.example.org/logo.png"></p>'
        '<div style="display:flex">x</div><script>alert(1)</script>\n' + filler * 110
    )
    with rt.sessions() as s, s.begin():
        html = s.scalar(select(Issue.html).where(Issue.id == issue_id)) or ""
        s.execute(
            update(Issue)
            .where(Issue.id == issue_id)
            .values(html=html.replace("</body>", broken + "</body>"))
        )
    bad = run_cli("issues", "check", str(issue_id), "--json", env=signed_env, check=False)
    assert bad.returncode == 1
    codes = {p["code"] for p in json.loads(bad.stdout)["problems"] if p["severity"] == "error"}
    assert {
        "broken-link",
        "missing-alt",
        "html-size",
        "unsupported-html",
        "unsupported-css",
    } <= codes
    human = run_cli("issues", "check", str(issue_id), env=signed_env, check=False)
    assert human.returncode == 1 and "javascript: links do not work" in human.stdout
    assert "Gmail clips" in human.stdout and "problem(s) found" in human.stdout


def test_issues_check_finds_a_signature_that_does_not_verify(rt: Runtime, tmp_path: Path) -> None:
    from newsletter import checks

    issue_id = seed_world(rt, confirmed=1)
    ours = DkimSigner(generate_private_key("ed25519"), domain="example.org", selector="news")
    stale = DkimSigner(generate_private_key("ed25519"), domain="example.org", selector="news")
    with rt.sessions() as s:
        report = checks.check_issue(s, issue_id, rt.links, signer=ours, postal_address=POSTAL)
        assert report.signed and not report.errors
        issue = issues.get_issue(s, issue_id)
        data, _html, _text = issues.build_single(s, issue, rt.links, issues.sample_reader())
    problems = checks.check_message(stale.sign(data), signer=ours, postal_address=POSTAL)
    assert [p.code for p in problems if p.severity == "error"] == ["dkim"]
    wrong_domain = DkimSigner(ours.key, domain="other.example", selector="news")
    problems = checks.check_message(
        wrong_domain.sign(data), signer=wrong_domain, postal_address=POSTAL
    )
    assert [p.code for p in problems if p.severity == "error"] == ["dkim-alignment"]


def test_header_checks_refuse_what_the_builder_would_emit_badly() -> None:
    with pytest.raises(HeaderValueError):
        CompiledMessage.compile(
            IssueMessageSpec(
                markers=MARKERS,
                subject="ok",
                from_address="Desk <desk@example.org>\r\nBcc: x@example.net",
                reply_to=None,
                list_id="<world.example.org>",
                html="<p>x</p>",
                text="x",
                message_id_domain="example.org",
            )
        )
    with pytest.raises(InvalidInput):
        check_text("a=?b", "name")


def test_message_parses_without_defects_for_every_reader(
    rt: Runtime, smtp_server: SmtpServer
) -> None:
    issue_id = seed_world(rt, confirmed=3)
    send(rt, issue_id)
    for message in smtp_server.recorder.messages:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        assert not parsed.defects
