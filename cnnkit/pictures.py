"""Pictures of images and activations, with numpy, Pillow and matplotlib only (no TensorFlow).

Feature-map grids, Grad-CAM overlays (jet, alpha 0.4, as the course draws them) and filter-pattern
grids are all drawn here, so the toolkit and the service show the same pictures. Each comes in two
forms: the bare tiles (``feature_map_grid``, ``heatmap_overlay``, ``pattern_grid``), and the figure
people look at, which explains itself (``feature_map_figure``, ``gradcam_figure``,
``pattern_figure``): a title naming the model and layer, numbered tiles, and a colour scale or a
legend. Text is drawn with Pillow's built-in scalable font, so the service needs no font files.

The feature-map grid is drawn the course's way: each channel standardised on its own, scaled to
a grey level around 128, clipped, then coloured with viridis, 16 channels to a row. The serving
side draws its grids with the same function, so the toolkit and the service show the same picture.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


# Figures that explain themselves ------------------------------------------------------------------

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
DEAD_MARK = (230, 40, 40)
TITLE_SIZE = 14
LABEL_SIZE = 10
MARGIN = 8


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib: it has ×, − and σ), else Pillow's built-in font."""
    try:
        import matplotlib

        return ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf", size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text)
    return int(right - left), int(bottom - min(top, 0))


def _wrap(text: str, size: int, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` pixels (at word boundaries)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and _text_size(candidate, size)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _text_block(lines: Sequence[str], size: int, width: int, *, spacing: int = 4) -> Image.Image:
    """White band ``width`` wide holding ``lines`` (wrapped to fit), left-aligned with a margin."""
    wrapped = [piece for line in lines for piece in _wrap(line, size, max(width - 2 * MARGIN, 40))]
    line_height = _text_size("Ag", size)[1] + spacing
    band = Image.new("RGB", (width, MARGIN + line_height * len(wrapped) + spacing), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(wrapped):
        draw.text((MARGIN, MARGIN // 2 + index * line_height), line, fill=INK, font=_font(size))
    return band


def _stack(*parts: Image.Image) -> Image.Image:
    """Images one under the other, centred, on white."""
    width = max(part.width for part in parts)
    canvas = Image.new("RGB", (width, sum(part.height for part in parts)), BACKGROUND)
    top = 0
    for part in parts:
        canvas.paste(part, ((width - part.width) // 2, top))
        top += part.height
    return canvas


def _pad(image: Image.Image, margin: int = MARGIN) -> Image.Image:
    canvas = Image.new("RGB", (image.width + 2 * margin, image.height + 2 * margin), BACKGROUND)
    canvas.paste(image, (margin, margin))
    return canvas


def colour_bar(lut: np.ndarray, ticks: Sequence[tuple[float, str]], caption: str, *,
               width: int = 256, height: int = 12, caption_width: int = 420) -> Image.Image:
    """A horizontal colour scale: ``lut`` (256, 3) left to right, ``ticks`` as (position 0..1, label)
    under it, and a caption line under the ticks."""
    positions = np.linspace(0, len(lut) - 1, width).round().astype(int)
    strip = Image.fromarray(np.repeat(lut[positions][None], height, axis=0).astype(np.uint8), mode="RGB")
    label_height = _text_size("0", LABEL_SIZE)[1]
    side = 2 * MARGIN + 20
    bar = Image.new("RGB", (width + 2 * side, height + label_height + 8), BACKGROUND)
    bar.paste(strip, (side, 0))
    draw = ImageDraw.Draw(bar)
    draw.rectangle((side - 1, -1, side + width, height), outline=INK)
    for position, label in ticks:
        x = side + round(position * (width - 1))
        draw.line((x, height, x, height + 3), fill=INK)
        text_width = _text_size(label, LABEL_SIZE)[0]
        draw.text((x - text_width // 2, height + 4), label, fill=INK, font=_font(LABEL_SIZE))
    return _stack(bar, _text_block([caption], LABEL_SIZE, max(caption_width, bar.width)))


def _number_tiles(grid: Image.Image, origins: Sequence[tuple[int, int]], labels: Sequence[str],
                  marked: Sequence[bool] | None = None) -> Image.Image:
    """Write each label in the top-left corner of its tile, on a dark box; marked tiles get a red
    cross and a red label."""
    picture = grid.copy()
    draw = ImageDraw.Draw(picture)
    font = _font(LABEL_SIZE)
    for index, ((left, top), label) in enumerate(zip(origins, labels, strict=True)):
        text_width, text_height = _text_size(label, LABEL_SIZE)
        dead = bool(marked[index]) if marked is not None else False
        draw.rectangle((left, top, left + text_width + 3, top + text_height + 2), fill=(0, 0, 0))
        draw.text((left + 2, top), label, fill=DEAD_MARK if dead else (255, 255, 255), font=font)
    return picture


def _grid_origins(count: int, columns: int, cell: tuple[int, int], gap: int) -> list[tuple[int, int]]:
    cell_height, cell_width = cell
    return [((index % columns) * (cell_width + gap), (index // columns) * (cell_height + gap))
            for index in range(count)]


def feature_map_title(model: str, version: int | None, layer: str, activations: np.ndarray) -> str:
    """``digits v1 · conv2 · 13×13×32``: what a grid shows (the version when there is one)."""
    shape = np.asarray(activations).shape[-3:]
    named = f"{model} v{version}" if version is not None else model
    return f"{named} · {layer} · {'×'.join(str(int(size)) for size in shape)}"


def feature_map_figure(activations: np.ndarray, *, title: str,
                       channels_per_row: int = CHANNELS_PER_ROW) -> Image.Image:
    """The feature-map grid with a title, each tile's channel number, and the colour scale.

    Each channel is standardised on its own (:func:`standardize_channel`), so the colours read as
    standard deviations from that channel's mean, the same for every tile.
    """
    array = np.asarray(activations)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    grid = feature_map_grid(array, channels_per_row=channels_per_row)
    height, width, channels = array.shape
    scale = display_scale(height, width, 48)
    columns = min(channels_per_row, channels)
    origins = _grid_origins(channels, columns, (height * scale, width * scale), 1)
    numbered = _number_tiles(grid, origins, [str(index) for index in range(channels)])
    heading = _text_block([title, f"{channels} channels, {height}×{width} each; numbers are channel indices"],
                          TITLE_SIZE, numbered.width + 2 * MARGIN)
    # standardize_channel maps mean ± 2 std to grey levels 0 and 255: the viridis ends.
    scale_bar = colour_bar(_viridis_lut(), [(0.0, "−2σ"), (0.25, "−1σ"), (0.5, "mean"), (0.75, "+1σ"),
                                            (1.0, "+2σ")],
                           "Colour: the activation in standard deviations from its channel's mean "
                           "(each channel scaled on its own; beyond ±2σ clipped).",
                           caption_width=max(numbered.width, 420))
    return _stack(heading, _pad(numbered), scale_bar)


def gradcam_figure(image: np.ndarray, heatmap: np.ndarray, *, class_name: str, probability: float,
                   layer: str, layer_shape: Sequence[int] | None = None, model: str = "",
                   predicted: tuple[str, float] | None = None, alpha: float = 0.4) -> Image.Image:
    """The Grad-CAM overlay with its caption (class, probability, layer) and the jet colour scale."""
    overlay = heatmap_overlay(image, heatmap, alpha=alpha)
    where = f"{layer} ({'×'.join(str(int(size)) for size in layer_shape)})" if layer_shape else layer
    lines = [f"{class_name}: probability {probability:.1%}"]
    if predicted is not None and predicted[0] != class_name:
        lines.append(f"(predicted: {predicted[0]}, {predicted[1]:.1%})")
    lines.append(f"Grad-CAM of {where}" + (f" in {model}" if model else ""))
    width = max(overlay.width + 2 * MARGIN, 420)
    caption = _text_block(lines, TITLE_SIZE, width)
    scale_bar = colour_bar(_colour_lut("jet"), [(0.0, "0"), (0.5, "0.5"), (1.0, "1")],
                           f"Colour: how much each place raised the score of {class_name!r}, "
                           "relative to the strongest place.", width=200, caption_width=width)
    return _stack(_pad(overlay), caption, scale_bar)


def pattern_figure(patterns: np.ndarray, filters: Sequence[int], *, title: str,
                   dead: Sequence[int] = (), columns: int = 8) -> Image.Image:
    """Filter patterns with a title, each tile's filter number, and dead filters crossed out with a
    legend saying what that means."""
    array = np.asarray(patterns)
    if len(filters) != len(array):
        raise ValueError(f"{len(filters)} filter numbers for {len(array)} patterns.")
    grid = pattern_grid(array, columns=columns)
    height, width = array.shape[1:3]
    scale = display_scale(height, width, 64)
    columns = min(columns, len(array))
    origins = _grid_origins(len(array), columns, (height * scale, width * scale), 2)
    dead_set = {int(index) for index in dead}
    marked = [int(index) in dead_set for index in filters]
    numbered = _number_tiles(grid, origins, [str(int(index)) for index in filters], marked)
    draw = ImageDraw.Draw(numbered)
    for (left, top), is_dead in zip(origins, marked, strict=True):
        if is_dead:
            right, bottom = left + width * scale - 1, top + height * scale - 1
            draw.line((left, top, right, bottom), fill=DEAD_MARK, width=2)
            draw.line((left, bottom, right, top), fill=DEAD_MARK, width=2)
    lines = [title, "Each tile: the input that most raises one filter's mean response "
             "(gradient ascent from noise); numbers are filter indices."]
    heading = _text_block(lines, TITLE_SIZE, max(numbered.width + 2 * MARGIN, 420))
    if dead_set:
        legend = (f"Crossed out in red ({len(dead_set)}): dead filters, whose response does not change "
                  "with the input at all (all-zero weights, or every input to them is zero), so they "
                  "have no pattern.")
    else:
        legend = "No dead filters: every filter responds to its input."
    return _stack(heading, _pad(numbered), _text_block([legend], LABEL_SIZE + 1, heading.width))


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
