"""The Celery app, built from settings. Start it with `newsletter worker`."""

from __future__ import annotations

from celery import Celery

from newsletter.config import Settings, get_settings

SEND_QUEUE = "newsletter"


def make_celery(settings: Settings) -> Celery:
    app = Celery(
        "newsletter",
        broker=settings.broker_url or "redis://127.0.0.1:6379/0",
        include=["worker.tasks"],
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
            "reconcile-every-minute": {"task": "newsletter.reconcile", "schedule": 60.0},
        },
        timezone="UTC",
    )
    return app


app = make_celery(get_settings())
