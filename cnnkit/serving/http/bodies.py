"""Reading and parsing HTTP request bodies without letting one large body hold up everyone else.

* :func:`read_body` reads a body chunk by chunk and refuses it (413) as soon as it passes the
  limit, whether the client declared a ``Content-Length`` or streams it chunked.
* :func:`loads_json` parses JSON with orjson (several times faster than the ``json`` module and
  limited to 1,024 levels of nesting), answering malformed or absurdly nested JSON with a 400.
* :func:`parse_json` parses small bodies in the loop, medium ones in a thread, and bodies over
  ``PROCESS_BYTES`` in a helper process (:mod:`cnnkit.serving.json_worker`): a parser holds the
  interpreter lock for the whole parse (half a second for 19 MB of numbers), so even in a thread
  it would stop the event loop, health checks included. Long number lists come back as numpy arrays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import threading
from typing import Any

from cnnkit.errors import InvalidInputError, PayloadTooLargeError
from cnnkit.serving.offload import off_loop_if_large

try:  # orjson is a dependency of the serving extra; the json module is the fallback.
    import orjson
except ImportError:  # pragma: no cover - exercised only without the serving extra
    orjson = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Bodies over this size are parsed in the JSON worker process.
PROCESS_BYTES = 1024 * 1024


def too_large(size: int, limit: int, *, declared: bool = False) -> PayloadTooLargeError:
    said = "declares" if declared else "has reached"
    return PayloadTooLargeError(f"The request body {said} {size} bytes; the limit is {limit} bytes.")


def declared_length(headers: Any) -> int | None:
    """The ``Content-Length`` header as a number (None when absent); a malformed one is a 400."""
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise InvalidInputError(f"Malformed Content-Length header {value[:40]!r}.")
    return int(value)


# Bodies at least this large are joined from their pieces in a worker thread: bytes.join lets go of
# the interpreter lock while it copies that much, so the event loop keeps answering meanwhile
# (joining 19 MB takes about 20 ms, longer while other requests keep the cores busy).
THREAD_JOIN_BYTES = 1024 * 1024


async def join_chunks(chunks: list[bytes]) -> bytes:
    """The pieces of a request body as one ``bytes``: no copy for a single piece, and large bodies
    copied outside the event loop."""
    pieces = [chunk for chunk in chunks if chunk]
    if not pieces:
        return b""
    if len(pieces) == 1:
        return bytes(pieces[0])  # the same object when it is bytes already
    if sum(len(piece) for piece in pieces) >= THREAD_JOIN_BYTES:
        return await asyncio.to_thread(b"".join, pieces)
    return b"".join(pieces)


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, refused with 413 once it passes ``limit`` bytes.

    A declared length over the limit is refused before anything is read; a chunked body is counted
    as it streams, so neither form can make the server hold more than ``limit`` bytes of it.
    """
    declared = declared_length(request.headers)
    if declared is not None and declared > limit:
        raise too_large(declared, limit, declared=True)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return await join_chunks(chunks)


def loads_json(body: bytes) -> Any:
    """Parse a JSON body; malformed JSON, or JSON nested deeper than 1,024 levels, is a 400."""
    if not body or body.isspace():
        raise InvalidInputError("The body is empty: send a JSON object.")
    try:
        if orjson is not None:
            return orjson.loads(body)
        return json.loads(body)
    except RecursionError as error:
        raise InvalidInputError("Malformed JSON: nested too deeply.") from error
    except (ValueError, UnicodeDecodeError) as error:  # orjson.JSONDecodeError is a ValueError
        message = str(error)
        if "recursion" in message.lower() or "depth limit" in message.lower():
            message = "nested too deeply (more than 1024 levels)"
        raise InvalidInputError(f"Malformed JSON: {message[:200]}") from error


class JsonWorker:
    """The serving process's JSON worker, started on the first large body, restarted if it dies."""

    def __init__(self) -> None:
        self._worker: Any = None
        self._lock = threading.Lock()

    def _running(self) -> Any:
        from cnnkit.serving.workers import WorkerProcess

        with self._lock:
            if self._worker is None or not self._worker.alive:
                if self._worker is not None:
                    logger.warning("restarting the JSON worker")
                    self._worker.close()
                self._worker = WorkerProcess("cnnkit.serving.json_worker")
            return self._worker

    async def loads(self, body: bytes) -> Any:
        from cnnkit.errors import UnavailableError
        from cnnkit.serving.workers import WorkerStoppedError

        for attempt in range(2):
            try:
                # Sending blocks until the worker reads the body: from a thread, not the event loop.
                worker = await asyncio.to_thread(self._running)
                # Out of band: the body goes to the worker without a copy under the lock.
                return await asyncio.wrap_future(await asyncio.to_thread(
                    worker.submit, "loads", pickle.PickleBuffer(body)))
            except WorkerStoppedError as error:
                if attempt:
                    raise UnavailableError(f"The JSON parser stopped ({error}); try again.") from error
        raise AssertionError("not reached")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()


JSON_WORKER = JsonWorker()


async def parse_json(body: bytes) -> Any:
    """Parse a JSON body where it costs the event loop least (see the module's description)."""
    if len(body) > PROCESS_BYTES:
        return await JSON_WORKER.loads(body)
    return await off_loop_if_large(len(body), loads_json, body)
