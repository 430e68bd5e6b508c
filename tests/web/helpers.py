"""Helpers for the web tests: serve the app with uvicorn in a thread, read what reached the
SMTP server, and snapshot the subscription state to prove that something changed nothing."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select

from newsletter import issues, subscriptions
from newsletter.articles import SAMPLE_ARTICLES_DIR, parse_source
from newsletter.ledger.sender import run_in_process
from newsletter.models import Event, Subscriber, Subscription
from newsletter.runtime import Runtime
from tests.conftest import Recorder


@dataclass
class Served:
    url: str
    app: FastAPI
    client: httpx.Client


@contextmanager
def serve(app: FastAPI, port: int) -> Iterator[Served]:
    """The app on a real socket (uvicorn in a background thread), and a client for it."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    try:
        yield Served(url, app, client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)


def wait_for(recorder: Recorder, count: int, timeout: float = 15) -> list[EmailMessage]:
    """Wait until `count` messages reached the SMTP server; return them parsed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with recorder.lock:
            if len(recorder.messages) >= count:
                return [m.message() for m in recorder.messages]
        time.sleep(0.05)
    raise AssertionError(f"expected {count} message(s), got {len(recorder.messages)}")


def settle(recorder: Recorder, quiet: float = 0.6) -> int:
    """Wait until nothing has arrived for `quiet` seconds; the number of messages then."""
    last = -1
    while True:
        with recorder.lock:
            n = len(recorder.messages)
        if n == last:
            return n
        last = n
        time.sleep(quiet)


def body_text(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def body_html(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def link_in(msg: EmailMessage, kind: str) -> str:
    """The first http(s) link to /KIND/ in the plain-text part."""
    match = re.search(rf"https?://\S+/{kind}/\S+", body_text(msg))
    assert match, f"no /{kind}/ link in the message"
    return match.group(0)


def one_click_url(msg: EmailMessage) -> str:
    """The https URI of List-Unsubscribe (the one RFC 8058 one-click POSTs to)."""
    header = str(msg["List-Unsubscribe"])
    match = re.search(r"<(https?://[^>]+)>", header)
    assert match, header
    return match.group(1)


def snapshot(rt: Runtime) -> dict[str, Any]:
    """Everything a link could change: subscriptions, names and the event log."""
    with rt.sessions() as s:
        subs = s.execute(
            select(
                Subscription.id,
                Subscription.status,
                Subscription.sections,
                Subscription.paused,
                Subscription.confirmed_at,
                Subscription.unsubscribed_at,
                Subscription.updated_at,
            ).order_by(Subscription.id)
        ).all()
        names = s.execute(select(Subscriber.id, Subscriber.name).order_by(Subscriber.id)).all()
        events = s.scalar(select(func.count()).select_from(Event))
    return {"subscriptions": [tuple(r) for r in subs], "names": names, "events": events}


def make_list(rt: Runtime, slug: str = "world", articles: int = 12) -> None:
    """A list and some World articles in several sections, nothing composed yet."""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, slug, "World Digest", "World Desk <desk@example.org>")
        for path in sorted(SAMPLE_ARTICLES_DIR.glob("*.txt"))[:articles]:
            issues.store_articles(s, parse_source(path.name, path.read_bytes()), source=path.name)


def subscription_of(rt: Runtime, email: str, slug: str = "world") -> Subscription:
    with rt.sessions() as s:
        return subscriptions.find_subscription(s, email, slug)


def events_of(rt: Runtime, email: str) -> list[tuple[str, str]]:
    with rt.sessions() as s:
        person = s.scalar(select(Subscriber).where(Subscriber.email == email))
        assert person is not None
        return [
            (kind, source)
            for kind, source in s.execute(
                select(Event.kind, Event.source)
                .where(Event.subscriber_id == person.id)
                .order_by(Event.id)
            ).all()
        ]


def send_next_issue(
    rt: Runtime, *, reuse_articles: bool = False, subject: str | None = None
) -> int:
    """Compose the list's next digest and deliver it in-process, as `issues send` does."""
    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(1970, 1, 1, tzinfo=UTC) if reuse_articles else None,
            max_articles=4,
            subject=subject,
        )
        issue_id = issue.id
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=rt.settings.batch_size,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    run_in_process(rt.sessions, issue_id, batch_ids, rt.transport, rt.links, rt.policy)
    return issue_id


def compose_draft(rt: Runtime, max_articles: int = 12) -> int:
    """A draft issue of every article: the list's sections are those its issues carried."""
    with rt.sessions() as s, s.begin():
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            max_articles=max_articles,
        )
        return issue.id
