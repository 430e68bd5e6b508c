"""`python -m tests.faults.reconciler INTERVAL`: call the reconciler task's function every
INTERVAL seconds, as Celery beat does every minute, until killed. Reads the same settings
as a worker (NEWSLETTER_*). Prints "requeued N" whenever a pass re-enqueued batches."""

from __future__ import annotations

import sys
import time

from worker.tasks import reconcile


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    print("reconciler ready", flush=True)
    while True:
        try:
            requeued = reconcile()
        except Exception as exc:  # the database or Redis is away: the next pass retries
            print(f"pass failed: {exc!r}", flush=True)
        else:
            if requeued:
                print(f"requeued {requeued}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
