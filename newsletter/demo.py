"""`newsletter demo`: the whole flow on the embedded default, safe to run again.

Bundled World articles -> a list -> demo readers (confirmed, pending, one who left) ->
compose -> send in-process to the configured transport (the outbox by default) -> preview.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from newsletter import imports, issues, subscriptions
from newsletter.articles import SAMPLE_ARTICLES_DIR, parse_source
from newsletter.db import upgrade
from newsletter.dispatch import Dispatcher
from newsletter.errors import Conflict
from newsletter.ledger.status import issue_status
from newsletter.models import Delivery, DeliveryStatus
from newsletter.runtime import Runtime
from newsletter.transport import OutboxTransport

LIST_SLUG = "world"
FIRST = [
    "Amara",
    "Björn",
    "Chen",
    "Dana",
    "Émile",
    "Farah",
    "Gustavo",
    "Hana",
    "Ivan",
    "Joana",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Olu",
    "Priya",
    "Quentin",
    "Rosa",
    "Sami",
    "Tove",
    "Uma",
    "Viktor",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoë",
    "Aiko",
    "Bruno",
    "Carmen",
    "Dmitri",
    "Elif",
    "Femi",
    "Greta",
    "Hamid",
    "Ines",
    "Jonas",
]


def demo_csv(confirmed: bool) -> str:
    rows = ["email,name"]
    if confirmed:
        rows += [f"reader{i + 1:02d}@example.org,{name} Example" for i, name in enumerate(FIRST)]
    else:
        rows += [f"pending{i}@example.org,Pending {i}" for i in range(1, 4)]
    return "\n".join(rows) + "\n"


def run_demo(rt: Runtime, *, echo: Callable[[str], None] = print) -> dict[str, object]:
    upgrade(rt.engine)
    key = rt.suppression_key
    with rt.sessions() as s, s.begin():
        for path in sorted(SAMPLE_ARTICLES_DIR.glob("*.txt")):
            issues.store_articles(s, parse_source(path.name, path.read_bytes()), source=path.name)
        with contextlib.suppress(Conflict):  # a previous run made it
            subscriptions.create_list(s, LIST_SLUG, "World Digest", "World Desk <desk@example.org>")
        imports.import_csv(
            s, io.StringIO(demo_csv(True)), LIST_SLUG, confirmed=True, suppression_key=key
        )
        imports.import_csv(
            s, io.StringIO(demo_csv(False)), LIST_SLUG, confirmed=False, suppression_key=key
        )
        # One reader who left: never mailed, however often the demo runs.
        with contextlib.suppress(Conflict):
            subscriptions.add_subscriber(
                s,
                "left@example.org",
                LIST_SLUG,
                name="Left Early",
                confirmed=True,
                source="demo",
                suppression_key=key,
            )
        subscriptions.unsubscribe(s, "left@example.org", LIST_SLUG, source="demo")
        issue = issues.compose_issue(
            s,
            rt.templates,
            LIST_SLUG,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(1970, 1, 1, tzinfo=UTC),  # every bundled article, on every run
            max_articles=10,
        )
        issue_id = issue.id
        rt.refuse_unsafe_send(s, issue_id)  # the production gate, as for `issues send`
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=rt.settings.batch_size,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
    # In this process whatever BROKER_URL says: the demo shows its result when it returns.
    Dispatcher(rt).run_here(issue_id, batch_ids)
    preview_dir = Path("preview")
    with rt.sessions() as s, s.begin():
        paths = issues.write_preview(s, issue_id, rt.links, preview_dir, dkim=rt.dkim_signer)
        sent = s.scalar(
            select(func.count()).where(
                Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.SENT
            )
        )
        reader = issues.first_active_reader(s, issues.get_issue(s, issue_id))
        assert reader is not None  # the demo subscribed its readers above
        status = issue_status(s, issue_id)
    unsubscribe = rt.links.unsubscribe(reader.token)
    where = (
        f"{rt.transport.directory.resolve()}/new"
        if isinstance(rt.transport, OutboxTransport)
        else "the SMTP server in NEWSLETTER_SMTP_URL"
    )
    echo(f"issue {issue_id}: {status['subject']}")
    skipped = status["counts"]["skipped"]
    echo(f"messages written: {sent} (issue {status['status']}; {skipped} skipped)")
    echo(f"outbox: {where}")
    echo(f"preview: {paths[0].resolve()}  {paths[1].resolve()}  {paths[2].resolve()}")
    echo(f"unsubscribe link for {reader.email} (open it with `newsletter serve` running):")
    echo(f"  {unsubscribe}")
    return {"issue_id": issue_id, "sent": sent, "unsubscribe_url": unsubscribe}
