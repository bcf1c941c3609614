"""What the four clients share: a method as a *plan* (the calls it needs and a function that turns
their answers into the result, or into a further plan), and running one with retries.

Each client supplies only ``attempt(call)``: one try of one call, raising SDK errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cnnkit_client.errors import RETRIABLE
from cnnkit_client.retry import Retry

T = TypeVar("T")

# Explanations can be slow the first time (the service starts TensorFlow, computes filter patterns):
# unless a call says otherwise, they wait at least this long.
SLOW_CALL_TIMEOUT = 120.0


def slow_timeout(requested: float | None, default: float | None) -> float | None:
    """The timeout of a slow call: the one asked for, else the client's, raised to SLOW_CALL_TIMEOUT."""
    if requested is not None:
        return requested
    return None if default is None else max(default, SLOW_CALL_TIMEOUT)


@dataclass
class Plan(Generic[T]):
    calls: list[Any]
    finish: Callable[[list[Any]], T | Plan[T]]


# A server's Retry-After longer than this is not waited for (the call fails with the overload error).
MAX_RETRY_AFTER = 30.0


def retry_wait(error: Exception, backoff: float) -> float:
    """The backoff, or the server's Retry-After if it asked for longer (up to MAX_RETRY_AFTER)."""
    asked = getattr(error, "retry_after", None)
    return backoff if asked is None else max(backoff, min(float(asked), MAX_RETRY_AFTER))


def run(plan: Plan[T], attempt: Callable[[Any], Any], retry: Retry) -> T:
    """Send the plan's calls one after the other, each retried as ``retry`` says, until a result."""

    def send(call: Any) -> Any:
        waits = retry.waits()
        while True:
            try:
                return attempt(call)
            except RETRIABLE as error:
                wait = next(waits, None)
                if wait is None:
                    raise
                time.sleep(retry_wait(error, wait))

    while True:
        result = plan.finish([send(call) for call in plan.calls])
        if not isinstance(result, Plan):
            return result
        plan = result


async def arun(plan: Plan[T], attempt: Callable[[Any], Awaitable[Any]], retry: Retry) -> T:
    """The same with asyncio: a plan's calls are sent concurrently."""

    async def send(call: Any) -> Any:
        waits = retry.waits()
        while True:
            try:
                return await attempt(call)
            except RETRIABLE as error:
                wait = next(waits, None)
                if wait is None:
                    raise
                await asyncio.sleep(retry_wait(error, wait))

    while True:
        result = plan.finish(list(await asyncio.gather(*(send(call) for call in plan.calls))))
        if not isinstance(result, Plan):
            return result
        plan = result
