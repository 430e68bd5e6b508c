"""Apply bounces, complaints and mailed unsubscribes to the subscriptions (the policy).

The events come from :mod:`newsletter.bounces` (pure); this module finds whom they are about
and decides, inside the caller's transaction (it flushes, never commits):

* one hard bounce suppresses the address at once: every active or pending subscription of
  the subscriber becomes ``bounced`` (the address does not work, whatever the list), whether
  a DSN reported it or our own SMTP connection drew a 5xx at RCPT (:func:`apply_rejection`);
* one complaint suppresses the address at once on every list (``complained``); and a send
  whose rate of verified complaints passes ``FeedbackPolicy.complaint_pause_rate`` (0.3 %,
  the Gmail and Yahoo ceiling) pauses itself (:mod:`newsletter.feedback_figures`);
* soft bounces count, per subscription; the ``soft_bounce_limit``-th (5) without a delivery
  in between suppresses (``bounced``). A delivery in between means a later message to the
  reader that was sent and drew no bounce, or a positive DSN; either resets the count;
* a mail to the List-Unsubscribe ``mailto:`` whose signed token verifies unsubscribes;
* the same event twice changes nothing: each is recorded under a unique key in
  ``bounce_events`` (per delivery and kind when the delivery is known, else per report);
* a report acts only when it proves which of our messages it is about: a VERP address whose
  MAC verifies, or our Message-ID whose MAC verifies (:mod:`newsletter.provenance`) in the
  headers it returns; or when it came through the authenticated webhook (``trusted``). A
  mailed unsubscribe proves itself with its signed token. Anything else is stored as
  ``unverified``, counted in the issue's figures (``unverified_reports``), and changes no
  reader and pauses no send. One report proving one delivery changes that reader only,
  whatever other addresses it names.

Every status change goes through :func:`newsletter.subscriptions.set_status`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from newsletter.addresses import address_key
from newsletter.bounces import EventType, FeedbackEvent, Verp, parse, redact, smtp_rejection
from newsletter.feedback_figures import (
    EventOutcome,
    FeedbackPolicy,
    complaint_rate_exceeded,
    pause_for_complaints,
)
from newsletter.models import (
    BounceEvent,
    Delivery,
    DeliveryStatus,
    Issue,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.provenance import MessageIds, claimed_delivery
from newsletter.readers import subscription_for_token
from newsletter.subscriptions import set_status
from newsletter.suppression import suppress
from newsletter.tokens import LinkSigner, Purpose, TokenError

_CLAIMED_DELIVERY = re.compile(r"<d(\d{1,18})\.")


@dataclass
class AppliedEvent:
    event: FeedbackEvent
    outcome: EventOutcome
    subscriber_id: int | None = None
    issue_id: int | None = None
    delivery_id: int | None = None
    paused_issue: bool = False
    changed: list[int] = field(default_factory=list)  # subscription ids whose status changed

    def as_dict(self) -> dict[str, Any]:
        """The one JSON shape of an applied event: the bounce webhook's answer and each row of
        `newsletter bounces ingest --json` (docs/web.md)."""
        return {
            "type": self.event.type.value,
            "source": self.event.source,
            "status": self.event.status,
            "outcome": self.outcome.value,
            "subscriber": self.subscriber_id,
            "delivery": self.delivery_id,
            "issue": self.issue_id,
            "paused_issue": self.paused_issue,
            "summary": self.describe(),
        }

    def describe(self) -> str:
        if self.outcome is EventOutcome.UNVERIFIED:
            status = f" {self.event.status}" if self.event.status else ""
            return (
                f"{self.event.type.value}{status} ({self.event.source}): unverified, it proves "
                "no message of ours (no valid VERP address or Message-ID); nothing changed"
            )
        who = f"subscriber {self.subscriber_id}" if self.subscriber_id else "nobody known"
        where = f", delivery {self.delivery_id}" if self.delivery_id else ""
        status = f" {self.event.status}" if self.event.status else ""
        paused = f"; issue {self.issue_id} paused" if self.paused_issue else ""
        return f"{self.event.type.value}{status} ({self.event.source}) for {who}{where}: " + (
            f"{self.outcome.value}{paused}"
        )


@dataclass(frozen=True)
class Target:
    subscriber_id: int | None
    list_id: int | None  # None: the report does not say which list
    issue_id: int | None  # for an unverified report: the issue it claims, for the figures
    delivery_id: int | None
    verified: bool = True


_NOBODY = Target(None, None, None, None)


def ingest_message(
    session: Session,
    raw: bytes,
    *,
    signer: LinkSigner,
    message_ids: MessageIds,
    verp: Verp | None = None,
    policy: FeedbackPolicy | None = None,
    source: str | None = None,
    trusted: bool = False,
) -> list[AppliedEvent]:
    """Parse one returned mail and apply every event it carries. ``trusted``: it came
    through the authenticated webhook, and may name readers by address alone."""
    events = parse(raw, verp=verp)
    targets = [
        _find_target(session, event, signer, message_ids, trusted) if event.actionable else None
        for event in events
    ]
    targets = _one_reader_per_delivery(session, events, targets)
    return [
        apply_event(session, event, target=target, policy=policy, source=source)
        for event, target in zip(events, targets, strict=True)
    ]


def apply_event(
    session: Session,
    event: FeedbackEvent,
    *,
    target: Target | None,
    policy: FeedbackPolicy | None = None,
    source: str | None = None,
) -> AppliedEvent:
    """Apply one event to its target (see the module docstring for the policy). Flushes, no
    commit."""
    policy = policy or FeedbackPolicy()
    if not event.actionable or target is None:
        return AppliedEvent(event, EventOutcome.IGNORED)
    if not target.verified:
        return _store_unverified(session, event, target, source)
    applied = AppliedEvent(
        event,
        EventOutcome.UNMATCHED,
        subscriber_id=target.subscriber_id,
        issue_id=target.issue_id,
        delivery_id=target.delivery_id,
    )
    key = _event_key(event, target)
    if session.scalar(select(BounceEvent.id).where(BounceEvent.key == key)) is not None:
        applied.outcome = EventOutcome.DUPLICATE
        return applied
    record = BounceEvent(
        key=key,
        kind=event.type.value,
        source=(source or event.source)[:20],
        outcome=EventOutcome.UNMATCHED.value,
        issue_id=target.issue_id,
        delivery_id=target.delivery_id,
        status=event.status,
        detail=redact(event.diagnostic),
    )
    try:
        with session.begin_nested():
            session.add(record)
            session.flush()
    except IntegrityError:  # the same event applied concurrently
        applied.outcome = EventOutcome.DUPLICATE
        return applied
    if target.subscriber_id is not None:
        subscriptions = _subscriptions(session, target, event.type)
        if subscriptions:
            record.subscription_id = subscriptions[0].id
        applied.outcome = _APPLY[event.type](session, event, target, subscriptions, policy, applied)
    record.outcome = applied.outcome.value
    if (
        event.type is EventType.COMPLAINT
        and target.issue_id is not None
        and complaint_rate_exceeded(session, target.issue_id, policy) is not None
    ):
        applied.paused_issue = pause_for_complaints(session, target.issue_id, policy)
    session.flush()
    return applied


def apply_rejection(
    session: Session,
    delivery_id: int,
    code: int,
    reply: str,
    *,
    policy: FeedbackPolicy | None = None,
) -> AppliedEvent:
    """A 5xx our own SMTP connection drew at RCPT time: the same policy as a DSN saying the
    same (bounces.smtp_rejection), recorded as an event of the delivery's issue (so a DSN
    about the same delivery later is a duplicate), acting on every list as a hard bounce
    does. Flushes, no commit."""
    event = smtp_rejection(delivery_id, code, reply)
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return AppliedEvent(event, EventOutcome.UNMATCHED)
    target = _delivery_target(session, delivery)
    return apply_event(session, event, target=target, policy=policy, source="smtp")


# --- whom an event is about ----------------------------------------------------------------------


def _find_target(
    session: Session,
    event: FeedbackEvent,
    signer: LinkSigner,
    message_ids: MessageIds,
    trusted: bool,
) -> Target:
    """The delivery the report proves (a genuine VERP address, then our Message-ID with a
    valid MAC); for a mailed unsubscribe, the subscription its signed token names; for a
    trusted report, the recipient it names; else an unverified target."""
    delivery = None
    if event.delivery_id is not None:  # bounces.Verp verified its MAC
        delivery = session.get(Delivery, event.delivery_id)
    if delivery is None and event.message_id:
        delivery = _delivery_by_message_id(session, event.message_id, message_ids)
    if delivery is not None:
        return _delivery_target(session, delivery)
    if event.unsubscribe_token and (event.type is EventType.UNSUBSCRIBE or trusted):
        sub = _subscription_by_signed_token(session, signer, event.unsubscribe_token)
        if sub is not None:
            return Target(sub.subscriber_id, sub.list_id, None, None)
    if event.type is EventType.UNSUBSCRIBE:
        return _NOBODY  # only a genuine token unsubscribes
    if trusted:
        subscriber_id = _subscriber_by_address(session, event.recipient)
        if subscriber_id is not None:
            return Target(subscriber_id, _list_by_list_id(session, event.list_id), None, None)
        return _NOBODY
    return Target(None, None, _claimed_issue(session, event), None, verified=False)


def _delivery_target(session: Session, delivery: Delivery) -> Target:
    if delivery.subscriber_id is None:  # erased since: about nobody
        return Target(None, None, delivery.issue_id, delivery.id)
    list_id = session.scalar(select(Issue.list_id).where(Issue.id == delivery.issue_id))
    return Target(delivery.subscriber_id, list_id, delivery.issue_id, delivery.id)


def _subscriber_by_address(session: Session, address: str | None) -> int | None:
    if not address:
        return None
    return session.scalar(select(Subscriber.id).where(Subscriber.email_key == address_key(address)))


def _one_reader_per_delivery(
    session: Session, events: Sequence[FeedbackEvent], targets: list[Target | None]
) -> list[Target | None]:
    """A report proves one delivery; when it carries several events (a DSN naming several
    addresses) only the one about that delivery's reader acts, the others are unverified."""
    by_delivery: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        if target is not None and target.verified and target.delivery_id is not None:
            by_delivery.setdefault(target.delivery_id, []).append(index)
    result = list(targets)
    for delivery_id, indexes in by_delivery.items():
        if len(indexes) == 1:
            continue  # one event: about the proven delivery, whatever address it names
        email = session.scalar(
            select(Subscriber.email)
            .join(Delivery, Delivery.subscriber_id == Subscriber.id)
            .where(Delivery.id == delivery_id)
        )
        own = _key(email)
        keep = next((i for i in indexes if _key(events[i].recipient) == own), None)
        for index in indexes:
            target = targets[index]
            if index != keep and target is not None:
                result[index] = Target(None, None, target.issue_id, None, verified=False)
    return result


def _key(address: str | None) -> str | None:
    return address_key(address) if address else None


def _claimed_issue(session: Session, event: FeedbackEvent) -> int | None:
    """The issue an unverified report says it is about (the delivery its Message-ID names,
    else the last one to the address it names): only for the issue's figures."""
    if event.message_id and (found := _CLAIMED_DELIVERY.match(event.message_id)):
        issue_id = session.scalar(select(Delivery.issue_id).where(Delivery.id == int(found[1])))
        if issue_id is not None:
            return issue_id
    subscriber_id = _subscriber_by_address(session, event.recipient)
    if subscriber_id is None:
        return None
    return session.scalar(
        select(Delivery.issue_id)
        .where(Delivery.subscriber_id == subscriber_id)
        .order_by(Delivery.id.desc())
        .limit(1)
    )


def _store_unverified(
    session: Session, event: FeedbackEvent, target: Target, source: str | None
) -> AppliedEvent:
    applied = AppliedEvent(event, EventOutcome.UNVERIFIED, issue_id=target.issue_id)
    identity = f"{event.type.value}|unverified|{event.recipient}|{event.report_id}"
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()
    if session.scalar(select(BounceEvent.id).where(BounceEvent.key == key)) is not None:
        applied.outcome = EventOutcome.DUPLICATE
        return applied
    try:
        with session.begin_nested():
            session.add(
                BounceEvent(
                    key=key,
                    kind=event.type.value,
                    source=(source or event.source)[:20],
                    outcome=EventOutcome.UNVERIFIED.value,
                    issue_id=target.issue_id,
                    status=event.status,
                    detail=redact(event.diagnostic),
                )
            )
            session.flush()
    except IntegrityError:
        applied.outcome = EventOutcome.DUPLICATE
    return applied


def _delivery_by_message_id(
    session: Session, message_id: str, message_ids: MessageIds
) -> Delivery | None:
    """The delivery our Message-ID <d{delivery id}.{mac}@domain> names, if its MAC (over the
    delivery id and its issue's nonce) verifies."""
    claim = claimed_delivery(message_id)
    if claim is None:
        return None
    delivery_id, mac = claim
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return None
    nonce = session.scalar(select(Issue.nonce).where(Issue.id == delivery.issue_id))
    if nonce is None or not message_ids.verify(delivery_id, nonce, mac):
        return None
    return delivery


def _subscription_by_signed_token(
    session: Session, signer: LinkSigner, signed: str
) -> Subscription | None:
    try:
        token = signer.unsign(Purpose.UNSUBSCRIBE, signed)
    except TokenError:
        return None
    return subscription_for_token(session, token)


def _list_by_list_id(session: Session, list_id: str | None) -> int | None:
    """A List-Id identifier is <slug.domain> (outgoing.prepare_issue)."""
    if not list_id:
        return None
    slug = list_id.partition(".")[0]
    return session.scalar(select(MailingList.id).where(MailingList.slug == slug))


def _subscriptions(session: Session, target: Target, kind: EventType) -> list[Subscription]:
    """The subscriptions an event acts on: the list's, or (hard bounces, complaints, and
    reports that do not say which list) every one of the subscriber's."""
    query = select(Subscription).where(Subscription.subscriber_id == target.subscriber_id)
    if target.list_id is not None and kind not in _EVERY_LIST:
        query = query.where(Subscription.list_id == target.list_id)
    return list(session.scalars(query.order_by(Subscription.id)))


def _event_key(event: FeedbackEvent, target: Target) -> str:
    if target.delivery_id is not None and event.type is not EventType.UNSUBSCRIBE:
        identity = f"{event.type.value}|delivery|{target.delivery_id}"
    else:
        who = target.subscriber_id if target.subscriber_id is not None else event.recipient
        identity = f"{event.type.value}|{who}|{event.report_id}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


# --- the policy ----------------------------------------------------------------------------------

_LIVE = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)
# The address does not work, or its owner called our mail spam: no list of ours mails it.
_EVERY_LIST = (EventType.HARD_BOUNCE, EventType.COMPLAINT)


def _hard_bounce(
    session: Session,
    event: FeedbackEvent,
    target: Target,
    subscriptions: Sequence[Subscription],
    policy: FeedbackPolicy,
    applied: AppliedEvent,
) -> EventOutcome:
    for sub in subscriptions:
        if sub.status in _LIVE and set_status(session, sub, SubscriptionStatus.BOUNCED, "bounce"):
            applied.changed.append(sub.id)
    _suppress(session, target, policy, EventType.HARD_BOUNCE.value)
    return EventOutcome.SUPPRESSED if applied.changed else EventOutcome.UNCHANGED


def _complaint(
    session: Session,
    event: FeedbackEvent,
    target: Target,
    subscriptions: Sequence[Subscription],
    policy: FeedbackPolicy,
    applied: AppliedEvent,
) -> EventOutcome:
    for sub in subscriptions:
        if sub.status != SubscriptionStatus.COMPLAINED and set_status(
            session, sub, SubscriptionStatus.COMPLAINED, "complaint"
        ):
            applied.changed.append(sub.id)
    _suppress(session, target, policy, EventType.COMPLAINT.value)
    return EventOutcome.SUPPRESSED if applied.changed else EventOutcome.UNCHANGED


def _suppress(session: Session, target: Target, policy: FeedbackPolicy, reason: str) -> None:
    """Keep the address out of every list, those it is not on yet too: an import or an
    operator's add reports it as suppressed; the reader may sign up again themselves."""
    if policy.suppression_key is None or target.subscriber_id is None:
        return
    email = session.scalar(select(Subscriber.email).where(Subscriber.id == target.subscriber_id))
    if email is not None:
        suppress(session, email, policy.suppression_key, reason)


def _soft_bounce(
    session: Session,
    event: FeedbackEvent,
    target: Target,
    subscriptions: Sequence[Subscription],
    policy: FeedbackPolicy,
    applied: AppliedEvent,
) -> EventOutcome:
    outcome = EventOutcome.UNCHANGED
    for sub in subscriptions:
        if sub.status not in _LIVE:
            continue
        if target.delivery_id is not None and _delivered_since_last_soft_bounce(
            session, sub, target.delivery_id
        ):
            sub.soft_bounces = 0
        sub.soft_bounces = (sub.soft_bounces or 0) + 1
        outcome = EventOutcome.COUNTED
        if sub.soft_bounces >= policy.soft_bounce_limit and set_status(
            session, sub, SubscriptionStatus.BOUNCED, "soft-bounces"
        ):
            applied.changed.append(sub.id)
    session.flush()
    return EventOutcome.SUPPRESSED if applied.changed else outcome


def _delivered(
    session: Session,
    event: FeedbackEvent,
    target: Target,
    subscriptions: Sequence[Subscription],
    policy: FeedbackPolicy,
    applied: AppliedEvent,
) -> EventOutcome:
    reset = False
    for sub in subscriptions:
        if sub.soft_bounces:
            sub.soft_bounces = 0
            reset = True
    session.flush()
    return EventOutcome.RESET if reset else EventOutcome.UNCHANGED


def _unsubscribe(
    session: Session,
    event: FeedbackEvent,
    target: Target,
    subscriptions: Sequence[Subscription],
    policy: FeedbackPolicy,
    applied: AppliedEvent,
) -> EventOutcome:
    for sub in subscriptions:
        if sub.status in _LIVE and set_status(
            session, sub, SubscriptionStatus.UNSUBSCRIBED, "mailto"
        ):
            applied.changed.append(sub.id)
    return EventOutcome.UNSUBSCRIBED if applied.changed else EventOutcome.UNCHANGED


_APPLY = {
    EventType.HARD_BOUNCE: _hard_bounce,
    EventType.COMPLAINT: _complaint,
    EventType.SOFT_BOUNCE: _soft_bounce,
    EventType.DELIVERED: _delivered,
    EventType.UNSUBSCRIBE: _unsubscribe,
}


def _delivered_since_last_soft_bounce(
    session: Session, sub: Subscription, delivery_id: int
) -> bool:
    """Whether a message of this list reached the reader between the last counted soft
    bounce and this one: sent, and no bounce recorded for it."""
    last = session.scalar(
        select(func.max(BounceEvent.delivery_id)).where(
            BounceEvent.subscription_id == sub.id,
            BounceEvent.kind == EventType.SOFT_BOUNCE.value,
            BounceEvent.outcome.in_((EventOutcome.COUNTED.value, EventOutcome.SUPPRESSED.value)),
            BounceEvent.delivery_id != delivery_id,
        )
    )
    if last is None or last >= delivery_id:
        return False
    bounced = exists().where(
        BounceEvent.delivery_id == Delivery.id,
        BounceEvent.kind.in_((EventType.SOFT_BOUNCE.value, EventType.HARD_BOUNCE.value)),
    )
    between = session.scalar(
        select(Delivery.id)
        .join(Issue, and_(Issue.id == Delivery.issue_id, Issue.list_id == sub.list_id))
        .where(
            Delivery.subscriber_id == sub.subscriber_id,
            Delivery.id > last,
            Delivery.id < delivery_id,
            Delivery.status == DeliveryStatus.SENT,
            ~bounced,
        )
        .limit(1)
    )
    return between is not None
