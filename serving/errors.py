"""Errors the service answers with: each knows its HTTP status and its gRPC status code.

Handlers raise these; the HTTP layer turns them into ``{"error": message}`` with the status, the
gRPC layer into ``context.abort(code, message)``. Anything else is a bug and answers 500/INTERNAL.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request the service refuses, with a message for the caller."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInputError(ServingError):
    """The request is malformed: bad image, tensor, JSON, base64 or parameter."""


class PayloadTooLargeError(ServingError):
    """The body, the image's pixel count or the number of images is over the limit."""

    http_status = 413


class UnsupportedMediaTypeError(ServingError):
    http_status = 415


class NotFoundError(ServingError):
    """Unknown model, version, signature or layer."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class UnauthenticatedError(ServingError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class UnavailableError(ServingError):
    """Not ready yet (models still loading)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
