"""Turning any decoded picture into the uint8 pixels a model takes (shared by training and serving).

Both training (image folders) and the service (uploaded files) go through :func:`to_model_pixels`, so
a photo is converted the same way whichever side sees it: EXIF orientation applied, 16-bit and
float images scaled to 8 bits, palette and alpha images flattened onto white, then grey or RGB, then
resized (bilinear) to the model's height and width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit ("I;16", "I") and float ("F") images scaled into 0..255 grey."""
    array = np.asarray(image)
    if image.mode == "F":
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(finite.min()), float(finite.max())
        scaled = (finite - low) / (high - low) * 255 if high > low else np.zeros_like(finite)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    # Integer images: 16-bit data lives in 0..65535, so keep the high byte.
    maximum = 65535 if image.mode.startswith("I") else 255
    return Image.fromarray((array.astype(np.float64) * 255 / maximum).round().astype(np.uint8), mode="L")


def to_model_pixels(image: Image.Image, size: Sequence[int], channels: int) -> np.ndarray:
    """``image`` as a uint8 array (height, width, channels) for a model of that input size."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = int(size[0]), int(size[1])
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array
