"""cnnkit's Python SDK: HTTP and gRPC clients (sync and async) for a cnnkit service, without TensorFlow.

>>> from cnnkit_client import Client                        # doctest: +SKIP
>>> with Client("http://127.0.0.1:3000") as client:
...     prediction = client.predict("seven.png", model="digits")
>>> prediction.label, prediction.probability
('7', 0.998)

``GrpcClient("127.0.0.1:8500")`` has the same methods over TF Serving's gRPC protocol;
``AsyncClient`` / ``AsyncGrpcClient`` are their asyncio twins. Errors: :mod:`cnnkit_client.errors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnnkit_client.errors import (
    AuthenticationError,
    CnnkitError,
    ConnectError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
)
from cnnkit_client.retry import Retry
from cnnkit_client.types import (
    ClassScore,
    FeatureMaps,
    FilterPatterns,
    GradCam,
    Health,
    LayerInfo,
    ModelInfo,
    Prediction,
)

if TYPE_CHECKING:
    from cnnkit_client._grpc import AsyncGrpcClient, GrpcClient
    from cnnkit_client._http import AsyncClient, Client

__version__ = "0.1.0"

# The clients load on first use, so an HTTP-only app never imports grpc and vice versa.
_LAZY = {"Client": "_http", "AsyncClient": "_http", "GrpcClient": "_grpc", "AsyncGrpcClient": "_grpc"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"cnnkit_client.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit_client' has no attribute {name!r}")

__all__ = [
    "AsyncClient",
    "AsyncGrpcClient",
    "AuthenticationError",
    "ClassScore",
    "Client",
    "CnnkitError",
    "ConnectError",
    "FeatureMaps",
    "FilterPatterns",
    "GradCam",
    "GrpcClient",
    "Health",
    "InvalidInputError",
    "LayerInfo",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "Prediction",
    "RequestTimeoutError",
    "Retry",
    "ServerError",
    "OverloadedError",
    "ServiceUnavailableError",
]
