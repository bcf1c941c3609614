"""Prometheus metrics shared by the HTTP and gRPC front ends (exposed on BentoML's /metrics).

Plain prometheus_client metrics, as BentoML recommends: its /metrics route serves the process's
registry (in multi-process mode too), so these appear there beside BentoML's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import prometheus_client

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

REQUEST_LABELS = ["model", "version", "protocol", "endpoint"]

requests_total = prometheus_client.Counter(
    name="cnnkit_requests_total",
    documentation="Requests answered, by model, version, protocol and endpoint.",
    labelnames=REQUEST_LABELS,
)
errors_total = prometheus_client.Counter(
    name="cnnkit_request_errors_total",
    documentation="Requests refused or failed, by model, version, protocol, endpoint and status code.",
    labelnames=[*REQUEST_LABELS, "code"],
)
latency_seconds = prometheus_client.Histogram(
    name="cnnkit_request_seconds",
    documentation="Time to answer a request, by model, version, protocol and endpoint.",
    labelnames=REQUEST_LABELS,
    buckets=LATENCY_BUCKETS,
)
batch_size = prometheus_client.Histogram(
    name="cnnkit_inference_batch_size",
    documentation="Images per ONNX Runtime call (adaptive batching merges HTTP requests).",
    labelnames=["model"],
    buckets=BATCH_BUCKETS,
)
event_loop_lag_seconds = prometheus_client.Histogram(
    name="cnnkit_event_loop_lag_seconds",
    documentation="How late a serving event loop (http, grpc) ran a timer due every 100 ms: how long something "
                  "blocked it.",
    labelnames=["loop"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
explanations_withdrawn_total = prometheus_client.Counter(
    name="cnnkit_explanations_withdrawn_total",
    documentation="Explanation jobs withdrawn from the worker because their caller went away.",
)
images_total = prometheus_client.Counter(
    name="cnnkit_images_total",
    documentation="Images classified, by model.",
    labelnames=["model"],
)


# Model names seen in the repository. A request naming any other model is labelled "unknown":
# labelling it with whatever name the client sent would let clients create label values (and
# /metrics lines) without end.
UNKNOWN_MODEL = "unknown"
_KNOWN_MODELS: set[str] = set()


def know_models(names: Iterable[str]) -> None:
    """Add the repository's model names to those used as labels as they are (see UNKNOWN_MODEL)."""
    _KNOWN_MODELS.update(names)


def model_label(name: str) -> str:
    return name if name == "-" or name in _KNOWN_MODELS else UNKNOWN_MODEL


@dataclass
class Observation:
    """The labels of one request: the model and version become known once the request names them."""

    model: str = "-"
    version: str = "-"
    code: str | None = None

    def served(self, name: str, version: int) -> None:
        self.model, self.version = name, str(version)
        _KNOWN_MODELS.add(name)


_CURRENT: ContextVar[Observation | None] = ContextVar("cnnkit_observation", default=None)


def served(name: str, version: int) -> None:
    """Label the request being observed (if any) with the model version that answers it."""
    observation = _CURRENT.get()
    if observation is not None:
        observation.served(name, version)


@contextmanager
def observe(protocol: str, endpoint: str, model: str = "-") -> Iterator[Observation]:
    """Count a request and its latency; count it as an error (with its code) if it raises, or if
    the handler sets ``code`` (a refusal answered without raising). Call ``served(name, version)``
    on the yielded record once the model version is resolved."""
    started = time.perf_counter()
    observation = Observation(model=model)
    token = _CURRENT.set(observation)
    try:
        yield observation
    except Exception as error:
        observation.code = str(getattr(error, "http_status", 500) if protocol == "http"
                               else getattr(error, "grpc_code", "INTERNAL"))
        raise
    finally:
        _CURRENT.reset(token)
        labels = {"model": model_label(observation.model), "version": observation.version, "protocol": protocol,
                  "endpoint": endpoint}
        if observation.code is not None:
            errors_total.labels(**labels, code=observation.code).inc()
        requests_total.labels(**labels).inc()
        latency_seconds.labels(**labels).observe(time.perf_counter() - started)


def record_batch(model: str, size: int) -> None:  # model: a served model's name
    batch_size.labels(model=model).observe(size)
    images_total.labels(model=model).inc(size)


STALL_SECONDS = 0.25  # a lag this long is logged: every request waiting on the loop waited that long

gc_pause_seconds = prometheus_client.Histogram(
    name="cnnkit_gc_pause_seconds",
    documentation="How long each garbage collection of the server process stopped it, by generation.",
    labelnames=["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def time_garbage_collections() -> None:
    """Time every collection of this process's garbage collector (``gc_pause_seconds``): a full
    collection stops every thread, the event loop included, for as long as it walks the heap."""
    import gc
    import time

    started: list[float] = [0.0]
    # Children are created per generation once, so the callback does no label lookup.
    by_generation = [gc_pause_seconds.labels(generation=str(generation)) for generation in range(3)]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pause = time.perf_counter() - started[0]
            by_generation[info["generation"]].observe(pause)
            if pause >= STALL_SECONDS:
                logging.getLogger("cnnkit.serving").warning(
                    "a garbage collection (generation %d) stopped the process for %.0f ms", info["generation"],
                    pause * 1000)

    if not any(getattr(existing, "cnnkit_gc_timer", False) for existing in gc.callbacks):
        callback.cnnkit_gc_timer = True  # type: ignore[attr-defined]
        gc.callbacks.append(callback)


async def watch_event_loop(name: str = "http", interval: float = 0.1) -> None:
    """Measure, forever, how late the running event loop (``name``: http or grpc) wakes a timer
    (``event_loop_lag_seconds``) and log the stalls: anything that blocks the loop (parsing,
    decoding, a slow call) delays every request it serves, and this is where it shows."""
    loop = asyncio.get_running_loop()
    lag_seconds = event_loop_lag_seconds.labels(loop=name)
    logger = logging.getLogger("cnnkit.serving")
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - started - interval)
        lag_seconds.observe(lag)
        if lag >= STALL_SECONDS:
            logger.warning("the %s event loop was blocked for %.0f ms", name, lag * 1000)
