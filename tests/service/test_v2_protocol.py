"""The Open Inference Protocol ("v2") against the real service, spoken by Triton's own client.

``tritonclient`` (installed by scripts/setup.sh with --no-deps: its pins clash with TensorFlow's)
calls the shared service on 127.0.0.1 over HTTP (binary and JSON tensors) and gRPC; raw HTTP
requests check the JSON forms and the errors.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http
from PIL import Image
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.data


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


@pytest.fixture(scope="module")
def reference(service, digits):
    """The probabilities the service's own /predict route gives for the same digits."""
    images, _, pngs = digits
    answer = httpx.post(f"{service.url}/v1/models/digits:predict",
                        json={"instances": images.astype(float).tolist()}, timeout=30).json()
    return np.asarray([row["probabilities"] for row in answer["predictions"]], np.float32)


@pytest.fixture(scope="module")
def http_client(service):
    client = tritonclient_http.InferenceServerClient(service.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(service):
    client = tritonclient_grpc.InferenceServerClient(service.grpc_target)
    yield client
    client.close()


def _pixels_input(module, images: np.ndarray, datatype: str = "FP32", binary: bool = True):
    dtype = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16, "INT32": np.int32}[datatype]
    tensor = module.InferInput("image", list(images.shape), datatype)
    if module is tritonclient_http:
        tensor.set_data_from_numpy(images.astype(dtype), binary_data=binary)
    else:
        tensor.set_data_from_numpy(images.astype(dtype))
    return tensor


def test_health_and_server_metadata_over_both_protocols(http_client, grpc_client):
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.is_model_ready("digits") and grpc_client.is_model_ready("digits", "1")
    assert not http_client.is_model_ready("nope") and not grpc_client.is_model_ready("nope")
    assert not http_client.is_model_ready("digits", "7")
    http_metadata = http_client.get_server_metadata()
    grpc_metadata = grpc_client.get_server_metadata(as_json=True)
    assert http_metadata["name"] == grpc_metadata["name"] == "cnnkit"
    assert "binary_tensor_data" in http_metadata["extensions"]


def test_model_metadata_and_config_over_both_protocols(http_client, grpc_client):
    metadata = http_client.get_model_metadata("digits")
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert outputs["top_class"]["datatype"] == "INT64" and "conv1" in outputs
    # (protobuf's JSON writes int64 shapes as strings)
    grpc_outputs = grpc_client.get_model_metadata("digits", as_json=True)["outputs"]
    normalised = [{**tensor, "shape": [int(size) for size in tensor["shape"]]} for tensor in grpc_outputs]
    assert normalised == metadata["outputs"]
    config = http_client.get_model_config("digits")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [28, 28, 1]
    grpc_config = grpc_client.get_model_config("digits", as_json=True)["config"]
    assert grpc_config["name"] == "digits" and grpc_config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(size) for size in grpc_config["input"][0]["dims"]] == [28, 28, 1]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_with_pixel_tensors_matches_the_service(http_client, digits, reference, binary):
    images, labels, _ = digits
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=binary)
               for name in ("probabilities", "top_class")]
    result = http_client.infer("digits", [_pixels_input(tritonclient_http, images, binary=binary)],
                               outputs=outputs, request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("top_class"), reference.argmax(axis=1))
    response = result.get_response()
    assert response["model_name"] == "digits" and response["model_version"] == "1" and response["id"] == "req-7"


def test_http_infer_defaults_and_other_pixel_types(http_client, digits, reference):
    images, _, _ = digits
    for datatype in ("UINT8", "FP16", "INT32"):
        result = http_client.infer("digits", [_pixels_input(tritonclient_http, images, datatype)])
        # No outputs named: probabilities and top_class, in binary (tritonclient asks for it).
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-6)
        assert result.as_numpy("conv1") is None


def test_grpc_infer_with_raw_contents_and_feature_maps(grpc_client, digits, reference):
    images, _, _ = digits
    outputs = [tritonclient_grpc.InferRequestedOutput(name) for name in ("probabilities", "top_class", "conv1")]
    result = grpc_client.infer("digits", [_pixels_input(tritonclient_grpc, images)], outputs=outputs,
                               model_version="1", request_id="g-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-6)
    assert result.as_numpy("top_class").dtype == np.int64
    assert result.as_numpy("conv1").shape[0] == len(images) and result.get_response().id == "g-1"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_with_encoded_images_as_bytes(http_client, grpc_client, digits, reference, protocol):
    _, _, pngs = digits
    module, client = (tritonclient_http, http_client) if protocol == "http" else (tritonclient_grpc, grpc_client)
    tensor = module.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.asarray(pngs, dtype=np.object_))
    result = client.infer("digits", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-5)


@pytest.mark.parametrize(("protocol", "binary"), [("http", True), ("http", False), ("grpc", True)])
def test_the_classification_extension_names_the_classes(http_client, grpc_client, digits, reference, protocol,
                                                        binary):
    images, _, _ = digits
    if protocol == "http":
        output = tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        result = http_client.infer("digits", [_pixels_input(tritonclient_http, images)], outputs=[output])
    else:
        output = tritonclient_grpc.InferRequestedOutput("probabilities", class_count=3)
        result = grpc_client.infer("digits", [_pixels_input(tritonclient_grpc, images)], outputs=[output])
    top = result.as_numpy("probabilities")
    assert top.shape == (len(images), 3)
    for row, expected in zip(top, reference, strict=True):
        entries = [(element.decode() if isinstance(element, bytes) else element).split(":") for element in row]
        order = np.argsort(-expected, kind="stable")[:3]
        assert [int(index) for _, index, _ in entries] == order.tolist()
        assert [label for _, _, label in entries] == [str(index) for index in order]  # the digits' class names
        np.testing.assert_allclose([float(value) for value, _, _ in entries], expected[order], atol=1e-6)


def test_json_forms_by_hand(service, digits, reference):
    """The plain JSON protocol, as curl would send it: nested data, base64 BYTES, an id."""
    images, _, pngs = digits
    body = {"id": "by-hand", "inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 28, 28, 1],
                                         "data": images[:2].astype(float).tolist()}],
            "outputs": [{"name": "top_class"}]}
    answer = httpx.post(f"{service.url}/v2/models/digits/versions/1/infer", json=body, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    data = answer.json()
    assert data["id"] == "by-hand" and data["outputs"] == [
        {"name": "top_class", "datatype": "INT64", "shape": [2], "data": reference[:2].argmax(axis=1).tolist()}]
    files = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(pngs[0]).decode()]}
    answer = httpx.post(f"{service.url}/v2/models/digits/infer", json={"inputs": [files]}, timeout=30).json()
    probabilities = next(output for output in answer["outputs"] if output["name"] == "probabilities")
    np.testing.assert_allclose(probabilities["data"], reference[0], atol=1e-5)
    assert httpx.get(f"{service.url}/v2", timeout=10).json()["name"] == "cnnkit"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "Servable not found"),
        ("/v2/models/digits/versions/9/infer", {"inputs": []}, 404, "version"),
        ("/v2/models/digits/infer", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28, 1],
                                                 "data": [0.0] * 784}]}, 400, "Unknown input 'pixels'"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28, 1],
                                                 "data": [0.0] * 3}]}, 400, "3 values for shape"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "BF16", "shape": [1],
                                                 "data": [0]}]}, 400, "unsupported datatype 'BF16'"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 5, 5, 1],
                                                 "data": [0.0] * 25}]}, 400, "28, 28, 1"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28, 1],
                                                 "data": [0.0] * 784}], "outputs": [{"name": "logits"}]},
         400, "Unknown output"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                 "data": ["%%%"]}]}, 400, "not valid base64"),
    ],
)
def test_bad_requests_get_the_protocols_error_json(service, path, body, status, message):
    answer = httpx.post(f"{service.url}{path}", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_malformed_binary_bodies_are_refused(service):
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28, 1],
                                     "parameters": {"binary_data_size": 784 * 4}}]}).encode()
    for length, payload, message in [
        ("abc", header, "must be an integer"),
        (str(len(header) + 99), header, "does not fit"),
        (str(len(header)), header + b"\0" * 10, "binary_data_size 3136 does not fit"),
        (str(len(header)), header + b"\0" * (784 * 4 + 3), "3 binary bytes after"),
    ]:
        answer = httpx.post(f"{service.url}/v2/models/digits/infer", content=payload,
                            headers={"Inference-Header-Content-Length": length}, timeout=30)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_grpc_errors_carry_status_codes(grpc_client, digits):
    import grpc

    images, _, _ = digits
    with pytest.raises(InferenceServerException) as unknown:
        grpc_client.infer("nope", [_pixels_input(tritonclient_grpc, images)])
    assert unknown.value.status() == str(grpc.StatusCode.NOT_FOUND)
    wrong = tritonclient_grpc.InferInput("image", [1, 5, 5, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 5, 5, 1), np.float32))
    with pytest.raises(InferenceServerException, match="28, 28, 1") as bad:
        grpc_client.infer("digits", [wrong])
    assert bad.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InferenceServerException) as unserved:
        grpc_client.get_inference_statistics("digits")
    assert unserved.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)


def test_the_sdk_speaks_v2_with_the_same_methods(service, digits):
    """Client, AsyncClient, GrpcClient and AsyncGrpcClient with protocol="v2" give what the default
    protocol gives: predictions (through the classification extension), feature maps, health."""
    import asyncio

    from cnnkit_client import AsyncClient, AsyncGrpcClient, Client, GrpcClient

    _, _, pngs = digits
    with Client(service.url) as plain:
        expected = plain.predict(pngs, model="digits", top_k=3)
        expected_maps = dict(plain.feature_maps(pngs[0], model="digits"))
    with Client(service.url, protocol="v2") as http, GrpcClient(service.grpc_target, protocol="v2") as grpc_client:
        for client in (http, grpc_client):
            predictions = client.predict(pngs, model="digits", top_k=3)
            assert [p.model for p in predictions] == ["digits"] * len(pngs) and predictions[0].version == 1
            for got, want in zip(predictions, expected, strict=True):
                assert [c.label for c in got.classes] == [c.label for c in want.classes]
                assert [c.index for c in got.classes] == [c.index for c in want.classes]
                np.testing.assert_allclose([c.probability for c in got.classes],
                                           [c.probability for c in want.classes], atol=1e-5)
            single = client.predict(pngs[0], model="digits", version=1)
            assert single.label == expected[0].label
            maps = dict(client.feature_maps(pngs[0], model="digits"))
            assert set(maps) == set(expected_maps)
            for name, array in maps.items():
                np.testing.assert_allclose(array, expected_maps[name], atol=1e-5)
            health = client.health()
            assert health.live and health.ready

    async def both_async():
        async with AsyncClient(service.url, protocol="v2") as ahttp, \
                AsyncGrpcClient(service.grpc_target, protocol="v2") as agrpc:
            return await asyncio.gather(ahttp.predict(pngs[:2], model="digits"),
                                        agrpc.predict(pngs[:2], model="digits"))

    for predictions in asyncio.run(both_async()):
        assert [p.label for p in predictions] == [p.label for p in expected[:2]]
    with pytest.raises(ValueError, match="protocol must be one of cnnkit, v2"):
        Client(service.url, protocol="v3")


def test_sdk_v2_errors_map_to_the_sdk_exceptions(service, digits):
    from cnnkit_client import Client, GrpcClient
    from cnnkit_client.errors import InvalidInputError, NotFoundError

    _, _, pngs = digits
    with Client(service.url, protocol="v2") as http, GrpcClient(service.grpc_target, protocol="v2") as grpc_client:
        for client in (http, grpc_client):
            with pytest.raises(NotFoundError):
                client.predict(pngs[0], model="nope")
            with pytest.raises(InvalidInputError):
                client.predict(b"not an image", model="digits")


def test_the_readmes_curl_example_runs_as_written(service, digits, reference, tmp_path):
    """The indented curl call of the README's v2 section, against the real service."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("curl") is None:
        pytest.fail("curl is needed for the README's v2 example")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = re.search(r"^    curl -s localhost:3000/v2/.*?(?=^\S|^$)", readme, re.S | re.M).group(0)
    command = " ".join(line.strip() for line in lines.splitlines()).replace(
        "localhost:3000", service.url.removeprefix("http://"))
    _, _, pngs = digits
    (tmp_path / "seven.png").write_bytes(pngs[0])
    answer = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    output = json.loads(answer.stdout)["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    assert output["data"][0].split(":")[2] == str(reference[0].argmax())  # the tiny model's answer
