"""Locust users for the cnnkit service: HTTP (FastHttpUser), gRPC (TF Serving's Predict), and the
Open Inference Protocol over HTTP (JSON and binary tensors) and gRPC (ModelInfer).

Both send real test images (files in ``$CNNKIT_LOADTEST_IMAGES``, written by ``cnnkit loadtest``)
one per request, and check every answer (shape, probabilities, class names from the model's
metadata), so a wrong answer counts as a failure, not as a fast success.

Their parameters come from the environment of the locust process (``cnnkit loadtest`` sets them;
task weights are fixed when locust imports this file, so they cannot be locust options):
``CNNKIT_LOADTEST_MODEL`` (model name), ``CNNKIT_LOADTEST_IMAGES`` (folder), ``CNNKIT_LOADTEST_GRPC``
(``HOST:PORT`` for the gRPC user), ``CNNKIT_LOADTEST_FEATURE_MAP_WEIGHT`` (feature-map calls per
19 predictions; default 1, 0 for predictions only), ``CNNKIT_API_KEY``.

    locust -f cnnkit/loadtests/locustfile.py --host http://127.0.0.1:3000 HttpPredictUser
"""

from __future__ import annotations

# gevent must patch gRPC before any channel exists (locust runs users as greenlets).
import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
from locust import FastHttpUser, User, between, task  # noqa: E402

from cnnkit.loadtests.answers import AnswerError, LocustTimingInterceptor, check_probabilities, check_top_k  # noqa: E402
from cnnkit_client._v2 import bytes_elements, encode_bytes_elements  # noqa: E402
from cnnkit_client.protos.tfs import predict_pb2  # noqa: E402
from cnnkit_client.tensors import to_ndarray, to_tensor_proto  # noqa: E402

MODEL = os.environ.get("CNNKIT_LOADTEST_MODEL", "digits")
FEATURE_MAP_WEIGHT = int(os.environ.get("CNNKIT_LOADTEST_FEATURE_MAP_WEIGHT", "1"))
API_KEY = os.environ.get("CNNKIT_API_KEY")
PREDICT = "/tensorflow.serving.PredictionService/Predict"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_images() -> list[bytes]:
    folder = os.environ.get("CNNKIT_LOADTEST_IMAGES")
    if not folder:
        raise RuntimeError("CNNKIT_LOADTEST_IMAGES is not set: a folder of test images (cnnkit loadtest writes one).")
    files = sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RuntimeError(f"No images in {folder}.")
    return [path.read_bytes() for path in files]


_model_description: dict | None = None


def describe_model(host: str | None) -> dict:
    """The model's metadata from ``GET /models/NAME`` (once per process): class names, layers."""
    global _model_description
    if not host:
        raise RuntimeError("No service URL: run locust with --host http://HOST:PORT (the HTTP address).")
    if _model_description is None:
        headers = {"x-api-key": API_KEY} if API_KEY else {}
        response = httpx.get(f"{host.rstrip('/')}/models/{MODEL}", headers=headers, timeout=30)
        response.raise_for_status()
        _model_description = response.json()
    return _model_description


class HttpPredictUser(FastHttpUser):
    """One image per request to ``/predict_json`` (top 3), and now and then its feature maps."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.images = [base64.b64encode(data).decode("ascii") for data in load_images()]
        description = describe_model(self.host)
        self.class_names = description["class_names"]
        self.layer = description["default_layers"][0]
        self.layer_shape = next(layer["output_shape"] for layer in description["feature_layers"]
                                if layer["name"] == self.layer)
        self.headers = {"x-api-key": API_KEY} if API_KEY else {}

    @task(19)
    def predict(self) -> None:
        body = {"model": MODEL, "images": [random.choice(self.images)], "top_k": 3}
        with self.client.post("/predict_json", json=body, headers=self.headers, name="predict",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                check_top_k(response.json()["predictions"], self.class_names, 3)
            except (AnswerError, KeyError, ValueError) as error:
                response.failure(f"wrong answer: {error}")

    @task(FEATURE_MAP_WEIGHT)
    def feature_maps(self) -> None:
        body = {"model": MODEL, "image_b64": random.choice(self.images), "layers": [self.layer]}
        with self.client.post("/feature_maps_json", json=body, headers=self.headers, name="feature_maps",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                shape = response.json()["layers"][self.layer]["shape"]
            except (KeyError, ValueError) as error:
                response.failure(f"wrong answer: {error}")
                return
            if shape != self.layer_shape:
                response.failure(f"feature map of shape {shape}, expected {self.layer_shape}")


class GrpcPredictUser(User):
    """One image per TF-Serving ``Predict`` call (a string tensor of the encoded file), checked."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        target = os.environ.get("CNNKIT_LOADTEST_GRPC")
        if not target:
            raise RuntimeError("CNNKIT_LOADTEST_GRPC (HOST:PORT) is not set.")
        self.images = load_images()
        classes = len(describe_model(self.host)["class_names"])
        interceptor = LocustTimingInterceptor(self.environment, {
            PREDICT: lambda response: check_probabilities(to_ndarray(response.outputs["probabilities"]), classes),
        })
        self.channel = grpc.intercept_channel(grpc.insecure_channel(target), interceptor)
        self.predict_call = self.channel.unary_unary(
            PREDICT, request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString)
        self.metadata = (("x-api-key", API_KEY),) if API_KEY else None

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.model_spec.signature_name = "serving_default"
        request.inputs["image"].CopyFrom(to_tensor_proto([random.choice(self.images)]))
        request.output_filter.append("probabilities")
        with contextlib.suppress(grpc.RpcError):  # the interceptor has reported it
            self.predict_call(request, timeout=60, metadata=self.metadata)


# The Open Inference Protocol (v2) ------------------------------------------------------------------

V2_INFER = "/inference.GRPCInferenceService/ModelInfer"


def check_classification(elements: list[str], class_names: list[str], k: int) -> None:
    """One row of the classification extension: k ``probability:index:label`` entries, best first."""
    if len(elements) != k:
        raise AnswerError(f"{len(elements)} classes, expected {k}")
    previous = 1.0 + 1e-6
    for element in elements:
        probability, index, label = element.split(":", 2)
        if class_names[int(index)] != label or not 0.0 <= float(probability) <= previous:
            raise AnswerError(f"bad classification entry {element!r}")
        previous = float(probability)


class V2HttpJsonUser(FastHttpUser):
    """One image per v2 ``infer`` call in the protocol's JSON (a base64 BYTES input, top 3 classes)."""

    wait_time = between(0, 0)
    binary = False

    def on_start(self) -> None:
        self.images = load_images()
        self.class_names = describe_model(self.host)["class_names"]
        self.headers = {"x-api-key": API_KEY} if API_KEY else {}
        self.path = f"/v2/models/{MODEL}/infer"

    def _request(self) -> tuple[bytes, dict[str, str]]:
        image = random.choice(self.images)
        output = {"name": "probabilities", "parameters": {"classification": 3, "binary_data": self.binary}}
        if not self.binary:
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(image).decode("ascii")]}], "outputs": [output]}
            return json.dumps(body).encode(), {**self.headers, "content-type": "application/json"}
        raw = encode_bytes_elements([image])
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [output]}).encode()
        return header + raw, {**self.headers, "inference-header-content-length": str(len(header)),
                              "content-type": "application/octet-stream"}

    @task
    def infer(self) -> None:
        body, headers = self._request()
        name = "v2 infer (binary)" if self.binary else "v2 infer (JSON)"
        # geventhttpclient sends bytes as they are (locust's annotation says str or dict only).
        with self.client.post(self.path, data=body, headers=headers, name=name,  # type: ignore[arg-type]
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                content = response.content or b""
                length = int(response.headers.get("inference-header-content-length") or len(content))
                answer = json.loads(content[:length])
                output = answer["outputs"][0]
                if self.binary:
                    elements = [element.decode() for element in bytes_elements(content[length:])]
                else:
                    elements = output["data"]
                check_classification(elements, self.class_names, 3)
            except (AnswerError, KeyError, ValueError) as error:
                response.failure(f"wrong answer: {error}")


class V2HttpBinaryUser(V2HttpJsonUser):
    """The same with the binary tensor data extension both ways (what tritonclient.http sends)."""

    binary = True


class V2GrpcUser(User):
    """One image per ``inference.GRPCInferenceService/ModelInfer`` call (raw BYTES in and out)."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        from cnnkit_client.protos.v2 import grpc_service_pb2

        target = os.environ.get("CNNKIT_LOADTEST_GRPC")
        if not target:
            raise RuntimeError("CNNKIT_LOADTEST_GRPC (HOST:PORT) is not set.")
        self.images = load_images()
        class_names = describe_model(self.host)["class_names"]

        def check(response) -> None:
            elements = [element.decode() for element in bytes_elements(response.raw_output_contents[0])]
            check_classification(elements, class_names, 3)

        interceptor = LocustTimingInterceptor(self.environment, {V2_INFER: check})
        self.channel = grpc.intercept_channel(grpc.insecure_channel(target), interceptor)
        self.infer_call = self.channel.unary_unary(
            V2_INFER, request_serializer=grpc_service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=grpc_service_pb2.ModelInferResponse.FromString)
        self.request_type = grpc_service_pb2.ModelInferRequest
        self.metadata = (("x-api-key", API_KEY),) if API_KEY else None

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def infer(self) -> None:
        request = self.request_type(model_name=MODEL)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes_elements([random.choice(self.images)]))
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
        with contextlib.suppress(grpc.RpcError):  # the interceptor has reported it
            self.infer_call(request, timeout=60, metadata=self.metadata)
