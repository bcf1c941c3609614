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


class _Undecodable:
    """What a request that is not a valid message of its method's type decodes to."""

    def __init__(self, error: Exception):
        self.error = error


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """Answer a request that does not parse as its method's message with INVALID_ARGUMENT.

    grpcio answers a failed deserialisation with INTERNAL ("Exception deserializing request!"),
    which reads as the server's fault; the bytes are the client's. Every unary method's decoder is
    wrapped so that a failure becomes a marker the handler refuses with a message instead.
    """

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if (handler is None or handler.request_streaming or handler.unary_unary is None
                or handler.request_deserializer is None):
            return handler
        decode, behaviour = handler.request_deserializer, handler.unary_unary
        method = handler_call_details.method

        def tolerant_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as error:  # noqa: BLE001 - whatever the message parser raises
                return _Undecodable(error)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"The request is not a valid message for {method}: "
                              f"{str(request.error)[:100] or type(request.error).__name__}.")
            return behaviour(request, context)

        return handler._replace(request_deserializer=tolerant_decode, unary_unary=guarded)
