"""Serving, levels two and three: the service class called directly, and its ASGI app in-process."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def service_environment(digits_repository):
    patch = pytest.MonkeyPatch()
    patch.setenv("CNNKIT_MODEL_REPOSITORY", str(digits_repository))
    patch.setenv("CNNKIT_GRPC_PORT", "-1")  # no gRPC port for in-process tests
    patch.delenv("CNNKIT_API_KEY", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def instance(service_environment):
    from cnnkit.serving.http.service import Classifier

    created = Classifier()
    yield created
    created.poller.stop()


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_class_called_directly(instance, tmp_path):

    assert instance.__is_ready__()
    blank = np.zeros((28, 28, 1)).tolist()
    result = asyncio.run(instance.predict_json(model="digits", instances=[blank], top_k=2))
    assert result["model"] == "digits" and len(result["predictions"][0]) == 2
    upload = tmp_path / "digit.png"
    upload.write_bytes(png_of(np.zeros((28, 28), np.uint8)))
    uploaded = asyncio.run(instance.predict(image=upload, model="digits", top_k=2))
    assert uploaded["predictions"] == result["predictions"]
    maps = instance.feature_maps(image=upload, model="digits", layers=["conv1"], output="array", dtype="float32")
    assert maps["layers"]["conv1"]["shape"] == [28, 28, 6] and maps["layers"]["conv1"]["dtype"] == "float32"
    # Refusals are answered as the server would: {"error": message} with the status.
    unknown = asyncio.run(instance.predict_json(model="nope", instances=[blank]))
    assert unknown.status_code == 404 and "Latest(nope)" in json.loads(unknown.body)["error"]
    neither = asyncio.run(instance.predict_json(model="digits"))
    assert neither.status_code == 400 and "exactly one of" in json.loads(neither.body)["error"]
    assert instance.reload()["models"] == {"digits": [1]}


def test_the_asgi_app_in_process(service_environment):
    from starlette.testclient import TestClient

    from cnnkit.serving.http.service import Classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client_context = TestClient(Classifier.to_asgi())
    with client_context as client:
        assert client.get("/readyz").status_code == 200
        encoded = base64.b64encode(png_of(np.full((28, 28), 255, np.uint8))).decode()
        answer = client.post("/predict_json", json={"model": "digits", "images": [encoded]})
        assert answer.status_code == 200 and answer.json()["version"] == 1
        rest = client.post("/v1/models/digits:predict", json={"instances": [{"b64": encoded}]})
        assert rest.json()["predictions"][0]["top_class"] == int(answer.json()["predictions"][0][0]["class"])
        refused = client.post("/predict_json", json={"model": "digits", "images": ["###"]})
        assert refused.status_code == 400 and refused.json() == {"error": refused.json()["error"]}
        assert "Malformed base64" in refused.json()["error"]
        assert client.get("/models/digits").json()["class_names"][0] == "0"
        assert client.get("/models/nope").status_code == 404
        # The OpenAPI document is cnnkit's, and shows the shared request models as the routes' bodies.
        document = client.get("/docs.json").json()
        from cnnkit import __version__

        assert document["info"]["title"] == "cnnkit" and document["info"]["version"] == __version__
        assert "BentoML" not in str(document["info"]) and "Grad-CAM" in document["info"]["description"]
        paths = document["paths"]
        patterns = paths["/filter_patterns"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert patterns["properties"]["seed"]["description"] == "Seed of the starting noise."
        assert patterns["required"] == ["model"]
        upload = paths["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(upload["required"]) == {"model", "image"} and upload["properties"]["image"]["format"] == "binary"


def test_api_key_middleware_in_process():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from cnnkit.serving.http.middleware import ApiKeyMiddleware, presented_key

    app = Starlette(routes=[Route("/readyz", lambda request: PlainTextResponse("ok")),
                            Route("/data", lambda request: PlainTextResponse("secret"))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = TestClient(ApiKeyMiddleware(app, api_key="k"))
    assert client.get("/readyz").status_code == 200
    refused = client.get("/data")
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.get("/data", headers={"x-api-key": "k"}).text == "secret"
    assert client.get("/data", headers={"Authorization": "Bearer k"}).text == "secret"
    assert presented_key([("X-Api-Key", "a"), ("authorization", "Bearer b")]) == "a"
