"""Every exception cnnkit raises on purpose, in one hierarchy.

``UserError`` is the base of the errors a user can cause or fix: a missing data root, an unknown
recipe, a bad override, a corrupt model version, a request the service refuses. Each carries a
message that says what is wrong and what to do. The command line prints that message and exits
with status 2 instead of showing a traceback.

The service's errors (``ServingError`` and below) also know their HTTP status and gRPC status
code: the HTTP front end answers ``{"error": message}`` with the status, the gRPC front end
aborts with the code and the message (see :mod:`cnnkit.errors` for the two renderers).
Anything else raised while serving is a bug and answers 500 / INTERNAL.

(The SDK, ``cnnkit_client``, is a separate distribution with its own hierarchy under
``cnnkit_client.UserError``: what a client sees of these errors.)
"""

from __future__ import annotations


class UserError(Exception):
    """Base class of the errors a user can fix."""


# The toolkit -----------------------------------------------------------------------------------


class DataError(UserError, ValueError):
    """A data set is missing, malformed or cannot be downloaded."""


class ConfigError(UserError, ValueError):
    """A recipe, a configuration or settings file or a command-line override is invalid."""


class ModelError(UserError, ValueError):
    """A model cannot be built (unknown name, unreachable weights, bad arguments)."""


class RunError(UserError, ValueError):
    """A run directory is missing, incomplete or cannot be resumed."""


class ExportError(UserError, ValueError):
    """A run cannot be exported, or the export failed one of its checks."""


class RepositoryError(UserError, ValueError):
    """A model repository, model or version is missing, malformed or fails its integrity check."""


class ExplainError(UserError, ValueError):
    """A heatmap or filter pattern cannot be computed (unknown class or layer, no conv layers)."""


# The service -----------------------------------------------------------------------------------


def shown(value: object, limit: int = 100) -> str:
    """``repr``-free text of a client's value for an error message, cut to about ``limit`` characters
    (a 100 KB model name must not become a 100 KB status message)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ServingError(UserError):
    """A request the service refuses, with a message for the caller (at most MAX_MESSAGE characters:
    whatever a message quotes from the request, it stays readable)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    MAX_MESSAGE = 1000

    def __init__(self, message: str):
        if len(message) > self.MAX_MESSAGE:
            message = f"{message[:self.MAX_MESSAGE - 200]} ... {message[-150:]}"
        super().__init__(message)
        self.message = message


class InvalidInputError(ServingError, ValueError):
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
    """Not ready yet (models still loading), or too busy (the explanation queue is full)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class OverloadedError(ServingError):
    """The service has more work waiting than it takes on: try again after ``retry_after`` seconds."""

    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    retry_after = 1


class ServerFaultError(ServingError):
    """A request that passed every check failed inside the service: a server-side fault."""

    http_status = 500
    grpc_code = "INTERNAL"
