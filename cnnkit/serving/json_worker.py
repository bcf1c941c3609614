"""The JSON worker process, ``python -m cnnkit.serving.json_worker`` (see :mod:`cnnkit.serving.http.bodies`).

Parsing a large JSON body of numbers (a 19 MB pixel tensor is about five million of them) holds
the interpreter lock of whichever process does it for half a second or more; in the serving
process that stops the event loop, health checks included. So large bodies are parsed here, and
long lists of numbers come back as numpy arrays, which cross the pipe as one block of memory
instead of millions of Python objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnkit.serving import workers

# Lists of at least this many numbers become float64 arrays; shorter ones stay lists.
ARRAY_MIN_VALUES = 1024
# Nesting deeper than this is left as it is (the body's own checks refuse it later).
_MAX_DEPTH = 64


def with_arrays(value: Any, depth: int = 0) -> Any:
    """``value`` with every long, rectangular list of numbers replaced by a float64 array."""
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {key: with_arrays(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        first = value[0] if value else None
        if isinstance(first, int | float | list) and not isinstance(first, bool):
            try:
                array = np.asarray(value, dtype=np.float64)
            except (ValueError, TypeError, RecursionError):
                array = None  # ragged, or not numbers: look inside instead
            if array is not None and array.size >= ARRAY_MIN_VALUES:
                return array
            if array is not None:
                return value
        return [with_arrays(item, depth + 1) for item in value]
    return value


def loads(body: bytes | memoryview) -> Any:
    from cnnkit.serving.http.bodies import loads_json

    # A body sent out of band arrives as a read-only view of the bytes received.
    return with_arrays(loads_json(body if isinstance(body, bytes) else body.tobytes()))


FUNCTIONS = {"loads": loads}


def main() -> None:
    workers.serve_pipes(FUNCTIONS)


if __name__ == "__main__":
    main()
