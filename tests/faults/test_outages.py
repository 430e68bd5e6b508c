"""The services around the workers fail mid-send: Redis restarts empty, PostgreSQL drops every
connection. The database is the only truth, so both lose nobody and mail nobody twice."""

from __future__ import annotations

import time
from collections.abc import Callable

from newsletter.runtime import Runtime
from tests.faults.conftest import (
    FaultSmtpServer,
    Reconciler,
    RedisServer,
    Workers,
    check_delivery,
    database_down,
    fault_env,
    kill_db_connections,
    newsletter,
    readers,
    seed,
    status_of,
    wait_finished,
    wait_until,
)


def test_redis_restarted_without_persistence_mid_send(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
    reconciler: Callable[[dict[str, str]], Reconciler],
) -> None:
    addresses = readers(120)
    env = fault_env(pg_url, redis_server, smtp, batch_size=10)
    first = workers.launch(env)
    issue_id = seed(rt, addresses)
    smtp.recorder.data_delay = 0.03  # 120 messages take at least 3.6 s
    first.result()

    newsletter("issues", "send", str(issue_id), env=env)
    wait_until(lambda: smtp.recorder.count() >= 20, 90, "the send to get going")
    redis_server.restart()  # every queued batch task is gone
    assert redis_server.client().llen("newsletter") == 0
    assert status_of(rt, issue_id)["counts"]["queued"] > 0

    recon = reconciler(env)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="Redis restarted empty mid-send",
        eligible=addresses,
        note=f"reconciler re-enqueued {recon.requeued()} lost batch(es)",
    )
    assert recon.requeued() >= 1
    assert status_of(rt, issue_id)["status"] == "sent"


def test_database_restarted_mid_send(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
    reconciler: Callable[[dict[str, str]], Reconciler],
) -> None:
    """What a PostgreSQL restart does to the workers, twice: every connection dies (some in
    the middle of a claim, a renewal or the write of an outcome) and, the second time, new
    connections are refused for 3 s while the SMTP server keeps accepting messages whose
    outcome then waits to be written."""
    addresses = readers(120)
    env = fault_env(pg_url, redis_server, smtp, batch_size=20)
    first = workers.launch(env, concurrency=2)
    issue_id = seed(rt, addresses)
    smtp.recorder.data_delay = 0.03
    worker = first.result()
    recon = reconciler(env)

    newsletter("issues", "send", str(issue_id), env=env)
    wait_until(lambda: smtp.recorder.count() >= 20, 90, "20 messages")
    killed = kill_db_connections(pg_url)
    wait_until(lambda: smtp.recorder.count() >= 50, 90, "50 messages")
    with database_down(pg_url) as down:
        time.sleep(3)
    killed += down
    assert killed >= 4, f"only {killed} connections were killed"  # both pool processes, twice

    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="PostgreSQL restarted (3 s down) mid-send",
        eligible=addresses,
        note=f"{killed} connections killed",
    )
    assert "recording failed" in worker.log_path.read_text()  # an outcome waited for the database
    assert recon.proc.poll() is None
