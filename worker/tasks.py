"""Thin tasks: take ids, open a session, call the package, schedule what comes next."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from celery import Task
from kombu.exceptions import ChannelError

from newsletter.config import get_settings
from newsletter.ledger import control, freeze, sender
from newsletter.ledger.batches import TRANSIENT_DB_ERRORS
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.policy import backoff
from newsletter.ratelimit import Throttle
from newsletter.runtime import Runtime
from worker.celery_app import SEND_QUEUE, app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    """Built lazily in each worker process (after the prefork), never at import."""
    return Runtime(get_settings())


@lru_cache(maxsize=1)
def issue_cache() -> IssueCache:
    return runtime().issue_cache()


def enqueue_batches(batch_ids: list[int]) -> None:
    """Hand batches to the workers. Call only after the transaction that created them has
    committed: the broker message is a hint, the database row is the truth."""
    for batch_id in batch_ids:
        send_batch.apply_async((batch_id,), queue=SEND_QUEUE)


# The database went away (restart, failover, killed connections): the ledger still holds every
# row, so the task comes back shortly instead of being dropped. After these many tries the
# reconciler takes over.
DB_RETRIES = 12


@app.task(name="newsletter.send_batch", bind=True, max_retries=DB_RETRIES)
def send_batch(self: Task, batch_id: int) -> dict[str, int]:
    rt = runtime()
    try:
        report = sender.send_batch(
            rt.sessions,
            batch_id,
            rt.transport,
            rt.links,
            rt.policy,
            issue_cache(),
            throttle=_throttle(),
        )
    except TRANSIENT_DB_ERRORS as exc:
        countdown = int(backoff(self.request.retries + 1, base=1, ceiling=30, jitter=False))
        log.warning("batch %d: database unavailable (%s); again in %ds", batch_id, exc, countdown)
        raise self.retry(exc=exc, countdown=countdown) from None
    if report.retry_at is not None:
        follow_up(batch_id, report.retry_at)
    return {
        "claimed": report.claimed,
        "sent": report.sent,
        "failed": report.failed,
        "retrying": report.retrying,
    }


def follow_up(batch_id: int, at: datetime) -> None:
    """Come back to a batch when it next needs a look: a retry falls due, or the lease of rows
    another (perhaps dead) worker holds runs out. The delay stays below the visibility
    timeout: a retry is at most RETRY_MAX_SECONDS away and a lease LEASE_SECONDS (Settings
    refuses anything else)."""
    eta = (at if at.tzinfo else at.replace(tzinfo=UTC)) + timedelta(seconds=1)
    send_batch.apply_async((batch_id,), eta=eta, queue=SEND_QUEUE)
    try:
        with runtime().sessions() as session, session.begin():
            freeze.mark_enqueued(session, [batch_id], at=eta)
    except TRANSIENT_DB_ERRORS as exc:  # only a hint for the reconciler
        log.warning("batch %d: could not note its follow-up (%s)", batch_id, exc)


@lru_cache(maxsize=1)
def _throttle() -> Throttle | None:
    return runtime().throttle()


def broker_backlog() -> int:
    """Messages waiting in the send queue (not counting those a worker holds)."""
    with app.connection_for_read() as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=SEND_QUEUE, passive=True)
        except ChannelError:
            # Redis deletes a list once it is empty, and kombu then reports "no queue": an
            # empty queue (after a Redis restart, too), the one case the reconciler acts on.
            return 0
        return int(declared.message_count)


@app.task(name="newsletter.reconcile")
def reconcile() -> int:
    rt = runtime()
    backlog = broker_backlog()
    with rt.sessions() as session:
        batch_ids = control.reconcile(
            session,
            # A task younger than one lease may still sit in a worker's prefetch buffer.
            requeue_after=timedelta(seconds=rt.settings.lease_seconds),
            broker_idle=backlog == 0,
        )
        freeze.mark_enqueued(session, batch_ids)
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
    from newsletter import optin
    from newsletter.transport import Outcome

    rt = runtime()
    result = optin.send_confirmation(
        rt.sessions, rt.transport, rt.templates, rt.links, subscription_id, dkim=rt.dkim_signer
    )
    if result is None:
        return "nothing to send"
    if result.outcome is Outcome.TEMPORARY and self.request.retries < CONFIRMATION_RETRIES:
        countdown = backoff(
            self.request.retries + 1,
            base=rt.settings.retry_base_seconds,
            ceiling=rt.settings.retry_max_seconds,
            jitter=False,
        )
        raise self.retry(countdown=countdown)
    return result.outcome.value
