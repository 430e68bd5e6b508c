"""Finding 7 of issue 13: one hard-bounce policy.

A 5xx at RCPT time goes through the same feedback path as a DSN: an event is recorded, the
reader is bounced on every list, and `issues status` counts it. Hard bounces and complaints
suppress the address on every list, and an import onto another list reports those readers
as suppressed instead of importing them active. Everything through the operator's commands,
against a real SMTP server that refuses one recipient.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SmtpServer, cli_env, run_cli

SEED = Path(__file__).resolve().parents[1] / "data" / "seed_world.txt"
GONE = "gone@example.org"  # the mailbox that does not exist
GRUMPY = "grumpy@example.org"  # marks the digest as spam
FINE = "fine@example.org"


@pytest.fixture
def env(pg_url: str, smtp_server: SmtpServer) -> dict[str, str]:
    env = cli_env(database_url=pg_url, smtp_url=smtp_server.url)
    for slug, name in (("world", "World Digest"), ("science", "Science Digest")):
        run_cli(
            "lists",
            "create",
            slug,
            "--name",
            name,
            "--from-address",
            f"Desk <{slug}@example.org>",
            env=env,
        )
        for address in (GONE, GRUMPY, FINE):
            run_cli("subscribers", "add", address, "--list", slug, "--confirmed", env=env)
    run_cli("articles", "ingest", str(SEED), env=env)
    smtp_server.recorder.rules.append(
        ("rcpt", lambda address: address == GONE, "550 5.1.1 <gone@example.org>: user unknown")
    )
    return env


def statuses(env: dict[str, str], slug: str) -> dict[str, str]:
    rows = json.loads(run_cli("subscribers", "list", "--list", slug, "--json", env=env).stdout)
    return {row["email"]: row["status"] for row in rows}


def send_world(env: dict[str, str]) -> str:
    issue_id = run_cli("issues", "compose", "--list", "world", env=env).stdout.strip()
    run_cli("issues", "send", issue_id, env=env)
    return issue_id


def test_a_rejection_at_rcpt_is_a_hard_bounce_counted_and_applied_on_every_list(
    env: dict[str, str],
) -> None:
    issue_id = send_world(env)

    figures = json.loads(run_cli("issues", "status", issue_id, "--json", env=env).stdout)
    assert figures["counts"]["failed"] == 1 and figures["counts"]["sent"] == 2
    assert figures["feedback"]["hard_bounces"] == 1
    shown = run_cli("issues", "status", issue_id, env=env).stdout
    assert "hard bounces 1 (" in shown
    assert statuses(env, "world")[GONE] == "bounced"
    assert statuses(env, "science") == {GONE: "bounced", GRUMPY: "active", FINE: "active"}


def complain(env: dict[str, str], smtp_server: SmtpServer, tmp_path: Path) -> None:
    """GRUMPY's mailbox provider reports her copy of the world digest as spam."""
    [copy] = [m for m in smtp_server.recorder.messages if m.rcpt_tos == [GRUMPY]]
    report = tmp_path / "arf.eml"
    report.write_bytes(
        (
            "From: Feedback Loop <fbl@mailbox.example>\r\nTo: abuse@example.org\r\n"
            "Subject: complaint\r\nMessage-ID: <arf-1@mailbox.example>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nAn abuse report.\r\n"
            "--b\r\nContent-Type: message/feedback-report\r\n\r\n"
            "Feedback-Type: abuse\r\nUser-Agent: FBL/1.0\r\nVersion: 1\r\n\r\n"
            "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"Message-ID: {copy.message()['Message-ID']}\r\n"
            "List-Id: <world.example.org>\r\n\r\n"
            "--b--\r\n"
        ).encode()
    )
    run_cli("bounces", "ingest", str(report), env=env)


def test_a_complaint_suppresses_every_list(
    env: dict[str, str], smtp_server: SmtpServer, tmp_path: Path
) -> None:
    send_world(env)
    complain(env, smtp_server, tmp_path)

    assert statuses(env, "world")[GRUMPY] == "complained"
    assert statuses(env, "science")[GRUMPY] == "complained"
    assert statuses(env, "science")[FINE] == "active"


def test_an_import_onto_another_list_reports_bounced_and_complained_as_suppressed(
    env: dict[str, str], smtp_server: SmtpServer, tmp_path: Path
) -> None:
    send_world(env)
    complain(env, smtp_server, tmp_path)
    run_cli(
        "lists",
        "create",
        "culture",
        "--name",
        "Culture",
        "--from-address",
        "c@example.org",
        env=env,
    )
    csv_file = tmp_path / "culture.csv"
    csv_file.write_text(f"email\n{GONE.upper()}\n{GRUMPY}\n{FINE}\n")
    out = run_cli(
        "subscribers",
        "import",
        str(csv_file),
        "--list",
        "culture",
        "--confirmed",
        "--json",
        env=env,
    )
    report = json.loads(out.stdout)
    assert report["imported"] == 1
    rejected = {row["line"]: row["reason"] for row in report["rejected"]}
    assert sorted(rejected) == [2, 3]
    assert all("suppressed" in reason for reason in rejected.values()), rejected
    assert statuses(env, "culture") == {FINE: "active"}
