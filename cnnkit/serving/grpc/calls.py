"""What every gRPC handler of the service does around its work, for both front ends (TF Serving's
API and the Open Inference Protocol): the request id, the metrics, and a refused call's status.

The server is a ``grpc.aio`` server (see :mod:`cnnkit.serving.grpc.server`): inference handlers are
coroutines on its event loop, the others plain functions run in its thread pool. Each wrapper here
takes both kinds and keeps the kind it was given, which is how ``grpc.aio`` tells them apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from cnnkit.errors import ServingError
from cnnkit.serving import metrics
from cnnkit.serving.logs import identify_call


def abort(context: grpc.ServicerContext, error: ServingError) -> NoReturn:
    """A plain handler's way to answer a refused call: its status code and message."""
    context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


async def abort_async(context: grpc.aio.ServicerContext, error: ServingError) -> NoReturn:
    """The same from a coroutine handler."""
    await context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


def rpc(endpoint: str, model_of: Callable[[Any], str]) -> Callable:
    """Wrap an RPC handler (a coroutine or a plain function): identify the call, count it in the
    metrics (labelled with the model ``model_of(request)`` names) and answer a ServingError with its status."""

    def decorate(handler: Callable) -> Callable:
        if inspect.iscoroutinefunction(handler):
            async def wrapped_async(self, request, context):
                identify_call(context)
                try:
                    with metrics.observe("grpc", endpoint, model_of(request) or "-"):
                        return await handler(self, request, context)
                except ServingError as error:
                    await abort_async(context, error)

            wrapped: Callable = wrapped_async
        else:
            def wrapped_plain(self, request, context):
                identify_call(context)
                try:
                    with metrics.observe("grpc", endpoint, model_of(request) or "-"):
                        return handler(self, request, context)
                except ServingError as error:
                    abort(context, error)

            wrapped = wrapped_plain
        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return decorate


class _Undecodable:
    """What a request that is not a valid message of its method's type decodes to."""

    def __init__(self, error: Exception):
        self.error = error


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answer a request that does not parse as its method's message with INVALID_ARGUMENT.

    grpcio answers a failed deserialisation with INTERNAL ("Exception deserializing request!"),
    which reads as the server's fault; the bytes are the client's. Every unary method's decoder is
    wrapped so that a failure becomes a marker the handler refuses with a message instead. A
    method's wrapped handler is made once and kept: the interceptor runs on every call.
    """

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[Any, Any]] = {}  # method -> (its handler, the wrapped one)

    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, method)
        if len(self._guarded) < 1024:  # the served methods; never one entry per unknown name sent
            self._guarded[method] = (handler, guarded)
        return guarded

    @staticmethod
    def _guard(handler: Any, method: str) -> Any:
        if (handler is None or handler.request_streaming or handler.unary_unary is None
                or handler.request_deserializer is None):
            return handler
        decode, behaviour = handler.request_deserializer, handler.unary_unary

        def tolerant_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as error:  # noqa: BLE001 - whatever the message parser raises
                return _Undecodable(error)

        def refusal(request: _Undecodable) -> str:
            return (f"The request is not a valid message for {method}: "
                    f"{str(request.error)[:100] or type(request.error).__name__}.")

        if inspect.iscoroutinefunction(behaviour):
            async def guarded_async(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
                return await behaviour(request, context)

            guarded: Callable = guarded_async
        else:
            def guarded_plain(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
                return behaviour(request, context)

            guarded = guarded_plain
        return handler._replace(request_deserializer=tolerant_decode, unary_unary=guarded)
