"""The `newsletter` command as an operator runs it: a real process, a real database, a real
SMTP server. Errors are one line on stderr with a non-zero exit and change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SmtpServer, cli_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "tests" / "data" / "seed_world.txt"
SEED_TITLE = "Putin Initiates Strategic Talks with Syria's New Leader Ahmad al-Sharaa"


@pytest.fixture
def env(db_url: str, smtp_server: SmtpServer) -> dict[str, str]:
    env = cli_env(database_url=db_url, smtp_url=smtp_server.url)
    run_cli(
        "lists",
        "create",
        "world",
        "--name",
        "World Digest",
        "--from-address",
        "World Desk <desk@example.org>",
        env=env,
    )
    return env


def assert_one_line_error(proc: object, *fragments: str) -> None:
    assert proc.returncode != 0  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


def test_seed_article_ingests_as_world_with_its_title_once(env: dict[str, str]) -> None:
    out = run_cli("articles", "ingest", str(SEED), env=env).stdout
    assert "ingested 1 new article" in out
    again = run_cli("articles", "ingest", str(SEED), env=env).stdout
    assert "ingested 0 new article(s), 1 already known" in again
    rows = json.loads(run_cli("articles", "list", "--json", env=env).stdout)
    assert [(r["section"], r["title"]) for r in rows] == [("World", SEED_TITLE)]


def test_compose_preview_send_and_status(
    env: dict[str, str], smtp_server: SmtpServer, tmp_path: Path
) -> None:
    csv_file = tmp_path / "readers.csv"
    csv_file.write_text("email,name\nann@example.org,Ann\nbo@example.org,Bo Ström\n")
    run_cli("subscribers", "import", str(csv_file), "--list", "world", "--confirmed", env=env)
    run_cli("subscribers", "add", "pending@example.org", "--list", "world", env=env)
    run_cli("articles", "ingest", str(SEED), env=env)

    composed = json.loads(run_cli("issues", "compose", "--list", "world", "--json", env=env).stdout)
    issue_id = composed["id"]
    assert SEED_TITLE in composed["subject"]
    plain = run_cli("issues", "compose", "--list", "world", env=env, check=False)
    assert_one_line_error(plain, "no new articles")

    run_cli("issues", "preview", str(issue_id), "--out", str(tmp_path / "pv"), env=env)
    html = (tmp_path / "pv" / f"{issue_id}.html").read_text()
    assert "Ahmad al-Sharaa" in html and "XXNL" not in html
    assert (tmp_path / "pv" / f"{issue_id}.eml").read_bytes().startswith(b"From: ")

    out = run_cli("issues", "send", str(issue_id), env=env)
    assert f"issue {issue_id} sent: sent 2, failed 0" in out.stdout
    assert sorted(smtp_server.recorder.recipients()) == ["ann@example.org", "bo@example.org"]

    status = json.loads(run_cli("issues", "status", str(issue_id), "--json", env=env).stdout)
    assert status["status"] == "sent"
    assert status["counts"]["sent"] == 2 and status["total"] == 2

    again = run_cli("issues", "send", str(issue_id), env=env, check=False)
    assert_one_line_error(again, f"issue {issue_id} is sent")
    assert len(smtp_server.recorder.messages) == 2


def test_test_send_reaches_one_address_and_changes_nothing(
    env: dict[str, str], smtp_server: SmtpServer
) -> None:
    run_cli("subscribers", "add", "ann@example.org", "--list", "world", "--confirmed", env=env)
    run_cli("articles", "ingest", str(SEED), env=env)
    issue_id = run_cli("issues", "compose", "--list", "world", env=env).stdout.strip()
    run_cli("issues", "send", issue_id, "--test-to", "editor@example.org", env=env)
    [msg] = smtp_server.recorder.messages
    assert msg.rcpt_tos == ["editor@example.org"]
    assert msg.message()["Subject"].startswith("[TEST] ")
    status = json.loads(run_cli("issues", "status", issue_id, "--json", env=env).stdout)
    assert status["status"] == "draft" and status["total"] == 0


def test_user_errors_are_one_line_and_write_nothing(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli("subscribers", "add", "a@example.org", "--list", "nope", env=env, check=False)
    assert_one_line_error(proc, "unknown list 'nope'")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"section": "World", "title": "Fine", "body": "Text."}, {"title": 3}]')
    good = tmp_path / "good.txt"
    shutil.copy(SEED, good)
    proc = run_cli("articles", "ingest", str(good), str(bad_json), env=env, check=False)
    assert_one_line_error(proc, "bad.json", "item 2")
    assert json.loads(run_cli("articles", "list", "--json", env=env).stdout) == []

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("email\nok@example.org\nnot an address\n")
    proc = run_cli(
        "subscribers", "import", str(bad_csv), "--list", "world", "--strict", env=env, check=False
    )
    assert_one_line_error(proc, "nothing imported", "line 3")
    listed = json.loads(run_cli("subscribers", "list", "--list", "world", "--json", env=env).stdout)
    assert listed == []

    proc = run_cli("issues", "send", "999", env=env, check=False)
    assert_one_line_error(proc, "unknown issue 999")
    proc = run_cli(
        "issues",
        "compose",
        "--list",
        "world",
        "--subject",
        "Hi =?utf-8?q?x?=",
        env=env,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_non_strict_import_reports_rejects_with_line_numbers(
    env: dict[str, str], tmp_path: Path
) -> None:
    f = tmp_path / "r.csv"
    f.write_bytes("\ufeffemail,name\nok@example.org,Ok\nbad,Bad\nok@example.org,Dup\n".encode())
    proc = run_cli("subscribers", "import", str(f), "--list", "world", env=env)
    assert "imported 1, updated 0, unchanged 0, rejected 2" in proc.stdout
    assert f"{f}: line 3: invalid email address 'bad'" in proc.stderr
    assert f"{f}: line 4: duplicate of line 2" in proc.stderr


def test_a_database_without_the_schema_is_one_line_telling_what_to_run(tmp_path: Path) -> None:
    env = cli_env(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    proc = run_cli("lists", "show", env=env, check=False)
    assert_one_line_error(proc, "schema is not up to date", "run `newsletter init`")
    run_cli("init", env=env)
    assert "no lists yet" in run_cli("lists", "show", env=env).stdout
