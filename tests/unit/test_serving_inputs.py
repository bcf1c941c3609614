"""Serving, level one: decoding, validation and top-k as plain functions."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from cnnkit.errors import InvalidInputError, PayloadTooLargeError
from cnnkit.serving.inputs import (
    InputLimits,
    check_batch,
    decode_base64,
    decode_image,
    tensor_from_json,
    top_k,
)


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_jpeg_and_png_decode_to_the_model_size():
    photo = Image.new("RGB", (64, 48), (200, 10, 10))
    for format in ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"):
        pixels = decode_image(encode(photo, format), (32, 32, 3))
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, format
        assert pixels[..., 0].mean() > 150, format


def test_modes_are_converted_to_what_the_model_expects():
    grey = Image.new("L", (10, 10), 77)
    assert decode_image(encode(grey), (10, 10, 3))[0, 0].tolist() == [77, 77, 77]
    colour = Image.new("RGB", (10, 10), (0, 0, 255))
    assert decode_image(encode(colour), (10, 10, 1))[0, 0, 0] == round(0.114 * 255)
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode_image(encode(transparent), (10, 10, 3))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert decode_image(encode(palette), (10, 10, 3))[0, 0].tolist() == [10, 20, 30]
    deep = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert decode_image(encode(deep), (10, 10, 1))[0, 0, 0] == 255


def test_exif_rotation_is_applied():
    # A 20x10 landscape picture, left half black, stored with EXIF orientation 6 (rotate 90° CW).
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, 10:] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    pixels = decode_image(encode(image, "JPEG", exif=exif, quality=95), (20, 10, 3))
    # After rotation it is 10 wide and 20 high: the black half is now on top.
    assert pixels[:8].mean() < 40 and pixels[12:].mean() > 215


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInputError, "empty"),
        (b"%PDF-1.4 not an image", InvalidInputError, "not an image"),
        (encode(Image.new("RGB", (300, 300), "red"), "JPEG")[:300], InvalidInputError, "truncated"),
        (encode(Image.new("RGB", (50, 50), "red"), "PNG")[:-30], InvalidInputError, "truncated or corrupt"),
    ],
)
def test_bad_image_bytes_are_invalid_input(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data, (28, 28, 1))


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (8000, 8000), 0))  # 64 megapixels in about 70 kB
    assert len(bomb) < 1_000_000
    with pytest.raises(PayloadTooLargeError, match="8000x8000 pixels; the limit is 50000000"):
        decode_image(bomb, (28, 28, 1))
    # Over Pillow's own bomb threshold, its check answers first, with the same kind of error.
    huge = encode(Image.new("L", (12000, 12000), 0))
    with pytest.raises(PayloadTooLargeError, match="too large to decode safely"):
        decode_image(huge, (28, 28, 1))


def test_oversized_bodies_are_refused():
    with pytest.raises(PayloadTooLargeError, match="limit is 100 bytes"):
        decode_image(b"x" * 101, (28, 28, 1), InputLimits(max_body_bytes=100))


def test_base64_variants_and_malformed_base64():
    payload = bytes(range(256))
    assert decode_base64(base64.b64encode(payload).decode()) == payload
    assert decode_base64(base64.urlsafe_b64encode(payload).decode().rstrip("=")) == payload
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"png").decode()) == b"png"
    with pytest.raises(InvalidInputError, match="Malformed base64"):
        decode_base64("not base64 at all!")
    with pytest.raises(InvalidInputError, match="Expected a base64 string"):
        decode_base64(123)


def test_numeric_batches_are_validated():
    one = np.zeros((4, 4, 1))
    assert check_batch(one, (4, 4, 1)).shape == (1, 4, 4, 1)
    assert check_batch(np.zeros((3, 4, 4, 1), np.uint8), (4, 4, 1)).dtype == np.float32
    with pytest.raises(InvalidInputError, match=r"shape \(batch, 4, 4, 1\)"):
        check_batch(np.zeros((4, 4)), (4, 4, 1))
    with pytest.raises(InvalidInputError, match=r"must have shape \(4, 4, 1\).*\(4, 4, 3\)"):
        check_batch(np.zeros((2, 4, 4, 3)), (4, 4, 1))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        check_batch(np.full((1, 4, 4, 1), np.nan), (4, 4, 1))
    with pytest.raises(InvalidInputError, match="raw 0..255"):
        check_batch(np.full((1, 4, 4, 1), 300.0), (4, 4, 1))
    with pytest.raises(InvalidInputError, match="numeric"):
        check_batch(np.array([["a"]]), (4, 4, 1))
    with pytest.raises(PayloadTooLargeError, match="65 images in one request; the limit is 64"):
        check_batch(np.zeros((65, 4, 4, 1)), (4, 4, 1))
    with pytest.raises(InvalidInputError, match="empty"):
        check_batch(np.zeros((0, 4, 4, 1)), (4, 4, 1))


def test_json_tensors():
    batch = tensor_from_json(np.ones((2, 3, 3, 1)).tolist(), (3, 3, 1))
    assert batch.shape == (2, 3, 3, 1)
    with pytest.raises(InvalidInputError, match="ragged"):
        tensor_from_json([[1, 2], [3]], (3, 3, 1))
    with pytest.raises(InvalidInputError, match="nested list"):
        tensor_from_json({"a": 1}, (3, 3, 1))
    with pytest.raises(InvalidInputError, match="ragged or holds non-numbers"):
        tensor_from_json([["x"]], (3, 3, 1))


def test_top_k_orders_classes_and_breaks_ties_by_index():
    probabilities = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    result = top_k(probabilities, ["cat", "dog", "bird"], k=2)
    assert [entry["class"] for entry in result[0]] == ["dog", "bird"]
    assert result[0][0] == {"class": "dog", "index": 1, "probability": pytest.approx(0.6)}
    assert [entry["index"] for entry in result[1]] == [0, 2]
    assert len(top_k(probabilities, ["cat", "dog", "bird"], k=10)[0]) == 3
    with pytest.raises(InvalidInputError, match="top_k must be at least 1"):
        top_k(probabilities, ["cat", "dog", "bird"], k=0)
