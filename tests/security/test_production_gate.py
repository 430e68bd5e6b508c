"""Issue 13, finding 8: the production gate.

Only ENV=production exactly used to trigger the check (`Production`, `prod` did not);
`SECRET_KEY="<dev key>,newkey"` passed (the dev key still verified links); `","` passed and
then every token operation raised; in production an issue still went out with
http://localhost:8000 links, no DKIM and the placeholder postal address, and `issues check`
said "no problems found". Seen on PostgreSQL, through the CLI and the operator API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from newsletter import issues, subscriptions
from newsletter.articles import SAMPLE_ARTICLES_DIR, parse_source
from newsletter.ledger.control import pause_issue
from newsletter.models import Delivery, Issue, IssueStatus
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import cli_env, run_cli

# The shipped defaults, as an operator sees them (README, `newsletter --help`).
DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"
PLACEHOLDER_POSTAL_ADDRESS = "Newsletter Desk, 1 Example Street, Example City"
GOOD_KEY = "k7Qm3vXz9PpL2sR8tY4uW6aB1cD5eF0gHjNq"  # 36 bytes, not a known key
GOOD_KEY_2 = "Zr8Lq2Wm5Xv9Tn3Bp7Yk1Hc6Jd4Fs0GaEu"
REAL_POSTAL = "World Desk, 10 Harbour Road, Portsmouth PO1 2AB"
ADMIN = "admin-token-for-the-gate-test-0123456789"


def prod_env(**overrides: str) -> dict[str, str]:
    """Settings that production accepts; each test spoils one of them."""
    values = {
        "env": "production",
        "secret_key": GOOD_KEY,
        "base_url": "https://news.example.org",
        "postal_address": REAL_POSTAL,
    }
    values.update(overrides)
    return cli_env(**values)


def refused(proc_env: dict[str, str], where: Path) -> str:
    """`newsletter init` on a fresh SQLite file with these settings must refuse to start,
    in one line, and create nothing."""
    database = where / "gate.db"
    proc_env = {**proc_env, "NEWSLETTER_DATABASE_URL": f"sqlite:///{database}"}
    proc = run_cli("init", env=proc_env, cwd=where, check=False)
    assert proc.returncode == 1, f"started anyway: {proc.stdout}{proc.stderr}"
    assert not database.exists()
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "setting", "value", "says"),
    [
        ("Production", "secret_key", DEV_SECRET_KEY, "default key"),
        ("prod", "secret_key", DEV_SECRET_KEY, "default key"),
        ("PRODUCTION-eu", "secret_key", "short-but-random-Xq9", "shorter than 32 bytes"),
        ("production", "secret_key", f"{DEV_SECRET_KEY},{GOOD_KEY}", "key 1 of 2"),
        ("production", "secret_key", f"{GOOD_KEY},{DEV_SECRET_KEY}", "key 2 of 2"),
        ("production", "secret_key", f"{GOOD_KEY},,{GOOD_KEY_2}", "key 2 of 3 in"),
        ("production", "secret_key", f"{GOOD_KEY}, ", "is empty"),
        ("production", "base_url", "http://news.example.org", "not https"),
        ("production", "base_url", "http://localhost:8000", "on localhost"),
        ("production", "base_url", "https://localhost", "on localhost"),
        ("production", "base_url", "https://127.0.0.1:8443", "on localhost"),
        ("production", "base_url", "https://[::1]:8000", "on localhost"),
        ("Prod", "postal_address", PLACEHOLDER_POSTAL_ADDRESS, "placeholder"),
    ],
)
def test_production_refuses_to_start_on_unsafe_settings(
    env: str, setting: str, value: str, says: str, tmp_path: Path
) -> None:
    line = refused(prod_env(env=env, **{setting: value}), tmp_path)
    assert says in line, line
    for secret in (DEV_SECRET_KEY, GOOD_KEY, GOOD_KEY_2):
        assert secret not in line, "the error names a secret"


def test_production_refuses_the_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_ENV"] = "production"
    line = refused(env, tmp_path)
    assert "default key" in line and "on localhost" in line and "placeholder" in line


@pytest.mark.parametrize("value", [",", ", ,", " "])
def test_a_secret_key_with_no_key_is_refused_in_every_environment(
    value: str, tmp_path: Path
) -> None:
    for env in ("development", "production"):
        line = refused(prod_env(env=env, secret_key=value), tmp_path)
        assert "holds no key" in line, line


def test_a_development_environment_still_starts_on_the_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if not k.startswith("NEWSLETTER_")}
    env.update(NEWSLETTER_DATABASE_URL=f"sqlite:///{tmp_path / 'dev.db'}", NEWSLETTER_ENV="staging")
    assert run_cli("init", env=env, cwd=tmp_path).returncode == 0


# --- issues check and send --------------------------------------------------------------------


@pytest.fixture
def dev_issue(
    pg_url: str, make_runtime: Callable[..., Runtime], tmp_path: Path
) -> tuple[Runtime, int]:
    """An issue composed in development (http://localhost:8000 links, the placeholder postal
    address) for two confirmed readers, not sent."""
    rt = make_runtime(
        pg_url,
        base_url="http://localhost:8000",
        postal_address=PLACEHOLDER_POSTAL_ADDRESS,
        outbox_dir=tmp_path / "outbox",
    )
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        for path in sorted(SAMPLE_ARTICLES_DIR.glob("*.txt"))[:4]:
            issues.store_articles(s, parse_source(path.name, path.read_bytes()), source=path.name)
        for who in ("ada", "bob"):
            subscriptions.add_subscriber(
                s, f"{who}@example.org", "world", confirmed=True, suppression_key="k"
            )
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        return rt, issue.id


def outbox_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "outbox").rglob("*") if p.is_file()]


def test_issues_check_reports_the_gate_as_errors_in_production_and_warnings_elsewhere(
    dev_issue: tuple[Runtime, int], pg_url: str
) -> None:
    _rt, issue_id = dev_issue
    dev = run_cli(
        "issues", "check", str(issue_id), "--json",
        env=cli_env(database_url=pg_url, base_url="http://localhost:8000"), check=False,
    )  # fmt: skip
    report = json.loads(dev.stdout)
    assert dev.returncode == 0, dev.stdout
    warned = {p["code"] for p in report["problems"] if p["severity"] == "warning"}
    assert {"dkim", "insecure-link", "local-link", "postal-address"} <= warned, report

    prod = run_cli("issues", "check", str(issue_id), env=prod_env(database_url=pg_url), check=False)
    assert prod.returncode == 1, f"production check passed: {prod.stdout}"
    assert "no problems found" not in prod.stdout
    for expected in (
        "error: dkim: not DKIM-signed",
        "error: insecure-link",
        "error: local-link",
        "http://localhost:8000/archive/world/",
        "error: postal-address: the footer carries the placeholder postal address",
    ):
        assert expected in prod.stdout, prod.stdout


def test_a_send_in_production_refuses_to_start_while_check_reports_errors(
    dev_issue: tuple[Runtime, int], pg_url: str, tmp_path: Path
) -> None:
    rt, issue_id = dev_issue
    env = prod_env(database_url=pg_url, outbox_dir=str(tmp_path / "outbox"))
    proc = run_cli("issues", "send", str(issue_id), env=env, check=False)
    assert proc.returncode == 1, f"the send started: {proc.stdout}{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be sent in production" in lines[0], proc.stderr
    assert "dkim" in lines[0] and "local-link" in lines[0] and "postal-address" in lines[0]
    assert outbox_files(tmp_path) == []
    with rt.sessions() as s:
        assert s.scalar(select(Issue.status).where(Issue.id == issue_id)) is IssueStatus.DRAFT
        assert s.scalars(select(Delivery.id)).all() == []


def test_a_resume_in_production_refuses_to_start_while_check_reports_errors(
    dev_issue: tuple[Runtime, int], pg_url: str, tmp_path: Path
) -> None:
    rt, issue_id = dev_issue
    with rt.sessions() as s, s.begin():
        issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=10,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        pause_issue(s, issue_id)
    env = prod_env(database_url=pg_url, outbox_dir=str(tmp_path / "outbox"))
    proc = run_cli("issues", "resume", str(issue_id), env=env, check=False)
    assert proc.returncode == 1, f"the send resumed: {proc.stdout}{proc.stderr}"
    assert "cannot be sent in production" in proc.stderr
    assert outbox_files(tmp_path) == []
    with rt.sessions() as s:
        assert s.scalar(select(Issue.status).where(Issue.id == issue_id)) is IssueStatus.PAUSED


def test_the_api_send_in_production_answers_409_with_the_problems(
    dev_issue: tuple[Runtime, int],
    pg_url: str,
    make_runtime: Callable[..., Runtime],
    tmp_path: Path,
) -> None:
    _dev, issue_id = dev_issue
    rt = make_runtime(
        pg_url,
        env="production",
        secret_key=GOOD_KEY,
        base_url="https://news.example.org",
        postal_address=REAL_POSTAL,
        admin_token=ADMIN,
        outbox_dir=tmp_path / "outbox",
    )
    with TestClient(create_app(rt), base_url="https://news.example.org") as client:
        answer = client.post(
            f"/api/issues/{issue_id}/send", headers={"Authorization": f"Bearer {ADMIN}"}
        )
    assert answer.status_code == 409, answer.text
    body = answer.json()
    assert "cannot be sent in production" in body["error"]
    codes = {p["code"] for p in body["problems"]}
    assert {"dkim", "local-link", "postal-address"} <= codes, body
    assert outbox_files(tmp_path) == []
    with rt.sessions() as s:
        assert s.scalar(select(Issue.status).where(Issue.id == issue_id)) is IssueStatus.DRAFT


def test_a_compliant_issue_is_sent_in_production(
    pg_url: str, make_runtime: Callable[..., Runtime], tmp_path: Path
) -> None:
    """The gate is not a wall: an issue composed under production settings and signed with
    DKIM passes `issues check` and is sent."""
    key_file = tmp_path / "news.pem"
    env = prod_env(
        database_url=pg_url,
        outbox_dir=str(tmp_path / "outbox"),
        dkim_domain="example.org",
        dkim_selector="news",
        dkim_key_file=str(key_file),
    )
    run_cli(
        "dkim", "keygen", "--selector", "news", "--domain", "example.org", "--out",
        str(key_file), env=env,
    )  # fmt: skip
    run_cli(
        "lists", "create", "world", "--name", "World Digest", "--from-address",
        "World Desk <desk@example.org>", env=env,
    )  # fmt: skip
    run_cli("articles", "ingest", *map(str, sorted(SAMPLE_ARTICLES_DIR.glob("*.txt"))[:3]), env=env)
    run_cli("subscribers", "add", "ada@example.org", "--list", "world", "--confirmed", env=env)
    issue_id = run_cli("issues", "compose", "--list", "world", env=env).stdout.strip()
    check = run_cli("issues", "check", issue_id, env=env, check=False)
    assert check.returncode == 0 and "no problems found" in check.stdout, check.stdout
    run_cli("issues", "send", issue_id, env=env)
    sent = outbox_files(tmp_path)
    assert len(sent) == 1
    assert b"DKIM-Signature:" in sent[0].read_bytes()
