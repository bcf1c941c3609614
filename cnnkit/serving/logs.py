"""The service's log lines: level and format from the settings, and a request id on every request.

``configure_logging(settings)`` (called once per server process) sends the ``cnnkit`` loggers to
standard error at ``log_level``, as text or, with ``log_format: json``, as one JSON object per line
(time, level, logger, message, request_id); in JSON mode BentoML's own lines are reformatted too,
so a log collector reads one format.

Every HTTP request gets an id: the client's ``x-request-id`` header when it sends a usable one (up
to 128 printable characters), else a new random one. :class:`RequestIdMiddleware` echoes it in the
response's ``x-request-id`` header, makes it available to every log line written while the request
is answered, and writes the request's access line (method, path, status, milliseconds, id) when the
``access_log`` setting is on (not for health probes and metric scrapes). gRPC calls read and echo
the same metadata key (see the gRPC server).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
# Probes and scrapes come every few seconds; their access lines would drown the others.
QUIET_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")

request_id: ContextVar[str | None] = ContextVar("cnnkit_request_id", default=None)
access_logger = logging.getLogger("cnnkit.access")


def usable_request_id(value: str | None) -> str:
    """The client's id if it is short and printable, else a new one."""
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and " " not in value:
        return value
    return uuid.uuid4().hex


def request_id_from(pairs: Iterable[tuple[str, Any]]) -> str:
    """The request id of a request's headers or gRPC metadata (name, value) pairs."""
    for name, value in pairs:
        if name.lower() == REQUEST_ID_HEADER:
            return usable_request_id(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return usable_request_id(None)


def identify_call(context: Any) -> None:
    """A gRPC call's request id (the client's ``x-request-id`` metadata, else a new one), for the
    log lines written while it runs, and echoed to the client in the trailing metadata."""
    identifier = request_id_from(context.invocation_metadata() or ())
    request_id.set(identifier)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, identifier),))


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class _ClientErrorsAtInfo(logging.Filter):
    """BentoML logs a body it refuses (a missing upload) at ERROR with a traceback; it is the client's
    mistake, answered 400: log it at INFO, one line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "ValidationError":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.getMessage()}: refused with 400 (invalid fields)"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for key in ("method", "path", "status", "milliseconds"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


TEXT_FORMAT = "%(asctime)s [%(levelname)s] [%(name)s] %(message)s (request %(request_id)s)"


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send the ``cnnkit`` loggers to standard error at ``level``, as text or JSON lines."""
    logger = logging.getLogger("cnnkit")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsAtInfo())
    if log_format == "json":
        # BentoML's and the other libraries' lines, in the same format.
        for other in (logging.getLogger(), *[logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                             if name.split(".")[0] in ("bentoml", "uvicorn", "circus")]):
            for existing in getattr(other, "handlers", []):
                existing.setFormatter(JsonFormatter())


class RequestIdMiddleware:
    """ASGI middleware: the request id (see the module docstring), echoed, logged, one access line."""

    def __init__(self, app, access_log: bool = True):
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identifier = request_id_from((name.decode("latin-1"), value) for name, value in scope["headers"])
        request_id.set(identifier)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), identifier.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log and scope.get("path") not in QUIET_PATHS:
                milliseconds = round((time.perf_counter() - started) * 1000, 3)
                access_logger.info("%s %s %d %.1f ms", scope.get("method"), scope.get("path"), status, milliseconds,
                                   extra={"method": scope.get("method"), "path": scope.get("path"),
                                          "status": status, "milliseconds": milliseconds})
