"""Data loading: every layout of the data root, the validation split, pipelines and error paths."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.errors import DataError
from cnnkit.training import data

pytestmark = pytest.mark.data


def _check_split_arrays(dataset, shape, num_classes):
    for images, labels in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val),
                           (dataset.x_test, dataset.y_test)):
        assert images.dtype == np.uint8
        assert images.shape[1:] == shape
        assert len(images) == len(labels)
        assert labels.min() >= 0 and labels.max() == num_classes - 1
    assert dataset.num_classes == num_classes


@pytest.mark.parametrize(
    ("name", "shape", "train", "test"),
    [
        ("mnist", (28, 28, 1), 60000, 10000),
        ("fashion_mnist", (28, 28, 1), 60000, 10000),
        ("cifar10", (32, 32, 3), 50000, 10000),
    ],
)
def test_array_data_sets_have_the_standard_splits(data_root, name, shape, train, test):
    dataset = data.load_dataset(name, data_root, validation_size=5000)
    _check_split_arrays(dataset, shape, 10)
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (train - 5000, 5000, test)
    # Every class is present in the held-out validation split.
    assert len(np.unique(dataset.y_val)) == 10


def test_validation_split_is_fixed_by_the_seed(data_root):
    first = data.load_dataset("mnist", data_root, validation_size=1000, seed=7)
    again = data.load_dataset("mnist", data_root, validation_size=1000, seed=7)
    other = data.load_dataset("mnist", data_root, validation_size=1000, seed=8)
    np.testing.assert_array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.y_val, other.y_val)
    # The held-out images are not in the training split (compare raw bytes of each image).
    train_rows = {image.tobytes() for image in first.x_train[:20000]}
    overlap = sum(image.tobytes() in train_rows for image in first.x_val)
    assert overlap <= 2  # MNIST has a handful of exact duplicate digits, not more.


def test_data_root_comes_from_the_environment(data_root, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(data_root))
    dataset = data.load_dataset("fashion_mnist", None, validation_size=100, train_limit=50,
                                test_limit=30)
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (50, 100, 30)
    assert dataset.class_names[9] == "Ankle boot"


def test_cats_and_dogs_folder_is_resized_and_split(data_root):
    dataset = data.load_dataset("cats_and_dogs", data_root, validation_size=200, image_size=(24, 32))
    _check_split_arrays(dataset, (24, 32, 3), 2)
    assert dataset.class_names == ["cats", "dogs"]
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (1800, 200, 1000)
    assert dataset.unreadable == []
    assert np.bincount(dataset.y_test).tolist() == [500, 500]


def _write_folder(root: Path, sizes=((40, 30), (20, 50))):
    """A tiny folder data set with images of several sizes and two classes."""
    for split in ("train", "test"):
        for index, name in enumerate(("circle", "square")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(6):
                width, height = sizes[number % len(sizes)]
                colour = (200, 30 * index, 10) if index else (10, 100, 220)
                Image.new("RGB", (width, height), colour).save(folder / f"{number}.png")
    return root


def test_any_folder_of_class_folders_loads(tmp_path):
    root = _write_folder(tmp_path / "shapes")
    dataset = data.load_dataset("folder", None, dataset_path=root, image_size=(16, 16),
                                validation_size=2, channels=1)
    assert dataset.input_shape == (16, 16, 1)
    assert dataset.class_names == ["circle", "square"]
    assert (len(dataset.x_train), len(dataset.x_val), len(dataset.x_test)) == (10, 2, 12)


def test_unreadable_images_are_reported_not_dropped_silently(tmp_path, caplog):
    root = _write_folder(tmp_path / "shapes")
    broken = [root / "train" / "circle" / "broken.jpg", root / "test" / "square" / "empty.png"]
    broken[0].write_bytes(b"not a jpeg at all")
    broken[1].write_bytes(b"")
    with caplog.at_level("WARNING"):
        dataset = data.load_dataset("folder", None, dataset_path=root, image_size=(16, 16),
                                    validation_size=2)
    assert sorted(dataset.unreadable) == sorted(str(path) for path in broken)
    assert dataset.summary()["unreadable"] == dataset.unreadable
    assert "2 unreadable image(s)" in caplog.text or "1 unreadable image(s)" in caplog.text
    assert len(dataset.x_train) + len(dataset.x_val) == 12


def test_missing_data_root_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError, match="does not exist.*prepare.py"):
        data.load_dataset("mnist", tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "missing"),
    [("mnist", "mnist.npz"), ("fashion_mnist", "fashion-mnist"),
     ("cifar10", "cifar-10-batches-py"), ("cats_and_dogs", "cats_and_dogs_filtered")],
)
def test_an_empty_data_root_names_the_missing_file(tmp_path, name, missing):
    with pytest.raises(DataError, match=f"{missing}.*is missing.*prepare.py"):
        data.load_dataset(name, tmp_path, image_size=(16, 16))


def test_missing_cifar_batch_is_named(tmp_path, data_root):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for index in range(1, 5):
        os.symlink(data_root / "cifar-10-batches-py" / f"data_batch_{index}", folder / f"data_batch_{index}")
    with pytest.raises(DataError, match="data_batch_5 is missing"):
        data.load_dataset("cifar10", tmp_path)


def test_malformed_mnist_npz_is_reported(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="mnist.npz is malformed"):
        data.load_dataset("mnist", tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) y_train, x_test, y_test"):
        data.load_dataset("mnist", tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 28, 28), np.float32), y_train=np.zeros(3),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2))
    with pytest.raises(DataError, match="expected uint8 images"):
        data.load_dataset("mnist", tmp_path)


def test_truncated_idx_file_is_reported(tmp_path, data_root):
    folder = tmp_path / "fashion-mnist"
    shutil.copytree(data_root / "fashion-mnist", folder)
    target = folder / "t10k-images-idx3-ubyte.gz"
    with gzip.open(target, "rb") as handle:
        content = handle.read()
    with gzip.open(target, "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is not a valid IDX file.*bytes"):
        data.load_dataset("fashion_mnist", tmp_path)


def test_corrupt_cifar_batch_is_reported(tmp_path, data_root):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(data_root / "cifar-10-batches-py", folder)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch is not a valid CIFAR-10 batch"):
        data.load_dataset("cifar10", tmp_path)


def test_unknown_data_set_lists_the_known_ones(data_root):
    with pytest.raises(DataError, match="Unknown data set 'svhn'.*cifar10.*mnist"):
        data.load_dataset("svhn", data_root)


def test_validation_size_larger_than_the_data_is_refused(data_root):
    with pytest.raises(DataError, match="validation_size must be between"):
        data.load_dataset("mnist", data_root, validation_size=60000)


@pytest.mark.parametrize("name", ["mnist", "cats_and_dogs"])
def test_no_network_for_a_download_points_at_data_dir(tmp_path, name):
    # A subprocess, because Keras reads KERAS_HOME (its download cache) once, at import.
    env = {key: value for key, value in os.environ.items() if key != "CNNKIT_DATA_DIR"}
    env.update(KERAS_HOME=str(tmp_path / "keras-home"), TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "from cnnkit.training.data import load_dataset\n"
        f"load_dataset({name!r}, None, image_size=(16, 16))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "DataError: Could not download" in result.stderr
    assert "--data-dir" in result.stderr


def test_pipeline_batches_uint8_into_float_and_augments_only_when_asked():
    import tensorflow as tf

    images = np.arange(10 * 8 * 8 * 1, dtype=np.int64).reshape(10, 8, 8, 1).astype(np.uint8)
    labels = np.arange(10)
    plain = list(data.make_pipeline(images, labels, 4))
    assert [len(batch_labels) for _, batch_labels in plain] == [4, 4, 2]
    first_images, first_labels = plain[0]
    assert first_images.dtype == tf.float32
    np.testing.assert_array_equal(first_images.numpy(), images[:4].astype(np.float32))
    np.testing.assert_array_equal(first_labels.numpy(), labels[:4])

    shuffled = np.concatenate([b.numpy() for _, b in data.make_pipeline(images, labels, 4, shuffle=True)])
    assert sorted(shuffled.tolist()) == labels.tolist() and shuffled.tolist() != labels.tolist()

    flip = tf.keras.layers.RandomFlip("horizontal_and_vertical", seed=1)
    augmented = np.concatenate(
        [b.numpy() for b, _ in data.make_pipeline(images, labels, 10, augmentation=flip)]
    )
    assert augmented.shape == (10, 8, 8, 1) and not np.array_equal(augmented, images)
