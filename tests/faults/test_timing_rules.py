"""The timing rules the fault scenarios rely on, refused at start when broken: a batch task
never waits in a worker longer than Redis's visibility timeout, and retries spread out."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pydantic import ValidationError

from newsletter.config import Settings
from newsletter.ledger.policy import DeliveryPolicy
from newsletter.ratelimit import LocalRateLimiter
from tests.conftest import cli_env
from tests.faults.conftest import newsletter


def settings(**values: Any) -> Settings:
    return Settings(secret_key="k", broker_url="redis://127.0.0.1:1/0", **values)


def test_a_worker_refuses_to_start_when_redis_could_hand_out_a_held_batch() -> None:
    env = cli_env(broker_url="redis://127.0.0.1:1/0", lease_seconds="600", visibility_timeout="600")
    out = newsletter("worker", env=env, check=False)
    assert out.startswith("error: invalid setting")
    assert "NEWSLETTER_VISIBILITY_TIMEOUT (600s) must exceed the lease" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lease_seconds": 3600, "visibility_timeout": 3600}, "VISIBILITY_TIMEOUT (3600s)"),
        ({"retry_max_seconds": 7200}, "VISIBILITY_TIMEOUT (7200s)"),
        ({"lease_seconds": 7141}, "at least 7201s"),
        ({"retry_base_seconds": 120, "retry_max_seconds": 60}, "must not exceed"),
        ({"domain_rate_limits": "gmail.com=fast"}, "'gmail.com=fast' is not DOMAIN="),
        ({"domain_rate_limits": "gmail.com=0"}, "'gmail.com=0' is not DOMAIN="),
        ({"domain_rate_limits": "=5"}, "'=5' is not DOMAIN="),
    ],
)
def test_settings_that_break_the_timing_rules_are_refused(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(**values)


def test_settings_within_the_rules_are_accepted() -> None:
    s = settings(lease_seconds=600, retry_max_seconds=1800, visibility_timeout=1860)
    assert s.visibility_timeout == 1860
    limits = settings(domain_rate_limits=" Gmail.com=50, yahoo.com.=20 ,").domain_limits
    assert limits == {"gmail.com": 50.0, "yahoo.com": 20.0}
    # Without a broker there is no visibility timeout to respect.
    assert Settings(secret_key="k", lease_seconds=7200).lease_seconds == 7200


def test_retries_back_off_exponentially_with_jitter_and_a_ceiling() -> None:
    policy = DeliveryPolicy(retry_base_seconds=60, retry_max_seconds=1800)
    for attempts, ceiling in [(1, 60), (2, 120), (3, 240), (6, 1800), (40, 1800)]:
        delays = [policy.backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, min(delays))
        assert len({round(d, 3) for d in delays}) > 150  # spread: a batch does not retry as one


def test_the_in_process_limiter_spaces_messages_per_domain_and_overall() -> None:
    """Without a broker the same buckets live in the process (a fake clock here)."""
    now = [0.0]
    sent: list[tuple[float, str]] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = LocalRateLimiter(
        10, domain_limits={"slow.example": 2}, clock=lambda: now[0], sleep=sleep
    )
    for i in range(20):
        address = f"r{i}@mx.slow.example" if i % 2 else f"r{i}@example.org"
        limiter(address)
        sent.append((now[0], address))
    overall = [t for t, _ in sent]
    slow = [t for t, a in sent if a.endswith("slow.example")]
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(overall))
    # A domain token is due first, then the overall one: the domain's spacing can shrink by
    # at most one overall interval.
    assert all(b - a >= 0.5 - 0.1 - 1e-9 for a, b in itertools.pairwise(slow))
    assert slow[-1] == pytest.approx(9 * 0.5, abs=0.11)  # ten to slow.example take 4.5 s
