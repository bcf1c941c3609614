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
