"""Thin tasks: take ids, open a session, call the package, schedule what comes next."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache

from celery import Task

from newsletter import delivery
from newsletter.config import get_settings
from newsletter.runtime import Runtime
from worker.celery_app import SEND_QUEUE, app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    """Built lazily in each worker process (after the prefork), never at import."""
    return Runtime(get_settings())


@lru_cache(maxsize=1)
def issue_cache() -> delivery.IssueCache:
    return delivery.IssueCache()


def enqueue_batches(batch_ids: list[int]) -> None:
    """Hand batches to the workers. Call only after the transaction that created them has
    committed: the broker message is a hint, the database row is the truth."""
    for batch_id in batch_ids:
        send_batch.apply_async((batch_id,), queue=SEND_QUEUE)


@app.task(name="newsletter.send_batch", bind=True)
def send_batch(self: Task, batch_id: int) -> dict[str, int]:
    rt = runtime()
    report = delivery.send_batch(
        rt.sessions,
        batch_id,
        rt.transport,
        rt.links,
        rt.policy,
        issue_cache(),
        throttle=_throttle(),
    )
    if report.retry_at is not None:
        # Temporary failures come back at their backoff time; the delay is always below the
        # visibility timeout (Settings refuses a retry_max_seconds that is not).
        eta = report.retry_at
        if eta.tzinfo is None:
            from datetime import UTC

            eta = eta.replace(tzinfo=UTC)
        send_batch.apply_async((batch_id,), eta=eta + timedelta(seconds=1), queue=SEND_QUEUE)
    return {
        "claimed": report.claimed,
        "sent": report.sent,
        "failed": report.failed,
        "retrying": report.retrying,
    }


@lru_cache(maxsize=1)
def _throttle() -> Callable[[], None] | None:
    return runtime().throttle()


def broker_backlog() -> int:
    """Messages waiting in the send queue (not counting those a worker holds)."""
    with app.connection_for_read() as conn:
        return int(conn.default_channel.queue_declare(queue=SEND_QUEUE, passive=True).message_count)


@app.task(name="newsletter.reconcile")
def reconcile() -> int:
    rt = runtime()
    backlog = broker_backlog()
    with rt.sessions() as session:
        batch_ids = delivery.reconcile(
            session,
            requeue_after=timedelta(seconds=max(60, rt.settings.lease_seconds)),
            broker_idle=backlog == 0,
        )
        delivery.mark_enqueued(session, batch_ids)
        session.commit()
    enqueue_batches(batch_ids)
    if batch_ids:
        log.warning("reconciler re-enqueued %d batch(es) whose task was lost", len(batch_ids))
    return len(batch_ids)
