"""Adaptive batching: concurrent single-image requests for one model run as one ONNX Runtime call.

Each model version gets a :class:`MicroBatcher`. A request submits its (already validated) images
and awaits its slice of the result. A worker task takes whatever has queued up, up to
``max_batch_size`` images, and runs the batch in a thread; requests that arrive meanwhile queue and
form the next batch. So a lone request runs at once (no added latency), and under load batches
grow by themselves. ``max_wait_ms`` (default 0) makes the worker also wait that long for company
after the first request.

Under load the worker also gathers: when the first request of a batch is queued while the event
loop has other callbacks ready to run (calls being read and decoded, answers being sent), it
lets the loop run turn after turn and takes every request submitted meanwhile, until the loop has
nothing else to do, the batch is full, or ``gather_ms`` (default 20 ms) has passed. A lone client
never waits (the loop is idle once its request is queued), while under many clients the batches
fill up with requests the loop was about to submit anyway: for the digits model over gRPC at 64
clients, batches of about 25 instead of 1, and the model runs in a thread beside the loop instead
of in it (see the README's compiled-load figures). Loops without the standard ``_ready`` queue
(uvloop) never gather.

A lone request for a quick model runs in the event loop itself: when no batch is running and none
is queued, the loop has nothing else ready to run, and the model's measured time (a running mean
per image) says the batch takes at most ``inline_ms`` (default 1 ms), handing it to a thread and
back would cost the loop more than the inference (ONNX Runtime releases the interpreter lock while
it computes). For the digits model (about 0.1 ms an image) every request of a lone client runs
this way. Slower models, and every model until its first batch has been timed, batch in a thread
as above.

Admission control: far past capacity, a queue without bounds only makes every answer later. So at
most ``max_queue`` requests wait per model version (more are refused at once with
:class:`~cnnkit.errors.OverloadedError`: HTTP 503 with ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED``),
and a request that waited longer than ``max_queue_ms`` when its batch is formed is refused the same
way instead of being run for a client that has probably given up. Health checks never queue here.

Requests are validated before they are queued, so one caller's bad input never fails another
caller's batch. A batcher queues on the event loop that first submits to it: each front end's
loop has its own (see :class:`cnnkit.serving.core.InferenceCore`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cnnkit.errors import OverloadedError

logger = logging.getLogger(__name__)


# Per event loop, the batcher workers that are yielding a turn while they gather (see _loop_busy).
_GATHERING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


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
        self.seconds_per_image: float | None = None  # running mean of the model's time, once a batch has run

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
        started = time.perf_counter()
        outputs = self.infer(images)
        per_image = (time.perf_counter() - started) / max(1, len(images))
        previous = self.seconds_per_image
        self.seconds_per_image = per_image if previous is None else 0.8 * previous + 0.2 * per_image
        self.stats.batches += 1
        self.stats.images += len(images)
        if self.on_batch is not None:
            self.on_batch(len(images))
        return outputs


class MicroBatcher(Batching):
    """Merge concurrent calls of ``infer(images) -> outputs`` (arrays with a leading batch axis)."""

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], *, max_batch_size: int = 64,
                 max_wait_ms: float = 0.0, on_batch: Callable[[int], None] | None = None,
                 max_queue: int | None = None, max_queue_ms: float | None = None, inline_ms: float = 1.0,
                 gather_ms: float = 20.0):
        super().__init__(infer, max_batch_size, on_batch, max_queue, max_queue_ms)
        self.max_wait = max_wait_ms / 1000
        self.inline_seconds = inline_ms / 1000
        self.inline_batches = 0  # lone requests run in the event loop (see submit)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._running = 0  # batches handed to a thread and not back yet
        self.gather_seconds = gather_ms / 1000

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_worker(self) -> asyncio.Queue[_Pending]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return self._queue

    def close(self) -> None:
        """Stop the worker task; queued calls are cancelled. From any thread: the work is done on
        the batcher's own event loop."""
        worker, queue = self._worker, self._queue
        self._worker = self._queue = None
        if worker is None or queue is None:
            return

        def cancel() -> None:
            worker.cancel()
            while not queue.empty():
                queue.get_nowait().future.cancel()

        loop = worker.get_loop()
        if loop.is_closed():  # nothing runs there any more
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            cancel()
        else:
            loop.call_soon_threadsafe(cancel)

    async def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Queue ``images`` (N, ...) and return the outputs for exactly those N images."""
        queue = self._ensure_worker()
        self._admit(queue.qsize())
        if len(images) > self.max_batch_size:
            # A request bigger than a batch runs on its own rather than being split.
            return await asyncio.to_thread(self._run_batch, images)
        if self._running == 0 and queue.empty() and self._quick(len(images)) and not self._loop_busy():
            # Alone, and the model is quick: handing the batch to a thread and back would cost the
            # loop more than running it here (ONNX Runtime releases the interpreter lock meanwhile).
            self.inline_batches += 1
            return self._run_batch(images)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(images, future))
        return await future

    def _loop_busy(self) -> bool:
        """Whether the running loop has other callbacks ready to run: under load it nearly always
        has (calls being read, answers being sent), for a lone client it has none. The turns that
        other batchers' workers yield while they gather do not count (or two quiet models would
        keep each other gathering). Gathering off (``gather_ms=0``) or a loop without the standard
        ``_ready`` queue: never busy."""
        if self.gather_seconds <= 0:
            return False
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if not ready:
            return False
        return len(ready) > _GATHERING.get(loop, 0)

    def _quick(self, images: int) -> bool:
        """Whether a batch of ``images`` is expected to take at most ``inline_ms`` (never while
        ``max_wait_ms`` asks for company, nor before the model has been timed)."""
        per_image = self.seconds_per_image
        return self.max_wait == 0 and per_image is not None and per_image * images <= self.inline_seconds

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            first = await queue.get()
            pending = [first]
            count = len(first.images)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_wait
            gather_until = loop.time() + self.gather_seconds
            while count < self.max_batch_size:
                if queue.empty() and loop.time() < gather_until and self._loop_busy():
                    # Calls are being read and decoded on this loop: let it run a turn, so that
                    # the ones about to be submitted join this batch.
                    _GATHERING[loop] = _GATHERING.get(loop, 0) + 1
                    try:
                        await asyncio.sleep(0)
                    finally:
                        _GATHERING[loop] -= 1
                    continue
                timeout = deadline - loop.time()
                try:
                    item = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if count + len(item.images) > self.max_batch_size:
                    # Does not fit: run what we have, then start the next batch with it.
                    await self._dispatch(pending)
                    pending, count = [item], len(item.images)
                    deadline = loop.time() + self.max_wait
                    gather_until = loop.time() + self.gather_seconds
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
            self._running += 1
            try:
                outputs = await asyncio.to_thread(self._run_batch, batch)
            finally:
                self._running -= 1
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
