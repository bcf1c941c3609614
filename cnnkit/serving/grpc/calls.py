"""What every gRPC handler of the service does around its work, for both front ends (TF Serving's
API and the Open Inference Protocol): the request id, the metrics, and a refused call's status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from cnnkit.errors import ServingError
from cnnkit.serving import metrics
from cnnkit.serving.logs import identify_call


def abort(context: grpc.ServicerContext, error: ServingError) -> NoReturn:
    """The one way the gRPC front ends answer a refused call: its status code and message."""
    context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


def rpc(endpoint: str, model_of: Callable[[Any], str]) -> Callable:
    """Wrap an RPC handler: identify the call, count it in the metrics (labelled with the model
    ``model_of(request)`` names) and answer a ServingError with its status."""

    def decorate(handler: Callable) -> Callable:
        def wrapped(self, request, context):
            identify_call(context)
            try:
                with metrics.observe("grpc", endpoint, model_of(request) or "-"):
                    return handler(self, request, context)
            except ServingError as error:
                abort(context, error)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return decorate
