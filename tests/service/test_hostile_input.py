"""The hostile-input corpus (cnnkit.loadtests.hostile, generated in memory) against the shared real
service on 127.0.0.1.

Each case must be refused with a 4xx / INVALID_ARGUMENT and a message, without the server
allocating what the request claims or its event loop stalling (health checks keep answering), and
the service must keep serving afterwards. ``benchmarks/hostile_input.py`` measures the same cases.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import threading
import time

import httpx
import psutil
import pytest

from cnnkit.loadtests.hostile import corpus, digit_png

pytestmark = pytest.mark.data

CASES = {case.name: case for case in corpus()}


def _resident(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root, *root.children(recursive=True)])


class HealthProbe(threading.Thread):
    """GET /livez every 20 ms until stopped, keeping each latency."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as probe:
            while not self.stopping.is_set():
                started = time.perf_counter()
                try:
                    if probe.get("/livez").status_code != 200:
                        self.failures.append("not 200")
                except httpx.HTTPError as error:
                    self.failures.append(type(error).__name__)
                self.latencies.append(time.perf_counter() - started)
                self.stopping.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.join()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_clearly_and_the_service_keeps_serving(service, name):
    case = CASES[name]
    before = _resident(service.pid)
    with HealthProbe(service.url) as health:
        outcomes = case.send(service.url, service.grpc_target)
    for outcome in outcomes:
        assert case.accepts(outcome), (outcome.status, outcome.message[:400])
        assert outcome.seconds < 10, outcome.seconds  # milliseconds to a few seconds (benchmarked)
        assert "\n" not in outcome.message.strip()
    # Nothing like what the request claims (gigabytes) was allocated; five 19 MB bodies held and
    # parsed at once legitimately take a few hundred megabytes.
    assert _resident(service.pid) - before < 768 * 2**20
    # The issue measured /livez missing a 1 s timeout in 83% of probes during the 19 MB bodies;
    # the aim is 50 ms, which benchmarks/hostile_input.py reports.
    assert not health.failures and max(health.latencies, default=0) < 1.0, sorted(health.latencies)[-3:]
    answer = httpx.post(f"{service.url}/predict_json", timeout=30, json={
        "model": "digits", "images": [base64.b64encode(digit_png()).decode()]})
    assert answer.status_code == 200, answer.text


def test_an_image_named_image_once_is_still_accepted(service):
    """TF Serving's named-input form {"image": {"b64": ...}} stays valid; only repeats are refused."""
    answer = httpx.post(f"{service.url}/v1/models/digits:predict", timeout=30, json={
        "instances": [{"image": {"b64": base64.b64encode(digit_png()).decode()}}]})
    assert answer.status_code == 200, answer.text


def _withdrawn(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(r"^cnnkit_explanations_withdrawn_total (\S+)$", text, re.MULTILINE)
    assert match, "no cnnkit_explanations_withdrawn_total in /metrics"
    return float(match[1])


def _wait_for_withdrawals(url: str, count: float) -> None:
    deadline = time.monotonic() + 30
    while _withdrawn(url) < count:
        assert time.monotonic() < deadline, "the explanation was not withdrawn"
        time.sleep(0.1)


# Every filter of conv3 at 200 steps: tens of seconds of gradient ascent on 2 cores. A fresh seed
# per request keeps the pattern cache out of it.
def _long_patterns() -> dict:
    return {"model": "digits", "layer": "conv3", "filters": 120, "steps": 200, "seed": secrets.randbelow(10**9)}


def test_explanations_whose_clients_hang_up_are_withdrawn(service):
    """HTTP: a client that closes its connection before the answer withdraws its explanation, so
    the next caller is not queued behind work nobody will read."""
    before = _withdrawn(service.url)
    body = json.dumps(_long_patterns()).encode()
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /filter_patterns HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(1.0)
    _wait_for_withdrawals(service.url, before + 1)
    started = time.monotonic()
    answer = httpx.post(f"{service.url}/filter_patterns", timeout=60,
                        json={"model": "digits", "layer": "conv1", "filters": 2, "steps": 3})
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < 15, "the next explanation waited for the withdrawn one"


def test_explanations_whose_grpc_calls_end_early_are_withdrawn(service):
    """gRPC: a call cancelled by its client, or past its deadline, withdraws its explanation."""
    import grpc

    before = _withdrawn(service.url)
    with grpc.insecure_channel(service.grpc_target) as channel:
        call = channel.unary_unary("/cnnkit.v1.Extensions/FilterPatterns")
        with pytest.raises(grpc.RpcError) as raised:
            call(json.dumps(_long_patterns()).encode(), timeout=1.0)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for_withdrawals(service.url, before + 1)
        future = call.future(json.dumps(_long_patterns()).encode(), timeout=60)
        time.sleep(1.0)
        future.cancel()
        _wait_for_withdrawals(service.url, before + 2)
