"""The ledger's timing policy: leases, retries and their backoff, the failure brake."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta

from newsletter.feedback_figures import FeedbackPolicy


def backoff(attempt: int, *, base: float, ceiling: float, jitter: bool = True) -> float:
    """The product's one retry delay (deliveries, and the worker's task retries): `base`
    for the first attempt, doubled for each one after it, at most `ceiling`; with `jitter`
    a random point in its upper half, which spreads the retries of a batch."""
    delay = min(ceiling, base * 2 ** max(attempt - 1, 0))
    return delay / 2 + random.random() * delay / 2 if jitter else delay


@dataclass(frozen=True)
class DeliveryPolicy:
    lease_seconds: int = 600
    retry_base_seconds: float = 60
    retry_max_seconds: float = 1800
    retry_deadline: timedelta = timedelta(hours=24)
    max_consecutive_failures: int = 50
    # How soon a worker in the middle of a batch notices a pause or a cancel.
    status_check_seconds: float = 1.0
    # What a refusal at RCPT does to the reader: the same policy as a returned DSN.
    feedback: FeedbackPolicy = field(default_factory=FeedbackPolicy)
    # The suppression store's key (newsletter.suppression): a claim skips suppressed
    # addresses, even those frozen before they were suppressed. None: no such check.
    suppression_key: str | None = field(default=None, repr=False)

    def backoff(self, attempts: int) -> float:
        """A temporary failure's retry delay, jittered: spreads the retries of a batch."""
        return backoff(attempts, base=self.retry_base_seconds, ceiling=self.retry_max_seconds)

    @property
    def renew_seconds(self) -> float:
        """A live worker renews its lease this often: three chances before it runs out."""
        return max(1.0, self.lease_seconds / 3)

    @property
    def lease_margin(self) -> float:
        """A worker stops sending this long before its lease would run out unrenewed."""
        return max(1.0, self.lease_seconds / 10)
