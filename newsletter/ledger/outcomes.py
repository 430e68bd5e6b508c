"""Write one delivery's outcome, fenced by the batch's lease, and count consecutive
failures (the brake that pauses an issue).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from select import select as wait_readable
from typing import Any

from sqlalchemy import DateTime, Integer, String, bindparam, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from newsletter.ledger.batches import DELIVERIES, aware, rowcount
from newsletter.ledger.claims import ClaimedDelivery
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.models import DeliveryStatus, Issue, IssueStatus, utcnow
from newsletter.transport import Outcome, SendResult

# The common outcome, written once per message: built once, not per call (building an
# UPDATE costs more Python time than sending it; see docs/benchmarks.md).
_RECORD_SENT = (
    update(DELIVERIES)
    .where(
        DELIVERIES.c.id == bindparam("b_id"),
        DELIVERIES.c.status == DeliveryStatus.CLAIMED.value,
        DELIVERIES.c.lease_expires_at.in_(bindparam("b_leases", expanding=True)),
    )
    .values(
        status=DeliveryStatus.SENT.value,
        smtp_code=bindparam("b_code", type_=Integer()),
        smtp_reply=bindparam("b_reply", type_=String()),
        message_id=bindparam("b_mid", type_=String()),
        sent_at=bindparam("b_now", type_=DateTime(timezone=True)),
        lease_expires_at=None,
        last_error=None,
        next_attempt_at=None,
    )
)


class SentWriter:
    """PostgreSQL (psycopg): the common outcome, `sent`, as ONE prepared statement in
    autocommit on a connection of the batch's own: one round trip that is also the commit,
    no BEGIN, no SQLAlchemy per message. The same condition as `_RECORD_SENT` (still
    claimed, still carrying our lease), so it is just as fenced.

    Split in two for the sending loop: `send` hands the statement to the server (libpq,
    parameters already text: no cursor, no adapters) and returns at once; `collect` waits
    for its result. Between the two the sender's thread carries on with the next message,
    so the write costs no thread hand-off and the wait for the server happens outside the
    GIL (select on the socket), where a blocking read inside libpq would hold it.

    Kept because a benchmark shows it is needed: benchmarks/bench_e2e.py, in
    docs/benchmarks.md ("Experiments: what the outcome write costs"): the one-statement
    write took the end-to-end ratio from 0.219 to 0.441 (453 -> 813 msgs/s) and the workers'
    CPU from 2.65 to 0.94 ms per message; "Recording outcomes" there measures the overlap
    of `send`/`collect` with the next message (0.52-0.58 -> 0.33-0.40 ms of worker CPU).
    SQLite and other drivers use `_RECORD_SENT` through the session instead."""

    SQL = (
        "UPDATE deliveries SET status = 'sent', smtp_code = $1, smtp_reply = $2,"
        " message_id = $3, sent_at = $4, lease_expires_at = NULL, last_error = NULL,"
        " next_attempt_at = NULL"
        " WHERE id = $5 AND status = 'claimed' AND lease_expires_at = ANY($6)"
    )
    NAME = b"nl_record_sent"
    TIMEOUT = 60.0  # seconds for one result: past it the connection is treated as dead

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._raw: Any = None  # a pool connection (PoolProxiedConnection), taken on first use
        self._busy = False  # a statement was sent and its result not yet read

    @staticmethod
    def fits(engine: Engine) -> bool:
        return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"

    def write(
        self,
        delivery_id: int,
        leases: Sequence[datetime],
        outcome: SendResult,
        message_id: str,
        now: datetime,
    ) -> int:
        """The number of rows written: 1, or 0 when the row is no longer ours."""
        self.send(delivery_id, leases, outcome, message_id, now)
        return self.collect()

    def send(
        self,
        delivery_id: int,
        leases: Sequence[datetime],
        outcome: SendResult,
        message_id: str,
        now: datetime,
    ) -> None:
        """Send the write without waiting for it (`collect` reads its result)."""
        import psycopg

        params = [
            str(outcome.code).encode(),
            outcome.reply[:1000].replace("\x00", "").encode(),
            message_id.encode(),
            now.isoformat().encode(),
            str(delivery_id).encode(),
            ("{" + ",".join(f'"{lease.isoformat()}"' for lease in leases) + "}").encode(),
        ]
        try:
            pgconn = self._connection()
            pgconn.send_query_prepared(self.NAME, params)
            self._busy = True
        except psycopg.Error as exc:
            self._discard()
            raise OperationalError(self.SQL, params, exc) from exc

    def collect(self) -> int:
        """Wait for the write `send` sent: the number of rows written (0 or 1)."""
        import psycopg
        from psycopg import pq

        try:
            result = self._result()
            if result.status != pq.ExecStatus.COMMAND_OK:
                message = (result.error_message or b"").decode(errors="replace").strip()
                raise psycopg.OperationalError(message or f"status {result.status}")
            return int(result.command_tuples or 0)
        except psycopg.Error as exc:
            self._discard()
            # The same exception the rest of the ledger raises, so the caller's retry on a
            # database that went away applies here too.
            raise OperationalError(self.SQL, None, exc) from exc

    def _connection(self) -> Any:
        """The libpq connection, autocommit, with the statement prepared on it."""
        import psycopg

        if self._raw is None:
            raw = self.engine.raw_connection()
            try:
                driver = raw.driver_connection
                assert driver is not None
                driver.rollback()  # whatever the pool's ping left open
                driver.autocommit = True
                # Prepared once per connection; looked up once per batch, because psycopg
                # deallocates every prepared statement of a connection after some commands.
                pgconn = driver.pgconn
                ok = psycopg.pq.ExecStatus.COMMAND_OK
                if pgconn.describe_prepared(self.NAME).status != ok:
                    result = pgconn.prepare(self.NAME, self.SQL.encode())
                    if result.status != ok:
                        raise psycopg.OperationalError(
                            (result.error_message or b"").decode(errors="replace")
                        )
            except BaseException:
                with contextlib.suppress(Exception):
                    raw.invalidate()
                raise
            self._raw = raw
        return self._raw.driver_connection.pgconn

    def _result(self) -> Any:
        """The one result of the statement in flight, read without holding the GIL while
        the server works (libpq's blocking read would hold it)."""
        import psycopg

        pgconn = self._raw.driver_connection.pgconn
        deadline = time.monotonic() + self.TIMEOUT
        pgconn.consume_input()
        while pgconn.is_busy():
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable([pgconn.socket], [], [], left)[0]:
                raise psycopg.OperationalError("no reply from the database")
            pgconn.consume_input()
        result = pgconn.get_result()
        while pgconn.get_result() is not None:  # the end of this statement's results
            pass
        self._busy = False
        if result is None:
            raise psycopg.OperationalError("no result from the database")
        return result

    def _discard(self) -> None:
        raw, self._raw = self._raw, None
        self._busy = False
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.invalidate()

    def close(self) -> None:
        raw = self._raw
        if raw is None:
            return
        if self._busy:  # a result never read: the connection's state is unknown
            self._discard()
            return
        self._raw = None
        try:
            raw.driver_connection.autocommit = False
            raw.close()  # back to the pool as the pool gave it out
        except Exception:
            with contextlib.suppress(Exception):
                raw.invalidate()


def record_outcome(
    session: Session,
    delivery: ClaimedDelivery,
    outcome: SendResult,
    *,
    message_id: str,
    policy: DeliveryPolicy,
    started_at: datetime | None,
    lease: Sequence[datetime],
) -> DeliveryStatus | None:
    """Write one outcome, only if the row is still ours: claimed and still carrying one of
    the `lease` values (the claim's fencing token, see claims.BatchLease). Returns the new
    status, or None when the row was no longer ours. Caller commits.

    Every outcome write is fenced the same way: `sent` through `_RECORD_SENT` (or the
    SentWriter on PostgreSQL, the same condition in SQL text), every other outcome through
    the UPDATE below. There is no unfenced path: a worker whose lease lapsed and whose rows
    were taken over can never overwrite the new owner's state.

    A temporary failure comes back after a backoff, per recipient; the last try happens at
    the deadline (`retry_deadline` after the send started) and a failure then is final,
    with the last reply as the error."""
    now = utcnow()
    if outcome.outcome is Outcome.SENT:
        done = rowcount(
            session.connection().execute(  # Core, not the ORM's execute pipeline: hot path
                _RECORD_SENT,
                {
                    "b_id": delivery.id,
                    "b_leases": list(lease),
                    "b_code": outcome.code,
                    "b_reply": outcome.reply[:1000],
                    "b_mid": message_id,
                    "b_now": now,
                },
            )
        )
        return DeliveryStatus.SENT if done else None
    values: dict[str, Any] = {
        "smtp_code": outcome.code,
        "smtp_reply": outcome.reply[:1000],
        "lease_expires_at": None,
        "message_id": message_id,
    }
    if outcome.outcome is Outcome.SENT:
        status = DeliveryStatus.SENT
        values.update(sent_at=now, last_error=None, next_attempt_at=None)
    elif outcome.outcome is Outcome.TEMPORARY:
        deadline = (aware(started_at) if started_at else now) + policy.retry_deadline
        if now >= deadline:
            status = DeliveryStatus.FAILED
            values.update(
                last_error=f"gave up at the retry deadline: {outcome.describe()}",
                next_attempt_at=None,
            )
        else:
            retry_at = min(now + timedelta(seconds=policy.backoff(delivery.attempts)), deadline)
            status = DeliveryStatus.QUEUED
            values.update(next_attempt_at=retry_at, last_error=f"temporary: {outcome.describe()}")
    else:
        status = DeliveryStatus.FAILED
        values.update(last_error=f"permanent: {outcome.describe()}", next_attempt_at=None)
    values["status"] = status.value
    mine = [
        DELIVERIES.c.id == delivery.id,
        DELIVERIES.c.status == DeliveryStatus.CLAIMED.value,
        DELIVERIES.c.lease_expires_at.in_(list(lease)),
    ]
    done = rowcount(session.execute(update(DELIVERIES).where(*mine).values(**values)))
    return status if done else None


def note_outcome(
    session: Session, issue_id: int, *, failed: bool, policy: DeliveryPolicy, error: str = ""
) -> bool:
    """Count the issue's consecutive failed deliveries, across every worker (any success
    resets the count). At `policy.max_consecutive_failures` the issue pauses itself, saying
    why. Returns True when the issue is to stop here. Caller commits."""
    if not failed:
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id, Issue.consecutive_failures != 0)
            .values(consecutive_failures=0)
            .execution_options(synchronize_session=False)
        )
        return False
    count = session.execute(
        update(Issue)
        .where(Issue.id == issue_id)
        .values(consecutive_failures=Issue.consecutive_failures + 1)
        .returning(Issue.consecutive_failures)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    if count < policy.max_consecutive_failures:
        return False
    reason = (
        f"paused itself after {count} consecutive failed deliveries "
        f"(limit {policy.max_consecutive_failures}); last error: {error}"
    )
    # No-op if another worker's failure paused it first, or the operator cancelled it: this
    # batch stops either way.
    session.execute(
        update(Issue)
        .where(Issue.id == issue_id, Issue.status == IssueStatus.SENDING)
        .values(status=IssueStatus.PAUSED, status_reason=reason[:500])
        .execution_options(synchronize_session=False)
    )
    return True
