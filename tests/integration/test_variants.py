"""Section preferences: one render per distinct choice, each reader gets their variant, a
reader whose sections carry no article this time is skipped with a reason."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from newsletter import issues, subscriptions
from newsletter.articles import parse_json
from newsletter.ledger.sender import run_in_process
from newsletter.models import DeliveryStatus, IssueVariant
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer
from tests.integration.helpers import KEY, deliveries

ARTICLES = [
    {"section": "World", "title": "World story", "body": "A world lead. More world."},
    {"section": "Europe", "title": "Europe story", "body": "A Europe lead. More Europe."},
    {"section": "Asia", "title": "Asia story", "body": "An Asia lead. More Asia."},
]


@pytest.fixture
def rt(db_url: str, smtp_server: SmtpServer, make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(db_url, smtp_url=smtp_server.url)


def reader(rt: Runtime, email: str, sections: list[str] | None, *, paused: bool = False) -> None:
    with rt.sessions() as s, s.begin():
        sub = subscriptions.add_subscriber(s, email, "world", confirmed=True, suppression_key=KEY)
        subscriptions.set_preferences(
            s, sub, name=None, sections=sections, paused=paused, source="page"
        )


def compose(rt: Runtime) -> int:
    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        return issue.id


def send(rt: Runtime, issue_id: int) -> None:
    with rt.sessions() as s, s.begin():
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=3,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)


def titles_received(smtp_server: SmtpServer) -> dict[str, set[str]]:
    got = {}
    for r in smtp_server.recorder.messages:
        text = r.message().get_body(("plain",)).get_content()
        got[r.rcpt_tos[0]] = {a["title"] for a in ARTICLES if a["title"] in text}
    return got


def test_each_reader_gets_the_sections_they_chose(rt: Runtime, smtp_server: SmtpServer) -> None:
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        issues.store_articles(s, parse_json(json.dumps(ARTICLES), source="a.json"), source="a")
    reader(rt, "all@example.org", None)
    for i in range(5):  # five readers, one choice: one render
        reader(rt, f"europe{i}@example.org", ["Europe"])
    reader(rt, "two@example.org", ["Asia", "Europe"])
    reader(rt, "sport@example.org", ["Sport"])
    reader(rt, "away@example.org", None, paused=True)
    issue_id = compose(rt)
    reader(rt, "late@example.org", ["Asia"])  # chose after compose, before send

    send(rt, issue_id)

    got = titles_received(smtp_server)
    assert got["all@example.org"] == {"World story", "Europe story", "Asia story"}
    assert all(got[f"europe{i}@example.org"] == {"Europe story"} for i in range(5))
    assert got["two@example.org"] == {"Europe story", "Asia story"}
    assert got["late@example.org"] == {"Asia story"}
    assert "sport@example.org" not in got and "away@example.org" not in got
    with rt.sessions() as s:
        variants = s.scalar(
            select(func.count()).select_from(IssueVariant).where(IssueVariant.issue_id == issue_id)
        )
    assert variants == 4  # Europe, Asia+Europe, Sport (empty), Asia: not one per reader
    skipped = [d for d in deliveries(rt, issue_id) if d.status == DeliveryStatus.SKIPPED]
    assert len(skipped) == 1
    assert skipped[0].last_error == "no article in this issue is in the reader's chosen sections"
    assert len(deliveries(rt, issue_id)) == 9  # the paused reader is not in the audience
