"""ASGI middleware of the HTTP front end: the optional API key, the request-body limit, the
concurrency cap and the request timeout.

The API key (setting ``api_key``) guards every route but health checks. HTTP clients send it as
``x-api-key: KEY`` or ``Authorization: Bearer KEY``; gRPC clients as the same metadata. Keys are
compared in constant time. The body limit answers 413 to a body over the limit, declared or
chunked, and 408 to one that stalls; the concurrency cap counts requests once their body is in.
The request timeout answers 504 when no response has started within BentoML's ``traffic.timeout``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json

from cnnkit.serving.auth import key_matches, presented_key
from cnnkit.serving.callers import CallerWatch, watching
from cnnkit.serving.http.bodies import join_chunks

OPEN_HTTP_PATHS = ("/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready")
UNLIMITED_HTTP_PATHS = (*OPEN_HTTP_PATHS, "/metrics")


class ApiKeyMiddleware:
    """ASGI middleware answering 401 ``{"error": ...}`` to requests without the right key."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]
        if key_matches(presented_key(headers), self.api_key):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, "Missing or wrong API key (header x-api-key).",
                         [(b"www-authenticate", b"Bearer")])


async def _send_json(send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] | None = None):
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


class MountRootMiddleware:
    """Serve a mounted app's root without the trailing slash (``GET /v2``: the Open Inference
    Protocol's server metadata), which Starlette would otherwise answer with a redirect that
    clients like tritonclient do not follow."""

    def __init__(self, app, roots: tuple[str, ...] = ("/v2",)):
        self.app = app
        self.roots = roots

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.roots:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": (scope["path"] + "/").encode()}
        await self.app(scope, receive, send)


def _replaying(body: bytes, then):
    """An ASGI ``receive`` that gives the whole ``body`` in one message, then what ``then()`` gives."""
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


class BodyLimitMiddleware:
    """Read every request body before the routes see it: refused with 413 once over ``limit``
    bytes (declared or streamed chunked), with 408 when it pauses longer than ``body_timeout``
    seconds, then handed on whole.

    Reading first is what keeps slow or stalled uploads from holding anything else: the concurrency
    cap (:class:`ConcurrencyLimitMiddleware`, inside this one) counts a request only once its body
    is here, so 600 connections that declare 10 MB and send 10 bytes cannot make real requests
    answer 429. Bodies are at most ``limit`` bytes, which the routes would hold anyway.

    Before answering 413 the rest of the body is read and thrown away, up to ``drain_bytes`` or
    ``drain_seconds``: a server that closes a connection with unread data makes the client's kernel
    see a reset instead of the answer. Beyond those bounds the connection is just closed.
    """

    def __init__(self, app, limit: int, body_timeout: float = 10.0, drain_bytes: int = 128 * 1024 * 1024,
                 drain_seconds: float = 5.0, watched_paths: tuple[str, ...] = ()):
        self.app = app
        # Requests to these paths (long work) get a CallerWatch: their work is withdrawn when the
        # client closes the connection before the answer (cnnkit.serving.callers).
        self.watched_paths = frozenset(watched_paths)
        self.limit = limit
        self.body_timeout = body_timeout
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.strip().isdigit() and int(value) > self.limit:
                await self._drain(receive)
                await _send_json(send, 413, f"The request body is {int(value)} bytes; "
                                            f"the limit is {self.limit} bytes.")
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                await _send_json(send, 408, f"The request body paused for more than {self.body_timeout:g} s "
                                            f"after {received} bytes; send it without stopping.",
                                 [(b"connection", b"close")])
                return
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                if message.get("more_body"):
                    await self._drain(receive)
                await _send_json(send, 413, f"The request body passed the limit of {self.limit} bytes.")
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = await join_chunks(chunks)
        if scope["path"] in self.watched_paths:
            await self._watched(scope, body, receive, send)
            return
        # After the body: the disconnect, whenever it comes.
        await self.app(scope, _replaying(body, receive), send)

    async def _watched(self, scope, body: bytes, receive, send) -> None:
        """Hand on the body, and listen for the disconnect meanwhile: when it comes before the
        answer, the caller has gone, and the work it asked for is withdrawn."""
        caller = CallerWatch()
        after_body: asyncio.Future = asyncio.get_running_loop().create_future()
        answered = False

        async def listen() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                # Withdrawing writes to the worker's pipe: not in the event loop.
                await asyncio.to_thread(caller.leave)
            after_body.set_result(message)

        async def send_answer(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        listener = asyncio.create_task(listen())
        try:
            with watching(caller):
                await self.app(scope, _replaying(body, lambda: asyncio.shield(after_body)), send_answer)
        finally:
            answered = True
            listener.cancel()

    async def _drain(self, receive) -> None:
        """Read and discard the rest of the body, within the drain bounds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        drained = 0
        while drained <= self.drain_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body"):
                return


class ConcurrencyLimitMiddleware:
    """At most ``limit`` HTTP requests in progress in this process; more are answered 429 with
    ``Retry-After: 1``. Health checks and metrics are never limited. It sits inside
    :class:`BodyLimitMiddleware`, so a request counts only once its body has arrived."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNLIMITED_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            await _send_json(send, 429, f"The service is busy: {self.in_progress} requests are in progress; "
                                        f"try again shortly.", [(b"retry-after", b"1")])
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class RequestTimeoutMiddleware:
    """Answer 504 to a request whose response has not started within ``timeout`` seconds (and
    cancel its work); BentoML's ``traffic.timeout``, without the leak of BentoML's own middleware.

    BentoML's ``TimeoutMiddleware`` schedules a timer for every request and never cancels it, so
    each request's timer, future and context (with its OpenTelemetry span: about twenty objects
    for the garbage collector) stay alive for the whole timeout, 60 s here. At 650 requests/s that
    is some 40,000 pending timers and most of a million objects, which every older-generation
    collection walks: under 64 clients those collections took 70-300 ms each and made the slowest
    answers. Here the timer is cancelled when the response starts or the request ends, and it
    carries an empty context, so a cancelled timer waiting for the event loop to drop it holds
    nothing of the request. The request runs in the caller's task, not a new one.
    :func:`use_request_timeout_middleware` puts this class in BentoML's place.
    """

    def __init__(self, app, timeout: float):
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None  # an ASGI server runs each request in a task
        timed_out = started = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, expire, context=_EMPTY_CONTEXT)

        async def send_and_stop_the_clock(message):
            nonlocal started
            started = True
            timer.cancel()  # a response that has started may stream for as long as it needs
            await send(message)

        try:
            await self.app(scope, receive, send_and_stop_the_clock)
        except asyncio.CancelledError:
            # Our cancellation only (not the server's, say for a closed connection), and only
            # while the status line can still be sent.
            if not timed_out or task.uncancel() > 0 or started:
                raise
            await _send_json(send, 504, f"Not able to process the request in {self.timeout:g} seconds.")
        finally:
            timer.cancel()


_EMPTY_CONTEXT = contextvars.Context()


def use_request_timeout_middleware() -> None:
    """Make BentoML build :class:`RequestTimeoutMiddleware` where it would build its own
    ``TimeoutMiddleware`` (it imports the class from its module when it builds the app)."""
    global BENTOML_TIMEOUT_MIDDLEWARE
    from bentoml._internal.server.http import traffic

    if traffic.TimeoutMiddleware is not RequestTimeoutMiddleware:
        BENTOML_TIMEOUT_MIDDLEWARE = traffic.TimeoutMiddleware
    traffic.TimeoutMiddleware = RequestTimeoutMiddleware  # type: ignore[misc,assignment]


BENTOML_TIMEOUT_MIDDLEWARE: type | None = None  # the class replaced, once it is


class ValidationAnswerMiddleware:
    """One-line messages for the bodies BentoML itself refuses (a missing upload, a field of the wrong
    kind in a multipart form): BentoML answers ``{"error": "1 validation error for XBody", "detail":
    [...]}``; the ``error`` becomes the same one line that cnnkit's own refusals carry, naming each
    field ("'image' is required."), and ``detail`` stays for programs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[dict] = []

        async def rewrite(message):
            if message["type"] == "http.response.start" and message["status"] == 400:
                held.append(message)
                return
            if held and message["type"] == "http.response.body":
                held.append(message)
                if message.get("more_body"):
                    return
                start, *parts = held
                body = b"".join(part.get("body", b"") for part in parts)
                body = _one_line_validation_error(body)
                headers = [(name, value) for name, value in start.get("headers", [])
                           if name.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                held.clear()
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def _one_line_validation_error(body: bytes) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if not (isinstance(answer, dict) and isinstance(answer.get("detail"), list)
            and "validation error" in str(answer.get("error", ""))):
        return body
    problems = []
    for item in answer["detail"]:
        location = ".".join(str(part) for part in item.get("loc", []) if "[" not in str(part))
        message = "is required" if item.get("type") == "missing" else str(item.get("msg", "is not valid"))
        message = message.removeprefix("Value error, ")
        if location == "image" and item.get("type") in ("missing", "path_type"):
            message = "is required: upload the image file as the multipart field 'image'"
        problems.append(f"'{location}' {message}" if location else message)
    joined = "; ".join(problems)
    answer["error"] = joined if joined.endswith(".") else joined + "."
    return json.dumps(answer).encode()
