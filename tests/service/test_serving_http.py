"""The real service on 127.0.0.1 (started with `cnnkit serve`): HTTP, TF-Serving REST and gRPC."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from services import RunningService, free_port

from cnnkit_client.types import decode_array

pytestmark = pytest.mark.data

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as opened:
        yield opened


@pytest.fixture(scope="module")
def digits(data_root):
    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=8)
    pngs = []
    for image in dataset.x_test:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return dataset.x_test, dataset.y_test, pngs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_three_ways_to_predict_agree(client, digits):
    images, labels, pngs = digits
    upload = client.post("/predict", files={"image": ("digit.png", pngs[0], "image/png")},
                         data={"model": "digits", "top_k": "3"})
    assert upload.status_code == 200, upload.text
    # No OpenTelemetry spans by default (CNNKIT_TRACE_REQUESTS): BentoML's request id comes from one.
    assert "x-bentoml-request-id" not in upload.headers
    as_b64 = client.post("/predict_json", json={"model": "digits", "images": [b64(pngs[0])], "top_k": 3})
    as_tensor = client.post("/predict_json", json={"model": "digits", "instances": images[:1].tolist(),
                                                   "top_k": 3})
    results = [response.json() for response in (upload, as_b64, as_tensor)]
    assert all(result["model"] == "digits" and result["version"] == 1 for result in results)
    top = [[entry["class"] for entry in result["predictions"][0]] for result in results]
    assert top[0] == top[1] == top[2] and len(top[0]) == 3
    probabilities = [entry["probability"] for entry in results[0]["predictions"][0]]
    assert probabilities == sorted(probabilities, reverse=True)
    batch = client.post("/predict_json", json={"model": "digits", "images": [b64(png) for png in pngs]}).json()
    predicted = [int(row[0]["class"]) for row in batch["predictions"]]
    assert np.mean(np.array(predicted) == labels) >= 0.5


def test_tf_serving_rest_routes(client, digits):
    images, _, pngs = digits
    rows = client.post("/v1/models/digits:predict", json={"instances": images[:2].tolist()})
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    assert len(predictions) == 2 and len(predictions[0]["probabilities"]) == 10
    encoded = client.post("/v1/models/digits/versions/1:predict",
                          json={"signature_name": "serving_default", "instances": [{"b64": b64(pngs[0])}]})
    assert encoded.json()["predictions"][0]["top_class"] == predictions[0]["top_class"]
    columnar = client.post("/v1/models/digits:predict", json={"inputs": {"image": images[:2].tolist()}})
    assert np.asarray(columnar.json()["outputs"]["probabilities"]).shape == (2, 10)
    maps = client.post("/v1/models/digits:predict", json={"signature_name": "feature_maps",
                                                          "instances": images[:1].tolist()})
    assert np.asarray(maps.json()["predictions"][0]["conv1"]).shape == (28, 28, 6)
    status = client.get("/v1/models/digits").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = client.get("/v1/models/digits/metadata").json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert [dim["size"] for dim in signature["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]


def test_feature_maps_as_arrays_and_png_grids(client, digits):
    _, _, pngs = digits
    arrays = client.post("/feature_maps_json", json={"model": "digits", "image_b64": b64(pngs[0])})
    assert arrays.status_code == 200, arrays.text
    layers = arrays.json()["layers"]
    assert set(layers) == {"conv1", "conv2", "conv3"}  # every convolution by default
    assert decode_array(layers["conv2"]).shape == (10, 10, 16) and layers["conv2"]["dtype"] == "float16"
    grid = client.post("/feature_maps", files={"image": ("digit.png", pngs[0], "image/png")},
                       data={"model": "digits", "layers": json.dumps(["pool1"]), "output": "png"}).json()
    picture = Image.open(io.BytesIO(base64.b64decode(grid["png"]["pool1"])))
    assert picture.format == "PNG" and picture.size[0] > picture.size[1]
    listing = client.get("/models/digits/layers").json()
    assert [layer["name"] for layer in listing["layers"]] == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    assert client.get("/models/").json()["models"][0]["class_names"][7] == "7"


def test_health_metrics_and_docs(client):
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    client.post("/predict_json", json={"model": "digits", "instances": np.zeros((1, 28, 28, 1)).tolist()})
    text = client.get("/metrics").text
    # (the label set of the request just made, whichever tests ran before this one)
    assert 'cnnkit_requests_total{endpoint="predict_json",model="digits",protocol="http",version="1"}' in text
    assert "cnnkit_inference_batch_size_bucket" in text
    # The serving event loop's lag is measured while it runs (a sample every 100 ms).
    lag_count = re.search(r'^cnnkit_event_loop_lag_seconds_count\{loop="http"\} (\S+)$', text, re.MULTILINE)
    assert lag_count and float(lag_count.group(1)) > 0
    assert "/predict_json" in client.get("/docs.json").text
    assert "swagger" in client.get("/").text.lower()


BOMB = None


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000), 0).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(buffer, format="JPEG")
    return buffer.getvalue()[:400]


@pytest.mark.parametrize(
    ("request_arguments", "status", "message"),
    [
        ({"url": "/predict_json", "json": {"model": "digits", "images": ["@@@"]}}, 400, "Malformed base64"),
        ({"url": "/predict_json", "json": {"model": "digits", "images": [b64(b"hello")]}}, 400, "not an image"),
        ({"url": "/predict_json", "json": {"model": "digits", "images": [b64(_truncated_jpeg())]}}, 400,
         "truncated or corrupt"),
        ({"url": "/predict_json", "json": {"model": "digits", "images": [b64(_bomb())]}}, 413, "pixels; the limit"),
        ({"url": "/predict_json", "json": {"model": "digits", "instances": [[[1.0]]]}}, 400, "must have shape"),
        ({"url": "/predict_json", "json": {"model": "digits", "instances": np.full((1, 28, 28, 1), 1e9).tolist()}},
         400, "raw 0..255"),
        ({"url": "/predict_json", "json": {"model": "digits", "instances": np.zeros((65, 28, 28, 1)).tolist()}},
         413, "limit is 64"),
        ({"url": "/predict_json", "json": {"model": "nope", "images": []}}, 404, "Latest(nope)"),
        ({"url": "/predict_json", "json": {"model": "digits", "version": 7, "images": ["x"]}}, 404,
         "Specific(digits, 7)"),
        ({"url": "/predict_json", "json": {"model": "digits"}}, 400, "exactly one of"),
        ({"url": "/feature_maps_json", "json": {"model": "digits", "image_b64": b64(b"x"), "layers": ["fc9"]}}, 400,
         "not an image"),
        ({"url": "/v1/models/digits:predict", "content": b"{oops"}, 400, "Malformed JSON"),
        ({"url": "/v1/models/digits:predict", "content": b""}, 400, "empty"),
        ({"url": "/v1/models/digits:predict", "json": {"instances": [[float("nan")]]}}, 400, ""),
        ({"url": "/v1/models/digits:predict", "json": {"signature_name": "explain", "instances": [[0]]}}, 400,
         'Serving signature name: "explain"'),
        ({"url": "/v1/models/digits/versions/3:predict", "json": {"instances": [[0]]}}, 404, "Specific(digits, 3)"),
        ({"url": "/v1/models/digits:predict", "json": {"instances": [{"b64": "%%%"}]}}, 400, "Malformed base64"),
        # Multipart mistakes: a wrong field name, no model, a field of the wrong kind: one line naming it.
        ({"url": "/predict", "files": {"file": ("a.png", b"x", "image/png")}, "data": {"model": "digits"}}, 400,
         "'image' is required: upload the image file as the multipart field 'image'."),
        ({"url": "/predict", "files": {"image": ("a.png", b"x", "image/png")}}, 400, "'model' is required."),
        ({"url": "/predict", "files": {"image": ("a.png", b"x", "image/png")}, "data": {"model": "digits",
                                                                                      "top_k": "many"}}, 400,
         "'top_k' Input should be a valid integer"),
        ({"url": "/gradcam", "files": {"image": ("a.png", b"x", "image/png")}, "data": {"model": "digits",
                                                                                      "class_index": "x"}}, 400,
         "'class_index' Input should be a valid integer"),
        ({"url": "/filter_patterns", "json": {"model": "digits", "filters": "all"}}, 400,
         "'filters' must be a count or a list of filter indices."),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(client, digits, request_arguments,
                                                                   status, message):
    arguments = dict(request_arguments)
    url = arguments.pop("url")
    if "json" in arguments and isinstance(arguments["json"], dict) and "nan" in str(arguments["json"]):
        arguments = {"content": b'{"instances": [NaN]}', "headers": {"content-type": "application/json"}}
    response = client.post(url, **arguments)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and "\n" not in response.json()["error"]
    assert client.post("/predict_json", json={"model": "digits", "images": [b64(digits[2][0])]}).status_code == 200


def test_unknown_feature_layer_and_wrong_content_type(client, digits):
    response = client.post("/feature_maps_json", json={"model": "digits", "image_b64": b64(digits[2][0]),
                                                  "layers": ["fc9"]})
    assert response.status_code == 404 and "no feature layer 'fc9'" in response.json()["error"]
    wrong = client.post("/predict_json", content=b"model=digits", headers={"content-type": "text/plain"})
    assert 400 <= wrong.status_code < 500


def test_oversized_body_is_refused(client):
    response = client.post("/v1/models/digits:predict", content=b"[" + b"0," * 11_000_000 + b"0]",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_grpc_on_the_same_service(service, digits):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(digits[0][:2]))
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 10)


@pytest.fixture
def own_service(digits_repository, tmp_path):
    """A service of its own over a repository of its own: the test adds a version to it."""
    repository = tmp_path / "model_repository"
    shutil.copytree(digits_repository, repository)
    running = RunningService(repository)
    yield running
    running.stop()


def test_new_version_is_picked_up_without_failed_requests(own_service, digits):
    service, repository = own_service, own_service.repository
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def hammer():
        with httpx.Client(base_url=service.url, timeout=60) as own:
            while not stop.is_set():
                response = own.post("/predict_json", json={"model": "digits", "images": [b64(digits[2][1])]})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.add(response.json()["version"])

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        staging = repository / ".staging-2"
        shutil.copytree(repository / "digits" / "1", staging)
        os.rename(staging, repository / "digits" / "2")
        deadline = time.monotonic() + 60
        while 2 not in versions and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert versions == {1, 2}
    pinned = httpx.post(f"{service.url}/predict_json",
                        json={"model": "digits", "version": 1, "images": [b64(digits[2][1])]}).json()
    assert pinned["version"] == 1


def test_api_key_cors_request_ids_and_json_logs(repository, digits):
    """One service with an API key, CORS for one origin, JSON log lines and request tracing (settings
    from the environment)."""
    origin = "https://app.example"
    running = RunningService(repository, api_key="k3y", environment={
        "CNNKIT_CORS_ORIGINS": origin, "CNNKIT_LOG_FORMAT": "json", "CNNKIT_LOG_LEVEL": "info",
        "CNNKIT_TRACE_REQUESTS": "true"})
    try:
        body = {"model": "digits", "images": [b64(digits[2][0])]}
        assert httpx.post(f"{running.url}/predict_json", json=body).status_code == 401
        assert httpx.get(f"{running.url}/v1/models/digits").status_code == 401
        assert httpx.post(f"{running.url}/predict_json", json=body, headers={"x-api-key": "nope"}).status_code == 401
        assert httpx.post(f"{running.url}/predict_json", json=body, headers={"x-api-key": "k3y"}).status_code == 200
        assert httpx.get(f"{running.url}/models/", headers={"authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"{running.url}/readyz").status_code == 200
        # The Open Inference Protocol: the same key, its health checks open like /readyz.
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{running.url}/v2/models/digits").status_code == 401
        assert httpx.get(f"{running.url}/v2/models/digits", headers={"x-api-key": "k3y"}).status_code == 200
        # CORS: a browser's preflight needs no key; the answer names the origin; other origins get nothing.
        preflight = httpx.options(f"{running.url}/predict_json", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-api-key"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        assert "x-api-key" in preflight.headers["access-control-allow-headers"]
        called = httpx.post(f"{running.url}/predict_json", json=body, headers={"x-api-key": "k3y", "origin": origin})
        assert called.headers["access-control-allow-origin"] == origin
        assert len(called.headers["x-bentoml-request-id"]) == 16  # the id of the request's tracing span
        stranger = httpx.options(f"{running.url}/predict_json", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in stranger.headers
        # Request ids: the client's is echoed, else one is made; both reach the JSON log lines.
        mine = httpx.post(f"{running.url}/predict_json", json=body, headers={"x-api-key": "k3y",
                                                                             "x-request-id": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        made = httpx.post(f"{running.url}/predict_json", json=body, headers={"x-api-key": "k3y"}).headers
        assert len(made["x-request-id"]) == 32
        refused = httpx.get(f"{running.url}/models/", headers={"x-request-id": "x" * 500})  # 401, a new id
        assert len(refused.headers["x-request-id"]) == 32
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "trace-42" not in running.log_tail(100_000):
            time.sleep(0.2)
        lines = [json.loads(line) for line in running.log_tail(1_000_000).splitlines() if line.startswith("{")]
        access = [line for line in lines if line["logger"] == "cnnkit.access"]
        assert {"request_id": "trace-42", "status": 200, "path": "/predict_json"}.items() <= next(
            line for line in access if line["request_id"] == "trace-42").items()
        assert any(line["request_id"] == made["x-request-id"] for line in access)
        assert any("serving digits version 1 with CPUExecutionProvider" in line["message"] for line in lines)
        assert any("gRPC (TF Serving's API) listening on 127.0.0.1:" in line["message"] for line in lines)
    finally:
        running.stop()


def test_sixty_four_concurrent_clients_get_no_errors_and_share_batches(repository, digits):
    from concurrent.futures import ThreadPoolExecutor

    def metric(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and 'model="digits"' in line)

    body = {"model": "digits", "instances": digits[0][:1].tolist()}
    # Batches in threads only, as for a model slower than CNNKIT_INLINE_BATCH_MS: this quick model
    # would otherwise run each request that finds itself alone in the event loop at once.
    running = RunningService(repository, environment={"CNNKIT_INLINE_BATCH_MS": "0"})
    try:
        before = httpx.get(f"{running.url}/metrics", timeout=30).text

        def one_client(_):
            with httpx.Client(base_url=running.url, timeout=120) as own:
                return [own.post("/predict_json", json=body).status_code for _ in range(4)]

        with ThreadPoolExecutor(max_workers=64) as pool:
            statuses = [status for result in pool.map(one_client, range(64)) for status in result]
        after = httpx.get(f"{running.url}/metrics", timeout=30).text
    finally:
        running.stop()
    assert statuses == [200] * 256
    images = metric(after, "cnnkit_inference_batch_size_sum") - metric(before, "cnnkit_inference_batch_size_sum")
    batches = metric(after, "cnnkit_inference_batch_size_count") - metric(before, "cnnkit_inference_batch_size_count")
    shown = [line for line in after.splitlines() if line.startswith("cnnkit_inference_batch_size_")][-6:]
    assert images == 256 and batches < 256, shown  # some requests were merged into shared batches


def test_the_built_bento_serves_the_stored_models(digits_repository, tmp_path, digits):
    """`bentoml build` (offline) records the store models; `bentoml serve cnnkit:latest` serves them."""
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    environment = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="True",
                       TF_CPP_MIN_LOG_LEVEL="3", CNNKIT_BENTO_MODELS="digits:latest")
    code = ("from cnnkit.bento import import_to_bentoml\nfrom cnnkit.repository import open_version\n"
            f"print(import_to_bentoml(open_version({str(digits_repository)!r}, 'digits')))\n")
    imported = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                              timeout=300)
    assert imported.stdout.strip() == "digits:1", imported.stderr
    built = subprocess.run([bentoml_bin, "build"], cwd=REPOSITORY, env=environment, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    described = subprocess.run([bentoml_bin, "get", "cnnkit:latest", "-o", "json"], env=environment,
                               capture_output=True, text=True, timeout=120)
    import json as json_module

    assert [model["tag"] for model in json_module.loads(described.stdout)["services"][0]["models"]] == ["digits:1"]
    port = free_port()
    environment["CNNKIT_GRPC_PORT"] = str(free_port())
    process = subprocess.Popen([bentoml_bin, "serve", "cnnkit:latest", "--port", str(port)], cwd=tmp_path,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "bentoml serve exited"
            time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{port}/predict_json",
                            json={"model": "digits", "images": [b64(digits[2][0])]}, timeout=60)
        assert answer.status_code == 200 and answer.json()["version"] == 1
    finally:
        import signal

        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_uploads_over_the_body_limit_are_refused_before_reading(client):
    big = b"\xff\xd8" + b"\x00" * (28 * 1024 * 1024)
    response = client.post("/predict", files={"image": ("huge.jpg", big, "image/jpeg")}, data={"model": "digits"})
    assert response.status_code == 413 and "limit" in response.json()["error"]
