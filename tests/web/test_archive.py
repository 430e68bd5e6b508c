"""The public archive and its Atom feed, and the health check."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

import pytest

from newsletter import issues, subscriptions
from newsletter.articles import parse_json
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.web.helpers import Served, make_list, send_next_issue

ATOM = "{http://www.w3.org/2005/Atom}"


def sent_world(rt: Runtime) -> tuple[int, int]:
    """A list with one reader, a sent issue whose subject and article title hold markup, and
    a draft that was never sent."""
    make_list(rt, articles=3)
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(
            s, "ada@example.org", "world", name="Ada", confirmed=True, suppression_key="k"
        )
        article = {
            "section": "World",
            "title": '<b>Bold</b> & "quoted" claims',
            "body": "A body that is long enough to summarise. It has two sentences.",
        }
        issues.store_articles(s, parse_json(json.dumps(article), source="t"), source="t")
    sent = send_next_issue(rt, subject="<i>Weekly</i> & more")
    with rt.sessions() as s, s.begin():
        draft = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(1970, 1, 1, tzinfo=UTC),
        )
        return sent, draft.id


def test_the_archive_shows_sent_issues_without_anyones_links(
    rt: Runtime, web: Served, smtp_server: SmtpServer
) -> None:
    sent, draft = sent_world(rt)
    index = web.client.get("/archive/world")
    assert index.status_code == 200
    assert f'href="/archive/world/{sent}"' in index.text
    assert f"/archive/world/{draft}" not in index.text  # drafts are not published
    assert "&lt;i&gt;Weekly&lt;/i&gt; &amp; more" in index.text and "<i>" not in index.text

    page = web.client.get(f"/archive/world/{sent}")
    assert page.status_code == 200
    assert "Hello reader," in page.text and "Ada" not in page.text
    assert "XXNL" not in page.text
    assert "/unsubscribe/" not in page.text and "/preferences/" not in page.text
    assert f'href="{rt.settings.base_url}/subscribe/world"' in page.text
    assert "&lt;b&gt;Bold&lt;/b&gt;" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")

    for missing in (
        f"/archive/world/{draft}",
        "/archive/world/999",
        "/archive/world/x",
        "/archive/nope",
        f"/archive/nope/{sent}",
    ):
        assert web.client.get(missing).status_code == 404, missing


def test_the_atom_feed_lists_sent_issues(rt: Runtime, web: Served) -> None:
    sent, _draft = sent_world(rt)
    feed = web.client.get("/archive/world/feed.xml")
    assert feed.status_code == 200
    assert feed.headers["content-type"].startswith("application/atom+xml")
    root = ET.fromstring(feed.content)
    assert root.tag == f"{ATOM}feed"
    assert root.findtext(f"{ATOM}title") == "World Digest"
    [entry] = root.findall(f"{ATOM}entry")
    link = entry.find(f"{ATOM}link")
    assert link is not None
    assert link.get("href") == f"{rt.settings.base_url}/archive/world/{sent}"
    assert '<b>Bold</b> & "quoted" claims' in (entry.findtext(f"{ATOM}summary") or "")
    assert web.client.get(link.get("href", "").replace(rt.settings.base_url, "")).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "code", "expected"),
    [
        ({}, 200, {"database": "ok", "broker": "not configured (in-process delivery)"}),
        ({"broker_url": "REDIS"}, 200, {"database": "ok", "broker": "ok"}),
        ({"broker_url": "redis://127.0.0.1:1/0"}, 503, {"broker": "unreachable"}),
        (
            {"database_url": "postgresql://postgres@127.0.0.1:1/none"},
            503,
            {"database": "unreachable"},
        ),
    ],
)
def test_healthz_reports_the_database_and_the_broker(
    pg_url: str,
    redis_url: str,
    make_runtime: Callable[..., Runtime],
    start_app: Callable[..., Served],
    overrides: dict[str, str],
    code: int,
    expected: dict[str, str],
) -> None:
    settings = {"database_url": pg_url, **overrides}
    if settings.get("broker_url") == "REDIS":
        settings["broker_url"] = redis_url
    web = start_app(make_runtime(**settings))
    health = web.client.get("/healthz")
    assert health.status_code == code
    body = health.json()
    assert body["status"] == ("ok" if code == 200 else "unavailable")
    for key, value in expected.items():
        assert body[key].startswith(value), body
