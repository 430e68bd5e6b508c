"""Issue 13, finding 9: an id that does not fit its column answered 500 (PostgreSQL refused
the query). Every id in a path is a 404 and every id in a query a clear 422, never a 500."""

from __future__ import annotations

import pytest

from newsletter.runtime import Runtime
from tests.security import _web
from tests.web.helpers import Served, make_list

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures
AUTH = {"Authorization": f"Bearer {_web.ADMIN_TOKEN}"}


@pytest.mark.parametrize(
    "path",
    [
        "/api/issues/2147483648",
        "/api/issues/99999999999999999999999",
        "/api/issues/-1",
        "/api/issues/0",
        "/api/issues/%C2%B2",
        "/api/issues/1_0",
        "/api/issues/%201",
        "/api/issues/2147483648/preview",
    ],
)
def test_an_api_id_out_of_range_is_404(web_rt: Runtime, web_app: Served, path: str) -> None:
    answer = web_app.client.get(path, headers=AUTH)
    assert answer.status_code == 404, (path, answer.status_code, answer.text[:200])
    assert "unknown issue" in answer.json()["error"]


def test_an_api_post_on_an_id_out_of_range_is_404(web_rt: Runtime, web_app: Served) -> None:
    for action in ("send", "pause", "resume", "cancel"):
        answer = web_app.client.post(f"/api/issues/2147483648/{action}", headers=AUTH)
        assert answer.status_code == 404, (action, answer.status_code, answer.text[:200])


@pytest.mark.parametrize("after", ["9223372036854775808", "-1", "x", "1e3"])
def test_a_cursor_out_of_range_is_422(web_rt: Runtime, web_app: Served, after: str) -> None:
    make_list(web_rt, articles=0)
    answer = web_app.client.get(f"/api/lists/world/subscribers?after={after}", headers=AUTH)
    assert answer.status_code == 422, (after, answer.status_code, answer.text[:200])
    assert answer.json()["error"].endswith(
        "after: must be a whole number from 0 to 9223372036854775807"
    )


def test_a_big_cursor_that_fits_pages_to_the_end(web_rt: Runtime, web_app: Served) -> None:
    make_list(web_rt, articles=0)
    answer = web_app.client.get(
        "/api/lists/world/subscribers?after=9223372036854775807", headers=AUTH
    )
    assert answer.status_code == 200 and answer.json() == {"items": [], "next_after": None}


@pytest.mark.parametrize(
    "path", ["/archive/world/%C2%B2", "/archive/world/2147483648", "/archive/world/0"]
)
def test_an_archive_id_out_of_range_is_a_404_page(
    web_rt: Runtime, web_app: Served, path: str
) -> None:
    make_list(web_rt, articles=0)
    page = web_app.client.get(path)
    assert page.status_code == 404, (path, page.status_code)
    assert page.headers["content-type"].startswith("text/html")
    assert "Not found" in page.text
