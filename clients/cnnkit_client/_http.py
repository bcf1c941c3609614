"""HTTP clients: ``Client`` (sync) and ``AsyncClient`` (asyncio), with the same methods.

Each method is written once as a plan (:mod:`cnnkit_client._plan`): the HTTP calls it needs and a
function that turns their JSON answers into the typed result. The two classes only differ in how
they make one attempt at a call.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

import cnnkit_client._v2 as _v2
from cnnkit_client._methods import AsyncMethods, SyncMethods
from cnnkit_client._plan import Plan
from cnnkit_client.errors import (
    CnnkitError,
    ConnectError,
    RequestTimeoutError,
    ServerError,
    from_http_status,
)
from cnnkit_client.images import ImageLike, chunks, encode_image, encode_images
from cnnkit_client.retry import Retry
from cnnkit_client.types import (
    FeatureMaps,
    FilterPatterns,
    GradCam,
    Health,
    ModelInfo,
    Prediction,
    decode_array,
    filter_patterns_body,
    gradcam_body,
    predictions_from_rows,
)

DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_TIMEOUT = 30.0
API_KEY_HEADER = "x-api-key"

@dataclass
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    accept: tuple[int, ...] = (200,)  # statuses returned instead of raised
    parse_json: bool = True


@dataclass
class _Answer:
    status: int
    data: Any


def _model_path(model: str) -> str:
    return quote(model, safe="")


def _error_message(response: httpx.Response) -> str:
    """The server's message: ``{"error": ...}``, BentoML's ``[{"error": ...}]``, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):
                return str(body[key])
    return response.text.strip() or response.reason_phrase


def _to_answer(response: httpx.Response, call: _Call) -> _Answer:
    if response.status_code in call.accept:
        if not call.parse_json:
            return _Answer(response.status_code, response.text)
        try:
            data = response.json() if response.content else None
        except ValueError as error:
            raise ServerError(f"The server answered {call.path} with something that is not JSON.",
                              status=response.status_code) from error
        return _Answer(response.status_code, data)
    raise from_http_status(response.status_code, _error_message(response), response.headers.get("retry-after"))


def _transport_error(error: httpx.HTTPError, url: str) -> CnnkitError:
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return RequestTimeoutError(f"No answer from {url} in time: {error.__class__.__name__}.")
    return ConnectError(f"Cannot reach {url}: {error or error.__class__.__name__}.")


class _Api:
    """Request building and answer parsing shared by ``Client`` and ``AsyncClient``."""

    def __init__(self, url: str | Sequence[str], *, api_key: str | None, timeout: float | None, retry: Retry,
                 max_images_per_request: int, protocol: str = "cnnkit"):
        if max_images_per_request < 1:
            raise ValueError("max_images_per_request must be at least 1.")
        self.protocol = _v2.check_protocol(protocol)
        # Several addresses of one service (replicas): calls go to one; a connection error moves
        # the retries to the next.
        self.urls = [item.rstrip("/") for item in ([url] if isinstance(url, str) else list(url))]
        if not self.urls:
            raise ValueError("Give at least one service URL.")
        self.url = self.urls[0]
        self.retry = retry
        self.max_images_per_request = max_images_per_request
        self._headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._timeout = timeout
        self.default_timeout = timeout

    def _predict_plan(self, images: ImageLike | Sequence[ImageLike], model: str, version: int | None,
                      top_k: int) -> Plan[Prediction | list[Prediction]]:
        encoded, single = encode_images(images)
        if self.protocol == "v2":
            return self._v2_predict_plan(encoded, single, model, version, top_k)
        calls = [_Call("POST", "/predict_json", json={
            "model": model, "version": version, "top_k": top_k,
            "images": [base64.b64encode(data).decode("ascii") for data in chunk]})
            for chunk in chunks(encoded, self.max_images_per_request)]

        def finish(answers: list[_Answer]) -> Prediction | list[Prediction]:
            predictions = [prediction for answer in answers for prediction in predictions_from_rows(
                answer.data["model"], answer.data["version"], answer.data["predictions"])]
            return predictions[0] if single else predictions

        return Plan(calls, finish)

    def _v2_predict_plan(self, encoded: list[bytes], single: bool, model: str, version: int | None,
                         top_k: int) -> Plan[Prediction | list[Prediction]]:
        """The Open Inference Protocol: BYTES images in, the classification extension's top k out."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        calls = [_Call("POST", _v2.model_path(model, version) + "/infer", json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(chunk)],
                        "data": [base64.b64encode(data).decode("ascii") for data in chunk]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": top_k}}]})
            for chunk in chunks(encoded, self.max_images_per_request)]

        def finish(answers: list[_Answer]) -> Prediction | list[Prediction]:
            predictions = []
            for answer in answers:
                output = answer.data["outputs"][0]
                predictions += _v2.predictions(answer.data["model_name"], answer.data["model_version"],
                                               _v2.rows_of(output["data"], output["shape"]))
            return predictions[0] if single else predictions

        return Plan(calls, finish)

    def _v2_feature_maps_plan(self, data: bytes, model: str, layers: Sequence[str] | None,
                              version: int | None) -> Plan[FeatureMaps]:
        def infer(info: ModelInfo) -> Plan[FeatureMaps]:
            names = list(layers) if layers is not None else list(info.default_layers)
            call = _Call("POST", _v2.model_path(info.name, info.version) + "/infer", json={
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(data).decode("ascii")]}],
                "outputs": [{"name": name} for name in names]})

            def arrays(answers: list[_Answer]) -> FeatureMaps:
                answer = answers[0].data
                maps = {output["name"]: np.asarray(output["data"], np.float32).reshape(output["shape"])[0]
                        for output in answer["outputs"]}
                return FeatureMaps(answer["model_name"], int(answer["model_version"]), maps)

            return Plan([call], arrays)

        return Plan([self._metadata_plan(model, version).calls[0]],
                    lambda answers: infer(ModelInfo.from_dict(answers[0].data)))

    def _feature_maps_plan(self, image: ImageLike, model: str, layers: Sequence[str] | None, version: int | None,
                           as_png: bool) -> Plan[FeatureMaps]:
        if self.protocol == "v2" and not as_png:  # the protocol has no pictures: PNG grids are cnnkit's
            return self._v2_feature_maps_plan(encode_image(image), model, layers, version)
        call = _Call("POST", "/feature_maps_json", json={
            "image_b64": base64.b64encode(encode_image(image)).decode("ascii"), "model": model,
            "layers": list(layers) if layers is not None else None, "version": version,
            "output": "png" if as_png else "array", "dtype": "float32"})

        def finish(answers: list[_Answer]) -> FeatureMaps:
            data = answers[0].data
            if as_png:
                maps: dict[str, Any] = {name: base64.b64decode(png) for name, png in data["png"].items()}
            else:
                maps = {name: decode_array(encoded) for name, encoded in data["layers"].items()}
            return FeatureMaps(data["model"], int(data["version"]), maps)

        return Plan([call], finish)

    def _gradcam_plan(self, image: ImageLike, model: str, target: int | str | None,
                      version: int | None) -> Plan[GradCam]:
        body = gradcam_body(encode_image(image), model, version, target)
        return Plan([_Call("POST", "/gradcam_json", json=body)], lambda answers: GradCam.from_dict(answers[0].data))

    def _filter_patterns_plan(self, model: str, layer: str | None, filters: int | Sequence[int] | None,
                              steps: int, seed: int, version: int | None, arrays: bool) -> Plan[FilterPatterns]:
        body = filter_patterns_body(model, version, layer, filters, steps, seed, arrays)
        return Plan([_Call("POST", "/filter_patterns", json=body)],
                    lambda answers: FilterPatterns.from_dict(answers[0].data))

    def _models_plan(self) -> Plan[list[ModelInfo]]:
        return Plan([_Call("GET", "/models/")],
                     lambda answers: [ModelInfo.from_dict(item) for item in answers[0].data["models"]])

    def _metadata_plan(self, model: str, version: int | None) -> Plan[ModelInfo]:
        params = {"version": version} if version is not None else None
        return Plan([_Call("GET", f"/models/{_model_path(model)}", params=params)],
                     lambda answers: ModelInfo.from_dict(answers[0].data))

    def _health_plan(self) -> Plan[Health]:
        paths = ("/v2/health/live", "/v2/health/ready") if self.protocol == "v2" else ("/livez", "/readyz")
        calls = [_Call("GET", path, accept=(200, 400, 503), parse_json=False) for path in paths]

        def finish(answers: list[_Answer]) -> Health:
            live, ready = (answer.status == 200 for answer in answers)
            detail = "" if ready else "the service is starting or has no models loaded"
            return Health(live=live, ready=ready, detail=detail)

        return Plan(calls, finish)

    def _failed(self, error: httpx.HTTPError, base: str, call: _Call) -> CnnkitError:
        """The SDK's error for a transport failure; a connection error moves later calls (and this
        call's retries) to the next address."""
        failure = _transport_error(error, base + call.path)
        if isinstance(failure, ConnectError) and len(self.urls) > 1 and self.url == base:
            self.url = self.urls[(self.urls.index(base) + 1) % len(self.urls)]
        return failure

    def _request_kwargs(self, call: _Call, timeout: float | None) -> dict[str, Any]:
        params = {key: value for key, value in (call.params or {}).items() if value is not None}
        kwargs: dict[str, Any] = {"params": params or None}
        if call.json is not None:
            kwargs["json"] = {key: value for key, value in call.json.items() if value is not None}
        if timeout is not None:
            kwargs["timeout"] = timeout
        return kwargs


class Client(_Api, SyncMethods):
    """A synchronous client of the cnnkit HTTP API.

    >>> with Client("http://127.0.0.1:3000") as client:          # doctest: +SKIP
    ...     client.predict("seven.png", model="digits").label
    '7'

    ``transport`` is handed to ``httpx.Client`` (e.g. ``httpx.MockTransport`` in tests).
    ``protocol="v2"`` sends predictions, feature maps and health checks through the Open Inference
    Protocol (``/v2/...``, as KServe and Triton define it) instead of cnnkit's routes. ``url`` may
    list several replicas of the service: calls go to one, and a connection error moves the
    retries (and later calls) to the next.
    """

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None, max_images_per_request: int = 32,
                 transport: httpx.BaseTransport | None = None, protocol: str = "cnnkit"):
        super().__init__(url, api_key=api_key, timeout=timeout, retry=retry or Retry(),
                         max_images_per_request=max_images_per_request, protocol=protocol)
        self._http = httpx.Client(headers=self._headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _attempt(self, call: _Call, timeout: float | None) -> _Answer:
        base = self.url
        try:
            response = self._http.request(call.method, base + call.path, **self._request_kwargs(call, timeout))
        except httpx.HTTPError as error:
            raise self._failed(error, base, call) from error
        return _to_answer(response, call)


class AsyncClient(_Api, AsyncMethods):
    """The asyncio twin of :class:`Client`: the same methods, awaited. Batches split into several
    requests are sent concurrently."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None, max_images_per_request: int = 32,
                 transport: httpx.AsyncBaseTransport | None = None, protocol: str = "cnnkit"):
        super().__init__(url, api_key=api_key, timeout=timeout, retry=retry or Retry(),
                         max_images_per_request=max_images_per_request, protocol=protocol)
        self._http = httpx.AsyncClient(headers=self._headers, timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _attempt(self, call: _Call, timeout: float | None) -> _Answer:
        base = self.url
        try:
            response = await self._http.request(call.method, base + call.path, **self._request_kwargs(call, timeout))
        except httpx.HTTPError as error:
            raise self._failed(error, base, call) from error
        return _to_answer(response, call)


