"""Workers die mid-batch (SIGKILL: no cleanup, no goodbye) and batch tasks arrive twice.

The kill is placed exactly: the SMTP server holds the chosen reader's DATA and tells the test,
which kills the worker while it waits for the reply. Held before the server accepts the
message ("during DATA"), nobody may get a second copy; held after the server recorded it and
before its 250 reached the worker ("between the 250 and the commit"), the ledger cannot know
the message arrived, and that reader gets it twice: the one duplicate SMTP allows.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable

import pytest

from newsletter.runtime import Runtime
from tests.faults.conftest import (
    FaultSmtpServer,
    Reconciler,
    RedisServer,
    Stall,
    Workers,
    check_delivery,
    children,
    deliveries,
    fault_env,
    newsletter,
    readers,
    seed,
    status_of,
    wait_finished,
)

MOMENTS = {
    "during DATA": False,  # the server has not accepted the message
    "between the 250 and the commit": True,  # the server has it; the ledger does not
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_worker_killed_mid_batch_loses_nobody(
    moment: str,
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
    reconciler: Callable[[dict[str, str]], Reconciler],
) -> None:
    addresses = readers(40)
    env = fault_env(pg_url, redis_server, smtp, batch_size=10)
    first = workers.launch(env)
    issue_id = seed(rt, addresses)
    victim = addresses[15]  # the sixth message of the second batch
    accepted = MOMENTS[moment]
    stall = Stall("data", lambda a: a == victim, accepted=accepted)
    smtp.recorder.stalls.append(stall)
    worker = first.result()

    newsletter("issues", "send", str(issue_id), env=env)
    assert stall.reached.wait(90), "the worker never reached the victim's DATA"
    workers.kill(worker)
    held = status_of(rt, issue_id)["counts"]["claimed"]
    assert held >= 1, "the killed worker held no claim: the kill came too late to prove much"

    # A new worker and the reconciler (beat's job) take the dead worker's rows back once
    # their lease runs out.
    workers.launch(env)
    recon = reconciler(env)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario=f"SIGKILL worker {moment}",
        eligible=addresses,
        duplicates=1 if accepted else 0,
        note=f"{held} claimed rows recovered after the lease",
    )
    assert recon.requeued() >= 1
    rows = deliveries(rt, issue_id)
    assert rows[victim].attempts == 2
    assert status_of(rt, issue_id)["status"] == "sent"


def test_a_killed_threads_worker_costs_at_most_one_duplicate_per_connection(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
    reconciler: Callable[[dict[str, str]], Reconciler],
) -> None:
    """A threads-pool worker sends two batches at once, each over its own connection, and
    overlaps each record with the next message. Killed while both connections sit between
    the server's acceptance and the record, it costs one duplicate per connection: two."""
    addresses = readers(40)
    env = fault_env(pg_url, redis_server, smtp, batch_size=10)
    first = workers.launch(env, concurrency=2, pool="threads")
    issue_id = seed(rt, addresses)
    victims = (addresses[5], addresses[15])  # the sixth message of each of the two batches
    stalls = [Stall("data", lambda a, v=v: a == v, accepted=True) for v in victims]
    smtp.recorder.stalls.extend(stalls)
    worker = first.result()

    newsletter("issues", "send", str(issue_id), env=env)
    for stall in stalls:
        assert stall.reached.wait(90), "a sending thread never reached its victim's DATA"
    workers.kill(worker)

    workers.launch(env)
    recon = reconciler(env)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="SIGKILL a threads worker (2 connections), both between the 250 and the commit",
        eligible=addresses,
        duplicates=2,
        note="threads pool, concurrency 2",
    )
    assert recon.requeued() >= 1
    rows = deliveries(rt, issue_id)
    assert all(rows[v].attempts == 2 for v in victims)


def test_a_killed_pool_process_recovers_without_beat_or_a_new_worker(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    """Only the pool process that holds the SMTP connection dies. Celery hands its task out
    again (task_reject_on_worker_lost); the new run finds the rows leased, comes back when
    the lease runs out and sends what was not recorded."""
    addresses = readers(30)
    env = fault_env(pg_url, redis_server, smtp, batch_size=10)
    first = workers.launch(env)
    issue_id = seed(rt, addresses)
    victim = addresses[4]
    stall = Stall("data", lambda a: a == victim, accepted=True)
    smtp.recorder.stalls.append(stall)
    worker = first.result()
    assert worker.proc is not None

    newsletter("issues", "send", str(issue_id), env=env)
    assert stall.reached.wait(90)
    [pool_process] = children(worker.proc.pid)
    os.kill(pool_process, signal.SIGKILL)

    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="SIGKILL one pool process, 250 not committed",
        eligible=addresses,
        duplicates=1,
        note="no reconciler, same worker",
    )
    assert worker.proc.poll() is None  # the worker itself lived on


def test_the_same_batch_task_delivered_twice_at_once_mails_nobody_twice(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(30)
    env = fault_env(pg_url, redis_server, smtp, batch_size=100)
    issue_id = seed(rt, addresses)
    smtp.recorder.data_delay = 0.05  # the batch takes 1.5 s: the two runs overlap

    newsletter("issues", "send", str(issue_id), env=env)  # no worker yet: the task waits
    broker = redis_server.client()
    [task] = broker.lrange("newsletter", 0, -1)
    broker.lpush("newsletter", task)  # the broker hands out the very same message twice
    worker = workers.start(env, concurrency=2)

    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="same batch task delivered twice at once",
        eligible=addresses,
    )
    runs = re.findall(
        r"newsletter\.send_batch\[.*?\] succeeded in .*?'claimed': (\d+)",
        worker.log_path.read_text(),
    )
    claims = [int(n) for n in runs]
    assert claims.count(30) == 1 and set(claims) == {0, 30}, claims  # one run had them all
