"""SQLAlchemy 2.0 typed tables. The schema itself is created by the Alembic revisions in
newsletter/migrations; these classes must match them (a test compares the two)."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from newsletter.addresses import address_key

# BIGINT on PostgreSQL; SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _bytewise(length: int) -> Any:
    """An identifier's text: byte order on PostgreSQL (COLLATE "C"; migration 0005), whose
    unique index then compares bytes rather than calling the locale's strcoll. SQLite
    compares bytes already."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _enum(cls: type[enum.Enum], name: str) -> SAEnum:
    # Stored as plain strings (no native PG enum): adding a state is a code change, not a
    # type migration.
    return SAEnum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=20,
        values_callable=lambda e: [m.value for m in e],
    )


class SubscriptionStatus(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class IssueStatus(enum.StrEnum):
    DRAFT = "draft"
    SENDING = "sending"
    PAUSED = "paused"
    SENT = "sent"
    CANCELLED = "cancelled"


class DeliveryStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for a worker (first time, or a temporary failure's retry)
    CLAIMED = "claimed"  # a worker holds it under a lease
    SENT = "sent"  # the SMTP server accepted it (250 after DATA) or the outbox has it
    FAILED = "failed"  # permanent failure, or temporary failures past the deadline
    SKIPPED = "skipped"  # not sent on purpose (unsubscribed since the freeze, ...)
    CANCELLED = "cancelled"  # the operator cancelled the issue before it was sent


class MailingList(Base):
    __tablename__ = "lists"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    from_address: Mapped[str] = mapped_column(String(320))
    reply_to: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Subscriber(Base):
    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # As the reader typed it (for display and the envelope), normalised: domain lower-cased
    # and IDNA-encoded, local part kept as given.
    email: Mapped[str] = mapped_column(_bytewise(320))
    # The reader's identity, address_key(email): one reader per mailbox, whatever the case
    # it was typed in. Set with the address (see _key); unique, so a lookup is one index
    # probe (migration 0011, which merged the readers that were case variants).
    email_key: Mapped[str] = mapped_column(_bytewise(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @validates("email")
    def _key(self, _field: str, value: str) -> str:
        self.email_key = address_key(value)
        return value


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "list_id"),
        # A page of a list's readers in one status, in id order (keyset paging), and of all
        # of them (the next ids of each status, merged: iter_subscriptions): without it a
        # page of a small list after a big one, or of a rare status, reads up to the whole
        # table (migration 0004; (list_id, id) went in 0008). The freeze reads a list's
        # active readers from it, in subscription order (migration 0006).
        Index("ix_subscriptions_list_status_page", "list_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Found by the unique (subscriber_id, list_id): no index of its own (migration 0005).
    # Both name a parent that must exist, without a foreign key: an import inserts a
    # million rows at once, and PostgreSQL checks a key with one query per row. Triggers
    # check and lock the parents once per statement, refuse moving a subscription or
    # changing a parent's id, and delete it with its subscriber or list (migrations 0006
    # and 0007, docs/architecture.md).
    subscriber_id: Mapped[int] = mapped_column(BigId)
    list_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[SubscriptionStatus] = mapped_column(
        _enum(SubscriptionStatus, "subscription_status")
    )
    # Opaque random value carried (signed) in every link; reveals neither address nor id.
    token: Mapped[str] = mapped_column(_bytewise(64), unique=True)
    # The reader's section choice as a canonical key (see sections_key()); None: every
    # section. A key, not a JSON list, so that the composer can find the distinct choices
    # with a plain DISTINCT and the freeze can join readers to their variant.
    sections: Mapped[str | None] = mapped_column(String(1000))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)  # receives nothing while set
    soft_bounces: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    unsubscribed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The `imported` event of the import that added this subscription (what file, when,
    # through what, as which status), or None. One event per import rather than one per
    # reader: a million identical rows cost 2.5-2.9 s and ~250 MB of WAL per million readers
    # (migration 0009). No foreign key, as for the parents; the event goes only with its
    # list, and so do the subscriptions.
    import_event_id: Mapped[int | None] = mapped_column(BigId)


class SubscriptionAlias(Base):
    """A token of a subscription that was merged into another (migration 0011: readers who
    were case variants of one address): links already mailed with it act on the one that
    stays. Deleted with that subscription (erasure, a list's deletion)."""

    __tablename__ = "subscription_aliases"

    token: Mapped[str] = mapped_column(_bytewise(64), primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("subscriptions.id", ondelete="CASCADE"), index=True
    )


class Suppression(Base):
    """Addresses that must never be mailed again, kept only as a keyed hash (erasure)."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email_hash: Mapped[str] = mapped_column(String(64), unique=True)
    reason: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KeyringEntry(Base):
    """A key that outlives SECRET_KEY's rotations, sealed under it (newsletter.keyring;
    migration 0012)."""

    __tablename__ = "keyring"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    sealed: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Event(Base):
    """Append-only log of subscription changes: what changed, when, and through what.

    An import writes one `imported` event (subscriber_id NULL; detail: how many readers,
    from what file, as which status) that its subscriptions name (import_event_id). No
    foreign keys: PostgreSQL checks a key with one query per inserted row. The rows are
    written beside the subscriber and list they name, and what the keys' ON DELETE did is
    done by triggers (migration 0005): deleting a subscriber (erasure) sets subscriber_id
    NULL, deleting a list deletes its events."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(30))
    source: Mapped[str] = mapped_column(String(30))
    subscriber_id: Mapped[int | None] = mapped_column(BigId, index=True)
    list_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(String(500))


class Article(Base):
    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    section: Mapped[str] = mapped_column(String(100))
    title: Mapped[str] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)  # explicit summary from the input
    url: Mapped[str | None] = mapped_column(String(2000))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    source: Mapped[str | None] = mapped_column(String(500))
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Issue(Base):
    __tablename__ = "issues"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    list_id: Mapped[int] = mapped_column(ForeignKey("lists.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(String(300))
    status: Mapped[IssueStatus] = mapped_column(_enum(IssueStatus, "issue_status"))
    # Rendered and CSS-inlined once; per-recipient values are placeholders.
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    nonce: Mapped[str] = mapped_column(String(32))  # makes Message-IDs unique across installs
    # The random part of this issue's per-reader markers (newsletter.placeholders): content
    # cannot spell a marker it cannot know (migration 0010).
    marker_key: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    send_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status_reason: Mapped[str | None] = mapped_column(String(500))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)


class IssueArticle(Base):
    __tablename__ = "issue_articles"

    issue_id: Mapped[int] = mapped_column(
        ForeignKey("issues.id", ondelete="CASCADE"), primary_key=True
    )
    article_id: Mapped[int] = mapped_column(
        ForeignKey("articles.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    summary: Mapped[str] = mapped_column(Text)  # the summary as it appeared in this issue


class IssueVariant(Base):
    """The digest rendered for one section choice (html/text with placeholders), once."""

    __tablename__ = "issue_variants"
    __table_args__ = (UniqueConstraint("issue_id", "sections_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    issue_id: Mapped[int] = mapped_column(ForeignKey("issues.id", ondelete="CASCADE"))
    sections_key: Mapped[str] = mapped_column(String(1000))
    article_count: Mapped[int] = mapped_column(Integer)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)


class Batch(Base):
    """A range of delivery ids handed to one task; the reconciler re-enqueues lost ones.

    Every delivery of an issue lies in exactly one of its batches' ranges (a range may also
    hold other issues' ids: every query filters on issue_id too). The batch keeps its rows'
    counts by status, so that an issue's status is a sum over its batches rather than a
    count over its deliveries (newsletter.ledger.status.delivery_counts). The counts are exact
    whenever n_claimed is 0; a batch with n_claimed > 0 is being sent (its rows change one
    by one without touching this row) and is counted live instead. Whatever changes the
    statuses of a batch's rows in bulk holds the batch row's lock and stores its counts
    again in the same transaction (ledger.batches.refresh_batch_counts)."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    issue_id: Mapped[int] = mapped_column(ForeignKey("issues.id", ondelete="CASCADE"), index=True)
    first_id: Mapped[int] = mapped_column(BigInteger)
    last_id: Mapped[int] = mapped_column(BigInteger)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    n_queued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_claimed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_sent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_skipped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_cancelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


# The rows `issues status` lists as its last errors. Literal SQL, not bound parameters, so
# that PostgreSQL can prove a query uses the partial index below even with a generic plan.
DELIVERY_ERRORS = text("last_error IS NOT NULL AND status IN ('failed', 'queued')")


class Delivery(Base):
    """The per-recipient ledger: one row per (issue, subscriber), the only source of truth."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # One delivery per reader and issue (a second freeze is impossible). Reader first:
        # the same index finds a reader's deliveries (erasure, bounces), one index fewer to
        # fill at each of a freeze's million inserts.
        UniqueConstraint("subscriber_id", "issue_id"),
        Index("ix_deliveries_issue_status", "issue_id", "status"),
        Index(
            "ix_deliveries_issue_errors",
            "issue_id",
            "id",
            postgresql_where=DELIVERY_ERRORS,
            sqlite_where=DELIVERY_ERRORS,
        ),
    )

    # No foreign keys on this table: the freeze inserts a million rows in one statement, and
    # PostgreSQL checks a foreign key with one query per inserted row (half the freeze's
    # time). The rows come from existing subscriptions of a locked issue, and what the keys'
    # ON DELETE did is done by triggers (migration 0003): deleting a subscriber (erasure)
    # sets subscriber_id NULL, deleting an issue deletes its deliveries, deleting a variant
    # sets variant_id NULL.
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    issue_id: Mapped[int] = mapped_column(Integer)
    subscriber_id: Mapped[int | None] = mapped_column(BigId)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"))
    # The section variant the reader gets; None: the full digest on the issue row.
    variant_id: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    smtp_code: Mapped[int | None] = mapped_column(Integer)
    smtp_reply: Mapped[str | None] = mapped_column(String(1000))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    message_id: Mapped[str | None] = mapped_column(String(255))


class BounceEvent(Base):
    """One bounce, complaint or mailed unsubscribe as applied (newsletter.feedback). The
    unique key makes the same event twice change nothing; what was done is in outcome."""

    __tablename__ = "bounce_events"
    __table_args__ = (
        Index("ix_bounce_events_subscription_kind", "subscription_id", "kind", "delivery_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # bounces.EventType
    source: Mapped[str] = mapped_column(String(20))  # dsn, arf, text, mailto, webhook
    outcome: Mapped[str] = mapped_column(String(20))  # feedback.EventOutcome
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    issue_id: Mapped[int | None] = mapped_column(
        ForeignKey("issues.id", ondelete="CASCADE"), index=True
    )
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL")
    )
    subscription_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="SET NULL")
    )
    status: Mapped[str | None] = mapped_column(String(16))  # enhanced status, e.g. 5.1.1
    detail: Mapped[str | None] = mapped_column(String(500))  # addresses redacted


def sections_key(sections: list[str] | None) -> str | None:
    """Canonical form of a section choice: sorted, de-duplicated, case kept. None: all."""
    if sections is None:
        return None
    return json.dumps(sorted({s.strip() for s in sections if s.strip()}), ensure_ascii=False)


def sections_of(key: str | None) -> list[str] | None:
    if key is None:
        return None
    value = json.loads(key)
    return [str(v) for v in value]
