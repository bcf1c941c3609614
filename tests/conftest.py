"""Shared fixtures: the prepared data root, tiny recipes and quiet TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPOSITORY.parent / "shared" / "datasets"


def _prepared_data_root() -> Path:
    """CNNKIT_DATA_DIR when set, else .data/ prepared from ../shared/datasets on first use."""
    configured = os.environ.get("CNNKIT_DATA_DIR")
    if configured:
        return Path(configured)
    root = REPOSITORY / ".data"
    if not (root / "MANIFEST.json").is_file():
        prepare = SHARED_DATASETS / "prepare.py"
        if not prepare.is_file():
            pytest.fail(
                "No data root: set CNNKIT_DATA_DIR or provide ../shared/datasets/prepare.py "
                "(scripts/test.sh does this)."
            )
        subprocess.run([sys.executable, str(prepare), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _prepared_data_root()
    for required in ("mnist.npz", "fashion-mnist", "cifar-10-batches-py", "cats_and_dogs_filtered"):
        if not (root / required).exists():
            pytest.fail(f"The data root {root} has no {required}.")
    return root


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No data root and an empty Keras cache: loaders must fall back to (failing) downloads."""
    monkeypatch.delenv("CNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory, data_root):
    """A LeNet-5 trained for one epoch on 1,000 MNIST digits: a real run directory in seconds."""
    from cnnkit.training.config import config_from_dict
    from cnnkit.training.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    recipe = config_from_dict({
        "name": "tiny_digits", "dataset": "mnist", "model": "lenet5", "channels": 1,
        "validation_size": 200, "train_limit": 1000, "test_limit": 300, "epochs": 1,
        "batch_size": 64, "learning_rate": 0.003,
    })
    return train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0)


@pytest.fixture(scope="session")
def digits_repository(tiny_digits_run, tmp_path_factory, data_root):
    """A model repository holding the tiny digits model as ``digits`` version 1."""
    from cnnkit.training.export import export_run

    repository = tmp_path_factory.mktemp("serving") / "model_repository"
    export_run(tiny_digits_run, name="digits", repository=repository, data_dir=data_root,
               check_accuracy=False)
    return repository
