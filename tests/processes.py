"""Helpers for tests that kill a subprocess at a chosen moment (interrupted runs and exports)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], *, delay: float = 0.0,
              timeout: float = 300.0, poll: float = 0.02) -> None:
    """SIGKILL ``process`` once ``ready()`` is true (then after ``delay`` seconds more).

    Fails the test if the process ends first: then the interruption was never exercised.
    """
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(poll)
        time.sleep(delay)
        assert process.poll() is None, "the process finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
