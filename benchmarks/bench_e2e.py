"""End to end: `issues send --wait` through Celery workers to Postfix's smtp-sink, and the
plain-smtplib reference sending the same messages to the same sink in the same run.

    .venv/bin/python benchmarks/bench_e2e.py [--subscribers 10000] [--workers 2x1]
        [--pool prefork|threads] [--batch-size 500] [--repeat R] [--profile OUT.txt]
        [--worker-env KEY=VALUE ...]

Needs PostgreSQL (NEWSLETTER_BENCH_PG_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/
postgres, used to create and drop a scratch database), Redis (NEWSLETTER_BENCH_REDIS_URL,
default redis://127.0.0.1:6379/14, flushed before and after) and smtp-sink (see _smtp.py).

What one run does:
 1. creates a scratch database, `newsletter init`, a list, N confirmed subscribers imported
    from a CSV with `newsletter subscribers import --confirmed`, ingests tests/data/
    seed_world.txt and the bundled sample articles, composes a 10-article issue;
 2. starts smtp-sink on loopback and the workers (`--workers PxC`: P processes of
    `newsletter worker --concurrency C --pool POOL`) and waits until they are ready;
 3. times from invoking `newsletter issues send ID --wait` to the issue's finished_at (written
    by the worker that finds no row left queued or claimed, right after it committed the
    last outcome), then checks that every delivery is 'sent' and that smtp-sink counted
    exactly N messages;
 4. builds the same N messages as the workers did (the worker's IssueCache + build_for with
    each delivery's id, address, name and token: the bytes a reader got, up to the Date
    header) and sends them with `smtplib_reference(..., connections=4)` to the same sink;
 5. tears everything down (workers, sink, database, Redis db) even on failure or SIGTERM.

One run at a time per machine (a lock file; a second run would flush the first one's broker
database). A send that stops making progress (nothing reaches smtp-sink for --stall-timeout
seconds) fails the run instead of hanging it. --profile records one pool process with py-spy
(install it into the venv) and prints where the time of send_batch went.
--worker-env sets variables for the workers only, for experiments (e.g. PGOPTIONS).

Prints plain `name: value` lines:
    e2e_subscribers              N
    e2e_workers                  PROCESSESxCONCURRENCY: 2x1 (two worker processes, one
                                 sender each), 2x4 with --pool threads (two processes, four
                                 sending threads each), ...
    e2e_pool                     prefork (the default) or threads
    e2e_seconds                  invoking `issues send` -> issue finished_at
    e2e_cli_return_seconds       invoking `issues send` -> the command returned (it polls)
    e2e_first_delivery_seconds   invoking `issues send` -> the first delivery recorded sent
    e2e_msgs_per_s               N / e2e_seconds
    e2e_steady_msgs_per_s        N / (last sent_at - first sent_at): the sending phase only
    smtplib_4conn_msgs_per_s     the reference: plain smtplib, 4 connections, 4 processes
    e2e_ratio                    e2e_msgs_per_s / smtplib_4conn_msgs_per_s
    target_ratio                 0.8 (issue 6; issue 2 asked for 0.5)
    e2e_worker_cpu_ms_per_msg    CPU time (user+system) of the worker processes per message
    db_commits_per_msg           transactions committed in the scratch database, per message
    db_rows_updated_per_msg      rows updated (deliveries, batches, issue), per message
    db_rows_inserted_per_msg     rows inserted during the send, per message
    db_wal_bytes_per_msg         WAL written by the whole server during the send, per message
    db_deliveries_bytes_per_reader  size of the deliveries table with its indexes after the
                                 send, per reader: what the ledger costs on disk per message
    message_bytes                size of one message
    code_version                 the commit measured (and uncommitted product changes, if any)
    load_before / load_after     1-minute load average around the timed send
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _million import Worker, cli_env, scratch_database, scratch_redis  # noqa: E402
from _smtp import Message, SmtpSink, smtplib_reference  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "NEWSLETTER_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("NEWSLETTER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SECRET = "bench-secret-key"
BASE_URL = "https://news.example.org"
SEED = ROOT / "tests" / "data" / "seed_world.txt"
SAMPLES = sorted((ROOT / "newsletter" / "data" / "sample_articles").glob("*.txt"))
TARGET_RATIO = 0.8


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (a vanished one counts 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def code_version() -> str:
    """The commit, and the product files changed since (read-only git; no index refresh)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "newsletter", "worker"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    dirty = sorted(line[3:] for line in changed if line.strip())
    return f"{head or 'unknown'}" + (
        f" + uncommitted changes to {', '.join(dirty)}" if dirty else ""
    )


# --- services ----------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "newsletter.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"newsletter {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


class Profiler:
    """py-spy recording one pool process. By default ("wall") idle samples are included:
    waiting on a socket is where an SMTP or database round trip spends its time. "gil" keeps
    only samples of the thread holding the GIL: where the Python CPU goes."""

    def __init__(self, pid: int, out: Path, rate: int, *, mode: str = "wall") -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pid),
                *{"wall": ["--idle"], "cpu": [], "gil": ["--gil"]}[mode],
                "--nonblocking",
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- the world -------------------------------------------------------------------------------


def build_world(env: dict[str, str], subscribers: int, workdir: Path) -> int:
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
    csv_path = workdir / "subscribers.csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name"])
        for number in range(subscribers):
            writer.writerow([f"reader{number}@example.org", f"Reader {number}"])
    cli("subscribers", "import", str(csv_path), "--list", "world", "--confirmed", env=env)
    cli("articles", "ingest", str(SEED), *map(str, SAMPLES), env=env)
    out = cli("issues", "compose", "--list", "world", "--max-articles", "10", env=env)
    return int(out.strip().splitlines()[-1])


def same_messages(database_url: str, issue_id: int) -> list[Message]:
    """The N messages the workers sent, built the way the product builds them: the worker's
    per-process IssueCache (the issue, or the reader's section variant, compiled once) and
    build_for with each delivery's id, address, name and token."""
    from pydantic import SecretStr

    from newsletter.config import Settings
    from newsletter.ledger.cache import IssueCache
    from newsletter.message import format_date
    from newsletter.models import Delivery, Issue, Subscriber, Subscription
    from newsletter.outgoing import PreparedIssue, build_for
    from newsletter.runtime import Runtime

    settings = Settings(database_url=database_url, secret_key=SecretStr(SECRET), base_url=BASE_URL)
    rt = Runtime(settings)
    cache = IssueCache()
    try:
        with rt.sessions() as s:
            issue = s.get(Issue, issue_id)
            assert issue is not None
            rows = s.execute(
                select(
                    Delivery.id,
                    Subscriber.email,
                    Subscriber.name,
                    Subscription.token,
                    Delivery.variant_id,
                )
                .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                .join(
                    Subscription,
                    (Subscription.subscriber_id == Delivery.subscriber_id)
                    & (Subscription.list_id == issue.list_id),
                )
                .where(Delivery.issue_id == issue_id)
                .order_by(Delivery.id)
            ).all()
            prepared: dict[int | None, PreparedIssue] = {
                variant: cache.get(s, issue_id, variant) for variant in {r[4] for r in rows}
            }
        date = format_date()
        messages: list[Message] = []
        for delivery_id, email, name, token, variant in rows:
            target = prepared[variant]
            data, _mid = build_for(
                target,
                rt.links,
                delivery_id=delivery_id,
                email=email,
                name=name,
                token=token,
                date=date,
            )
            messages.append((target.envelope_from, [email], data))
        return messages
    finally:
        rt.engine.dispose()


def ledger(database_url: str, issue_id: int) -> dict[str, Any]:
    from newsletter.models import Delivery, Issue

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(Delivery.status, func.count())
                    .where(Delivery.issue_id == issue_id)
                    .group_by(Delivery.status)
                ).all()
            )
            status, started, finished = conn.execute(
                select(Issue.status, Issue.send_started_at, Issue.finished_at).where(
                    Issue.id == issue_id
                )
            ).one()
            first_sent, last_sent = conn.execute(
                select(func.min(Delivery.sent_at), func.max(Delivery.sent_at)).where(
                    Delivery.issue_id == issue_id
                )
            ).one()
    finally:
        engine.dispose()
    return {
        "counts": {str(getattr(k, "value", k)): v for k, v in counts.items()},
        "status": str(getattr(status, "value", status)),
        "started": started,
        "finished": finished,
        "first_sent": first_sent,
        "last_sent": last_sent,
    }


def timed_send(
    issue_id: int,
    env: dict[str, str],
    sink: SmtpSink,
    workers: list[Worker],
    timeout: float,
    stall_timeout: float,
) -> subprocess.CompletedProcess[str]:
    """`newsletter issues send ID --wait`, watched through smtp-sink's counter (no queries
    against the database while the clock runs): if nothing arrives for stall_timeout seconds
    the send is stuck (a lost task, a dead worker) and the run fails instead of hanging."""
    argv = [sys.executable, "-m", "newsletter.cli", "issues", "send", str(issue_id), "--wait"]
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started = last_change = time.monotonic()
    last_count = -1
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=2)
                return subprocess.CompletedProcess(argv, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            count = sink.messages_received()
            if count != last_count:
                last_count, last_change = count, now
            why = ""
            if now - last_change > stall_timeout:
                why = f"no message reached smtp-sink for {stall_timeout:.0f} s ({count} so far)"
            elif now - started > timeout:
                why = f"the send took over {timeout:.0f} s"
            if why:
                logs = "\n".join(f"--- {w.name}:\n{w.tail()}" for w in workers)
                raise RuntimeError(f"issues send {issue_id} is stuck: {why}\n{logs}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextmanager
def exclusive_run() -> Iterator[None]:
    """One bench_e2e at a time on this machine: a second run would flush the first one's
    broker database (and its tasks with it) and share the two cores."""
    import fcntl

    path = Path(tempfile.gettempdir()) / "newsletter-bench-e2e.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise RuntimeError(
                f"another bench_e2e.py is running (pid {fh.read().strip() or '?'}; lock {path})"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- one run -----------------------------------------------------------------------------------


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    n = args.subscribers
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_e2e_")))
        database_url = stack.enter_context(scratch_database(f"newsletter_bench_{os.getpid()}"))
        broker_url = stack.enter_context(scratch_redis(REDIS_URL))
        sink = stack.enter_context(SmtpSink())
        env = cli_env(
            database_url=database_url,
            broker_url=broker_url,
            smtp_url=f"smtp://{sink.host}:{sink.port}",
            secret_key=SECRET,
            base_url=BASE_URL,
            batch_size=str(args.batch_size),
        )
        log(f"building the world: {n} subscribers in {database_url.rsplit('/', 1)[1]}")
        issue_id = build_world(env, n, workdir)

        worker_env = dict(env)
        for item in args.worker_env:
            key, _, value = item.partition("=")
            worker_env[key] = value
        processes, concurrency = (int(n) for n in args.workers.split("x"))
        workers = []
        for index in range(processes):
            name = f"bench{index + 1}"
            w = Worker(worker_env, workdir / f"{name}.log", concurrency, name, args.pool)
            stack.callback(w.stop)
            workers.append(w)
        for w in workers:
            w.wait_ready()
        log(f"workers ready ({args.workers}); sending issue {issue_id}")

        profiler = None
        if args.profile:
            pids = workers[0].pool_pids()
            if not pids:
                raise RuntimeError("no pool process to profile")
            profiler = Profiler(
                pids[0], Path(args.profile), args.profile_rate, mode=args.profile_mode
            )
            stack.callback(profiler.stop)
            time.sleep(0.5)  # let py-spy attach before the clock starts

        senders = sorted({pid for w in workers for pid in (w.proc.pid, *w.pool_pids())})
        db_before = db_counters(database_url)
        cpu_before = cpu_seconds(senders)
        load_before = load1()
        t0 = time.time()
        send = timed_send(issue_id, env, sink, workers, args.timeout, args.stall_timeout)
        t_returned = time.time()
        load_after = load1()
        worker_cpu = cpu_seconds(senders) - cpu_before
        if profiler is not None:
            profiler.stop()
        if send.returncode != 0:
            raise RuntimeError(
                f"issues send exited {send.returncode}\n{send.stderr}\n"
                + "\n".join(w.tail() for w in workers)
            )
        state = ledger(database_url, issue_id)
        for w in workers:
            w.stop()  # nothing else may reach the sink before we read its count
        # Read after the workers' connections closed: a backend flushes its statistics
        # when it exits (and at most once a second before that).
        time.sleep(1.5)
        db_after = db_counters(database_url)
        e2e_received = sink.messages_received()
        sent = state["counts"].get("sent", 0)
        problems = []
        if state["status"] != "sent":
            problems.append(f"issue status is {state['status']}")
        if sent != n or sum(state["counts"].values()) != n:
            problems.append(f"ledger: {state['counts']} (want {n} sent)")
        if e2e_received != n:
            problems.append(f"smtp-sink counted {e2e_received} messages (want {n})")
        if problems:
            raise RuntimeError("; ".join(problems))

        elapsed = state["finished"].timestamp() - t0
        steady = (state["last_sent"] - state["first_sent"]).total_seconds()

        log("building the same messages for the smtplib reference")
        messages = same_messages(database_url, issue_id)
        assert len(messages) == n
        reference = smtplib_reference(messages, sink.host, sink.port, connections=4)
        total = sink.messages_received()
        if total != 2 * n:
            raise RuntimeError(f"smtp-sink counted {total - n} reference messages (want {n})")
        return {
            "seconds": elapsed,
            "cli_seconds": t_returned - t0,
            "rate": n / elapsed,
            "steady": n / steady if steady > 0 else float("nan"),
            "reference": reference,
            "message_bytes": len(messages[0][2]),
            "load_before": load_before,
            "load_after": load_after,
            "worker_cpu_ms": 1000 * worker_cpu / n,
            "first_seconds": state["first_sent"].timestamp() - t0,
            **{f"db_{k}_per_msg": (db_after[k] - db_before[k]) / n for k in db_before},
            "deliveries_bytes_per_reader": db_after["deliveries_bytes"] / n,
        }


def db_counters(database_url: str) -> dict[str, int]:
    """What the database did: transactions committed and rows written in the scratch
    database, and WAL bytes written by the whole server (other work on the same server
    counts too: run on a quiet one)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT xact_commit, tup_updated, tup_inserted,"
                    " pg_current_wal_lsn() - '0/0'::pg_lsn,"
                    " pg_total_relation_size('deliveries')"
                    " FROM pg_stat_database WHERE datname = current_database()"
                )
            ).one()
    finally:
        engine.dispose()
    return {
        "commits": int(row[0]),
        "rows_updated": int(row[1]),
        "rows_inserted": int(row[2]),
        "wal_bytes": int(row[3]),
        "deliveries_bytes": int(row[4]),  # table, its indexes and TOAST
    }


# --- the profile summary ---------------------------------------------------------------------

# (label, pattern matched against a whole stack, outermost first); the first match wins.
CATEGORIES = [
    ("claim batch (UPDATE ... RETURNING, join, commit)", r"claim_batch \("),
    (
        "SMTP connect/EHLO/QUIT",
        r"SmtpSession\.(_connect|_open|close) \(|SMTP\.(quit|ehlo|connect) \(",
    ),
    ("wait for the previous message's record (before its final '.')", r"_BatchSender\._settle \("),
    ("SMTP envelope + DATA + body (one round trip with PIPELINING)", r"SmtpSession\.begin \("),
    ("SMTP final '.' and its 250", r"SmtpSession\.finish \("),
    ("message build (substitute + bytes)", r"build_for \("),
    ("DB pool checkout pre-ping (SELECT 1 after every commit)", r"do_ping \("),
    ("record: UPDATE issues (consecutive failures)", r"note_outcome \("),
    ("record: sent, one prepared autocommit UPDATE", r"SentWriter\.write \("),
    ("record: other outcomes (UPDATE deliveries)", r"record_outcome \("),
    ("record: COMMIT", r"Session\.commit \("),
    (
        "after batch / finish_if_done / next check",
        r"(_after_batch|finish_if_done|next_check_at) \(",
    ),
]


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Group py-spy raw (collapsed) stacks into the delivery's costs."""
    totals: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    all_samples = 0
    in_task = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        all_samples += count
        if "send_batch (newsletter/ledger/sender.py" not in stack:
            continue
        in_task += count
        for label, pattern in CATEGORIES:
            if re.search(pattern, stack):
                totals[label] += count
                break
        else:
            totals["other (per-batch queries, loop)"] += count
        leaves[stack.split(";")[-1]] += count
    if not in_task:
        return [f"profile: no samples inside send_batch ({all_samples} in all)"]
    lines = [
        f"profile_samples: {all_samples} (inside send_batch: {in_task}, "
        f"{100 * in_task / all_samples:.0f}%; the rest: other threads (lease renewal, "
        "Celery) and time between tasks)"
    ]
    for label, count in totals.most_common():
        lines.append(f"profile  {100 * count / in_task:5.1f}%  {label}")
    lines.append("profile top leaf frames inside send_batch:")
    for frame, count in leaves.most_common(top):
        lines.append(f"profile  {100 * count / in_task:5.1f}%  {frame}")
    return lines


# --- main ----------------------------------------------------------------------------------------


def _layout(value: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", value):
        raise argparse.ArgumentTypeError("expected PROCESSESxCONCURRENCY, e.g. 2x1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(
        description="End to end: `issues send --wait` through Celery workers to smtp-sink, "
        "against the plain smtplib 4-connection loop in the same run."
    )
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument(
        "--workers",
        default="2x1",
        type=_layout,
        help="PROCESSESxCONCURRENCY: 2x1 is two worker processes with --concurrency 1 "
        "(default); 1x2 is one with 2; 2x4 with --pool threads is two processes, 4 threads each",
    )
    parser.add_argument(
        "--pool",
        choices=["prefork", "threads"],
        default="prefork",
        help="the Celery pool of each worker process",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="NEWSLETTER_BATCH_SIZE")
    parser.add_argument("--repeat", type=int, default=1, help="runs (figures are medians)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one send")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=120,
        help="fail when no message reaches smtp-sink for this many seconds",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the workers only, for experiments "
        '(e.g. "PGOPTIONS=-c synchronous_commit=off"); repeatable',
    )
    parser.add_argument("--profile", help="record one pool process with py-spy into this file")
    parser.add_argument("--profile-rate", type=int, default=200, help="samples per second")
    parser.add_argument(
        "--profile-mode",
        choices=["wall", "cpu", "gil"],
        default="wall",
        help="wall: every sample, waiting included (py-spy --idle); cpu: py-spy's default "
        "(drops samples it sees as idle); gil: only samples holding the GIL (Python CPU)",
    )
    args = parser.parse_args()
    if args.profile and args.repeat != 1:
        parser.error("--profile records one run: use --repeat 1")

    # A SIGTERM (e.g. from `timeout`) unwinds through the teardown like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    runs = []
    try:
        with exclusive_run():
            for number in range(args.repeat):
                result = run_once(args)
                runs.append(result)
                if args.repeat > 1:
                    print(
                        f"run_{number + 1}: e2e {result['rate']:.0f}/s "
                        f"({result['seconds']:.2f} s, steady {result['steady']:.0f}/s), "
                        f"smtplib_4conn {result['reference']:.0f}/s, "
                        f"ratio {result['rate'] / result['reference']:.3f}, "
                        f"worker cpu {result['worker_cpu_ms']:.2f} ms/msg, "
                        f"load {result['load_before']:.2f}",
                        flush=True,
                    )
    except RuntimeError as exc:
        print(f"bench_e2e: error: {exc}", file=sys.stderr)
        return 1

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ratio = statistics.median(r["rate"] / r["reference"] for r in runs)
    print(f"e2e_subscribers: {args.subscribers}")
    print(f"e2e_workers: {args.workers}")
    print(f"e2e_pool: {args.pool}")
    print(f"e2e_batch_size: {args.batch_size}")
    for item in args.worker_env:
        print(f"e2e_worker_env: {item}")
    print(f"e2e_seconds: {med('seconds'):.2f}")
    print(f"e2e_cli_return_seconds: {med('cli_seconds'):.2f}")
    print(f"e2e_first_delivery_seconds: {med('first_seconds'):.2f}")
    print(f"e2e_msgs_per_s: {med('rate'):.0f}")
    print(f"e2e_steady_msgs_per_s: {med('steady'):.0f}")
    print(f"smtplib_4conn_msgs_per_s: {med('reference'):.0f}")
    print(f"e2e_ratio: {ratio:.3f}")
    print(f"target_ratio: {TARGET_RATIO}")
    print(f"e2e_worker_cpu_ms_per_msg: {med('worker_cpu_ms'):.2f}")
    for key in ("commits", "rows_updated", "rows_inserted", "wal_bytes"):
        print(f"db_{key}_per_msg: {med(f'db_{key}_per_msg'):.2f}")
    print(f"db_deliveries_bytes_per_reader: {med('deliveries_bytes_per_reader'):.0f}")
    print(f"message_bytes: {runs[0]['message_bytes']}")
    print(f"code_version: {code_version()}")
    print(f"load_before: {med('load_before'):.2f}")
    print(f"load_after: {med('load_after'):.2f}")
    if args.profile:
        for line in summarize_profile(Path(args.profile)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
