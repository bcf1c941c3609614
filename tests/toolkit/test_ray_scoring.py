"""``cnnkit score --engine ray``: a local Ray cluster (2 CPUs, started by the run) scores 300 real
digits with a real model, writing the local engine's rows, and resumes like it."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, data_root):
    """The small convnet trained for 2 epochs on 8,000 digits (about 97-98%), exported."""
    from cnnkit.training.config import config_from_dict
    from cnnkit.training.export import export_run
    from cnnkit.training.train import train

    folder = tmp_path_factory.mktemp("ray")
    recipe = config_from_dict({
        "name": "digits", "dataset": "mnist", "model": "mnist_convnet", "channels": 1, "validation_size": 500,
        "train_limit": 8000, "test_limit": 500, "epochs": 2, "batch_size": 64, "learning_rate": 0.002,
    })
    run = train(recipe, run_dir=folder / "run", data_dir=data_root, verbose=0)
    export_run(run, name="digits", repository=folder / "model_repository", data_dir=data_root, check_accuracy=False)
    return folder / "model_repository"


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, data_root):
    from cnnkit.training.data import load_dataset

    folder = tmp_path_factory.mktemp("digits")
    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=300)
    for index, (image, label) in enumerate(zip(dataset.x_test, dataset.y_test, strict=True)):
        (folder / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / str(label) / f"{index:04d}.png")
    return folder


def _rows(path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def _score(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnkit", "score", *arguments, "--no-progress"],
                          capture_output=True, text=True, timeout=600)


def test_ray_scores_a_folder_like_the_local_engine_and_resumes(digits_model, digit_folder, tmp_path):
    ray_out, local_out = tmp_path / "ray.csv", tmp_path / "local.csv"
    answer = _score(str(digit_folder), "--model", "digits", "--local", str(digits_model), "--engine", "ray",
                    "--actors", "2", "--batch-size", "32", "--out", str(ray_out))
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "scored 300 images, 0 errors" in answer.stdout
    rows = _rows(ray_out)
    assert len(rows) == 300
    correct = sum(row["label"] == row["path"].split("/")[0] for row in rows.values())
    assert correct / 300 >= 0.97, correct
    # The same rows as the local engine, image for image.
    assert _score(str(digit_folder), "--model", "digits", "--local", str(digits_model),
                  "--out", str(local_out)).returncode == 0
    local = _rows(local_out)
    assert set(local) == set(rows)
    for path, row in rows.items():
        assert row["top_labels"] == local[path]["top_labels"] and row["version"] == local[path]["version"] == "1"
        assert float(row["probability"]) == pytest.approx(float(local[path]["probability"]), abs=1e-5)
    # Resume: a run cut short (the last 100 rows lost) scores only those again.
    lines = ray_out.read_text().splitlines(keepends=True)
    ray_out.write_text("".join(lines[:-100]))
    again = _score(str(digit_folder), "--model", "digits", "--local", str(digits_model), "--engine", "ray",
                   "--actors", "2", "--out", str(ray_out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "scored 100 images, 0 errors, 200 already in the output" in again.stdout
    assert _rows(ray_out).keys() == rows.keys() and len(ray_out.read_text().splitlines()) == 301


def test_ray_engine_errors_are_one_line(digits_model, digit_folder, tmp_path):
    needs_repository = _score(str(digit_folder), "--model", "digits", "--engine", "ray")
    assert needs_repository.returncode == 2 and "--local REPOSITORY" in needs_repository.stderr
    unknown = _score(str(digit_folder), "--model", "nope", "--local", str(digits_model), "--engine", "ray",
                     "--out", str(tmp_path / "x.csv"))
    assert unknown.returncode == 2 and "nope" in unknown.stderr and "Traceback" not in unknown.stderr
