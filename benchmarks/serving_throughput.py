"""Serving benchmarks: cnnkit against the in-process limit and against a naive BentoML service.

For one trained run (default ``runs/mnist_convnet``), in one process, on one machine:

1. the limit: in-process ONNX Runtime images/s at the best batch size, and its latency for one image;
2. cnnkit (``cnnkit serve``): single-image requests from 64 concurrent clients over HTTP
   (``POST /predict``, multipart) and gRPC (the SDK's ``AsyncGrpcClient``), and from one client;
3. the naive BentoML service (``benchmarks/naive_bentoml_service.py``: Keras ``model.predict`` per
   request, no batching) under the same HTTP load.

Prints throughput and p50/p99 latency of each, and the ratios the project targets: cnnkit/naive
throughput at equal concurrency (>= 5x), cnnkit gRPC/limit at 64 clients (>= 50%), and the serving
overhead at concurrency 1 (cnnkit p50 minus in-process latency, <= 3 ms). ``--soak`` also sends
50,000 requests from 32 clients and reports the server's resident memory before and after.

    python benchmarks/serving_throughput.py [--run runs/mnist_convnet | --tiny-recipe catsdogs_small]
                                            [--model NAME] [--seconds 20] [--soak]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclass
class Measured:
    label: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def _drive(call, clients: int, seconds: float | None, total: int | None, label: str) -> Measured:
    """``clients`` concurrent loops calling ``call()`` until ``seconds`` pass or ``total`` calls are made."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    started = time.perf_counter()
    deadline = started + seconds if seconds else float("inf")

    async def loop() -> None:
        nonlocal errors, issued
        while time.perf_counter() < deadline and (total is None or issued < total):
            issued += 1
            began = time.perf_counter()
            try:
                await call()
                latencies.append((time.perf_counter() - began) * 1000)
            except Exception:  # noqa: BLE001 - counted, not fatal
                errors += 1

    await asyncio.gather(*(loop() for _ in range(clients)))
    return Measured(label, len(latencies), errors, time.perf_counter() - started, latencies)


def http_load(url: str, path: str, files: dict | None, data: dict | None, clients: int, seconds: float | None,
              total: int | None, label: str, content: bytes | None = None,
              headers: dict[str, str] | None = None) -> Measured:
    """HTTP load from several client processes (one httpx pool serving 64 connections spends more
    CPU than the server it measures), each with its share of the clients."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    processes = max(1, min(4, clients // 8))
    shares = [clients // processes + (1 if index < clients % processes else 0) for index in range(processes)]
    totals = [None if total is None else total // processes + (1 if index < total % processes else 0)
              for index in range(processes)]
    if processes == 1:
        return _http_load_one(url, path, files, data, clients, seconds, total, label, content, headers)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_http_load_one, [url] * processes, [path] * processes, [files] * processes,
                              [data] * processes, shares, [seconds] * processes, totals, [label] * processes,
                              [content] * processes, [headers] * processes))
    return Measured(label, sum(part.requests for part in parts), sum(part.errors for part in parts),
                    max(part.seconds for part in parts), [value for part in parts for value in part.latencies_ms])


def _http_load_one(url: str, path: str, files: dict | None, data: dict | None, clients: int,
                   seconds: float | None, total: int | None, label: str, content: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Measured:
    import httpx

    async def main() -> Measured:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            async def call() -> None:
                if content is not None:
                    response = await client.post(path, content=content, headers=headers)
                else:
                    response = await client.post(path, files=files, data=data)
                response.raise_for_status()

            await call()  # warm-up
            return await _drive(call, clients, seconds, total, label)

    return asyncio.run(main())


async def _read_http_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response (Content-Length or chunked body): (status, connection kept)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
    if length is not None:
        await reader.readexactly(int(length.group(1)))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF (the final CRLF after size 0)
            if size == 0:
                break
    else:
        await reader.read()
        return status, False
    return status, b"\r\nconnection: close" not in lower


def lean_http_load(url: str, path: str, body: bytes, content_type: str, clients: int, seconds: float,
                   label: str) -> Measured:
    """``clients`` kept-alive HTTP/1.1 connections from one process, each sending ``body`` as fast
    as answers come, on raw asyncio streams: tens of microseconds of client CPU per call, against
    1-4 ms for httpx, so that the latencies measured are the server's and not the client's (the
    client shares the cores with the server here)."""
    from urllib.parse import urlsplit

    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def main() -> Measured:
        async def one(streams: list) -> None:
            if not streams:
                streams.extend(await asyncio.open_connection(host, port))
            reader, writer = streams
            writer.write(request)
            status, kept = await _read_http_response(reader)
            if not kept:
                writer.close()
                streams.clear()
            if status >= 400:
                raise RuntimeError(f"HTTP {status}")

        pools: list[list] = [[] for _ in range(clients)]
        await asyncio.gather(*(one(streams) for streams in pools))  # warm-up: connect every client
        free = list(pools)

        async def call() -> None:
            streams = free.pop()
            try:
                await one(streams)
            except Exception:
                if streams:
                    streams[1].close()
                streams.clear()
                raise
            finally:
                free.append(streams)

        measured = await _drive(call, clients, seconds, None, label)
        for streams in pools:
            if streams:
                streams[1].close()
        return measured

    return asyncio.run(main())


def http_lean_one(url: str, path: str, body: bytes, content_type: str, seconds: float, label: str,
                  extra_headers: dict[str, str] | None = None) -> Measured:
    """One client on one kept-alive ``http.client`` connection: the latency the service adds with
    as little client-library cost as possible (an httpx client adds 1-4 ms of its own per call)."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            began = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                latencies.append((time.perf_counter() - began) * 1000)
            else:
                errors += 1
    finally:
        connection.close()
    return Measured(label, len(latencies), errors, time.perf_counter() - started, latencies)


def multipart_body(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request, as a browser or httpx would send it."""
    boundary = "cnnkit-benchmark-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, media_type) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {media_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def grpc_load(target: str, image: bytes, model: str, clients: int, seconds: float, label: str,
              protocol: str = "cnnkit") -> Measured:
    from cnnkit_client import AsyncGrpcClient

    async def main() -> Measured:
        async with AsyncGrpcClient(target, protocol=protocol) as client:
            async def call() -> None:
                await client.predict(image, model=model, top_k=1)

            await call()
            return await _drive(call, clients, seconds, None, label)

    return asyncio.run(main())


def v2_bodies(image: bytes) -> tuple[bytes, tuple[bytes, dict[str, str]]]:
    """One image as a v2 infer request (top class by the classification extension): the JSON body,
    and the binary-extension body with its headers (the encoded file as a BYTES element)."""
    output: dict[str, Any] = {"name": "probabilities", "parameters": {"classification": 1}}
    json_body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                        "data": [base64.b64encode(image).decode("ascii")]}],
                            "outputs": [output]}).encode()
    from cnnkit_client._v2 import encode_bytes_elements

    raw = encode_bytes_elements([image])
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{**output, "parameters": {**output["parameters"], "binary_data": True}}]}).encode()
    return json_body, (header + raw, {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"})


def in_process_limit(repository: Path, model: str, seconds: float) -> tuple[int, float, float]:
    """(best batch size, images/s at it, p50 ms of one image) with the service's ONNX Runtime session.

    The session's pool threads spin between runs here, ONNX Runtime's fastest setting for
    back-to-back batches, so the limit is not understated. The service itself runs without
    spinning (see ``cnnkit.serving.model_store.session_options``).
    """
    import numpy as np

    from cnnkit.serving.model_store import ModelStore

    store = ModelStore(repository, spin=True)
    store.refresh()
    served = store.get(model)
    rng = np.random.default_rng(0)
    best = (1, 0.0)
    single: list[float] = []
    for batch in (1, 8, 32, 64, 128):
        images = rng.integers(0, 256, (batch, *served.input_shape)).astype(np.float32)
        served.predict(images)
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < seconds / 5:
            began = time.perf_counter()
            served.predict(images)
            if batch == 1:
                single.append((time.perf_counter() - began) * 1000)
            count += batch
        rate = count / (time.perf_counter() - started)
        if rate > best[1]:
            best = (batch, rate)
    return best[0], best[1], statistics.median(single)


def prepare_model(run: str, tiny_recipe: str | None, model: str, workdir: Path,
                  repository: str | None = None) -> tuple[Path, Path, dict[str, Any], bytes]:
    """(run directory, repository, metadata, a grey PNG of the model's input size): the run (or a
    tiny one of ``tiny_recipe``, since speed does not depend on the weights) exported into
    ``workdir/model_repository``, or, given ``repository``, the model already exported there
    (exporting VGG16 takes minutes on 2 cores)."""
    from PIL import Image

    from cnnkit.training.export import export_run

    if tiny_recipe:
        from tiny_runs import train_tiny_run

        run_dir = train_tiny_run(tiny_recipe, workdir, os.environ.get("CNNKIT_DATA_DIR"))
    else:
        run_dir = Path(run)
    if repository is not None:
        served = Path(repository)
    else:
        served = workdir / "model_repository"
        export_run(run_dir, name=model, repository=served, check_accuracy=False)
    versions = sorted(served.glob(f"{model}/*/assets.extra/metadata.json"), key=lambda path: int(path.parts[-3]))
    if not versions:
        raise SystemExit(f"no exported model {model!r} in {served}")
    repository_path = served
    metadata = json.loads(versions[-1].read_text())
    height, width, channels = metadata["input"]["shape"]
    buffer = io.BytesIO()
    Image.new("L" if channels == 1 else "RGB", (width, height), 128).save(buffer, format="PNG")
    return run_dir, repository_path, metadata, buffer.getvalue()


def service_memory_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root, *root.children(recursive=True)]) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/mnist_convnet", help="a finished training run")
    parser.add_argument("--tiny-recipe", help="instead of --run: this recipe trained for 1 epoch on 64 images "
                        "(speed does not depend on the weights), e.g. catsdogs_small")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--repository", help="serve the model already exported in this repository instead of "
                        "exporting --run (whose model.keras the naive service still loads)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--soak", action="store_true", help="also 50,000 requests from 32 clients")
    parser.add_argument("--soak-requests", type=int, default=50_000)
    args = parser.parse_args(argv)


    from cnnkit.serving.process import ServiceProcess, free_port

    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-serving-bench-"))
    try:
        run_dir, repository, metadata, image = prepare_model(args.run, args.tiny_recipe, args.model, workdir,
                                                             args.repository)
        files = {"image": ("image.png", image, "image/png")}

        batch, limit, single_ms = in_process_limit(repository, args.model, args.seconds)
        print(f"in-process ONNX Runtime: {limit:,.0f} images/s at batch {batch}; one image {single_ms:.2f} ms")
        results: list[Measured] = []
        with ServiceProcess(repository, workdir) as service:
            memory_start = service_memory_mb(service.pid)
            one = http_load(service.url, "/predict", files, {"model": args.model}, 1, args.seconds, None,
                            "cnnkit HTTP, 1 client")
            body, content_type = multipart_body({"model": args.model}, files)
            lean = http_lean_one(service.url, "/predict", body, content_type, args.seconds,
                                 "cnnkit HTTP, 1 http.client")
            grpc_one = grpc_load(service.grpc_target, image, args.model, 1, args.seconds, "cnnkit gRPC, 1 client")
            http_many = http_load(service.url, "/predict", files, {"model": args.model}, args.clients,
                                  args.seconds, None, f"cnnkit HTTP, {args.clients} clients")
            grpc_many = grpc_load(service.grpc_target, image, args.model, args.clients, args.seconds,
                                  f"cnnkit gRPC, {args.clients} clients")
            results += [one, lean, grpc_one, http_many, grpc_many]
            # The Open Inference Protocol (v2) on the same service: JSON, binary tensors, gRPC.
            v2_path = f"/v2/models/{args.model}/infer"
            json_body, (binary_body, binary_headers) = v2_bodies(image)
            v2_lean = http_lean_one(service.url, v2_path, json_body, "application/json", args.seconds,
                                    "v2 HTTP JSON, 1 http.client")
            v2_lean_binary = http_lean_one(service.url, v2_path, binary_body, "application/octet-stream",
                                           args.seconds, "v2 HTTP binary, 1 http.client",
                                           {"Inference-Header-Content-Length":
                                            binary_headers["Inference-Header-Content-Length"]})
            v2_grpc_one = grpc_load(service.grpc_target, image, args.model, 1, args.seconds, "v2 gRPC, 1 client",
                                    protocol="v2")
            v2_json_many = http_load(service.url, v2_path, None, None, args.clients, args.seconds, None,
                                     f"v2 HTTP JSON, {args.clients} clients", content=json_body,
                                     headers={"Content-Type": "application/json"})
            v2_binary_many = http_load(service.url, v2_path, None, None, args.clients, args.seconds, None,
                                       f"v2 HTTP binary, {args.clients} clients", content=binary_body,
                                       headers=binary_headers)
            v2_grpc_many = grpc_load(service.grpc_target, image, args.model, args.clients, args.seconds,
                                     f"v2 gRPC, {args.clients} clients", protocol="v2")
            results += [v2_lean, v2_lean_binary, v2_grpc_one, v2_json_many, v2_binary_many, v2_grpc_many]
            if args.soak:
                memory_before = service_memory_mb(service.pid)
                soak = http_load(service.url, "/predict", files, {"model": args.model}, 32, None,
                                 args.soak_requests, "soak: cnnkit HTTP, 32 clients")
                results.append(soak)
                memory_after = service_memory_mb(service.pid)
            memory_end = service_memory_mb(service.pid)

        naive_port = free_port()
        environment = dict(os.environ, NAIVE_KERAS_MODEL=str((run_dir / "model.keras").resolve()),
                           NAIVE_CLASS_NAMES=json.dumps(metadata["class_names"]), BENTOML_DO_NOT_TRACK="True",
                           BENTOML_HOME=str(workdir / "bentoml-naive"))
        bentoml_bin = Path(sys.executable).with_name("bentoml")
        with open(workdir / "naive.log", "wb") as log:
            naive = subprocess.Popen([str(bentoml_bin), "serve", "benchmarks.naive_bentoml_service:NaiveClassifier",
                                      "--port", str(naive_port), "--host", "127.0.0.1"],
                                     cwd=Path(__file__).resolve().parents[1], env=environment, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            import httpx

            naive_url = f"http://127.0.0.1:{naive_port}"
            for _ in range(240):
                try:
                    if httpx.get(f"{naive_url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if naive.poll() is not None:
                    raise RuntimeError((workdir / "naive.log").read_text()[-2000:])
                time.sleep(0.5)
            naive_one = http_load(naive_url, "/classify", files, {}, 1, args.seconds, None, "naive BentoML, 1 client")
            naive_many = http_load(naive_url, "/classify", files, {}, args.clients, args.seconds, None,
                                   f"naive BentoML, {args.clients} clients")
            results += [naive_one, naive_many]
        finally:
            os.killpg(naive.pid, 15)
            naive.wait(timeout=30)

        print(f"\n{'':34s} {'requests':>9s} {'errors':>7s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s}")
        for result in results:
            print(f"{result.label:34s} {result.requests:9,d} {result.errors:7d} {result.rate:8.1f} "
                  f"{result.percentile(0.5):7.2f} {result.percentile(0.99):7.2f}")
        print(f"\ncnnkit HTTP / naive, {args.clients} clients: {http_many.rate / naive_many.rate:.1f}x (target >= 5x)")
        print(f"cnnkit gRPC / naive, {args.clients} clients: {grpc_many.rate / naive_many.rate:.1f}x")
        print(f"cnnkit gRPC / in-process limit, {args.clients} clients: {grpc_many.rate / limit:.0%} (target >= 50%)")
        print(f"cnnkit HTTP / in-process limit, {args.clients} clients: {http_many.rate / limit:.0%}")
        print(f"serving overhead at 1 client (p50 - in-process {single_ms:.2f} ms): HTTP "
              f"{lean.percentile(0.5) - single_ms:.2f} ms with http.client ({one.percentile(0.5) - single_ms:.2f} ms "
              f"with httpx), gRPC {grpc_one.percentile(0.5) - single_ms:.2f} ms (target <= 3 ms)")
        for measured in (v2_json_many, v2_binary_many, v2_grpc_many):
            print(f"{measured.label} / naive: {measured.rate / naive_many.rate:.1f}x; / in-process limit: "
                  f"{measured.rate / limit:.0%}; / cnnkit's own protocol: "
                  f"{measured.rate / (grpc_many if 'gRPC' in measured.label else http_many).rate:.2f}x")
        print(f"v2 serving overhead at 1 client (p50 - in-process): HTTP JSON "
              f"{v2_lean.percentile(0.5) - single_ms:.2f} ms, HTTP binary "
              f"{v2_lean_binary.percentile(0.5) - single_ms:.2f} ms, "
              f"gRPC {v2_grpc_one.percentile(0.5) - single_ms:.2f} ms")
        print(f"server memory: {memory_start:.0f} MB at start, {memory_end:.0f} MB at the end")
        if args.soak:
            print(f"soak: {soak.requests:,} requests, {soak.errors} errors, memory {memory_before:.0f} -> "
                  f"{memory_after:.0f} MB ({memory_after - memory_before:+.0f} MB; target < 50 MB)")
        print(f"{os.cpu_count()} CPUs; client and server share them")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
