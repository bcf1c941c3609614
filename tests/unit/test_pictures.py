"""Pictures: the feature-map grid drawn the course's way, and the labelled image grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnnkit.pictures import (
    _viridis_lut,
    feature_map_grid,
    pattern_grid,
    standardize_channel,
    to_png,
)


def test_standardize_channel_centres_on_grey_and_handles_constant_channels():
    rng = np.random.default_rng(0)
    levels = standardize_channel(rng.normal(5.0, 3.0, size=(40, 40)))
    assert levels.dtype == np.uint8
    assert abs(float(levels.mean()) - 128) < 2
    assert abs(float(levels.astype(float).std()) - 64) < 4
    assert np.all(standardize_channel(np.full((4, 4), 7.0)) == 128)
    assert np.all(standardize_channel(np.array([[np.nan, np.inf], [0.0, 0.0]])) == 128)


def test_grid_has_sixteen_channels_a_row_in_viridis():
    activations = np.random.default_rng(1).normal(size=(6, 6, 40)).astype(np.float32)
    grid = feature_map_grid(activations, scale=2, gap=1)
    # 40 channels: 16 a row, so 3 rows; cells 12 px plus 1 px gaps.
    assert grid.size == (16 * 12 + 15, 3 * 12 + 2)
    pixels = np.asarray(grid)
    viridis = {tuple(colour) for colour in _viridis_lut()}
    first_cell = {tuple(pixel) for pixel in pixels[:12, :12].reshape(-1, 3)}
    assert first_cell <= viridis
    # The empty cells after channel 40 are dark, not coloured.
    assert tuple(pixels[-1, -1]) == (20, 20, 20)


def test_each_channel_is_standardised_on_its_own():
    activations = np.zeros((4, 4, 2), dtype=np.float32)
    activations[..., 0] = np.arange(16).reshape(4, 4)
    activations[..., 1] = np.arange(16).reshape(4, 4) * 1000.0  # same pattern, 1000× larger
    pixels = np.asarray(feature_map_grid(activations, scale=1, gap=0))
    np.testing.assert_array_equal(pixels[:, :4], pixels[:, 4:])


def test_small_maps_are_enlarged_and_a_batch_axis_is_accepted():
    grid = feature_map_grid(np.ones((1, 3, 3, 2)))
    assert grid.size[1] >= 48


def test_bad_activation_shapes_are_refused():
    with pytest.raises(ValueError, match="height, width, channels"):
        feature_map_grid(np.ones((3, 3)))


def test_png_bytes():
    grid = pattern_grid(np.random.default_rng(2).integers(0, 255, size=(10, 8, 8, 1), dtype=np.uint8))
    decoded = Image.open(io.BytesIO(to_png(grid)))
    assert decoded.format == "PNG" and decoded.size == grid.size


def test_misclassified_images_are_drawn_with_their_classes_in_a_real_font(tmp_path):
    """A grid of the misclassified images, each titled "true: X / pred: Y (p)" by matplotlib (the
    bitmap font of the old grid ran "pred 4 0.88" together)."""
    from cnnkit.training.evaluate import plot_misclassified

    images = np.random.default_rng(3).integers(0, 255, size=(10, 28, 28, 1), dtype=np.uint8)
    path = tmp_path / "misclassified.png"
    plot_misclassified(images, [str(i) for i in range(10)], ["Ankle boot"] * 10, [0.88] * 10, path, "title")
    drawn = Image.open(path)
    assert drawn.format == "PNG" and drawn.size[0] >= 8 * 150 and drawn.size[1] >= 2 * 180
    plot_misclassified(images[:0], [], [], [], tmp_path / "none.png", "title")  # none wrong: still a picture
    assert Image.open(tmp_path / "none.png").format == "PNG"


def _find(haystack: np.ndarray, needle: np.ndarray) -> tuple[int, int] | None:
    """Where ``needle`` sits inside ``haystack`` (both H×W×3), or None."""
    height, width = needle.shape[:2]
    for top in range(haystack.shape[0] - height + 1):
        for left in range(haystack.shape[1] - width + 1):
            if np.array_equal(haystack[top : top + height, left : left + width], needle):
                return top, left
    return None


def test_feature_map_figure_titles_numbers_and_scales_the_grid():
    from cnnkit.pictures import feature_map_figure, feature_map_title

    activations = np.random.default_rng(5).normal(size=(6, 6, 20)).astype(np.float32)
    title = feature_map_title("digits", 3, "conv2", activations)
    assert title == "digits v3 · conv2 · 6×6×20"
    figure = np.asarray(feature_map_figure(activations, title=title))
    grid = np.asarray(feature_map_grid(activations))
    # The grid is in the figure, below a title band: its bottom rows are untouched by the numbers.
    found = _find(figure, grid[-20:, :40])
    assert found is not None
    top = found[0] - (grid.shape[0] - 20)
    assert top > 30
    # Each tile's top-left corner carries its channel number on a black box.
    assert tuple(figure[top + 1, found[1] + 1]) == (0, 0, 0)
    # Under the grid, the colour scale runs through viridis from one end to the other.
    below = figure[top + grid.shape[0] :]
    viridis = _viridis_lut()
    colours = {tuple(pixel) for pixel in below.reshape(-1, 3)}
    assert tuple(viridis[0]) in colours and tuple(viridis[-1]) in colours


def test_gradcam_figure_has_a_caption_and_a_jet_scale():
    from cnnkit.pictures import _colour_lut, gradcam_figure, heatmap_overlay

    image = np.full((28, 28, 1), 90, np.uint8)
    heatmap = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    figure = np.asarray(gradcam_figure(image, heatmap, class_name="7", probability=0.93, layer="conv2",
                                       layer_shape=(10, 10), model="digits v1"))
    overlay = np.asarray(heatmap_overlay(image, heatmap))
    assert _find(figure[:240, :], overlay[:16, :16]) is not None
    assert figure.shape[0] > overlay.shape[0] + 80  # caption lines and the colour scale
    jet = _colour_lut("jet")
    colours = {tuple(pixel) for pixel in figure[overlay.shape[0] + 16 :].reshape(-1, 3)}
    assert tuple(jet[0]) in colours and tuple(jet[-1]) in colours
    # Dark caption text is drawn under the overlay.
    assert (figure[overlay.shape[0] + 10 : overlay.shape[0] + 40].sum(axis=2) < 200).any()


def test_pattern_figure_crosses_out_dead_filters_and_says_why():
    from cnnkit.pictures import DEAD_MARK, pattern_figure

    patterns = np.random.default_rng(6).integers(0, 255, (4, 16, 16, 1)).astype(np.uint8)
    patterns[2] = 0
    with_dead = np.asarray(pattern_figure(patterns, [0, 5, 9, 11], dead=[9], title="t"))
    without = np.asarray(pattern_figure(patterns, [0, 5, 9, 11], title="t"))
    red = np.all(with_dead == DEAD_MARK, axis=2)
    assert red.sum() > 100 and not np.all(without == DEAD_MARK, axis=2).any()
    # The cross lies on the third tile only (cells enlarged to 64 px, 2 px gaps).
    first = np.repeat(np.repeat(patterns[0], 4, axis=0), 4, axis=1)
    found = _find(with_dead, np.repeat(first[-12:, -12:], 3, axis=2))
    assert found is not None
    grid_left = found[1] + 12 - 64
    columns = np.nonzero(red.any(axis=0))[0]
    assert columns.min() >= grid_left + 2 * 66 - 1 and columns.max() <= grid_left + 3 * 66  # 2 px lines
    with pytest.raises(ValueError, match="3 filter numbers for 4 patterns"):
        pattern_figure(patterns, [0, 1, 2], title="t")
