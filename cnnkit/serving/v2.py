"""The Open Inference Protocol ("v2": KServe, Triton, MLServer), protocol-neutral.

What the HTTP front end (:mod:`cnnkit.serving.http.v2`) and the gRPC one
(:mod:`cnnkit.serving.grpc.v2`) share: the data types, decoding an ``image`` input into the
validated float32 batch every other route produces, choosing outputs, and the model and server
metadata and Triton-style model configuration.

A model has one input, ``image``: a tensor ``[N, H, W, C]`` of pixels 0..255 in any of FP32, FP16,
FP64, UINT8, INT32 or INT64, or ``[N]`` (or ``[N, 1]``) BYTES, each element an encoded image file
(PNG, JPEG...; in the JSON form a base64 string) decoded and resized like every other route's.
Its outputs are ``probabilities`` (FP32 ``[N, classes]``), ``top_class`` (INT64 ``[N]``) and one
FP32 output per feature layer (``conv1``, ``pool1``...). A request that names no outputs gets
``probabilities`` and ``top_class``: Triton would send every output, which here would add every
feature map of the batch to each answer.

The classification extension works as Triton's: ``probabilities`` requested with the parameter
``classification: k`` comes back as BYTES ``[N, k]``, each element ``"probability:index:label"``,
most probable first, so a v2 client gets the class names without a second call.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit import __version__
from cnnkit.errors import InvalidInputError
from cnnkit.repository import PREDICT_OUTPUTS, PREDICT_SIGNATURE, TensorSpec
from cnnkit.serving.inputs import InputLimits, check_batch, check_count, decode_images
from cnnkit.serving.model_store import LoadedModel

# The one encoder of BYTES contents (the SDK's), used by both front ends as v2.encode_bytes_elements.
from cnnkit_client._v2 import encode_bytes_elements  # noqa: F401

INPUT_NAME = "image"
DEFAULT_OUTPUTS = tuple(PREDICT_OUTPUTS)
SERVER_NAME = "cnnkit"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
PLATFORM = "onnxruntime_onnx"
# Numeric data types a request may send pixels in, and those the answers use.
NUMERIC: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
}
DATATYPES = (*NUMERIC, "BYTES")
_SPEC_DATATYPES = {"float32": "FP32", "int64": "INT64"}


@dataclass
class InputTensor:
    """One decoded request input: numbers as an array of ``shape``, or BYTES as a list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in NUMERIC.items():
        if array.dtype == dtype or (array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize):
            return name
    raise ValueError(f"No v2 data type for {array.dtype}.")  # the service's outputs are all mapped


def check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list | tuple) or not all(isinstance(size, int) and not isinstance(size, bool)
                                                        for size in shape):
        raise InvalidInputError(f"{where}: 'shape' must be a list of integers, got {shape!r}.")
    if any(size < 0 for size in shape):
        raise InvalidInputError(f"{where}: 'shape' {list(shape)} has a negative size.")
    return [int(size) for size in shape]


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(size) for size in shape)  # Python integers: a huge shape cannot wrap around


def numeric_from_bytes(raw: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """Raw little-endian row-major contents (binary HTTP data, gRPC raw_input_contents)."""
    dtype = NUMERIC[datatype]
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(f"{where}: {len(raw)} bytes of {datatype} data for shape {shape}; "
                                f"expected {expected}.")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def bytes_elements(raw: bytes, where: str) -> list[bytes]:
    """BYTES contents in the binary form: each element a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"{where}: BYTES data ends inside an element's 4-byte length.")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise InvalidInputError(f"{where}: a BYTES element says {size} bytes; only {len(raw) - offset} remain.")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def base64_elements(values: Sequence[Any], where: str) -> list[bytes]:
    """BYTES in the JSON form: base64 strings of the image files."""
    decoded = []
    for value in values:
        if not isinstance(value, str):
            raise InvalidInputError(f"{where}: BYTES data in JSON must be base64 strings of image files.")
        try:
            decoded.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError) as error:
            raise InvalidInputError(f"{where}: a BYTES element is not valid base64: {error}") from error
    return decoded


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        flat: list[Any] = []
        stack = [iter(data)]
        while stack:
            for item in stack[-1]:
                if isinstance(item, list):
                    stack.append(iter(item))
                    break
                flat.append(item)
            else:
                stack.pop()
        return flat
    return [data]


def numeric_from_json(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as an array of ``shape``."""
    if isinstance(data, np.ndarray):  # a long number list the JSON worker parsed into an array
        if data.size != element_count(shape):
            raise InvalidInputError(f"{where}: {data.size} values for shape {shape} "
                                    f"({element_count(shape)} expected).")
        return data.reshape(shape)
    flat = _flatten(data)
    if len(flat) != element_count(shape):
        raise InvalidInputError(f"{where}: {len(flat)} values for shape {shape} "
                                f"({element_count(shape)} expected).")
    if any(isinstance(value, bool) or not isinstance(value, int | float) for value in flat):
        raise InvalidInputError(f"{where}: {datatype} data must be numbers.")
    try:
        return np.asarray(flat, dtype=np.float64).reshape(shape)
    except (ValueError, OverflowError) as error:
        raise InvalidInputError(f"{where}: {error}") from error


def images_from_input(tensor: InputTensor, model: LoadedModel, limits: InputLimits) -> np.ndarray:
    """The model's float32 batch from the ``image`` input, checked like every other route's."""
    if tensor.name != INPUT_NAME:
        raise InvalidInputError(f"Unknown input {tensor.name!r}; model {model.name} has one input, '{INPUT_NAME}'.")
    if tensor.datatype == "BYTES":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidInputError(f"A BYTES image input has shape [N] or [N, 1], got {tensor.shape}.")
        files = list(tensor.values)
        if len(files) != tensor.shape[0]:
            raise InvalidInputError(f"The BYTES input holds {len(files)} elements for shape {tensor.shape}.")
        return decode_images(files, model.input_shape, limits)
    if tensor.datatype not in NUMERIC:
        raise InvalidInputError(f"Unsupported datatype {tensor.datatype!r}; use one of {', '.join(DATATYPES)}.")
    array = np.asarray(tensor.values)
    check_count(array.shape[0] if array.ndim else 1, limits)
    return check_batch(array.astype(np.float64, copy=False), model.input_shape, limits)


def single_input(inputs: Sequence[InputTensor]) -> InputTensor:
    if len(inputs) != 1:
        names = ", ".join(repr(tensor.name) for tensor in inputs) or "none"
        raise InvalidInputError(f"The model takes exactly one input, '{INPUT_NAME}'; got {names}.")
    return inputs[0]


def output_names(model: LoadedModel) -> list[str]:
    return [*PREDICT_OUTPUTS, *model.layer_names]


def choose_outputs(model: LoadedModel, requested: Sequence[str]) -> list[str]:
    """The requested outputs in order (default: probabilities and top_class); unknown ones refused."""
    if not requested:
        return list(DEFAULT_OUTPUTS)
    available = output_names(model)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise InvalidInputError(f"Unknown output(s) {', '.join(map(repr, unknown))} of model {model.name}; "
                                f"outputs: {', '.join(available)}.")
    return list(dict.fromkeys(requested))


def output_datatype(name: str) -> str:
    return "INT64" if name == "top_class" else "FP32"


def classification_k(name: str, value: Any) -> int | None:
    """The ``classification`` parameter of a requested output: None when absent."""
    if value is None:
        return None
    if name != "probabilities":
        raise InvalidInputError(f"The classification parameter applies to 'probabilities' only, not {name!r}.")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"classification must be a positive integer (the number of classes), got {value!r}.")
    return value


def classify(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> np.ndarray:
    """Triton's classification output: ``[N, k]`` of ``b"probability:index:label"``, best first."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = [[f"{row[index]:.6f}:{index}:{class_names[index]}".encode() for index in indices]
            for row, indices in zip(probabilities, order, strict=True)]
    return np.asarray(rows, dtype=np.object_).reshape(len(rows), k)


def _tensor(name: str, spec: TensorSpec) -> dict[str, Any]:
    return {"name": name, "datatype": _SPEC_DATATYPES[spec.dtype],
            "shape": [-1 if size is None else int(size) for size in spec.shape]}


def model_metadata(model: LoadedModel, versions: Sequence[int]) -> dict[str, Any]:
    """``GET /v2/models/{name}`` and gRPC ModelMetadata: the one input and every output."""
    signatures = model.signatures()
    outputs = [_tensor(name, spec) for signature in signatures.values() for name, spec in signature.outputs.items()]
    image = signatures[PREDICT_SIGNATURE].inputs[INPUT_NAME]
    return {"name": model.name, "versions": [str(version) for version in versions], "platform": PLATFORM,
            "inputs": [_tensor(INPUT_NAME, image)], "outputs": outputs}


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_config(model: LoadedModel, limits: InputLimits, max_queue_ms: float) -> dict[str, Any]:
    """A Triton model configuration (its JSON form) describing how cnnkit serves the model: the
    batch dimension is left out of ``dims``, as Triton does when ``max_batch_size`` > 0."""
    signatures = model.signatures()
    image = signatures[PREDICT_SIGNATURE].inputs[INPUT_NAME]
    outputs = [{"name": name, "data_type": f"TYPE_{_SPEC_DATATYPES[spec.dtype]}",
                "dims": [int(size) if size is not None else -1 for size in spec.shape[1:]]}
               for signature in signatures.values() for name, spec in signature.outputs.items()]
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": limits.max_batch,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NHWC",
                   "dims": [int(size) if size is not None else -1 for size in image.shape[1:]]}],
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_ms * 1000)},
    }
