"""Fixed-window counters that stop list bombing on the public subscribe form.

Two limiters share one interface: Redis (shared by every web process) when the broker is a
Redis URL, and memory (one process) otherwise. Keys never hold an address: the form hashes
it with the secret key first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscribeLimits:
    """How often the subscribe form may be used.

    per_ip: form submissions per client IP per ip_window seconds; beyond it the form answers
    429. per_address: confirmation emails per address and list per address_window seconds;
    per_address_all_lists: the same across every list. Beyond those the form answers as
    usual and sends nothing, so a flood cannot fill a stranger's inbox.
    """

    per_ip: int = 20
    ip_window: int = 600
    per_address: int = 1
    per_address_all_lists: int = 5
    address_window: int = 3600


class Limiter(Protocol):
    def hit(self, key: str, limit: int, window: int) -> bool:
        """Count one event under `key`; True while at most `limit` happened in the window."""
        ...


class MemoryLimiter:
    """One process's counters (the default without Redis)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window: int) -> bool:
        now = self._clock()
        with self._lock:
            if len(self._counts) > 100_000:  # drop expired windows now and then
                self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            expires, count = self._counts.get(key, (0.0, 0))
            if expires <= now:
                expires, count = now + window, 0
            count += 1
            self._counts[key] = (expires, count)
            return count <= limit


class RedisLimiter:
    """Counters in Redis, shared by every web process. If Redis cannot be reached the
    count falls back to this process's memory rather than letting every request through."""

    def __init__(self, client: Any, prefix: str = "newsletter:limit:") -> None:
        self._client = client
        self._prefix = prefix
        self._fallback = MemoryLimiter()

    def hit(self, key: str, limit: int, window: int) -> bool:
        name = self._prefix + key
        try:
            pipe = self._client.pipeline()
            pipe.incr(name)
            pipe.expire(name, window, nx=True)
            count = int(pipe.execute()[0])
        except Exception as exc:  # redis.RedisError, OSError: count here instead
            log.warning(
                "rate limiter: Redis unavailable (%s); counting in memory", type(exc).__name__
            )
            return self._fallback.hit(key, limit, window)
        return count <= limit


def make_limiter(broker_url: str) -> Limiter:
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        return RedisLimiter(redis.Redis.from_url(broker_url, socket_timeout=2))
    return MemoryLimiter()
