"""Run every benchmark in turn and print their figures (what `make bench` runs).

    .venv/bin/python benchmarks/run_all.py [--subscribers 100000] [--workers 2x4]
        [--pool threads|prefork] [--repeat 1] [--only compose,message,e2e,...]

By default it runs the figures of "Fast at a million subscribers", about 10 minutes here:
compose and message (no services), e2e (bench_e2e.py: 100,000 subscribers, two worker
processes of four sending threads, against smtplib over 4 connections; PostgreSQL, Redis,
smtp-sink), freeze (bench_freeze.py: freezing 1,000,000 readers, and `issues status` / the
status API at 1M), import (bench_import.py: a 1,000,000-row CSV, against psql \\copy),
memory (bench_memory.py: peak RSS of `issues send`, the reconciler and a worker at 1M) and
list_page (bench_list_page.py: a page of the subscriber list at 1M).

Each benchmark runs in its own process (python benchmarks/bench_*.py), one after another so
that they never compete for the two cores; their `name: value` lines are printed as they
come, under a `== name` header, and the run ends with the machine's load. The exit status is
non-zero if any benchmark failed (the others still run). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# The figures of issue 6 ("Fast at a million subscribers"), in this order. bench_dkim.py and
# others run when named with --only.
ALL = ("compose", "message", "e2e", "freeze", "import", "memory", "list_page")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100_000, help="for bench_e2e.py")
    parser.add_argument("--workers", default="2x4", help="for bench_e2e.py: PROCESSESxCONCURRENCY")
    parser.add_argument(
        "--pool", choices=["threads", "prefork"], default="threads", help="for bench_e2e.py"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of bench_e2e.py (median)")
    parser.add_argument(
        "--only",
        default=",".join(ALL),
        help="comma-separated benchmarks to run (any benchmarks/bench_NAME.py by NAME); "
        f"default: {','.join(ALL)}",
    )
    args = parser.parse_args()

    benches = {
        "compose": [HERE / "bench_compose.py"],
        "message": [HERE / "bench_message.py"],
        "e2e": [
            HERE / "bench_e2e.py",
            "--subscribers",
            str(args.subscribers),
            "--workers",
            args.workers,
            "--pool",
            args.pool,
            "--repeat",
            str(args.repeat),
        ],
    }
    benches["freeze"] = [HERE / "bench_freeze.py", "--subscribers", "1000000"]
    # Any other benchmark (bench_dkim.py, bench_import.py, ...) runs with its defaults when
    # named: --only compose,message,e2e,dkim
    for path in sorted(HERE.glob("bench_*.py")):
        benches.setdefault(path.stem.removeprefix("bench_"), [path])
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in benches]
    if unknown:
        parser.error(
            f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(benches)})"
        )

    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print(f"nproc: {os.cpu_count()}", flush=True)
    failed = []
    for name in wanted:
        command = [sys.executable, *map(str, benches[name])]
        print(f"== {name}  (load {os.getloadavg()[0]:.2f})", flush=True)
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT)
        if proc.returncode != 0:
            failed.append(name)
            print(f"!! {name} failed with exit status {proc.returncode}", flush=True)
        print(f"({name} took {time.monotonic() - started:.0f} s)", flush=True)
    print(f"load_at_end: {os.getloadavg()[0]:.2f}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
