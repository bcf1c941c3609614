"""``cnnkit serve --workers N`` against one worker, in one run: HTTP and gRPC throughput and latency
at several client counts, and the ratios to one worker.

    python benchmarks/serving_workers.py [--run runs/mnist_convnet | --tiny-recipe catsdogs_small]
                                         [--model NAME] [--workers 1,2] [--clients 1,16,64,256] [--seconds 10]

HTTP load comes from up to 4 client processes (see serving_throughput.http_load), gRPC from the
SDK's AsyncGrpcClient with one channel per 16 clients, so that the kernel spreads the connections
over the gRPC processes (SO_REUSEPORT balances connections, not calls). The load generator's own
CPU time is printed beside each figure: on a machine with few cores it competes with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import Measured, _drive, http_load, in_process_limit, prepare_model  # noqa: E402


def grpc_load_spread(target: str, image: bytes, model: str, clients: int, seconds: float, label: str) -> Measured:
    """gRPC load over one channel per 16 clients (new connections, spread over the processes)."""
    from cnnkit_client import AsyncGrpcClient

    async def main() -> Measured:
        channels = [AsyncGrpcClient(target) for _ in range(max(1, clients // 16))]
        try:
            counter = iter(range(10**9))

            async def call() -> None:
                client = channels[next(counter) % len(channels)]
                await client.predict(image, model=model, top_k=1)

            for client in channels:
                await client.predict(image, model=model, top_k=1)
            return await _drive(call, clients, seconds, None, label)
        finally:
            for client in channels:
                await client.aclose()

    return asyncio.run(main())


def wait_for_workers(pid: int, port: int, count: int, timeout: float = 180.0) -> None:
    """Until ``count`` processes of the service listen on the gRPC port (each loads its models)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = {child.pid for child in psutil.Process(pid).children(recursive=True)
                   for connection in child.net_connections(kind="tcp")
                   if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port}
        if len(holders) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{count} workers did not all start listening in {timeout:.0f} s")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/mnist_convnet", help="a finished training run")
    parser.add_argument("--tiny-recipe", help="instead of --run: this recipe trained for 1 epoch on 64 images")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 1}", help="worker counts (default 1,CORES)")
    parser.add_argument("--clients", default="1,16,64,256", help="client counts (default 1,16,64,256)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    args = parser.parse_args(argv)
    worker_counts = [int(part) for part in args.workers.split(",")]
    client_counts = [int(part) for part in args.clients.split(",")]

    from cnnkit.serving.process import ServiceProcess

    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-workers-bench-"))
    try:
        _, repository, _, image = prepare_model(args.run, args.tiny_recipe, args.model, workdir)
        files = {"image": ("image.png", image, "image/png")}
        batch, limit, _ = in_process_limit(repository, args.model, args.seconds)
        print(f"in-process ONNX Runtime: {limit:,.0f} images/s at batch {batch}", flush=True)

        table: dict[tuple[str, int, int], tuple[Measured, float]] = {}
        for workers in worker_counts:
            with ServiceProcess(repository, workdir / f"workers-{workers}",
                                environment={"CNNKIT_WORKERS": str(workers)}) as service:
                wait_for_workers(service.pid, service.grpc_port, workers)
                for clients in client_counts:
                    for protocol in ("HTTP", "gRPC"):
                        label = f"{protocol}, {workers} workers, {clients} clients"
                        before = client_cpu_seconds()
                        if protocol == "HTTP":
                            measured = http_load(service.url, "/predict", files, {"model": args.model}, clients,
                                                 args.seconds, None, label)
                        else:
                            measured = grpc_load_spread(service.grpc_target, image, args.model, clients,
                                                        args.seconds, label)
                        table[(protocol, workers, clients)] = (measured, client_cpu_seconds() - before)
                        print(f"{label:34s} {measured.rate:8.1f} req/s  p50 {measured.percentile(0.5):7.1f} ms  "
                              f"p99 {measured.percentile(0.99):7.1f} ms  errors {measured.errors}  "
                              f"load generator CPU {table[(protocol, workers, clients)][1] / measured.seconds:.0%}",
                              flush=True)

        baseline = worker_counts[0]
        print(f"\nratios to {baseline} worker(s), same run ({os.cpu_count()} CPUs shared by clients and server):")
        for protocol in ("HTTP", "gRPC"):
            for workers in worker_counts[1:]:
                for clients in client_counts:
                    one, _ = table[(protocol, baseline, clients)]
                    many, _ = table[(protocol, workers, clients)]
                    print(f"{protocol:4s} {clients:4d} clients: {workers} workers {many.rate / one.rate:5.2f}x "
                          f"throughput, p99 {many.percentile(0.99):7.1f} vs {one.percentile(0.99):7.1f} ms; "
                          f"{many.rate / limit:.0%} of the in-process limit")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
