"""Shared fixtures: real PostgreSQL, real Redis, a real SMTP server (aiosmtpd) that records
what arrives, and real Celery worker processes.

Tests that need a service skip with a loud reason when it is unreachable, unless
NEWSLETTER_REQUIRE_SERVICES=1 (as .ci/run sets), in which case they fail.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import create_engine, text

from newsletter.config import Settings
from newsletter.db import make_engine, upgrade
from newsletter.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "NEWSLETTER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("NEWSLETTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE = os.environ.get("NEWSLETTER_REQUIRE_SERVICES") == "1"

TABLES = (
    "deliveries, batches, issue_articles, issues, articles, events, subscriptions, "
    "subscribers, suppressions, keyring, lists, subscription_aliases"
)


def service_unavailable(what: str, why: object) -> None:
    message = f"{what} is unreachable ({why}); this test needs it"
    if REQUIRE:
        pytest.fail(f"NEWSLETTER_REQUIRE_SERVICES=1 but {message}", pytrace=False)
    sys.stderr.write(f"\n*** SKIPPING: {message} ***\n")
    pytest.skip(f"SERVICE MISSING: {message}")


# --- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh database for this test session, dropped afterwards."""
    name = f"newsletter_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any connection failure
        service_unavailable("PostgreSQL", exc)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_database_url: str) -> str:
    """The session database, emptied for this test."""
    engine = make_engine(pg_database_url)
    with engine.begin() as conn:
        # A connection a previous test leaked (an unclosed session) would hold locks and make
        # TRUNCATE wait forever: say so (it may be a leak in the product), end it, and fail
        # rather than hang if one remains.
        leaked = (
            conn.execute(
                text(
                    "SELECT left(query, 200) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND pid <> pg_backend_pid() "
                    "AND state = 'idle in transaction'"
                )
            )
            .scalars()
            .all()
        )
        for query in leaked:
            warnings.warn(f"a previous test leaked an open transaction: {query}", stacklevel=1)
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        conn.execute(text("SET LOCAL lock_timeout = '20s'"))
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return pg_database_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'newsletter.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


# --- Redis ------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.flushdb()
        client.close()
    except Exception as exc:
        service_unavailable("Redis", exc)
    return REDIS_URL


# --- SMTP --------------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float

    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Recorder:
    """aiosmtpd handler that records every accepted message. `rules` can make it answer a
    given code at a given command for matching recipients (fault tests)."""

    messages: list[Received] = field(default_factory=list)
    rules: list[tuple[str, Callable[[str], bool], str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Advertise RFC 2920 PIPELINING, as Postfix and most MTAs do (aiosmtpd reads pipelined
    # commands one line at a time either way); False tests the one-command-at-a-time path.
    pipelining: bool = True
    # Called with each message as its final "." arrives, before the reply (see the test of
    # the duplicate bound in tests/integration/test_delivery.py).
    on_data: Callable[[Envelope], None] | None = None

    async def handle_EHLO(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    def reply_for(self, stage: str, address: str) -> str | None:
        for rule_stage, match, reply in self.rules:
            if rule_stage == stage and match(address):
                return reply
        return None

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        reply = self.reply_for("rcpt", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        for rcpt in envelope.rcpt_tos:
            reply = self.reply_for("data", rcpt)
            if reply:
                return reply
        content = envelope.original_content or b""
        if self.on_data is not None:
            self.on_data(envelope)
        with self.lock:
            self.messages.append(
                Received(str(envelope.mail_from), list(envelope.rcpt_tos), content, time.time())
            )
        return "250 2.0.0 queued"

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for m in self.messages for r in m.rcpt_tos]


class SmtpServer:
    def __init__(self, recorder: Recorder, controller: Controller) -> None:
        self.recorder = recorder
        self.controller = controller
        self.host = "127.0.0.1"
        self.port = controller.port

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    recorder = Recorder()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=free_port(),
        decode_data=False,
        data_size_limit=10 * 1024 * 1024,
    )
    controller.start()
    try:
        yield SmtpServer(recorder, controller)
    finally:
        controller.stop()


# --- settings and runtime -------------------------------------------------------------------------


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "secret_key": "test-secret-key",
        "base_url": "https://news.example.org",
        "postal_address": "World Desk, 1 Test Street, Testville",
        "retry_base_seconds": 1,
        "retry_max_seconds": 2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def factory(database_url: str, **overrides: Any) -> Runtime:
        rt = Runtime(make_settings(database_url, **overrides))
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        if "engine" in rt.__dict__:
            rt.engine.dispose()


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_SECRET_KEY="test-secret-key",
        NEWSLETTER_BASE_URL="https://news.example.org",
        NEWSLETTER_RETRY_BASE_SECONDS="1",
        NEWSLETTER_RETRY_MAX_SECONDS="2",
    )
    env.update({f"NEWSLETTER_{k.upper()}": v for k, v in settings.items()})
    return env


def run_cli(
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "newsletter.cli", *args],
        env=env,
        cwd=cwd,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"newsletter {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# --- Celery workers -------------------------------------------------------------------------------


class WorkerProcess:
    """A real `newsletter worker` process (Celery prefork, or threads) with its own log file."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 2,
        name: str | None = None,
        pool: str = "prefork",
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.pool = pool
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "newsletter.cli",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(self.concurrency),
                "--pool",
                self.pool,
                "--hostname",
                f"{self.name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")
            if b" ready." in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], concurrency: int = 2) -> WorkerProcess:
        w = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log", concurrency)
        workers.append(w)
        return w.start()

    yield start
    for w in workers:
        w.stop()
