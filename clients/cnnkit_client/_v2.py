"""What the clients' ``protocol="v2"`` shares: the Open Inference Protocol's request pieces and
the classification extension's answers (``"probability:index:label"``), parsed into predictions.

With ``protocol="v2"`` the clients send ``predict``, ``feature_maps`` (arrays) and ``health``
through the protocol KServe and Triton speak (``/v2/...`` over HTTP, ``inference.GRPCInferenceService``
over gRPC); what the protocol has no call for (Grad-CAM, filter patterns, PNG grids, model
descriptions) still goes through cnnkit's own routes on the same server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import numpy as np

from cnnkit_client.types import ClassScore, Prediction

PROTOCOLS = ("cnnkit", "v2")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    return protocol


def model_path(model: str, version: int | None) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    return path + (f"/versions/{int(version)}" if version is not None else "")


def classification_entry(element: bytes | str) -> ClassScore:
    """One ``"probability:index:label"`` element (the label may itself hold colons)."""
    text = element.decode() if isinstance(element, bytes) else element
    probability, index, label = text.split(":", 2)
    return ClassScore(label, int(index), float(probability))


def predictions(model: str, version: str | int, rows: Sequence[Sequence[bytes | str]]) -> list[Prediction]:
    return [Prediction(model, int(version), tuple(classification_entry(element) for element in row))
            for row in rows]


def rows_of(elements: Sequence[Any], shape: Sequence[int]) -> list[list[Any]]:
    """A flat ``[N, k]`` element list as N rows."""
    count, width = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (len(elements), 1)
    return [list(elements[row * width : (row + 1) * width]) for row in range(count)]


def bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset + 4 <= len(raw):
        size = int.from_bytes(raw[offset : offset + 4], "little")
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return elements


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


NUMPY_TYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}


def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.dtype(NUMPY_TYPES[datatype])).reshape([int(size) for size in shape])
