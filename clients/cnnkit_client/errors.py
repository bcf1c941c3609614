"""Every exception the SDK raises, in one hierarchy.

``CnnkitError`` is the base. Errors the server answered carry its message (``.message``) and the
HTTP status or gRPC status code name (``.status``); client-side errors (an unreadable file, an
image that is not pixels) are ``InvalidInputError`` too, with ``.status`` ``None``.
"""

from __future__ import annotations


class CnnkitError(Exception):
    """Base class of every SDK error."""

    def __init__(self, message: str, *, status: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.message} (status {self.status})"


class ConnectError(CnnkitError):
    """The service could not be reached (refused, reset, DNS, gRPC UNAVAILABLE). Retried."""


class RequestTimeoutError(CnnkitError):
    """No answer within the timeout (HTTP timeouts, gRPC DEADLINE_EXCEEDED)."""


class InvalidInputError(CnnkitError, ValueError):
    """The request was refused as malformed (HTTP 400/413/415, gRPC INVALID_ARGUMENT), or the SDK
    refused it before sending (unreadable file, an array that is not uint8-range pixels)."""


class PayloadTooLargeError(InvalidInputError):
    """Too many images, too many pixels or too many bytes (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class NotFoundError(CnnkitError, LookupError):
    """Unknown model, version, layer or route (HTTP 404, gRPC NOT_FOUND)."""


class AuthenticationError(CnnkitError):
    """Missing or wrong API key (HTTP 401/403, gRPC UNAUTHENTICATED/PERMISSION_DENIED)."""


class ServerError(CnnkitError):
    """The server failed (HTTP 5xx, gRPC INTERNAL/UNKNOWN and others)."""


class ServiceUnavailableError(ServerError):
    """The server is up but not ready or overloaded (HTTP 503). Retried.

    ``retry_after`` is the wait in seconds the server asked for (its ``Retry-After`` header), if any;
    retries wait at least that long.
    """

    def __init__(self, message: str, *, status: int | str | None = None, retry_after: float | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class OverloadedError(ServiceUnavailableError):
    """Too many requests at once (HTTP 429 or 503 "overloaded", gRPC RESOURCE_EXHAUSTED from the
    service's queue): nothing was wrong with the request. Retried after ``retry_after``."""


RETRIABLE: tuple[type[CnnkitError], ...] = (ConnectError, ServiceUnavailableError)


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds (an HTTP date or nonsense gives None)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None


def from_http_status(status: int, message: str, retry_after: str | None = None) -> CnnkitError:
    """The exception for an HTTP error answer (``retry_after``: its Retry-After header)."""
    if status == 413:
        return PayloadTooLargeError(message, status=status)
    if status in (401, 403):
        return AuthenticationError(message, status=status)
    if status == 404:
        return NotFoundError(message, status=status)
    if status == 429 or (status == 503 and "overloaded" in message.lower()):
        return OverloadedError(message, status=status, retry_after=parse_retry_after(retry_after))
    if status == 503:
        return ServiceUnavailableError(message, status=status, retry_after=parse_retry_after(retry_after))
    if 400 <= status < 500:
        return InvalidInputError(message, status=status)
    return ServerError(message, status=status)


_GRPC_CODES: dict[str, type[CnnkitError]] = {
    "INVALID_ARGUMENT": InvalidInputError,
    "FAILED_PRECONDITION": InvalidInputError,
    "OUT_OF_RANGE": InvalidInputError,
    "RESOURCE_EXHAUSTED": PayloadTooLargeError,
    "NOT_FOUND": NotFoundError,
    "UNIMPLEMENTED": NotFoundError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
    "UNAVAILABLE": ConnectError,
    "DEADLINE_EXCEEDED": RequestTimeoutError,
}


def from_grpc_code(code_name: str, message: str) -> CnnkitError:
    """The exception for a gRPC status (by its name, e.g. ``"NOT_FOUND"``)."""
    if code_name == "RESOURCE_EXHAUSTED" and "larger than max" not in message:
        return OverloadedError(message, status=code_name)  # the service's queue, not a message too large
    return _GRPC_CODES.get(code_name, ServerError)(message, status=code_name)


__all__ = [
    "AuthenticationError",
    "CnnkitError",
    "ConnectError",
    "InvalidInputError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServerError",
    "ServiceUnavailableError",
]
