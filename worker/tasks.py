"""Thin tasks: take ids, open a session, call the package, schedule what comes next."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from celery import Task

from newsletter.dispatch import RECONCILE, SEND_BATCH, SEND_CONFIRMATION
from newsletter.ledger import control, sender
from newsletter.ledger.batches import TRANSIENT_DB_ERRORS
from newsletter.ledger.cache import IssueCache
from newsletter.ledger.policy import backoff
from newsletter.ratelimit import Throttle
from worker.celery_app import dispatcher, get_app, runtime

log = logging.getLogger(__name__)

app = get_app()


@lru_cache(maxsize=1)
def issue_cache() -> IssueCache:
    return runtime().issue_cache()


# The database went away (restart, failover, killed connections): the ledger still holds every
# row, so the task comes back shortly instead of being dropped. After these many tries the
# reconciler takes over.
DB_RETRIES = 12


@app.task(name=SEND_BATCH, bind=True, max_retries=DB_RETRIES)
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
    dispatcher().enqueue([batch_id], at=eta)


@lru_cache(maxsize=1)
def _throttle() -> Throttle | None:
    return runtime().throttle()


@app.task(name=RECONCILE)
def reconcile() -> int:
    rt = runtime()
    backlog = dispatcher().backlog()
    with rt.sessions() as session:
        batch_ids = control.reconcile(
            session,
            # A task younger than one lease may still sit in a worker's prefetch buffer.
            requeue_after=timedelta(seconds=rt.settings.lease_seconds),
            broker_idle=backlog == 0,
        )
        session.commit()
    dispatcher().enqueue(batch_ids)
    if batch_ids:
        log.warning("reconciler re-enqueued %d batch(es) whose task was lost", len(batch_ids))
    return len(batch_ids)


# Confirmation emails (double opt-in): the dispatcher enqueues SEND_CONFIRMATION by name after
# the subscription is committed. A temporary SMTP failure is retried with backoff.
CONFIRMATION_RETRIES = 8


@app.task(name=SEND_CONFIRMATION, bind=True, max_retries=CONFIRMATION_RETRIES)
def send_confirmation(self: Task, subscription_id: int) -> str:
    from newsletter.transport import Outcome

    rt = runtime()
    result = dispatcher().confirmation_here(subscription_id)
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
