"""cnnkit.serving.process: services started for tests and benchmarks do not outlive their starter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

STARTER = textwrap.dedent("""
    import subprocess, sys, time
    from cnnkit.serving.process import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             start_new_session=True, preexec_fn=die_with_parent)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_started_child_ends_when_its_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert starter.stdout is not None
    child = int(starter.stdout.readline())
    try:
        assert not _gone(child)
        starter.send_signal(signal.SIGKILL)  # no chance to clean up
        starter.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), "the child outlived its killed starter"
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.data
@pytest.mark.parametrize("busy", ["--grpc-port", "--http-port"])
def test_a_busy_port_stops_serve_at_once_with_one_line(busy, digits_repository):
    import socket

    from cnnkit.serving.process import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {"--grpc-port": str(free_port()), "--http-port": str(free_port())}
        ports[busy] = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "cnnkit", "serve", "--repository", str(digits_repository),
                                 *[item for pair in ports.items() for item in pair]],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{ports[busy]} is not free" in lines[0] and busy in lines[0], result.stderr


@pytest.mark.data
def _sigterm_under_load(service, client, clients: int, stop, probe) -> tuple[float, list]:
    """Run ``clients`` threads of ``client`` against ``service``, SIGTERM it after a second, and call
    ``probe()`` every 0.1 s until it exits (which must be with 0); returns (when it was signalled,
    [(moment, probe answer)...]). The clients stop when ``stop`` is set."""
    import threading
    import time

    threads = [threading.Thread(target=client) for _ in range(clients)]
    observed = []
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        os.kill(service.pid, signal.SIGTERM)
        while service.process.poll() is None and time.monotonic() - signalled < 60:
            observed.append((time.monotonic(), probe()))
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert service.process.wait(60) == 0, service.log_tail()
    finally:
        stop.set()
        service.stop()
    return signalled, observed


def test_sigterm_drains_the_service_without_losing_an_admitted_request(digits_repository, tmp_path):
    """SIGTERM to `cnnkit serve` (as Kubernetes sends it) during a 16-client load: readiness turns 503
    first while predictions are still answered, every request the service took is answered 200, and
    the process exits 0."""
    import base64
    import contextlib
    import io
    import shutil
    import threading
    import time

    import httpx
    import numpy as np
    from PIL import Image
    from services import RunningService

    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    body = {"model": "digits", "images": [base64.b64encode(png.getvalue()).decode()]}
    service = RunningService(repository, environment={"CNNKIT_DRAIN_SECONDS": "2"})
    answers: list[tuple[float, int]] = []
    failures: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    answers.append((time.monotonic(), http.post("/predict_json", json=body).status_code))
                except httpx.TransportError as error:  # refused or closed before the request was taken
                    failures.append((time.monotonic(), type(error).__name__))
                    time.sleep(0.05)

    def ready():
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{service.url}/readyz", timeout=5).status_code
        return None

    signalled, observed = _sigterm_under_load(service, client, 16, stop, ready)
    readiness = [(moment, status) for moment, status in observed if status is not None]
    assert {status for _, status in answers} == {200}  # nothing the service took was lost or failed
    not_ready = [moment for moment, status in readiness if status == 503]
    assert not_ready, readiness  # readiness turned 503 first ...
    assert [status for moment, status in answers if moment > not_ready[0]]  # ... while requests were still served
    assert all(moment > signalled for moment, _ in failures)  # refusals only once it stopped taking connections


def test_sigterm_drains_grpc_too_health_first_then_calls_in_flight_finish(digits_repository, tmp_path):
    """SIGTERM during gRPC load: health answers NOT_SERVING at once while Predict calls are still
    answered for the whole drain window; only then are calls refused; the process exits 0."""
    import io
    import shutil
    import threading
    import time

    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from PIL import Image
    from services import RunningService

    from cnnkit_client.protos.tfs import predict_pb2, prediction_service_pb2_grpc
    from cnnkit_client.tensors import to_tensor_proto

    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(to_tensor_proto(np.array([png.getvalue()], dtype=object)))
    service = RunningService(repository, environment={"CNNKIT_DRAIN_SECONDS": "2"})
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(service.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.Predict(request, timeout=30)
                    answers.append((time.monotonic(), "OK"))
                except grpc.RpcError as error:
                    answers.append((time.monotonic(), error.code().name))
                    time.sleep(0.05)

    with grpc.insecure_channel(service.grpc_target) as channel:
        checks = health_pb2_grpc.HealthStub(channel)

        def healthy():
            try:
                status = checks.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                return error.code().name

        signalled, health = _sigterm_under_load(service, client, 8, stop, healthy)
    assert [status for moment, status in answers if moment < signalled] and \
        {status for moment, status in answers if moment < signalled} == {"OK"}
    not_serving = [moment for moment, status in health if status == "NOT_SERVING"]
    assert not_serving, health[:5]  # health turned first ...
    during_drain = [status for moment, status in answers if moment < signalled + 2.0]
    assert set(during_drain) == {"OK"}  # ... and for the 2 s drain every call was answered
    assert [moment for moment, status in answers if status == "OK" and moment > not_serving[0]]
    # When the server stops, calls that race with it are refused (UNAVAILABLE), or cancelled if the
    # transport had taken them but no handler had (grpcio's thread-pool server did the same).
    assert {status for _, status in answers} <= {"OK", "UNAVAILABLE", "CANCELLED"}, answers[-5:]
