"""The course's fast path for a frozen convolutional base: compute its features once, train the rest.

With a frozen base and no augmentation, every epoch would run the same images through the same
base again (VGG16 at 150x150 manages about 8 images/s for training on 2 CPU cores). Instead
:func:`feature_data` runs the base once over the training and validation images, keeps the
features on disk under the cache folder (``cache_dir`` setting), keyed by the sha256 of the base's
weights and of the images, and returns a small model made of the layers after the base, sharing
their weights with the full model. Training that head model trains the full model's head: the run's
checkpoints, evaluation and export all see the whole model, as without the fast path.

With augmentation (``feature_views``), the frozen base would otherwise see freshly augmented
images every epoch, the slow part of the course's augmented rung (4-6 min an epoch for VGG16 on 2
cores). Since the base is frozen, the features of an augmented image do not change from one epoch
to the next, so :func:`augmented_base_features` computes them once for ``views`` augmented copies
of every training image (each copy drawn with its own seed, each cached on its own, so an
interrupted computation resumes at the next copy), and each epoch trains the head on one copy of
each image, drawn at random. The head sees ``views`` distinct augmentations of each image instead
of one per epoch: for 30 epochs and 10 views, a third of the base's work.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit.errors import ConfigError
from cnnkit.io import atomic_write_bytes


def split_at_frozen_base(model: keras.Model, at_layer: str | None = None) -> tuple[keras.Model, keras.Model]:
    """(base, head): the base ends just before ``at_layer`` (default: the first layer with trainable
    weights), and every layer in it must be frozen; the head is a new model over the base's output
    made of the full model's own later layers (shared weights, so their trainable flags too)."""
    layers = model.layers
    first = next((index for index, layer in enumerate(layers) if layer.trainable_weights), None)
    if at_layer is not None:
        names = [layer.name for layer in layers]
        if at_layer not in names:
            raise ConfigError(f"feature_cache: {model.name} has no layer {at_layer!r}.")
        if first is not None and first < names.index(at_layer):
            raise ConfigError(f"feature_cache: the layers before {at_layer!r} must be frozen, but "
                              f"{layers[first].name!r} trains.")
        first = names.index(at_layer)
    if first is None or first < 2:
        raise ConfigError(f"feature_cache needs a model whose first layers are frozen; {model.name} has none.")
    split = layers[first - 1]
    base = keras.Model(model.inputs[0], split.output, name=f"{model.name}_base")
    inputs = keras.Input(shape=tuple(split.output.shape[1:]), name="features")
    x = inputs
    for layer in layers[first:]:
        x = layer(x)
    return base, keras.Model(inputs, x, name=f"{model.name}_head")


def _digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _cache_path(base: keras.Model, images: np.ndarray, cache_dir: Path, tag: str = "") -> Path:
    key = f"{_digest(base.get_weights())[:16]}-{_digest([images])[:16]}{tag}"
    return Path(cache_dir) / "features" / f"{base.name}-{key}.npy"


def _run_base(base: keras.Model, images: np.ndarray, batch_size: int, bar,
              augmentation: keras.Sequential | None = None) -> np.ndarray:
    parts = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype=np.float32)
        if augmentation is not None:
            batch = augmentation(batch, training=True)
        parts.append(np.asarray(base(batch, training=False)))
        bar.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros((0, *base.output.shape[1:]), np.float32)


def _save(path: Path, features: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write_bytes(path, buffer.getvalue())


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"{what}: base features", file=sys.stderr,
                disable=not sys.stderr.isatty())


def base_features(base: keras.Model, images: np.ndarray, cache_dir: Path, *, batch_size: int = 32,
                  what: str = "images") -> np.ndarray:
    """The base's outputs for ``images``, from the cache when the same weights saw the same images."""
    path = _cache_path(base, images, cache_dir)
    if path.is_file():
        print(f"[cnnkit] {what}: base features from the cache ({path.name})", file=sys.stderr)
        return np.load(path)
    started = time.perf_counter()
    with _progress(len(images), what) as bar:
        features = _run_base(base, images, batch_size, bar)
    _save(path, features)
    print(f"[cnnkit] {what}: {len(images)} images through the frozen base once in "
          f"{time.perf_counter() - started:.0f} s, cached as {path.name}", file=sys.stderr)
    return features


def augmented_base_features(base: keras.Model, images: np.ndarray, augmentation_for_view: Callable[[int], Any],
                            views: int, cache_dir: Path, *, tag: str, batch_size: int = 32,
                            what: str = "train") -> np.ndarray:
    """The base's outputs for ``views`` augmented copies of ``images``: shape (views, N, ...), float16.

    ``augmentation_for_view(view)`` gives the augmentation layers of one copy (seeded for that
    copy); ``tag`` names the augmentation settings in the cache key. Each copy is cached on its own."""
    if views < 1:
        raise ConfigError(f"views must be at least 1, got {views}.")
    paths = [_cache_path(base, images, cache_dir, f"-aug{tag}-view{view + 1}of{views}") for view in range(views)]
    cached = sum(path.is_file() for path in paths)
    if cached:
        print(f"[cnnkit] {what}: {cached} of {views} augmented views from the cache", file=sys.stderr)
    started = time.perf_counter()
    copies = []
    with _progress((views - cached) * len(images), f"{what}, {views} augmented views") as bar:
        for view, path in enumerate(paths):
            if path.is_file():
                copies.append(np.load(path))
                continue
            # Half precision: the copies of a deep split are large (VGG16's block4_pool, 81 KB an image).
            features = _run_base(base, images, batch_size, bar, augmentation_for_view(view)).astype(np.float16)
            _save(path, features)
            copies.append(features)
            if not bar.disable:
                continue
            # Without a terminal (a log file), one line per view says how far it got.
            print(f"[cnnkit] {what}: augmented view {view + 1} of {views} cached "
                  f"({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)
    if cached < views:
        print(f"[cnnkit] {what}: {(views - cached) * len(images)} augmented images through the frozen base in "
              f"{time.perf_counter() - started:.0f} s, cached", file=sys.stderr)
    return np.stack(copies)


def feature_data(model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, batch_size: int, cache_dir: Path, seed: int, *,
                 augmentation_for_view: Callable[[int], Any] | None = None, views: int = 0, tag: str = "",
                 split_at: str | None = None):
    """(head model, training dataset, validation dataset) of features instead of images; with
    ``views`` (and ``augmentation_for_view``), each epoch draws one augmented view of each image.
    ``split_at`` names the head's first layer (see :func:`split_at_frozen_base`)."""
    import tensorflow as tf

    base, head = split_at_frozen_base(model, split_at)
    val_features = base_features(base, x_val, cache_dir, what="validation")
    if views:
        if augmentation_for_view is None:
            raise ConfigError("Augmented feature views need the augmentation to draw them with.")
        copies = augmented_base_features(base, x_train, augmentation_for_view, views, cache_dir, tag=tag)
        table = tf.constant(copies.reshape((views * len(x_train), *copies.shape[2:])))
        labels = tf.constant(y_train)
        count = len(x_train)

        def draw(indices):
            # One view of each image in the batch, at random: the row of view v of image i is v * N + i.
            chosen = tf.random.uniform(tf.shape(indices), 0, views, dtype=tf.int64, seed=seed)
            return tf.cast(tf.gather(table, chosen * count + indices), tf.float32), tf.gather(labels, indices)

        train = (tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True)
                 .batch(batch_size).map(draw).prefetch(2))
        return head, train, tf.data.Dataset.from_tensor_slices((val_features, y_val)).batch(batch_size)
    train_features = base_features(base, x_train, cache_dir, what="train")
    train = (tf.data.Dataset.from_tensor_slices((train_features, y_train))
             .shuffle(len(train_features), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size).prefetch(2))
    val = tf.data.Dataset.from_tensor_slices((val_features, y_val)).batch(batch_size)
    return head, train, val
