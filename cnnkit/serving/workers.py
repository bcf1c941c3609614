"""Helper processes of the service, spoken to with length-prefixed pickles on two streams.

Two kinds of work run outside the serving process: explanations (TensorFlow gradients,
:mod:`cnnkit.serving.explain_worker`) and parsing large JSON bodies
(:mod:`cnnkit.serving.json_worker`), which would otherwise hold the serving process's interpreter
lock, and with it the event loop and every other request, for the whole parse.

A worker is a plain subprocess (``python -m MODULE ARGS``) rather than multiprocessing: spawn
would re-import the parent's ``__main__`` (BentoML's worker, pytest, a user's script), which is
neither safe nor cheap. Only the parent speaks to it, through pipes it created, so pickle is safe.

A message is a pickle (protocol 5) whose large buffers travel beside it, out of band: numpy arrays,
and anything wrapped in :class:`pickle.PickleBuffer` (the JSON worker's request bodies). Their bytes
are written and read by the operating system straight from and into the arrays' memory, with the
interpreter lock released, instead of being copied through the pickle under it: a 40 MB array
copied under the lock stops the event loop, and every request with it, for tens of milliseconds.

A request is ``(identifier, function, args)`` and its answer ``(identifier, ok, result)``. The
request ``(identifier, CANCEL, ())`` withdraws an earlier one whose caller went away: a job still
queued is answered with :class:`JobCancelledError` without running, and a running one sees
:func:`job_cancelled` turn true (long jobs check it between steps and stop).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


_HEAD = struct.Struct("<QI")  # the pickle's size, how many buffers follow it


def _read_exactly(stream, size: int) -> bytes | None:
    """``size`` bytes of ``stream``, or None where it ends first."""
    data = stream.read(size)
    return data if len(data) == size else None


def _read_buffer(stream, size: int) -> bytearray:
    """``size`` bytes of ``stream`` read straight into new memory (the lock is released meanwhile)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        count = stream.readinto(view[filled:])
        if not count:
            raise EOFError(f"the stream ended {size - filled} bytes into a buffer")
        filled += count
    return buffer


def read_message(stream) -> Any:
    """The next message on ``stream``, or None where the stream has ended."""
    head = _read_exactly(stream, _HEAD.size)
    if head is None:
        return None
    size, count = _HEAD.unpack(head)
    listed = _read_exactly(stream, 8 * count)
    data = _read_exactly(stream, size) if listed is not None else None
    if listed is None or data is None:
        raise EOFError("the stream ended inside a message")
    sizes = struct.unpack(f"<{count}Q", listed)
    buffers = [_read_buffer(stream, buffer_size) for buffer_size in sizes]
    return pickle.loads(data, buffers=buffers)


def write_message(stream, message: Any) -> None:
    """Write ``message``; its out-of-band buffers go to the stream without a copy. Nothing is
    written if it does not pickle."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    stream.write(_HEAD.pack(len(data), len(views)) + struct.pack(f"<{len(views)}Q", *(view.nbytes for view in views)))
    stream.write(data)
    for view in views:
        stream.write(view)
    stream.flush()


def answer(write: Callable[[Any], None], functions: dict[str, Callable[..., Any]], identifier: int, name: str,
           args: tuple) -> None:
    """Run ``functions[name](*args)`` and write ``(identifier, ok, result or exception)``."""
    try:
        write((identifier, True, functions[name](*args)))
    except Exception as error:  # noqa: BLE001 - every failure goes back to the caller.
        try:
            write((identifier, False, error))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            write((identifier, False, RuntimeError(f"{type(error).__name__}: {error}")))


CANCEL = "__cancel__"  # the function name of a withdrawal: (identifier, CANCEL, ())


@dataclass(eq=False)
class Job:
    """One request in a worker, from the moment it is read until it is answered."""

    write: Callable[[Any], None] = field(repr=False)
    identifier: int
    function: str
    args: tuple = field(repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)


_running = threading.local()


def job_cancelled() -> bool:
    """In a worker, while a job runs: whether its caller has withdrawn it."""
    job = getattr(_running, "job", None)
    return job is not None and job.cancelled.is_set()


class JobQueue:
    """The worker side: jobs read from one or more connections, run one at a time.

    Each connection gets a reader thread (:meth:`read`), so withdrawals are seen while a job runs;
    :meth:`run` takes the jobs in arrival order in the calling thread. A connection that ends
    withdraws everything it asked for and has not had answered.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()

    def read(self, read_one: Callable[[], Any], write: Callable[[Any], None]) -> None:
        """Queue the jobs of one connection until it ends."""
        asked: dict[int, Job] = {}
        lock = threading.Lock()

        def write_and_forget(reply: Any) -> None:
            with lock:
                asked.pop(reply[0], None)
            write(reply)

        try:
            while (message := read_one()) is not None:
                identifier, function, args = message
                with lock:
                    if function == CANCEL:
                        if identifier in asked:
                            asked[identifier].cancelled.set()
                        continue
                    job = asked[identifier] = Job(write_and_forget, identifier, function, args)
                self._jobs.put(job)
        finally:
            with lock:
                for job in asked.values():
                    job.cancelled.set()

    def stop(self) -> None:
        """Make :meth:`run` return once the jobs queued before this are done."""
        self._jobs.put(None)

    def run(self, functions: dict[str, Callable[..., Any]]) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                job.write((job.identifier, False, JobCancelledError(
                    f"{job.function} was withdrawn by its caller before it started.")))
                continue
            _running.job = job
            try:
                answer(job.write, functions, job.identifier, job.function, job.args)
            finally:
                _running.job = None


def serve_pipes(functions: dict[str, Callable[..., Any]]) -> None:
    """In the worker: serve ``(id, function, args)`` from stdin, answering on stdout, until stdin ends.

    The protocol keeps the original stdout; anything the work prints goes to stderr instead.
    """
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = os.fdopen(0, "rb")
    writing = threading.Lock()

    def write(reply: Any) -> None:
        with writing:
            write_message(answers, reply)

    jobs = JobQueue()

    def read() -> None:
        try:
            jobs.read(lambda: read_message(requests), write)
        finally:
            jobs.stop()

    threading.Thread(target=read, name="cnnkit-worker-requests", daemon=True).start()
    jobs.run(functions)


class WorkerStoppedError(Exception):
    """The worker process exited (crashed, killed or out of memory)."""


class JobCancelledError(Exception):
    """A job withdrawn by its caller (the client of the request went away); nobody reads its answer."""


class JobExpiredError(Exception):
    """A worker dropped a job whose time limit passed (before it started, or while it ran).

    Defined here, not in a worker's ``__main__`` module, so that it unpickles in the parent."""


class WorkerChannel:
    """Requests to a worker and its answers: each request gets a future, resolved by a reader
    thread when the answer with its identifier arrives; when the streams end (the worker exited),
    every waiting future fails with :class:`WorkerStoppedError`."""

    def _open(self, writer: Any, reader: Any) -> None:
        self._writer, self._reader = writer, reader
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._identifiers = itertools.count()
        self._stopped = False
        threading.Thread(target=self._read_answers, name="cnnkit-worker-reader", daemon=True).start()

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return not self._stopped

    def submit(self, function: str, *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if not self.alive:
                raise WorkerStoppedError("the worker is not running")
            identifier = next(self._identifiers)
            self._futures[identifier] = future
        # Writing may block until the worker reads (a large message fills the pipe): it holds only
        # the write lock, so answers keep being delivered meanwhile.
        with self._write_lock:
            try:
                write_message(self._writer, (identifier, function, args))
            except (BrokenPipeError, OSError, ValueError) as error:
                with self._lock:
                    self._futures.pop(identifier, None)
                raise WorkerStoppedError(f"the worker is not running ({error})") from error
        return future

    def cancel(self, future: Future) -> None:
        """Withdraw the job behind ``future`` (its caller went away). The worker drops it if it has
        not started and stops it at its next check if it has; the future is answered either way."""
        with self._lock:
            identifier = next((key for key, value in self._futures.items() if value is future), None)
        if identifier is None:
            return  # answered already
        # A worker that is gone cannot be written to; its reader fails the future.
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            write_message(self._writer, (identifier, CANCEL, ()))

    def _read_answers(self) -> None:
        try:
            while (message := read_message(self._reader)) is not None:
                identifier, ok, result = message
                with self._lock:
                    future = self._futures.pop(identifier, None)
                if future is not None:
                    future.set_result(result) if ok else future.set_exception(result)
        except Exception:  # noqa: BLE001 - a torn answer: the worker died mid-write.
            if not self._stopped:
                logger.exception("reading from a worker process failed")
        status = self._ended()
        with self._lock:
            self._stopped = True
            waiting, self._futures = list(self._futures.values()), {}
        if waiting:
            logger.error("the worker %s", status)
        for future in waiting:
            future.set_exception(WorkerStoppedError(f"the worker {status}"))

    def _ended(self) -> str:
        """Called by the reader when the answers stop; says how the worker ended."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def worker_command(module: str, *args: str) -> tuple[list[str], dict[str, str], str]:
    """The command line, environment and folder that start ``python -m module args``."""
    project = str(Path(__file__).resolve().parents[2])
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [project, environment.get("PYTHONPATH")]))
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return [sys.executable, "-m", module, *args], environment, project


class WorkerProcess(WorkerChannel):
    """``python -m MODULE ARGS`` as this process's own child, spoken to on pipes."""

    def __init__(self, module: str, *args: str):
        command, environment, project = worker_command(module, *args)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=environment, cwd=project)
        self._open(self.process.stdin, self.process.stdout)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._stopped and self.process.poll() is None

    def _ended(self) -> str:
        return f"exited with status {self.process.wait()}"

    def close(self) -> None:
        with self._lock:
            self._stopped = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
