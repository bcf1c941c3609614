"""Retries with exponential backoff for calls that are safe to repeat.

Every SDK call is a read (predictions, feature maps, metadata, health have no side effects), so
all of them are retried on connection errors, "service unavailable" (HTTP 503, gRPC UNAVAILABLE)
and overload (HTTP 429, gRPC RESOURCE_EXHAUSTED from the service's queue: ``OverloadedError``),
waiting at least as long as the server's ``Retry-After`` asks (up to 30 s); invalid input,
not-found and server errors are raised at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """``attempts`` tries in all; waits ``backoff``, ``2*backoff``, ... (at most ``max_backoff``) between
    them, each scaled by a random factor in [0.5, 1] so that many clients do not retry in step."""

    attempts: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}.")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("Retry.backoff and max_backoff must not be negative.")

    def waits(self) -> Iterator[float]:
        """The waits before the 2nd, 3rd, ... attempt."""
        for attempt in range(self.attempts - 1):
            yield min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


NO_RETRY = Retry(attempts=1)
