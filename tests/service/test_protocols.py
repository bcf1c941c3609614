"""The same cases over both protocols, against the shared real service: what a request answers over
HTTP and over gRPC, and that every route counts itself in /metrics by model and version."""

from __future__ import annotations

import io
import json
import re

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from cnnkit_client.protos.tfs import predict_pb2, prediction_service_pb2_grpc
from cnnkit_client.tensors import to_tensor_proto

pytestmark = pytest.mark.data

BLANK = np.zeros((1, 28, 28, 1), np.float32)


def http_predict(service, images: np.ndarray, **fields) -> tuple[int, str]:
    answer = httpx.post(f"{service.url}/predict_json", json={"model": "digits", "instances": images.tolist(),
                                                            **fields}, timeout=60)
    return answer.status_code, answer.json().get("error", "")


def grpc_predict(service, images: np.ndarray, model: str = "digits", version: int | None = None) -> tuple[str, str]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["image"].CopyFrom(to_tensor_proto(images))
    with grpc.insecure_channel(service.grpc_target) as channel:
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return "OK", ""


def http_extension(service, route: str, body: dict) -> tuple[int, str]:
    answer = httpx.post(f"{service.url}{route}", json=body, timeout=60)
    return answer.status_code, answer.json().get("error", "") if answer.status_code != 200 else ""


def grpc_extension(service, method: str, body: dict) -> tuple[str, str]:
    with grpc.insecure_channel(service.grpc_target) as channel:
        call = channel.unary_unary(f"/cnnkit.v1.Extensions/{method}")
        try:
            call(json.dumps(body).encode(), timeout=60)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return "OK", ""


PREDICT_CASES = [
    ("unknown model", {"model": "nope"}, {"model": "nope"}, 404, "NOT_FOUND", "Latest(nope)"),
    ("unknown version", {"version": 9}, {"version": 9}, 404, "NOT_FOUND", "Specific(digits, 9)"),
    ("pixels out of range", {"images": BLANK + 300}, {"images": BLANK + 300}, 400, "INVALID_ARGUMENT", "0..255"),
    ("too many images", {"images": np.zeros((65, 28, 28, 1), np.float32)},
     {"images": np.zeros((65, 28, 28, 1), np.float32)}, 413, "INVALID_ARGUMENT", "the limit is 64"),
    ("wrong shape", {"images": np.zeros((1, 28, 28, 3), np.float32)},
     {"images": np.zeros((1, 28, 28, 3), np.float32)}, 400, "INVALID_ARGUMENT", "(28, 28, 1)"),
    ("a good request", {}, {}, 200, "OK", ""),
]


@pytest.mark.parametrize(("case", "http_change", "grpc_change", "status", "code", "message"), PREDICT_CASES,
                         ids=[case[0] for case in PREDICT_CASES])
def test_predict_answers_the_same_over_both_protocols(service, case, http_change, grpc_change, status, code, message):
    http_arguments = dict(http_change)
    images = http_arguments.pop("images", BLANK)
    http_status, http_message = http_predict(service, images, **http_arguments)
    grpc_arguments = dict(grpc_change)
    grpc_code, grpc_message = grpc_predict(service, grpc_arguments.pop("images", BLANK), **grpc_arguments)
    assert (http_status, grpc_code) == (status, code)
    assert message in http_message and message in grpc_message


EXTENSION_CASES = [
    ("/filter_patterns", "FilterPatterns", {"model": "digits", "filters": "all"},
     "'filters' must be a count or a list of filter indices"),
    ("/filter_patterns", "FilterPatterns", {"model": "digits", "seed": -1}, "'seed' Input should be greater"),
    ("/filter_patterns", "FilterPatterns", {"model": "digits", "layer": "pool1"}, "no convolution layer 'pool1'"),
    ("/gradcam_json", "GradCam", {"model": "digits", "image_b64": "###"}, "Malformed base64"),
    ("/gradcam_json", "GradCam", {"model": "digits", "image_b64": "AAAA", "class_name": "3", "class_index": 3},
     "at most one of 'class_name' and 'class_index'"),
    ("/feature_maps_json", "FeatureMapPngs", {"model": "digits"}, "'image_b64' is required"),
]


@pytest.mark.parametrize(("route", "method", "body", "message"), EXTENSION_CASES)
def test_json_extensions_refuse_the_same_bodies_with_the_same_messages(service, route, method, body, message):
    http_status, http_message = http_extension(service, route, body)
    grpc_code, grpc_message = grpc_extension(service, method, body)
    assert http_status in (400, 404) and grpc_code in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert message in http_message and message in grpc_message


def requests_counted(text: str, endpoint: str, protocol: str) -> float:
    pattern = re.compile(r'^cnnkit_requests_total\{endpoint="' + endpoint + r'",model="digits",protocol="'
                         + protocol + r'",version="1"\} (\S+)$', re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def test_every_route_counts_its_requests_by_model_and_version(service):
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    before = httpx.get(f"{service.url}/metrics", timeout=30).text
    answer = httpx.post(f"{service.url}/predict", files={"image": ("digit.png", png.getvalue(), "image/png")},
                        data={"model": "digits"}, timeout=60)
    assert answer.status_code == 200
    assert grpc_predict(service, BLANK)[0] == "OK"
    assert httpx.get(f"{service.url}/models/digits", timeout=30).status_code == 200
    after = httpx.get(f"{service.url}/metrics", timeout=30).text
    for endpoint, protocol in (("predict", "http"), ("Predict", "grpc"), ("describe", "http")):
        assert requests_counted(after, endpoint, protocol) == requests_counted(before, endpoint, protocol) + 1, (
            endpoint, protocol)
    # A refused request is counted as an error with its status.
    http_predict(service, BLANK, model="digits", version=9)
    errors = httpx.get(f"{service.url}/metrics", timeout=30).text
    assert re.search(r'^cnnkit_request_errors_total\{code="404",endpoint="predict_json",model="digits",'
                     r'protocol="http",version="-"\} [1-9]', errors, re.MULTILINE)


def test_grpc_calls_echo_their_request_id(service):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(to_tensor_proto(BLANK))
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        _, call = stub.Predict.with_call(request, metadata=[("x-request-id", "trace-7")], timeout=60)
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-7"
        request.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=60)
        made = dict(refused.value.trailing_metadata())["x-request-id"]
        assert len(made) == 32  # a refusal carries one too
