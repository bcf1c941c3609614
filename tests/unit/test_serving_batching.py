"""Adaptive batching: concurrent requests merge into one inference call and get their own rows."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cnnkit.serving.batching import MicroBatcher


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
        return worker, list(core.loop_batchers())

    worker, versions = asyncio.run(main())
    assert worker.cancelled() and versions == [("m", 2)]


def test_a_full_queue_refuses_at_once_and_a_stale_request_is_not_run():
    """Admission control: past max_queue waiting requests, or max_queue_ms of waiting, answer 503."""
    from cnnkit.errors import OverloadedError

    ran: list[int] = []

    async def main():
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(images):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            ran.append(len(images))
            return {"out": images}

        batcher = MicroBatcher(slow, max_batch_size=4, max_queue=2, max_queue_ms=150)
        first = asyncio.create_task(batcher.submit(np.ones((1, 1), np.float32)))  # runs, held at the gate
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(batcher.submit(np.full((1, 1), index, np.float32))) for index in (2, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match="2 requests are already waiting") as refused:
            await batcher.submit(np.ones((1, 1), np.float32))
        assert refused.value.http_status == 503 and refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        await asyncio.sleep(0.2)  # the queued two now wait past 150 ms
        gate.set()
        assert (await first)["out"].shape == (1, 1)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        again = await batcher.submit(np.ones((1, 1), np.float32))  # and it serves again
        batcher.close()
        return outcomes, again, batcher.stats.refused

    outcomes, again, refused = asyncio.run(main())
    assert all(isinstance(outcome, OverloadedError) and "waited" in str(outcome) for outcome in outcomes)
    assert ran == [1, 1] and refused == 3  # the stale requests never reached the model
    assert again["out"].shape == (1, 1)


def test_each_event_loop_gets_its_own_batchers_and_they_close_from_any_thread():
    """HTTP and gRPC serve from two loops: a batcher queues on the loop that made it, so each loop
    has its own, and closing the core (from neither loop) stops the workers on both."""
    from types import SimpleNamespace

    from cnnkit.serving.core import InferenceCore

    model = SimpleNamespace(name="m", version=1, run=lambda images, outputs: {"probabilities": images * 2})
    core = InferenceCore(SimpleNamespace(served_versions=lambda: {("m", 1)}))
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()

    async def predict_on_this_loop():
        answer = await core.predict(model, np.ones((1, 2), np.float32))
        return core.batcher(model), answer["probabilities"]

    try:
        made = [asyncio.run_coroutine_threadsafe(predict_on_this_loop(), loop).result(10) for loop in loops]
        (first, first_answer), (second, second_answer) = made
        assert first is not second and first._worker.get_loop() is loops[0] and second._worker.get_loop() is loops[1]
        assert first_answer.tolist() == second_answer.tolist() == [[2.0, 2.0]]
        workers = [first._worker, second._worker]
        core.close()  # from the main thread
        time.sleep(0.2)
        assert all(worker.cancelled() for worker in workers)
    finally:
        for loop, thread in zip(loops, threads, strict=True):
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


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

    async def main():
        core.admit(model)  # nothing waits yet
        running = asyncio.create_task(core.predict(model, np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(core.predict(model, np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.2)
        with pytest.raises(OverloadedError):
            core.admit(model)
        gate.set()
        assert (await running)["probabilities"].shape == (1, 2) and await waiting
        core.admit(model)
        core.close_loop_batchers()

    asyncio.run(main())
    core.close()


def test_a_lone_request_for_a_quick_model_runs_in_the_event_loop():
    """Once the model is timed as quick, a request that finds nothing running or queued runs in the
    loop's own thread; a slow model, or inline_ms=0, always runs in a thread."""

    def recorder(seconds: float):
        threads: list[int] = []

        def infer(images):
            threads.append(threading.get_ident())
            time.sleep(seconds)
            return {"out": images}

        return threads, infer

    async def lone_requests(batcher: MicroBatcher) -> int:
        for _ in range(3):
            await batcher.submit(np.ones((1, 2), np.float32))
        batcher.close()
        return threading.get_ident()

    quick_threads, quick = recorder(0.0)
    quick_batcher = MicroBatcher(quick)
    loop_thread = asyncio.run(lone_requests(quick_batcher))
    # The first batch (not yet timed) ran in a thread, the next two in the loop.
    assert quick_threads[0] != loop_thread and quick_threads[1:] == [loop_thread, loop_thread]
    assert quick_batcher.inline_batches == 2 and quick_batcher.stats.batches == 3

    slow_threads, slow = recorder(0.005)  # 5 ms a batch, over the 1 ms default
    loop_thread = asyncio.run(lone_requests(MicroBatcher(slow)))
    assert len(slow_threads) == 3 and loop_thread not in slow_threads
    never_threads, never = recorder(0.0)
    never_batcher = MicroBatcher(never, inline_ms=0)
    loop_thread = asyncio.run(lone_requests(never_batcher))
    assert loop_thread not in never_threads and never_batcher.inline_batches == 0


def test_requests_arriving_while_a_batch_runs_still_form_the_next_batch():
    """The quick path is for lone requests only: with a batch in a thread, callers queue and merge."""
    sizes: list[int] = []

    async def main():
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def infer(images):
            if sizes:  # after the first (timing) batch, hold each batch until the gate opens
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            sizes.append(len(images))
            return {"out": images}

        batcher = MicroBatcher(infer, inline_ms=0)  # every batch in a thread, so one can be held
        await batcher.submit(np.ones((1, 1), np.float32))
        held = asyncio.create_task(batcher.submit(np.ones((1, 1), np.float32)))  # runs in a thread, held
        await asyncio.sleep(0.05)
        batcher.inline_seconds = 1.0  # now any batch would be quick enough to run inline, were it alone
        followers = [asyncio.create_task(batcher.submit(np.full((1, 1), index, np.float32))) for index in range(5)]
        await asyncio.sleep(0.05)
        gate.set()
        await held
        rows = [float((await follower)["out"][0, 0]) for follower in followers]
        batcher.close()
        return rows, batcher.inline_batches

    rows, inline = asyncio.run(main())
    assert rows == [0.0, 1.0, 2.0, 3.0, 4.0] and inline == 0
    assert sizes[-1] == 5  # the five that arrived while a batch ran formed one batch


def _timed_quick_batcher(sizes: list[int], **options) -> MicroBatcher:
    """A batcher for a quick model (0.1 ms an image, already timed), recording its batch sizes."""

    def infer(images):
        sizes.append(len(images))
        return {"out": images}

    batcher = MicroBatcher(infer, **options)
    batcher.seconds_per_image = 0.0001
    return batcher


async def _busy_clients(batcher: MicroBatcher, clients: int) -> list[float]:
    """``clients`` callers that each read their request over a few loop turns (as a server's
    calls do) and then submit it: while some submit, the others keep the loop busy."""

    async def client(index: int) -> float:
        for _ in range(index % 4):
            await asyncio.sleep(0)
        return float((await batcher.submit(np.full((1, 1), index, np.float32)))["out"][0, 0])

    rows = await asyncio.gather(*(client(index) for index in range(clients)))
    batcher.close()
    return rows


def test_under_a_busy_loop_a_batch_gathers_the_calls_about_to_be_submitted():
    """A quick model under many clients: with gathering, the calls the loop submits over the next
    turns join one batch; without it (gather_ms=0), each runs alone in the loop."""
    gathered: list[int] = []
    batcher = _timed_quick_batcher(gathered)
    rows = asyncio.run(_busy_clients(batcher, 40))
    assert rows == [float(index) for index in range(40)]
    assert sum(gathered) == 40 and max(gathered) >= 8 and batcher.inline_batches == 0

    alone: list[int] = []
    never = _timed_quick_batcher(alone, gather_ms=0)
    asyncio.run(_busy_clients(never, 40))
    assert alone == [1] * 40 and never.inline_batches == 40


def test_a_lone_client_never_gathers():
    sizes: list[int] = []
    batcher = _timed_quick_batcher(sizes, gather_ms=2000)

    async def main():
        started = time.perf_counter()
        for index in range(5):
            await batcher.submit(np.full((1, 1), index, np.float32))
        batcher.close()
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    # The first request finds the batcher's new worker about to start (one ready callback) and is
    # queued; it still runs at once. Every later one runs in the loop.
    assert sizes == [1] * 5 and batcher.inline_batches == 4 and elapsed < 1.0


def test_two_quiet_batchers_do_not_keep_each_other_gathering():
    """Each gathering worker yields a turn of the loop; another batcher must not take that for
    calls on the way, or two models with one request each would both wait out gather_ms."""
    first_sizes: list[int] = []
    second_sizes: list[int] = []
    first = _timed_quick_batcher(first_sizes, gather_ms=2000)
    second = _timed_quick_batcher(second_sizes, gather_ms=2000)

    async def main():
        started = time.perf_counter()
        await asyncio.gather(first.submit(np.ones((1, 1), np.float32)), second.submit(np.ones((1, 1), np.float32)))
        first.close()
        second.close()
        return time.perf_counter() - started

    assert asyncio.run(main()) < 1.0
    assert first_sizes == [1] and second_sizes == [1]


def test_gathering_ends_at_gather_ms_on_a_loop_that_never_rests():
    sizes: list[int] = []
    batcher = _timed_quick_batcher(sizes, gather_ms=50)

    async def main():
        stop = asyncio.Event()

        async def spinner():
            while not stop.is_set():
                await asyncio.sleep(0)

        spinning = asyncio.create_task(spinner())
        await asyncio.sleep(0)
        started = time.perf_counter()
        await batcher.submit(np.ones((1, 1), np.float32))
        elapsed = time.perf_counter() - started
        stop.set()
        await spinning
        batcher.close()
        return elapsed

    elapsed = asyncio.run(main())
    assert sizes == [1] and 0.04 <= elapsed < 1.0
