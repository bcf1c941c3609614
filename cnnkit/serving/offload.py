"""Where work on a request's input runs: in the event loop when it is small, in a thread when not.

Both front ends serve inference from an event loop (HTTP: BentoML's; gRPC: the gRPC server's own,
see :mod:`cnnkit.serving.grpc.server`). Decoding a small PNG or parsing 32 KB of JSON takes well
under a millisecond, less than a round trip through a worker thread costs under load, so it runs
in the loop; larger inputs go to a thread, so one large request does not hold up every other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

INLINE_BYTES = 32 * 1024


async def off_loop_if_large(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the event loop for inputs of up to ``INLINE_BYTES``, else in a thread."""
    if size <= INLINE_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


__all__ = ["INLINE_BYTES", "off_loop_if_large"]
