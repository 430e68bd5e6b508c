"""The worker process's wiring: its Runtime and its one Celery app, both made on first use
from settings. Start it with `newsletter worker` (or `celery -A worker.celery_app:app`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from newsletter.config import get_settings
from newsletter.dispatch import Dispatcher, make_celery
from newsletter.runtime import Runtime


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    """Settings read once; the engine, sessions and transport inside are built on first use,
    in each worker process after the prefork, never at import."""
    return Runtime(get_settings())


@lru_cache(maxsize=1)
def get_app() -> Celery:
    return make_celery(runtime().settings, include=["worker.tasks"])


@lru_cache(maxsize=1)
def dispatcher() -> Dispatcher:
    """Hands follow-ups and reconciled batches to the workers, through this process's app."""
    return Dispatcher(runtime(), celery=get_app())


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app:app` and `worker.celery_app.app` find the app on first use.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
