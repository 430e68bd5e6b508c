"""Issue 13, finding 9: the CSV import endpoint read any upload into memory (150 MB: 409 MB
RSS). It streams the upload to a temporary file, refuses one larger than
NEWSLETTER_IMPORT_MAX_BYTES with 413 (whether or not the client sent Content-Length), and
parses from the file. (Peak memory: benchmarks/bench_import_upload.py.)"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from newsletter.models import Subscription
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, free_port
from tests.security import _web
from tests.web.helpers import Served, make_list, serve

AUTH = {"Authorization": f"Bearer {_web.ADMIN_TOKEN}", "Content-Type": "text/csv"}
LIMIT = 64 * 1024


@pytest.fixture
def small_limit(
    pg_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]
) -> Iterator[tuple[Runtime, Served]]:
    rt = make_runtime(
        pg_url, smtp_url=smtp_server.url, admin_token=_web.ADMIN_TOKEN, import_max_bytes=LIMIT
    )
    make_list(rt, articles=0)
    with serve(create_app(rt), free_port()) as served:
        yield rt, served


def _csv(rows: int) -> bytes:
    return (
        "email,name\n" + "".join(f"r{i}@example.org,Reader {i}\n" for i in range(rows))
    ).encode()


def _count(rt: Runtime) -> int:
    with rt.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Subscription)) or 0)


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("newsletter-import-*")}


def test_an_upload_over_the_limit_is_413_and_imports_nothing(
    small_limit: tuple[Runtime, Served],
) -> None:
    rt, web = small_limit
    before = _leftovers()
    big = _csv(5000)
    assert len(big) > LIMIT
    url = "/api/lists/world/subscribers/import"
    answer = web.client.post(url, content=big, headers=AUTH)
    assert answer.status_code == 413, answer.status_code
    assert str(LIMIT) in answer.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for at in range(0, len(big), 4096):
            yield big[at : at + 4096]

    chunked = web.client.post(url, content=chunks(), headers=AUTH)
    assert chunked.status_code == 413, chunked.status_code
    assert _count(rt) == 0
    assert _leftovers() <= before  # no temporary file left behind


def test_an_upload_within_the_limit_is_imported_from_the_stream(
    small_limit: tuple[Runtime, Served],
) -> None:
    rt, web = small_limit
    data = _csv(500)
    assert len(data) < LIMIT

    def chunks() -> Iterator[bytes]:
        for at in range(0, len(data), 1000):
            yield data[at : at + 1000]

    answer = web.client.post("/api/lists/world/subscribers/import", content=chunks(), headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["imported"] == 500 and _count(rt) == 500
    bad = web.client.post(
        "/api/lists/world/subscribers/import", content=b"email\n\xff\xfe\n", headers=AUTH
    )
    assert bad.status_code == 422 and "not UTF-8" in bad.json()["error"]
