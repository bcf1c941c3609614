"""Start ``cnnkit serve`` as a child process on free loopback ports and wait until it is ready.

Used by the benchmarks, ``cnnkit loadtest --start`` and the tests: one way to run a real service
that is stopped (its whole process group) when the ``with`` block ends, or when the process that
started it dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def die_with_parent() -> None:
    """In a child between fork and exec: ask Linux to SIGTERM it when the parent dies, so a test
    run or benchmark that is killed does not leave its service running (no-op elsewhere).

    The signal follows the thread that started the child, so start services from a thread that
    outlives them (the main thread, as the tests, benchmarks and ``cnnkit loadtest`` do).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A loopback port that is free now (bound and released)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """``cnnkit serve --repository REPOSITORY`` on free ports; ``url``, ``grpc_target``, ``pid``.

    The service gets its own ``BENTOML_HOME`` under ``workdir``: BentoML keeps its Prometheus files
    there and clears them when a server starts, so two services must not share one. The log goes to
    ``workdir/serve-PORT.log``.
    """

    def __init__(self, repository: str | os.PathLike, workdir: str | os.PathLike, *, api_key: str | None = None,
                 environment: dict[str, str] | None = None, ready_timeout: float = 240.0):
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://{HOST}:{self.http_port}"
        self.grpc_target = f"{HOST}:{self.grpc_port}"
        self.api_key = api_key
        self.extra_environment = environment or {}
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"serve-{self.http_port}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the service is not started")
        return self.process.pid

    def start(self) -> ServiceProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BENTOML_DO_NOT_TRACK="True",
                           BENTOML_HOME=str(self.workdir / f"bentoml-{self.http_port}"))
        environment.pop("CNNKIT_API_KEY", None)
        if self.api_key:
            environment["CNNKIT_API_KEY"] = self.api_key
        environment.update(self.extra_environment)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cnnkit", "serve", "--repository", str(self.repository),
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)],
                env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the service was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
