"""The explanation worker process, ``python -m cnnkit.serving.explain_worker`` (see :mod:`cnnkit.serving.explain`).

It is the one place where the service imports TensorFlow. Each function takes the version folder
and metadata of a model and keeps the loaded SavedModel for the next call.

``python -m cnnkit.serving.explain_worker THREADS NICENESS`` answers its parent on stdin/stdout;
with ``--socket PATH`` it is the one worker of a host's server processes instead: it takes an
exclusive lock on ``PATH.lock`` (or exits with status 3, ``ALREADY_SERVING``, when another worker
holds it), listens on the Unix socket ``PATH``, computes one request at a time for every
connection, and exits when the process that started it does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnkit.serving import workers

# A few loaded SavedModels per worker, the most recently used kept (versions are immutable).
_LOADED: OrderedDict[str, Any] = OrderedDict()
_KEEP = 4


def initialise(threads: int, niceness: int) -> None:
    """Run once in the new worker: quiet TensorFlow, size its thread pools, lower its priority."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if niceness > 0:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    import tensorflow as tf

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _explainer(path: str, metadata: dict[str, Any]):
    from cnnkit.explain import SavedModelExplainer

    explainer = _LOADED.pop(path, None) or SavedModelExplainer(path, metadata)
    _LOADED[path] = explainer
    while len(_LOADED) > _KEEP:
        _LOADED.popitem(last=False)
    return explainer


def warm_up() -> int:
    """Import TensorFlow now (the first explanation would otherwise pay for it); returns the pid."""
    import tensorflow  # noqa: F401

    return os.getpid()


def _check(deadline: float | None, what: str) -> None:
    if workers.job_cancelled():
        raise workers.JobCancelledError(f"{what} was stopped: its caller went away.")
    if deadline is not None and time.time() > deadline:
        raise workers.JobExpiredError(f"{what} was dropped: its time limit passed before it finished.")


def gradcam(path: str, metadata: dict[str, Any], image: np.ndarray, class_index: int,
            deadline: float | None = None) -> dict[str, Any]:
    _check(deadline, "Grad-CAM")  # queued behind other work for longer than anyone waits
    result = _explainer(path, metadata).gradcam(image, None if class_index < 0 else class_index)
    return {"class_index": result.class_index, "probabilities": result.probabilities,
            "heatmap": result.heatmap, "coarse_heatmap": result.coarse_heatmap, "layer": result.layer}


def filter_patterns(path: str, metadata: dict[str, Any], layer: str, filters: list[int], steps: int,
                    seed: int, deadline: float | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    _check(deadline, "A filter-pattern job")
    return _explainer(path, metadata).filter_patterns(
        layer, filters, steps=steps, seed=seed,
        check=lambda: _check(deadline, "A filter-pattern job"))  # every few steps of the ascent


FUNCTIONS: dict[str, Callable[..., Any]] = {"warm_up": warm_up, "gradcam": gradcam, "filter_patterns": filter_patterns}


ALREADY_SERVING = 3


def serve_pipes(threads: int, niceness: int) -> None:
    """Answer the parent that started this worker, on stdin/stdout."""
    initialise(threads, niceness)
    workers.serve_pipes(FUNCTIONS)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def serve_socket(path: str, threads: int, niceness: int) -> int:
    """Serve every connection to the Unix socket ``path``, one computation at a time.

    The socket lives in the service's private folder (mode 0700) and the socket itself is made
    readable by this user only, so only the service's own processes can send pickles here.
    """
    lock = open(f"{path}.lock", "a+b")  # noqa: SIM115 - held for the process's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return ALREADY_SERVING
    os.dup2(2, 1)  # anything printed goes to the log
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_mask)
    listener.listen(64)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    jobs = workers.JobQueue()

    def read_connection(connection: socket.socket) -> None:
        reader, writer, writing = connection.makefile("rb"), connection.makefile("wb"), threading.Lock()

        def write(answer: Any) -> None:
            with writing, contextlib.suppress(OSError, ValueError):  # the client went away
                workers.write_message(writer, answer)

        def read_one() -> Any:
            try:
                return workers.read_message(reader)
            except (OSError, ValueError):
                return None

        jobs.read(read_one, write)  # a server process that ends withdraws what it asked for
        connection.close()

    def accept() -> None:
        while True:
            connection, _ = listener.accept()
            threading.Thread(target=read_connection, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, name="cnnkit-explain-accept", daemon=True).start()
    print(f"[cnnkit] explanation worker {os.getpid()} serving {path}", file=sys.stderr, flush=True)
    initialise(threads, niceness)
    jobs.run(FUNCTIONS)
    return 0


def main() -> None:
    threads, niceness = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) == 5 and sys.argv[3] == "--socket":
        sys.exit(serve_socket(sys.argv[4], threads, niceness))
    serve_pipes(threads, niceness)


if __name__ == "__main__":
    main()
