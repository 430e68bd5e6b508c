"""Fast at a million subscribers: the freeze of `issues send`, and the operator's status views.

    .venv/bin/python benchmarks/bench_freeze.py [--subscribers 1000000] [--batch-size 500]
        [--runs 20] [--explain] [--no-views]

Needs PostgreSQL (NEWSLETTER_BENCH_PG_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/
test: used only to create and drop a scratch database `newsletter_bench_freeze_<random>`,
dropped afterwards even on failure or SIGTERM) and Redis (NEWSLETTER_BENCH_FREEZE_REDIS_URL,
default redis://127.0.0.1:6379/13, flushed before and after: the batch tasks are enqueued there
as `issues send` does, and nobody consumes them).

What one run does:
 1. `newsletter init` (Alembic) on the scratch database, a list, the bundled articles;
 2. seeds N confirmed readers directly with SQL (generate_series; not through the import):
    most take every section, some chose a section set (one variant each), 1 % chose only a
    section this issue lacks (an empty variant: skipped at the freeze); plus pending,
    unsubscribed and paused readers who must not be frozen; VACUUM ANALYZE;
 3. composes a 10-article issue with the product's own compose_issue;
 4. times the freeze exactly as `newsletter issues send ID` does it: one transaction with
    issues.begin_send (render missing variants, flip to sending, INSERT ... SELECT into
    deliveries, cut batches) and delivery_counts, COMMIT; then Dispatcher.enqueue notes the
    batches and enqueues one task per batch on the scratch Redis (the rest of `issues send`
    with a broker). Every SQL statement of the freeze transaction is timed (SQLAlchemy cursor
    events);
 5. checks the ledger: exactly the frozen audience, batches that cover every queued row once;
 6. views: marks a realistic mix of the deliveries sent / failed / retrying, with two
    batches in flight (claimed through claim_batch), then times `issue_status`
    in-process, `GET /api/issues/{id}` through FastAPI's TestClient, and the CLI
    `newsletter issues status ID --json` in a subprocess, each against a real GROUP BY.

Prints plain `name: value` lines:
    subscribers                    N frozen (active, not paused); other readers seeded too
    freeze_1m_seconds              begin_send + delivery_counts + COMMIT (the transaction)
    freeze_stmt_<label>_ms         each statement of that transaction (ms; xN when repeated)
    freeze_commit_ms               the COMMIT alone
    freeze_wal_mb_cluster          WAL written meanwhile (the whole server's: it is shared)
    freeze_checkpoints_during      checkpoints that ran meanwhile (each makes the freeze
                                   write full page images: a slower run)
    enqueue_seconds                enqueue every batch task on Redis + mark_enqueued
    batches                        batches cut
    target_seconds                 10
    status_inprocess_ms            issue_status, median of --runs (warm)
    status_api_ms                  GET /api/issues/{id} through TestClient, median of --runs
    cli_issues_status_wall_ms      `newsletter issues status ID --json` in a subprocess, median
                                   of 5, Python start-up and imports included
    cli_issues_status_work_ms      the same command's work measured inside the process (from
                                   the call of the Typer app to its return: settings, engine,
                                   importing the database driver, connect, queries, JSON),
                                   median of 5
    cli_issues_status_work_after_driver_import_ms   the same with psycopg already imported
    cli_import_newsletter_cli_ms   `from newsletter.cli import app` in that process
    cli_python_startup_ms          `python -c pass`, for comparison
    group_by_reference_ms          the old way: GROUP BY status over the issue's deliveries
    freeze_second_issue_seconds    the same freeze for a second issue, with the first one's
                                   million deliveries already in the table (every later send)
    target_ms                      50
    load_before / load_after       1-minute load average
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _million import scratch_database, scratch_redis  # noqa: E402
from sqlalchemy import Engine, event, func, select, text  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "NEWSLETTER_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("NEWSLETTER_BENCH_FREEZE_REDIS_URL", "redis://127.0.0.1:6379/13")
SECRET = "bench-secret-key"
ADMIN_TOKEN = "bench-admin-token-0123456789"
SEED = ROOT / "tests" / "data" / "seed_world.txt"
SAMPLES = sorted((ROOT / "newsletter" / "data" / "sample_articles").glob("*.txt"))
TARGET_SECONDS = 10
TARGET_MS = 50


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def emit(name: str, value: object) -> None:
    print(f"{name}: {value}", flush=True)


def load1() -> float:
    return os.getloadavg()[0]


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the scratch database and Redis db are cleaned up."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- statement timing ---------------------------------------------------------------------------


def label(statement: str) -> str:
    """A short stable name for one SQL statement: its verb and first table."""
    sql = " ".join(statement.split())
    head = sql[:12].upper()
    if head.startswith("INSERT"):
        m = re.match(r"INSERT INTO (\w+)", sql, re.I)
        verb = "insert_" + (m.group(1) if m else "?")
    elif head.startswith("UPDATE"):
        m = re.match(r"UPDATE (\w+)", sql, re.I)
        verb = "update_" + (m.group(1) if m else "?")
    elif head.startswith("WITH"):
        m = re.search(r"(INSERT INTO|UPDATE) (\w+)", sql, re.I)
        verb = "with_" + (m.group(2) if m else "select")
    elif head.startswith("SELECT"):
        m = re.search(r" FROM \(?\s*(?:SELECT .*? FROM )?(\w+)", sql, re.I)
        verb = "select_" + (m.group(1) if m else "?")
    else:
        verb = sql.split(" ", 1)[0].lower()
    return verb


class StatementTimer:
    """Times every statement an engine runs while active (wall time of execute, which for
    PostgreSQL includes the server's work and the transfer of the result)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.active = False
        self.rows: list[tuple[str, float, str]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.active:
            elapsed = (time.perf_counter() - conn.info.pop("bench_t0")) * 1000
            self.rows.append((label(statement), elapsed, statement))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, float, str]]]:
        self.rows = []
        self.active = True
        try:
            yield self.rows
        finally:
            self.active = False


# --- the world ------------------------------------------------------------------------------------


def seed_readers(engine: Engine, list_id: int, n: int) -> dict[str, int]:
    """N confirmed readers plus readers who must not be frozen, with plain SQL."""
    others = {"pending": n // 50, "unsubscribed": n // 50, "paused": n // 100}
    total = n + sum(others.values())
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO subscribers (email, email_key, name, created_at) "
                "SELECT 'reader' || g || '@example.org', 'reader' || g || '@example.org', "
                "'Reader ' || g, now() "
                "FROM generate_series(1, :total) AS g"
            ),
            {"total": total},
        )
        # Readers 1..N: active. Every 20th chose Europe, every 50th Asia and Europe, every
        # 100th (offset) only Science, which no article of this issue is in: skipped.
        conn.execute(
            text(
                """
                INSERT INTO subscriptions (subscriber_id, list_id, status, token, sections,
                    paused, soft_bounces, created_at, updated_at, confirmed_at)
                SELECT s.id, :list_id,
                    CASE WHEN s.id <= :n THEN 'active'
                         WHEN s.id <= :n + :pending THEN 'pending'
                         WHEN s.id <= :n + :pending + :unsub THEN 'unsubscribed'
                         ELSE 'active' END,
                    md5(s.id::text || ':' || random()::text),
                    CASE WHEN s.id % 100 = 7 THEN '["Science"]'
                         WHEN s.id % 50 = 0 THEN '["Asia", "Europe"]'
                         WHEN s.id % 20 = 0 THEN '["Europe"]'
                         ELSE NULL END,
                    s.id > :n + :pending + :unsub, 0, now(), now(),
                    CASE WHEN s.id <= :n OR s.id > :n + :pending THEN now() END
                FROM subscribers AS s ORDER BY s.id
                """
            ),
            {
                "list_id": list_id,
                "n": n,
                "pending": others["pending"],
                "unsub": others["unsubscribed"],
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE subscribers"))
        conn.execute(text("VACUUM ANALYZE subscriptions"))
    return others


def build_world(rt: Any, n: int) -> int:
    from newsletter import issues, subscriptions
    from newsletter.articles import parse_source

    with rt.sessions() as s, s.begin():
        mlist = subscriptions.create_list(
            s, "world", "World Digest", "World Desk <desk@example.org>"
        )
        list_id = mlist.id
        for path in (SEED, *SAMPLES):
            articles = parse_source(str(path), path.read_bytes(), section=None)
            issues.store_articles(s, articles, source=path.name)
    started = time.perf_counter()
    others = seed_readers(rt.engine, list_id, n)
    log(f"seeded {n} readers (+{others}) in {time.perf_counter() - started:.1f} s")
    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            max_articles=10,
        )
        return int(issue.id)


# --- the freeze -----------------------------------------------------------------------------------


def timed_freeze(rt: Any, timer: StatementTimer, issue_id: int) -> tuple[list[int], dict[str, Any]]:
    """`issues send ID` up to the enqueue, as cli.issues_send runs it."""
    from newsletter import issues
    from newsletter.ledger.status import delivery_counts

    figures: dict[str, Any] = {}
    server = server_activity(rt)
    with timer.recording() as rows:
        started = time.perf_counter()
        with rt.sessions() as s:
            s.begin()
            batch_ids = issues.begin_send(
                s,
                rt.templates,
                issue_id,
                batch_size=rt.settings.batch_size,
                base_url=rt.settings.base_url,
                postal_address=rt.settings.postal_address,
            )
            total = delivery_counts(s, issue_id)["queued"]
            before_commit = time.perf_counter()
            s.commit()
            ended = time.perf_counter()
    figures["freeze_1m_seconds"] = round(ended - started, 3)
    figures["freeze_commit_ms"] = round((ended - before_commit) * 1000, 1)
    figures["queued"] = total
    per: dict[str, list[float]] = defaultdict(list)
    for name, ms, _sql in rows:
        per[name].append(ms)
    for name, values in per.items():
        suffix = f"  (x{len(values)})" if len(values) > 1 else ""
        figures[f"freeze_stmt_{name}_ms"] = f"{sum(values):.1f}{suffix}"
    sql_ms = sum(ms for _n, ms, _s in rows)
    figures["freeze_python_and_other_ms"] = round((before_commit - started) * 1000 - sql_ms, 1)
    after = server_activity(rt)
    # Cluster-wide (the server is shared): what else was writing shows here too.
    figures["freeze_wal_mb_cluster"] = round((after[0] - server[0]) / 1e6)
    figures["freeze_checkpoints_during"] = after[1] - server[1]
    return batch_ids, figures


def server_activity(rt: Any) -> tuple[int, int]:
    """The WAL position (bytes) and the number of checkpoints so far: a checkpoint during a
    freeze makes it write a full page image at the first change of each page."""
    with rt.engine.connect() as conn:
        wal, checkpoints = conn.execute(
            text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, "
                "checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
            )
        ).one()
    return int(wal), int(checkpoints)


def enqueue(rt: Any, batch_ids: list[int]) -> float:
    """What `issues send` does after the commit with a broker (Dispatcher.enqueue): note the
    batches as enqueued, then one task per batch. Nobody consumes the tasks (the Redis db is
    flushed afterwards)."""
    from newsletter.dispatch import Dispatcher

    dispatcher = Dispatcher(rt)
    assert dispatcher.celery is not None  # built before the clock starts, as the import did
    started = time.perf_counter()
    dispatcher.enqueue(batch_ids)
    return time.perf_counter() - started


def compose_another(rt: Any) -> int:
    """One more draft issue (reusing the articles), for a freeze with deliveries already in
    the table, as every send after the first one finds them."""
    from datetime import UTC, datetime

    from newsletter import issues

    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            max_articles=10,
            since=datetime(1970, 1, 1, tzinfo=UTC),
        )
        return int(issue.id)


def explain_freeze(rt: Any, issue_id: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement of a freeze that reads subscriptions or
    writes deliveries, each run first inside a savepoint that is rolled back, right before
    the statement itself runs (so each plan sees exactly the state its statement sees). The
    freeze is then rolled back. Untimed: the explained runs leave dead rows behind."""
    from newsletter import issues

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if ("deliveries" in statement or "subscriptions" in statement) and isinstance(
            parameters, dict
        ):
            cursor.execute("SAVEPOINT bench_explain")
            started = time.perf_counter()
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plan = "\n".join(r[0] for r in cursor.fetchall())
            ms = (time.perf_counter() - started) * 1000
            cursor.execute("ROLLBACK TO SAVEPOINT bench_explain")
            log(f"--- ({ms:.0f} ms) {' '.join(statement.split())[:200]}\n{plan}")

    event.listen(rt.engine, "before_cursor_execute", before)
    try:
        with rt.sessions() as s:
            s.begin()
            issues.begin_send(
                s,
                rt.templates,
                issue_id,
                batch_size=rt.settings.batch_size,
                base_url=rt.settings.base_url,
                postal_address=rt.settings.postal_address,
            )
            s.rollback()
    finally:
        event.remove(rt.engine, "before_cursor_execute", before)


def explain_status(rt: Any, issue_id: int) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement `issues status` runs (read-only)."""
    from newsletter.ledger.status import issue_status

    captured: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        captured.append((statement, parameters))

    event.listen(rt.engine, "before_cursor_execute", grab)
    try:
        with rt.sessions() as s:
            issue_status(s, issue_id)
    finally:
        event.remove(rt.engine, "before_cursor_execute", grab)
    with rt.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cur:
            for statement, parameters in captured:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                plan = "\n".join(r[0] for r in cur.fetchall())
                log(f"--- {' '.join(statement.split())[:200]}\n{plan}")
        raw.rollback()


# --- the views ------------------------------------------------------------------------------------


def recount_batches(session: Any, issue_id: int) -> None:
    """Count every batch of the issue again, after make_mix changed rows behind the ledger's
    back in SQL: one pass over the issue's deliveries. Caller commits."""
    from newsletter.ledger.batches import BATCHES, lock_batches, store_counts

    store_counts(session, lock_batches(session, BATCHES.c.issue_id == issue_id))


def make_mix(rt: Any, issue_id: int) -> dict[str, int]:
    """A send well under way: most deliveries sent, some failed, some waiting for a retry,
    two batches in flight right now (claimed by the product's own claim_batch)."""
    from newsletter.ledger.claims import claim_batch
    from newsletter.models import Batch

    with rt.sessions() as s:
        ids = list(s.scalars(select(Batch.id).where(Batch.issue_id == issue_id).order_by(Batch.id)))
    done = ids[: int(len(ids) * 0.6)]
    with rt.engine.begin() as conn:
        lo = conn.scalar(text("SELECT first_id FROM batches WHERE id = :b"), {"b": done[0]})
        hi = conn.scalar(text("SELECT last_id FROM batches WHERE id = :b"), {"b": done[-1]})
        conn.execute(
            text(
                """
                UPDATE deliveries SET
                  status = CASE WHEN id % 200 = 3 THEN 'failed'
                                WHEN id % 150 = 5 THEN 'queued'
                                ELSE 'sent' END,
                  attempts = 1,
                  smtp_code = CASE WHEN id % 200 = 3 THEN 550
                                   WHEN id % 150 = 5 THEN 451 ELSE 250 END,
                  last_error = CASE WHEN id % 200 = 3 THEN 'permanent: 550 5.1.1 no such user'
                                    WHEN id % 150 = 5 THEN 'temporary: 451 4.7.1 try later'
                                    END,
                  next_attempt_at = CASE WHEN id % 150 = 5
                                         THEN now() + interval '10 minutes' END,
                  sent_at = CASE WHEN id % 200 <> 3 AND id % 150 <> 5 THEN now() END
                WHERE issue_id = :i AND id BETWEEN :lo AND :hi AND status = 'queued'
                """
            ),
            {"i": issue_id, "lo": lo, "hi": hi},
        )
    with rt.sessions() as s, s.begin():
        recount_batches(s, issue_id)
    flight = ids[len(done) : len(done) + 2]
    for batch_id in flight:
        with rt.sessions() as s:
            claim_batch(s, batch_id, rt.policy)
    with rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE deliveries"))
        conn.execute(text("VACUUM ANALYZE batches"))
    return {"batches_done": len(done), "batches_in_flight": len(flight)}


def median_ms(fn: Any, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


CLI_WORK = """
import sys, time, io, contextlib
t0 = time.perf_counter()
from newsletter.cli import app
if sys.argv[2] == "driver":
    import psycopg  # the database driver, which the command imports when it connects
t1 = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        app(["issues", "status", sys.argv[1], "--json"], standalone_mode=False)
    except SystemExit:
        pass
t2 = time.perf_counter()
sys.stdout.write(buf.getvalue())
sys.stderr.write(f"BENCH import_ms={(t1 - t0) * 1000:.1f} work_ms={(t2 - t1) * 1000:.1f}\\n")
"""


def views(rt: Any, issue_id: int, runs: int, env: dict[str, str]) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from newsletter.ledger.status import issue_status
    from newsletter.models import Delivery
    from newsletter.web.app import create_app

    figures: dict[str, Any] = {}

    def truth() -> dict[str, int]:
        with rt.sessions() as s:
            rows = s.execute(
                select(Delivery.status, func.count())
                .where(Delivery.issue_id == issue_id)
                .group_by(Delivery.status)
            ).all()
        return {str(getattr(k, "value", k)): n for k, n in rows}

    def in_process() -> dict[str, Any]:
        with rt.sessions() as s, s.begin():
            return issue_status(s, issue_id)

    expected = truth()
    got = in_process()["counts"]
    if {k: v for k, v in got.items() if v} != expected:
        raise AssertionError(f"status counts {got} disagree with the ledger {expected}")
    figures["status_counts"] = json.dumps({k: v for k, v in got.items() if v})
    figures["status_inprocess_ms"] = median_ms(in_process, runs)
    figures["group_by_reference_ms"] = median_ms(truth, 5)

    client = TestClient(create_app(rt))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def api() -> None:
        response = client.get(f"/api/issues/{issue_id}", headers=headers)
        assert response.status_code == 200, response.text

    api_counts = client.get(f"/api/issues/{issue_id}", headers=headers).json()["counts"]
    assert api_counts == got, (api_counts, got)
    figures["status_api_ms"] = median_ms(api, runs)

    works: dict[str, list[float]] = {"cold": [], "driver": []}
    imports: list[float] = []
    for _ in range(6):
        for mode in works:
            proc = subprocess.run(
                [sys.executable, "-c", CLI_WORK, str(issue_id), mode],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"issues status failed:\n{proc.stdout}\n{proc.stderr}")
            assert json.loads(proc.stdout)["counts"] == got
            m = re.search(r"BENCH import_ms=([\d.]+) work_ms=([\d.]+)", proc.stderr)
            assert m is not None, proc.stderr
            works[mode].append(float(m.group(2)))
            if mode == "cold":
                imports.append(float(m.group(1)))
    plain = []
    for _ in range(6):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "newsletter.cli", "issues", "status", str(issue_id), "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        plain.append((time.perf_counter() - started) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"issues status failed:\n{proc.stdout}\n{proc.stderr}")
    startup = []
    for _ in range(6):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        startup.append((time.perf_counter() - started) * 1000)
    figures["cli_issues_status_wall_ms"] = round(statistics.median(plain[1:]), 1)
    figures["cli_issues_status_work_ms"] = round(statistics.median(works["cold"][1:]), 1)
    figures["cli_issues_status_work_after_driver_import_ms"] = round(
        statistics.median(works["driver"][1:]), 1
    )
    figures["cli_import_newsletter_cli_ms"] = round(statistics.median(imports[1:]), 1)
    figures["cli_python_startup_ms"] = round(statistics.median(startup[1:]), 1)
    return figures


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--explain", action="store_true", help="EXPLAIN ANALYZE of the freeze and status (stderr)"
    )
    parser.add_argument("--no-views", action="store_true", help="time the freeze only")
    args = parser.parse_args()

    from newsletter.config import Settings
    from newsletter.db import upgrade
    from newsletter.runtime import Runtime

    with (
        sigterm_as_exit(),
        scratch_database("newsletter_bench_freeze") as url,
        scratch_redis(REDIS_URL) as redis_url,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        settings = {
            "database_url": url,
            "broker_url": redis_url,
            "secret_key": SECRET,
            "base_url": "https://news.example.org",
            "admin_token": ADMIN_TOKEN,
            "batch_size": str(args.batch_size),
            "postal_address": "World Desk, 1 Bench Street, Benchville",
        }
        env.update({f"NEWSLETTER_{k.upper()}": v for k, v in settings.items()})
        os.environ.update({k: v for k, v in env.items() if k.startswith("NEWSLETTER_")})
        rt = Runtime(Settings(**settings))  # type: ignore[arg-type]
        upgrade(rt.engine)
        timer = StatementTimer(rt.engine)
        issue_id = build_world(rt, args.subscribers)

        load_before = load1()
        batch_ids, figures = timed_freeze(rt, timer, issue_id)
        enqueue_seconds = enqueue(rt, batch_ids)
        load_after = load1()

        # The ledger: exactly the audience, every delivery in exactly one batch (ranges do
        # not overlap, and the rows counted range by range add up to all of them), and each
        # batch's stored counts are its rows'.
        with rt.engine.connect() as conn:
            frozen = conn.scalar(
                text("SELECT count(*) FROM deliveries WHERE issue_id = :i"), {"i": issue_id}
            )
            bounds = conn.execute(
                text("SELECT first_id, last_id FROM batches WHERE issue_id = :i ORDER BY 1"),
                {"i": issue_id},
            ).all()
            in_ranges, wrong = conn.execute(
                text(
                    """
                    SELECT sum(c.n), count(*) FILTER (WHERE c.n <> c.stored)
                    FROM batches b, LATERAL (
                        SELECT count(*) AS n, b.n_queued + b.n_skipped AS stored
                        FROM deliveries d
                        WHERE d.id BETWEEN b.first_id AND b.last_id AND d.issue_id = b.issue_id
                    ) c
                    WHERE b.issue_id = :i
                    """
                ),
                {"i": issue_id},
            ).one()
        overlaps = any(b1 >= a2 for (_a1, b1), (a2, _b2) in itertools.pairwise(bounds))
        expected = args.subscribers
        if frozen != expected or overlaps or in_ranges != frozen or wrong:
            raise AssertionError(
                f"frozen {frozen} of {expected}; overlapping batches {overlaps}; "
                f"{in_ranges} in batch ranges; {wrong} batches with wrong counts"
            )

        emit("subscribers", args.subscribers)
        emit("frozen_deliveries", frozen)
        emit("queued", figures.pop("queued"))
        emit("batches", len(bounds))
        emit("enqueued_batches", len(batch_ids))
        for name, value in figures.items():
            emit(name, value)
        emit("enqueue_seconds", round(enqueue_seconds, 3))
        emit("target_seconds", TARGET_SECONDS)
        emit("load_before", f"{load_before:.2f}")
        emit("load_after", f"{load_after:.2f}")
        if not args.no_views:
            mix = make_mix(rt, issue_id)
            for name, value in mix.items():
                emit(name, value)
            emit("load_before_views", f"{load1():.2f}")
            for name, value in views(rt, issue_id, args.runs, env).items():
                emit(name, value)
            emit("target_ms", TARGET_MS)
            emit("load_after_views", f"{load1():.2f}")
            if args.explain:
                explain_status(rt, issue_id)
        # The next send: the same audience, with the first issue's million rows in the table
        # (and in its indexes) already.
        second = compose_another(rt)
        emit("load_before_second", f"{load1():.2f}")
        _ids, again = timed_freeze(rt, timer, second)
        emit("freeze_second_issue_seconds", again["freeze_1m_seconds"])
        for name, value in again.items():
            if name.startswith(("freeze_stmt_", "freeze_wal", "freeze_checkpoints")):
                emit(name.replace("freeze_", "freeze_second_", 1), value)
        emit("load_after_second", f"{load1():.2f}")
        if args.explain:
            explain_freeze(rt, compose_another(rt))
        rt.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
