"""Prometheus metrics shared by the HTTP and gRPC front ends (exposed on BentoML's /metrics).

Plain prometheus_client metrics, as BentoML recommends: its /metrics route serves the process's
registry (in multi-process mode too), so these appear there beside BentoML's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import prometheus_client

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

requests_total = prometheus_client.Counter(
    name="cnnkit_requests_total",
    documentation="Requests answered, by model, protocol and endpoint.",
    labelnames=["model", "protocol", "endpoint"],
)
errors_total = prometheus_client.Counter(
    name="cnnkit_request_errors_total",
    documentation="Requests refused or failed, by model, protocol, endpoint and status code.",
    labelnames=["model", "protocol", "endpoint", "code"],
)
latency_seconds = prometheus_client.Histogram(
    name="cnnkit_request_seconds",
    documentation="Time to answer a request, by model, protocol and endpoint.",
    labelnames=["model", "protocol", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
batch_size = prometheus_client.Histogram(
    name="cnnkit_inference_batch_size",
    documentation="Images per ONNX Runtime call (adaptive batching merges HTTP requests).",
    labelnames=["model"],
    buckets=BATCH_BUCKETS,
)
images_total = prometheus_client.Counter(
    name="cnnkit_images_total",
    documentation="Images classified, by model.",
    labelnames=["model"],
)


@contextmanager
def observe(model: str, protocol: str, endpoint: str) -> Iterator[None]:
    """Count a request and its latency; count it as an error (with its code) if it raises."""
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        code = getattr(error, "http_status", 500) if protocol == "http" else getattr(error, "grpc_code", "INTERNAL")
        errors_total.labels(model=model, protocol=protocol, endpoint=endpoint, code=str(code)).inc()
        raise
    finally:
        requests_total.labels(model=model, protocol=protocol, endpoint=endpoint).inc()
        latency_seconds.labels(model=model, protocol=protocol, endpoint=endpoint).observe(
            time.perf_counter() - started
        )


def record_batch(model: str, size: int) -> None:
    batch_size.labels(model=model).observe(size)
    images_total.labels(model=model).inc(size)
