"""Turn what callers hold (paths, bytes, PIL images, numpy arrays) into encoded image files.

The SDK sends image *files* (the original bytes, or lossless PNG for pixels it was handed); the
service decodes and resizes them with the model's own rules, so no preprocessing happens here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from cnnkit_client.errors import InvalidInputError

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]
"""A path, encoded file bytes, a ``PIL.Image.Image`` or a uint8-range numpy array (H, W[, C])."""


def _is_pil(image: Any) -> bool:
    module = type(image).__module__
    return module.startswith("PIL.") and hasattr(image, "save")


def _pixels_to_png(array: np.ndarray) -> bytes:
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidInputError(f"An image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise InvalidInputError(f"An image array must hold numbers, got dtype {array.dtype}.")
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 255
                           or not np.array_equal(array, np.round(array))):
            raise InvalidInputError(
                "An image array must hold raw pixel values: whole numbers in 0..255 (the model rescales "
                "inside); this one does not (already normalised to 0..1?)."
            )
        array = array.astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(image: ImageLike) -> bytes:
    """One image as encoded file bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidInputError("An image is empty (0 bytes).")
        return data
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InvalidInputError(f"Cannot read image file {path}: {error.strerror or error}.") from error
        if not data:
            raise InvalidInputError(f"Image file {path} is empty.")
        return data
    if isinstance(image, np.ndarray):
        return _pixels_to_png(image)
    if _is_pil(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInputError(
        f"Cannot send a {type(image).__name__} as an image: pass a path, file bytes, a PIL image or a numpy array."
    )


def encode_images(images: ImageLike | Sequence[ImageLike]) -> tuple[list[bytes], bool]:
    """Encoded files for one image or many, and whether a single image was given.

    A list or tuple, or a 4-D array (N, H, W, C), is many images; anything else is one.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInputError("No images given.")
        return [encode_image(image) for image in images], False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if not len(images):
            raise InvalidInputError("No images given (the array has 0 rows).")
        return [_pixels_to_png(image) for image in images], False
    return [encode_image(images)], True


def chunks(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[start:start + size] for start in range(0, len(items), size)]
