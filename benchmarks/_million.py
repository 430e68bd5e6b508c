"""Helpers for the benchmarks at a million subscribers (bench_memory.py, bench_list_page.py):
a scratch PostgreSQL database and Redis database, subscribers seeded straight with SQL (the
CSV import has its own benchmark), the product's CLI run in a subprocess whose peak RSS is
measured, and RSS sampling of a running process.

Nothing here is the product: the product is only driven through its CLI and functions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "NEWSLETTER_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SECRET = "bench-secret-key"
BASE_URL = "https://news.example.org"
SEED = ROOT / "tests" / "data" / "seed_world.txt"
MB = 1024 * 1024


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


# --- services ----------------------------------------------------------------------------


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new database `{prefix}_<random>`, dropped afterwards (also on failure)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
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


@contextmanager
def scratch_redis(url: str) -> Iterator[str]:
    """The Redis database at `url`, flushed before and after."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update({f"NEWSLETTER_{k.upper()}": v for k, v in settings.items()})
    return env


def newsletter_argv(*args: str) -> list[str]:
    """The real CLI: the `newsletter` console script of this interpreter's environment (a
    python process itself, no wrapper), or `python -m newsletter.cli`."""
    script = Path(sys.executable).parent / "newsletter"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "newsletter.cli", *args]


def cli(*args: str, env: dict[str, str], timeout: float = 1800) -> str:
    proc = subprocess.run(
        newsletter_argv(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"newsletter {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


# --- the world ---------------------------------------------------------------------------


def seed_subscribers(
    database_url: str, list_slug: str, count: int, *, unsubscribed_every: int = 0
) -> dict[str, int]:
    """`count` subscribers on the list, straight with SQL: confirmed (`active`), each with a
    unique random token; with `unsubscribed_every` K, every K-th one `unsubscribed` instead.
    Subscription ids follow subscriber ids. Returns the counts per status."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            list_id = conn.execute(
                text("SELECT id FROM lists WHERE slug = :s"), {"s": list_slug}
            ).scalar_one()
            first = conn.execute(text("SELECT coalesce(max(id), 0) FROM subscribers")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO subscribers (email, email_key, name, created_at) "
                    "SELECT 'reader' || i || '@example.org', 'reader' || i || '@example.org', "
                    "       'Reader ' || i, "
                    "       now() - make_interval(secs => :n - i) "
                    "FROM generate_series(1, :n) AS i ORDER BY i"
                ),
                {"n": count},
            )
            # token: 16 random bytes, URL-safe base64 without padding (as new_token() makes)
            conn.execute(
                text(
                    "INSERT INTO subscriptions (subscriber_id, list_id, status, token, sections, "
                    "  paused, soft_bounces, created_at, updated_at, confirmed_at, "
                    "  unsubscribed_at) "
                    "SELECT s.id, :list_id, "
                    "  CASE WHEN :k > 0 AND (s.id - :first) % :k = 0 "
                    "       THEN 'unsubscribed' ELSE 'active' END, "
                    "  rtrim(translate(encode(decode(md5(random()::text || s.id::text), 'hex'), "
                    "        'base64'), '+/', '-_'), '='), "
                    "  NULL, false, 0, s.created_at, s.created_at, s.created_at, "
                    "  CASE WHEN :k > 0 AND (s.id - :first) % :k = 0 THEN now() END "
                    "FROM subscribers s WHERE s.id > :first ORDER BY s.id"
                ),
                {"list_id": list_id, "k": unsubscribed_every, "first": first},
            )
            counts = dict(
                conn.execute(
                    text(
                        "SELECT status, count(*) FROM subscriptions WHERE list_id = :l "
                        "GROUP BY status"
                    ),
                    {"l": list_id},
                ).all()
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE subscribers"))
            conn.execute(text("VACUUM ANALYZE subscriptions"))
    finally:
        engine.dispose()
    return {str(k): int(v) for k, v in counts.items()}


def subscribe_every(database_url: str, list_slug: str, every: int) -> int:
    """Subscribe every `every`-th existing subscriber to another list as well (`active`);
    their subscription ids come after all the others. Returns how many."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            list_id = conn.execute(
                text("SELECT id FROM lists WHERE slug = :s"), {"s": list_slug}
            ).scalar_one()
            added = conn.execute(
                text(
                    "INSERT INTO subscriptions (subscriber_id, list_id, status, token, sections, "
                    "  paused, soft_bounces, created_at, updated_at, confirmed_at) "
                    "SELECT s.id, :list_id, 'active', "
                    "  rtrim(translate(encode(decode(md5(random()::text || s.id::text || 'x'), "
                    "        'hex'), 'base64'), '+/', '-_'), '='), "
                    "  NULL, false, 0, now(), now(), now() "
                    "FROM subscribers s WHERE s.id % :every = 0 ORDER BY s.id"
                ),
                {"list_id": list_id, "every": every},
            ).rowcount
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE subscriptions"))
    finally:
        engine.dispose()
    return int(added)


def build_world(env: dict[str, str], database_url: str, count: int, **seed: int) -> int:
    """Schema, the `world` list, `count` subscribers, the seed articles, a composed issue.
    Returns the issue id."""
    cli("init", env=env)
    cli(
        "lists",
        "create",
        "world",
        "--name",
        "World Digest",
        "--from-address",
        "World Desk <desk@example.org>",
        env=env,
    )
    started = time.monotonic()
    counts = seed_subscribers(database_url, "world", count, **seed)
    log(f"seeded {counts} in {time.monotonic() - started:.0f} s")
    cli("articles", "ingest", str(SEED), env=env)
    out = cli("issues", "compose", "--list", "world", "--max-articles", "10", env=env)
    return int(out.strip().splitlines()[-1])


# --- memory of processes -----------------------------------------------------------------


def status_kb(pid: int, field: str) -> int | None:
    """A `Vm...` figure of /proc/PID/status in kB (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Measured:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_kb: int  # the process's own peak RSS (see run_measured)
    hwm_kb: int  # the last VmHWM read from /proc while it ran (a cross-check)


GNU_TIME = "/usr/bin/time"


def run_measured(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    timeout: float = 3600,
    stdout_path: Path | None = None,
) -> Measured:
    """Run one process and measure its peak RSS. It is started by GNU time, which reports
    the ru_maxrss of the process it runs (time itself is a 2 MB C program and not measured).
    Why not wait4() from here: a child's ru_maxrss also counts the copy of its parent it was
    forked from until its exec, so a big benchmark process would inflate the figure. VmHWM
    (reset by exec) is also polled from /proc every 20 ms as a cross-check. With
    `stdout_path`, the output goes to that file (and Measured.stdout is empty)."""
    if not os.access(GNU_TIME, os.X_OK):
        raise RuntimeError(f"{GNU_TIME} (GNU time) is needed: apt-get install time")
    with (
        open(stdout_path, "w+b") if stdout_path else tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as report,
    ):
        started = time.monotonic()
        proc = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", report.name, *argv],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        hwm = 0
        try:
            while proc.poll() is None:
                for pid in children(proc.pid):
                    hwm = max(hwm, status_kb(pid, "VmHWM") or 0)
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"{' '.join(argv)} took over {timeout:.0f} s")
                time.sleep(0.02)
        finally:
            kill_group(proc)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        lines = report.read().split()
        return Measured(
            list(argv),
            proc.returncode,
            "" if stdout_path else out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            int(lines[-1]) if lines and lines[-1].isdigit() else 0,
            hwm,
        )


def kill_group(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM the process group of a process started with start_new_session, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def slope_mb_per_min(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return 60 * cov / var


class Worker:
    """One `newsletter worker` process (Celery prefork or threads), in its own process group,
    logging to a file."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 1,
        name: str = "bench",
        pool: str = "prefork",
    ) -> None:
        self.log_path = log_path
        self.pool = pool
        self.name = name
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            newsletter_argv(
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(concurrency),
                "--pool",
                pool,
                "--hostname",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ),
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        # Celery logs "celery@host ready." (at INFO) once the pool is up.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early:\n{self.tail()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout}s:\n{self.tail()}")

    def pool_pids(self) -> list[int]:
        """The processes that send: the prefork children, or the worker itself (threads)."""
        if self.pool != "prefork":
            return [self.proc.pid]
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        kill_group(self.proc)
        self._log.close()
