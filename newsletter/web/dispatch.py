"""Hand work to whoever delivers it: the Celery workers when BROKER_URL is set (after the
transaction that created the work has committed), otherwise this process (a background task
for a confirmation email, a thread for an issue's batches)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from fastapi import BackgroundTasks

from newsletter import optin
from newsletter.ledger.freeze import mark_enqueued
from newsletter.ledger.sender import run_in_process
from newsletter.runtime import Runtime

log = logging.getLogger(__name__)

SEND_BATCH_TASK = "newsletter.send_batch"
SEND_CONFIRMATION_TASK = "newsletter.send_confirmation"


class Dispatcher:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def uses_broker(self) -> bool:
        return bool(self.runtime.settings.broker_url)

    @cached_property
    def _celery(self) -> Any:
        # Built from this app's settings (not the process-wide ones the worker module reads);
        # tasks are addressed by name, so the web process never imports the task code.
        from worker.celery_app import make_celery

        return make_celery(self.runtime.settings)

    def _send_task(self, name: str, args: tuple[int, ...]) -> None:
        from worker.celery_app import SEND_QUEUE

        self._celery.send_task(name, args=args, queue=SEND_QUEUE)

    def confirmation(self, subscription_id: int, background: BackgroundTasks) -> None:
        """Send one confirmation email, after the response has gone out."""
        if self.uses_broker:
            background.add_task(self._send_task, SEND_CONFIRMATION_TASK, (subscription_id,))
            return
        rt = self.runtime
        background.add_task(
            optin.send_confirmation,
            rt.sessions,
            rt.transport,
            rt.templates,
            rt.links,
            subscription_id,
            dkim=rt.dkim_signer,
        )

    def batches(self, issue_id: int, batch_ids: Sequence[int]) -> str:
        """Deliver an issue's batches (already committed); returns who delivers them."""
        if self.uses_broker:
            for batch_id in batch_ids:
                self._send_task(SEND_BATCH_TASK, (batch_id,))
            with self.runtime.sessions() as session, session.begin():
                mark_enqueued(session, batch_ids)
            return "workers"
        thread = threading.Thread(
            target=self._run_here,
            args=(issue_id, list(batch_ids)),
            name=f"send-issue-{issue_id}",
            daemon=True,
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return "in-process"

    def _run_here(self, issue_id: int, batch_ids: list[int]) -> None:
        rt = self.runtime
        try:
            run_in_process(
                rt.sessions,
                issue_id,
                batch_ids,
                rt.transport,
                rt.links,
                rt.policy,
                throttle=rt.throttle(),
                cache=rt.issue_cache(),
            )
        except Exception:  # the ledger keeps the rest; `issues resume` picks it up
            log.exception("in-process send of issue %d stopped", issue_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for in-process sends to finish (tests, shutdown); True if none is left."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)
