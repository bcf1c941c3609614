"""HTTP routes that need path parameters or GET: TF-Serving's REST API and the model list.

Two small Starlette apps that the BentoML service mounts (``/v1`` and ``/models``). They take a
``get_core`` callable, so tests can run them in-process without BentoML.

TF-Serving REST compatibility (https://www.tensorflow.org/tfx/serving/api_rest):

* ``POST /v1/models/{name}[/versions/{v}]:predict`` with ``instances`` (row format) or ``inputs``
  (columnar), values as numbers or ``{"b64": ...}`` encoded images, and ``signature_name``;
  answers ``{"predictions": ...}`` or ``{"outputs": ...}``;
* ``GET /v1/models/{name}[/versions/{v}]`` (status) and ``.../metadata``;
* errors as ``{"error": message}`` with TF Serving's HTTP codes (400 invalid, 404 not found).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cnnkit.errors import InvalidInputError, NotFoundError, ServingError
from cnnkit.repository import TensorSpec
from cnnkit.serving import metrics
from cnnkit.serving.core import InferenceCore
from cnnkit.serving.http.bodies import parse_json, read_body
from cnnkit.serving.http.errors import error_response
from cnnkit.serving.inputs import check_batch, check_count, decode_base64, decode_image
from cnnkit.serving.model_store import LoadedModel
from cnnkit.serving.offload import off_loop_if_large

MODEL_PATH = re.compile(r"^/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<rest>.*)$")


def _instance_to_image(value: Any, model: LoadedModel, core: InferenceCore, *, named: bool = False) -> np.ndarray:
    """One instance: a pixel array, ``{"b64": ...}``, or either of those named ``{"image": ...}`` (once)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return decode_image(decode_base64(value["b64"]), model.input_shape, core.limits).astype(np.float32)
        if set(value) == {"image"} and not named:
            return _instance_to_image(value["image"], model, core, named=True)
        keys = sorted(str(key)[:40] for key in value)[:8]
        raise InvalidInputError(f"Unknown instance keys {keys}; an instance is a pixel array, {{\"b64\": ...}} "
                                f"or {{\"image\": one of those}}.")
    if isinstance(value, list):
        try:
            array = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError) as error:
            raise InvalidInputError(f"An instance is ragged or holds non-numbers: {error}") from error
        return check_batch(array, model.input_shape, core.limits)[0]
    raise InvalidInputError(f"An instance must be a pixel array or {{\"b64\": ...}}, got {type(value).__name__}.")


def tf_request_images(body: Any, model: LoadedModel, core: InferenceCore) -> tuple[np.ndarray, bool]:
    """The images of a TF-Serving REST predict body, and whether it used the row format."""
    if not isinstance(body, dict):
        raise InvalidInputError("The body must be a JSON object with 'instances' or 'inputs'.")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInputError("Exactly one of 'instances' (row format) or 'inputs' (columnar) is required.")
    row_format = "instances" in body
    values = body["instances"] if row_format else body["inputs"]
    if isinstance(values, dict):  # named inputs: {"image": ...}
        if set(values) != {"image"}:
            raise InvalidInputError(f"Unknown input(s) {sorted(values)}; the model's input is 'image'.")
        values = values["image"]
    if isinstance(values, dict) and set(values) == {"b64"}:
        values = [values]
    if isinstance(values, np.ndarray):  # a long list of numbers, parsed into an array already
        return check_batch(values, model.input_shape, core.limits), row_format
    if not isinstance(values, list):
        raise InvalidInputError("The images must be a list.")
    check_count(len(values), core.limits)
    if all(isinstance(value, dict) for value in values):
        images = np.stack([_instance_to_image(value, model, core) for value in values])
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (ValueError, TypeError) as error:
            raise InvalidInputError(f"The tensor is ragged or holds non-numbers: {error}") from error
        images = check_batch(array, model.input_shape, core.limits)
    return images, row_format


def build_tf_serving_app(get_core: Callable[[], InferenceCore]) -> Starlette:
    async def dispatch(request: Request) -> Response:
        core = get_core()
        match = MODEL_PATH.match("/" + request.path_params["path"])
        name = match["name"] if match else "-"
        endpoint = "rest"
        try:
            if not match:
                raise NotFoundError(f"Malformed request: {request.method} {request.url.path}")
            rest = match["rest"]
            endpoint = {":predict": "rest_predict", "/metadata": "rest_metadata", "": "rest_status"}.get(rest, "rest")
            with metrics.observe("http", endpoint, name):
                model = core.model(match["name"], match["version"])
                if rest == ":predict" and request.method == "POST":
                    return await _predict(request, core, model)
                if rest == "/metadata" and request.method == "GET":
                    return JSONResponse(_metadata(core, model))
                if rest == "" and request.method == "GET":
                    versions = [model.version] if match["version"] else core.store.versions(model.name)
                    return JSONResponse({"model_version_status": [
                        {"version": str(version), "state": "AVAILABLE",
                         "status": {"error_code": "OK", "error_message": ""}} for version in versions]})
                raise NotFoundError(f"Malformed request: {request.method} {request.url.path}")
        except ServingError as error:
            return error_response(error)

    return Starlette(routes=[Route("/{path:path}", dispatch, methods=["GET", "POST"])])


async def _predict(request: Request, core: InferenceCore, model: LoadedModel) -> Response:
    core.admit(model)
    raw = await read_body(request, core.limits.max_body_bytes)
    # Small bodies are parsed and converted in the event loop, large ones in a worker thread.
    body = await parse_json(raw)
    signature = body.get("signature_name", "serving_default") if isinstance(body, dict) else ""
    if not isinstance(signature, str):
        raise InvalidInputError("'signature_name' must be a string.")
    outputs = model.signature_outputs(signature)
    images, row_format = await off_loop_if_large(len(raw), tf_request_images, body, model, core)
    values = await core.predict(model, images, outputs)
    if row_format:
        rows = [{name: value[index].tolist() for name, value in values.items()} for index in range(len(images))]
        return JSONResponse({"predictions": rows})
    return JSONResponse({"outputs": {name: value.tolist() for name, value in values.items()}})


_TF_DTYPES = {"float32": "DT_FLOAT", "int64": "DT_INT64"}


def _tensor_info(name: str, spec: TensorSpec) -> dict[str, Any]:
    """A TensorInfo in TF Serving's REST JSON."""
    return {"dtype": _TF_DTYPES[spec.dtype], "name": f"{name}:0", "tensor_shape": {
        "dim": [{"size": str(-1 if size is None else size), "name": ""} for size in spec.shape],
        "unknown_rank": False}}


def _metadata(core: InferenceCore, model: LoadedModel) -> dict[str, Any]:
    signature_def = {
        name: {"inputs": {key: _tensor_info(key, spec) for key, spec in signature.inputs.items()},
               "outputs": {key: _tensor_info(key, spec) for key, spec in signature.outputs.items()},
               "method_name": "tensorflow/serving/predict"}
        for name, signature in model.signatures().items()
    }
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
        "metadata": {"signature_def": {"signature_def": signature_def}},
        "cnnkit": core.describe(model),
    }


def build_models_app(get_core: Callable[[], InferenceCore]) -> Starlette:
    """``GET /models``, ``GET /models/{name}[?version=]`` and ``GET /models/{name}/layers``."""

    async def list_all(request: Request) -> Response:
        with metrics.observe("http", "models"):
            return JSONResponse({"models": get_core().describe_all()})

    async def describe(request: Request) -> Response:
        core = get_core()
        try:
            with metrics.observe("http", "describe", request.path_params["name"]):
                model = core.model(request.path_params["name"], request.query_params.get("version"))
                return JSONResponse(core.describe(model))
        except ServingError as error:
            return error_response(error)

    async def layers(request: Request) -> Response:
        core = get_core()
        try:
            with metrics.observe("http", "layers", request.path_params["name"]):
                model = core.model(request.path_params["name"], request.query_params.get("version"))
                return JSONResponse({"model": model.name, "version": model.version, "layers": model.feature_layers,
                                     "default": model.conv_layer_names})
        except ServingError as error:
            return error_response(error)

    return Starlette(routes=[
        Route("/", list_all, methods=["GET"]),
        Route("/{name}", describe, methods=["GET"]),
        Route("/{name}/layers", layers, methods=["GET"]),
    ])
