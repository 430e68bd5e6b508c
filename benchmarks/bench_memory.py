"""Memory at a million subscribers: the peak RSS of `issues send` (freeze + enqueue), of the
reconciler (`issues resume`, and the beat task `newsletter.reconcile`) and of one Celery
worker (main process and pool child) while it sends. The audience must never be loaded into
memory: each process stays under 150 MB (listmonk's published figure: 57 MB for a
7-million campaign).

    .venv/bin/python benchmarks/bench_memory.py [--subscribers 1000000]
        [--worker-seconds 60] [--worker-messages 50000]

Needs PostgreSQL (NEWSLETTER_BENCH_PG_URL, default postgresql+psycopg://postgres@127.0.0.1:
5432/postgres: a scratch database newsletter_bench_mem_<random> is created and dropped),
Redis (NEWSLETTER_BENCH_MEM_REDIS_URL, default redis://127.0.0.1:6379/12, flushed before and
after) and smtp-sink (benchmarks/_smtp.py).

What one run does:
 1. `newsletter init`, `lists create world`, N confirmed subscribers inserted with SQL
    (generate_series, unique random tokens), `articles ingest tests/data/seed_world.txt`,
    `issues compose`;
 2. `newsletter issues send ID` with the scratch Redis as broker and no worker running (the
    batch tasks just queue): its peak RSS (ru_maxrss from wait4 on that very process);
 3. `newsletter issues resume ID` (the reconciler's pass over a sending issue: expire
    leases, re-enqueue every batch with work) the same way;
 4. the beat task `newsletter.reconcile` called in a fresh process, twice: with tasks in the
    queue (it re-enqueues nothing), and after the broker lost every message an hour ago
    (Redis flushed, batches marked enqueued an hour back: it re-enqueues every batch);
 5. one `newsletter worker --concurrency 1` against smtp-sink, sending for --worker-seconds
    or --worker-messages, whichever comes first; the RSS of its main process and of its pool
    child sampled every second: peak, final, and the slope over the second half;
 6. teardown (worker and sink process groups, database, Redis database), also on failure.

Prints `name: value` lines; sizes in MB (MiB).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _million import (  # noqa: E402
    BASE_URL,
    SECRET,
    Measured,
    Worker,
    build_world,
    children,
    cli_env,
    load1,
    log,
    newsletter_argv,
    run_measured,
    scratch_database,
    scratch_redis,
    slope_mb_per_min,
    status_kb,
)
from _smtp import SmtpSink  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

REDIS_URL = os.environ.get("NEWSLETTER_BENCH_MEM_REDIS_URL", "redis://127.0.0.1:6379/12")
TARGET_MB = 150
QUEUE = "newsletter"  # newsletter.dispatch.SEND_QUEUE
# Growth over the second half of the worker's run above this counts as "still growing".
GROWING_MB_PER_MIN = 1.0


def mb(kb: int | float) -> str:
    return f"{kb / 1024:.1f}"


def queued_tasks(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(QUEUE))
    finally:
        client.close()


def measured(name: str, argv: list[str], env: dict[str, str], figures: dict[str, str]) -> Measured:
    log(f"{name}: {' '.join(argv[-4:])}")
    result = run_measured(argv, env)
    if result.returncode != 0:
        raise RuntimeError(
            f"{name} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    figures[f"{name}_peak_rss_mb"] = mb(result.maxrss_kb)
    figures[f"{name}_seconds"] = f"{result.seconds:.1f}"
    log(
        f"{name}: peak {mb(result.maxrss_kb)} MB (VmHWM seen {mb(result.hwm_kb)} MB) "
        f"in {result.seconds:.1f} s; {result.stderr.strip()[-300:]} {result.stdout.strip()[-300:]}"
    )
    return result


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def sample_worker(
    worker: Worker, sink: SmtpSink, seconds: float, messages: int
) -> tuple[dict[str, str], list[str]]:
    """Sample the RSS of the worker's main process and its pool child every second while it
    sends, until `seconds` passed or `messages` reached the sink."""
    main_pid = worker.proc.pid
    samples: dict[str, list[tuple[float, float]]] = {"main": [], "pool": []}
    pool_pids: set[int] = set()
    started = time.monotonic()
    first_message_at: float | None = None
    received = 0
    while True:
        now = time.monotonic() - started
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the worker died while sending:\n{worker.tail()}")
        main_kb = status_kb(main_pid, "VmRSS")
        pool = children(main_pid)
        pool_pids.update(pool)
        pool_kb = max((status_kb(p, "VmRSS") or 0 for p in pool), default=0)
        if main_kb:
            samples["main"].append((now, main_kb / 1024))
        if pool_kb:
            samples["pool"].append((now, pool_kb / 1024))
        received = sink.messages_received()
        if received and first_message_at is None:
            first_message_at = now
        if now >= seconds or received >= messages:
            break
        time.sleep(1.0)
    hwm = {
        "main": status_kb(main_pid, "VmHWM") or 0,
        "pool": max((status_kb(p, "VmHWM") or 0 for p in pool_pids), default=0),
    }
    elapsed = time.monotonic() - started
    sending = elapsed - (first_message_at or elapsed)
    figures = {
        "worker_seconds": f"{elapsed:.0f}",
        "worker_messages_sent": str(received),
        "worker_msgs_per_s": f"{received / sending:.0f}" if sending > 0 else "n/a",
        "worker_pool_processes_seen": str(len(pool_pids)),
    }
    notes: list[str] = []
    for name, series in samples.items():
        if not series:
            raise RuntimeError(f"no RSS sample of the worker's {name} process")
        half = [s for s in series if s[0] >= series[-1][0] / 2]
        slope = slope_mb_per_min(half)
        peak = max(hwm[name] / 1024, max(m for _, m in series))
        figures[f"worker_{name}_peak_rss_mb"] = f"{peak:.1f}"
        figures[f"worker_{name}_start_rss_mb"] = f"{series[0][1]:.1f}"
        figures[f"worker_{name}_final_rss_mb"] = f"{series[-1][1]:.1f}"
        figures[f"worker_{name}_slope_second_half_mb_per_min"] = f"{slope:+.2f}"
        figures[f"worker_{name}_growing"] = "yes" if slope > GROWING_MB_PER_MIN else "no"
        notes.append(
            f"worker {name}: "
            + " ".join(f"{t:.0f}s={m:.1f}" for t, m in series[:: max(1, len(series) // 12)])
        )
    return figures, notes


def run(args: argparse.Namespace) -> dict[str, str]:
    figures: dict[str, str] = {"subscribers": str(args.subscribers)}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_mem_")))
        database_url = stack.enter_context(scratch_database("newsletter_bench_mem"))
        broker_url = stack.enter_context(scratch_redis(REDIS_URL))
        env = cli_env(
            database_url=database_url,
            broker_url=broker_url,
            secret_key=SECRET,
            base_url=BASE_URL,
        )
        log(f"building the world: {args.subscribers} subscribers in {database_url}")
        issue_id = build_world(env, database_url, args.subscribers)

        # What a process of ours weighs before it does anything: the imports.
        baseline = run_measured(python_argv("import newsletter.cli, worker.tasks"), env)
        figures["imports_only_peak_rss_mb"] = mb(baseline.maxrss_kb)

        figures["load_before_send"] = f"{load1():.2f}"
        measured("send_cli", newsletter_argv("issues", "send", str(issue_id)), env, figures)
        figures["send_tasks_queued"] = str(queued_tasks(broker_url))

        measured("resume_cli", newsletter_argv("issues", "resume", str(issue_id)), env, figures)
        figures["resume_tasks_queued_total"] = str(queued_tasks(broker_url))

        reconcile = python_argv("from worker.tasks import reconcile; print(reconcile())")
        result = measured("reconcile_task_busy_broker", reconcile, env, figures)
        figures["reconcile_task_busy_broker_reenqueued"] = result.stdout.strip()
        # The broker lost every message an hour ago: the reconciler re-enqueues every batch.
        import redis

        client = redis.Redis.from_url(broker_url)
        client.flushdb()
        client.close()
        engine = create_engine(database_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE batches SET enqueued_at = now() - interval '1 hour'"))
        engine.dispose()
        result = measured("reconcile_task", reconcile, env, figures)
        figures["reconcile_task_reenqueued"] = result.stdout.strip()
        figures["reconcile_tasks_queued"] = str(queued_tasks(broker_url))

        sink = stack.enter_context(SmtpSink())
        worker_env = dict(env, NEWSLETTER_SMTP_URL=f"smtp://{sink.host}:{sink.port}")
        worker = Worker(worker_env, workdir / "worker.log", name="benchmem")
        stack.callback(worker.stop)
        worker.wait_ready()
        log(
            f"worker ready; sampling for {args.worker_seconds:.0f} s "
            f"or {args.worker_messages} messages"
        )
        figures["load_before_worker"] = f"{load1():.2f}"
        worker_figures, notes = sample_worker(
            worker, sink, args.worker_seconds, args.worker_messages
        )
        figures.update(worker_figures)
        figures["load_after_worker"] = f"{load1():.2f}"
        # How long each batch task took (Celery logs "... succeeded in Xs"): a slow sender
        # sends few messages, and says little about memory over a long run.
        took = sorted(
            float(m) for m in re.findall(rb"succeeded in ([0-9.]+)s", worker.log_path.read_bytes())
        )
        if took:
            figures["worker_batches_done"] = str(len(took))
            figures["worker_batch_seconds_median"] = f"{statistics.median(took):.2f}"
            figures["worker_batch_seconds_max"] = f"{took[-1]:.2f}"
        for note in notes:
            log(note)
        worker.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--worker-seconds", type=float, default=60)
    parser.add_argument("--worker-messages", type=int, default=50_000)
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds through the teardown like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        figures = run(args)
    except RuntimeError as exc:
        print(f"bench_memory: error: {exc}", file=sys.stderr)
        return 1
    for name, value in figures.items():
        print(f"{name}: {value}")
    peaks = {k: float(v) for k, v in figures.items() if k.endswith("_peak_rss_mb")}
    del peaks["imports_only_peak_rss_mb"]
    over = [k for k, v in peaks.items() if v > TARGET_MB]
    growing = [k for k, v in figures.items() if k.endswith("_growing") and v == "yes"]
    print(f"max_peak_rss_mb: {max(peaks.values()):.1f}")
    print(f"target_rss_mb: {TARGET_MB}")
    print("listmonk_reference_rss_mb: 57 (7M campaign, published figure)")
    print(f"over_target: {', '.join(over) or 'none'}")
    print(f"still_growing: {', '.join(growing) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
