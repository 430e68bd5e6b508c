"""Issue 13, finding 9: link tokens reached the access log through a percent-encoded path
(`/%70references/<token>`): uvicorn logs the raw path, the scrubber matched only the plain
one. A real `newsletter serve` is asked every spelling of every link; its log never holds
the token."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from newsletter.runtime import Runtime
from newsletter.tokens import Purpose
from tests.conftest import cli_env, free_port, make_settings, run_cli


def _variants(signed: dict[Purpose, str]) -> list[str]:
    pref, unsub, conf = (
        signed[Purpose.PREFERENCES],
        signed[Purpose.UNSUBSCRIBE],
        signed[Purpose.CONFIRM],
    )
    return [
        f"/%70references/{pref}",
        f"/%70%72%65%66%65%72%65%6E%63%65%73/{pref}",
        f"/PREFERENCES/{pref}",
        f"/Preferences/{pref}",
        f"/preferences%2F{pref}",
        f"/preferences%2f{pref}?x=1",
        f"/%2570references/{pref}",
        f"/%75nsubscribe/{unsub}",
        f"/UNSUBSCRIBE/{unsub}",
        f"/unsubscribe/{unsub}",
        f"/%63onfirm/{conf}",
        f"/conFIRM/{conf}",
    ]


def test_no_spelling_of_a_link_puts_its_token_in_the_access_log(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    env = cli_env(database_url=f"sqlite:///{db}", outbox_dir=str(tmp_path / "outbox"))
    run_cli("init", env=env)
    run_cli(
        "lists", "create", "world", "--name", "World", "--from-address", "d@example.org", env=env
    )
    run_cli("subscribers", "add", "ada@example.org", "--list", "world", "--confirmed", env=env)
    with sqlite3.connect(db) as conn:
        (token,) = conn.execute("SELECT token FROM subscriptions").fetchone()
    links = Runtime(make_settings(f"sqlite:///{db}")).links.signer
    signed = {purpose: links.sign(purpose, token) for purpose in Purpose}

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "newsletter.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline, log.read_text()
                time.sleep(0.2)
        answers = {}
        with httpx.Client(base_url=base, timeout=10) as client:
            for path in _variants(signed):
                answers[path] = client.get(path).status_code
        assert answers[f"/%70references/{signed[Purpose.PREFERENCES]}"] == 200  # it routes
    finally:
        server.terminate()
        server.wait(15)
    logged = log.read_text()
    assert logged.count('"GET ') >= len(answers), logged  # the access log is on
    assert token not in logged
    for purpose, value in signed.items():
        signature = value.rsplit(".", 1)[-1]
        assert signature not in logged, (
            purpose,
            [ln for ln in logged.splitlines() if signature in ln],
        )
