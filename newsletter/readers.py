"""Finding a reader: by the identity of an address, or by the token a link carries (I/O).

One mailbox is one reader (newsletter.addresses.address_key, stored in the unique
subscribers.email_key); a link's token names a subscription, or one merged into another.
Every caller that looks a reader up goes through here: the subscription service, the web
pages and the bounce and complaint feedback.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.addresses import address_key
from newsletter.models import Subscriber, Subscription, SubscriptionAlias


def find_subscriber(session: Session, email: str) -> Subscriber | None:
    """The reader whose identity this (normalised) address is, whatever its case: one
    probe of the unique index on email_key."""
    return session.scalar(select(Subscriber).where(Subscriber.email_key == address_key(email)))


def subscription_for_token(session: Session, token: str) -> Subscription | None:
    """The subscription a (verified) link token names: its own token, or the token of a
    subscription merged into it (migration 0011), as links already mailed carry it."""
    sub = session.scalar(select(Subscription).where(Subscription.token == token))
    if sub is None:
        sub = session.scalar(
            select(Subscription)
            .join(SubscriptionAlias, SubscriptionAlias.subscription_id == Subscription.id)
            .where(SubscriptionAlias.token == token)
        )
    return sub
