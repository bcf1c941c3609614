"""The explanation worker process, ``python -m cnnkit.serving.explain_worker`` (see :mod:`cnnkit.serving.explain`).

It is the one place where the service imports TensorFlow. Each function takes the version folder
and metadata of a model and keeps the loaded SavedModel for the next call.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

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


def gradcam(path: str, metadata: dict[str, Any], image: np.ndarray, class_index: int) -> dict[str, Any]:
    result = _explainer(path, metadata).gradcam(image, None if class_index < 0 else class_index)
    return {"class_index": result.class_index, "probabilities": result.probabilities,
            "heatmap": result.heatmap, "coarse_heatmap": result.coarse_heatmap, "layer": result.layer}


def filter_patterns(path: str, metadata: dict[str, Any], layer: str, filters: list[int], steps: int,
                    seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    return _explainer(path, metadata).filter_patterns(layer, filters, steps=steps, seed=seed)


FUNCTIONS: dict[str, Callable[..., Any]] = {"warm_up": warm_up, "gradcam": gradcam, "filter_patterns": filter_patterns}


def read_message(stream) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    size = int.from_bytes(header, "little")
    return pickle.loads(stream.read(size))


def write_message(stream, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def main() -> None:
    """Serve requests ``(id, function, args)`` from stdin, answering ``(id, ok, result)`` on stdout.

    Only the parent speaks to this process, through pipes it created, so pickle is safe here. The
    protocol keeps the original stdout; anything TensorFlow prints goes to stderr instead.
    """
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = os.fdopen(0, "rb")
    threads, niceness = int(sys.argv[1]), int(sys.argv[2])
    initialise(threads, niceness)
    while (message := read_message(requests)) is not None:
        identifier, name, args = message
        try:
            write_message(answers, (identifier, True, FUNCTIONS[name](*args)))
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller.
            try:
                write_message(answers, (identifier, False, error))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                write_message(answers, (identifier, False, RuntimeError(f"{type(error).__name__}: {error}")))


if __name__ == "__main__":
    main()
