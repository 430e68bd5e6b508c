"""World-building helpers shared by the delivery tests."""

from __future__ import annotations

import io
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import select

from newsletter import imports, issues, subscriptions
from newsletter.articles import parse_source
from newsletter.models import Delivery, Issue
from newsletter.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "tests" / "data" / "seed_world.txt"
KEY = "test-secret-key"

REQUIRED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Precedence",
)


def seed_world(rt: Runtime, *, confirmed: int, pending: int = 0, unsubscribed: int = 0) -> int:
    """A list with readers in each state, the seed article, and a composed draft issue."""
    with rt.sessions() as s, s.begin():
        subscriptions.create_list(s, "world", "World Digest", "World Desk <desk@example.org>")
        rows = [f"reader{i}@example.org,Reader {i}" for i in range(confirmed)]
        rows += [f"gone{i}@example.org,Gone {i}" for i in range(unsubscribed)]
        imports.import_csv(
            s,
            io.StringIO("email,name\n" + "\n".join(rows) + "\n"),
            "world",
            confirmed=True,
            suppression_key=KEY,
        )
        for i in range(unsubscribed):
            subscriptions.unsubscribe(s, f"gone{i}@example.org", "world", source="page")
        if pending:
            pend = "\n".join(f"pending{i}@example.org" for i in range(pending))
            imports.import_csv(
                s, io.StringIO("email\n" + pend + "\n"), "world", suppression_key=KEY
            )
        issues.store_articles(s, parse_source(SEED.name, SEED.read_bytes()), source="seed")
        issue = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        return issue.id


def confirmed_addresses(n: int) -> list[str]:
    return sorted(f"reader{i}@example.org" for i in range(n))


def deliveries(rt: Runtime, issue_id: int) -> list[Delivery]:
    with rt.sessions() as s:
        return list(s.scalars(select(Delivery).where(Delivery.issue_id == issue_id)))


def issue_row(rt: Runtime, issue_id: int) -> Issue:
    with rt.sessions() as s:
        issue = s.get(Issue, issue_id)
        assert issue is not None
        return issue


def assert_well_formed(raw: bytes, msg: EmailMessage) -> None:
    """What every newsletter message must be, as the receiving server sees it."""
    assert not msg.defects, msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects
    for header in REQUIRED_HEADERS:
        assert msg[header], f"missing {header}"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "bulk"
    assert msg.get_content_type() == "multipart/alternative"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "text/html"]
    body = raw.replace(b"\r\n", b"")
    assert b"\n" not in body and b"\r" not in body, "bare LF or CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
