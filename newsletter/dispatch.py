"""Hand work to whoever delivers it: the Celery workers when BROKER_URL is set, otherwise this
process. Used by every entry point (CLI, web app, worker, demo), so there is one order:

1. the transaction that created the work (batches, a pending subscription) has committed;
2. the batches are noted as enqueued (as the freeze notes its new batches), so that the
   reconciler does not race the tasks into being enqueued twice; the note is only a hint: a
   batch whose task was lost is enqueued again once its note is a lease old;
3. each task goes to the broker (a message carries only an id: the database is the truth).

The task names, the send queue and the Celery app's configuration live here, shared by the
producers and the worker (worker/), which registers its tasks under these names. The Celery
app is made on first use, once per Dispatcher: a process that never uses a broker never
builds one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from newsletter.config import Settings
from newsletter.ledger.batches import TRANSIENT_DB_ERRORS
from newsletter.ledger.freeze import mark_enqueued
from newsletter.ledger.sender import BatchReport, run_in_process
from newsletter.runtime import Runtime
from newsletter.transport import SendResult

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

SEND_QUEUE = "newsletter"
SEND_BATCH = "newsletter.send_batch"
SEND_CONFIRMATION = "newsletter.send_confirmation"
RECONCILE = "newsletter.reconcile"


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """The Celery app for these settings: what producers and workers must agree on. The
    worker passes `include`, the modules that register its tasks."""
    from celery import Celery  # only where a broker is used

    app = Celery(
        "newsletter",
        broker=settings.broker_url or "redis://127.0.0.1:6379/0",
        include=list(include),
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # A task is acknowledged only when it has finished; if its worker dies, the broker
        # hands it to another worker. The ledger makes the second run harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=SEND_QUEUE,
        # Redis redelivers an unacknowledged task after this many seconds. It must exceed
        # every delay a task waits in a worker before it runs: the longest retry delay and
        # one lease (checked in Settings). A batch that runs longer than this is handed out
        # again, and the copy claims nothing: the rows are leased in the database.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # When Redis goes away, a batch in flight carries on: its rows are leased in the
        # database, not in the broker. Cancelling it would only cut a message in half.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        beat_schedule={
            "reconcile-every-minute": {"task": RECONCILE, "schedule": 60.0},
        },
        timezone="UTC",
    )
    return app


class Dispatcher:
    def __init__(self, runtime: Runtime, *, celery: Celery | None = None) -> None:
        self.runtime = runtime
        self._given_celery = celery
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def uses_broker(self) -> bool:
        return bool(self.runtime.settings.broker_url)

    @cached_property
    def celery(self) -> Celery:
        """The worker's own app when it made this dispatcher; otherwise one built from this
        runtime's settings (tasks are addressed by name: producers never import task code)."""
        return self._given_celery or make_celery(self.runtime.settings)

    # --- an issue's batches ---

    def deliver(
        self,
        issue_id: int,
        batch_ids: Sequence[int],
        *,
        in_background: bool = False,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> str:
        """Deliver an issue's batches (already committed): enqueue them for the workers, or
        run them here (in a thread of this process with `in_background`, as a web request
        does). Returns who delivers them: "workers" or "in-process"."""
        if self.uses_broker:
            self.enqueue(batch_ids)
            return "workers"
        if in_background:
            self._start_here(issue_id, list(batch_ids))
        else:
            self.run_here(issue_id, batch_ids, on_batch=on_batch)
        return "in-process"

    def enqueue(self, batch_ids: Sequence[int], *, at: datetime | None = None) -> None:
        """Hand batches to the workers (`at`: not before then). Call only after the
        transaction that created them has committed: the broker message is a hint, the
        database row is the truth."""
        try:
            with self.runtime.sessions() as session, session.begin():
                mark_enqueued(session, batch_ids, at=at)
        except TRANSIENT_DB_ERRORS as exc:  # only a hint: the tasks still go
            log.warning("could not note %d batch(es) as enqueued (%s)", len(batch_ids), exc)
        for batch_id in batch_ids:
            self.celery.send_task(SEND_BATCH, args=(batch_id,), queue=SEND_QUEUE, eta=at)

    def run_here(
        self,
        issue_id: int,
        batch_ids: Sequence[int],
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        """Send the batches in this process, one after another."""
        rt = self.runtime
        run_in_process(
            rt.sessions,
            issue_id,
            list(batch_ids),
            rt.transport,
            rt.links,
            rt.policy,
            throttle=rt.throttle(),
            cache=rt.issue_cache(),
            on_batch=on_batch,
        )

    def _start_here(self, issue_id: int, batch_ids: list[int]) -> None:
        thread = threading.Thread(
            target=self._run_in_thread,
            args=(issue_id, batch_ids),
            name=f"send-issue-{issue_id}",
            daemon=True,
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _run_in_thread(self, issue_id: int, batch_ids: list[int]) -> None:
        try:
            self.run_here(issue_id, batch_ids)
        except Exception:  # the ledger keeps the rest; `issues resume` picks it up
            log.exception("in-process send of issue %d stopped", issue_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for in-process sends to finish (tests, shutdown); True if none is left."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)

    def backlog(self) -> int:
        """Messages waiting in the send queue (not counting those a worker holds)."""
        from kombu.exceptions import ChannelError

        with self.celery.connection_for_read() as conn:
            try:
                declared = conn.default_channel.queue_declare(queue=SEND_QUEUE, passive=True)
            except ChannelError:
                # Redis deletes a list once it is empty, and kombu then reports "no queue": an
                # empty queue (after a Redis restart, too), the one case the reconciler acts on.
                return 0
            return int(declared.message_count)

    # --- the confirmation mail (double opt-in) ---

    def confirmation(self, subscription_id: int) -> None:
        """Send one confirmation mail (the subscription committed): through a worker, or here."""
        if self.uses_broker:
            self.celery.send_task(SEND_CONFIRMATION, args=(subscription_id,), queue=SEND_QUEUE)
            return
        self.confirmation_here(subscription_id)

    def confirmation_here(self, subscription_id: int) -> SendResult | None:
        """Build and send the confirmation mail in this process (DKIM-signed when
        configured); None when there is nothing to send any more."""
        from newsletter import optin  # the composer: only where a confirmation is sent

        rt = self.runtime
        return optin.send_confirmation(
            rt.sessions, rt.transport, rt.templates, rt.links, subscription_id, dkim=rt.dkim_signer
        )
