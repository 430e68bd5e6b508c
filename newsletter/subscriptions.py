"""Lists and subscriptions: create, add, export, unsubscribe, preferences, erase (the CSV
import is imports.py).

Functions take an open Session and flush but never commit: the caller (CLI command, web
request, task) owns the transaction, so a failure anywhere rolls back everything.
"""

from __future__ import annotations

import csv
import re
import secrets
from collections.abc import Iterator
from typing import IO

from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session

from newsletter.addresses import (
    address_key,
    check_text,
    normalize_email,
    parse_from_address,
)
from newsletter.erasure import forget_address
from newsletter.errors import Conflict, InvalidInput, NotFound
from newsletter.models import (
    Article,
    Event,
    Issue,
    IssueArticle,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
    sections_key,
    sections_of,
    utcnow,
)
from newsletter.readers import find_subscriber, subscription_for_token
from newsletter.suppression import (
    ERASED,
    lift,
    reason_for,
    refusal,
    suppress,
)
from newsletter.suppression import suppression_hash as suppression_hash  # re-exported

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def new_token() -> str:
    """The opaque per-subscription value that links carry (signed) instead of an address."""
    return secrets.token_urlsafe(16)


def log_event(
    session: Session,
    kind: str,
    source: str,
    *,
    subscriber_id: int | None,
    list_id: int | None,
    detail: str | None = None,
) -> None:
    session.add(
        Event(
            kind=kind,
            source=source,
            subscriber_id=subscriber_id,
            list_id=list_id,
            detail=detail[:500] if detail else None,
        )
    )


# --- lists ---


def create_list(
    session: Session, slug: str, name: str, from_address: str, reply_to: str | None = None
) -> MailingList:
    if not SLUG.match(slug):
        raise InvalidInput(
            f"invalid list slug {slug!r}: use lower-case letters, digits and '-' (max 63)"
        )
    check_text(name, "list name")
    if not name.strip():
        raise InvalidInput("list name is empty")
    display, addr = parse_from_address(from_address)
    reply = parse_from_address(reply_to)[1] if reply_to else None
    if session.scalar(select(MailingList.id).where(MailingList.slug == slug)) is not None:
        raise Conflict(f"list {slug!r} already exists")
    mlist = MailingList(
        slug=slug,
        name=name.strip(),
        from_address=f"{display} <{addr}>" if display else addr,
        reply_to=reply,
    )
    session.add(mlist)
    session.flush()
    return mlist


def get_list(session: Session, slug: str) -> MailingList:
    mlist = session.scalar(select(MailingList).where(MailingList.slug == slug))
    if mlist is None:
        raise NotFound(f"unknown list {slug!r}")
    return mlist


def list_counts(session: Session) -> list[tuple[MailingList, dict[str, int]]]:
    rows = session.execute(
        select(Subscription.list_id, Subscription.status, func.count()).group_by(
            Subscription.list_id, Subscription.status
        )
    ).all()
    counts: dict[int, dict[str, int]] = {}
    for list_id, status, n in rows:
        counts.setdefault(list_id, {})[SubscriptionStatus(status).value] = n
    lists = session.scalars(select(MailingList).order_by(MailingList.slug)).all()
    return [(m, counts.get(m.id, {})) for m in lists]


# --- single subscriber ---


def add_subscriber(
    session: Session,
    email: str,
    list_slug: str,
    *,
    name: str | None = None,
    confirmed: bool = False,
    source: str = "operator",
    suppression_key: str,
) -> Subscription:
    """Add (or update) one subscriber on a list.

    Someone who unsubscribed, bounced or complained is not put back by an operator: they
    must resubscribe themselves, which is what consent means.
    """
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    if name is not None:
        name = check_text(name.strip(), "name") or None
    suppressed = reason_for(session, address, suppression_key)
    if suppressed is not None:
        raise Conflict(refusal(address, suppressed))
    subscriber = find_subscriber(session, address)
    if subscriber is None:
        subscriber = Subscriber(email=address, name=name)
        session.add(subscriber)
        session.flush()
    # An existing reader keeps their name: only they change it (preferences page).
    sub = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber.id, Subscription.list_id == mlist.id
        )
    )
    now = utcnow()
    if sub is None:
        status = SubscriptionStatus.ACTIVE if confirmed else SubscriptionStatus.PENDING
        sub = Subscription(
            subscriber_id=subscriber.id,
            list_id=mlist.id,
            status=status,
            token=new_token(),
            soft_bounces=0,
            paused=False,
            created_at=now,
            updated_at=now,
            confirmed_at=now if confirmed else None,
        )
        session.add(sub)
        session.flush()
        log_event(
            session,
            "subscribed" if not confirmed else "confirmed",
            source,
            subscriber_id=subscriber.id,
            list_id=mlist.id,
        )
        return sub
    if sub.status in (
        SubscriptionStatus.UNSUBSCRIBED,
        SubscriptionStatus.BOUNCED,
        SubscriptionStatus.COMPLAINED,
    ):
        raise Conflict(
            f"{address} is {sub.status.value} on {list_slug!r}; only the reader can resubscribe"
        )
    if confirmed and sub.status == SubscriptionStatus.PENDING:
        sub.status = SubscriptionStatus.ACTIVE
        sub.confirmed_at = sub.updated_at = now
        log_event(session, "confirmed", source, subscriber_id=subscriber.id, list_id=mlist.id)
    session.flush()
    return sub


def find_subscription(session: Session, email: str, list_slug: str) -> Subscription:
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    sub = session.scalar(
        select(Subscription)
        .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
        .where(Subscriber.email_key == address_key(address), Subscription.list_id == mlist.id)
    )
    if sub is None:
        raise NotFound(f"{address} is not on list {list_slug!r}")
    return sub


def set_status(
    session: Session, sub: Subscription, status: SubscriptionStatus, source: str
) -> bool:
    """The one transition function for subscription status. Returns False if unchanged."""
    if sub.status == status:
        return False
    now = utcnow()
    previous = sub.status
    sub.status = status
    sub.updated_at = now
    if status == SubscriptionStatus.ACTIVE:
        sub.confirmed_at = sub.confirmed_at or now
        sub.unsubscribed_at = None
    elif status in (
        SubscriptionStatus.UNSUBSCRIBED,
        SubscriptionStatus.BOUNCED,
        SubscriptionStatus.COMPLAINED,
    ):
        sub.unsubscribed_at = now
    kind = {
        SubscriptionStatus.ACTIVE: "confirmed" if previous == "pending" else "resubscribed",
        SubscriptionStatus.UNSUBSCRIBED: "unsubscribed",
        SubscriptionStatus.BOUNCED: "bounced",
        SubscriptionStatus.COMPLAINED: "complained",
        SubscriptionStatus.PENDING: "pending",
    }[status]
    log_event(session, kind, source, subscriber_id=sub.subscriber_id, list_id=sub.list_id)
    session.flush()
    return True


def unsubscribe(session: Session, email: str, list_slug: str, *, source: str) -> bool:
    sub = find_subscription(session, email, list_slug)
    return set_status(session, sub, SubscriptionStatus.UNSUBSCRIBED, source)


def erase_subscriber(session: Session, email: str, *, suppression_key: str, source: str) -> int:
    """Remove every personal datum of an address; keep a keyed hash so it stays out."""
    address = normalize_email(email)
    subscriber = find_subscriber(session, address)
    if subscriber is None:
        raise NotFound(f"{address} is not a subscriber")
    suppress(session, address, suppression_key, ERASED)
    n = len(
        session.scalars(
            select(Subscription.id).where(Subscription.subscriber_id == subscriber.id)
        ).all()
    )
    # Replies, errors, reasons and event details that quote the address lose it.
    forget_address(session, address, [subscriber.id])
    log_event(session, "erased", source, subscriber_id=None, list_id=None)
    session.delete(subscriber)  # subscriptions cascade; deliveries and events keep no link
    session.flush()
    return n


# --- export and listing ---

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection): prefix a quote to risky cells."""
    return "'" + value if value.startswith(_FORMULA_START) else value


EXPORT_COLUMNS = ("email", "name", "status", "subscribed_at", "confirmed_at")


def iter_subscriptions(
    session: Session,
    list_slug: str,
    *,
    status: SubscriptionStatus | None = None,
    after_id: int = 0,
    limit: int | None = None,
) -> Iterator[tuple[Subscription, Subscriber]]:
    """Keyset-paged walk over a list's subscriptions in id order (never loads the list into
    memory). Each page reads its own rows from the (list_id, status, id) index: for one
    status, one range of it; for all, the next ids of each status, merged. No (list_id, id)
    index is kept for the second (migration 0008): every imported reader filled it, ~1 s
    per million, and a page of a few statuses' ranges costs as little."""
    mlist = get_list(session, list_slug)
    page = 2000 if limit is None else min(limit, 2000)
    remaining = limit
    last = after_id
    statuses = list(SubscriptionStatus) if status is None else [status]
    while remaining is None or remaining > 0:
        wanted = page if remaining is None else min(page, remaining)
        ranges = [
            select(Subscription.id)
            .where(
                Subscription.list_id == mlist.id,
                Subscription.status == one,
                Subscription.id > last,
            )
            .order_by(Subscription.id)
            .limit(wanted)
            for one in statuses
        ]
        if len(ranges) > 1:
            merged = union_all(*(select(r.subquery().c.id) for r in ranges)).subquery()
            ranges = [select(merged.c.id).order_by(merged.c.id).limit(wanted)]
        query = (
            select(Subscription, Subscriber)
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(Subscription.id.in_(ranges[0].scalar_subquery()))
            .order_by(Subscription.id)
        )
        batch = session.execute(query).all()
        yield from batch
        if len(batch) < wanted:
            # The end of the list: asking again would only scan to its end once more.
            return
        last = batch[-1][0].id
        if remaining is not None:
            remaining -= len(batch)


def export_csv(session: Session, list_slug: str, out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(EXPORT_COLUMNS)
    n = 0
    for sub, person in iter_subscriptions(session, list_slug):
        writer.writerow(
            [
                csv_safe(person.email),
                csv_safe(person.name or ""),
                sub.status.value,
                sub.created_at.isoformat() if sub.created_at else "",
                sub.confirmed_at.isoformat() if sub.confirmed_at else "",
            ]
        )
        n += 1
    return n


# --- preferences ---


def subscription_by_token(session: Session, token: str) -> Subscription:
    """The subscription a (verified) link token names."""
    sub = subscription_for_token(session, token)
    if sub is None:
        raise NotFound("this link does not match any subscription")
    return sub


def list_sections(session: Session, list_id: int) -> list[str]:
    """The sections a list has carried: those of the articles in its issues."""
    return sorted(
        session.scalars(
            select(Article.section)
            .join(IssueArticle, IssueArticle.article_id == Article.id)
            .join(Issue, Issue.id == IssueArticle.issue_id)
            .where(Issue.list_id == list_id)
            .distinct()
        )
    )


def chosen_sections(sub: Subscription) -> list[str] | None:
    """The reader's section choice; None means every section (also future ones)."""
    return sections_of(sub.sections)


def set_preferences(
    session: Session,
    sub: Subscription,
    *,
    name: str | None,
    sections: list[str] | None,
    paused: bool,
    source: str,
) -> None:
    """Update a reader's name, section choice (None: all) and pause flag, logging changes."""
    if name is not None:
        name = check_text(name.strip(), "name") or None
        person = session.get(Subscriber, sub.subscriber_id)
        if person is not None and person.name != name:
            person.name = name
    if sections is not None:
        for section in sections:
            check_text(section, "section")
    key = sections_key(sections)
    changes = []
    if key != sub.sections:
        sub.sections = key
        changes.append(
            "sections=" + ("all" if key is None else ", ".join(sections or []) or "none")
        )
    if paused != sub.paused:
        sub.paused = paused
        changes.append("paused" if paused else "resumed")
    if changes:
        sub.updated_at = utcnow()
        log_event(
            session,
            "preferences",
            source,
            subscriber_id=sub.subscriber_id,
            list_id=sub.list_id,
            detail="; ".join(changes),
        )
    session.flush()


# --- the public subscribe form (double opt-in) ---


def lift_suppression(session: Session, sub: Subscription, *, suppression_key: str) -> bool:
    """A pending subscription is being confirmed by its reader's link: a new consent, which
    lets an erased or suppressed address in again. True if it was suppressed."""
    person = session.get(Subscriber, sub.subscriber_id)
    return person is not None and lift(session, person.email, suppression_key)


def request_subscription(
    session: Session,
    list_slug: str,
    email: str,
    *,
    name: str | None,
    sections: list[str] | None,
    suppression_key: str,
    source: str = "page",
) -> Subscription | None:
    """Record a reader's request to join a list; confirmation by link comes later.

    Returns the subscription a confirmation email should go to, or None when none should:
    the address is already active or complained. An erased address gets one: confirming it
    is the new consent that lets the address back in. The caller answers the same
    in every case, so the form cannot tell who subscribes. Nothing that a stranger could
    abuse changes: no name is kept from a form (the reader names themselves when confirming),
    and a reader who left stays out until they press "Subscribe again" on the page the new
    link opens (only their section choice is recorded).
    """
    mlist = get_list(session, list_slug)
    address = normalize_email(email)
    if name is not None:
        name = check_text(name.strip(), "name") or None
    for section in sections or []:
        check_text(section, "section")
    # An erased or suppressed address may ask again: this is the new consent that lets it
    # back in, once confirmed by link (the confirmation lifts the suppression).
    subscriber = find_subscriber(session, address)
    if subscriber is None:
        subscriber = Subscriber(email=address, name=name)
        session.add(subscriber)
        session.flush()
    sub = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber.id, Subscription.list_id == mlist.id
        )
    )
    now = utcnow()
    if sub is None:
        sub = Subscription(
            subscriber_id=subscriber.id,
            list_id=mlist.id,
            status=SubscriptionStatus.PENDING,
            token=new_token(),
            sections=sections_key(sections),
            soft_bounces=0,
            paused=False,
            created_at=now,
            updated_at=now,
        )
        session.add(sub)
        session.flush()
        log_event(session, "subscribed", source, subscriber_id=subscriber.id, list_id=mlist.id)
        return sub
    if sub.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.COMPLAINED):
        return None
    key = sections_key(sections)
    if key != sub.sections:
        sub.sections = key
        sub.updated_at = now
    session.flush()
    return sub
