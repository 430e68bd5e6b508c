"""The operator API: JSON over HTTP with `Authorization: Bearer ADMIN_TOKEN`.

Errors are `{"error": "..."}` with 400 (unreadable request), 401 (missing or wrong token),
403 (API off), 404 (unknown list, issue, subscriber), 409 (contradicts the current state)
or 422 (readable but invalid). Each endpoint is one transaction; work for the workers is
enqueued only after it commits.
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from newsletter import feedback, import_rows, imports, issue_list, issues, subscriptions
from newsletter.addresses import normalize_email
from newsletter.articles import parse_json
from newsletter.errors import InvalidInput, NewsletterError
from newsletter.ledger.control import cancel_issue, pause_issue, resume_issue
from newsletter.ledger.status import delivery_counts, issue_status
from newsletter.models import MailingList, Subscriber, SubscriptionStatus
from newsletter.transport import Outcome, erase_from_outbox, session_of
from newsletter.web import uploads
from newsletter.web.context import WebContext, web_context
from newsletter.web.ids import IssueId, SubscriptionCursor

bearer = HTTPBearer(auto_error=False, description="NEWSLETTER_ADMIN_TOKEN")


def require_admin(
    ctx: WebContext = Depends(web_context),
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> None:
    expected = ctx.runtime.settings.admin_token.get_secret_value()
    if not expected:
        raise HTTPException(
            403, "the operator API is off: set NEWSLETTER_ADMIN_TOKEN to turn it on"
        )
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send 'Authorization: Bearer <NEWSLETTER_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(
            401, "wrong bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])


class UpstreamError(NewsletterError):
    """The SMTP server refused a test send (502)."""


# --- lists ---------------------------------------------------------------------------------


class ListIn(BaseModel):
    slug: str = Field(examples=["world"])
    name: str = Field(examples=["World Digest"])
    from_address: str = Field(examples=["World Desk <desk@example.org>"])
    reply_to: str | None = None


def _list_out(mlist: MailingList, counts: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "slug": mlist.slug,
        "name": mlist.name,
        "from_address": mlist.from_address,
        "reply_to": mlist.reply_to,
        "counts": counts or {},
    }


@router.get("/lists", tags=["lists"])
def lists(ctx: WebContext = Depends(web_context)) -> list[dict[str, Any]]:
    """Every list with its subscriber counts per status."""
    with ctx.transaction() as s:
        return [_list_out(m, counts) for m, counts in subscriptions.list_counts(s)]


@router.post("/lists", status_code=201, tags=["lists"])
def create_list(body: ListIn, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    with ctx.transaction() as s:
        mlist = subscriptions.create_list(s, body.slug, body.name, body.from_address, body.reply_to)
        return _list_out(mlist)


# --- subscribers ---------------------------------------------------------------------------


class SubscriberIn(BaseModel):
    email: str = Field(examples=["reader@example.org"])
    name: str | None = None
    confirmed: bool = Field(False, description="Skip double opt-in (the reader agreed already).")
    send_confirmation: bool = Field(
        False, description="Email the confirmation link to a pending subscriber."
    )


class EmailIn(BaseModel):
    email: str = Field(examples=["reader@example.org"])


@router.get("/lists/{slug}/subscribers", tags=["subscribers"])
def list_subscribers(
    slug: str,
    status: SubscriptionStatus | None = None,
    after: Annotated[
        SubscriptionCursor, Query(description="Continue after this subscription id.")
    ] = 0,
    limit: int = Query(100, ge=1, le=1000),
    ctx: WebContext = Depends(web_context),
) -> dict[str, Any]:
    """A page of subscribers, oldest first; pass `next_after` as `after` for the next.
    `next_after` is null on the last page (one more row is read to know that)."""
    with ctx.transaction() as s:
        rows = list(
            subscriptions.iter_subscriptions(
                s, slug, status=status, after_id=after, limit=limit + 1
            )
        )
        items = [
            {
                "id": sub.id,
                "email": person.email,
                "name": person.name,
                "status": sub.status.value,
                "paused": sub.paused,
                "sections": subscriptions.chosen_sections(sub),
                "subscribed_at": sub.created_at.isoformat() if sub.created_at else None,
                "confirmed_at": sub.confirmed_at.isoformat() if sub.confirmed_at else None,
            }
            for sub, person in rows[:limit]
        ]
    return {"items": items, "next_after": items[-1]["id"] if len(rows) > limit else None}


@router.post("/lists/{slug}/subscribers", status_code=201, tags=["subscribers"])
def add_subscriber(
    slug: str, body: SubscriberIn, ctx: WebContext = Depends(web_context)
) -> dict[str, Any]:
    """Add one subscriber (pending unless `confirmed`)."""
    with ctx.transaction() as s:
        sub = subscriptions.add_subscriber(
            s,
            body.email,
            slug,
            name=body.name,
            confirmed=body.confirmed,
            source="api",
            suppression_key=ctx.runtime.suppression_key,
        )
        reader = s.get(Subscriber, sub.subscriber_id)
        assert reader is not None
        result = {
            # The reader's address as first typed: another capitalisation is the same reader.
            "email": reader.email,
            "list": slug,
            "status": sub.status.value,
            "confirmation_sent": False,
        }
        sub_id = sub.id
        pending = sub.status == SubscriptionStatus.PENDING
    if body.send_confirmation and pending:
        sent = ctx.dispatcher.confirmation_here(sub_id)
        result["confirmation_sent"] = sent is not None and sent.outcome is Outcome.SENT
    return result


@router.post(
    "/lists/{slug}/subscribers/import",
    tags=["subscribers"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
async def import_subscribers(
    slug: str,
    request: Request,
    confirmed: bool = False,
    strict: bool = False,
    ctx: WebContext = Depends(web_context),
) -> dict[str, Any]:
    """Import a CSV (the request body; header row with an `email` column). The report is the
    CLI's: imported, updated, unchanged, and each rejected line with its reason. The body is
    streamed to a temporary file and parsed from there; one larger than
    NEWSLETTER_IMPORT_MAX_BYTES is refused with 413."""
    path = await uploads.receive_to_file(request, ctx.runtime.settings.import_max_bytes)
    try:
        return await run_in_threadpool(_import, ctx, slug, path, confirmed, strict)
    finally:
        path.unlink(missing_ok=True)


def _import(
    ctx: WebContext, slug: str, path: Path, confirmed: bool, strict: bool
) -> dict[str, Any]:
    with import_rows.open_text_file(path, "body") as stream, ctx.transaction() as s:
        report = imports.import_csv(
            s,
            stream,
            slug,
            confirmed=confirmed,
            strict=strict,
            suppression_key=ctx.runtime.suppression_key,
            source="api",
            name="body",
        )
    return {**report.as_dict(), "summary": report.summary()}


@router.post("/lists/{slug}/subscribers/unsubscribe", tags=["subscribers"])
def unsubscribe(slug: str, body: EmailIn, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Unsubscribe an address; takes effect for every batch not yet claimed."""
    with ctx.transaction() as s:
        changed = subscriptions.unsubscribe(s, body.email, slug, source="operator")
    return {"email": normalize_email(body.email), "list": slug, "changed": changed}


@router.post("/subscribers/erase", tags=["subscribers"])
def erase(body: EmailIn, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Remove an address's personal data; a keyed hash keeps it from coming back."""
    with ctx.transaction() as s:
        n = subscriptions.erase_subscriber(
            s, body.email, suppression_key=ctx.runtime.suppression_key, source="operator"
        )
    files = erase_from_outbox(ctx.runtime.settings.outbox_dir, body.email.strip())
    return {"erased_subscriptions": n, "erased_outbox_files": files, "suppressed": True}


# --- articles ------------------------------------------------------------------------------


@router.post("/articles", tags=["articles"])
def ingest_articles(
    payload: dict[str, Any] | list[Any] = Body(
        examples=[
            {
                "section": "World",
                "title": "Grain corridor talks resume",
                "body": "Negotiators met in Istanbul ...",
                "url": "https://example.org/grain",
            }
        ]
    ),
    section: str | None = Query(None, description="Override every article's section."),
    ctx: WebContext = Depends(web_context),
) -> dict[str, int]:
    """Ingest one article object or a list of them (the JSON format of `articles ingest`).
    One bad item rejects the whole body."""
    articles = parse_json(json.dumps(payload), source="body", section=section)
    with ctx.transaction() as s:
        report = issues.store_articles(s, articles, source="api")
    return {"added": report.added, "unchanged": report.unchanged}


# --- issues --------------------------------------------------------------------------------


class ComposeIn(BaseModel):
    list: str = Field(examples=["world"])
    since: date | datetime | None = Field(
        None, description="Use every article ingested since then (default: the unused ones)."
    )
    max_articles: int = Field(10, ge=1, le=100)
    subject: str | None = None


def _since(value: date | datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@router.get("/issues", tags=["issues"])
def list_issues(
    list_slug: str | None = Query(None, alias="list"), ctx: WebContext = Depends(web_context)
) -> list[dict[str, Any]]:
    """Issues, newest first (of one list with `?list=SLUG`)."""
    with ctx.transaction() as s:
        return issue_list.list_issues(s, list_slug)


@router.post("/issues", status_code=201, tags=["issues"])
def compose(body: ComposeIn, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Compose a draft issue from the list's next articles."""
    rt = ctx.runtime
    with ctx.transaction() as s:
        issue = issues.compose_issue(
            s,
            rt.templates,
            body.list,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=_since(body.since),
            max_articles=body.max_articles,
            subject=body.subject,
        )
        return {"id": issue.id, "subject": issue.subject, "status": issue.status.value}


@router.get("/issues/{issue_id}", tags=["issues"])
def status(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Status, counts per delivery status, and the last errors."""
    with ctx.transaction() as s:
        return issue_status(s, issue_id)


@router.get("/issues/{issue_id}/preview", tags=["issues"])
def preview(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """The html and text exactly as a reader gets them, built for a sample reader (never a
    real reader's address, name or links)."""
    with ctx.transaction() as s:
        issue = issues.get_issue(s, issue_id)
        _data, html, text = issues.build_single(
            s,
            issue,
            ctx.runtime.links,
            issues.sample_reader(),
            dkim=ctx.runtime.dkim_signer,
        )
        return {"id": issue.id, "subject": issue.subject, "html": html, "text": text}


@router.post("/issues/{issue_id}/test", tags=["issues"])
def test_send(
    issue_id: IssueId, body: EmailIn, ctx: WebContext = Depends(web_context)
) -> dict[str, Any]:
    """Send one copy, subject prefixed [TEST], to one address; changes nothing."""
    rt = ctx.runtime
    with ctx.transaction() as s:
        copy = issues.sample_copy(s, issue_id, body.email, rt.links, dkim=rt.dkim_signer)
    with session_of(rt.transport) as conn:
        result = conn.send(copy.sender, copy.recipient, copy.data)
    if result.outcome is not Outcome.SENT:
        raise UpstreamError(f"test send to {copy.recipient} failed: {result.describe()}")
    return {"sent": True, "to": copy.recipient, "reply": result.describe()}


@router.post("/issues/{issue_id}/send", status_code=202, tags=["issues"])
def send(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Freeze the audience and start sending (through the workers when BROKER_URL is set,
    otherwise in this process). Follow it with GET /api/issues/{id}."""
    rt = ctx.runtime
    with ctx.transaction() as s:
        rt.refuse_unsafe_send(s, issue_id)  # production: 409 with the problems
        batch_ids = issues.begin_send(
            s,
            rt.templates,
            issue_id,
            batch_size=rt.settings.batch_size,
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
        )
        total = delivery_counts(s, issue_id)["queued"]
    mode = (
        ctx.dispatcher.deliver(issue_id, batch_ids, in_background=True)
        if batch_ids
        else "nothing to send"
    )
    return {"id": issue_id, "recipients": total, "batches": len(batch_ids), "delivery": mode}


@router.post("/issues/{issue_id}/pause", tags=["issues"])
def pause(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Stop claiming new batches; batches in flight finish."""
    with ctx.transaction() as s:
        pause_issue(s, issue_id)
    with ctx.transaction() as s:
        return issue_status(s, issue_id)


@router.post("/issues/{issue_id}/resume", tags=["issues"])
def resume(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Continue a paused issue, or re-enqueue the lost work of a sending one."""
    with ctx.transaction() as s:
        ctx.runtime.refuse_unsafe_send(s, issue_id)  # production: 409 with the problems
        batch_ids = resume_issue(s, issue_id)
    if batch_ids:
        ctx.dispatcher.deliver(issue_id, batch_ids, in_background=True)
    with ctx.transaction() as s:
        return {**issue_status(s, issue_id), "batches": len(batch_ids)}


@router.post("/issues/{issue_id}/cancel", tags=["issues"])
def cancel(issue_id: IssueId, ctx: WebContext = Depends(web_context)) -> dict[str, Any]:
    """Cancel what is not sent yet."""
    with ctx.transaction() as s:
        cancelled = cancel_issue(s, issue_id)
    with ctx.transaction() as s:
        return {**issue_status(s, issue_id), "cancelled_deliveries": cancelled}


MAX_BOUNCE_BYTES = 10 * 1024 * 1024


@router.post(
    "/webhooks/bounces",
    tags=["bounces"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"message/rfc822": {"schema": {"type": "string"}}},
        }
    },
)
async def bounce_webhook(
    request: Request, ctx: WebContext = Depends(web_context)
) -> dict[str, Any]:
    """One returned mail as the raw message (a DSN, an ARF complaint, a non-standard bounce
    or a mail to the List-Unsubscribe address): the events it carries and what each changed.
    The same report posted twice changes nothing the second time."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidInput("the body is empty: post the returned message as message/rfc822")
    if len(raw) > MAX_BOUNCE_BYTES:
        raise InvalidInput(f"the message is larger than {MAX_BOUNCE_BYTES} bytes")
    return await run_in_threadpool(_ingest_bounce, ctx, raw)


def _ingest_bounce(ctx: WebContext, raw: bytes) -> dict[str, Any]:
    rt = ctx.runtime
    with ctx.transaction() as s:
        applied = feedback.ingest_message(
            s,
            raw,
            signer=rt.links.signer,
            message_ids=rt.message_ids,
            verp=rt.verp,
            policy=rt.feedback_policy,
            source="webhook",
            trusted=True,  # the operator's bearer token: it may name readers by address
        )
        return {"events": [a.as_dict() for a in applied]}
