"""Adaptive batching: concurrent requests merge into one inference call and get their own rows."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cnnkit.serving.batching import MicroBatcher, ThreadBatcher


def doubling(calls):
    def infer(images):
        calls.append(len(images))
        time.sleep(0.02)  # like a model: slow enough for requests to queue up meanwhile
        return {"double": images * 2, "first": images[:, 0]}

    return infer


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls: list[int] = []
    batcher = MicroBatcher(doubling(calls), max_batch_size=16, max_wait_ms=20)

    async def main():
        requests = [np.full((1 + index % 3, 2), index, dtype=np.float32) for index in range(40)]
        results = await asyncio.gather(*(batcher.submit(images) for images in requests))
        for images, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result["double"], images * 2)
            np.testing.assert_array_equal(result["first"], images[:, 0])

    asyncio.run(main())
    assert sum(calls) == sum(1 + index % 3 for index in range(40))
    assert max(calls) <= 16 and len(calls) < 40  # merged, never over the limit
    assert batcher.stats.mean_batch_size > 2


def test_a_lone_request_waits_at_most_the_window():
    calls: list[int] = []
    batcher = MicroBatcher(lambda images: calls.append(len(images)) or {"x": images}, max_wait_ms=30)

    async def main():
        started = time.perf_counter()
        await batcher.submit(np.zeros((1, 2)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    assert calls == [1] and elapsed < 1.0


def test_without_a_wait_a_lone_request_runs_at_once_and_requests_queued_meanwhile_share_a_batch():
    sizes = []

    def slow(images):
        time.sleep(0.05)  # while this batch runs, the other requests queue up
        sizes.append(len(images))
        return {"x": images}

    batcher = MicroBatcher(slow, max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.01)  # the first batch (one image) is running now
        await asyncio.gather(*(batcher.submit(np.zeros((1, 1))) for _ in range(9)))
        await first

    asyncio.run(main())
    assert sizes == [1, 9]


def test_requests_larger_than_a_batch_run_alone():
    calls: list[int] = []
    batcher = MicroBatcher(doubling(calls), max_batch_size=4)
    result = asyncio.run(batcher.submit(np.ones((10, 2))))
    assert calls == [10] and result["double"].shape == (10, 2)


def test_an_inference_error_reaches_every_caller_of_that_batch_and_the_next_batch_works():
    failing = threading.Event()
    failing.set()

    def infer(images):
        time.sleep(0.01)
        if failing.is_set():
            raise RuntimeError("session failed")
        return {"x": images}

    batcher = MicroBatcher(infer, max_wait_ms=20)

    async def main():
        outcomes = await asyncio.gather(*(batcher.submit(np.zeros((1, 1))) for _ in range(3)),
                                        return_exceptions=True)
        assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
        failing.clear()
        return await batcher.submit(np.ones((2, 1)))

    assert asyncio.run(main())["x"].shape == (2, 1)


def test_batch_size_callback_and_limits():
    seen: list[int] = []
    batcher = MicroBatcher(lambda images: {"x": images}, on_batch=seen.append)
    asyncio.run(batcher.submit(np.zeros((3, 1))))
    assert seen == [3]
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda images: {}, max_batch_size=0)


def test_thread_batcher_runs_a_lone_call_in_the_callers_thread():
    from cnnkit.serving.batching import ThreadBatcher

    threads = []

    def infer(images):
        threads.append(threading.get_ident())
        return {"double": images * 2}

    batcher = ThreadBatcher(infer, max_batch_size=4)
    result = batcher.submit(np.ones((1, 3), np.float32))
    assert threads == [threading.get_ident()] and result["double"].tolist() == [[2, 2, 2]]
    # A call larger than a batch runs alone.
    assert batcher.submit(np.ones((6, 3), np.float32))["double"].shape == (6, 3)
    assert (batcher.stats.batches, batcher.stats.images) == (2, 7)


def test_thread_batcher_merges_concurrent_calls_and_shares_errors():
    from concurrent.futures import ThreadPoolExecutor

    from cnnkit.serving.batching import ThreadBatcher

    sizes = []
    gate = threading.Event()

    def infer(images):
        gate.wait(5)  # the first batch holds until the others have queued
        sizes.append(len(images))
        if (images < 0).any():
            raise ValueError("negative pixels")
        return {"same": images.copy()}

    batcher = ThreadBatcher(infer, max_batch_size=8)
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(batcher.submit, np.full((1, 2), index, np.float32)) for index in range(12)]
        time.sleep(0.3)
        gate.set()
        rows = [future.result()["same"][0, 0] for future in futures]
    assert rows == list(range(12))  # every caller gets its own row
    assert max(sizes) > 1 and sum(sizes) == 12 and max(sizes) <= 8
    # One bad call in a batch fails that batch's callers with the error, and the batcher goes on.
    gate.clear()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.submit, np.full((1, 2), value, np.float32)) for value in (1, -1, 2, 3)]
        time.sleep(0.3)
        gate.set()
        outcomes = []
        for future in futures:
            try:
                outcomes.append(float(future.result()["same"][0, 0]))
            except ValueError as error:
                outcomes.append(str(error))
    assert "negative pixels" in outcomes
    assert batcher.submit(np.full((1, 2), 5, np.float32))["same"][0, 0] == 5


def test_the_core_stops_the_batchers_of_retired_versions():
    from types import SimpleNamespace

    from cnnkit.serving.core import InferenceCore

    def version(number):
        return SimpleNamespace(name="m", version=number, run=lambda images, outputs: {"probabilities": images})

    served = [version(1)]
    core = InferenceCore(SimpleNamespace(served_versions=lambda: {(item.name, item.version) for item in served}))

    async def main():
        first = core.batcher(served[0])
        assert (await first.submit(np.ones((1, 2), np.float32)))["probabilities"].shape == (1, 2)
        worker = first._worker
        served[:] = [version(2)]  # version 1 is retired, version 2 takes over
        core.batcher(served[0])
        await asyncio.sleep(0)
        return worker

    worker = asyncio.run(main())
    assert worker.cancelled() and list(core._async_batchers) == [("m", 2)]


def test_a_full_queue_refuses_at_once_and_a_stale_request_is_not_run():
    """Admission control: past max_queue waiting requests, or max_queue_ms of waiting, answer 503."""
    from cnnkit.errors import OverloadedError

    gate = threading.Event()
    ran: list[int] = []

    def slow(images):
        gate.wait(10)
        ran.append(len(images))
        return {"out": images}

    batcher = ThreadBatcher(slow, max_batch_size=4, max_queue=2, max_queue_ms=200)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, np.ones((1, 1), np.float32))  # runs, held at the gate
        time.sleep(0.3)
        queued = [pool.submit(batcher.submit, np.full((1, 1), index, np.float32)) for index in (2, 3)]
        time.sleep(0.3)
        with pytest.raises(OverloadedError, match="2 requests are already waiting") as refused:
            batcher.submit(np.ones((1, 1), np.float32))
        assert refused.value.http_status == 503 and refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        time.sleep(0.3)  # the queued two now wait past 200 ms
        gate.set()
        assert first.result(10)["out"].shape == (1, 1)
        for future in queued:
            with pytest.raises(OverloadedError, match="waited .* ms in the queue"):
                future.result(10)
    assert ran == [1] and batcher.stats.refused == 3  # the stale requests never reached the model
    assert batcher.submit(np.ones((1, 1), np.float32))["out"].shape == (1, 1)  # and it serves again


def test_the_event_loop_batcher_refuses_the_same_way():
    from cnnkit.errors import OverloadedError

    async def main():
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(images):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            return {"out": images}

        batcher = MicroBatcher(slow, max_batch_size=1, max_queue=2, max_queue_ms=150)
        first = asyncio.create_task(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(batcher.submit(np.ones((1, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match="already waiting"):
            await batcher.submit(np.ones((1, 1), np.float32))
        await asyncio.sleep(0.2)
        gate.set()
        assert (await first)["out"].shape == (1, 1)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        batcher.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, OverloadedError) for outcome in outcomes)


def test_an_overloaded_answer_says_when_to_come_back():
    import json

    from cnnkit.errors import OverloadedError
    from cnnkit.serving.http.errors import error_response

    answer = error_response(OverloadedError("busy"))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert json.loads(answer.body) == {"error": "busy"}


def test_the_core_admits_before_decoding_while_the_queue_has_room():
    from types import SimpleNamespace

    from cnnkit.errors import OverloadedError
    from cnnkit.serving.core import InferenceCore

    gate = threading.Event()

    def held(images, outputs):
        gate.wait(10)
        return {"probabilities": images}

    model = SimpleNamespace(name="m", version=1, run=held)
    core = InferenceCore(SimpleNamespace(served_versions=lambda: {("m", 1)}), max_queue=1, max_queue_ms=5000)
    core.admit(model, on_loop=False)  # nothing waits yet
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(core.predict, model, np.ones((1, 2), np.float32))
        time.sleep(0.3)
        waiting = pool.submit(core.predict, model, np.ones((1, 2), np.float32))
        time.sleep(0.3)
        with pytest.raises(OverloadedError):
            core.admit(model, on_loop=False)
        gate.set()
        assert running.result(10)["probabilities"].shape == (1, 2) and waiting.result(10)
    core.admit(model, on_loop=False)
    core.close()
