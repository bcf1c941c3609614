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
