"""The operator steers a send in flight: pause (and restart every process) then resume,
cancel, an unsubscribe after the freeze; and the send that pauses itself when every delivery
fails."""

from __future__ import annotations

from typing import Any

from newsletter.ledger.control import pause_issue
from newsletter.runtime import Runtime
from tests.faults.conftest import (
    FaultSmtpServer,
    RedisServer,
    Workers,
    check_delivery,
    deliveries,
    fault_env,
    newsletter,
    readers,
    seed,
    status_of,
    wait_finished,
    wait_until,
)


def settled(rt: Runtime, issue_id: int) -> bool:
    """Every worker has let go: nothing claimed."""
    return status_of(rt, issue_id)["counts"]["claimed"] == 0


def test_pause_at_half_restart_every_process_then_resume(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(300)
    batch = 100
    env = fault_env(pg_url, redis_server, smtp, batch_size=batch)
    first = workers.launch(env, concurrency=2)
    issue_id = seed(rt, addresses)
    smtp.recorder.data_delay = 0.05  # each pool process sends at most 20 a second
    first.result()
    newsletter("issues", "send", str(issue_id), env=env)

    wait_until(lambda: smtp.recorder.count() >= 150, 120, "half of the messages")
    with rt.sessions() as s, s.begin():  # what `issues pause` does, without its start-up time
        pause_issue(s, issue_id)
    at_pause = smtp.recorder.count()
    wait_until(lambda: settled(rt, issue_id), 30, "the workers to let go of their batches")
    after_pause = smtp.recorder.count()
    # Within one batch: both batches in flight stopped early, far short of their end.
    assert after_pause - at_pause < batch, (at_pause, after_pause)
    st = status_of(rt, issue_id)
    assert st["status"] == "paused"
    assert st["counts"]["sent"] == after_pause  # the ledger agrees with the server
    assert st["counts"]["queued"] == 300 - after_pause

    # Restart every process: workers, Redis (empty: the queued batch tasks are gone), SMTP.
    for worker in workers.started:
        worker.stop()
    redis_server.restart()
    smtp.restart()
    assert smtp.recorder.count() == after_pause  # nothing moved while everything was down

    out = newsletter("issues", "resume", str(issue_id), env=env)
    assert "resumed" in out
    workers.start(env, concurrency=2)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="pause at half, restart all, resume",
        eligible=addresses,
        note=f"paused at {at_pause}, {after_pause - at_pause} in flight finished",
    )
    assert status_of(rt, issue_id)["status"] == "sent"


def test_cancel_mid_send_stops_and_marks_the_rest_cancelled(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(200)
    env = fault_env(pg_url, redis_server, smtp, batch_size=50)
    first = workers.launch(env, concurrency=2)
    issue_id = seed(rt, addresses)
    smtp.recorder.data_delay = 0.05
    first.result()
    newsletter("issues", "send", str(issue_id), env=env)
    wait_until(lambda: smtp.recorder.count() >= 40, 120, "the send to get going")

    out = newsletter("issues", "cancel", str(issue_id), env=env)
    assert "cancelled" in out
    wait_until(lambda: settled(rt, issue_id), 30, "the workers to let go of their batches")
    received = sorted(set(smtp.recorder.recipients()))
    st = wait_finished(rt, issue_id)
    assert st["status"] == "cancelled"
    assert st["counts"]["cancelled"] == 200 - len(received)
    assert len(received) < 200
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="cancel mid-send",
        eligible=received,
        note=f"{st['counts']['cancelled']} cancelled",
    )


def test_an_unsubscribe_between_the_freeze_and_the_claim_is_honoured(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    addresses = readers(20)
    leaver = addresses[7]
    env = fault_env(pg_url, redis_server, smtp)
    issue_id = seed(rt, addresses)
    newsletter("issues", "send", str(issue_id), env=env)  # frozen; no worker has claimed yet
    newsletter("subscribers", "unsubscribe", leaver, "--list", "world", env=env)
    workers.start(env)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="unsubscribe between freeze and claim",
        eligible=[a for a in addresses if a != leaver],
    )
    row = deliveries(rt, issue_id)[leaver]
    assert row.status.value == "skipped" and row.last_error == "unsubscribed before send"


def test_sixty_consecutive_failures_pause_the_issue_at_fifty(
    pg_url: str,
    rt: Runtime,
    redis_server: RedisServer,
    smtp: FaultSmtpServer,
    workers: Workers,
) -> None:
    """The relay refuses the next 60 recipients. The issue pauses itself at the 50th failure,
    in the middle of its batch; `issues status` says why; after a resume the failed ones are
    retried and everyone gets the digest."""
    addresses = readers(200)
    env = fault_env(pg_url, redis_server, smtp, batch_size=100)
    first = workers.launch(env)
    issue_id = seed(rt, addresses)
    refusals = {"left": 60}

    def refuse(_address: str) -> bool:
        with smtp.recorder.lock:
            if refusals["left"] > 0:
                refusals["left"] -= 1
                return True
            return False

    smtp.recorder.rules.append(("rcpt", refuse, "451 4.7.0 temporary relay failure"))
    first.result()
    newsletter("issues", "send", str(issue_id), env=env)

    def paused_and_settled() -> dict[str, Any] | None:
        st = status_of(rt, issue_id)
        return st if st["status"] == "paused" and st["counts"]["claimed"] == 0 else None

    st = wait_until(paused_and_settled, 60, "the issue to pause itself")
    assert refusals["left"] == 10  # exactly 50 tried: it stopped in the middle of the batch
    assert smtp.recorder.count() == 0
    assert st["counts"]["queued"] == 200
    shown = newsletter("issues", "status", str(issue_id), env=env)
    assert "paused itself after 50 consecutive failed deliveries" in shown
    assert "451 4.7.0 temporary relay failure" in shown
    assert "last errors:" in shown
    assert shown.count("temporary: 451 4.7.0 temporary relay failure") == 5  # the last errors

    newsletter("issues", "resume", str(issue_id), env=env)
    wait_finished(rt, issue_id)
    check_delivery(
        rt,
        issue_id,
        smtp.recorder,
        scenario="60 consecutive failures (auto-pause), resume",
        eligible=addresses,
        note="paused itself at 50",
    )
    assert refusals["left"] == 0
