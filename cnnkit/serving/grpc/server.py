"""TensorFlow Serving's gRPC API over the inference core, so stock TF-Serving clients work unchanged.

Implements ``tensorflow.serving.PredictionService`` (Predict with ``output_filter`` and the
``serving_default`` / ``feature_maps`` signatures, Classify for image classifiers,
GetModelMetadata), ``tensorflow.serving.ModelService.GetModelStatus``, ``grpc.health.v1``, the
JSON extensions of :class:`Extensions`, and the Open Inference Protocol's
``inference.GRPCInferenceService`` (:mod:`cnnkit.serving.grpc.v2`). Unknown models, versions and
signatures answer with TF Serving's status codes and messages.

The messages are the SDK's wire-compatible copies of TF Serving's protos
(``cnnkit_client.protos.tfs``: the same package names, so the same method paths and type URLs),
so the serving process needs neither ``tensorflow-serving-api`` nor TensorFlow.

The server is a ``grpc.aio`` server on an event loop of its own, in a thread of its own
(:class:`GrpcServer`). The inference methods (Predict, Classify, ModelInfer) are coroutines on
that loop: a call is decoded there (large inputs in a thread) and queued for its model version's
micro-batcher, so however many calls arrive while a batch runs, they form the next batch, without
a thread per call. Metadata and status are plain functions that grpc.aio runs in a pool of
``max_workers`` threads; the JSON extensions (explanations among them) are coroutines that run
their work in the same pool.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np

from cnnkit.errors import InvalidInputError, NotFoundError, ServingError
from cnnkit.repository import PREDICT_OUTPUTS, PREDICT_SIGNATURE, TensorSpec
from cnnkit.serving import metrics
from cnnkit.serving.auth import key_matches, presented_key
from cnnkit.serving.callers import CallerWatch, watching
from cnnkit.serving.core import InferenceCore
from cnnkit.serving.grpc import v2
from cnnkit.serving.grpc.calls import DecodeErrorInterceptor, abort_async, rpc
from cnnkit.serving.inputs import check_batch, check_count, decode_base64, decode_image, decode_images
from cnnkit.serving.logs import identify_call
from cnnkit.serving.model_store import LoadedModel
from cnnkit.serving.offload import off_loop_if_large
from cnnkit.serving.requests import (
    EmptyRequest,
    FeatureMapsJsonRequest,
    FilterPatternsRequest,
    GradCamJsonRequest,
    ModelRequest,
    parse,
)
from cnnkit_client.protos.tfs import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    types_pb2,
)
from cnnkit_client.tensors import to_ndarray, to_tensor_proto

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # feature maps of a batch exceed gRPC's 4 MB default
EXTENSION_SERVICE = "cnnkit.v1.Extensions"
HEALTH_SERVICE_NAMES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                        EXTENSION_SERVICE, "inference.GRPCInferenceService")
IMAGE_FEATURE_KEYS = ("image/encoded", "image", "image_bytes")
_DATA_TYPES = {"float32": types_pb2.DT_FLOAT, "int64": types_pb2.DT_INT64}


def _version_of(model_spec) -> int | None:
    if model_spec.HasField("version"):
        return int(model_spec.version.value)
    if model_spec.version_label:
        raise NotFoundError(f"Version labels are not supported; got label {model_spec.version_label!r}.")
    return None


def check_declared_shape(proto, model: LoadedModel, limits) -> None:
    """Refuse a TensorProto whose declared shape is more than a request may hold, before anything
    is allocated for it: TF's rules fill a short tensor up to its shape (repeating the last value),
    so a 49-byte message could otherwise claim gigabytes."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidInputError("The input tensor has an unknown rank; give its shape.")
    dims = [int(dim.size) for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise InvalidInputError(f"The input tensor's shape {dims[:8]} has an unknown (negative) size.")
    count = math.prod(dims)  # Python integers: no overflow
    if proto.dtype == types_pb2.DT_STRING:
        check_count(count, limits)
        if len(proto.string_val) != count:
            raise InvalidInputError(f"The input tensor holds {len(proto.string_val)} strings for shape {dims[:8]}; "
                                    f"send one encoded image per element.")
        return
    if len(dims) == len(model.input_shape) + 1:
        check_count(dims[0], limits)  # a batch of images: the usual message about the batch size
    per_image = math.prod(int(size) for size in model.input_shape)
    if count > per_image * limits.max_batch:
        raise InvalidInputError(
            f"The input tensor's shape {dims[:8]} holds {count} values, more than {limits.max_batch} images of "
            f"{tuple(model.input_shape)}; the limit is {limits.max_batch} images per request."
        )


def images_from_tensor(proto, model: LoadedModel, limits) -> np.ndarray:
    """A TensorProto of pixels (any real dtype) or of encoded image bytes, as a float32 batch."""
    check_declared_shape(proto, model, limits)
    if proto.dtype == types_pb2.DT_STRING:
        return decode_images(list(proto.string_val), model.input_shape, limits)
    try:
        array = to_ndarray(proto)
    except Exception as error:  # noqa: BLE001 - malformed TensorProto content.
        raise InvalidInputError(f"The input tensor is malformed: {error}") from error
    return check_batch(array, model.input_shape, limits)


def fill_tensor_proto(target, value: np.ndarray) -> None:
    """Write ``value`` into ``target`` as tf.make_tensor_proto would, without its cost (about
    0.25 ms per small tensor, a tenth of a whole Predict call)."""
    target.CopyFrom(to_tensor_proto(value))


def _tensor_info(target, name: str, spec: TensorSpec) -> None:
    target.name = f"{name}:0"
    target.dtype = _DATA_TYPES[spec.dtype]
    for size in spec.shape:
        target.tensor_shape.dim.add().size = -1 if size is None else size


def signature_defs(model: LoadedModel) -> get_model_metadata_pb2.SignatureDefMap:
    """The served signatures (from the repository's one description) as TF's SignatureDefMap."""
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in model.signatures().items():
        definition = signatures.signature_def[name]
        definition.method_name = "tensorflow/serving/predict"
        for key, spec in signature.inputs.items():
            _tensor_info(definition.inputs[key], key, spec)
        for key, spec in signature.outputs.items():
            _tensor_info(definition.outputs[key], key, spec)
    return signatures


def _rpc(endpoint: str) -> Callable:
    """TF Serving's requests name their model in ``model_spec``."""
    return rpc(endpoint, lambda request: request.model_spec.name)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's PredictionService on the inference core."""

    def __init__(self, core: InferenceCore):
        self.core = core

    def _model(self, model_spec) -> LoadedModel:
        return self.core.model(model_spec.name, _version_of(model_spec))

    @_rpc("Predict")
    async def Predict(self, request, context):  # noqa: N802 - gRPC method name
        model = self._model(request.model_spec)
        signature = request.model_spec.signature_name or PREDICT_SIGNATURE
        available = model.signature_outputs(signature)
        if list(request.inputs) != ["image"]:
            raise InvalidInputError(
                f"input tensor alias not found in signature: "
                f"{', '.join(sorted(request.inputs)) or '(none)'}. Inputs expected to be in the set {{image}}."
            )
        wanted = list(request.output_filter) or available
        unknown = [output for output in wanted if output not in available]
        if unknown:
            raise InvalidInputError(
                f"output tensor alias not found in signature: {', '.join(unknown)} Outputs "
                f"expected to be in the set {{{','.join(available)}}}."
            )
        if set(wanted) <= set(PREDICT_OUTPUTS):
            self.core.admit(model)
        tensor = request.inputs["image"]
        images = await off_loop_if_large(tensor.ByteSize(), images_from_tensor, tensor, model, self.core.limits)
        results = await self.core.predict(model, images, wanted)
        # Feature maps of a batch can be tens of megabytes: copied into the message in a thread.
        return await off_loop_if_large(sum(value.nbytes for value in results.values()), self._predict_response,
                                       model, signature, wanted, results)

    @staticmethod
    def _predict_response(model: LoadedModel, signature: str, wanted: list[str],
                          results: dict[str, np.ndarray]) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature
        for output in wanted:
            fill_tensor_proto(response.outputs[output], results[output])
        return response

    @_rpc("Classify")
    async def Classify(self, request, context):  # noqa: N802
        model = self._model(request.model_spec)
        examples = list(request.input.example_list.examples)
        if request.input.HasField("example_list_with_context"):
            examples = list(request.input.example_list_with_context.examples)
        check_count(len(examples), self.core.limits)
        self.core.admit(model)
        images = await off_loop_if_large(request.ByteSize(), self._example_images, examples, model)
        probabilities = (await self.core.predict(model, images))["probabilities"]
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = PREDICT_SIGNATURE
        for row in probabilities:
            classifications = response.result.classifications.add()
            for index in np.argsort(-row, kind="stable"):
                entry = classifications.classes.add()
                entry.label = model.class_names[index]
                entry.score = float(row[index])
        return response

    def _example_images(self, examples: list, model: LoadedModel) -> np.ndarray:
        return np.stack([self._example_image(example, model) for example in examples])

    def _example_image(self, example, model: LoadedModel) -> np.ndarray:
        features = example.features.feature
        for key in IMAGE_FEATURE_KEYS:
            if key in features and features[key].bytes_list.value:
                return decode_image(features[key].bytes_list.value[0], model.input_shape,
                                    self.core.limits).astype(np.float32)
        if "pixels" in features and features["pixels"].float_list.value:
            values = np.asarray(features["pixels"].float_list.value, dtype=np.float32)
            if values.size != int(np.prod(model.input_shape)):
                raise InvalidInputError(
                    f"The 'pixels' feature holds {values.size} values; the model takes "
                    f"{int(np.prod(model.input_shape))} ({model.input_shape})."
                )
            return check_batch(values.reshape(model.input_shape), model.input_shape, self.core.limits)[0]
        raise InvalidInputError(
            f"Each tf.Example needs the encoded image as a bytes feature "
            f"({', '.join(IMAGE_FEATURE_KEYS)}) or raw pixels as a float feature 'pixels'."
        )

    @_rpc("GetModelMetadata")
    def GetModelMetadata(self, request, context):  # noqa: N802
        model = self._model(request.model_spec)
        unsupported = [field for field in request.metadata_field if field != "signature_def"]
        if unsupported:
            raise InvalidInputError(
                f"Metadata field {', '.join(unsupported)} is not supported; use signature_def."
            )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].Pack(signature_defs(model))
        return response


class ModelStatusService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: InferenceCore):
        self.core = core

    @_rpc("GetModelStatus")
    def GetModelStatus(self, request, context):  # noqa: N802
        name = request.model_spec.name
        pinned = _version_of(request.model_spec)
        if pinned is not None:
            models = [self.core.model(name, pinned)]
        else:
            self.core.model(name)  # NotFoundError for unknown models
            models = [self.core.model(name, version) for version in self.core.store.versions(name)]
        response = get_model_status_pb2.GetModelStatusResponse()
        for model in models:
            status = response.model_version_status.add()
            status.version = model.version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.error_code = 0
        return response


def _unimplemented(message: str) -> grpc.RpcMethodHandler:
    """A method of TF Serving's API that cnnkit does not serve: UNIMPLEMENTED with a reason
    (the request is not even parsed, so the SDK's protos need not carry its messages)."""

    def refuse(request: bytes, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return grpc.unary_unary_rpc_method_handler(refuse)


UNIMPLEMENTED = {
    "tensorflow.serving.PredictionService": {
        "Regress": "Regress: cnnkit serves image classifiers only.",
        "MultiInference": "MultiInference is not supported; use Predict or Classify.",
    },
    "tensorflow.serving.ModelService": {
        "HandleReloadConfigRequest": "cnnkit picks up new versions from the repository by itself; no reload needed.",
    },
}


class Extensions:
    """What TF Serving's API has no message for, as gRPC methods with JSON bodies (UTF-8 bytes).

    ``/cnnkit.v1.Extensions/ListModels`` ``{}`` -> ``{"models": [...]}``; ``DescribeModel``
    ``{"model", "version"?}`` -> the model's description (classes, input, layers), as ``GET /models/NAME``;
    ``FeatureMapPngs`` ``{"model", "version"?, "layers"?, "image_b64"}`` -> ``{"model", "version",
    "png": {layer: base64 PNG grid}}``; ``GradCam`` and ``FilterPatterns`` take and answer what
    ``POST /gradcam_json`` and ``POST /filter_patterns`` do. The bodies are validated with the same
    request models as the HTTP routes (:mod:`cnnkit.serving.requests`). Clients need no ``.proto``.
    """

    METHODS: dict[str, type] = {"ListModels": EmptyRequest, "DescribeModel": ModelRequest,
                                "FeatureMapPngs": FeatureMapsJsonRequest, "GradCam": GradCamJsonRequest,
                                "FilterPatterns": FilterPatternsRequest}
    WATCHED = frozenset({"GradCam", "FilterPatterns"})

    def __init__(self, core: InferenceCore, executor: futures.Executor | None = None):
        self.core = core
        # The work runs in these threads (None: the loop's default executor), never in the loop.
        self.executor = executor

    def ListModels(self, request: EmptyRequest) -> dict[str, Any]:  # noqa: N802
        return {"models": self.core.describe_all()}

    def DescribeModel(self, request: ModelRequest) -> dict[str, Any]:  # noqa: N802
        return self.core.describe(self.core.model(request.model, request.version))

    def FeatureMapPngs(self, request: FeatureMapsJsonRequest) -> dict[str, Any]:  # noqa: N802
        model = self.core.model(request.model, request.version)
        pixels = decode_image(decode_base64(request.image_b64), model.input_shape, self.core.limits)
        maps = self.core.feature_maps(model, pixels.astype(np.float32), request.layers)
        pngs = self.core.feature_map_pngs(model, maps)
        return {"model": model.name, "version": model.version,
                "png": {name: base64.b64encode(png).decode("ascii") for name, png in pngs.items()}}

    def GradCam(self, request: GradCamJsonRequest) -> dict[str, Any]:  # noqa: N802
        model = self.core.model(request.model, request.version)
        pixels = decode_image(decode_base64(request.image_b64), model.input_shape, self.core.limits)
        return self.core.gradcam(model, pixels, request.class_name, request.class_index, request.dtype)

    def FilterPatterns(self, request: FilterPatternsRequest) -> dict[str, Any]:  # noqa: N802
        model = self.core.model(request.model, request.version)
        return self.core.filter_patterns(model, request.layer, request.filters, request.steps, request.seed,
                                         request.arrays)

    def handler(self) -> grpc.GenericRpcHandler:
        def method(name: str, model_type: type) -> grpc.RpcMethodHandler:
            function = getattr(self, name)
            watched = name in self.WATCHED

            def work(request: bytes, observation: metrics.Observation) -> bytes:
                try:
                    body = json.loads(request or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise InvalidInputError(f"The request must be a JSON object: {error}") from error
                if isinstance(body, dict) and isinstance(body.get("model"), str):
                    observation.model = body["model"]
                return json.dumps(function(parse(model_type, body))).encode()

            async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                identify_call(context)
                try:
                    with metrics.observe("grpc", name) as observation:
                        # Explanations: a call the client cancels (or whose deadline passes) is
                        # cancelled here, and its caller leaves, which withdraws its job from the worker.
                        caller = CallerWatch()
                        with watching(caller) if watched else contextlib.nullcontext():
                            run = functools.partial(contextvars.copy_context().run, work, request, observation)
                            try:
                                return await asyncio.get_running_loop().run_in_executor(self.executor, run)
                            except asyncio.CancelledError:
                                caller.leave()
                                raise
                except ServingError as error:
                    await abort_async(context, error)

            return grpc.unary_unary_rpc_method_handler(handle)

        return grpc.method_handlers_generic_handler(
            EXTENSION_SERVICE, {name: method(name, model_type) for name, model_type in self.METHODS.items()})


# The Open Inference Protocol's health checks, open like grpc.health.v1 (and /v2/health/* over HTTP).
OPEN_V2_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks without the API key (``x-api-key`` or Bearer)."""

    def __init__(self, api_key: str):
        self.api_key = api_key

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong API key (metadata x-api-key).")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable, handler_call_details) -> Any:
        if handler_call_details.method.startswith("/grpc.health.v1.Health/") or \
                handler_call_details.method in OPEN_V2_METHODS:
            return await continuation(handler_call_details)
        metadata = [(key, value.decode("latin-1") if isinstance(value, bytes) else value)
                    for key, value in handler_call_details.invocation_metadata or ()]
        if key_matches(presented_key(metadata), self.api_key):
            return await continuation(handler_call_details)
        return self._deny


class GrpcServer:
    """The service's gRPC server: a ``grpc.aio`` server on an event loop of its own, in a thread of
    its own, so it shares nothing with the HTTP server's loop but the inference core.

    Made ready (bound, health NOT_SERVING) by :func:`build_server`; :meth:`start` it, say when it is
    ready with :meth:`set_serving` (the service does on every repository refresh), :meth:`stop` it.
    ``port`` is the bound port.
    """

    def __init__(self, core: InferenceCore, *, host: str, port: int, api_key: str | None, max_workers: int,
                 reuse_port: bool):
        self.core = core
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cnnkit-grpc-loop", daemon=True)
        self._thread.start()
        # Plain (non-coroutine) handlers run here (metadata, status), and the extensions' work.
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cnnkit-grpc")
        self._lag_watch: asyncio.Task | None = None
        try:
            self._server, self.port, self._health = self._on_loop(self._build(host, port, api_key, reuse_port))
        except BaseException:
            self._close_loop()
            raise

    def _on_loop(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _build(self, host: str, port: int, api_key: str | None, reuse_port: bool) -> tuple[Any, int, Any]:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            # The key is checked before the request is decoded; undecodable requests are refused clearly.
            interceptors=[*([ApiKeyInterceptor(api_key)] if api_key else []), DecodeErrorInterceptor()],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(self.core), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusService(self.core), server)
        v2.add_to_server(self.core, server)  # the Open Inference Protocol beside TF Serving's API
        server.add_generic_rpc_handlers(tuple(
            grpc.method_handlers_generic_handler(service, {name: _unimplemented(message)
                                                           for name, message in methods.items()})
            for service, methods in UNIMPLEMENTED.items()
        ) + (Extensions(self.core, self._pool).handler(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in HEALTH_SERVICE_NAMES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"Cannot listen for gRPC on {host}:{port} (port in use?).")
        return server, bound, health_servicer

    def start(self) -> None:
        async def start() -> None:
            await self._server.start()
            self._lag_watch = asyncio.get_running_loop().create_task(metrics.watch_event_loop("grpc"))

        self._on_loop(start())

    def set_serving(self, serving: bool, *, wait: bool = True) -> None:
        """Health answers SERVING (or NOT_SERVING: draining before a shutdown; calls are still
        answered) for every service. ``wait=False`` only schedules it (from a signal handler)."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def set_all() -> None:
            for service in HEALTH_SERVICE_NAMES:
                await self._health.set(service, status)

        if self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(set_all(), self._loop)
        if wait:
            future.result(30)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give those in flight ``grace`` seconds to finish (None: cancel them),
        then stop the loop, its batchers and the thread pool."""
        if self._loop.is_closed():
            return

        async def stop() -> None:
            await self._server.stop(grace)
            if self._lag_watch is not None:
                self._lag_watch.cancel()
            self.core.close_loop_batchers()

        try:
            self._on_loop(stop(), timeout=(grace or 0) + 30)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_server(core: InferenceCore, *, host: str = "127.0.0.1", port: int = 8500,
                 api_key: str | None = None, max_workers: int = 16,
                 reuse_port: bool = False) -> GrpcServer:
    """A ready (bound, not yet started) gRPC server on ``core``.

    With ``reuse_port`` several server processes bind the same port (SO_REUSEPORT: the kernel
    spreads connections over them, the pattern of grpcio's multiprocessing example); without it a
    port another process holds is refused, as it should be for a single server."""
    return GrpcServer(core, host=host, port=port, api_key=api_key, max_workers=max_workers, reuse_port=reuse_port)


__all__ = ["GrpcServer", "build_server"]
