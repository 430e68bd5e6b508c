"""Issue 13, finding 9: previews and test copies.

A preview (`issues preview`, `GET /api/issues/{id}/preview`, `issues check`) was built for the
list's first real reader: their address, name and live unsubscribe/preferences links were in
the files an operator shares for review. A `--test-to` copy had links to a random token that
answered 404. Both now use a sample reader that is nobody: a sample address and name, and
links that open a page saying this was a test copy and change nothing.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from newsletter import issues, subscriptions
from newsletter.articles import SAMPLE_ARTICLES_DIR, parse_source
from newsletter.models import Event, Subscription
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import cli_env, run_cli

ADMIN = "admin-token-for-the-sample-test-0123456789"
READER = "ada.lovelace@example.org"
NAME = "Ada Lovelace"


@pytest.fixture
def rt(pg_url: str, make_runtime: Callable[..., Runtime], tmp_path: Path) -> Runtime:
    return make_runtime(pg_url, admin_token=ADMIN, outbox_dir=tmp_path / "outbox")


@pytest.fixture
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(rt), base_url="https://news.example.org") as client:
        yield client


def draft(rt: Runtime) -> tuple[int, str]:
    """A draft issue for a list whose only reader is Ada; her subscription token."""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        for path in sorted(SAMPLE_ARTICLES_DIR.glob("*.txt"))[:3]:
            issues.store_articles(s, parse_source(path.name, path.read_bytes()), source=path.name)
        sub = subscriptions.add_subscriber(
            s, READER, "world", name=NAME, confirmed=True, suppression_key="k"
        )
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        return issue.id, sub.token


def ledger(rt: Runtime) -> tuple[object, ...]:
    with rt.sessions() as s:
        subs = s.execute(
            select(Subscription.id, Subscription.status, Subscription.paused).order_by(
                Subscription.id
            )
        ).all()
        return (tuple(subs), s.scalar(select(func.count()).select_from(Event)))


def links_of(text: str) -> list[str]:
    """The paths of the unsubscribe and preferences links in a plain-text part."""
    return re.findall(r"https://news\.example\.org(/(?:unsubscribe|preferences)/[^\s>]+)", text)


def assert_sample_pages(client: TestClient, rt: Runtime, paths: list[str]) -> None:
    """Each link opens a page that works and says it was a test copy; posting to it (the
    page's button, a mail client's one-click) changes nobody."""
    assert any(p.startswith("/unsubscribe/") for p in paths), paths
    assert any(p.startswith("/preferences/") for p in paths), paths
    before = ledger(rt)
    for path in paths:
        page = client.get(path)
        assert page.status_code == 200, f"GET {path} answered {page.status_code}"
        assert "test copy" in page.text.lower(), page.text
        assert READER not in page.text and NAME not in page.text
        for body in (b"List-Unsubscribe=One-Click", b"name=Mallory&paused=1"):
            answer = client.post(
                path, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
            assert answer.status_code == 200, f"POST {path} answered {answer.status_code}"
            assert "test copy" in answer.text.lower()
    assert ledger(rt) == before


def test_a_test_copy_has_links_to_a_test_page_that_change_nothing(
    rt: Runtime, client: TestClient, pg_url: str, tmp_path: Path
) -> None:
    issue_id, token = draft(rt)
    outbox = tmp_path / "outbox"
    env = cli_env(database_url=pg_url, outbox_dir=str(outbox))
    run_cli("issues", "send", str(issue_id), "--test-to", "editor@example.net", env=env)
    [eml] = [p for p in outbox.rglob("*") if p.is_file()]
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert "editor@example.net" in str(msg["To"])
    text = str(msg.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    header = re.findall(
        r"<https://news\.example\.org(/unsubscribe/[^>]+)>", str(msg["List-Unsubscribe"])
    )
    assert_sample_pages(client, rt, [*links_of(text), *header])
    assert token not in eml.read_text(errors="replace")


def test_previews_carry_no_real_reader(
    rt: Runtime, client: TestClient, pg_url: str, tmp_path: Path
) -> None:
    issue_id, token = draft(rt)
    traces = [READER, NAME, token]
    env = cli_env(database_url=pg_url)
    out = tmp_path / "preview"
    run_cli("issues", "preview", str(issue_id), "--out", str(out), env=env)
    files = {p.name: p.read_text(errors="replace") for p in out.iterdir()}
    assert set(files) == {f"{issue_id}.html", f"{issue_id}.txt", f"{issue_id}.eml"}
    for name, content in files.items():
        for trace in traces:
            assert trace not in content, f"{name} carries {trace!r}"

    api = client.get(
        f"/api/issues/{issue_id}/preview", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert api.status_code == 200
    for trace in traces:
        assert trace not in api.text, f"the API preview carries {trace!r}"

    check = run_cli("issues", "check", str(issue_id), env=env, check=False)
    for trace in traces:
        assert trace not in check.stdout, f"issues check names {trace!r}"

    assert_sample_pages(client, rt, links_of(files[f"{issue_id}.txt"]))
