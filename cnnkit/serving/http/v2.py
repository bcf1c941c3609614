"""The Open Inference Protocol's HTTP/REST API ("v2", as KServe and Triton speak it), mounted at ``/v2``.

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready``, ``.../config`` (Triton's
  model configuration extension);
* ``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors, or the binary tensor data extension
  (an ``Inference-Header-Content-Length`` header giving the JSON part's length, the tensors' raw
  bytes after it; outputs in binary when asked with ``binary_data`` per output or
  ``binary_data_output`` for all), which ``tritonclient.http`` uses by default;
* errors as ``{"error": message}``: 400 bad request, 404 unknown model or version, 413, 503.

The tensors and metadata are those of :mod:`cnnkit.serving.v2`, shared with the gRPC front end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cnnkit.errors import InvalidInputError, ServingError, UnavailableError
from cnnkit.serving import metrics, v2
from cnnkit.serving.core import InferenceCore
from cnnkit.serving.http.bodies import PROCESS_BYTES, loads_json, parse_json, read_body
from cnnkit.serving.http.errors import error_response
from cnnkit.serving.model_store import LoadedModel
from cnnkit.serving.offload import off_loop_if_large

HEADER_LENGTH = "inference-header-content-length"


def _parse_json(raw: bytes) -> dict[str, Any]:
    body = loads_json(raw)
    if not isinstance(body, dict):
        raise InvalidInputError("The inference request must be a JSON object.")
    return body


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary part of a request (binary tensor data extension)."""
    if header_length is None:
        return _parse_json(body), b""
    try:
        length = int(header_length)
    except ValueError as error:
        raise InvalidInputError(
            f"Inference-Header-Content-Length must be an integer, got {header_length!r}."
        ) from error
    if not 0 < length <= len(body):
        raise InvalidInputError(f"Inference-Header-Content-Length {length} does not fit a {len(body)}-byte body.")
    return _parse_json(body[:length]), body[length:]


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"{where}: 'parameters' must be an object.")
    return parameters


def decode_inputs(body: dict[str, Any], binary: bytes) -> list[v2.InputTensor]:
    """The request's inputs, with their data from JSON or from the binary part (in order)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("'inputs' must be a non-empty list of tensors.")
    decoded, offset = [], 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise InvalidInputError(f"inputs[{index}] must be an object.")
        name, datatype = item.get("name"), item.get("datatype")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{index}]"
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInputError(f"{where}: 'name' and 'datatype' are required strings.")
        if datatype not in v2.DATATYPES:
            raise InvalidInputError(
                f"{where}: unsupported datatype {datatype!r}; use one of {', '.join(v2.DATATYPES)}."
            )
        shape = v2.check_shape(item.get("shape"), where)
        parameters = _parameters(item, where)
        size = parameters.get("binary_data_size")
        values: np.ndarray | list[bytes]
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(f"{where}: binary_data_size {size!r} does not fit the "
                                        f"{len(binary) - offset} binary bytes left.")
            raw = binary[offset : offset + size]
            offset += size
            values = (v2.bytes_elements(raw, where) if datatype == "BYTES"
                      else v2.numeric_from_bytes(raw, datatype, shape, where))
        elif "data" in item:
            values = (v2.base64_elements(v2._flatten(item["data"]), where) if datatype == "BYTES"
                      else v2.numeric_from_json(item["data"], datatype, shape, where))
        else:
            raise InvalidInputError(f"{where}: no 'data' and no binary_data_size.")
        decoded.append(v2.InputTensor(name, datatype, shape, values, parameters))
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} binary bytes after the last input's data.")
    return decoded


@dataclass
class Requested:
    """The outputs a request names, in order; which to send as binary data; which to classify."""

    names: list[str]
    binary: dict[str, bool]
    classification: dict[str, int]


def requested_outputs(body: dict[str, Any]) -> Requested:
    everything_binary = bool(_parameters(body, "request").get("binary_data_output", False))
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidInputError("'outputs' must be a list.")
    requested = Requested([], {}, {})
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"outputs[{index}] must be an object with a 'name'.")
        name = item["name"]
        parameters = _parameters(item, f"output {name!r}")
        requested.names.append(name)
        requested.binary[name] = bool(parameters.get("binary_data", everything_binary))
        k = v2.classification_k(name, parameters.get("classification"))
        if k is not None:
            requested.classification[name] = k
    if not requested.names:
        requested.binary = {name: everything_binary for name in v2.DEFAULT_OUTPUTS}
    return requested


def infer_response(model: LoadedModel, request_id: Any, values: dict[str, np.ndarray],
                   requested: Requested) -> Response:
    """The answer in JSON, or JSON plus the binary outputs after it."""
    outputs, blobs = [], []
    for name, value in values.items():
        k = requested.classification.get(name)
        array = v2.classify(value, model.class_names, k) if k else np.asarray(value)
        datatype = "BYTES" if array.dtype == np.object_ else v2.output_datatype(name)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if datatype != "BYTES":
            array = np.ascontiguousarray(array, dtype=v2.NUMERIC[datatype])
        if requested.binary.get(name, False):
            raw = (v2.encode_bytes_elements(list(array.ravel())) if datatype == "BYTES" else array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            tensor["data"] = [element.decode() for element in array.ravel()]
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def build_v2_app(get_core: Callable[[], InferenceCore]) -> Starlette:
    def model_of(core: InferenceCore, request: Request) -> LoadedModel:
        return core.model(request.path_params["name"], request.path_params.get("version"))

    def handler(endpoint: str, answer: Callable[[InferenceCore, Request], Any]) -> Callable:
        async def handle(request: Request) -> Response:
            core = get_core()
            try:
                with metrics.observe("http", endpoint, request.path_params.get("name", "-")):
                    result = answer(core, request)
                    if asyncio.iscoroutine(result):
                        result = await result
                    return result if isinstance(result, Response) else JSONResponse(result)
            except ServingError as error:
                return error_response(error)

        return handle

    def server_ready(core: InferenceCore, request: Request) -> Response:
        if not core.store.ready:
            raise UnavailableError("The models are still loading.")
        return Response(status_code=200)

    def metadata(core: InferenceCore, request: Request) -> dict[str, Any]:
        model = model_of(core, request)
        pinned = request.path_params.get("version")
        return v2.model_metadata(model, [model.version] if pinned else core.store.versions(model.name))

    def model_ready(core: InferenceCore, request: Request) -> Response:
        model_of(core, request)  # 404 for unknown models and versions; loaded versions are ready
        return Response(status_code=200)

    def config(core: InferenceCore, request: Request) -> dict[str, Any]:
        return v2.model_config(model_of(core, request), core.limits, core.max_queue_ms or 0.0)

    async def infer(core: InferenceCore, request: Request) -> Response:
        model = model_of(core, request)
        if request.headers.get("content-encoding", "identity") not in ("identity", ""):
            raise InvalidInputError("Compressed requests (Content-Encoding) are not supported; send them plain.")
        body_bytes = await read_body(request, core.limits.max_body_bytes)
        if not body_bytes:
            raise InvalidInputError("The body is empty: send an inference request.")
        # Small requests are parsed and decoded in the event loop (cheaper than a thread hand-off
        # under load); large ones in a worker thread, so the loop keeps answering everyone else.
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is None and len(body_bytes) > PROCESS_BYTES:
            body, binary = await parse_json(body_bytes), b""  # a large JSON-only request
            if not isinstance(body, dict):
                raise InvalidInputError("The inference request must be a JSON object.")
        else:
            body, binary = await off_loop_if_large(len(body_bytes), split_body, body_bytes, header_length)
        requested = requested_outputs(body)
        wanted = v2.choose_outputs(model, requested.names)
        if set(wanted) <= set(v2.DEFAULT_OUTPUTS):
            core.admit(model)
        tensor = v2.single_input(decode_inputs(body, binary))
        images = await off_loop_if_large(len(body_bytes), v2.images_from_input, tensor, model, core.limits)
        values = await core.predict(model, images, wanted)
        return infer_response(model, body.get("id"), values, requested)

    routes = [
        Route("/", handler("v2_server_metadata", lambda core, request: v2.server_metadata()), methods=["GET"]),
        Route("/health/live", handler("v2_live", lambda core, request: Response(status_code=200)), methods=["GET"]),
        Route("/health/ready", handler("v2_ready", server_ready), methods=["GET"]),
    ]
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, handler("v2_model_metadata", metadata), methods=["GET"]),
            Route(prefix + "/ready", handler("v2_model_ready", model_ready), methods=["GET"]),
            Route(prefix + "/config", handler("v2_model_config", config), methods=["GET"]),
            Route(prefix + "/infer", handler("v2_infer", infer), methods=["POST"]),
        ]

    async def not_found(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": f"Not found: {request.method} {request.url.path}"}, status_code=404)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
