"""Grad-CAM heatmaps and filter patterns in the service, computed away from plain predictions.

Both need TensorFlow gradients, which ONNX Runtime does not compute. They run in one worker process
(``python -m cnnkit.serving.explain_worker``, started on first use, or at start-up with
the ``explain_preload`` setting) that imports TensorFlow and loads the exported SavedModel: the
``gradcam`` signature for heatmaps and the differentiable ``feature_maps`` signature for filter
patterns (see :mod:`cnnkit.training.explain`). The serving process itself never imports TensorFlow, and
the worker runs at a lower CPU priority (``explain_nice``, default 10) with
``explain_threads`` threads, so predictions keep the cores they need.

Requests are checked here first (class, layer, filters), so bad ones never reach the worker. At
most ``explain_queue`` explanations wait at once; more answer 503. A request that waits
longer than ``explain_timeout`` seconds answers 503 too, but a filter-pattern computation
keeps running and lands in the cache, so asking again later returns it.

Filter patterns are cached per model version, layer, steps and seed: in memory and on disk under
``cache_dir`` (default ``~/.cache/cnnkit``), keyed by the SavedModel's sha256, so they
survive restarts. Each filter is computed once; a request for more filters computes only the new ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ExplainError, InvalidInputError, NotFoundError, ServerFaultError, UnavailableError
from cnnkit.explain import (
    PATTERN_STEPS,
    check_conv_layer,
    check_filters,
    dead_filters,
    resolve_class,
)
from cnnkit.serving import explain_worker, metrics
from cnnkit.serving.callers import current_caller
from cnnkit.serving.model_store import LoadedModel
from cnnkit.serving.workers import (
    JobCancelledError,
    JobExpiredError,
    WorkerChannel,
    WorkerProcess,
    WorkerStoppedError,
    worker_command,
)
from cnnkit.settings import Settings, default_cache_dir

logger = logging.getLogger(__name__)

EXPLAIN_WORKER = "cnnkit.serving.explain_worker"
MAX_PATTERN_STEPS = 200
MAX_PATTERN_FILTERS = 512


@dataclass
class GradCam:
    model: str
    version: int
    layer: str
    class_index: int
    class_name: str
    probability: float
    predicted_index: int
    predicted_name: str
    predicted_probability: float
    heatmap: np.ndarray  # (H, W) in [0, 1]
    coarse_heatmap: np.ndarray


@dataclass
class FilterPatterns:
    model: str
    version: int
    layer: str
    steps: int
    seed: int
    filters: list[int]
    patterns: np.ndarray  # (F, H, W, C) uint8
    mean_activation: np.ndarray  # (F, 2): before and after the ascent
    cached: bool

    @property
    def dead(self) -> list[int]:
        """Filters whose response the ascent could not move (drawn black; see cnnkit.explain.is_dead)."""
        return dead_filters(self.filters, self.mean_activation)


@dataclass
class _PatternEntry:
    """The computed filters of one (model version, layer, steps, seed)."""

    patterns: dict[int, np.ndarray] = field(default_factory=dict)
    gains: dict[int, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: tuple[Future, Any] | None = None
    requests: int = 0  # requests for this entry in progress (one computes, the others wait for it)


def explain_layers(model: LoadedModel) -> dict[str, Any]:
    """What a client may ask of a model: its Grad-CAM layer and its convolution layers."""
    explain = model.metadata.get("explain") or {}
    return {"gradcam_layer": explain.get("gradcam_layer"), "conv_layers": model.conv_layer_names}


class SharedWorker(WorkerChannel):
    """The host's one explanation worker, shared by the server processes of ``cnnkit serve --workers N``.

    The worker listens on a Unix socket in the service's private folder. The first server process
    that needs it and finds nobody listening starts one (``--socket PATH``); the worker takes an
    exclusive lock beside the socket first, so of two started at once only one serves and the other
    exits. The worker exits when the process that started it does; the others then see their
    connection end and the next explanation starts a new one.
    """

    def __init__(self, threads: int, niceness: int, socket_path: Path, start_timeout: float = 60.0):
        self.socket_path = Path(socket_path)
        self.process: subprocess.Popen[bytes] | None = None
        self._socket = self._connect_or_start(threads, niceness, start_timeout)
        self._open(self._socket.makefile("wb"), self._socket.makefile("rb"))

    def _try_connect(self) -> socket.socket | None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(str(self.socket_path))
        except OSError:
            connection.close()
            return None
        return connection

    def _connect_or_start(self, threads: int, niceness: int, start_timeout: float) -> socket.socket:
        connection = self._try_connect()
        deadline = time.monotonic() + start_timeout
        while connection is None:
            if self.process is None or self.process.poll() is not None:
                if self.process is not None and self.process.returncode != explain_worker.ALREADY_SERVING:
                    raise WorkerStoppedError(f"the explanation worker exited with status {self.process.returncode}")
                # Nobody listens (or the one that won the lock is still binding): start one; if another
                # process's worker holds the lock, ours exits at once and we connect to theirs.
                command, environment, project = worker_command(EXPLAIN_WORKER, str(threads), str(niceness),
                                                               "--socket", str(self.socket_path))
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment, cwd=project)
            if time.monotonic() > deadline:
                raise WorkerStoppedError(f"no explanation worker listens on {self.socket_path}")
            time.sleep(0.05)
            connection = self._try_connect()
        return connection

    @property
    def pid(self) -> int | None:
        """The worker's process id, from the socket's peer credentials."""
        credentials = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", credentials)[0]

    def _ended(self) -> str:
        return "closed its connection"

    def close(self) -> None:
        with self._lock:
            self._stopped = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def shared_worker_socket(settings: Settings) -> Path | None:
    """Where the processes of one ``cnnkit serve --workers N`` (N > 1) meet their shared explanation
    worker: beside the settings file the command wrote for them, in a folder only this user can
    open. None (a worker per process) for one process, or a service not started by ``cnnkit serve``."""
    from cnnkit.settings import SETTINGS_FILE_ENV

    settings_file = os.environ.get(SETTINGS_FILE_ENV)
    if settings.workers <= 1 or not settings_file:
        return None
    return Path(settings_file).parent / "explain.sock"


class Explanations:
    """The explanation worker, the checks in front of it and the filter-pattern cache."""

    def __init__(self, *, threads: int = 0, niceness: int = 10, timeout: float = 50.0, max_queue: int = 8,
                 cache_dir: str | os.PathLike | None = None, shared_socket: str | os.PathLike | None = None):
        self.threads = threads
        # With a socket path, the processes of one service share one worker (SharedWorker).
        self.shared_socket = Path(shared_socket) if shared_socket is not None else None
        self.niceness = niceness
        self.timeout = timeout
        self.max_queue = max_queue
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._worker: WorkerChannel | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._patterns: dict[tuple, _PatternEntry] = {}
        self.computed_filters = 0  # filters the worker optimised (not served from the cache)
        self.workers_started = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Explanations:
        return cls(threads=settings.explain_threads, niceness=settings.explain_nice, timeout=settings.explain_timeout,
                   max_queue=settings.explain_queue, cache_dir=settings.resolved_cache_dir,
                   shared_socket=shared_worker_socket(settings))

    # The worker --------------------------------------------------------------------------------

    def _running_worker(self) -> WorkerChannel:
        with self._lock:
            if self._worker is None or not self._worker.alive:
                if self._worker is not None:
                    logger.warning("restarting the explanation worker")
                    self._worker.close()
                if self.shared_socket is not None:
                    self._worker = SharedWorker(self.threads, self.niceness, self.shared_socket)
                else:
                    self._worker = WorkerProcess(EXPLAIN_WORKER, str(self.threads), str(self.niceness))
                self.workers_started += 1
            return self._worker

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None and worker.alive else None

    def start(self) -> Explanations:
        """Start the worker and import TensorFlow in it now, instead of on the first request."""
        self._running_worker().submit("warm_up")
        return self

    def _submit(self, function: str, *args: Any, withdraw_if: Callable[[], bool] | None = None) -> Future:
        """Queue a job in the worker. When the request's caller goes away (a closed connection, a
        cancelled call) the job is withdrawn, if ``withdraw_if()`` agrees: nobody else waits for it."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise UnavailableError(f"{self._pending} explanations are already waiting; try again shortly.")
            self._pending += 1
        try:
            try:
                worker = self._running_worker()
                future = worker.submit(function, *args)
            except WorkerStoppedError:
                try:
                    worker = self._running_worker()
                    future = worker.submit(function, *args)  # it died just now: once more
                except WorkerStoppedError as error:
                    raise UnavailableError(f"The explanation worker could not be started ({error}); "
                                           "try again.") from error
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        future.add_done_callback(self._finished)
        caller = current_caller()
        if caller is not None:
            def withdraw() -> None:
                if not future.done() and (withdraw_if is None or withdraw_if()):
                    metrics.explanations_withdrawn_total.inc()
                    logger.info("withdrawing %s: its caller went away", function)
                    worker.cancel(future)

            forget = caller.on_leave(withdraw)
            future.add_done_callback(lambda _done: forget())
        return future

    def _finished(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _result(self, future: Future, what: str) -> Any:
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout as error:
            raise UnavailableError(f"{what} took longer than {self.timeout:.0f} s; try again later.") from error
        except WorkerStoppedError as error:
            raise UnavailableError(f"The explanation worker stopped during {what} ({error}); try again.") from error
        except JobExpiredError as error:
            raise UnavailableError(f"{error} Try again later.") from error
        except JobCancelledError as error:
            raise UnavailableError(f"{what} was withdrawn: {error}") from error
        except ExplainError as error:
            raise InvalidInputError(str(error)) from error
        except Exception as error:  # noqa: BLE001 - anything else from the worker is our fault.
            logger.error("explanation worker failed on %s: %s", what, error)
            raise ServerFaultError(f"{what} failed: {error}") from error

    def close(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    # Grad-CAM ----------------------------------------------------------------------------------

    def gradcam(self, model: LoadedModel, image: np.ndarray, target: int | str | None = None) -> GradCam:
        """Grad-CAM of one validated image (H, W, C) of raw pixels for a class (default: predicted)."""
        layers = explain_layers(model)
        if not layers["conv_layers"]:
            raise InvalidInputError(f"Model {model.name} has no convolution layer: there is no heatmap to draw.")
        if not layers["gradcam_layer"]:
            raise NotFoundError(f"Model {model.name} version {model.version} was exported without a Grad-CAM "
                                f"signature (before cnnkit had one): export its run again with `cnnkit export`.")
        try:
            index = resolve_class(target, model.class_names)
        except ExplainError as error:
            raise InvalidInputError(str(error)) from error
        pixels = np.asarray(image, dtype=np.float32)
        future = self._submit("gradcam", str(model.path), model.metadata, pixels, index,
                              time.time() + self.timeout)  # nobody reads it after that
        outputs = self._result(future, "Grad-CAM")
        probabilities = np.asarray(outputs["probabilities"], np.float32)
        explained, predicted = int(outputs["class_index"]), int(probabilities.argmax())
        names = model.class_names
        return GradCam(model=model.name, version=model.version, layer=outputs["layer"], class_index=explained,
                       class_name=names[explained], probability=float(probabilities[explained]),
                       predicted_index=predicted, predicted_name=names[predicted],
                       predicted_probability=float(probabilities[predicted]),
                       heatmap=np.asarray(outputs["heatmap"], np.float32),
                       coarse_heatmap=np.asarray(outputs["coarse_heatmap"], np.float32))

    # Filter patterns ---------------------------------------------------------------------------

    def check_pattern_request(self, model: LoadedModel, layer: str | None, filters: Sequence[int] | int | None,
                              steps: int) -> tuple[str, list[int]]:
        if not isinstance(steps, int) or not 1 <= steps <= MAX_PATTERN_STEPS:
            raise InvalidInputError(f"'steps' must be an integer from 1 to {MAX_PATTERN_STEPS}, got {steps!r}.")
        if not model.conv_layer_names:
            raise InvalidInputError(f"Model {model.name} has no convolution layer: it has no filters to show.")
        try:
            chosen = check_conv_layer(layer, model.conv_layer_names, model.name)
        except ExplainError as error:
            raise NotFoundError(str(error)) from error
        channels = int(next(item for item in model.feature_layers if item["name"] == chosen)["output_shape"][-1])
        try:
            indices = check_filters(filters, channels, chosen)
        except ExplainError as error:
            raise InvalidInputError(str(error)) from error
        if len(indices) > MAX_PATTERN_FILTERS:
            raise InvalidInputError(f"At most {MAX_PATTERN_FILTERS} filters per request, got {len(indices)}.")
        return chosen, indices

    def _cache_path(self, model: LoadedModel, layer: str, steps: int, seed: int) -> Path:
        digest = str(model.metadata.get("files", {}).get("saved_model.pb", "unknown"))[:16]
        return self.cache_dir / "filter_patterns" / model.name / f"{model.version}-{digest}" / \
            f"{layer}-steps{steps}-seed{seed}.npz"

    def _entry(self, model: LoadedModel, layer: str, steps: int, seed: int) -> _PatternEntry:
        key = (model.name, model.version, str(model.path), layer, steps, seed)
        with self._lock:
            entry = self._patterns.get(key)
            if entry is None:
                entry = self._patterns[key] = _PatternEntry()
                self._load_cache(entry, self._cache_path(model, layer, steps, seed))
            return entry

    @staticmethod
    def _load_cache(entry: _PatternEntry, path: Path) -> None:
        if not path.is_file():
            return
        try:
            with np.load(path) as stored:
                for index, pattern, gain in zip(stored["filters"], stored["patterns"], stored["gains"], strict=True):
                    entry.patterns[int(index)] = pattern
                    entry.gains[int(index)] = gain
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring unreadable filter-pattern cache %s: %s", path, error)

    @staticmethod
    def _save_cache(entry: _PatternEntry, path: Path) -> None:
        from cnnkit.io import atomic_write_bytes

        order = sorted(entry.patterns)
        buffer = io.BytesIO()
        np.savez(buffer, filters=np.asarray(order, np.int32),
                 patterns=np.stack([entry.patterns[index] for index in order]),
                 gains=np.stack([entry.gains[index] for index in order]))
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as error:
            logger.warning("could not write the filter-pattern cache %s: %s", path, error)

    def filter_patterns(self, model: LoadedModel, layer: str | None = None,
                        filters: Sequence[int] | int | None = None, *, steps: int = PATTERN_STEPS,
                        seed: int = 0) -> FilterPatterns:
        """Patterns of a layer's filters (default: the last conv layer, its first 64 filters), cached."""
        chosen, indices = self.check_pattern_request(model, layer, filters, steps)
        entry = self._entry(model, chosen, steps, seed)
        path = self._cache_path(model, chosen, steps, seed)
        with self._lock:
            entry.requests += 1
        try:
            return self._patterns_of(model, entry, path, chosen, indices, steps, seed)
        finally:
            with self._lock:
                entry.requests -= 1

    def _patterns_of(self, model: LoadedModel, entry: _PatternEntry, path: Path, chosen: str, indices: list[int],
                     steps: int, seed: int) -> FilterPatterns:
        # One computation per entry at a time: a second request for the same layer waits and reuses it.
        if not entry.lock.acquire(timeout=self.timeout):
            raise UnavailableError(f"The patterns of {chosen} are being computed; try again later.")
        try:
            if entry.inflight is not None:
                # An earlier request gave up waiting; its computation may still be running: wait for it.
                earlier, store_earlier = entry.inflight
                try:
                    self._result(earlier, f"Filter patterns of {chosen}")
                finally:
                    if earlier.done():  # finished or failed; a timed-out one stays for the next request
                        entry.inflight = None
                store_earlier(earlier)
            missing = [index for index in indices if index not in entry.patterns]
            if missing:
                # The request answers 503 after `timeout`, but the computation may go on for half
                # as long again (at least 2 s) to land in the cache; then the job is stopped, so
                # the work of callers who went away ends. A caller that closes its connection
                # withdraws the job at once, unless other requests wait for the same patterns.
                future = self._submit("filter_patterns", str(model.path), model.metadata, chosen, missing,
                                      steps, seed, time.time() + max(1.5 * self.timeout, 2.0),
                                      withdraw_if=lambda: entry.requests <= 1)
                storing = threading.Lock()
                stored = False

                def store(done: Future) -> None:
                    # Called by the request once it has the result, and by the executor when the
                    # worker finishes (which matters when the request gave up waiting). Whichever
                    # comes first stores; the other waits until that is done, so a request never
                    # answers before its patterns are in memory and on disk.
                    nonlocal stored
                    if done.cancelled() or done.exception() is not None:
                        return
                    with storing:
                        if stored:
                            return
                        computed, patterns, gains = done.result()
                        for index, pattern, gain in zip(computed, patterns, gains, strict=True):
                            entry.patterns[int(index)] = pattern
                            entry.gains[int(index)] = gain
                        self.computed_filters += len(computed)
                        self._save_cache(entry, path)
                        stored = True

                entry.inflight = (future, store)
                future.add_done_callback(store)
                try:
                    self._result(future, f"Filter patterns of {chosen}")
                finally:
                    if future.done():
                        entry.inflight = None
                store(future)
        finally:
            entry.lock.release()
        return FilterPatterns(
            model=model.name, version=model.version, layer=chosen, steps=steps, seed=seed, filters=indices,
            patterns=np.stack([entry.patterns[index] for index in indices]),
            mean_activation=np.stack([entry.gains[index] for index in indices]).astype(np.float32),
            cached=not missing,
        )
