"""Serving faults and operator traps (issue 22), each against a real service on 127.0.0.1 (or the
SDK): stalled uploads, metric labels, kill -9, bad metadata, retried
versions, one readiness for both protocols, echoed input and client-error logs (the SDK's
handling of overload answers is in clients/tests/test_sdk_offline.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import signal
import socket
import time

import grpc
import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from services import RunningService

from cnnkit.serving.process import ServiceProcess

pytestmark = pytest.mark.data


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


def _predict_json(url: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/predict_json", timeout=30,
                      json={"model": "digits", "images": [base64.b64encode(_png()).decode()], **extra})


def _wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_stalled_uploads_hold_no_slot_and_are_timed_out(digits_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    service = RunningService(repository, environment={"CNNKIT_MAX_CONCURRENCY": "4", "CNNKIT_BODY_TIMEOUT": "2"})
    stalled = []
    try:
        for _ in range(40):  # ten times the cap: each declares 10 MB, sends 10 bytes, then nothing
            connection = socket.create_connection(("127.0.0.1", service.http_port), timeout=10)
            connection.sendall(b"POST /predict_json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 10000000\r\n\r\n0123456789")
            stalled.append(connection)
        time.sleep(0.5)
        for _ in range(5):
            assert _predict_json(service.url).status_code == 200
        # Each stalled upload is answered 408 once it has paused for the body timeout.
        answers = []
        for connection in stalled:
            answer = b""
            while not answer.rstrip().endswith(b"}"):  # the headers and the body may come apart
                piece = connection.recv(4096)
                if not piece:
                    break
                answer += piece
            answers.append(answer)
        assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[:2]
        assert b"paused for more than 2 s" in answers[0]
        # The cap itself still holds for requests whose bodies have arrived.
        assert _predict_json(service.url).status_code == 200
    finally:
        for connection in stalled:
            connection.close()
        service.stop()


def test_unknown_model_names_share_one_metrics_label(service):
    names = [f"nope-{secrets.token_hex(6)}" for _ in range(50)]
    for name in names:
        assert httpx.post(f"{service.url}/predict_json", json={"model": name, "images": []}, timeout=30
                          ).status_code == 404
    metrics = httpx.get(f"{service.url}/metrics", timeout=30).text
    assert not any(name in metrics for name in names)
    assert 'model="unknown"' in metrics


def test_kill_9_of_the_server_takes_its_workers_with_it(digits_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    service = RunningService(repository, environment={"CNNKIT_WORKERS": "2"})
    children = psutil.Process(service.pid).children(recursive=True)
    assert children
    os.kill(service.pid, signal.SIGKILL)
    service.process.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    try:
        assert not alive, [child.cmdline() for child in alive]
        # The ports are free again: a new service starts on the same ones.
        again = ServiceProcess(repository, tmp_path / "again", environment={"CNNKIT_DRAIN_SECONDS": "0"})
        again.http_port, again.grpc_port = service.http_port, service.grpc_port
        again.url, again.grpc_target = service.url, service.grpc_target
        with again:
            assert _predict_json(again.url).status_code == 200
    finally:
        for child in alive:
            child.kill()


def test_bad_metadata_is_refused_and_a_fixed_copy_is_loaded_on_reload(digits_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    service = RunningService(repository, environment={"CNNKIT_POLL_SECONDS": "3600"})
    try:
        good = repository / "digits" / "1"
        bad = repository / "digits" / "2"
        shutil.copytree(good, bad)
        metadata_path = bad / "assets.extra" / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        fixed = dict(metadata, version=2)
        metadata_path.write_text(json.dumps(dict(fixed, class_names=["0", "1", "2"])))
        reload = httpx.post(f"{service.url}/reload", json={}, timeout=60).json()
        assert "digits/2" in reload["errors"] and "names 3 classes but the model outputs 10" in \
            reload["errors"]["digits/2"]
        # Version 1 keeps serving; the model list and readiness are right.
        assert _predict_json(service.url).json()["version"] == 1
        assert httpx.get(f"{service.url}/models/", timeout=30).status_code == 200
        assert httpx.get(f"{service.url}/readyz", timeout=30).status_code == 200
        # Unchanged, it is not tried again; a fixed copy is loaded by the next reload.
        assert httpx.post(f"{service.url}/reload", json={}, timeout=60).json()["loaded"] == {}
        metadata_path.write_text(json.dumps(fixed))
        reload = httpx.post(f"{service.url}/reload", json={}, timeout=60).json()
        assert reload["loaded"] == {"digits": [2]} and "digits/2" not in reload["errors"]
        assert _predict_json(service.url).json()["version"] == 2
    finally:
        service.stop()


def test_grpc_health_and_readyz_agree_when_no_model_is_served(digits_repository, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    service = RunningService(repository)
    parked = tmp_path / "parked"
    try:
        with grpc.insecure_channel(service.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            shutil.move(repository / "digits", parked)  # the only model goes away
            assert _wait_for(lambda: httpx.get(f"{service.url}/readyz", timeout=10).status_code == 503)
            assert _wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            shutil.move(parked, repository / "digits")
            assert _wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200
    finally:
        service.stop()


def test_digit_class_names_in_forms_and_echoed_input_cut_short(service):
    answer = httpx.post(f"{service.url}/gradcam", timeout=120, files={"image": ("seven.png", _png(), "image/png")},
                        data={"model": "digits", "class_name": "7"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["class_name"] == "7"
    huge = "m" * 100_000
    refused = httpx.post(f"{service.url}/predict_json", timeout=30, json={"model": huge, "images": []})
    assert refused.status_code == 404 and len(refused.json()["error"]) < 1000
    from cnnkit_client import GrpcClient, NotFoundError

    with GrpcClient(service.grpc_target) as client, pytest.raises(NotFoundError) as missing:
        client.predict(_png(), model=huge)
    assert len(str(missing.value)) < 1000 and "100000 characters" in str(missing.value)


def test_client_errors_are_logged_without_tracebacks(service):
    log_size = service.log_path.stat().st_size
    for _ in range(20):
        httpx.post(f"{service.url}/predict_json", json={"model": "digits", "images": ["@@@"]}, timeout=30)
        httpx.post(f"{service.url}/predict", files={"file": ("a.png", b"x", "image/png")}, timeout=30)
    time.sleep(0.5)
    with open(service.log_path, "rb") as log:
        log.seek(log_size)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written and "[ERROR]" not in written, written[-2000:]
