"""Fixtures for the web tests: a runtime on PostgreSQL whose links point at a live server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, free_port
from tests.web.helpers import Served, serve

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def rt(
    pg_url: str, smtp_server: SmtpServer, port: int, make_runtime: Callable[..., Runtime]
) -> Runtime:
    """PostgreSQL, the recording SMTP server, links to the live server, no broker."""
    return make_runtime(
        pg_url,
        smtp_url=smtp_server.url,
        base_url=f"http://127.0.0.1:{port}",
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture
def start_app(port: int) -> Iterator[Callable[..., Served]]:
    """Serve `create_app(runtime, **options)` on the fixture's port."""
    stack: list[Any] = []

    def start(runtime: Runtime, **options: Any) -> Served:
        manager = serve(create_app(runtime, **options), port)
        stack.append(manager)
        return manager.__enter__()

    yield start
    for manager in reversed(stack):
        manager.__exit__(None, None, None)


@pytest.fixture
def web(rt: Runtime, start_app: Callable[..., Served]) -> Served:
    return start_app(rt)
