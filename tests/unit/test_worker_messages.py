"""The messages between the service and its worker processes (cnnkit.serving.workers)."""

from __future__ import annotations

import asyncio
import io
import pickle
import threading

import numpy as np
import pytest

from cnnkit.serving import workers
from cnnkit.serving.http import bodies


def test_messages_carry_arrays_and_wrapped_bodies_out_of_band():
    stream = io.BytesIO()
    array = np.arange(300_000, dtype=np.float64).reshape(600, 500)
    body = b'{"instances": [' + b"0.5," * 100_000 + b"0.5]}"
    workers.write_message(stream, (7, True, {"array": array, "body": pickle.PickleBuffer(body), "n": 3}))
    written = stream.getvalue()
    # The pickle itself stays small: the array's and the body's bytes follow it as raw buffers.
    size, count = workers._HEAD.unpack_from(written)
    assert count == 2 and size < 1_000
    assert len(written) > array.nbytes + len(body)

    stream.seek(0)
    identifier, ok, result = workers.read_message(stream)
    assert (identifier, ok, result["n"]) == (7, True, 3)
    np.testing.assert_array_equal(result["array"], array)
    assert bytes(result["body"]) == body
    assert workers.read_message(stream) is None  # the stream ended between messages


def test_a_stream_torn_inside_a_message_is_an_error_not_a_message():
    stream = io.BytesIO()
    workers.write_message(stream, ("x", np.ones(10_000)))
    for cut in (5, workers._HEAD.size + 4, len(stream.getvalue()) - 1):
        torn = io.BytesIO(stream.getvalue()[:cut])
        if cut < workers._HEAD.size:
            assert workers.read_message(torn) is None
        else:
            with pytest.raises(EOFError):
                workers.read_message(torn)


def test_a_message_that_does_not_pickle_writes_nothing():
    stream = io.BytesIO()
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        workers.write_message(stream, (1, True, threading.Lock()))
    assert stream.getvalue() == b""


def test_large_bodies_are_joined_outside_the_event_loop_and_single_pieces_not_copied():
    piece = b"x" * (2 * 1024 * 1024)
    joined_in: list[str] = []
    original_to_thread = asyncio.to_thread

    async def recording_to_thread(function, *args):
        joined_in.append(getattr(function, "__qualname__", str(function)))
        return await original_to_thread(function, *args)

    async def main():
        bodies.asyncio.to_thread = recording_to_thread
        try:
            single = await bodies.join_chunks([b"", piece, b""])
            small = await bodies.join_chunks([b"ab", b"cd"])
            large = await bodies.join_chunks([piece, piece])
            empty = await bodies.join_chunks([b"", b""])
        finally:
            bodies.asyncio.to_thread = original_to_thread
        return single, small, large, empty

    single, small, large, empty = asyncio.run(main())
    assert single is piece and small == b"abcd" and empty == b""
    assert large == piece + piece
    assert joined_in == ["bytes.join"]  # only the large body went to a thread


def test_the_json_worker_parses_a_large_body_into_arrays():
    image = b"[" + b",".join([b"[" + b",".join([b"1.5"] * 28) + b"]"] * 28) + b"]"
    body = b'{"instances": [' + image + b"," + image + b"]}"
    body = body + b" " * (bodies.PROCESS_BYTES + 1 - len(body))  # large enough for the worker process
    try:
        parsed = asyncio.run(bodies.parse_json(body))
    finally:
        bodies.JSON_WORKER.close()
    assert isinstance(parsed["instances"], np.ndarray) and parsed["instances"].shape == (2, 28, 28)
    assert float(parsed["instances"][1, 3, 4]) == 1.5


@pytest.mark.parametrize("array", [
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),  # out of band, Fortran order
    np.arange(20.0)[::2],  # not contiguous: in the pickle itself
    np.zeros((0, 3), np.float32),
    np.arange(6, dtype=np.uint8).reshape(2, 3).T,
])
def test_arrays_of_any_layout_come_back_equal(array):
    stream = io.BytesIO()
    workers.write_message(stream, array)
    stream.seek(0)
    back = workers.read_message(stream)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
