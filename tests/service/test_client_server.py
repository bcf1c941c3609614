"""The SDK and `cnnkit score` against a real service on 127.0.0.1 (HTTP and gRPC, sync and async)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processes import kill_when
from services import RunningService, free_port

from cnnkit.cli import main as cnnkit_main
from cnnkit.serving.local import LocalClient
from cnnkit_client import (
    AsyncClient,
    AsyncGrpcClient,
    AuthenticationError,
    Client,
    GradCam,
    GrpcClient,
    InvalidInputError,
    NotFoundError,
    Prediction,
    Retry,
)
from cnnkit_client.scoring import main as score_main

pytestmark = pytest.mark.data

SYNC_CLIENTS = ("http", "grpc")


def open_client(kind: str, service: RunningService):
    if kind == "http":
        return Client(service.url, timeout=60)
    return GrpcClient(f"127.0.0.1:{service.grpc_port}", timeout=60)


@pytest.fixture(scope="module")
def digit_files(data_root, tmp_path_factory):
    """Twelve MNIST test digits as PNG files."""
    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=12)
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for index, image in enumerate(dataset.x_test):
        path = folder / f"digit{index:02d}.png"
        Image.fromarray(image[..., 0]).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def local(repository):
    with LocalClient(repository) as opened:
        yield opened


@pytest.mark.parametrize("kind", SYNC_CLIENTS)
def test_predictions_equal_the_in_process_model_for_every_kind_of_image(kind, service, digit_files, local):
    expected = local.predict(digit_files, model="digits", top_k=3)
    pixels = np.asarray(Image.open(digit_files[0]))
    with open_client(kind, service) as client:
        answered = client.predict(digit_files, model="digits", top_k=3)
        one = client.predict(digit_files[0], model="digits", top_k=3)
        same_image_four_ways = client.predict(
            [digit_files[0].read_bytes(), pixels, Image.fromarray(pixels), str(digit_files[0])], model="digits")
    assert isinstance(one, Prediction) and isinstance(answered, list) and len(answered) == 12
    for got, want in zip(answered, expected, strict=True):
        assert [c.label for c in got.classes] == [c.label for c in want.classes]
        assert [c.index for c in got.classes] == [c.index for c in want.classes]
        np.testing.assert_allclose([c.probability for c in got.classes], [c.probability for c in want.classes],
                                   rtol=1e-6)
    assert (answered[0].model, answered[0].version) == ("digits", 1)
    assert len({prediction.classes for prediction in same_image_four_ways}) == 1
    assert same_image_four_ways[0].classes[:3] == one.classes


@pytest.mark.parametrize("kind", SYNC_CLIENTS)
def test_feature_maps_models_metadata_and_health(kind, service, digit_files):
    with open_client(kind, service) as client:
        info = client.metadata("digits")
        maps = client.feature_maps(digit_files[0], model="digits")
        pool = client.feature_maps(digit_files[0], model="digits", layers=["pool1"])
        grids = client.feature_maps(digit_files[0], model="digits", as_png=True)
        listed = client.models()
        health = client.health()
    shapes = {layer.name: layer.output_shape for layer in info.feature_layers}
    assert info.class_names == tuple("0123456789") and info.input_shape == (28, 28, 1)
    assert list(maps) == list(info.default_layers) == ["conv1", "conv2", "conv3"]
    assert all(maps[name].shape == shapes[name] and maps[name].dtype == np.float32 for name in maps)
    assert list(pool) == ["pool1"] and pool["pool1"].shape == shapes["pool1"]
    assert all(png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > 28 for png in grids.values())
    assert [model.name for model in listed] == ["digits"] and listed[0].versions == (1,)
    assert health.live and health.ready


def test_http_and_grpc_feature_maps_agree(service, digit_files):
    with open_client("http", service) as http, open_client("grpc", service) as grpc_client:
        over_http = http.feature_maps(digit_files[1], model="digits")
        over_grpc = grpc_client.feature_maps(digit_files[1], model="digits")
    for name in over_http:
        np.testing.assert_allclose(over_http[name], over_grpc[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", SYNC_CLIENTS)
def test_errors_carry_the_servers_message(kind, service, digit_files):
    with open_client(kind, service) as client:
        with pytest.raises(NotFoundError, match="nope"):
            client.predict(digit_files[0], model="nope")
        with pytest.raises(NotFoundError, match="9"):
            client.metadata("digits", version=9)
        with pytest.raises(InvalidInputError, match="not an image"):
            client.predict(b"this is not an image", model="digits")
        with pytest.raises(InvalidInputError, match="top_k"):
            client.predict(digit_files[0], model="digits", top_k=0)
        assert client.predict(digit_files[0], model="digits").label  # and it still serves


def test_async_clients_answer_concurrent_calls_like_the_sync_ones(service, digit_files):
    with open_client("http", service) as client:
        expected = client.predict(digit_files, model="digits")

    async def main():
        async with AsyncClient(service.url) as http, AsyncGrpcClient(f"127.0.0.1:{service.grpc_port}") as grpc_client:
            calls = [client.predict(path, model="digits") for path in digit_files for client in (http, grpc_client)]
            answers = await asyncio.gather(*calls)
            extras = await asyncio.gather(http.health(), grpc_client.health(), grpc_client.models(),
                                          http.feature_maps(digit_files[0], model="digits", layers=["conv2"]))
        return answers, extras

    answers, (http_health, grpc_health, models, maps) = asyncio.run(main())
    assert [answer.classes for answer in answers] == [want.classes for want in expected for _ in range(2)]
    assert http_health.ready and grpc_health.ready and models[0].name == "digits"
    assert maps["conv2"].shape == (10, 10, 16)


def test_gradcam_over_both_protocols_sync_and_async(service, digit_files):
    with Client(service.url, timeout=120) as http, GrpcClient(f"127.0.0.1:{service.grpc_port}") as grpc_client:
        by_index = http.gradcam(digit_files[0], model="digits", target=3)
        by_name = grpc_client.gradcam(digit_files[0], model="digits", target="3")
        predicted = http.gradcam(digit_files[0], model="digits")
        top = http.predict(digit_files[0], model="digits", top_k=1)

    async def both_async() -> list[GradCam]:
        async with AsyncClient(service.url) as ahttp, AsyncGrpcClient(f"127.0.0.1:{service.grpc_port}") as agrpc:
            return list(await asyncio.gather(ahttp.gradcam(digit_files[1], model="digits", target=7),
                                             agrpc.gradcam(digit_files[1], model="digits", target=7)))

    async_http, async_grpc = asyncio.run(both_async())
    assert isinstance(by_index, GradCam) and (by_index.class_name, by_index.class_index) == ("3", 3)
    assert by_index.layer == "conv2" and by_index.heatmap.shape == (28, 28)
    np.testing.assert_array_equal(by_index.heatmap, by_name.heatmap)
    assert by_index.overlay_png == by_name.overlay_png
    assert Image.open(io.BytesIO(by_index.overlay_png)).size[0] >= 224  # with its caption and colour scale
    assert predicted.class_name == top.label == predicted.predicted.label
    np.testing.assert_array_equal(async_http.heatmap, async_grpc.heatmap)
    assert async_http.class_name == "7"


def test_filter_patterns_over_both_protocols_come_from_the_cache_the_second_time(service):
    with Client(service.url) as http, GrpcClient(f"127.0.0.1:{service.grpc_port}") as grpc_client:
        first = http.filter_patterns(model="digits", layer="conv2", filters=[0, 5, 9], steps=8)
        second = grpc_client.filter_patterns(model="digits", layer="conv2", filters=[0, 5, 9], steps=8, arrays=True)
        default = http.filter_patterns(model="digits", filters=2, steps=2)
    assert (first.cached, second.cached) == (False, True)
    assert first.filters == second.filters == (0, 5, 9) and first.grid_png == second.grid_png
    assert second.patterns is not None and second.patterns.shape == (3, 28, 28, 1)
    assert first.mean_activation.shape == (3, 2)
    assert default.layer == "conv3" and default.filters == (0, 1)


@pytest.mark.parametrize("kind", SYNC_CLIENTS)
def test_explanation_errors_carry_the_servers_message(kind, service, digit_files):
    with open_client(kind, service) as client:
        with pytest.raises(InvalidInputError, match="Unknown class 'eleven'"):
            client.gradcam(digit_files[0], model="digits", target="eleven")
        with pytest.raises(InvalidInputError, match="out of range"):
            client.gradcam(digit_files[0], model="digits", target=12)
        with pytest.raises(NotFoundError, match="no convolution layer 'pool1'"):
            client.filter_patterns(model="digits", layer="pool1")
        with pytest.raises(InvalidInputError, match="has 6 filters"):
            client.filter_patterns(model="digits", layer="conv1", filters=[7])
        with pytest.raises(NotFoundError, match="nope"):
            client.gradcam(digit_files[0], model="nope")


def test_gradcam_upload_and_raw_http_answers(service, digit_files):
    import httpx

    with httpx.Client(base_url=service.url, timeout=120) as http:
        with open(digit_files[2], "rb") as handle:
            upload = http.post("/gradcam", files={"image": ("digit.png", handle, "image/png")},
                               data={"model": "digits", "class_index": "5"})
        unknown = http.post("/filter_patterns", json={"model": "digits", "layer": "pool2"})
        described = http.get("/models/digits").json()
    assert upload.status_code == 200, upload.text
    assert upload.json()["class_name"] == "5" and upload.json()["heatmap"]["dtype"] == "float16"
    assert unknown.status_code == 404 and "no convolution layer 'pool2'" in unknown.json()["error"]
    assert described["explain"]["gradcam_layer"] == "conv2" and "gradcam" in described["signatures"]


def test_grpc_api_key(repository, digit_files):
    from cnnkit.serving.core import InferenceCore
    from cnnkit.serving.grpc.server import build_server
    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(repository)
    store.refresh()
    server = build_server(InferenceCore(store), port=0, api_key="k3y")
    server.start()
    server.set_serving(True)
    port = server.port
    try:
        with GrpcClient(f"127.0.0.1:{port}", retry=Retry(attempts=1)) as client:
            assert client.health().ready  # health checks need no key
            with pytest.raises(AuthenticationError, match="API key"):
                client.predict(digit_files[0], model="digits")
            with pytest.raises(AuthenticationError):
                client.models()
        with GrpcClient(f"127.0.0.1:{port}", api_key="k3y") as client:
            assert client.predict(digit_files[0], model="digits").label
    finally:
        server.stop(grace=None)


# -- cnnkit score ----------------------------------------------------------------------------------

@pytest.fixture
def image_folder(digit_files, tmp_path):
    """Nested folders of digits (PNG and JPEG), a corrupt image and a file that is not an image."""
    root = tmp_path / "images"
    for index, path in enumerate(digit_files):
        folder = root / ("a/b" if index % 3 == 0 else "a" if index % 3 == 1 else "c")
        folder.mkdir(parents=True, exist_ok=True)
        if index % 4 == 0:
            Image.open(path).save(folder / f"{path.stem}.jpg", quality=95)
        else:
            shutil.copy(path, folder)
    (root / "c" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "a path was written twice"
    return {row["path"]: row for row in rows}


def test_score_writes_one_row_per_image_equal_to_a_direct_prediction(service, image_folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    status = score_main([str(image_folder), "--model", "digits", "--url", service.url, "--out", str(out),
                         "--top-k", "3", "--batch-size", "4", "--concurrency", "3", "--no-progress"])
    assert status == 0
    rows = read_csv(out)
    assert len(rows) == 13 and "a/notes.txt" not in rows
    assert "not an image" in rows["c/corrupt.png"]["error"] and rows["c/corrupt.png"]["label"] == ""
    summary = capsys.readouterr().out
    assert "scored 12 images, 1 errors, 0 already in the output" in summary
    with open_client("http", service) as client:
        for name in ("a/b/digit00.jpg", "a/digit01.png", "c/digit11.png"):
            direct = client.predict(image_folder / name, model="digits", top_k=3)
            assert rows[name]["top_labels"].split("|") == [c.label for c in direct.classes]
            np.testing.assert_allclose([float(p) for p in rows[name]["top_probabilities"].split("|")],
                                       [c.probability for c in direct.classes], rtol=1e-5)
            assert rows[name]["version"] == str(direct.version) and rows[name]["error"] == ""

    before = out.read_bytes()
    assert score_main([str(image_folder), "--model", "digits", "--url", service.url, "--out", str(out),
                       "--no-progress"]) == 0
    assert out.read_bytes() == before  # nothing rescored, nothing rewritten
    assert "scored 0 images, 0 errors, 13 already in the output" in capsys.readouterr().out


def test_grpc_and_local_scoring_write_what_http_writes(service, repository, image_folder, tmp_path):
    outputs = {}
    for name, where in (("http", ["--url", service.url]), ("grpc", ["--grpc", f"127.0.0.1:{service.grpc_port}"]),
                        ("local", ["--local", str(repository)])):
        outputs[name] = tmp_path / f"{name}.jsonl"
        # --local runs the service's code in-process: only the full `cnnkit score` offers it.
        score = cnnkit_main if name == "local" else score_main
        arguments = [str(image_folder), "--model", "digits", *where, "--out", str(outputs[name]), "--no-progress"]
        assert score(["score", *arguments] if name == "local" else arguments) == 0
    parsed = {name: sorted(json.loads(line)["path"] + json.dumps(json.loads(line)["top"])
                           for line in path.read_text().splitlines()) for name, path in outputs.items()}
    assert len(parsed["http"]) == 13
    assert parsed["http"] == parsed["local"]
    for http_row, grpc_row in zip(parsed["http"], parsed["grpc"], strict=True):  # gRPC scores are float32
        assert http_row.split("[")[0] == grpc_row.split("[")[0]


def test_an_interrupted_run_resumes_without_losing_or_repeating_rows(service, image_folder, tmp_path):
    for index in range(40):  # enough one-image requests to be killed in the middle
        shutil.copy(image_folder / "a" / "digit01.png", image_folder / "c" / f"copy{index:02d}.png")
    out = tmp_path / "scores.csv"
    command = [sys.executable, "-m", "cnnkit_client.scoring", str(image_folder), "--model", "digits",
               "--url", service.url, "--out", str(out), "--batch-size", "1", "--concurrency", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: out.exists() and out.read_text().count("\n") > 10)
    written = out.read_bytes()
    scored_before = len(read_csv(out))
    assert 10 <= scored_before < 53
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert out.read_bytes().startswith(written)  # only appended
    assert len(read_csv(out)) == 53
    assert f"{scored_before} already in the output" in finished.stdout


def test_a_torn_last_row_is_cut_and_that_image_scored_again(service, image_folder, tmp_path):
    out = tmp_path / "scores.jsonl"
    out.write_text('{"path": "a/digit01.png", "model": "digits", "version": 1, "label": "2"}\n{"path": "a/dig')
    assert score_main([str(image_folder), "--model", "digits", "--url", service.url, "--out", str(out),
                       "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 13 and len({line["path"] for line in lines}) == 13
    assert lines[0] == {"path": "a/digit01.png", "model": "digits", "version": 1, "label": "2"}  # kept as it was


def test_scoring_stops_when_the_service_is_unreachable_and_records_nothing(image_folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    status = score_main([str(image_folder), "--model", "digits", "--url", f"http://127.0.0.1:{free_port()}",
                         "--out", str(out), "--no-progress"])
    assert status == 1
    assert not out.exists()  # stopped before anything was scored or written
    assert "stopped early: Cannot reach" in capsys.readouterr().out


def test_scoring_refuses_an_unknown_model_and_a_foreign_output(service, image_folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert score_main([str(image_folder), "--model", "nope", "--url", service.url, "--out", str(out),
                       "--no-progress"]) == 2  # at once, before any image
    assert "Servable not found for request: Latest(nope); models: digits" in capsys.readouterr().err
    assert not out.exists()
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("name,score\nx,1\n")
    assert score_main([str(image_folder), "--model", "digits", "--url", service.url, "--out", str(foreign),
                       "--no-progress"]) == 2
    assert "not cnnkit's" in capsys.readouterr().err
    assert foreign.read_text() == "name,score\nx,1\n"
