"""Issue 13, finding 5: erasure is total and lasts.

After `newsletter subscribers erase`, the address is nowhere in the database (SMTP replies,
errors, an issue's pause reason, events), nowhere in the outbox (new/, cur/, and a tmp/ file
left by a crash), and not in what `issues status` or the API show afterwards; a reader frozen
into a send before the erase is never sent to; and the address comes back only through the
subscribe form and its confirmation (double opt-in), never through an import or an add.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
from sqlalchemy import MetaData, String, cast, func, select
from sqlalchemy.orm import Session

from newsletter import subscriptions
from newsletter.config import Settings
from newsletter.db import make_engine
from newsletter.models import Suppression
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, cli_env, free_port, run_cli
from tests.web.helpers import link_in, serve, wait_for

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "tests" / "data" / "seed_world.txt"
VICTIM = "Vic.Tim@example.org"


def places_holding(database_url: str, needle: str) -> list[str]:
    """Every table.column of the database whose value contains `needle` (any case)."""
    engine = make_engine(database_url)
    found: list[str] = []
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for column in table.columns:
                    hit = conn.execute(
                        select(func.count())
                        .select_from(table)
                        .where(func.lower(cast(column, String)).contains(needle.lower()))
                    ).scalar_one()
                    if hit:
                        found.append(f"{table.name}.{column.name}")
    finally:
        engine.dispose()
    return found


def world(env: dict[str, str]) -> None:
    run_cli(
        "lists", "create", "world", "--name", "World", "--from-address",
        "World Desk <desk@example.org>", env=env,
    )  # fmt: skip


def test_erase_leaves_no_trace_in_the_database_or_the_status(
    pg_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = cli_env(database_url=pg_url, smtp_url=smtp_server.url, max_consecutive_failures="1")
    world(env)
    readers = tmp_path / "readers.csv"
    readers.write_text(f"email,name,city\n{VICTIM},Victoria Tim,Lyon\nann@example.org,Ann,Oslo\n")
    run_cli("subscribers", "import", str(readers), "--list", "world", "--confirmed", env=env)
    # The victim's server refuses, quoting the address: the reply lands in the delivery's
    # smtp_reply and last_error, and (one failure pauses) in the issue's pause reason.
    smtp_server.recorder.rules.append(
        ("rcpt", lambda a: a.lower() == VICTIM.lower(),
         f"550 5.1.1 <{VICTIM.lower()}>: Recipient address rejected: {VICTIM} unknown"),
    )  # fmt: skip
    run_cli("articles", "ingest", str(SEED), env=env)
    issue = json.loads(run_cli("issues", "compose", "--list", "world", "--json", env=env).stdout)
    run_cli("issues", "send", str(issue["id"]), env=env, check=False)
    before = run_cli("issues", "status", str(issue["id"]), env=env).stdout
    assert "vic.tim" in before.lower()  # the finding's premise: status shows the address

    erased = run_cli("subscribers", "erase", VICTIM, env=env)

    assert places_holding(pg_url, "vic.tim") == []
    assert places_holding(pg_url, "Victoria Tim") == []
    assert "vic.tim" not in (erased.stdout + erased.stderr).lower()
    for args in (("issues", "status", str(issue["id"])),
                 ("issues", "status", str(issue["id"]), "--json")):  # fmt: skip
        shown = run_cli(*args, env=env)
        assert "vic.tim" not in (shown.stdout + shown.stderr).lower(), shown.stdout
    shown = json.loads(run_cli("issues", "status", str(issue["id"]), "--json", env=env).stdout)
    assert "[erased]" in shown["reason"]  # the reason stays readable, the address is gone
    # The operator API shows the same status without it.
    port = free_port()
    runtime = Runtime(
        Settings(
            database_url=pg_url,
            base_url=f"http://127.0.0.1:{port}",
            secret_key="test-secret-key",
            admin_token="admin-token-0123456789",
        )
    )
    try:
        with serve(create_app(runtime), port) as web:
            answer = web.client.get(
                f"/api/issues/{issue['id']}",
                headers={"Authorization": "Bearer admin-token-0123456789"},
            )
    finally:
        runtime.engine.dispose()
    assert answer.status_code == 200 and "[erased]" in answer.text
    assert "vic.tim" not in answer.text.lower()


def test_erase_removes_the_readers_mail_from_the_outbox(pg_url: str, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    env = cli_env(database_url=pg_url, outbox_dir=str(outbox))
    world(env)
    readers = tmp_path / "readers.csv"
    readers.write_text(f"email,name\n{VICTIM},Victoria Tim\nann@example.org,Ann\n")
    run_cli("subscribers", "import", str(readers), "--list", "world", "--confirmed", env=env)
    run_cli("articles", "ingest", str(SEED), env=env)
    issue = json.loads(run_cli("issues", "compose", "--list", "world", "--json", env=env).stdout)
    run_cli("issues", "send", str(issue["id"]), env=env)
    files = sorted((outbox / "new").iterdir())
    assert len(files) == 2
    theirs = next(f for f in files if VICTIM.encode() in f.read_bytes())
    ann = next(f for f in files if f != theirs)
    # A mail client moved one copy to cur/, and a crash left a half-written one in tmp/.
    shutil.copy(theirs, outbox / "cur" / (theirs.name + ":2,S"))
    (outbox / "tmp" / ("crash." + theirs.name)).write_bytes(theirs.read_bytes()[:300])

    run_cli("subscribers", "erase", VICTIM, env=env)

    left = [p for p in outbox.rglob("*") if p.is_file()]
    assert [p for p in left if b"vic.tim" in p.read_bytes().lower()] == []
    assert left == [ann]  # the other reader's mail is untouched


def test_a_reader_frozen_before_the_erase_is_never_sent_to(
    pg_url: str, smtp_server: SmtpServer, redis_url: str
) -> None:
    env = cli_env(database_url=pg_url, smtp_url=smtp_server.url)
    world(env)
    for address in (VICTIM, "ann@example.org"):
        run_cli("subscribers", "add", address, "--list", "world", "--confirmed", env=env)
    run_cli("articles", "ingest", str(SEED), env=env)
    issue = json.loads(run_cli("issues", "compose", "--list", "world", "--json", env=env).stdout)
    # Frozen and enqueued to a broker no worker reads, then paused: the audience is fixed.
    queued = {**env, "NEWSLETTER_BROKER_URL": redis_url}
    run_cli("issues", "send", str(issue["id"]), env=queued)
    run_cli("issues", "pause", str(issue["id"]), env=env)

    run_cli("subscribers", "erase", VICTIM, env=env)
    run_cli("issues", "resume", str(issue["id"]), env=env)

    assert smtp_server.recorder.recipients() == ["ann@example.org"]
    assert places_holding(pg_url, "dup@example.org") == []


def test_an_erased_address_comes_back_only_through_the_form_and_its_confirmation(
    pg_url: str, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = cli_env(database_url=pg_url, smtp_url=smtp_server.url)
    world(env)
    run_cli("subscribers", "add", VICTIM, "--list", "world", "--confirmed", env=env)
    run_cli("subscribers", "erase", VICTIM, env=env)

    added = run_cli("subscribers", "add", VICTIM, "--list", "world", env=env, check=False)
    assert added.returncode != 0 and "Traceback" not in added.stderr
    assert "subscribe form" in added.stderr and len(added.stderr.strip().splitlines()) == 1
    readers = tmp_path / "readers.csv"
    readers.write_text(f"email\n{VICTIM}\n")
    report = json.loads(
        run_cli(
            "subscribers", "import", str(readers), "--list", "world", "--confirmed", "--json",
            env=env,
        ).stdout
    )  # fmt: skip
    assert report["imported"] == 0 and "subscribe form" in report["rejected"][0]["reason"]

    # The reader asks again through the form: a confirmation goes out, and only its link
    # brings them back.
    port = free_port()
    settings = Settings(
        database_url=pg_url, smtp_url=smtp_server.url, base_url=f"http://127.0.0.1:{port}",
        secret_key="test-secret-key",
    )  # fmt: skip
    runtime = Runtime(settings)
    try:
        with serve(create_app(runtime), port) as web:
            answer = web.client.post("/subscribe/world", data={"email": VICTIM, "name": "V"})
            assert answer.status_code == 200
            (confirmation,) = wait_for(smtp_server.recorder, 1)
            listed = run_cli("subscribers", "list", "--list", "world", env=env).stdout
            assert "active" not in listed  # pending until the link is used
            url = link_in(confirmation, "confirm")
            assert httpx.post(url, timeout=10).status_code == 200
    finally:
        runtime.engine.dispose()
    listed = run_cli("subscribers", "list", "--list", "world", env=env).stdout
    assert VICTIM in listed and "active" in listed


def test_a_reader_an_old_erase_left_behind_is_erased_and_not_sent_to(
    pg_url: str, smtp_server: SmtpServer
) -> None:
    """An erase before this release left case variants of the address behind (finding 3):
    `Dup@` still on the list while the hash of `dup@` is suppressed. The first run after the
    upgrade erases them as was asked, and nothing is sent to them; the other reader gets the
    issue."""
    env = cli_env(database_url=pg_url, smtp_url=smtp_server.url)
    world(env)
    # The state as the old release left it, written as it wrote it: the suppression keyed
    # with SECRET_KEY's first key, a variant of the erased address still subscribed.
    engine = make_engine(pg_url)
    try:
        with Session(engine) as s, s.begin():
            for address in ("Dup@example.org", "ann@example.org"):
                subscriptions.add_subscriber(
                    s, address, "world", confirmed=True, suppression_key="test-secret-key"
                )
            s.add(
                Suppression(
                    email_hash=subscriptions.suppression_hash("dup@example.org", "test-secret-key"),
                    reason="erased",
                )
            )
    finally:
        engine.dispose()
    run_cli("articles", "ingest", str(SEED), env=env)
    issue = json.loads(run_cli("issues", "compose", "--list", "world", "--json", env=env).stdout)
    run_cli("issues", "send", str(issue["id"]), env=env)

    assert smtp_server.recorder.recipients() == ["ann@example.org"]
    assert places_holding(pg_url, "dup@example.org") == []
