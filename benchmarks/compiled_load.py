"""The service under compiled load generators, per protocol and client count, in one run.

wrk (HTTP/1.1: ``/predict`` multipart and TF Serving's REST JSON) and h2load (gRPC ``Predict``,
a pre-framed request body) leave the cores to the server, unlike a Python load generator. For
each protocol and level: req/s and the generator's own p50/p99 (wrk only: h2load reports no
percentiles), the server's mean inference batch (from ``/metrics``, before and after), and p50/p99
from a Python client at the same level (the SDK over gRPC; over HTTP, kept-alive connections on
raw asyncio streams from one process, or httpx with ``--python-client httpx``, whose own 1-4 ms of
CPU per call on the server's cores shows up in its latencies), since wrk's latency figures are
unreliable against some servers; and the server's stalls during the level (garbage
collections over 25 ms, event-loop lags over 50 ms, from ``/metrics``). Then the issue's targets,
as ratios of this run.

    python benchmarks/compiled_load.py [--run runs/mnist_convnet | --tiny-recipe mnist_convnet]
                                       [--model digits] [--clients 1,16,64] [--seconds 10]
                                       [--workers 1] [--protocols grpc,multipart,rest,b64]
                                       [--python-client lean|httpx]

Needs ``wrk`` and ``h2load`` (Debian: ``apt-get install wrk nghttp2-client``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def batch_totals(url: str, model: str) -> tuple[float, float]:
    """(ONNX Runtime calls, images in them) so far, from the batch-size histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = {"count": 0.0, "sum": 0.0}
    for kind, labels, value in re.findall(r"^cnnkit_inference_batch_size_(count|sum)\{([^}]*)\} (\S+)$", text,
                                          re.MULTILINE):
        if f'model="{model}"' in labels:
            total[kind] += float(value)
    return total["count"], total["sum"]


def settle(url: str, seconds: float = 5.0) -> None:
    """Wait until no HTTP request is in progress on the server (at most ``seconds``): a load
    generator that stops leaves its last requests running for a moment, and the next level's
    clients would find their slots taken (429) if they started at once."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        busy = sum(float(value) for endpoint, value in re.findall(
            r'^bentoml_service_request_in_progress\{endpoint="([^"]+)"[^}]*\} (\S+)$', text, re.MULTILINE)
            if endpoint != "/metrics")
        if busy == 0:
            return
        time.sleep(0.1)


def pauses(url: str) -> dict[str, float]:
    """Cumulative counts so far: garbage collections over 25 ms (any generation) and event-loop
    lags over 50 ms, summed over the server processes (from ``/metrics``), and the longest bucket seen."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = {"gc": 0.0, "gc_all": 0.0, "lag": 0.0, "lag_all": 0.0}
    for name, key, bound in (("cnnkit_gc_pause_seconds", "gc", "0.025"),
                             ("cnnkit_event_loop_lag_seconds", "lag", "0.05")):
        for le, value in re.findall(rf'^{name}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', text, re.MULTILINE):
            if le == bound:
                counts[key] -= float(value)
            elif le == "+Inf":
                counts[key] += float(value)
                counts[f"{key}_all"] += float(value)
    return counts


def _required(pattern: str, output: str) -> str:
    """The first group of ``pattern`` in a load generator's output (SystemExit if it is not there)."""
    match = re.search(pattern, output)
    if match is None:
        raise SystemExit(f"unexpected load generator output (no {pattern!r}):\n{output}")
    return match[1]


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    return float(match[1]) * _UNIT[match[2]] if match else float("nan")


def run_wrk(url: str, path: str, body: bytes, content_type: str, clients: int, seconds: float,
            workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    (workdir / "body.bin").write_bytes(body)
    script.write_text(
        'local f = io.open("' + str(workdir / "body.bin") + '", "rb")\n'
        "wrk.method = \"POST\"\nwrk.body = f:read(\"*all\")\nf:close()\n"
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
    )
    output = subprocess.run(["wrk", "-t", str(min(2, clients)), "-c", str(clients), "-d", f"{seconds:.0f}s",
                             "--latency", "-s", str(script), url + path], capture_output=True, text=True,
                            check=True).stdout
    rate = float(_required(r"Requests/sec:\s+([\d.]+)", output))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    return {"rate": rate, "errors": float(errors[1]) if errors else 0.0,
            "p50": _milliseconds(percentiles.get("50", "nan")), "p99": _milliseconds(percentiles.get("99", "nan"))}


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def run_h2load(target: str, body: bytes, clients: int, seconds: float, workdir: Path) -> dict[str, float]:
    (workdir / "grpc.bin").write_bytes(body)
    output = subprocess.run(
        ["h2load", "-c", str(clients), "-m", "1", "-t", str(min(2, clients)), "-D", f"{seconds:.0f}",
         "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(workdir / "grpc.bin"),
         f"http://{target}/tensorflow.serving.PredictionService/Predict"],
        capture_output=True, text=True, check=True).stdout
    rate = float(_required(r"finished in [\d.]+\w+, ([\d.]+) req/s", output))
    failed = re.search(r"requests: .* (\d+) failed", output)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    return {"rate": rate, "errors": float(failed[1]) if failed else 0.0,
            "mean": _milliseconds(mean[1]) if mean else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/mnist_convnet")
    parser.add_argument("--tiny-recipe", default=None)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1, help="server processes (cnnkit serve --workers)")
    parser.add_argument("--protocols", default="grpc,multipart,rest,b64",
                        help="which of grpc, multipart, rest (JSON pixels), b64 (JSON base64) to run")
    parser.add_argument("--python-client", choices=("lean", "httpx"), default="lean",
                        help="the Python client that cross-checks HTTP latencies: raw asyncio streams "
                             "in one process (lean) or httpx in up to four processes")
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)}: apt-get install wrk nghttp2-client", file=sys.stderr)
        return 2
    levels = [int(level) for level in args.clients.split(",")]

    import numpy as np
    from PIL import Image
    from serving_throughput import grpc_load, http_load, lean_http_load, multipart_body, prepare_model

    from cnnkit.serving.process import ServiceProcess
    from cnnkit_client.protos.tfs import predict_pb2
    from cnnkit_client.tensors import to_tensor_proto

    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-compiled-load-"))
    try:
        _, repository, metadata, image = prepare_model(args.run, args.tiny_recipe, args.model, workdir)
        height, width, channels = metadata["input"]["shape"]
        pixels = np.asarray(Image.open(__import__("io").BytesIO(image)), np.float32).reshape(1, height, width,
                                                                                           channels)
        files = {"image": ("image.png", image, "image/png")}
        multipart, multipart_type = multipart_body({"model": args.model}, files)
        rest_json = json.dumps({"instances": pixels.tolist()}).encode()
        rest_b64 = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
        request = predict_pb2.PredictRequest()
        request.model_spec.name = args.model
        request.inputs["image"].CopyFrom(to_tensor_proto(np.array([image], dtype=object)))
        grpc_body = grpc_frame(request.SerializeToString())

        rows = []
        with ServiceProcess(repository, workdir, environment={"CNNKIT_WORKERS": str(args.workers)}) as service:
            protocols = {
                "gRPC Predict (h2load)": lambda clients: run_h2load(service.grpc_target, grpc_body, clients,
                                                                    args.seconds, workdir),
                "HTTP /predict multipart (wrk)": lambda clients: run_wrk(
                    service.url, "/predict", multipart, multipart_type, clients, args.seconds, workdir),
                "REST JSON pixels (wrk)": lambda clients: run_wrk(
                    service.url, f"/v1/models/{args.model}:predict", rest_json, "application/json", clients,
                    args.seconds, workdir),
                "REST JSON b64 (wrk)": lambda clients: run_wrk(
                    service.url, f"/v1/models/{args.model}:predict", rest_b64, "application/json", clients,
                    args.seconds, workdir),
            }
            python_clients = {
                "gRPC Predict (h2load)": lambda clients: grpc_load(service.grpc_target, image, args.model, clients,
                                                                   args.seconds, "python gRPC"),
                "HTTP /predict multipart (wrk)": lambda clients: http_load(
                    service.url, "/predict", files, {"model": args.model}, clients, args.seconds, None,
                    "python HTTP"),
                "REST JSON pixels (wrk)": lambda clients: http_load(
                    service.url, f"/v1/models/{args.model}:predict", None, None, clients, args.seconds, None,
                    "python REST", content=rest_json, headers={"Content-Type": "application/json"}),
            }
            if args.python_client == "lean":
                python_clients.update({
                    "HTTP /predict multipart (wrk)": lambda clients: lean_http_load(
                        service.url, "/predict", multipart, multipart_type, clients, args.seconds, "python HTTP"),
                    "REST JSON pixels (wrk)": lambda clients: lean_http_load(
                        service.url, f"/v1/models/{args.model}:predict", rest_json, "application/json", clients,
                        args.seconds, "python REST"),
                })
            chosen = {"grpc": "gRPC Predict (h2load)", "multipart": "HTTP /predict multipart (wrk)",
                      "rest": "REST JSON pixels (wrk)", "b64": "REST JSON b64 (wrk)"}
            unknown = set(args.protocols.split(",")) - set(chosen)
            if unknown:
                raise SystemExit(f"unknown protocols {sorted(unknown)}; choose from {sorted(chosen)}")
            protocols = {chosen[name]: protocols[chosen[name]] for name in args.protocols.split(",")}
            for protocol, generate in protocols.items():
                for clients in levels:
                    settle(service.url)
                    calls_before, images_before = batch_totals(service.url, args.model)
                    paused_before = pauses(service.url)
                    measured = generate(clients)
                    calls_after, images_after = batch_totals(service.url, args.model)
                    paused_after = pauses(service.url)
                    measured.update({key: paused_after[key] - paused_before[key] for key in paused_after})
                    calls = calls_after - calls_before
                    mean_batch = (images_after - images_before) / calls if calls else float("nan")
                    python = python_clients.get(protocol)
                    settle(service.url)
                    checked = python(clients) if python is not None else None
                    rows.append((protocol, clients, measured, mean_batch, checked))
                    print(f"{protocol} {clients}: {measured['rate']:.0f} req/s, batch {mean_batch:.1f}",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.workers} server process(es); HTTP cross-checked with the {args.python_client} Python client")
    print("| protocol | clients | req/s | generator p50 / p99 ms | mean batch | GC > 25 ms | loop lag > 50 ms "
          "| Python client req/s | Python p50 / p99 ms | p99 / p50 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for protocol, clients, measured, mean_batch, checked in rows:
        generator = (f"{measured['p50']:.2f} / {measured['p99']:.2f}" if "p50" in measured
                     else f"mean {measured['mean']:.2f}")
        if checked is not None:
            p50, p99 = checked.percentile(0.5), checked.percentile(0.99)
            cross_check = f"{checked.rate:,.0f} | {p50:.2f} / {p99:.2f} | {p99 / p50:.1f}"
        else:
            cross_check = "– | – | –"
        errors = f" ({measured['errors']:.0f} errors)" if measured["errors"] else ""
        stalls = (f"{measured['gc']:.0f} of {measured['gc_all']:.0f} | "
                  f"{measured['lag']:.0f} of {measured['lag_all']:.0f}")
        print(f"| {protocol} | {clients} | {measured['rate']:,.0f}{errors} | {generator} | {mean_batch:.1f} | "
              f"{stalls} | {cross_check} |")
    rates = {(protocol, clients): measured["rate"] for protocol, clients, measured, _, _ in rows}
    for protocol in protocols:
        low, high = rates.get((protocol, min(levels))), rates.get((protocol, max(levels)))
        if low and high:
            print(f"{protocol}: {max(levels)} clients / {min(levels)} client = {high / low:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
