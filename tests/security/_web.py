"""Fixtures for the web findings' tests: the app on a real socket over PostgreSQL, with the
recording SMTP server (import them into a test module to use them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, free_port
from tests.web.helpers import Served, serve

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def web_rt(pg_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    """PostgreSQL, the recording SMTP server, the operator API on, no broker."""
    return make_runtime(pg_url, smtp_url=smtp_server.url, admin_token=ADMIN_TOKEN)


@pytest.fixture
def web_app(web_rt: Runtime) -> Iterator[Served]:
    with serve(create_app(web_rt), free_port()) as served:
        yield served
