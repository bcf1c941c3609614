"""Locust users for the cnnkit service: HTTP (FastHttpUser) and gRPC (TF Serving's Predict).

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
import os  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
from locust import FastHttpUser, User, between, task  # noqa: E402

from cnnkit.loadtests.answers import AnswerError, LocustTimingInterceptor, check_probabilities, check_top_k  # noqa: E402
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
