"""With BROKER_URL set, the web app hands work to real Celery workers: the confirmation
email (task newsletter.send_confirmation) and an issue's batches."""

from __future__ import annotations

import time
from collections.abc import Callable

from newsletter.runtime import Runtime
from tests.conftest import SmtpServer, WorkerProcess, cli_env
from tests.web.conftest import ADMIN_TOKEN
from tests.web.helpers import Served, link_in, make_list, wait_for


def test_confirmation_and_send_go_through_the_workers(
    pg_url: str,
    redis_url: str,
    smtp_server: SmtpServer,
    port: int,
    make_runtime: Callable[..., Runtime],
    start_app: Callable[..., Served],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    base_url = f"http://127.0.0.1:{port}"
    rt = make_runtime(
        pg_url,
        broker_url=redis_url,
        smtp_url=smtp_server.url,
        base_url=base_url,
        admin_token=ADMIN_TOKEN,
    )
    make_list(rt, articles=3)
    web = start_app(rt)
    web.client.post("/subscribe/world", data={"email": "ada@example.org", "name": "Ada"})
    time.sleep(0.5)
    assert smtp_server.recorder.messages == []  # queued for a worker, not sent here

    start_worker(
        cli_env(
            database_url=pg_url, broker_url=redis_url, smtp_url=smtp_server.url, base_url=base_url
        ),
        concurrency=1,
    )
    [confirmation] = wait_for(smtp_server.recorder, 1, timeout=60)
    assert confirmation["Subject"] == "Confirm your subscription to World Digest"
    confirmed = web.client.post(link_in(confirmation, "confirm"))
    assert "You are subscribed" in confirmed.text

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    issue_id = web.client.post("/api/issues", json={"list": "world"}, headers=auth).json()["id"]
    started = web.client.post(f"/api/issues/{issue_id}/send", headers=auth)
    assert started.status_code == 202 and started.json()["delivery"] == "workers"
    [_, digest] = wait_for(smtp_server.recorder, 2, timeout=60)
    assert digest["To"].addresses[0].addr_spec == "ada@example.org"
    deadline = time.time() + 30
    while web.client.get(f"/api/issues/{issue_id}", headers=auth).json()["status"] != "sent":
        assert time.time() < deadline, "the issue never finished"
        time.sleep(0.2)
