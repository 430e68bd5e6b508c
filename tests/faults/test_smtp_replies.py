"""The SMTP server answers badly: 421 at connect, 4xx and 421 at RCPT, 552 at DATA, 550 at
RCPT, a 4xx that never ends, a server that stalls past the socket timeout, and a message
that cannot be built at all. One reply table decides temporary or permanent; temporary
failures are retried per recipient, never the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text

from newsletter.ledger.freeze import start_send
from newsletter.models import Delivery, Subscriber, Subscription, SubscriptionStatus
from newsletter.runtime import Runtime
from tests.faults.conftest import (
    FaultSmtpServer,
    RedisServer,
    Stall,
    Workers,
    check_delivery,
    deliveries,
    fault_env,
    first_times,
    newsletter,
    readers,
    seed,
    status_of,
    wait_finished,
)


def send_with_a_worker(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
    addresses: list[str],
    **settings: Any,
) -> tuple[int, dict[str, str]]:
    env = fault_env(pg_url, redis_server, smtp, **settings)
    worker = workers.launch(env)
    issue_id = seed(rt, addresses)
    worker.result()
    newsletter("issues", "send", str(issue_id), env=env)
    return issue_id, env


def subscription_status(rt: Runtime, address: str) -> SubscriptionStatus:
    with rt.sessions() as s:
        status = s.scalar(
            select(Subscription.status)
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(Subscriber.email == address)
        )
        assert status is not None
        return status


def test_421_at_connect_then_recovery(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(30)
    smtp.recorder.refuse_connections = 3  # "421 Service not available" to the next three
    issue_id, _env = send_with_a_worker(
        pg_url, rt, redis_server, smtp, workers, addresses, batch_size=10
    )
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="421 at connect (3 connections), then recovery",
        eligible=addresses,
    )
    assert smtp.recorder.refuse_connections == 0  # all three refusals were met
    rows = deliveries(rt, issue_id).values()
    assert max(d.attempts for d in rows) >= 2
    assert {d.smtp_code for d in rows} == {250}
    assert status_of(rt, issue_id)["status"] == "sent"


def test_temporary_replies_are_retried_per_recipient(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(20)
    greylisted, full, busy, oversized = addresses[3], addresses[4], addresses[5], addresses[6]
    rules = smtp.recorder.rules
    rules.append(("rcpt", first_times([greylisted], 2), "451 4.7.1 greylisted, try again"))
    rules.append(("rcpt", first_times([full]), "452 4.2.2 mailbox over quota"))
    rules.append(("rcpt", first_times([busy]), "421 4.7.0 too many messages, closing"))
    rules.append(("data", first_times([oversized]), "552 5.2.2 mailbox full"))
    issue_id, _env = send_with_a_worker(
        pg_url, rt, redis_server, smtp, workers, addresses, batch_size=20
    )
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="451/452/421 at RCPT, 552 at DATA",
        eligible=addresses,
    )
    log = smtp.recorder.attempts
    assert [r[:3] for r in log(greylisted)] == ["451", "451", "250"]
    assert [r[:3] for r in log(full)] == ["452", "250"]
    assert [r[:3] for r in log(busy)] == ["421", "250"]
    rows = deliveries(rt, issue_id)
    assert rows[oversized].attempts == 2
    # Per recipient: everyone else went through on the first try, including the readers
    # after the 421 in the same batch, over a new connection.
    assert {a for a, d in rows.items() if d.attempts > 1} == {greylisted, full, busy, oversized}
    assert smtp.recorder.connections >= 2
    assert subscription_status(rt, oversized) is SubscriptionStatus.ACTIVE  # 552: no bounce


def test_550_at_rcpt_is_a_hard_bounce(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(20)
    unknown = {addresses[7], addresses[8]}
    smtp.recorder.rules.append(("rcpt", lambda a: a in unknown, "550 5.1.1 no such user"))
    issue_id, env = send_with_a_worker(
        pg_url, rt, redis_server, smtp, workers, addresses, batch_size=10
    )
    wait_finished(rt, issue_id)
    eligible = [a for a in addresses if a not in unknown]
    check_delivery(
        rt, issue_id, smtp.recorder, scenario="550 at RCPT (2 readers)", eligible=eligible
    )
    rows = deliveries(rt, issue_id)
    for address in unknown:
        assert rows[address].status.value == "failed"
        assert rows[address].attempts == 1  # permanent: never retried
        assert "550 5.1.1 no such user" in (rows[address].last_error or "")
        assert len(smtp.recorder.attempts(address)) == 1
    bounced = newsletter("subscribers", "list", "--list", "world", "--status", "bounced", env=env)
    assert sorted(line.split("\t")[1] for line in bounced.splitlines()) == sorted(unknown)
    # ... and the next issue is not sent to them.
    with rt.sessions() as s, s.begin():
        from datetime import datetime

        from newsletter import issues

        nxt = issues.compose_issue(
            s,
            rt.templates,
            "world",
            base_url=rt.settings.base_url,
            postal_address=rt.settings.postal_address,
            since=datetime(2000, 1, 1),
        )
        start_send(s, nxt.id, batch_size=100)
        audience = set(
            s.scalars(
                select(Subscriber.email)
                .join(Delivery, Delivery.subscriber_id == Subscriber.id)
                .where(Delivery.issue_id == nxt.id)
            )
        )
    assert audience == set(eligible)


def test_a_4xx_that_outlasts_the_deadline_fails_with_its_last_reply(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(20)
    stuck = {addresses[1], addresses[12]}
    smtp.recorder.rules.append(("rcpt", lambda a: a in stuck, "451 4.3.0 try again later"))
    issue_id, env = send_with_a_worker(
        pg_url,
        rt,
        redis_server,
        smtp,
        workers,
        addresses,
        batch_size=10,
        retry_deadline_hours=8 / 3600,  # eight seconds; retries come every 1.5-3 s
    )
    wait_finished(rt, issue_id)
    eligible = [a for a in addresses if a not in stuck]
    check_delivery(
        rt, issue_id, smtp.recorder, scenario="4xx past the retry deadline", eligible=eligible
    )
    rows = deliveries(rt, issue_id)
    for address in stuck:
        row = rows[address]
        assert row.status.value == "failed" and row.smtp_code == 451
        assert row.last_error == "gave up at the retry deadline: 451 4.3.0 try again later"
        assert 3 <= len(smtp.recorder.attempts(address)) == row.attempts
        assert subscription_status(rt, address) is SubscriptionStatus.ACTIVE
    status = newsletter("issues", "status", str(issue_id), env=env)
    assert f"issue {issue_id}: sent" in status
    assert "failed 2" in status and "gave up at the retry deadline: 451" in status


@pytest.mark.parametrize("where", ["at RCPT", "after accepting DATA"])
def test_a_server_that_stalls_past_the_socket_timeout(
    where: str,
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    """A stall at RCPT costs one timeout and a retry. A stall after the server accepted the
    message is SMTP's own window: the sender never hears the 250 and must send again."""
    addresses = readers(20)
    victim = addresses[4]
    accepted = where == "after accepting DATA"
    stall = Stall(
        "data" if accepted else "rcpt", lambda a: a == victim, accepted=accepted, seconds=6
    )
    smtp.recorder.stalls.append(stall)
    issue_id, _env = send_with_a_worker(
        pg_url, rt, redis_server, smtp, workers, addresses, batch_size=20, smtp_timeout=2
    )
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario=f"server stalls {where} past the 2 s timeout",
        eligible=addresses,
        duplicates=1 if accepted else 0,
        note="SMTP's own window" if accepted else "",
    )
    rows = deliveries(rt, issue_id)
    assert rows[victim].attempts == 2
    assert {a for a, d in rows.items() if d.attempts > 1} == {victim}


def test_a_message_that_cannot_be_built_is_parked_not_retried(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(10)
    env = fault_env(pg_url, redis_server, smtp)
    worker = workers.launch(env)
    issue_id = seed(rt, addresses)
    broken = addresses[3]
    with rt.engine.begin() as conn:  # a name from before input validation existed
        conn.execute(
            text("UPDATE subscribers SET name = :n WHERE email = :e"),
            {"n": "Mallory\r\nBcc: everyone@example.net", "e": broken},
        )
    worker.result()
    newsletter("issues", "send", str(issue_id), env=env)
    wait_finished(rt, issue_id)
    eligible = [a for a in addresses if a != broken]
    check_delivery(
        rt, issue_id, smtp.recorder, scenario="message cannot be built", eligible=eligible
    )
    row = deliveries(rt, issue_id)[broken]
    assert row.status.value == "failed" and row.attempts == 1
    assert (row.last_error or "").startswith("permanent: 0 cannot build message:")
    assert smtp.recorder.attempts(broken) == []
    assert b"everyone@example.net" not in b"".join(m.data for m in smtp.recorder.messages)
    assert subscription_status(rt, broken) is SubscriptionStatus.ACTIVE
    assert status_of(rt, issue_id)["status"] == "sent"
