"""numpy <-> tensorflow.TensorProto without importing TensorFlow.

Writing: numeric and bool arrays go into ``tensor_content`` (raw little-endian bytes, C order),
the form TF's own ``tf.make_tensor_proto`` uses for arrays of more than one element; strings go
into ``string_val``. ``use_tensor_content=False`` writes the typed ``*_val`` fields instead.

Reading: ``tensor_content`` when set (fast path, one copy), else the typed ``*_val`` field for the
dtype, with TF's ``tf.make_ndarray`` semantics: fewer values than elements repeats the last value,
no values at all gives zeros. DT_STRING reads as an object array of ``bytes`` (as TF does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnkit_client.protos.tfs import tensor_pb2, tensor_shape_pb2, types_pb2

TensorProto = tensor_pb2.TensorProto

# DataType <-> numpy dtype (numeric: little-endian, which is what tensor_content holds).
_DT_TO_NP: dict[int, np.dtype] = {
    types_pb2.DT_FLOAT: np.dtype("<f4"),
    types_pb2.DT_DOUBLE: np.dtype("<f8"),
    types_pb2.DT_HALF: np.dtype("<f2"),
    types_pb2.DT_INT8: np.dtype("i1"),
    types_pb2.DT_INT16: np.dtype("<i2"),
    types_pb2.DT_INT32: np.dtype("<i4"),
    types_pb2.DT_INT64: np.dtype("<i8"),
    types_pb2.DT_UINT8: np.dtype("u1"),
    types_pb2.DT_UINT16: np.dtype("<u2"),
    types_pb2.DT_UINT32: np.dtype("<u4"),
    types_pb2.DT_UINT64: np.dtype("<u8"),
    types_pb2.DT_BOOL: np.dtype("?"),
    types_pb2.DT_COMPLEX64: np.dtype("<c8"),
    types_pb2.DT_COMPLEX128: np.dtype("<c16"),
    types_pb2.DT_STRING: np.dtype(object),
}
_NP_TO_DT: dict[np.dtype, int] = {dt.newbyteorder("="): enum for enum, dt in _DT_TO_NP.items()}

# The typed repeated field that holds each dtype's values when tensor_content is empty.
_VAL_FIELD: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_HALF: "half_val",  # uint16 bit patterns in an int32 field
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",  # interleaved (real, imag)
    types_pb2.DT_COMPLEX128: "dcomplex_val",
    types_pb2.DT_STRING: "string_val",
}


def _dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return str(enum)


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype (native byte order; object for DT_STRING) for a DataType value."""
    try:
        return _DT_TO_NP[dtype].newbyteorder("=")
    except KeyError:
        raise TypeError(f"unsupported tensor dtype {_dtype_name(dtype)}") from None


def data_type(dtype: Any) -> int:
    """The DataType enum value for a numpy dtype (or anything np.dtype accepts)."""
    dt = np.dtype(dtype)
    if dt.kind in "SUOT":  # T: numpy 2's StringDType
        return types_pb2.DT_STRING
    try:
        return _NP_TO_DT[dt.newbyteorder("=")]
    except KeyError:
        raise TypeError(f"numpy dtype {dt} has no TensorProto equivalent here") from None


def tensor_shape(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(s)) for s in shape])


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, (bytearray, memoryview, np.bytes_)):
        return bytes(x)
    raise TypeError(f"cannot put {type(x).__name__} into a DT_STRING tensor")


def to_tensor_proto(values: Any, dtype: Any = None, *, use_tensor_content: bool = True) -> TensorProto:
    """Build a TensorProto from an array-like.

    dtype: a numpy dtype or a DataType value to cast to; default: the array's own dtype.
    Strings (str encoded as UTF-8, or bytes) become DT_STRING in string_val.
    """
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        dtype = numpy_dtype(dtype)
    arr = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    if dtype is None and not isinstance(values, (np.ndarray, np.generic)):
        # Python numbers follow tf.make_tensor_proto: float32 and int32, not numpy's 64-bit defaults.
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        elif arr.dtype == np.int64 and arr.size and np.iinfo(np.int32).min <= arr.min() <= arr.max() <= np.iinfo(
                np.int32).max:
            arr = arr.astype(np.int32)
    if arr.dtype.kind in "SUT" and not isinstance(values, np.ndarray):
        # keep the exact bytes: numpy's "S" dtype drops trailing NULs
        arr = np.asarray(values, dtype=object)
    elif arr.dtype.kind == "T":
        arr = arr.astype(object)
    if arr.dtype == object and arr.size and not all(isinstance(x, (str, bytes, bytearray, memoryview, np.bytes_))
                                                    for x in arr.ravel()):
        numbers = np.array(arr.tolist())  # an object array of numbers is numbers, not strings
        if numbers.dtype.kind not in "biufc" or numbers.shape != arr.shape:
            raise TypeError("cannot build a tensor from a mix of strings and other objects")
        arr = numbers
    enum = data_type(arr.dtype)
    proto = TensorProto(tensor_shape=tensor_shape(arr.shape))
    proto.dtype = enum  # type: ignore[assignment]  # the stubs type enums as the enum class, not int
    if enum == types_pb2.DT_STRING:
        proto.string_val.extend(_as_bytes(x) for x in arr.ravel(order="C"))
        return proto
    le = _DT_TO_NP[enum]
    if use_tensor_content:
        proto.tensor_content = np.ascontiguousarray(arr, dtype=le).tobytes(order="C")
        return proto
    flat = np.ascontiguousarray(arr).ravel()
    if enum == types_pb2.DT_HALF:
        flat = flat.astype(np.float16).view(np.uint16)
    elif enum in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        flat = flat.view(np.float32 if enum == types_pb2.DT_COMPLEX64 else np.float64)
    getattr(proto, _VAL_FIELD[enum]).extend(flat.tolist())
    return proto


def to_ndarray(proto: Any) -> np.ndarray:
    """Read a TensorProto (ours, or any message with the same fields) into a new numpy array."""
    if proto.tensor_shape.unknown_rank:
        raise ValueError("tensor has an unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor has an unknown dimension: {shape}")
    num = int(np.prod(shape, dtype=np.int64))
    enum = proto.dtype
    if enum not in _DT_TO_NP:
        raise TypeError(f"unsupported tensor dtype {_dtype_name(enum)}")
    le = _DT_TO_NP[enum]
    native = le.newbyteorder("=")

    if enum == types_pb2.DT_STRING:
        if proto.tensor_content:
            raise ValueError("DT_STRING tensor with tensor_content is not supported (expected string_val)")
        vals = list(proto.string_val)
        if len(vals) > num:
            raise ValueError(f"{len(vals)} strings for shape {shape}")
        if len(vals) < num:
            vals.extend([vals[-1] if vals else b""] * (num - len(vals)))
        out = np.empty(len(vals), dtype=object)
        out[:] = vals
        return out.reshape(shape)

    if proto.tensor_content:
        content = proto.tensor_content
        if len(content) != num * le.itemsize:
            raise ValueError(
                f"tensor_content has {len(content)} bytes; shape {shape} of {_dtype_name(enum)} "
                f"needs {num * le.itemsize}"
            )
        return np.frombuffer(content, dtype=le).astype(native, copy=True).reshape(shape)

    field = getattr(proto, _VAL_FIELD[enum])
    if enum == types_pb2.DT_HALF:
        values = np.array(field, dtype=np.uint16).view(np.float16)
    elif enum in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        part = np.float32 if enum == types_pb2.DT_COMPLEX64 else np.float64
        values = np.array(field, dtype=part).view(native)
    else:
        values = np.array(field, dtype=native)
    if values.size == 0:
        return np.zeros(shape, dtype=native)
    if values.size > num:
        raise ValueError(f"{values.size} values for shape {shape}")
    if values.size < num:  # TF repeats the last value
        values = np.pad(values, (0, num - values.size), mode="edge")
    return values.reshape(shape)
