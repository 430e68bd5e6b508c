"""The production path: PostgreSQL, a real Redis broker, real Celery worker processes and a
real SMTP server. No eager mode: the CLI enqueues, the workers deliver."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from newsletter.models import DeliveryStatus
from newsletter.runtime import Runtime
from tests.conftest import SmtpServer, WorkerProcess, cli_env, run_cli
from tests.integration.helpers import (
    assert_well_formed,
    confirmed_addresses,
    deliveries,
    seed_world,
)

CONFIRMED = 2000


def test_send_wait_delivers_exactly_once_to_every_confirmed_reader(
    pg_url: str,
    redis_url: str,
    smtp_server: SmtpServer,
    make_runtime: Callable[..., Runtime],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    rt = make_runtime(pg_url)
    issue_id = seed_world(rt, confirmed=CONFIRMED, pending=100, unsubscribed=100)
    env = cli_env(
        database_url=pg_url, broker_url=redis_url, smtp_url=smtp_server.url, batch_size="100"
    )
    start_worker(env, concurrency=2)

    out = run_cli("issues", "send", str(issue_id), "--wait", env=env, timeout=600)
    assert f"issue {issue_id} sent: sent {CONFIRMED}, failed 0" in out.stdout

    received = smtp_server.recorder.messages
    per_address = Counter(smtp_server.recorder.recipients())
    assert sorted(per_address) == confirmed_addresses(CONFIRMED)  # nobody else
    assert set(per_address.values()) == {1}  # nobody twice
    for r in received[:200]:  # a sample: full parse of 2,000 x 35 KB is slow and adds nothing
        assert_well_formed(r.data, r.message())
    message_ids = {r.data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0] for r in received}
    assert len(message_ids) == CONFIRMED

    rows = deliveries(rt, issue_id)
    assert len(rows) == CONFIRMED
    assert Counter(d.status for d in rows) == {DeliveryStatus.SENT: CONFIRMED}
    status = json.loads(run_cli("issues", "status", str(issue_id), "--json", env=env).stdout)
    assert status["status"] == "sent" and status["counts"]["sent"] == CONFIRMED


def test_send_without_wait_returns_and_the_workers_finish(
    pg_url: str,
    redis_url: str,
    smtp_server: SmtpServer,
    make_runtime: Callable[..., Runtime],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    import time

    rt = make_runtime(pg_url)
    issue_id = seed_world(rt, confirmed=50)
    env = cli_env(
        database_url=pg_url, broker_url=redis_url, smtp_url=smtp_server.url, batch_size="10"
    )
    out = run_cli("issues", "send", str(issue_id), env=env)
    assert "queued" in out.stdout
    # Nothing is sent until a worker runs: the broker holds the batches.
    assert smtp_server.recorder.messages == []
    start_worker(env, concurrency=1)
    deadline = time.time() + 120
    while time.time() < deadline and len(smtp_server.recorder.messages) < 50:
        time.sleep(0.2)
    assert sorted(smtp_server.recorder.recipients()) == confirmed_addresses(50)
