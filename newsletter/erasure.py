"""Erasure's sweep: what an erased address left in texts the database keeps.

Deleting the reader removes their own rows (subscriber, subscriptions; events lose their
link). What remains are texts written while they were a reader that quote their address: a
server's reply and the error of their deliveries, an issue's pause reason (which quotes the
last error), the detail of events and of bounce events. `redact` (pure) replaces the address
in a text with a marker; `forget_address` (a Session) applies it wherever the address occurs.
The outbox is swept by newsletter.transport.erase_from_outbox.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from newsletter.addresses import mask_address
from newsletter.models import BounceEvent, Delivery, Event, Issue

MARKER = "[erased]"


def redact(text: str, address: str) -> str:
    """`text` with the address, in any case, and then its local part alone, replaced by the
    marker. The local part is what a server's reply often quotes on its own ("user vic.tim
    unknown")."""
    return mask_address(text, address, MARKER)


# (table, its key column, the text columns to sweep)
_TEXTS: tuple[tuple[Any, str, tuple[str, ...]], ...] = (
    (Delivery.__table__, "id", ("smtp_reply", "last_error")),
    (Issue.__table__, "id", ("status_reason",)),
    (Event.__table__, "id", ("detail",)),
    (BounceEvent.__table__, "id", ("detail",)),
)


def forget_address(session: Session, address: str, subscriber_ids: Collection[int]) -> int:
    """Redact the address from every kept text that quotes it; the number of rows changed.

    Deliveries are many: only the erased readers' own are read (by their subscriber index).
    The other tables are searched whole (an erasure is rare; events are one per reader's
    change). Run in the erasure's transaction, before the reader's rows go."""
    needle = address.lower()
    changed = 0
    for table, key, columns in _TEXTS:
        t: Table = table
        quotes = or_(*(func.lower(t.c[c]).contains(needle, autoescape=True) for c in columns))
        where = [quotes]
        if t.name == "deliveries":
            if not subscriber_ids:
                continue
            where.append(t.c.subscriber_id.in_(list(subscriber_ids)))
        rows = session.execute(select(t.c[key], *(t.c[c] for c in columns)).where(*where)).all()
        if not rows:
            continue
        values = [
            {
                "b_key": row[0],
                **{f"b_{c}": _redacted(v, address) for c, v in zip(columns, row[1:], strict=True)},
            }
            for row in rows
        ]
        session.execute(
            update(t)
            .where(t.c[key] == bindparam("b_key"))
            .values({c: bindparam(f"b_{c}") for c in columns})
            .execution_options(synchronize_session=False),
            values,
        )
        changed += len(rows)
    session.flush()
    return changed


def _redacted(value: str | None, address: str) -> str | None:
    return redact(value, address) if value is not None else None
