"""Issue 13, finding 9: the trailing-slash redirect was built from the Host header, so a
spoofed Host sent readers to another site. No answer's Location may name another host."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from newsletter.runtime import Runtime
from tests.security import _web
from tests.web.helpers import Served, make_list

web_rt, web_app = _web.web_rt, _web.web_app  # the fixtures


@pytest.mark.parametrize(
    "path",
    [
        "/subscribe/world/",
        "/archive/world/",
        "/archive/world/feed.xml/",
        "/healthz/",
        "/api/lists/",
        "/docs/",
        "//evil.example/",
        "/\\evil.example/",
    ],
)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8443"])
def test_a_spoofed_host_never_gets_a_location_on_another_host(
    web_rt: Runtime, web_app: Served, path: str, host: str
) -> None:
    make_list(web_rt, articles=0)
    for headers in ({"Host": host}, {"Host": "127.0.0.1", "X-Forwarded-Host": host}):
        answer = web_app.client.get(path, headers=headers)
        location = answer.headers.get("location")
        if location is not None:
            target = urlsplit(location)
            assert not target.netloc and location.startswith("/"), (path, location)
            assert not location.startswith(("//", "/\\")), (path, location)
        assert answer.status_code != 500, path


def test_a_trailing_slash_still_reaches_the_page(web_rt: Runtime, web_app: Served) -> None:
    make_list(web_rt, articles=0)
    answer = web_app.client.get("/subscribe/world/?x=1", headers={"Host": "evil.example"})
    assert answer.status_code in (301, 308) and answer.headers["location"] == "/subscribe/world?x=1"
    page = web_app.client.get(answer.headers["location"])
    assert page.status_code == 200 and "Subscribe to World Digest" in page.text
