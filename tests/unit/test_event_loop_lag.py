"""The event-loop lag metric sees a blocked loop, and logs the stall."""

from __future__ import annotations

import asyncio
import logging
import time

from cnnkit.serving import metrics


def _observed() -> tuple[float, float]:
    samples = {(sample.name, sample.labels.get("loop")): sample.value
               for sample in metrics.event_loop_lag_seconds.collect()[0].samples}
    return (samples.get(("cnnkit_event_loop_lag_seconds_count", "test"), 0.0),
            samples.get(("cnnkit_event_loop_lag_seconds_sum", "test"), 0.0))


def test_a_blocked_loop_shows_as_lag_and_a_logged_stall(caplog):
    async def main() -> None:
        watcher = asyncio.get_running_loop().create_task(metrics.watch_event_loop("test", interval=0.02))
        await asyncio.sleep(0.1)  # a few quiet ticks
        time.sleep(0.4)  # something blocks the loop (a parse, a decode...)
        await asyncio.sleep(0.1)
        watcher.cancel()

    count_before, sum_before = _observed()
    with caplog.at_level(logging.WARNING, logger="cnnkit.serving"):
        asyncio.run(main())
    count_after, sum_after = _observed()
    assert count_after - count_before >= 4
    assert sum_after - sum_before >= 0.3  # the blocked 0.4 s, less the timer's own 20 ms
    assert any("test event loop was blocked for" in record.getMessage() for record in caplog.records)


def test_garbage_collections_are_timed_by_generation():
    import gc

    def full_collections() -> tuple[float, float]:
        samples = {(sample.name, sample.labels.get("generation")): sample.value
                   for sample in metrics.gc_pause_seconds.collect()[0].samples}
        return (samples.get(("cnnkit_gc_pause_seconds_count", "2"), 0.0),
                samples.get(("cnnkit_gc_pause_seconds_sum", "2"), 0.0))

    metrics.time_garbage_collections()
    metrics.time_garbage_collections()  # timed once however often it is called
    count, total = full_collections()
    garbage = [[index] for index in range(200_000)]  # something for the collection to walk
    gc.collect()
    del garbage
    count_after, total_after = full_collections()
    assert count_after >= count + 1  # gc.collect(), and any the allocations set off
    assert total_after > total
    assert sum(getattr(callback, "cnnkit_gc_timer", False) for callback in gc.callbacks) == 1
