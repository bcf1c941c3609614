"""A real cnnkit service on 127.0.0.1 for tests: `cnnkit serve` in a subprocess, on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPOSITORY = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningService:
    def __init__(self, repository: Path, api_key: str | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BENTOML_DO_NOT_TRACK="True",
                           CNNKIT_POLL_SECONDS="0.5")
        environment.pop("CNNKIT_API_KEY", None)
        # BentoML keeps its Prometheus files under BENTOML_HOME and clears them when a server
        # starts: each test service gets its own home so that two of them keep separate metrics.
        environment["BENTOML_HOME"] = str(repository.parent / f"bentoml-{self.http_port}")
        if api_key:
            environment["CNNKIT_API_KEY"] = api_key
        self.log = open(repository.parent / f"serve-{self.http_port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "serve", "--repository", str(repository),
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPOSITORY,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the service did not become ready in 240 s")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
