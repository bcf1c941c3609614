"""Loading the course's data sets as uint8 arrays, and turning them into tf.data pipelines.

A *data root* holds the standard layouts that the public downloads unpack to::

    DATA_ROOT/mnist.npz
    DATA_ROOT/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    DATA_ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    DATA_ROOT/cats_and_dogs_filtered/{train,validation}/{cats,dogs}/*.jpg

It is given by ``--data-dir`` or the ``CNNKIT_DATA_DIR`` environment variable. With neither set,
the normal Keras downloads are used. Local files are read directly, never through the stock Keras
loaders, whose hash check rejects (and deletes) copies whose bytes differ from the official ones.

Images stay uint8 in memory; models rescale inside themselves, so the same raw pixels go to
training, export and serving.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnkit.errors import DataError

if TYPE_CHECKING:
    from cnnkit.training.config import RecipeConfig

logger = logging.getLogger(__name__)

PREPARE_HINT = (
    "Prepare a data root with `python ../shared/datasets/prepare.py DEST` (or download the data "
    "set into it) and pass it with --data-dir DEST or CNNKIT_DATA_DIR=DEST."
)
CATS_AND_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


@dataclass
class ImageDataset:
    """Train, validation and test splits of one data set, as uint8 images and int labels."""

    name: str
    class_names: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # Files that could not be decoded and were left out, so that callers can report them.
    unreadable: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "classes": self.class_names,
            "input_shape": list(self.input_shape),
            "train": len(self.x_train),
            "validation": len(self.x_val),
            "test": len(self.x_test),
            "unreadable": self.unreadable,
        }


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data root from the option, else the ``data_dir`` setting (``CNNKIT_DATA_DIR``), else
    None (downloads)."""
    if data_dir:
        chosen: str | os.PathLike | None = data_dir
    else:
        from cnnkit.settings import load_settings

        chosen = load_settings().data_dir
    if chosen is None:
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise DataError(f"Data root {root} does not exist or is not a directory. {PREPARE_HINT}")
    return root


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"The data root has no {what}: {path} is missing. {PREPARE_HINT}")
    return path


def _download_failed(name: str, error: Exception) -> DataError:
    return DataError(
        f"Could not download the {name} data set ({type(error).__name__}: {error}). This machine "
        f"may have no network access to the data set host: use a local copy instead. {PREPARE_HINT}"
    )


# --------------------------------------------------------------------------------------------
# Readers of the standard layouts.
# --------------------------------------------------------------------------------------------

def _check_images(array: np.ndarray, labels: np.ndarray, source: Path | str, rank: int) -> None:
    if array.dtype != np.uint8 or array.ndim != rank:
        raise DataError(
            f"{source} is malformed: expected uint8 images of rank {rank}, got {array.dtype} "
            f"with shape {array.shape}. {PREPARE_HINT}"
        )
    if len(array) != len(labels):
        raise DataError(
            f"{source} is malformed: {len(array)} images but {len(labels)} labels. {PREPARE_HINT}"
        )


def read_mnist_npz(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read ``mnist.npz`` (keys x_train, y_train, x_test, y_test) with plain numpy."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} is malformed: missing array(s) {', '.join(missing)}. {PREPARE_HINT}"
                )
            arrays = {key: archive[key] for key in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path} is malformed or unreadable ({error}). {PREPARE_HINT}") from error
    for split in ("train", "test"):
        _check_images(arrays[f"x_{split}"], arrays[f"y_{split}"], path, rank=3)
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file (the original MNIST / Fashion-MNIST format)."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"bad magic number {data[:4].hex()}")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        expected = int(np.prod(dims)) + 4 + 4 * ndim
        if len(data) != expected:
            raise ValueError(f"{len(data)} bytes where the header announces {expected}")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as error:
        raise DataError(f"{path} is not a valid IDX file ({error}). {PREPARE_HINT}") from error


def read_fashion_mnist(folder: Path):
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_require(folder / f"{prefix}-images-idx3-ubyte.gz", "Fashion-MNIST"))
        labels = read_idx(_require(folder / f"{prefix}-labels-idx1-ubyte.gz", "Fashion-MNIST"))
        _check_images(images, labels, folder, rank=3)
        splits.append((images, labels))
    return splits[0], splits[1]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The CIFAR-10 "python version" is a set of pickles: that is the data set's own format, read
    # here only from a data root the user chose.
    try:
        with open(_require(path, "CIFAR-10 batch"), "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.uint8)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a malformed file.
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({error}). {PREPARE_HINT}") from error
    return np.ascontiguousarray(images), labels


def read_cifar10(folder: Path):
    parts = [_read_cifar_batch(folder / f"data_batch_{index}") for index in range(1, 6)]
    x_train = np.concatenate([images for images, _ in parts])
    y_train = np.concatenate([labels for _, labels in parts])
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    return (x_train, y_train), (x_test, y_test)


def _load_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    from cnnkit.images import to_model_pixels

    with Image.open(path) as image:
        return to_model_pixels(image, size, channels)


def list_class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist. {PREPARE_HINT}")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(
            f"Image folder {folder} has no class sub-folders: expected one sub-folder per class "
            f"(for example {folder}/cats and {folder}/dogs)."
        )
    return classes


def read_image_folder(
    folder: Path,
    image_size: Sequence[int],
    channels: int = 3,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Read a folder of class sub-folders, resizing every image to ``image_size`` (H, W).

    Returns images, labels, class names and the paths of files that could not be decoded: those
    are left out, and the caller reports them (count and paths) rather than dropping them silently.
    """
    classes = list(class_names) if class_names is not None else list_class_folders(folder)
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_folder = folder / name
        if not class_folder.is_dir():
            raise DataError(f"Image folder {folder} has no sub-folder for class {name!r}.")
        for path in sorted(class_folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise DataError(f"Image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")

    height, width = int(image_size[0]), int(image_size[1])

    def load(path: Path) -> np.ndarray | None:
        try:
            return _load_image(path, (height, width), channels)
        except Exception:  # noqa: BLE001 - any decoding failure marks the file unreadable.
            return None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        decoded = list(pool.map(load, paths))
    unreadable = [str(path) for path, image in zip(paths, decoded, strict=True) if image is None]
    keep = [index for index, image in enumerate(decoded) if image is not None]
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (" ..." if len(unreadable) > 10 else "")
        logger.warning("%d unreadable image(s) in %s were left out: %s", len(unreadable), folder, shown)
    if not keep:
        raise DataError(f"None of the {len(paths)} images in {folder} could be decoded.")
    images = np.stack([image for image in decoded if image is not None]).astype(np.uint8)
    label_array = np.asarray([labels[index] for index in keep], dtype=np.int64)
    return images, label_array, classes, unreadable


# --------------------------------------------------------------------------------------------
# Named data sets.
# --------------------------------------------------------------------------------------------

def _keras_download(name: str):
    import keras

    loader = {
        "mnist": keras.datasets.mnist.load_data,
        "fashion_mnist": keras.datasets.fashion_mnist.load_data,
        "cifar10": keras.datasets.cifar10.load_data,
    }[name]
    try:
        (x_train, y_train), (x_test, y_test) = loader()
    except Exception as error:  # noqa: BLE001 - Keras raises plain Exception on fetch failures.
        raise _download_failed(name, error) from error
    return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))


def _cats_and_dogs_root(root: Path | None) -> Path:
    if root is not None:
        return _require(root / "cats_and_dogs_filtered", "cats_and_dogs_filtered folder")
    import keras

    try:
        archive = keras.utils.get_file(
            "cats_and_dogs_filtered.zip", origin=CATS_AND_DOGS_URL, extract=True
        )
    except Exception as error:  # noqa: BLE001
        raise _download_failed("cats_and_dogs_filtered", error) from error
    extracted = Path(archive)
    candidates = [extracted / "cats_and_dogs_filtered", extracted]
    for candidate in candidates:
        if (candidate / "train").is_dir():
            return candidate
    raise DataError(f"The downloaded archive at {archive} does not hold train/ and validation/.")


def _array_dataset(name: str, root: Path | None):
    if root is None:
        return _keras_download(name)
    if name == "mnist":
        return read_mnist_npz(_require(root / "mnist.npz", "mnist.npz"))
    if name == "fashion_mnist":
        return read_fashion_mnist(_require(root / "fashion-mnist", "fashion-mnist folder"))
    return read_cifar10(_require(root / "cifar-10-batches-py", "cifar-10-batches-py folder"))


ARRAY_DATASETS = {
    "mnist": MNIST_CLASSES,
    "fashion_mnist": FASHION_MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}
FOLDER_DATASETS = {"cats_and_dogs": "cats_and_dogs_filtered"}


def list_datasets() -> list[str]:
    return sorted([*ARRAY_DATASETS, *FOLDER_DATASETS, "folder"])


def split_validation(
    x: np.ndarray, y: np.ndarray, validation_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``validation_size`` training examples, chosen by a fixed-seed permutation."""
    if validation_size < 0 or validation_size >= len(x):
        raise DataError(
            f"validation_size must be between 0 and {len(x) - 1} for {len(x)} training images, "
            f"got {validation_size}."
        )
    order = np.random.default_rng(seed).permutation(len(x))
    val_index, train_index = order[:validation_size], order[validation_size:]
    return x[train_index], y[train_index], x[val_index], y[val_index]


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int):
    """A fixed-seed subset, for quick runs and tests; None keeps everything."""
    if limit is None or limit >= len(x):
        return x, y
    index = np.sort(np.random.default_rng(seed + 1).permutation(len(x))[:limit])
    return x[index], y[index]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = 5000,
    image_size: Sequence[int] | None = None,
    channels: int = 3,
    dataset_path: str | os.PathLike | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 1337,
) -> ImageDataset:
    """Load a data set by name, with a fixed-seed validation split held out of the training set.

    ``mnist``, ``fashion_mnist`` and ``cifar10`` come from the data root (or the Keras downloads).
    ``cats_and_dogs`` is ``cats_and_dogs_filtered``: its ``validation/`` folder serves as the test
    set and ``validation_size`` images of ``train/`` are held out for validation. ``folder`` reads
    ``dataset_path`` (``train/`` and ``test/`` or ``validation/`` sub-folders of class folders).
    Folder images are resized to ``image_size``.
    """
    root = resolve_data_dir(data_dir)
    unreadable: list[str] = []
    if name in ARRAY_DATASETS:
        class_names = list(ARRAY_DATASETS[name])
        (x_train, y_train), (x_test, y_test) = _array_dataset(name, root)
        if x_train.ndim == 3:
            x_train, x_test = x_train[..., None], x_test[..., None]
    elif name in FOLDER_DATASETS or name == "folder":
        if image_size is None:
            raise DataError(f"The {name} data set needs an image_size (height, width).")
        if name == "folder":
            if dataset_path is None:
                raise DataError("The folder data set needs a dataset_path.")
            base = Path(dataset_path).expanduser()
            if not base.is_absolute() and root is not None and (root / base).is_dir():
                base = root / base
        else:
            base = _cats_and_dogs_root(root)
        test_folder = next(
            (base / sub for sub in ("test", "validation") if (base / sub).is_dir()), None
        )
        if test_folder is None:
            raise DataError(f"{base} needs a test/ or validation/ folder beside train/.")
        x_train, y_train, class_names, bad_train = read_image_folder(
            base / "train", image_size, channels
        )
        x_test, y_test, _, bad_test = read_image_folder(
            test_folder, image_size, channels, class_names=class_names
        )
        unreadable = bad_train + bad_test
    else:
        raise DataError(f"Unknown data set {name!r}; available: {', '.join(list_datasets())}.")

    y_train = np.asarray(y_train, dtype=np.int64).reshape(-1)
    y_test = np.asarray(y_test, dtype=np.int64).reshape(-1)
    if y_train.size and (y_train.min() < 0 or y_train.max() >= len(class_names)):
        raise DataError(f"{name}: training labels fall outside 0..{len(class_names) - 1}.")
    x_train, y_train, x_val, y_val = split_validation(x_train, y_train, validation_size, seed)
    x_train, y_train = _limit(x_train, y_train, train_limit, seed)
    x_test, y_test = _limit(x_test, y_test, test_limit, seed)
    return ImageDataset(
        name=name,
        class_names=class_names,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        unreadable=unreadable,
    )


def load_recipe_dataset(config: RecipeConfig, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """The data set a recipe trains on: its splits, image size, channels and limits, from ``data_dir``.

    Training, evaluation and export all load a run's data through this, so they see the same images.
    """
    return load_dataset(
        config.dataset,
        data_dir,
        validation_size=config.validation_size,
        image_size=config.image_size,
        channels=config.channels,
        dataset_path=config.dataset_path,
        train_limit=config.train_limit,
        test_limit=config.test_limit,
        seed=config.seed,
    )


def make_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    augmentation=None,
    seed: int = 1337,
):
    """A tf.data pipeline: shuffle (each epoch), batch, augment on the fly, prefetch.

    Images travel as uint8 and become float32 pixel values (0..255) per batch; the model rescales.
    Only the indices are shuffled and batched; each batch is then gathered from the image array in
    one vectorised op, which costs far less than shuffling the images one by one.
    """
    import tensorflow as tf

    image_table = tf.constant(images)
    label_table = tf.constant(labels)
    count = len(images)
    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)

    def gather(batch_indices):
        batch_images = tf.cast(tf.gather(image_table, batch_indices), tf.float32)
        return batch_images, tf.gather(label_table, batch_indices)

    dataset = indices.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    if augmentation is not None:

        def augment(batch_images, batch_labels):
            return augmentation(batch_images, training=True), batch_labels

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
