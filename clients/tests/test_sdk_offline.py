"""The SDK without a server: image encoding, request shapes, error mapping and retries over
``httpx.MockTransport``, and importing without TensorFlow. Needs only the client's dependencies."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from cnnkit_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConnectError,
    GrpcClient,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    Prediction,
    RequestTimeoutError,
    Retry,
    ServerError,
    ServiceUnavailableError,
)
from cnnkit_client.images import encode_image, encode_images

FAST = Retry(attempts=3, backoff=0.001)


def free_port() -> int:
    """A port nothing listens on (bound, then released), so connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def prediction_answer(request: httpx.Request) -> httpx.Response:
    """What /predict_json answers: one row per image, the image's byte length as a fake score."""
    body = json.loads(request.content)
    rows = [[{"class": "seven", "index": 7, "probability": len(base64.b64decode(image)) / 1e6},
             {"class": "one", "index": 1, "probability": 0.001}] for image in body["images"]]
    return httpx.Response(200, json={"model": body["model"], "version": 3, "predictions": rows})


# -- images ----------------------------------------------------------------------------------------

def test_every_kind_of_image_becomes_the_same_lossless_png_or_stays_as_given(tmp_path):
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    assert encode_image(path) == path.read_bytes() == encode_image(str(path))  # files are sent as they are
    assert encode_image(path.read_bytes()) == path.read_bytes()
    np.testing.assert_array_equal(png_pixels(encode_image(pixels)), pixels)
    np.testing.assert_array_equal(png_pixels(encode_image(pixels[..., None])), pixels)
    np.testing.assert_array_equal(png_pixels(encode_image(Image.fromarray(pixels))), pixels)
    # Whole-number floats in 0..255 are pixels too (lossless).
    np.testing.assert_array_equal(png_pixels(encode_image(pixels.astype(np.float32))), pixels)
    color = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(png_pixels(encode_image(color)), color)


def test_one_image_or_many():
    one = np.zeros((4, 4), np.uint8)
    assert encode_images(one)[1] is True
    assert encode_images([one, one])[1] is False and len(encode_images([one, one])[0]) == 2
    encoded, single = encode_images(np.zeros((3, 4, 4, 1), np.uint8))
    assert (len(encoded), single) == (3, False)


@pytest.mark.parametrize(("image", "message"), [
    (np.full((4, 4), 0.5, np.float32), "already normalised"),
    (np.full((4, 4), 300, np.int32), "0..255"),
    (np.zeros((4, 4, 2), np.uint8), "(H, W, 3)"),
    (np.full((4, 4), "a"), "numbers"),
    (b"", "empty"),
    (12, "Cannot send a int"),
    ([], "No images"),
])
def test_what_is_not_an_image_is_refused_before_sending(image, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_images(image)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidInputError, match="missing.png"):
        encode_image(tmp_path / "missing.png")


# -- HTTP requests and answers --------------------------------------------------------------------

def test_predict_sends_base64_files_with_the_key_and_parses_typed_results():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return prediction_answer(request)

    with Client("http://service", api_key="s3cret", transport=httpx.MockTransport(handler)) as client:
        one = client.predict(b"12345", model="digits", version=3, top_k=2)
        many = client.predict([b"1", b"22", b"333"], model="digits")
    assert isinstance(one, Prediction) and one.label == "seven" and one.version == 3
    assert one.classes[1].index == 1 and one.probability == pytest.approx(5e-6)
    assert [prediction.probability for prediction in many] == pytest.approx([1e-6, 2e-6, 3e-6])
    first = json.loads(seen[0].content)
    assert seen[0].url.path == "/predict_json" and seen[0].headers["x-api-key"] == "s3cret"
    assert first == {"model": "digits", "version": 3, "top_k": 2, "images": [base64.b64encode(b"12345").decode()]}
    assert "version" not in json.loads(seen[1].content)  # unset options are left to the server


def test_v2_predict_sends_the_open_inference_protocol_and_reads_the_classification_extension():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        count = body["inputs"][0]["shape"][0]
        rows = [[f"0.{9 - index}00000:{index}:label:{index}" for index in range(2)] for _ in range(count)]
        return httpx.Response(200, json={"model_name": "digits", "model_version": "4", "outputs": [
            {"name": "probabilities", "datatype": "BYTES", "shape": [count, 2], "data": sum(rows, [])}]})

    with Client("http://service", protocol="v2", max_images_per_request=2,
                transport=httpx.MockTransport(handler)) as client:
        predictions = client.predict([b"1", b"22", b"333"], model="digits", version=4, top_k=2)
    assert [request.url.path for request in seen] == ["/v2/models/digits/versions/4/infer"] * 2
    body = json.loads(seen[0].content)
    assert body["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [2],
                               "data": [base64.b64encode(b"1").decode(), base64.b64encode(b"22").decode()]}]
    assert body["outputs"] == [{"name": "probabilities", "parameters": {"classification": 2}}]
    assert len(predictions) == 3 and predictions[0].version == 4
    # Labels may hold colons: only the first two separate the probability and the index.
    assert predictions[2].classes[1].label == "label:1" and predictions[2].classes[1].index == 1
    assert predictions[0].probability == pytest.approx(0.9)


def test_large_batches_are_split_and_answers_kept_in_order():
    sizes = []

    def handler(request: httpx.Request) -> httpx.Response:
        sizes.append(len(json.loads(request.content)["images"]))
        return prediction_answer(request)

    images = [b"x" * (index + 1) for index in range(10)]
    with Client("http://service", max_images_per_request=4, transport=httpx.MockTransport(handler)) as client:
        predictions = client.predict(images, model="digits")
    assert sizes == [4, 4, 2]
    assert [round(p.probability * 1e6) for p in predictions] == list(range(1, 11))


@pytest.mark.parametrize(("status", "body", "error", "message"), [
    (400, {"error": "The data is not an image."}, InvalidInputError, "The data is not an image."),
    (400, [{"error": "BentoML's list form"}], InvalidInputError, "BentoML's list form"),
    (413, {"error": "65 images; the limit is 64."}, PayloadTooLargeError, "the limit is 64"),
    (404, {"error": "Servable not found"}, NotFoundError, "Servable not found"),
    (401, {"error": "Missing or wrong API key"}, AuthenticationError, "API key"),
    (500, "Internal Server Error", ServerError, "Internal Server Error"),
])
def test_errors_carry_the_servers_message_and_status(status, body, error, message):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, **({"json": body} if not isinstance(body, str) else {"text": body}))

    with Client("http://service", retry=FAST, transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(error, match=message) as raised:
        client.predict(b"x", model="digits")
    assert raised.value.status == status


def test_503_and_connection_errors_are_retried_then_succeed():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, json={"error": "Service Unavailable"})
        return prediction_answer(request)

    with Client("http://service", retry=FAST, transport=httpx.MockTransport(handler)) as client:
        assert client.predict(b"x", model="digits").label == "seven"
    assert len(calls) == 3


def test_retries_give_up_after_the_attempts_and_bad_input_is_not_retried():
    calls = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": "not ready"})

    with Client("http://service", retry=FAST, transport=httpx.MockTransport(unavailable)) as client, \
            pytest.raises(ServiceUnavailableError, match="not ready"):
        client.predict(b"x", model="digits")
    assert len(calls) == 3

    calls.clear()

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(400, json={"error": "bad"})

    with Client("http://service", retry=FAST, transport=httpx.MockTransport(refuse)) as client, \
            pytest.raises(InvalidInputError):
        client.predict(b"x", model="digits")
    assert len(calls) == 1


def test_the_sdk_retries_overload_after_the_servers_retry_after():
    answers = iter([
        httpx.Response(429, json={"error": "The service is busy"}, headers={"Retry-After": "0.4"}),
        httpx.Response(503, json={"error": "The service is overloaded: 300 requests wait"},
                       headers={"Retry-After": "0.3"}),
        httpx.Response(200, json={"model": "digits", "version": 1, "predictions": [[
            {"class": "7", "index": 7, "probability": 0.9}]]}),
    ])
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return next(answers)

    with Client("http://cnnkit.test", transport=httpx.MockTransport(handler),
                retry=Retry(attempts=3, backoff=0.01)) as client:
        assert client.predict(np.zeros((28, 28), np.uint8), model="digits").label == "7"
    assert times[1] - times[0] >= 0.4 and times[2] - times[1] >= 0.3  # Retry-After, not the 10 ms backoff

    busy = httpx.MockTransport(lambda request: httpx.Response(429, json={"error": "busy"},
                                                              headers={"Retry-After": "1"}))
    with Client("http://cnnkit.test", retry=Retry(attempts=1), transport=busy) as client, \
            pytest.raises(OverloadedError) as refused:
        client.predict(np.zeros((28, 28), np.uint8), model="digits")
    assert isinstance(refused.value, ServiceUnavailableError) and refused.value.retry_after == 1.0


def test_timeouts_raise_request_timeout():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with Client("http://service", transport=httpx.MockTransport(slow)) as client, \
            pytest.raises(RequestTimeoutError, match="in time"):
        client.models()


def test_a_closed_port_is_a_connect_error_after_backoff():
    port = free_port()
    with Client(f"http://127.0.0.1:{port}", retry=Retry(attempts=3, backoff=0.05)) as client:
        started = time.perf_counter()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            client.health()
        assert time.perf_counter() - started >= 0.05  # two waits of at least 0.025 s each


def test_async_client_has_the_same_methods_and_sends_chunks_concurrently():
    in_flight, most = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        if request.url.path == "/models/digits":
            return httpx.Response(200, json={"name": "digits", "version": 3, "class_names": list("0123456789"),
                                             "input": {"name": "image", "shape": [28, 28, 1]}})
        return prediction_answer(request)

    async def main():
        async with AsyncClient("http://service", max_images_per_request=2,
                               transport=httpx.MockTransport(handler)) as client:
            predictions = await client.predict([b"a", b"bb", b"ccc", b"dddd"], model="digits")
            info = await client.metadata("digits")
        return predictions, info

    predictions, info = asyncio.run(main())
    assert [round(p.probability * 1e6) for p in predictions] == [1, 2, 3, 4]
    assert most == 2 and info.input_shape == (28, 28, 1) and info.class_names[7] == "7"
    assert set(dir(Client)) & {"predict", "feature_maps", "models", "metadata", "health"} == \
        set(dir(AsyncClient)) & {"predict", "feature_maps", "models", "metadata", "health"} == \
        set(dir(GrpcClient)) & {"predict", "feature_maps", "models", "metadata", "health"}


# -- packaging -------------------------------------------------------------------------------------

def test_importing_the_sdk_and_its_clients_loads_no_tensorflow():
    code = ("import sys, cnnkit_client\n"
            "cnnkit_client.Client, cnnkit_client.AsyncClient, cnnkit_client.GrpcClient, cnnkit_client.AsyncGrpcClient\n"
            "import cnnkit_client.scoring, cnnkit_client.tensors\n"
            "heavy = sorted(name for name in sys.modules if name.split('.')[0] in "
            "('tensorflow', 'tensorflow_serving', 'keras', 'onnxruntime', 'bentoml'))\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
