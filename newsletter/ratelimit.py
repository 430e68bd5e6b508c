"""Throttles for RATE_LIMIT (messages per second across all workers) and DOMAIN_RATE_LIMITS
(messages per second to one destination domain, e.g. gmail.com=50).

A throttle is called once per message, with the recipient's address, just before the message
is handed to the SMTP server; it returns when the message may go.

Both limiters are token buckets that hold at most `burst` tokens (one by default) and gain
`rate` tokens a second: messages leave evenly spaced, and never more than `burst + rate * t`
in any t seconds. A caller that finds the bucket empty takes a token anyway (the count goes
negative) and sleeps until its token is due: the debt is a reservation, so callers are served
in arrival order and nobody polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Throttle(Protocol):
    def __call__(self, recipient: str) -> None: ...


def limited_domain(recipient: str, limits: Mapping[str, Any]) -> str | None:
    """The configured domain that governs this recipient: its own, or the nearest parent
    (mx.gmail.com falls under gmail.com)."""
    domain = recipient.rpartition("@")[2].strip().lower().rstrip(".")
    while domain:
        if domain in limits:
            return domain
        domain = domain.partition(".")[2]
    return None


class TokenBucket:
    """One bucket, in memory. `reserve` takes a token and returns how long to wait for it."""

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.capacity = max(1.0, burst)
        self.tokens = self.capacity
        self.stamp: float | None = None

    def reserve(self, now: float) -> float:
        if self.stamp is None:
            self.stamp = now
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class LocalRateLimiter:
    """Token buckets for one process (the in-process sender, or a worker cut off from Redis)."""

    def __init__(
        self,
        per_second: float,
        *,
        domain_limits: Mapping[str, float] | None = None,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.overall = TokenBucket(per_second, burst) if per_second > 0 else None
        self.domains = {d: TokenBucket(r, burst) for d, r in (domain_limits or {}).items()}
        self.clock = clock
        self.sleep = sleep
        self.lock = threading.Lock()

    def __call__(self, recipient: str = "") -> None:
        # The domain first: its wait is the long one, and the overall token is then taken
        # at the moment the message really leaves.
        domain = limited_domain(recipient, self.domains)
        if domain is not None:
            self._take(self.domains[domain])
        if self.overall is not None:
            self._take(self.overall)

    def _take(self, bucket: TokenBucket) -> None:
        with self.lock:
            wait = bucket.reserve(self.clock())
        if wait > 0:
            self.sleep(wait)


# One token from one bucket, atomically, on Redis's clock (every worker agrees on the time).
# KEYS[1]: the bucket. ARGV[1]: tokens per second. ARGV[2]: capacity (burst).
# Returns the seconds the caller must wait for its token, as a string ("0": it was there).
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * rate)
  stamp = now
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'stamp', string.format('%.6f', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
if tokens >= 0 then
  return '0'
end
return string.format('%.6f', -tokens / rate)
"""


class RedisRateLimiter:
    """Token buckets shared by every worker, kept in Redis and updated by one Lua script.

    If Redis cannot be reached, each process falls back to its own buckets at the same rates
    (logged) until Redis answers again: sending goes on, and the limit holds per process.
    """

    def __init__(
        self,
        client: Any,
        per_second: float,
        *,
        domain_limits: Mapping[str, float] | None = None,
        burst: float = 1.0,
        key: str = "newsletter:rate",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.rate = per_second
        self.domain_limits = dict(domain_limits or {})
        self.burst = max(1.0, burst)
        self.key = key
        self.sleep = sleep
        self.script = client.register_script(BUCKET_SCRIPT)
        self.fallback = LocalRateLimiter(
            per_second, domain_limits=self.domain_limits, burst=burst, sleep=sleep
        )
        self._warned_at = 0.0

    def __call__(self, recipient: str = "") -> None:
        domain = limited_domain(recipient, self.domain_limits)
        try:
            if domain is not None:
                self._take(f"{self.key}:domain:{domain}", self.domain_limits[domain])
            if self.rate > 0:
                self._take(f"{self.key}:all", self.rate)
        except Exception as exc:  # redis.RedisError and socket errors: never stop a send
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("rate limiter: Redis unavailable (%s); limiting per process", exc)
            self.fallback(recipient)

    def _take(self, key: str, rate: float) -> None:
        wait = float(self.script(keys=[key], args=[repr(float(rate)), repr(self.burst)]))
        if wait > 0:
            self.sleep(wait)


def make_throttle(
    per_second: float, domain_limits: Mapping[str, float], *, broker_url: str = ""
) -> Throttle | None:
    """The throttle the settings ask for: shared through Redis when the broker is Redis,
    otherwise per process. None when nothing is limited."""
    if not per_second and not domain_limits:
        return None
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        return RedisRateLimiter(client, per_second, domain_limits=domain_limits)
    return LocalRateLimiter(per_second, domain_limits=domain_limits)
