"""A hostile-input corpus for the service, generated in memory (no committed binaries).

Each :class:`Case` sends one kind of bad request, over HTTP or gRPC, and says how the service must
answer it: an HTTP 4xx or gRPC INVALID_ARGUMENT, with a message containing ``expected_message``.
``tests/service/test_hostile_input.py`` checks every case against a real service;
``benchmarks/hostile_input.py`` measures, for each, the time to refuse, the server's peak
resident memory and the health check's latency while it runs.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

MODEL = "digits"


@dataclass
class Outcome:
    status: str  # "200", "413", "INVALID_ARGUMENT", "reset", ...
    message: str
    seconds: float


@dataclass
class Case:
    name: str
    send: Callable[[str, str], list[Outcome]]  # (HTTP base URL, gRPC target) -> one outcome per request
    expected_status: str  # "4xx" for any client error, else the exact status
    expected_message: str = ""

    def accepts(self, outcome: Outcome) -> bool:
        if self.expected_status == "4xx":
            status_ok = outcome.status.isdigit() and 400 <= int(outcome.status) < 500
        else:
            status_ok = outcome.status == self.expected_status
        return status_ok and self.expected_message.lower() in outcome.message.lower()


def digit_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


def deep_list(levels: int, leaf: bytes = b"0") -> bytes:
    return b"[" * levels + leaf + b"]" * levels


# HTTP -------------------------------------------------------------------------------------------


def _post(path: str, body: bytes, content_type: str = "application/json", copies: int = 1):
    def send(url: str, _grpc: str) -> list[Outcome]:
        import httpx

        def one(_: int) -> Outcome:
            started = time.perf_counter()
            with httpx.Client(base_url=url, timeout=120) as client:
                try:
                    answer = client.post(path, content=body, headers={"content-type": content_type})
                except httpx.HTTPError as error:
                    return Outcome(type(error).__name__, str(error), time.perf_counter() - started)
            return Outcome(str(answer.status_code), answer.text[:2000], time.perf_counter() - started)

        with ThreadPoolExecutor(copies) as pool:
            return list(pool.map(one, range(copies)))

    return send


def _raw(path: str, head_fields: str, chunks: Callable[[], Iterator[bytes]]):
    """Send a request over a plain socket (for bodies no HTTP client library will send)."""

    def send(url: str, _grpc: str) -> list[Outcome]:
        parts = urlsplit(url)
        started = time.perf_counter()
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head_fields}\r\n".encode()
        answer = b""
        with socket.create_connection((parts.hostname, parts.port), timeout=60) as connection:
            try:
                connection.sendall(head)
                for chunk in chunks():
                    connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused while sending: the answer may still be there to read
            try:
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    data = connection.recv(65536)
                    if not data:
                        break
                    answer += data
            except (ConnectionResetError, TimeoutError) as error:
                if not answer:
                    return [Outcome(type(error).__name__, str(error), time.perf_counter() - started)]
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer"
        body = answer.partition(b"\r\n\r\n")[2]
        return [Outcome(status, body.decode(errors="replace")[:2000], time.perf_counter() - started)]

    return send


def _chunked(piece: bytes, count: int) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        for _ in range(count):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    return chunks


def _declared(size: int) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        block = b" " * (1024 * 1024)
        for _ in range(size // len(block)):
            yield block

    return chunks


# gRPC -------------------------------------------------------------------------------------------


def _tensor(dtype_name: str, shape: list[int], **content):
    from cnnkit_client.protos.tfs import predict_pb2, types_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    tensor = request.inputs["image"]
    tensor.dtype = getattr(types_pb2, dtype_name)
    for size in shape:
        tensor.tensor_shape.dim.add().size = size
    for name, value in content.items():
        getattr(tensor, name).extend(value)
    return request.SerializeToString()


def _grpc(method: str, message: bytes):
    def send(_url: str, target: str) -> list[Outcome]:
        import grpc

        started = time.perf_counter()
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(method)  # no serializers: the bytes go as they are
            try:
                call(message, timeout=60)
            except grpc.RpcError as error:
                return [Outcome(error.code().name, error.details() or "", time.perf_counter() - started)]
        return [Outcome("OK", "", time.perf_counter() - started)]

    return send


PREDICT = "/tensorflow.serving.PredictionService/Predict"


def corpus() -> list[Case]:
    """Every hostile case, most severe first (the order of the issue that found them)."""
    png = base64.b64encode(digit_png()).decode()
    named: dict = {"b64": png}
    for _ in range(900):
        named = {"image": named}
    numbers_19mb = b"[" + b"0.5," * (19 * 1024 * 1024 // 4) + b"0.5]"
    return [
        Case("grpc: 49 bytes claiming a million images", _grpc(PREDICT, _tensor("DT_FLOAT", [1_000_000, 28, 28, 1])),
             "INVALID_ARGUMENT", "the limit is 64"),
        Case("grpc: one value filled up to a million images",
             _grpc(PREDICT, _tensor("DT_FLOAT", [1_000_000, 28, 28, 1], float_val=[1.0])),
             "INVALID_ARGUMENT", "the limit is 64"),
        Case("grpc: a shape whose size overflows 64 bits", _grpc(PREDICT, _tensor("DT_FLOAT", [2**62, 2**62, 28, 1])),
             "INVALID_ARGUMENT", "the limit is 64"),
        Case("grpc: one string claiming 20 million images",
             _grpc(PREDICT, _tensor("DT_STRING", [20_000_000], string_val=[b"x"])),
             "INVALID_ARGUMENT", "20000000 images in one request"),
        Case("grpc: fewer strings than the shape", _grpc(PREDICT, _tensor("DT_STRING", [3], string_val=[b"x"])),
             "INVALID_ARGUMENT", "1 strings for shape [3]"),
        Case("grpc: a negative size", _grpc(PREDICT, _tensor("DT_FLOAT", [1, -5, 28, 1])),
             "INVALID_ARGUMENT", "negative"),
        Case("grpc: 1 KB of 0xff to Predict", _grpc(PREDICT, b"\xff" * 1024), "INVALID_ARGUMENT",
             "not a valid message"),
        Case("grpc: filter patterns with seed -1",
             _grpc("/cnnkit.v1.Extensions/FilterPatterns", json.dumps({"model": MODEL, "seed": -1}).encode()),
             "INVALID_ARGUMENT", "seed"),
        Case("http: five 19 MB JSON number bodies at once, REST",
             _post(f"/v1/models/{MODEL}:predict", b'{"instances": ' + numbers_19mb + b"}", copies=5), "4xx"),
        Case("http: five 19 MB JSON number bodies at once, /predict_json",
             _post("/predict_json", b'{"model": "digits", "instances": ' + numbers_19mb + b"}", copies=5), "4xx"),
        Case("http: 100,000 levels of nesting, REST",
             _post(f"/v1/models/{MODEL}:predict", b'{"instances": ' + deep_list(100_000) + b"}"), "400",
             "nested too deeply"),
        Case("http: 100,000 levels of nesting, /predict_json",
             _post("/predict_json", b'{"model": "digits", "instances": ' + deep_list(100_000) + b"}"), "400",
             "nested too deeply"),
        Case("http: 100,000 levels of nesting, v2",
             _post(f"/v2/models/{MODEL}/infer", b'{"inputs": ' + deep_list(100_000) + b"}"), "400",
             "nested too deeply"),
        Case("http: instances nested 990 deep, REST",
             _post(f"/v1/models/{MODEL}:predict", b'{"instances": ' + deep_list(990) + b"}"), "400"),
        Case("http: instances nested 990 deep, /predict_json",
             _post("/predict_json", b'{"model": "digits", "instances": ' + deep_list(990) + b"}"), "400"),
        Case("http: an image named image 900 times",
             _post(f"/v1/models/{MODEL}:predict", json.dumps({"instances": [named]}).encode()), "400",
             "Unknown instance keys"),
        Case("http: 1 KB of 0xff as JSON", _post(f"/v1/models/{MODEL}:predict", b"\xff" * 1024), "400",
             "Malformed JSON"),
        Case("http: a v2 shape whose size overflows 64 bits",
             _post(f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [
                 {"name": "image", "datatype": "FP32", "shape": [2**32, 2**32], "data": []}]}).encode()),
             "400", "values for shape"),
        Case("http: filter patterns with seed -1",
             _post("/filter_patterns", json.dumps({"model": MODEL, "seed": -1, "filters": 2}).encode()), "400",
             "seed"),
        Case("http: a 64 MB body with its Content-Length", _raw(
            f"/v1/models/{MODEL}:predict", f"Content-Length: {64 * 1024 * 1024}\r\n", _declared(64 * 1024 * 1024)),
             "413", "the limit is"),
        *[Case(f"http: a 200 MB chunked body, {path}", _raw(path, "Transfer-Encoding: chunked\r\n",
                                                             _chunked(b"0," * 512 * 1024, 200)), "413", "limit")
          for path in ("/predict_json", f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer", "/predict")],
    ]
