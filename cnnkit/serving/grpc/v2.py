"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``), beside TF Serving's.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and ModelConfig, on
the inference core, with the same batching, metrics, API key and message limits as PredictionService.
ModelInfer takes the ``image`` input as typed ``contents`` or as ``raw_input_contents`` (what
``tritonclient.grpc`` sends) and answers with ``raw_output_contents`` (what it expects). Errors
carry the status codes of the other front ends: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
UNAVAILABLE. The other methods of the service (statistics, repository control, shared memory,
tracing, streaming) answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from cnnkit.errors import InvalidInputError, NotFoundError, UnavailableError
from cnnkit.serving import v2
from cnnkit.serving.core import InferenceCore
from cnnkit.serving.grpc.calls import rpc
from cnnkit.serving.model_store import LoadedModel
from cnnkit.serving.offload import off_loop_if_large
from cnnkit_client.protos.v2 import grpc_service_pb2 as pb
from cnnkit_client.protos.v2 import grpc_service_pb2_grpc, model_config_pb2

SERVICE = "inference.GRPCInferenceService"
UNSERVED = ("ModelStreamInfer", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
            "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
            "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting",
            "LogSettings")
# The typed contents field of each numeric data type, and the element type it holds.
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents"}


def _version(text: str) -> str | None:
    return text or None


def _rpc(endpoint: str) -> Callable:
    """The protocol's requests name their model in ``model_name`` (ModelInfer) or ``name``."""
    return rpc(endpoint, lambda request: getattr(request, "model_name", "") or getattr(request, "name", ""))


def input_tensor(request: pb.ModelInferRequest) -> v2.InputTensor:
    """The request's one input, with its values from ``raw_input_contents`` or typed ``contents``."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInputError(f"{len(request.raw_input_contents)} raw_input_contents for "
                                f"{len(request.inputs)} inputs.")
    tensors = []
    for index, item in enumerate(request.inputs):
        where = f"input {item.name!r}"
        if item.datatype not in v2.DATATYPES:
            raise InvalidInputError(f"{where}: unsupported datatype {item.datatype!r}; "
                                    f"use one of {', '.join(v2.DATATYPES)}.")
        shape = v2.check_shape(list(item.shape), where)
        values: np.ndarray | list[bytes]
        if request.raw_input_contents:
            raw = request.raw_input_contents[index]
            values = (v2.bytes_elements(raw, where) if item.datatype == "BYTES"
                      else v2.numeric_from_bytes(raw, item.datatype, shape, where))
        elif item.datatype == "BYTES":
            values = list(item.contents.bytes_contents)
        else:
            if item.datatype == "FP16":
                raise InvalidInputError(f"{where}: FP16 has no typed contents field; send it in raw_input_contents.")
            typed = list(getattr(item.contents, _CONTENTS[item.datatype]))
            if len(typed) != v2.element_count(shape):
                raise InvalidInputError(f"{where}: {len(typed)} values for shape {shape}.")
            values = np.asarray(typed, dtype=np.float64).reshape(shape)
        tensors.append(v2.InputTensor(item.name, item.datatype, shape, values))
    return v2.single_input(tensors)


class InferenceService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore):
        self.core = core

    def _model(self, name: str, version: str) -> LoadedModel:
        if not name:
            raise InvalidInputError("The model name is required.")
        return self.core.model(name, _version(version))

    def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerLiveResponse(live=True)

    @_rpc("v2_ready")
    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=bool(self.core.store.ready))

    @_rpc("v2_model_ready")
    def ModelReady(self, request, context):  # noqa: N802
        try:
            self._model(request.name, request.version)
        except (NotFoundError, UnavailableError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_rpc("v2_server_metadata")
    def ServerMetadata(self, request, context):  # noqa: N802
        metadata = v2.server_metadata()
        return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"],
                                         extensions=metadata["extensions"])

    @_rpc("v2_model_metadata")
    def ModelMetadata(self, request, context):  # noqa: N802
        model = self._model(request.name, request.version)
        versions = [model.version] if request.version else self.core.store.versions(model.name)
        metadata = v2.model_metadata(model, versions)
        response = pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                            platform=metadata["platform"])
        for target, tensors in ((response.inputs, metadata["inputs"]), (response.outputs, metadata["outputs"])):
            for tensor in tensors:
                target.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    @_rpc("v2_model_config")
    def ModelConfig(self, request, context):  # noqa: N802
        model = self._model(request.name, request.version)
        config = v2.model_config(model, self.core.limits, self.core.max_queue_ms or 0.0)
        message = model_config_pb2.ModelConfig(
            name=config["name"], platform=config["platform"], backend=config["backend"],
            max_batch_size=config["max_batch_size"])
        message.version_policy.latest.num_versions = 1
        for tensor in config["input"]:
            message.input.add(name=tensor["name"], data_type=model_config_pb2.DataType.Value(tensor["data_type"]),
                              format=model_config_pb2.ModelInput.FORMAT_NHWC, dims=tensor["dims"])
        for tensor in config["output"]:
            message.output.add(name=tensor["name"], data_type=model_config_pb2.DataType.Value(tensor["data_type"]),
                               dims=tensor["dims"])
        message.dynamic_batching.max_queue_delay_microseconds = config["dynamic_batching"][
            "max_queue_delay_microseconds"]
        return pb.ModelConfigResponse(config=message)

    @_rpc("v2_infer")
    async def ModelInfer(self, request, context):  # noqa: N802
        model = self._model(request.model_name, request.model_version)
        wanted = v2.choose_outputs(model, [output.name for output in request.outputs])
        classification = {}
        for output in request.outputs:
            parameter = output.parameters.get("classification")
            if parameter is not None:
                value = getattr(parameter, parameter.WhichOneof("parameter_choice") or "int64_param")
                k = v2.classification_k(output.name, value)
                if k is not None:
                    classification[output.name] = k
        if set(wanted) <= set(v2.DEFAULT_OUTPUTS):
            self.core.admit(model)
        images = await off_loop_if_large(request.ByteSize(), self._images, request, model)
        values = await self.core.predict(model, images, wanted)
        return await off_loop_if_large(sum(value.nbytes for value in values.values()), self._infer_response,
                                       request, model, wanted, classification, values)

    def _images(self, request: pb.ModelInferRequest, model: LoadedModel) -> np.ndarray:
        return v2.images_from_input(input_tensor(request), model, self.core.limits)

    @staticmethod
    def _infer_response(request: pb.ModelInferRequest, model: LoadedModel, wanted: list[str],
                        classification: dict[str, int], values: dict[str, np.ndarray]) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        for name in wanted:
            if name in classification:
                labels = v2.classify(values[name], model.class_names, classification[name])
                response.outputs.add(name=name, datatype="BYTES", shape=list(labels.shape))
                response.raw_output_contents.append(v2.encode_bytes_elements(list(labels.ravel())))
                continue
            datatype = v2.output_datatype(name)
            array = np.ascontiguousarray(values[name], dtype=v2.NUMERIC[datatype])
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response


def unserved_handler() -> grpc.GenericRpcHandler:
    """The service's other methods: UNIMPLEMENTED with a reason, without parsing the request."""

    def refuse(request: bytes, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "cnnkit serves ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, "
                      "ModelInfer and ModelConfig of the Open Inference Protocol.")

    return grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(refuse) for name in UNSERVED})


def add_to_server(core: InferenceCore, server: grpc.aio.Server) -> None:
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(core), server)
    server.add_generic_rpc_handlers((unserved_handler(),))
