"""TensorFlow Serving's gRPC API over the model store, so stock TF-Serving clients work unchanged.

Implements ``tensorflow.serving.PredictionService`` (Predict with ``output_filter`` and the
``serving_default`` / ``feature_maps`` signatures, Classify for image classifiers,
GetModelMetadata), ``tensorflow.serving.ModelService.GetModelStatus`` and ``grpc.health.v1``.
Unknown models, versions and signatures answer with TF Serving's status codes and messages.

Importing ``tensorflow_serving.apis`` imports TensorFlow (for its protos); only the server does.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from cnnkit_client.protos.tfs import types_pb2
from cnnkit_client.tensors import to_ndarray, to_tensor_proto
from serving import metrics
from serving.batching import ThreadBatcher
from serving.core import InferenceCore, VersionBatchers
from serving.errors import InvalidInputError, NotFoundError, ServingError
from serving.explain import Explanations
from serving.inputs import (
    DEFAULT_LIMITS,
    InputLimits,
    check_batch,
    check_count,
    decode_base64,
    decode_image,
    decode_images,
)
from serving.middleware import key_matches, presented_key
from serving.model_store import PREDICT_OUTPUTS, LoadedModel, ModelStore

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # feature maps of a batch exceed gRPC's 4 MB default
EXTENSION_SERVICE = "cnnkit.v1.Extensions"
HEALTH_SERVICE_NAMES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                        EXTENSION_SERVICE)
IMAGE_FEATURE_KEYS = ("image/encoded", "image", "image_bytes")


def _tf():
    import tensorflow as tf

    return tf


def _apis():
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    return (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
            model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)


def _abort(context, error: ServingError) -> None:
    context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)


def _version_of(model_spec) -> int | None:
    if model_spec.HasField("version"):
        return int(model_spec.version.value)
    if model_spec.version_label:
        raise NotFoundError(f"Version labels are not supported; got label {model_spec.version_label!r}.")
    return None


def images_from_tensor(proto, model: LoadedModel, limits: InputLimits) -> np.ndarray:
    """A TensorProto of pixels (any real dtype) or of encoded image bytes, as a float32 batch."""
    if proto.dtype == types_pb2.DT_STRING:
        return decode_images(list(proto.string_val), model.input_shape, limits)
    try:
        # The SDK's reader (tf.make_ndarray's rules) reads TF's message too, in a fifth of the time.
        array = to_ndarray(proto)
    except Exception as error:  # noqa: BLE001 - malformed TensorProto content.
        raise InvalidInputError(f"The input tensor is malformed: {error}") from error
    return check_batch(array, model.input_shape, limits)


def fill_tensor_proto(target, value: np.ndarray) -> None:
    """Write ``value`` into ``target`` (TF's TensorProto) as tf.make_tensor_proto would, without its
    cost (about 0.25 ms per small tensor, a tenth of a whole Predict call)."""
    target.ParseFromString(to_tensor_proto(value).SerializeToString())


def _signature_def(model: LoadedModel, signature: str):
    tf = _tf()
    from tensorflow.core.protobuf import meta_graph_pb2

    definition = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    image = definition.inputs["image"]
    image.name = "image:0"
    image.dtype = tf.float32.as_datatype_enum
    image.tensor_shape.CopyFrom(tf.TensorShape([None, *model.input_shape]).as_proto())
    if signature == "serving_default":
        shapes: dict[str, Any] = {"probabilities": ([None, len(model.class_names)], tf.float32),
                                  "top_class": ([None], tf.int64)}
    else:
        shapes = {layer["name"]: ([None, *layer["output_shape"]], tf.float32)
                  for layer in model.feature_layers}
    for name, (shape, dtype) in shapes.items():
        output = definition.outputs[name]
        output.name = f"{name}:0"
        output.dtype = dtype.as_datatype_enum
        output.tensor_shape.CopyFrom(tf.TensorShape(shape).as_proto())
    return definition


def _rpc(endpoint: str) -> Callable:
    """Wrap an RPC handler: count it in the metrics and turn ServingError into a gRPC status."""

    def decorate(handler: Callable) -> Callable:
        def wrapped(self, request, context):
            name = request.model_spec.name or "-"
            try:
                with metrics.observe(name, "grpc", endpoint):
                    return handler(self, request, context)
            except ServingError as error:
                _abort(context, error)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return decorate


class BatchBridge:
    """Micro-batching for the gRPC threads: a :class:`ThreadBatcher` per model version, so
    concurrent Predict/Classify calls for one version share ONNX Runtime calls while a lone call
    runs in its own thread with no hand-off."""

    def __init__(self, store: ModelStore, max_batch_size: int = 64):
        self._batchers = VersionBatchers(store, lambda infer, on_batch: ThreadBatcher(
            infer, max_batch_size=max_batch_size, on_batch=on_batch))

    def batcher(self, model: LoadedModel) -> ThreadBatcher:
        return self._batchers.get(model)

    def probabilities(self, model: LoadedModel, images: np.ndarray) -> np.ndarray:
        return self.batcher(model).submit(images)["probabilities"]

    def close(self) -> None:
        self._batchers.close()


class PredictionService:
    """The servicer; built lazily so importing this module does not import TensorFlow."""

    def __init__(self, store: ModelStore, limits: InputLimits = DEFAULT_LIMITS, batching: BatchBridge | None = None):
        self.store = store
        self.limits = limits
        self.batching = batching

    def _probabilities(self, model: LoadedModel, images: np.ndarray) -> np.ndarray:
        if self.batching is not None:
            return self.batching.probabilities(model, images)
        probabilities = model.run(images, ["probabilities"])["probabilities"]
        metrics.record_batch(model.name, len(images))
        return probabilities

    def _model(self, model_spec) -> LoadedModel:
        return self.store.get(model_spec.name, _version_of(model_spec))

    @_rpc("Predict")
    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        (_, _, _, _, predict_pb2, _) = _apis()
        model = self._model(request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
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
        images = images_from_tensor(request.inputs["image"], model, self.limits)
        if set(wanted) <= set(PREDICT_OUTPUTS):  # batched with other callers'
            probabilities = self._probabilities(model, images)
            everything = {"probabilities": probabilities, "top_class": probabilities.argmax(axis=1).astype(np.int64)}
            results = {name: everything[name] for name in wanted}
        else:
            results = model.run(images, wanted)
            metrics.record_batch(model.name, len(images))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature
        for output, value in results.items():
            fill_tensor_proto(response.outputs[output], value)
        return response

    @_rpc("Classify")
    def Classify(self, request, context):  # noqa: N802
        (classification_pb2, _, _, _, _, _) = _apis()
        model = self._model(request.model_spec)
        examples = list(request.input.example_list.examples)
        if request.input.HasField("example_list_with_context"):
            examples = list(request.input.example_list_with_context.examples)
        check_count(len(examples), self.limits)
        images = np.stack([self._example_image(example, model) for example in examples])
        probabilities = self._probabilities(model, images)
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = "serving_default"
        for row in probabilities:
            classifications = response.result.classifications.add()
            for index in np.argsort(-row, kind="stable"):
                entry = classifications.classes.add()
                entry.label = model.class_names[index]
                entry.score = float(row[index])
        return response

    def Regress(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress: cnnkit serves image classifiers only.")

    def MultiInference(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported; use Predict or Classify.")

    def _example_image(self, example, model: LoadedModel) -> np.ndarray:
        features = example.features.feature
        for key in IMAGE_FEATURE_KEYS:
            if key in features and features[key].bytes_list.value:
                return decode_image(features[key].bytes_list.value[0], model.input_shape,
                                    self.limits).astype(np.float32)
        if "pixels" in features and features["pixels"].float_list.value:
            values = np.asarray(features["pixels"].float_list.value, dtype=np.float32)
            if values.size != int(np.prod(model.input_shape)):
                raise InvalidInputError(
                    f"The 'pixels' feature holds {values.size} values; the model takes "
                    f"{int(np.prod(model.input_shape))} ({model.input_shape})."
                )
            return check_batch(values.reshape(model.input_shape), model.input_shape, self.limits)[0]
        raise InvalidInputError(
            f"Each tf.Example needs the encoded image as a bytes feature "
            f"({', '.join(IMAGE_FEATURE_KEYS)}) or raw pixels as a float feature 'pixels'."
        )

    @_rpc("GetModelMetadata")
    def GetModelMetadata(self, request, context):  # noqa: N802
        (_, get_model_metadata_pb2, _, _, _, _) = _apis()
        model = self._model(request.model_spec)
        fields = list(request.metadata_field)
        unsupported = [field for field in fields if field != "signature_def"]
        if unsupported:
            raise InvalidInputError(
                f"Metadata field {', '.join(unsupported)} is not supported; use signature_def."
            )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for signature in ("serving_default", "feature_maps"):
            signatures.signature_def[signature].CopyFrom(_signature_def(model, signature))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelStatusService:
    def __init__(self, store: ModelStore):
        self.store = store

    @_rpc("GetModelStatus")
    def GetModelStatus(self, request, context):  # noqa: N802
        (_, _, get_model_status_pb2, _, _, _) = _apis()
        name = request.model_spec.name
        pinned = _version_of(request.model_spec)
        if pinned is not None:
            models = [self.store.get(name, pinned)]
        else:
            self.store.get(name)  # NotFoundError for unknown models
            models = [self.store.get(name, version) for version in self.store.versions(name)]
        response = get_model_status_pb2.GetModelStatusResponse()
        for model in models:
            status = response.model_version_status.add()
            status.version = model.version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.error_code = 0
        return response


    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "cnnkit picks up new versions from the repository by itself; no reload needed.")


class Extensions:
    """What TF Serving's API has no message for, as gRPC methods with JSON bodies (UTF-8 bytes).

    ``/cnnkit.v1.Extensions/ListModels`` ``{}`` -> ``{"models": [...]}``; ``DescribeModel``
    ``{"model", "version"?}`` -> the model's description (classes, input, layers), as ``GET /models/NAME``;
    ``FeatureMapPngs`` ``{"model", "version"?, "layers"?, "image_b64"}`` -> ``{"model", "version",
    "png": {layer: base64 PNG grid}}``; ``GradCam`` ``{"model", "version"?, "image_b64", "class_name"? |
    "class_index"?, "dtype"?}`` and ``FilterPatterns`` ``{"model", "version"?, "layer"?, "filters"?,
    "steps"?, "seed"?, "arrays"?}`` answer as ``POST /gradcam_json`` and ``POST /filter_patterns`` do.
    Clients need no ``.proto`` for them.
    """

    METHODS = ("ListModels", "DescribeModel", "FeatureMapPngs", "GradCam", "FilterPatterns")

    def __init__(self, core: InferenceCore):
        self.core = core

    def ListModels(self, body: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        return {"models": self.core.list_models()}

    def DescribeModel(self, body: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        return self.core.describe(self._model(body))

    def FeatureMapPngs(self, body: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        model = self._model(body)
        layers = body.get("layers")
        if layers is not None and not (isinstance(layers, list) and all(isinstance(name, str) for name in layers)):
            raise InvalidInputError("'layers' must be a list of layer names.")
        if not isinstance(body.get("image_b64"), str):
            raise InvalidInputError("'image_b64' (the image file in base64) is required.")
        pixels = decode_image(decode_base64(body["image_b64"]), model.input_shape, self.core.limits)
        pngs = self.core.feature_map_pngs(self.core.feature_maps(model, pixels.astype(np.float32), layers))
        return {"model": model.name, "version": model.version,
                "png": {name: base64.b64encode(png).decode("ascii") for name, png in pngs.items()}}

    def GradCam(self, body: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        model = self._model(body)
        if not isinstance(body.get("image_b64"), str):
            raise InvalidInputError("'image_b64' (the image file in base64) is required.")
        class_name, class_index = body.get("class_name"), body.get("class_index")
        if class_name is not None and not isinstance(class_name, str):
            raise InvalidInputError(f"'class_name' must be a string, got {class_name!r}.")
        if class_index is not None and (not isinstance(class_index, int) or isinstance(class_index, bool)):
            raise InvalidInputError(f"'class_index' must be an integer, got {class_index!r}.")
        pixels = decode_image(decode_base64(body["image_b64"]), model.input_shape, self.core.limits)
        return self.core.gradcam(model, pixels, class_name, class_index, str(body.get("dtype", "float16")))

    def FilterPatterns(self, body: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        model = self._model(body)
        layer = body.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise InvalidInputError(f"'layer' must be a layer name, got {layer!r}.")
        return self.core.filter_patterns(model, layer, body.get("filters"), body.get("steps", 40),
                                         body.get("seed", 0), bool(body.get("arrays", False)))

    def _model(self, body: dict[str, Any]) -> LoadedModel:
        if not isinstance(body.get("model"), str):
            raise InvalidInputError("'model' (a model name) is required.")
        version = body.get("version")
        if version is not None and not isinstance(version, int):
            raise InvalidInputError(f"'version' must be an integer, got {version!r}.")
        return self.core.model(body["model"], version)

    def handler(self) -> grpc.GenericRpcHandler:
        def method(name: str) -> grpc.RpcMethodHandler:
            function = getattr(self, name)

            def handle(request: bytes, context) -> bytes | None:
                model = "-"
                try:
                    try:
                        body = json.loads(request or b"{}")
                    except (json.JSONDecodeError, UnicodeDecodeError) as error:
                        raise InvalidInputError(f"The request must be a JSON object: {error}") from error
                    if not isinstance(body, dict):
                        raise InvalidInputError("The request must be a JSON object.")
                    model = str(body.get("model") or "-")
                    with metrics.observe(model, "grpc", name):
                        return json.dumps(function(body)).encode()
                except ServingError as error:
                    _abort(context, error)
                return None

            return grpc.unary_unary_rpc_method_handler(handle)

        return grpc.method_handlers_generic_handler(EXTENSION_SERVICE, {name: method(name) for name in self.METHODS})


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks without the API key (``x-api-key`` or Bearer)."""

    def __init__(self, api_key: str):
        self.api_key = api_key

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong API key (metadata x-api-key).")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, handler_call_details) -> Any:
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        metadata = [(key, value.decode("latin-1") if isinstance(value, bytes) else value)
                    for key, value in handler_call_details.invocation_metadata or ()]
        if key_matches(presented_key(metadata), self.api_key):
            return continuation(handler_call_details)
        return self._deny


def build_server(store: ModelStore, *, host: str = "127.0.0.1", port: int = 8500,
                 api_key: str | None = None, limits: InputLimits = DEFAULT_LIMITS,
                 max_workers: int = 16, batching: bool = True,
                 explanations: Explanations | None = None) -> tuple[grpc.Server, int, Any]:
    """A started-ready (not yet started) gRPC server; returns (server, bound port, health)."""
    from grpc_health.v1 import health, health_pb2_grpc

    (_, _, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _apis()
    interceptors: Iterable[grpc.ServerInterceptor] = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cnnkit-grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    # One InferenceCore for the gRPC side's model descriptions, feature maps and explanations.
    core = InferenceCore(store, limits=limits, explanations=explanations)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(store, limits, BatchBridge(store) if batching else None), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusService(store), server)
    server.add_generic_rpc_handlers((Extensions(core).handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    from grpc_health.v1 import health_pb2

    for service in HEALTH_SERVICE_NAMES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"Cannot listen for gRPC on {host}:{port} (port in use?).")
    return server, bound, health_servicer


def mark_serving(health_servicer) -> None:
    from grpc_health.v1 import health_pb2

    for service in HEALTH_SERVICE_NAMES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)


__all__ = ["build_server", "mark_serving"]
