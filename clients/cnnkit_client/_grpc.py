"""gRPC clients: ``GrpcClient`` (sync) and ``AsyncGrpcClient`` (grpc.aio), with the HTTP clients' methods.

They speak TensorFlow Serving's protocol with our own wire-compatible messages (no TensorFlow):
``predict`` is ``PredictionService/Classify`` with the encoded image in a ``tf.Example``
(``image/encoded``), ``feature_maps`` is ``Predict`` on the ``feature_maps`` signature, ``health`` is
``grpc.health.v1``. What TF Serving has no message for (the model list, descriptions with class
names, PNG grids) goes through cnnkit's JSON methods under ``/cnnkit.v1.Extensions/``.

As in :mod:`cnnkit_client._http`, each method is a plan (:mod:`cnnkit_client._plan`) of calls plus
a function that turns their answers into the result (or into a further plan, when class names must
be looked up first).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

import cnnkit_client._v2 as _v2
from cnnkit_client._methods import AsyncMethods, SyncMethods
from cnnkit_client._plan import Plan
from cnnkit_client.errors import CnnkitError, InvalidInputError, ServerError, from_grpc_code
from cnnkit_client.images import ImageLike, chunks, encode_image, encode_images
from cnnkit_client.protos.tfs import classification_pb2, predict_pb2
from cnnkit_client.retry import Retry
from cnnkit_client.tensors import to_ndarray, to_tensor_proto
from cnnkit_client.types import (
    ClassScore,
    FeatureMaps,
    FilterPatterns,
    GradCam,
    Health,
    ModelInfo,
    Prediction,
    filter_patterns_body,
    gradcam_body,
)

DEFAULT_TARGET = "127.0.0.1:8500"
DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
EXTENSIONS = "/cnnkit.v1.Extensions/"
CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
V2_SERVICE = "/inference.GRPCInferenceService/"
IMAGE_FEATURE = "image/encoded"

T = TypeVar("T")


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps({key: value for key, value in body.items() if value is not None}).encode()


def _health_request(service: str) -> bytes:
    """A ``grpc.health.v1.HealthCheckRequest`` (field 1, ``service``), encoded by hand: no extra package."""
    data = service.encode()
    if len(data) > 127:
        raise ValueError("health service name too long")
    return (b"\x0a" + bytes([len(data)]) + data) if data else b""


def _health_status(response: bytes) -> int:
    """The ``status`` (field 1, enum) of a ``HealthCheckResponse``: 1 is SERVING."""
    return response[1] if len(response) >= 2 and response[0] == 0x08 else 0


@dataclass
class _Call:
    path: str
    request: Any  # a protobuf message or bytes
    parse: Callable[[bytes], Any]


def _raw(data: bytes) -> bytes:
    return data


def _rpc_error(error: grpc.RpcError, target: str) -> CnnkitError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    message = details or str(error)
    if name == "UNAVAILABLE":
        message = f"Cannot reach {target}: {message}"
    return from_grpc_code(name, message)


class _GrpcApi:
    def __init__(self, target: str | Sequence[str], *, api_key: str | None, timeout: float | None, retry: Retry,
                 max_images_per_request: int, protocol: str = "cnnkit"):
        if max_images_per_request < 1:
            raise ValueError("max_images_per_request must be at least 1.")
        self.protocol = _v2.check_protocol(protocol)
        # Several replicas: calls go to one; UNAVAILABLE moves the retries (and later calls) on.
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("Give at least one gRPC target.")
        self.target = self.targets[0]
        self.timeout = timeout
        self.default_timeout = timeout
        self.retry = retry
        self.max_images_per_request = max_images_per_request
        self._metadata = (("x-api-key", api_key),) if api_key else None
        self._infos: dict[tuple[str, int], ModelInfo] = {}
        self._options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

    # -- plans ---------------------------------------------------------------------------------

    def _describe_call(self, model: str, version: int | None) -> _Call:
        return _Call(EXTENSIONS + "DescribeModel", _json_bytes({"model": model, "version": version}),
                     lambda data: ModelInfo.from_dict(json.loads(data)))

    def _with_info(self, model: str, version: int | None, then: Callable[[ModelInfo], T | Plan[T]]) -> Plan[T]:
        """A plan that looks the model up (once per version, cached) and goes on with ``then``."""
        cached = self._infos.get((model, version)) if version is not None else None
        if cached is not None:
            return Plan([], lambda _: then(cached))

        def remember(answers: list[Any]) -> T | Plan[T]:
            info: ModelInfo = answers[0]
            self._infos[(info.name, info.version)] = info
            return then(info)

        return Plan([self._describe_call(model, version)], remember)

    def _predict_plan(self, images: ImageLike | Sequence[ImageLike], model: str, version: int | None,
                      top_k: int) -> Plan[Prediction | list[Prediction]]:
        if top_k < 1:
            raise InvalidInputError(f"top_k must be at least 1, got {top_k}.")
        encoded, single = encode_images(images)
        if self.protocol == "v2":
            return self._v2_predict_plan(encoded, single, model, version, top_k)
        calls = []
        for chunk in chunks(encoded, self.max_images_per_request):
            request = classification_pb2.ClassificationRequest()
            request.model_spec.name = model
            if version is not None:
                request.model_spec.version.value = version
            for data in chunk:
                request.input.example_list.examples.add().features.feature[IMAGE_FEATURE].bytes_list.value.append(data)
            calls.append(_Call(CLASSIFY, request, classification_pb2.ClassificationResponse.FromString))

        def finish(responses: list[Any]) -> Prediction | list[Prediction] | Plan[Prediction | list[Prediction]]:
            answered = {(response.model_spec.name, response.model_spec.version.value) for response in responses}
            if len(answered) != 1:  # a new version went live between two chunks: the rows are still right
                answered = {max(answered, key=lambda pair: pair[1])}
            (name, answered_version), = answered

            def build(info: ModelInfo) -> Prediction | list[Prediction]:
                predictions = [
                    Prediction(response.model_spec.name, int(response.model_spec.version.value), tuple(
                        ClassScore(entry.label, info.class_index(entry.label), float(entry.score))
                        for entry in list(result.classes)[:top_k]))
                    for response in responses for result in response.result.classifications
                ]
                return predictions[0] if single else predictions

            return self._with_info(name, int(answered_version), build)

        return Plan(calls, finish)

    @staticmethod
    def _v2_infer_request(model: str, version: int | None, encoded: Sequence[bytes], outputs: Sequence[str],
                          classification: int | None = None) -> Any:
        from cnnkit_client.protos.v2 import grpc_service_pb2

        request = grpc_service_pb2.ModelInferRequest(model_name=model,
                                                     model_version=str(version) if version is not None else "")
        request.inputs.add(name="image", datatype="BYTES", shape=[len(encoded)])
        request.raw_input_contents.append(_v2.encode_bytes_elements(encoded))
        for name in outputs:
            output = request.outputs.add(name=name)
            if classification is not None:
                output.parameters["classification"].int64_param = classification
        return request

    def _v2_predict_plan(self, encoded: list[bytes], single: bool, model: str, version: int | None,
                         top_k: int) -> Plan[Prediction | list[Prediction]]:
        """The Open Inference Protocol's ModelInfer: BYTES images in, the classification extension out."""
        from cnnkit_client.protos.v2 import grpc_service_pb2

        calls = [_Call(V2_SERVICE + "ModelInfer",
                       self._v2_infer_request(model, version, chunk, ["probabilities"], classification=top_k),
                       grpc_service_pb2.ModelInferResponse.FromString)
                 for chunk in chunks(encoded, self.max_images_per_request)]

        def finish(responses: list[Any]) -> Prediction | list[Prediction]:
            predictions = []
            for response in responses:
                elements = _v2.bytes_elements(response.raw_output_contents[0])
                predictions += _v2.predictions(response.model_name, response.model_version,
                                               _v2.rows_of(elements, list(response.outputs[0].shape)))
            return predictions[0] if single else predictions

        return Plan(calls, finish)

    def _feature_maps_plan(self, image: ImageLike, model: str, layers: Sequence[str] | None, version: int | None,
                           as_png: bool) -> Plan[FeatureMaps]:
        data = encode_image(image)
        if self.protocol == "v2" and not as_png:  # the protocol has no pictures: PNG grids are cnnkit's
            from cnnkit_client.protos.v2 import grpc_service_pb2

            def infer(info: ModelInfo) -> Plan[FeatureMaps]:
                names = list(layers) if layers is not None else list(info.default_layers)
                request = self._v2_infer_request(info.name, info.version, [data], names)

                def arrays(responses: list[Any]) -> FeatureMaps:
                    response = responses[0]
                    maps = {output.name: _v2.array_from_raw(raw, output.datatype, list(output.shape))[0]
                            for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
                    return FeatureMaps(response.model_name, int(response.model_version), maps)

                return Plan([_Call(V2_SERVICE + "ModelInfer", request, grpc_service_pb2.ModelInferResponse.FromString)],
                            arrays)

            return self._with_info(model, version, infer)
        if as_png:
            body = {"model": model, "version": version, "layers": list(layers) if layers is not None else None,
                    "image_b64": base64.b64encode(data).decode("ascii")}

            def pngs(answers: list[Any]) -> FeatureMaps:
                answer = answers[0]
                return FeatureMaps(answer["model"], int(answer["version"]),
                                   {name: base64.b64decode(png) for name, png in answer["png"].items()})

            return Plan([_Call(EXTENSIONS + "FeatureMapPngs", _json_bytes(body), json.loads)], pngs)

        def predict(info: ModelInfo) -> Plan[FeatureMaps]:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = info.name
            request.model_spec.version.value = info.version
            request.model_spec.signature_name = "feature_maps"
            request.inputs[info.input_name].CopyFrom(to_tensor_proto([data]))
            request.output_filter.extend(layers if layers is not None else info.default_layers)

            def arrays(responses: list[Any]) -> FeatureMaps:
                response = responses[0]
                return FeatureMaps(response.model_spec.name, int(response.model_spec.version.value),
                                   {name: to_ndarray(response.outputs[name])[0] for name in request.output_filter})

            return Plan([_Call(PREDICT, request, predict_pb2.PredictResponse.FromString)], arrays)

        return self._with_info(model, version, predict)

    def _gradcam_plan(self, image: ImageLike, model: str, target: int | str | None,
                      version: int | None) -> Plan[GradCam]:
        body = gradcam_body(encode_image(image), model, version, target)
        return Plan([_Call(EXTENSIONS + "GradCam", _json_bytes(body), json.loads)],
                    lambda answers: GradCam.from_dict(answers[0]))

    def _filter_patterns_plan(self, model: str, layer: str | None, filters: int | Sequence[int] | None,
                              steps: int, seed: int, version: int | None, arrays: bool) -> Plan[FilterPatterns]:
        body = filter_patterns_body(model, version, layer, filters, steps, seed, arrays)
        return Plan([_Call(EXTENSIONS + "FilterPatterns", _json_bytes(body), json.loads)],
                    lambda answers: FilterPatterns.from_dict(answers[0]))

    def _models_plan(self) -> Plan[list[ModelInfo]]:
        def parse(data: bytes) -> list[ModelInfo]:
            return [ModelInfo.from_dict(item) for item in json.loads(data)["models"]]

        return Plan([_Call(EXTENSIONS + "ListModels", b"{}", parse)], lambda answers: answers[0])

    def _metadata_plan(self, model: str, version: int | None) -> Plan[ModelInfo]:
        return Plan([self._describe_call(model, version)], lambda answers: answers[0])

    def _health_plan(self) -> Plan[Health]:
        if self.protocol == "v2":
            from cnnkit_client.protos.v2 import grpc_service_pb2

            def readiness(answers: list[Any]) -> Health:
                live, ready = answers[0].live, answers[1].ready
                return Health(live=live, ready=ready, detail="" if ready else "the service is not serving yet")

            return Plan([_Call(V2_SERVICE + "ServerLive", grpc_service_pb2.ServerLiveRequest(),
                               grpc_service_pb2.ServerLiveResponse.FromString),
                         _Call(V2_SERVICE + "ServerReady", grpc_service_pb2.ServerReadyRequest(),
                               grpc_service_pb2.ServerReadyResponse.FromString)], readiness)

        def finish(answers: list[Any]) -> Health:
            ready = answers[0] == 1
            return Health(live=True, ready=ready, detail="" if ready else "the service is not serving yet")

        return Plan([_Call(HEALTH_CHECK, _health_request(""), _health_status)], finish)

    def _failed(self, error: grpc.RpcError, target: str) -> CnnkitError:
        failure = _rpc_error(error, target)
        code = error.code() if hasattr(error, "code") else None
        if code == grpc.StatusCode.UNAVAILABLE and len(self.targets) > 1 and self.target == target:
            self.target = self.targets[(self.targets.index(target) + 1) % len(self.targets)]
        return failure

    @staticmethod
    def _serialize(request: Any) -> bytes:
        return request if isinstance(request, bytes) else request.SerializeToString()


class GrpcClient(_GrpcApi, SyncMethods):
    """A synchronous client of cnnkit's gRPC API (TF Serving's protocol plus cnnkit's extensions).

    ``credentials`` (``grpc.ssl_channel_credentials(...)``) makes a TLS channel; ``channel`` lets
    tests or apps pass their own. ``protocol="v2"`` sends predictions, feature maps and health
    checks through the Open Inference Protocol's ``inference.GRPCInferenceService`` instead.
    ``target`` may list several replicas: calls go to one, and UNAVAILABLE moves the retries (and
    later calls) to the next.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_images_per_request: int = 32, credentials: grpc.ChannelCredentials | None = None,
                 channel: grpc.Channel | None = None, protocol: str = "cnnkit"):
        super().__init__(target, api_key=api_key, timeout=timeout, retry=retry or Retry(),
                         max_images_per_request=max_images_per_request, protocol=protocol)
        self._channels: dict[str, grpc.Channel] = {}
        for address in self.targets:
            if channel is not None:
                self._channels[address] = channel
            elif credentials is not None:
                self._channels[address] = grpc.secure_channel(address, credentials, options=self._options)
            else:
                self._channels[address] = grpc.insecure_channel(address, options=self._options)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in set(self._channels.values()):
            channel.close()

    def _attempt(self, call: _Call, timeout: float | None) -> Any:
        target = self.target
        method = self._channels[target].unary_unary(call.path, request_serializer=self._serialize,
                                                    response_deserializer=_raw)
        try:
            data = method(call.request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._failed(error, target) from error
        return _parse(call, data)


class AsyncGrpcClient(_GrpcApi, AsyncMethods):
    """The ``grpc.aio`` twin of :class:`GrpcClient`: the same methods, awaited."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_images_per_request: int = 32, credentials: grpc.ChannelCredentials | None = None,
                 protocol: str = "cnnkit"):
        super().__init__(target, api_key=api_key, timeout=timeout, retry=retry or Retry(),
                         max_images_per_request=max_images_per_request, protocol=protocol)
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _get_channel(self, target: str) -> grpc.aio.Channel:
        # Created on first use, inside the running event loop that will drive it.
        if target not in self._channels:
            if self._credentials is not None:
                self._channels[target] = grpc.aio.secure_channel(target, self._credentials, options=self._options)
            else:
                self._channels[target] = grpc.aio.insecure_channel(target, options=self._options)
        return self._channels[target]

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def _attempt(self, call: _Call, timeout: float | None) -> Any:
        target = self.target
        method = self._get_channel(target).unary_unary(call.path, request_serializer=self._serialize,
                                                       response_deserializer=_raw)
        try:
            data = await method(call.request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._failed(error, target) from error
        return _parse(call, data)


def _parse(call: _Call, data: bytes) -> Any:
    try:
        return call.parse(data)
    except (ValueError, KeyError, TypeError) as error:
        raise ServerError(f"Unexpected answer to {call.path}: {error}") from error

