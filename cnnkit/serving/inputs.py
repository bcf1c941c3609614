"""Decoding and validating what clients send: image files, base64 strings and numeric tensors.

Everything here is plain Python + numpy + Pillow and raises :mod:`cnnkit.errors` exceptions with a
message for the caller; nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cnnkit.errors import InvalidInputError, PayloadTooLargeError
from cnnkit.images import to_model_pixels


@dataclass(frozen=True)
class InputLimits:
    """What one request may carry. The defaults suit images up to phone-camera size."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # decoded width × height; guards against decompression bombs
    max_batch: int = 64


DEFAULT_LIMITS = InputLimits()


def decode_image(
    data: bytes, input_shape: Sequence[int], limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """An encoded image (JPEG, PNG, BMP, GIF, WebP, TIFF...) as uint8 pixels of ``input_shape``."""
    if not data:
        raise InvalidInputError("The image is empty (0 bytes).")
    if len(data) > limits.max_body_bytes:
        raise PayloadTooLargeError(
            f"The image is {len(data)} bytes; the limit is {limits.max_body_bytes} bytes."
        )
    height, width, channels = (int(size) for size in input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.size[0] * image.size[1]
            if pixels > limits.max_image_pixels:
                raise PayloadTooLargeError(
                    f"The image is {image.size[0]}x{image.size[1]} pixels; the limit is "
                    f"{limits.max_image_pixels} pixels."
                )
            image.load()  # Decode now, so truncated and corrupt files fail here.
            return to_model_pixels(image, (height, width), channels)
    except PayloadTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PayloadTooLargeError(f"The image is too large to decode safely: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise InvalidInputError(
            "The data is not an image Pillow can read (JPEG, PNG, BMP, GIF, WebP, TIFF)."
        ) from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InvalidInputError(f"The image is truncated or corrupt: {error}") from error


def check_count(count: int, limits: InputLimits = DEFAULT_LIMITS) -> None:
    """Refuse an empty request or one with more images than ``limits.max_batch``."""
    if count == 0:
        raise InvalidInputError("The batch is empty.")
    if count > limits.max_batch:
        raise PayloadTooLargeError(f"{count} images in one request; the limit is {limits.max_batch}.")


def decode_images(
    encoded: Sequence[bytes], input_shape: Sequence[int], limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Several encoded image files as one validated float32 batch (N, H, W, C)."""
    check_count(len(encoded), limits)
    return np.stack([decode_image(data, input_shape, limits) for data in encoded]).astype(np.float32)


def decode_base64(text: Any) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional) to bytes."""
    if not isinstance(text, str):
        raise InvalidInputError(f"Expected a base64 string, got {type(text).__name__}.")
    cleaned = "".join(text.split())
    if cleaned.startswith("data:") and "," in cleaned:  # a data URL
        cleaned = cleaned.split(",", 1)[1]
    cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInputError(f"Malformed base64: {error}") from error


def check_batch(
    array: np.ndarray, input_shape: Sequence[int], limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """A numeric batch (N, H, W, C) or one image (H, W, C) as float32 (N, H, W, C), validated.

    Pixel values must be finite and within 0..255 (the models take raw pixels and rescale inside).
    """
    expected = tuple(int(size) for size in input_shape)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidInputError(f"The tensor must be numeric, got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.complexfloating) or array.dtype == bool:
        raise InvalidInputError(f"The tensor must hold real pixel values, got dtype {array.dtype}.")
    if array.ndim == len(expected):
        array = array[None]
    if array.ndim != len(expected) + 1:
        raise InvalidInputError(
            f"The tensor must have shape (batch, {', '.join(map(str, expected))}) or "
            f"({', '.join(map(str, expected))}), got {tuple(array.shape)}."
        )
    if tuple(array.shape[1:]) != expected:
        raise InvalidInputError(
            f"Each image must have shape {expected} (height, width, channels), got {tuple(array.shape[1:])}."
        )
    check_count(len(array), limits)
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise InvalidInputError("The tensor contains NaN or infinite values.")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInputError(
            f"Pixel values must be raw 0..255 (the model rescales itself); got "
            f"{float(values.min()):g}..{float(values.max()):g}."
        )
    return values


def tensor_from_json(
    value: Any, input_shape: Sequence[int], limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Nested JSON number lists as a validated float32 batch."""
    if not isinstance(value, list | np.ndarray):
        raise InvalidInputError(f"Expected a nested list of numbers, got {type(value).__name__}.")
    # The body-size limit bounds how many numbers can arrive; the batch limit is checked here.
    expected = math.prod(int(size) for size in input_shape)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise InvalidInputError(f"The tensor is ragged or holds non-numbers: {error}") from error
    if array.size > expected * limits.max_batch:
        raise PayloadTooLargeError(
            f"The tensor holds {array.size} values, more than {limits.max_batch} images of "
            f"{tuple(input_shape)}; the limit is {limits.max_batch} images."
        )
    return check_batch(array, input_shape, limits)


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int = 5) -> list[list[dict[str, Any]]]:
    """For each row, the ``k`` most probable classes (highest first) with names and probabilities."""
    if k < 1:
        raise InvalidInputError(f"top_k must be at least 1, got {k}.")
    rows = np.asarray(probabilities, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(class_names):
        raise ValueError(f"probabilities of shape {rows.shape} do not fit {len(class_names)} classes.")
    k = min(k, rows.shape[1])
    # A stable sort on the negated values keeps the lower class index first among ties.
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    return [
        [{"class": class_names[index], "index": int(index), "probability": float(row[index])}
         for index in indices]
        for row, indices in zip(rows, order, strict=True)
    ]
