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
    """The server is up but not ready or overloaded (HTTP 503). Retried."""


RETRIABLE: tuple[type[CnnkitError], ...] = (ConnectError, ServiceUnavailableError)


def from_http_status(status: int, message: str) -> CnnkitError:
    """The exception for an HTTP error answer."""
    if status == 413:
        return PayloadTooLargeError(message, status=status)
    if status in (401, 403):
        return AuthenticationError(message, status=status)
    if status == 404:
        return NotFoundError(message, status=status)
    if status == 503:
        return ServiceUnavailableError(message, status=status)
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
    return _GRPC_CODES.get(code_name, ServerError)(message, status=code_name)


__all__ = [
    "AuthenticationError",
    "CnnkitError",
    "ConnectError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServerError",
    "ServiceUnavailableError",
]
