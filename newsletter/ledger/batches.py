"""What every step of the ledger shares: its tables, the batch lock and each batch's
stored counts (see models.Batch), and the database errors worth another try.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, func, literal_column, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from newsletter.models import Batch, Delivery, DeliveryStatus, Issue

DELIVERIES = cast(Table, Delivery.__table__)
ISSUES = cast(Table, Issue.__table__)
BATCHES = cast(Table, Batch.__table__)
PENDING_STATES = (DeliveryStatus.QUEUED, DeliveryStatus.CLAIMED)
# The database went away for a moment (restart, failover, a killed connection): worth
# another try on a fresh connection, unlike every other error.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


COUNTS = {status: BATCHES.c[f"n_{status.value}"] for status in DeliveryStatus}
# Literal SQL (no bound parameter), like the predicate PostgreSQL compares it with.
LIVE = BATCHES.c.n_claimed > literal_column("0")
_BATCH_KEY = (
    BATCHES.c.id,
    BATCHES.c.issue_id,
    BATCHES.c.first_id,
    BATCHES.c.last_id,
    BATCHES.c.n_claimed,
)


def refresh_batch_counts(session: Session, batch_id: int) -> None:
    """Count the batch's rows by status again and store the counts on the batch row. Called
    at the end of each sending pass, whose outcomes were written one by one without
    touching the batch row (they are counted live meanwhile). Caller commits."""
    store_counts(session, lock_batches(session, BATCHES.c.id == batch_id))


def lock_batches(session: Session, *where: Any) -> list[Any]:
    """Lock the batch rows matching `where`, in id order, and return their (id, issue_id,
    first_id, last_id, n_claimed). Whatever changes the statuses of a batch's rows in bulk
    takes the batch's lock first (then the issue's, then the deliveries'): the counts it
    stores then cover every change committed before, and none is made meanwhile."""
    query = select(*_BATCH_KEY).where(*where).order_by(BATCHES.c.id)
    if session.get_bind().dialect.name == "postgresql":
        return list(session.execute(query.with_for_update()).all())
    # SQLite has no row locks: a write takes the database's write lock, and what this
    # transaction reads from then on is the latest and stays so.
    session.execute(update(BATCHES).where(*where).values(n_claimed=BATCHES.c.n_claimed))
    return list(session.execute(query).all())


def store_counts(session: Session, batches: Sequence[Any]) -> None:
    """Count the rows of each (locked) batch by status over its id range (a primary key
    range scan of at most BATCH_SIZE rows) and store the counts on it."""
    for batch in batches:
        counts = dict.fromkeys(COUNTS, 0)
        for status, n in session.execute(
            select(DELIVERIES.c.status, func.count())
            .where(
                DELIVERIES.c.issue_id == batch.issue_id,
                DELIVERIES.c.id.between(batch.first_id, batch.last_id),
            )
            .group_by(DELIVERIES.c.status)
        ):
            counts[DeliveryStatus(status)] = n
        session.execute(
            update(BATCHES)
            .where(BATCHES.c.id == batch.id)
            .values({COUNTS[status]: n for status, n in counts.items()})
        )


def rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
