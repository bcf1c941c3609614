"""numpy <-> TensorProto without TensorFlow (the comparison with TensorFlow's own encoder is in
tests/test_client_protos.py; these are the SDK-side rules)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnkit_client.protos.tfs import types_pb2
from cnnkit_client.tensors import to_ndarray, to_tensor_proto


@pytest.mark.parametrize(("values", "dtype"), [
    ([[0.5, 1.0]], types_pb2.DT_FLOAT),  # Python floats follow tf.make_tensor_proto: float32
    ([1, 2], types_pb2.DT_INT32),
    ([2**40], types_pb2.DT_INT64),
    (np.array([1.5]), types_pb2.DT_DOUBLE),  # numpy arrays keep their dtype
    (np.array([1, 2], dtype=object), types_pb2.DT_INT64),  # numbers in an object array are numbers
    (["x", b"y"], types_pb2.DT_STRING),
    (np.array(["ab", "c"], dtype=np.dtypes.StringDType()), types_pb2.DT_STRING),
])
def test_dtypes_and_round_trips(values, dtype):
    proto = to_tensor_proto(values)
    assert proto.dtype == dtype
    back = to_ndarray(proto)
    expected = np.asarray(values, dtype=object) if dtype == types_pb2.DT_STRING else np.asarray(values)
    if dtype == types_pb2.DT_STRING:
        expected = np.array([x.encode() if isinstance(x, str) else x for x in expected.ravel()], dtype=object)
    np.testing.assert_array_equal(back.ravel(), expected.ravel())


def test_malformed_tensors_are_refused_with_a_clear_message():
    too_many = to_tensor_proto([b"a", b"b", b"c"])
    too_many.tensor_shape.dim[0].size = 2
    with pytest.raises(ValueError, match="3 strings for shape"):
        to_ndarray(too_many)
    unknown = to_tensor_proto([1.0])
    unknown.tensor_shape.unknown_rank = True
    with pytest.raises(ValueError, match="unknown rank"):
        to_ndarray(unknown)
    with pytest.raises(TypeError, match="mix of strings"):
        to_tensor_proto(np.array(["a", 1], dtype=object))
