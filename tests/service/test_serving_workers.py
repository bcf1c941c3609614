"""Several server processes on one host (``cnnkit serve --workers N``): one HTTP port (BentoML's
workers), one gRPC port (SO_REUSEPORT), metrics summed over the processes."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from services import RunningService

from cnnkit_client import Client, GrpcClient

pytestmark = pytest.mark.data


def _count(metrics: str, protocol: str, endpoint: str) -> float:
    """The summed ``cnnkit_requests_total`` samples with these labels (in any order)."""
    total = 0.0
    for labels, value in re.findall(r"^cnnkit_requests_total\{([^}]*)\} (\S+)$", metrics, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("protocol") == protocol and found.get("endpoint") == endpoint:
            total += float(value)
    return total


def test_two_workers_share_both_ports_and_their_metrics(digits_repository, data_root, tmp_path):
    from PIL import Image

    from cnnkit.training.data import load_dataset

    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=4)
    image = tmp_path / "digit.png"
    Image.fromarray(dataset.x_test[0][..., 0]).save(image)
    service = RunningService(repository, environment={"CNNKIT_WORKERS": "2"})
    try:
        # Two server processes, each with its own gRPC server on the one port.
        children = psutil.Process(service.pid).children(recursive=True)
        serving = [child for child in children if "_bentoml_impl.worker.service" in " ".join(child.cmdline())]
        assert len(serving) == 2, [child.cmdline() for child in children]
        # /readyz answered from the first ready process; the other may still be loading its models.
        deadline = time.monotonic() + 120
        while True:
            grpc_holders = {child.pid for child in serving
                            for connection in child.net_connections(kind="tcp")
                            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == service.grpc_port}
            if len(grpc_holders) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(grpc_holders) == 2
        with Client(service.url) as http, GrpcClient(service.grpc_target) as grpc:
            expected = http.predict(image, model="digits").label

            def both(_: int) -> tuple[str, str]:
                return (http.predict(image, model="digits").label, grpc.predict(image, model="digits").label)

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(both, range(40)))
        assert set(answers) == {(expected, expected)}
        # New connections (the kernel spreads them over the two listening processes) all answer.
        for _ in range(12):
            with GrpcClient(service.grpc_target) as fresh:
                assert fresh.predict(image, model="digits").label == expected
        # Explanations from both processes go to the host's one explanation worker.
        for _ in range(12):
            with GrpcClient(service.grpc_target) as fresh:
                assert fresh.gradcam(image, model="digits").heatmap.shape == (28, 28)
        children = psutil.Process(service.pid).children(recursive=True)
        explainers = [child for child in children if "cnnkit.serving.explain_worker" in " ".join(child.cmdline())]
        assert len(explainers) == 1, [child.cmdline() for child in explainers]
        socket_path = explainers[0].cmdline()[-1]
        sockets = [connection for connection in explainers[0].net_connections(kind="unix")
                   if connection.laddr == socket_path]
        assert len(sockets) == 3, sockets  # the listener, and one connection from each server process
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
        # /metrics sums the workers' counters (Prometheus multiprocess mode): every call is counted
        # whichever process answered it and whichever process answers the scrape.
        assert _count(metrics, "http", "predict_json") == 41
        assert _count(metrics, "grpc", "Classify") == 40 + 12
    finally:
        service.stop()


def test_two_replicas_share_one_repository_and_the_sdk_fails_over(digits_repository, data_root, tmp_path):
    """Replicas hold no state of their own: two services on one repository pick up a version
    exported once, and the SDK's retries move to the other when one stops."""
    import os

    from PIL import Image

    from cnnkit.training.data import load_dataset
    from cnnkit_client import AsyncClient, AsyncGrpcClient

    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    image = tmp_path / "digit.png"
    Image.fromarray(load_dataset("mnist", data_root, validation_size=10, test_limit=1).x_test[0][..., 0]).save(image)
    first, second = RunningService(repository), RunningService(repository)
    try:
        # One export (an atomic rename into the repository), seen by both.
        staging = repository / ".staging-2"
        shutil.copytree(repository / "digits" / "1", staging)
        os.rename(staging, repository / "digits" / "2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = [httpx.get(f"{service.url}/models/digits", timeout=10).json()["versions"]
                    for service in (first, second)]
            if seen == [[1, 2], [1, 2]]:
                break
            time.sleep(0.3)
        assert seen == [[1, 2], [1, 2]]
        urls, targets = [first.url, second.url], [first.grpc_target, second.grpc_target]
        with Client(urls) as http, GrpcClient(targets) as grpc:
            expected = http.predict(image, model="digits")
            assert expected.version == 2 and grpc.predict(image, model="digits").version == 2
            first.stop()  # one replica gone: the next calls' retries find the other
            assert http.predict(image, model="digits") == expected and http.url == second.url
            assert grpc.predict(image, model="digits").label == expected.label and grpc.target == targets[1]

        async def asynchronous():
            async with AsyncClient(urls) as ahttp, AsyncGrpcClient(targets) as agrpc:
                return await ahttp.predict(image, model="digits"), await agrpc.predict(image, model="digits")

        import asyncio

        assert [prediction.label for prediction in asyncio.run(asynchronous())] == [expected.label] * 2
    finally:
        first.stop()
        second.stop()
