"""The fault suite's world: PostgreSQL, a Redis server of its own that a test may kill and
restart, an aiosmtpd server that records every message and can be told to refuse, close,
or stall at a given command, and real Celery worker processes to SIGKILL.

Every scenario ends with `check_delivery`: from the SMTP server's record, every eligible
reader got the digest, nobody else did, duplicates are exactly the ones the scenario
explains, and no delivery is left queued or claimed. The figures of each scenario are
printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import create_engine, select, text

from newsletter import imports, issues, subscriptions
from newsletter.articles import parse_source
from newsletter.ledger.status import issue_status
from newsletter.models import Delivery, Issue
from newsletter.runtime import Runtime
from tests.conftest import ROOT, Received, Recorder, WorkerProcess, cli_env, free_port

SEED = ROOT / "tests" / "data" / "seed_world.txt"
KEY = "test-secret-key"
LEASE_SECONDS = 10


# --- the SMTP server ------------------------------------------------------------------------


@dataclass
class Stall:
    """Hold one SMTP command of the first matching recipient: until `release()` (or the
    client goes away), or for `seconds`. At "data" with `accepted=True` the message is
    recorded first and the 250 is what is held: from the sender's ledger, the window
    between the server accepting a message and the database commit."""

    stage: str
    match: Callable[[str], bool]
    accepted: bool = False
    seconds: float | None = None
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    address: str | None = None
    taken: bool = False

    async def hold(self, address: str) -> None:
        self.address = address
        self.reached.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + (self.seconds if self.seconds is not None else 300)
        while not self.released.is_set() and loop.time() < until:
            await asyncio.sleep(0.02)

    def release(self) -> None:
        self.released.set()


@dataclass
class FaultRecorder(Recorder):
    """The Recorder of tests/conftest.py plus: refuse the next N connections with a greeting
    such as 421, stall at a command, slow every DATA down, and log every RCPT reply."""

    connections: int = 0
    refuse_connections: int = 0
    refusal: str = "421 4.3.2 Service not available, closing transmission channel"
    data_delay: float = 0.0
    stalls: list[Stall] = field(default_factory=list)
    rcpt_log: list[tuple[str, str]] = field(default_factory=list)

    def _stall(self, stage: str, address: str) -> Stall | None:
        with self.lock:
            for stall in self.stalls:
                if stall.stage == stage and not stall.taken and stall.match(address):
                    stall.taken = True
                    return stall
        return None

    def take_connection(self) -> str | None:
        """Count a new connection; the refusal greeting if it is to be refused."""
        with self.lock:
            self.connections += 1
            if self.refuse_connections > 0:
                self.refuse_connections -= 1
                return self.refusal
        return None

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        stall = self._stall("rcpt", address)
        if stall is not None:
            await stall.hold(address)
        reply = self.reply_for("rcpt", address) or "250 OK"
        with self.lock:
            self.rcpt_log.append((address, reply))
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        for rcpt in envelope.rcpt_tos:
            reply = self.reply_for("data", rcpt)
            if reply:
                return reply
        address = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
        stall = self._stall("data", address)
        if stall is not None and not stall.accepted:
            await stall.hold(address)  # the sender dies here, or times out, in the tests
            return "451 4.3.0 transaction aborted"
        with self.lock:
            self.messages.append(
                Received(
                    str(envelope.mail_from),
                    list(envelope.rcpt_tos),
                    envelope.original_content or b"",
                    time.time(),
                )
            )
        if stall is not None:
            await stall.hold(address)
        return "250 2.0.0 queued"

    def attempts(self, address: str) -> list[str]:
        with self.lock:
            return [reply for a, reply in self.rcpt_log if a == address]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


class FaultSMTP(SMTPProtocol):
    """aiosmtpd's server, able to refuse a connection at the greeting and closing the
    connection after any 421, as real servers do."""

    async def _handle_client(self) -> None:
        recorder = self.event_handler
        refusal = recorder.take_connection() if isinstance(recorder, FaultRecorder) else None
        if refusal is None:
            await super()._handle_client()
            return
        await self.push(refusal)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        await super().push(status)
        line = status.decode() if isinstance(status, bytes) else str(status)
        if line.startswith("421") and self.transport is not None:
            self.transport.close()


class FaultController(Controller):
    def factory(self) -> FaultSMTP:
        return FaultSMTP(self.handler, **self.SMTP_kwargs)


class FaultSmtpServer:
    def __init__(self, recorder: FaultRecorder, port: int) -> None:
        self.recorder = recorder
        self.port = port
        self.controller: FaultController | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.controller = FaultController(
            self.recorder,
            hostname="127.0.0.1",
            port=self.port,
            decode_data=False,
            data_size_limit=10 * 1024 * 1024,
            ready_timeout=30,
        )
        self.controller.start()
        with self.recorder.lock:  # the controller's own readiness probe is not a client
            self.recorder.connections = 0

    def stop(self) -> None:
        for stall in self.recorder.stalls:
            stall.release()
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def smtp() -> Iterator[FaultSmtpServer]:
    server = FaultSmtpServer(FaultRecorder(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def first_times(addresses: Iterable[str], times: int = 1) -> Callable[[str], bool]:
    """A rule matcher true for the first `times` attempts of each of these addresses."""
    left = dict.fromkeys(addresses, times)
    lock = threading.Lock()

    def match(address: str) -> bool:
        with lock:
            if left.get(address, 0) > 0:
                left[address] -= 1
                return True
            return False

    return match


# --- Redis --------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of this test's own, without persistence: a restart loses everything
    it held, as a crashed Redis does. (The shared Redis is never touched.)"""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 20, "redis-server to start")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- workers and other processes ----------------------------------------------------------


def children(pid: int) -> list[int]:
    """Child processes of `pid` (the prefork pool of a Celery worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return found


class Workers:
    """Starts `newsletter worker` processes in the background (so a test can seed the
    database meanwhile) and kills whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []
        self.pool = ThreadPoolExecutor(max_workers=4)

    def launch(
        self, env: dict[str, str], concurrency: int = 1, pool: str = "prefork"
    ) -> Future[WorkerProcess]:
        worker = WorkerProcess(
            env,
            self.tmp_path / f"worker{len(self.started)}.log",
            concurrency=concurrency,
            pool=pool,
        )
        self.started.append(worker)
        return self.pool.submit(worker.start, 120)

    def start(self, env: dict[str, str], concurrency: int = 1) -> WorkerProcess:
        return self.launch(env, concurrency).result()

    @staticmethod
    def kill(worker: WorkerProcess) -> None:
        """SIGKILL the worker's whole process group: parent and pool, no cleanup at all."""
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for worker in self.started:
            if worker.proc is not None and worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


class Reconciler:
    """Calls the reconciler task's function every `interval` seconds in its own process: what
    Celery beat does once a minute, faster, so that a scenario need not wait for beat."""

    def __init__(self, env: dict[str, str], log_path: Path, interval: float = 0.5) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.reconciler", str(interval)],
            env=env,
            cwd=ROOT,
            stdout=open(log_path, "ab"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )

    def requeued(self) -> int:
        return sum(
            int(line.split()[1])
            for line in self.log_path.read_text().splitlines()
            if line.startswith("requeued ")
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def reconciler(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Reconciler]]:
    started: list[Reconciler] = []

    def start(env: dict[str, str]) -> Reconciler:
        r = Reconciler(env, tmp_path / f"reconciler{len(started)}.log")
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def newsletter(*args: str, env: dict[str, str], check: bool = True) -> str:
    """Run the `newsletter` CLI as an operator would; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "newsletter.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"newsletter {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc.stdout + proc.stderr


# --- the world ------------------------------------------------------------------------------


def fault_env(
    pg_url: str, redis: RedisServer, smtp: FaultSmtpServer, **settings: Any
) -> dict[str, str]:
    values: dict[str, Any] = {
        "database_url": pg_url,
        "broker_url": redis.url,
        "smtp_url": smtp.url,
        "lease_seconds": LEASE_SECONDS,
        "batch_size": 10,
    }
    values.update(settings)
    return cli_env(**{k: str(v) for k, v in values.items()})


def readers(n: int, domain: str = "example.org", prefix: str = "reader") -> list[str]:
    return [f"{prefix}{i}@{domain}" for i in range(n)]


def seed(rt: Runtime, addresses: list[str]) -> int:
    """A list whose readers are `addresses` (confirmed, in this order), the seed articles,
    and a composed draft issue; its id."""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        rows = "\n".join(f"{a},Reader {i}" for i, a in enumerate(addresses))
        import io

        imports.import_csv(
            s,
            io.StringIO("email,name\n" + rows + "\n"),
            "world",
            confirmed=True,
            suppression_key=KEY,
        )
        issues.store_articles(s, parse_source(SEED.name, SEED.read_bytes()), source="seed")
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        return issue.id


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def status_of(rt: Runtime, issue_id: int) -> dict[str, Any]:
    with rt.sessions() as s:
        return issue_status(s, issue_id)


def wait_finished(rt: Runtime, issue_id: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until the issue is no longer sending and nothing is queued or claimed."""

    def finished() -> dict[str, Any] | None:
        st = status_of(rt, issue_id)
        pending = st["counts"]["queued"] + st["counts"]["claimed"]
        return st if st["status"] != "sending" and not pending else None

    try:
        return wait_until(finished, timeout, f"issue {issue_id} to finish")  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {status_of(rt, issue_id)}") from None


def deliveries(rt: Runtime, issue_id: int) -> dict[str, Delivery]:
    """The ledger rows of an issue, by reader address."""
    from newsletter.models import Subscriber

    with rt.sessions() as s:
        rows = s.execute(
            select(Subscriber.email, Delivery)
            .join(Delivery, Delivery.subscriber_id == Subscriber.id)
            .where(Delivery.issue_id == issue_id)
        ).all()
        return {email: d for email, d in rows}


def issue_row(rt: Runtime, issue_id: int) -> Issue:
    with rt.sessions() as s:
        issue = s.get(Issue, issue_id)
        assert issue is not None
        return issue


def kill_db_connections(pg_url: str) -> int:
    """pg_terminate_backend every other connection to the test database (the workers', the
    reconciler's, this process's pooled ones): what a database restart does to them."""
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                ).all()
            )
    finally:
        admin.dispose()


@contextmanager
def database_down(pg_url: str) -> Iterator[int]:
    """The test database restarts, without restarting the shared server: every connection
    is killed and new ones are refused until the block ends. Yields the connections killed."""
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
        try:
            yield kill_db_connections(pg_url)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


# --- the verdict --------------------------------------------------------------------------


@dataclass
class Tally:
    scenario: str
    expected: int
    received: int
    duplicates: int
    note: str = ""


RESULTS: list[Tally] = []


def check_delivery(
    rt: Runtime,
    issue_id: int,
    recorder: FaultRecorder,
    *,
    scenario: str,
    eligible: Iterable[str],
    duplicates: int = 0,
    note: str = "",
) -> Tally:
    """What the readers saw: every eligible reader got the digest, nobody else did, and
    exactly `duplicates` extra copies arrived (each explained by the scenario: a worker
    killed between the server's 250 and the commit). No delivery is left queued or claimed."""
    eligible = sorted(set(eligible))
    got = recorder.recipients()
    per_reader = Counter(got)
    missing = sorted(set(eligible) - set(per_reader))
    strangers = sorted(set(per_reader) - set(eligible))
    assert not missing, f"{len(missing)} eligible reader(s) never got the digest: {missing[:5]}"
    assert not strangers, f"mailed reader(s) who should not have been: {strangers[:5]}"
    extra = len(got) - len(per_reader)
    twice = {a: n for a, n in per_reader.items() if n > 1}
    assert extra == duplicates, f"{extra} duplicate(s), expected {duplicates}: {twice}"
    # A resent copy is the same message: same Message-ID, so mail clients fold it away.
    with recorder.lock:
        for address in twice:
            ids = {
                m.data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]
                for m in recorder.messages
                if address in m.rcpt_tos
            }
            assert len(ids) == 1, f"the copies sent to {address} differ in Message-ID: {ids}"
    counts = status_of(rt, issue_id)["counts"]
    assert counts["queued"] == 0 and counts["claimed"] == 0, counts
    assert counts["sent"] == len(eligible), counts
    tally = Tally(scenario, len(eligible), len(got), extra, note)
    RESULTS.append(tally)
    return tally


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault scenarios: what reached the SMTP server")
    width = max(len(r.scenario) for r in RESULTS)
    tr.write_line(f"{'scenario':<{width}}  expected  received  duplicates  note")
    for r in RESULTS:
        tr.write_line(
            f"{r.scenario:<{width}}  {r.expected:>8}  {r.received:>8}  {r.duplicates:>10}  {r.note}"
        )


@pytest.fixture
def rt(pg_url: str, make_runtime: Callable[..., Runtime]) -> Runtime:
    """The test's own view of the database (no broker, no SMTP)."""
    return make_runtime(pg_url)
