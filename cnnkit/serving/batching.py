"""Adaptive batching: concurrent single-image requests for one model run as one ONNX Runtime call.

Each model version gets a :class:`MicroBatcher`. A request submits its (already validated) images
and awaits its slice of the result. A worker task takes whatever has queued up, up to
``max_batch_size`` images, and runs the batch in a thread; requests that arrive meanwhile queue and
form the next batch. So a lone request runs at once (no added latency), and under load batches
grow by themselves. ``max_wait_ms`` (default 0) makes the worker also wait that long for company
after the first request.

Admission control: far past capacity, a queue without bounds only makes every answer later. So at
most ``max_queue`` requests wait per model version (more are refused at once with
:class:`~cnnkit.errors.OverloadedError`: HTTP 503 with ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED``),
and a request that waited longer than ``max_queue_ms`` when its batch is formed is refused the same
way instead of being run for a client that has probably given up. Health checks never queue here.

Requests are validated before they are queued, so one caller's bad input never fails another
caller's batch. :class:`ThreadBatcher` does the same for callers on threads (gRPC).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnkit.errors import OverloadedError

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future = field(repr=False)
    queued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    refused: int = 0  # requests turned away: queue full or waited too long

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class Batching:
    """What both batchers share: the inference function, the batch size limit and the counts."""

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch_size: int,
                 on_batch: Callable[[int], None] | None, max_queue: int | None = None,
                 max_queue_ms: float | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1.")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.max_queue_seconds = max_queue_ms / 1000 if max_queue_ms else None
        self.stats = BatchStats()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in a batch."""
        return 0

    def admit(self) -> None:
        """Refuse now (OverloadedError) when the queue is full: call it before decoding a request,
        so that a refusal costs next to nothing."""
        self._admit(self.waiting)

    def _admit(self, waiting: int) -> None:
        """Refuse a request when ``waiting`` requests already queue (the ``max_queue`` bound)."""
        if self.max_queue is not None and waiting >= self.max_queue:
            self.stats.refused += 1
            raise OverloadedError(f"The service is overloaded: {waiting} requests are already waiting for this "
                                  f"model; try again shortly.")

    def _expired(self, queued: float, now: float) -> OverloadedError | None:
        """The error for a request that waited past ``max_queue_ms`` (None while it may still run)."""
        if self.max_queue_seconds is None or now - queued <= self.max_queue_seconds:
            return None
        self.stats.refused += 1
        return OverloadedError(f"The service is overloaded: the request waited {(now - queued) * 1000:.0f} ms "
                               f"in the queue (limit {self.max_queue_seconds * 1000:.0f} ms); try again shortly.")

    def close(self) -> None:
        """Stop whatever runs batches in the background (nothing, unless a subclass has a worker)."""

    def _run_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.infer(images)
        self.stats.batches += 1
        self.stats.images += len(images)
        if self.on_batch is not None:
            self.on_batch(len(images))
        return outputs


class MicroBatcher(Batching):
    """Merge concurrent calls of ``infer(images) -> outputs`` (arrays with a leading batch axis)."""

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], *, max_batch_size: int = 64,
                 max_wait_ms: float = 0.0, on_batch: Callable[[int], None] | None = None,
                 max_queue: int | None = None, max_queue_ms: float | None = None):
        super().__init__(infer, max_batch_size, on_batch, max_queue, max_queue_ms)
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_worker(self) -> asyncio.Queue[_Pending]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return self._queue

    def close(self) -> None:
        """Stop the worker task (call it from the batcher's event loop); queued calls are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
        self._worker = self._queue = None

    async def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Queue ``images`` (N, ...) and return the outputs for exactly those N images."""
        queue = self._ensure_worker()
        self._admit(queue.qsize())
        if len(images) > self.max_batch_size:
            # A request bigger than a batch runs on its own rather than being split.
            return await asyncio.to_thread(self._run_batch, images)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(images, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            first = await queue.get()
            pending = [first]
            count = len(first.images)
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while count < self.max_batch_size:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    item = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if count + len(item.images) > self.max_batch_size:
                    # Does not fit: run what we have, then start the next batch with it.
                    await self._dispatch(pending)
                    pending, count = [item], len(item.images)
                    deadline = asyncio.get_running_loop().time() + self.max_wait
                    continue
                pending.append(item)
                count += len(item.images)
            await self._dispatch(pending)

    async def _dispatch(self, pending: list[_Pending]) -> None:
        now = time.monotonic()
        live = []
        for item in pending:
            if item.future.cancelled():
                continue
            expired = self._expired(item.queued, now)
            if expired is not None:
                item.future.set_exception(expired)
            else:
                live.append(item)
        if not live:
            return
        batch = np.concatenate([item.images for item in live]) if len(live) > 1 else live[0].images
        try:
            outputs = await asyncio.to_thread(self._run_batch, batch)
        except Exception as error:  # noqa: BLE001 - every waiting caller gets the error.
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        start = 0
        for item in live:
            end = start + len(item.images)
            if not item.future.done():
                item.future.set_result({name: value[start:end] for name, value in outputs.items()})
            start = end


@dataclass
class _Waiting:
    images: np.ndarray
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    queued: float = field(default_factory=time.monotonic)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    lead: bool = False


class ThreadBatcher(Batching):
    """The same natural batching for callers on threads (the gRPC server), without an event loop.

    The first caller that finds no batch running runs one itself, in its own thread, so a lone
    request pays no hand-off at all. Callers that arrive meanwhile wait; when the batch is done the
    finishing caller passes the lead to the oldest waiting one, which runs everything queued by
    then (up to ``max_batch_size`` images) as the next batch.
    """

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], *, max_batch_size: int = 64,
                 on_batch: Callable[[int], None] | None = None, max_queue: int | None = None,
                 max_queue_ms: float | None = None):
        super().__init__(infer, max_batch_size, on_batch, max_queue, max_queue_ms)
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._running = False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``images`` (N, ...) in the next batch and return the outputs for exactly those N."""
        with self._lock:
            self._admit(len(self._queue))
        if len(images) > self.max_batch_size:
            return self._run_batch(images)
        item = _Waiting(images)
        with self._lock:
            self._queue.append(item)
            lead = not self._running
            self._running = True
        if not lead:
            item.done.wait()
            if not item.lead:
                return self._result(item)
        # Leading: this caller's item is the oldest queued, so it is in the batch taken now.
        with self._lock:
            batch: list[_Waiting] = []
            count = 0
            while self._queue and (not batch or count + len(self._queue[0].images) <= self.max_batch_size):
                taken = self._queue.pop(0)
                batch.append(taken)
                count += len(taken.images)
        self._dispatch(batch)
        with self._lock:
            if self._queue:
                following = self._queue[0]
                following.lead = True
                following.done.set()
            else:
                self._running = False
        return self._result(item)

    @staticmethod
    def _result(item: _Waiting) -> dict[str, np.ndarray]:
        if item.error is not None:
            raise item.error
        assert item.outputs is not None
        return item.outputs

    def _dispatch(self, waiting: list[_Waiting]) -> None:
        now = time.monotonic()
        batch = []
        for item in waiting:
            item.error = self._expired(item.queued, now)
            if item.error is None:
                batch.append(item)
        for item in waiting:
            if item.error is not None:
                item.lead = False
                item.done.set()
        if not batch:
            return
        try:
            images = np.concatenate([item.images for item in batch]) if len(batch) > 1 else batch[0].images
            outputs = self._run_batch(images)
        except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error.
            for item in batch:
                item.error = error
        else:
            start = 0
            for item in batch:
                end = start + len(item.images)
                item.outputs = {name: value[start:end] for name, value in outputs.items()}
                start = end
        for item in batch:
            item.lead = False
            item.done.set()
