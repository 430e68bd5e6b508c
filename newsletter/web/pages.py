"""Public pages: subscribe (double opt-in), confirm, unsubscribe (with RFC 8058 one-click),
preferences, the archive and its Atom feed, and the health check.

Every link carries the subscription's opaque token signed for one purpose; a GET never
changes anything (mail scanners fetch links), a POST does. Handlers parse the form in the
event loop and do their database work in the thread pool.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from newsletter import subscriptions
from newsletter.addresses import check_text, normalize_email
from newsletter.compose import format_issue_date
from newsletter.errors import InvalidInput, NotFound
from newsletter.models import (
    Article,
    Issue,
    IssueArticle,
    IssueStatus,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.placeholders import Markers
from newsletter.tokens import Purpose
from newsletter.web import archive
from newsletter.web.context import PAGE_HEADERS, WebContext, client_ip, sentence, web_context
from newsletter.web.forms import Form, form_problem
from newsletter.web.ids import IssueId

log = logging.getLogger(__name__)

router = APIRouter()

MAX_FORM_BYTES = 64 * 1024
HONEYPOT = "website"
ONE_CLICK = "One-Click"
FEED_ENTRIES = 20


async def read_form(request: Request) -> Form:
    """The body of a form POST, urlencoded or multipart. A missing, oversized or malformed
    body reads as an empty form: the unsubscribe POST must work whatever a client sends."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        return Form({})
    try:
        data = await request.form(max_files=0, max_fields=200)
    except Exception:  # malformed multipart or urlencoded body
        return Form({})
    fields: dict[str, list[str]] = {}
    for key, value in data.multi_items():
        if isinstance(value, str):
            fields.setdefault(key, []).append(value)
    return Form(fields)


def _sections_view(available: list[str], chosen: list[str] | None) -> list[dict[str, Any]]:
    return [{"name": name, "checked": chosen is None or name in chosen} for name in available]


def _chosen_sections(form: Form, available: list[str]) -> list[str] | None:
    """The ticked sections among the list's own; every one ticked (or none offered) means
    every section, also those added later."""
    picked = [s for s in available if s in set(form.all("sections"))]
    if not available or set(picked) == set(available):
        return None
    return picked


# --- subscribe -----------------------------------------------------------------------------


def _list_page_data(ctx: WebContext, slug: str) -> tuple[str, list[str]]:
    with ctx.transaction() as s:
        mlist = subscriptions.get_list(s, slug)
        return mlist.name, subscriptions.list_sections(s, mlist.id)


@router.get("/subscribe/{slug}", response_class=HTMLResponse, tags=["public pages"])
def subscribe_form(slug: str, ctx: WebContext = Depends(web_context)) -> HTMLResponse:
    """The subscribe form: email, name, sections."""
    list_name, sections = _list_page_data(ctx, slug)
    return _subscribe_page(ctx, slug, list_name, sections, email="", chosen=None)


def _subscribe_page(
    ctx: WebContext,
    slug: str,
    list_name: str,
    sections: list[str],
    *,
    email: str,
    chosen: list[str] | None,
    error: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    return ctx.render(
        "subscribe.html",
        status=status,
        title=f"Subscribe to {list_name}",
        list_name=list_name,
        action=f"/subscribe/{slug}",
        archive_url=f"/archive/{slug}",
        sections=_sections_view(sections, chosen),
        email=email,
        error=error,
    )


@router.post("/subscribe/{slug}", response_class=HTMLResponse, tags=["public pages"])
async def subscribe(
    slug: str,
    request: Request,
    background: BackgroundTasks,
    ctx: WebContext = Depends(web_context),
) -> HTMLResponse:
    """Record a pending subscription and send one confirmation email. The answer is the
    same whether the address was new, pending, active or erased."""
    form = await read_form(request)
    return await run_in_threadpool(_subscribe, ctx, slug, form, client_ip(request), background)


def _subscribe(
    ctx: WebContext, slug: str, form: Form, ip: str, background: BackgroundTasks
) -> HTMLResponse:
    list_name, sections = _list_page_data(ctx, slug)
    limits = ctx.limits
    if not ctx.limiter.hit(f"ip:{ip}", limits.per_ip, limits.ip_window):
        return ctx.error_page(
            429,
            "Too many requests",
            "This form was used too often from your network. Please try again later.",
        )
    done = ctx.render(
        "check_inbox.html", title=f"Check your inbox - {list_name}", list_name=list_name
    )
    if form.get(HONEYPOT):
        return done  # a bot filled the hidden field: answer as usual, do nothing
    # No name is kept from here: whoever posts the form may not own the address, so the
    # reader names themselves on the confirm page (reached only through their mailbox).
    raw_email = form.get("email").strip()
    chosen = _chosen_sections(form, sections) or None  # nothing ticked: every section
    try:
        address = normalize_email(raw_email)
        check_text(form.get("name").strip(), "name")  # an old form's name: refused if bad
    except InvalidInput as exc:
        return _subscribe_page(
            ctx,
            slug,
            list_name,
            sections,
            email=raw_email[:320],
            chosen=chosen,
            error=sentence(str(exc)),
            status=400,
        )
    try:
        with ctx.transaction() as s:
            sub = subscriptions.request_subscription(
                s,
                slug,
                address,
                name=None,
                sections=chosen,
                suppression_key=ctx.runtime.suppression_key,
                source="page",
            )
            subscription_id = sub.id if sub is not None else None
    except IntegrityError:
        # The same address posted twice at the same moment: the other request records it.
        return done
    if subscription_id is None:
        return done
    who = ctx.address_key(address)
    if ctx.limiter.hit(
        f"confirm:{slug}:{who}", limits.per_address, limits.address_window
    ) and ctx.limiter.hit(f"confirm:*:{who}", limits.per_address_all_lists, limits.address_window):
        # After the response has gone out: to a worker, or sent here.
        background.add_task(ctx.dispatcher.confirmation, subscription_id)
    return done


# --- confirm ---------------------------------------------------------------------------------


def _by_token(s: Session, ctx: WebContext, purpose: Purpose, signed: str) -> Subscription:
    return subscriptions.subscription_by_token(s, ctx.verify(purpose, signed))


def _list_name(s: Session, sub: Subscription) -> str:
    mlist = s.get(MailingList, sub.list_id)
    assert mlist is not None
    return mlist.name


@router.get("/confirm/{signed}", response_class=HTMLResponse, tags=["public pages"])
def confirm_page(signed: str, ctx: WebContext = Depends(web_context)) -> HTMLResponse:
    """A page with a button (or, when not pending, what the reader's status is); changes
    nothing."""
    with ctx.transaction() as s:
        sub = _by_token(s, ctx, Purpose.CONFIRM, signed)
        return _confirm_view(s, ctx, signed, sub, sub.status)


def _confirm_view(
    s: Session,
    ctx: WebContext,
    signed: str,
    sub: Subscription,
    state: SubscriptionStatus,
    status: int = 200,
    *,
    typed: str | None = None,
    error: str | None = None,
) -> HTMLResponse:
    list_name = _list_name(s, sub)
    person = s.get(Subscriber, sub.subscriber_id)
    return ctx.render(
        "confirm.html",
        status=status,
        title=f"Confirm your subscription - {list_name}",
        list_name=list_name,
        state=state.value,
        name=(typed if typed is not None else (person.name if person else None) or "")[:200],
        error=error,
        action=f"/confirm/{signed}",
        unsubscribe_action=ctx.path(Purpose.UNSUBSCRIBE, sub.token),
        preferences_url=ctx.path(Purpose.PREFERENCES, sub.token),
    )


@router.post("/confirm/{signed}", response_class=HTMLResponse, tags=["public pages"])
async def confirm(
    signed: str, request: Request, ctx: WebContext = Depends(web_context)
) -> HTMLResponse:
    """Activate a pending subscription, with the name the reader typed on this page (the
    only place a new reader's name comes from: the link proves they own the mailbox). Any
    other status is left as it is (a replayed link never brings back a reader who left,
    bounced or complained); the page says which."""
    form = await read_form(request)
    return await run_in_threadpool(_confirm, ctx, signed, form)


def _confirm(ctx: WebContext, signed: str, form: Form) -> HTMLResponse:
    with ctx.transaction() as s:
        sub = _by_token(s, ctx, Purpose.CONFIRM, signed)
        if sub.status != SubscriptionStatus.PENDING:
            left = sub.status != SubscriptionStatus.ACTIVE
            return _confirm_view(s, ctx, signed, sub, sub.status, 409 if left else 200)
        if "name" in form.fields:  # a bare POST (no name field) keeps the stored name
            try:
                with s.begin_nested():
                    subscriptions.set_preferences(
                        s,
                        sub,
                        name=form.get("name"),
                        sections=subscriptions.chosen_sections(sub),
                        paused=sub.paused,
                        source="page",
                    )
            except InvalidInput as exc:
                return _confirm_view(
                    s,
                    ctx,
                    signed,
                    sub,
                    sub.status,
                    400,
                    typed=form.get("name"),
                    error=sentence(str(exc)),
                )
        # The reader's own new consent: an erased or suppressed address is let back in.
        subscriptions.lift_suppression(s, sub, suppression_key=ctx.runtime.suppression_key)
        subscriptions.set_status(s, sub, SubscriptionStatus.ACTIVE, "page")
        list_name = _list_name(s, sub)
        preferences = ctx.path(Purpose.PREFERENCES, sub.token)
    return ctx.render(
        "confirmed.html",
        title=f"Subscribed - {list_name}",
        list_name=list_name,
        heading="You are subscribed",
        message=f"Thank you. The next issue of {list_name} will reach your inbox.",
        preferences_url=preferences,
    )


# --- unsubscribe -------------------------------------------------------------------------------


_STOPPED = (SubscriptionStatus.BOUNCED, SubscriptionStatus.COMPLAINED)


def _receiving(sub: Subscription) -> bool:
    return sub.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)


@router.get("/unsubscribe/{signed}", response_class=HTMLResponse, tags=["public pages"])
def unsubscribe_page(signed: str, ctx: WebContext = Depends(web_context)) -> HTMLResponse:
    """The list's name and a button; changes nothing."""
    with ctx.transaction() as s:
        sub = _by_token(s, ctx, Purpose.UNSUBSCRIBE, signed)
        list_name = _list_name(s, sub)
        subscribed = _receiving(sub)
        stopped = sub.status in _STOPPED
        preferences = ctx.path(Purpose.PREFERENCES, sub.token)
    return ctx.render(
        "unsubscribe.html",
        title=f"Unsubscribe - {list_name}",
        list_name=list_name,
        subscribed=subscribed,
        stopped=stopped,
        action=f"/unsubscribe/{signed}",
        preferences_url=preferences,
    )


@router.post("/unsubscribe/{signed}", response_class=HTMLResponse, tags=["public pages"])
async def unsubscribe(
    signed: str, request: Request, ctx: WebContext = Depends(web_context)
) -> HTMLResponse:
    """Unsubscribe, from the page's button or from a mail client's one-click button
    (RFC 8058: body `List-Unsubscribe=One-Click`, no cookie, no redirect, answers 200).
    Repeating it is harmless. The page's `action=resubscribe` undoes it."""
    form = await read_form(request)
    return await run_in_threadpool(_unsubscribe, ctx, signed, form)


def _unsubscribe(ctx: WebContext, signed: str, form: Form) -> HTMLResponse:
    one_click = form.get("List-Unsubscribe") == ONE_CLICK
    resubscribe = not one_click and form.get("action") == "resubscribe"
    with ctx.transaction() as s:
        sub = _by_token(s, ctx, Purpose.UNSUBSCRIBE, signed)
        list_name = _list_name(s, sub)
        preferences = ctx.path(Purpose.PREFERENCES, sub.token)
        unconfirmed = sub.status == SubscriptionStatus.PENDING
        stopped = sub.status in _STOPPED  # by a bounce or a complaint: not the reader's undo
        if resubscribe and not unconfirmed and not stopped:
            subscriptions.set_status(s, sub, SubscriptionStatus.ACTIVE, "page")
        elif not resubscribe and not stopped:
            subscriptions.set_status(
                s, sub, SubscriptionStatus.UNSUBSCRIBED, "one-click" if one_click else "page"
            )
    if resubscribe and stopped:
        why = "bounced" if sub.status == SubscriptionStatus.BOUNCED else "complained"
        return ctx.render(
            "confirmed.html",
            status=409,
            title=f"Not subscribed - {list_name}",
            list_name=list_name,
            heading="This link cannot subscribe you again",
            message=(
                f"{list_name} stopped because mail to your address bounced."
                if why == "bounced"
                else f"{list_name} stopped because you reported it as spam."
            )
            + " Nothing was changed.",
            preferences_url=preferences,
        )
    if resubscribe and unconfirmed:  # joining takes the emailed confirmation link
        return ctx.render(
            "confirmed.html",
            status=409,
            title=f"Confirm first - {list_name}",
            list_name=list_name,
            heading="Please confirm your subscription first",
            message=f"Open the confirmation link we emailed you to start receiving {list_name}.",
            preferences_url=preferences,
        )
    if resubscribe:
        return ctx.render(
            "confirmed.html",
            title=f"Subscribed again - {list_name}",
            list_name=list_name,
            heading="Welcome back",
            message=f"You are subscribed to {list_name} again.",
            preferences_url=preferences,
        )
    return ctx.render(
        "unsubscribed.html",
        title=f"Unsubscribed - {list_name}",
        list_name=list_name,
        action=f"/unsubscribe/{signed}",
        preferences_url=preferences,
    )


# --- preferences -------------------------------------------------------------------------------


@router.get("/preferences/{signed}", response_class=HTMLResponse, tags=["public pages"])
def preferences_page(signed: str, ctx: WebContext = Depends(web_context)) -> HTMLResponse:
    """Name, sections, pause and unsubscribe; changes nothing."""
    with ctx.transaction() as s:
        return _preferences_view(s, ctx, signed, _by_token(s, ctx, Purpose.PREFERENCES, signed))


def _preferences_view(
    s: Session,
    ctx: WebContext,
    signed: str,
    sub: Subscription,
    *,
    saved: bool = False,
    error: str | None = None,
    status: int = 200,
    form: Form | None = None,
) -> HTMLResponse:
    person = s.get(Subscriber, sub.subscriber_id)
    list_name = _list_name(s, sub)
    available = subscriptions.list_sections(s, sub.list_id)
    if form is not None:  # show what was typed, not what is stored
        name = form.get("name")
        chosen: list[str] | None = form.all("sections")
        paused = form.get("paused") == "1"
    else:
        name = (person.name if person else None) or ""
        chosen = subscriptions.chosen_sections(sub)
        paused = sub.paused
    return ctx.render(
        "preferences.html",
        status=status,
        title=f"Preferences - {list_name}",
        list_name=list_name,
        action=f"/preferences/{signed}",
        unsubscribe_action=ctx.path(Purpose.UNSUBSCRIBE, sub.token),
        subscribed=_receiving(sub),
        stopped=sub.status in _STOPPED,
        name=name[:200],
        sections=_sections_view(available, chosen),
        paused=paused,
        saved=saved,
        error=error,
    )


@router.post("/preferences/{signed}", response_class=HTMLResponse, tags=["public pages"])
async def preferences(
    signed: str, request: Request, ctx: WebContext = Depends(web_context)
) -> HTMLResponse:
    """Save name, sections and pause."""
    form = await read_form(request)
    return await run_in_threadpool(_preferences, ctx, signed, form)


def _preferences(ctx: WebContext, signed: str, form: Form) -> HTMLResponse:
    with ctx.transaction() as s:
        sub = _by_token(s, ctx, Purpose.PREFERENCES, signed)
        available = subscriptions.list_sections(s, sub.list_id)
        problem = form_problem(form, available)
        if problem is not None:
            return _preferences_view(s, ctx, signed, sub, error=problem, status=400)
        if form.get("sections_shown") and available:
            sections = _chosen_sections(form, available)
            if sections == []:
                return _preferences_view(
                    s,
                    ctx,
                    signed,
                    sub,
                    error="Tick at least one section, or pause instead.",
                    status=400,
                    form=form,
                )
        else:
            sections = subscriptions.chosen_sections(sub)
        try:
            with s.begin_nested():
                subscriptions.set_preferences(
                    s,
                    sub,
                    name=form.get("name"),
                    sections=sections,
                    paused=form.get("paused") == "1",
                    source="page",
                )
        except InvalidInput as exc:
            s.refresh(sub)
            return _preferences_view(
                s, ctx, signed, sub, error=sentence(str(exc)), status=400, form=form
            )
        return _preferences_view(s, ctx, signed, sub, saved=True)


# --- archive -----------------------------------------------------------------------------------


def _sent_issues(s: Session, mlist: MailingList, limit: int | None = None) -> list[Issue]:
    query = (
        select(Issue)
        .where(Issue.list_id == mlist.id, Issue.status == IssueStatus.SENT)
        .order_by(Issue.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    return list(s.scalars(query))


def _sent_on(issue: Issue) -> Any:
    return issue.send_started_at or issue.created_at


@router.get("/archive/{slug}", response_class=HTMLResponse, tags=["public pages"])
def archive_index(slug: str, ctx: WebContext = Depends(web_context)) -> HTMLResponse:
    """Every sent issue of a list, newest first."""
    with ctx.transaction() as s:
        mlist = subscriptions.get_list(s, slug)
        items = [
            {
                "url": f"/archive/{slug}/{issue.id}",
                "subject": issue.subject,
                "date": format_issue_date(_sent_on(issue).date()),
            }
            for issue in _sent_issues(s, mlist)
        ]
        list_name = mlist.name
    return ctx.render(
        "archive.html",
        title=f"{list_name}: past issues",
        list_name=list_name,
        issues=items,
        subscribe_url=f"/subscribe/{slug}",
        feed_url=f"/archive/{slug}/feed.xml",
    )


@router.get("/archive/{slug}/feed.xml", tags=["public pages"])
def archive_feed(slug: str, ctx: WebContext = Depends(web_context)) -> Response:
    """The list's sent issues as an Atom feed."""
    base = ctx.runtime.settings.base_url
    with ctx.transaction() as s:
        mlist = subscriptions.get_list(s, slug)
        issues = _sent_issues(s, mlist, FEED_ENTRIES)
        titles = _titles(s, [i.id for i in issues])
        entries = [
            archive.FeedEntry(
                title=issue.subject,
                url=f"{base}/archive/{slug}/{issue.id}",
                updated=issue.finished_at or _sent_on(issue),
                summary=" · ".join(titles.get(issue.id, [])),
            )
            for issue in issues
        ]
        body = archive.atom_feed(
            title=mlist.name,
            feed_url=f"{base}/archive/{slug}/feed.xml",
            site_url=f"{base}/archive/{slug}",
            updated=entries[0].updated if entries else mlist.created_at,
            entries=entries,
        )
    return Response(body, media_type="application/atom+xml; charset=utf-8")


def _titles(s: Session, issue_ids: list[int]) -> dict[int, list[str]]:
    titles: dict[int, list[str]] = {}
    if not issue_ids:
        return titles
    rows = s.execute(
        select(IssueArticle.issue_id, Article.title)
        .join(Article, Article.id == IssueArticle.article_id)
        .where(IssueArticle.issue_id.in_(issue_ids))
        .order_by(IssueArticle.issue_id, IssueArticle.position)
    ).all()
    for issue_id, title in rows:
        titles.setdefault(issue_id, []).append(title)
    return titles


@router.get("/archive/{slug}/{issue_id}", response_class=HTMLResponse, tags=["public pages"])
def archive_issue(
    slug: str, issue_id: IssueId, ctx: WebContext = Depends(web_context)
) -> HTMLResponse:
    """One sent issue as readers got it, without anyone's personal links."""
    with ctx.transaction() as s:
        mlist = subscriptions.get_list(s, slug)
        issue = s.get(Issue, issue_id)
        if issue is None or issue.list_id != mlist.id or issue.status != IssueStatus.SENT:
            raise NotFound(f"{mlist.name} has no sent issue {issue_id}")
        html = archive.public_html(
            issue.html,
            markers=Markers(issue.marker_key),
            subscribe_url=f"{ctx.runtime.settings.base_url}/subscribe/{slug}",
            index_url=f"/archive/{slug}",
            list_name=mlist.name,
        )
    return HTMLResponse(html, headers=PAGE_HEADERS)


# --- health --------------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"])
def healthz(ctx: WebContext = Depends(web_context)) -> JSONResponse:
    """The database and the broker are reachable: 200, else 503 naming what is not."""
    checks: dict[str, str] = {}
    try:
        with ctx.runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    broker = ctx.runtime.settings.broker_url
    if not broker:
        checks["broker"] = "not configured (in-process delivery)"
    else:
        try:
            import redis

            client = redis.Redis.from_url(broker, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unreachable ({type(exc).__name__})"
    healthy = checks["database"] == "ok" and not checks["broker"].startswith("unreachable")
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", **checks},
        status_code=200 if healthy else 503,
        headers={"Cache-Control": "no-store"},
    )
