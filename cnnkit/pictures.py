"""Pictures of images and activations, with numpy, Pillow and matplotlib only (no TensorFlow).

Feature-map grids, Grad-CAM overlays (jet, alpha 0.4, as the course draws them) and filter-pattern
grids are all drawn here, so the toolkit and the service show the same pictures.

The feature-map grid is drawn the course's way: each channel standardised on its own, scaled to
a grey level around 128, clipped, then coloured with viridis, 16 channels to a row. The serving
side draws its grids with the same function, so the toolkit and the service show the same picture.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CHANNELS_PER_ROW = 16


def _colour_lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _viridis_lut() -> np.ndarray:
    return _colour_lut("viridis")


def display_scale(height: int, width: int, minimum: int) -> int:
    """The whole-number enlargement that makes an image at least ``minimum`` pixels on its long side."""
    return max(1, int(np.ceil(minimum / max(height, width, 1))))


def _rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must have shape (height, width[, 1 or 3]), got {np.asarray(image).shape}.")
    return np.clip(array, 0, 255).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4,
                    minimum_size: int = 224) -> Image.Image:
    """A class heatmap in the jet colour map laid over the image with opacity ``alpha``.

    ``image`` is (H, W[, C]) uint8-range pixels and ``heatmap`` (h, w) values in [0, 1] (any
    resolution: it is resized bilinearly). Small images are enlarged (nearest neighbour) to at
    least ``minimum_size`` pixels so that a 28×28 digit is visible.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    pixels = _rgb(image)
    values = np.asarray(heatmap, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"heatmap must have shape (height, width), got {values.shape}.")
    scale = display_scale(pixels.shape[0], pixels.shape[1], minimum_size)
    size = (pixels.shape[1] * scale, pixels.shape[0] * scale)
    base = Image.fromarray(pixels, mode="RGB").resize(size, Image.Resampling.NEAREST)
    values = np.nan_to_num(np.clip(values, 0.0, 1.0))
    smooth = np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR))
    levels = (np.clip(smooth, 0.0, 1.0) * 255).round().astype(np.uint8)
    jet = _colour_lut("jet")[levels].astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * jet
    return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8), mode="RGB")


def pattern_grid(patterns: np.ndarray, *, columns: int = 8, minimum_cell: int = 64, gap: int = 2) -> Image.Image:
    """Filter patterns (F, H, W, C) uint8 tiled into a grid, ``columns`` to a row, on black."""
    array = np.asarray(patterns)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[0] < 1 or array.shape[3] not in (1, 3):
        shape = np.asarray(patterns).shape
        raise ValueError(f"patterns must have shape (filters, height, width, 1 or 3), got {shape}.")
    if columns < 1:
        raise ValueError("columns must be at least 1.")
    count, height, width, _ = array.shape
    scale = display_scale(height, width, minimum_cell)
    columns = min(columns, count)
    rows = int(np.ceil(count / columns))
    cell_h, cell_w = height * scale, width * scale
    canvas = np.zeros((rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap, 3), np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        cell = _rgb(array[index])
        if scale > 1:
            cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
        top, left = row * (cell_h + gap), column * (cell_w + gap)
        canvas[top : top + cell_h, left : left + cell_w] = cell
    return Image.fromarray(canvas, mode="RGB")


def standardize_channel(channel: np.ndarray) -> np.ndarray:
    """One activation channel as uint8 grey levels: (x - mean) / std * 64 + 128, clipped.

    A constant channel (std 0) becomes uniform grey 128 rather than dividing by zero.
    """
    values = np.asarray(channel, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    std = values.std()
    centred = values - values.mean()
    if std > 1e-12:
        centred = centred / std
    return np.clip(centred * 64 + 128, 0, 255).astype(np.uint8)


def feature_map_grid(
    activations: np.ndarray,
    *,
    channels_per_row: int = CHANNELS_PER_ROW,
    scale: int = 0,
    gap: int = 1,
) -> Image.Image:
    """Tile the channels of one layer's activations ``(H, W, C)`` into a viridis grid image.

    ``scale`` enlarges each cell (nearest neighbour); 0 picks a scale that makes cells at least
    48 px wide, so that small maps stay visible. Cells are separated by ``gap`` dark pixels.
    """
    array = np.asarray(activations)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"activations must have shape (height, width, channels), got {array.shape}.")
    if channels_per_row < 1:
        raise ValueError("channels_per_row must be at least 1.")
    height, width, channels = array.shape
    if scale <= 0:
        scale = display_scale(height, width, 48)
    columns = min(channels_per_row, channels)
    rows = int(np.ceil(channels / columns))
    cell_h, cell_w = height * scale, width * scale
    canvas = np.zeros(
        (rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap), dtype=np.uint8
    )
    filled = np.zeros_like(canvas, dtype=bool)
    for index in range(channels):
        row, column = divmod(index, columns)
        cell = standardize_channel(array[:, :, index])
        cell = np.kron(cell, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else cell
        top, left = row * (cell_h + gap), column * (cell_w + gap)
        canvas[top : top + cell_h, left : left + cell_w] = cell
        filled[top : top + cell_h, left : left + cell_w] = True
    rgb = _viridis_lut()[canvas]
    rgb[~filled] = (20, 20, 20)
    return Image.fromarray(rgb, mode="RGB")


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
