"""Throttles for RATE_LIMIT (messages per second across all workers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class LocalRateLimiter:
    """A token bucket for one process (the in-process sender)."""

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = per_second
        self.capacity = max(1.0, per_second)
        self.tokens = self.capacity
        self.clock = clock
        self.sleep = sleep
        self.last = clock()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            while True:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                self.sleep((1 - self.tokens) / self.rate)


class RedisRateLimiter:
    """A shared budget per wall-clock second, counted in Redis by every worker.

    Fixed one-second windows: within any window at most `per_second` sends start. A worker
    that finds the window full waits for the next one.
    """

    def __init__(
        self,
        client: Any,
        per_second: float,
        *,
        key: str = "newsletter:rate",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.limit = max(1, int(per_second))
        self.key = key
        self.sleep = sleep

    def __call__(self) -> None:
        while True:
            now = time.time()
            window = int(now)
            key = f"{self.key}:{window}"
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, 5)
            count = pipe.execute()[0]
            if count <= self.limit:
                return
            self.sleep(window + 1 - now)
