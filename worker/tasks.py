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


# Confirmation emails (double opt-in): the web app enqueues `newsletter.send_confirmation` by
# name after the subscription is committed. A temporary SMTP failure is retried with backoff.
CONFIRMATION_RETRIES = 8


@app.task(name="newsletter.send_confirmation", bind=True, max_retries=CONFIRMATION_RETRIES)
def send_confirmation(self: Task, subscription_id: int) -> str:
    from newsletter.transport import Outcome
    from newsletter.web import optin

    rt = runtime()
    result = optin.send_confirmation(
        rt.sessions, rt.transport, rt.templates, rt.links, subscription_id
    )
    if result is None:
        return "nothing to send"
    if result.outcome is Outcome.TEMPORARY and self.request.retries < CONFIRMATION_RETRIES:
        backoff = rt.settings.retry_base_seconds * 2**self.request.retries
        raise self.retry(countdown=min(rt.settings.retry_max_seconds, backoff))
    return result.outcome.value
