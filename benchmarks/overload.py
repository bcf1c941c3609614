"""Overload: far more concurrent connections than the service can serve, loopback only, bounded in time.

    python benchmarks/overload.py [--connections 256,1024] [--seconds 15] [--repository DIR]

For each level, that many kept-alive HTTP/1.1 connections send single-digit ``/predict_json``
requests back to back for ``--seconds`` (after a 503 a connection waits as its ``Retry-After``
says, as well-behaved clients and the SDK do; ``--ignore-retry-after`` sends again at once), while
a separate connection probes ``/livez`` every 100 ms.
It prints, per level: requests answered, the share shed (503 from admission control, 429 from
BentoML's concurrency cap), p50 / p99 / max latency of the admitted (200) requests, ``/livez``
p99 and max, and how long after the load stopped a single request was answered in under 100 ms
again. Targets (issue 16, digits model): no admitted request over 1 s; back to normal within 10 s.

Without ``--repository`` it trains a one-epoch digits model (speed does not depend on the
weights) and exports it into a temporary repository.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Level:
    connections: int
    statuses: dict[int, int] = field(default_factory=dict)
    admitted: list[float] = field(default_factory=list)
    livez: list[float] = field(default_factory=list)
    recovery: float | None = None
    errors: int = 0

    @staticmethod
    def percentile(values: list[float], share: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")

    def report(self) -> str:
        def ms(value: float) -> str:
            return f"{value * 1000:.0f} ms"

        answered = sum(self.statuses.values())
        shed = sum(count for status, count in self.statuses.items() if status in (429, 503))
        recovery = f"{self.recovery:.2f} s" if self.recovery is not None else "not within 30 s"
        return (f"{self.connections:5d} connections: {answered:6d} answered, shed {shed / max(1, answered):6.1%} "
                f"({dict(sorted(self.statuses.items()))}), connection errors {self.errors}; admitted p50 "
                f"{ms(self.percentile(self.admitted, 0.5))}, p99 {ms(self.percentile(self.admitted, 0.99))}, max "
                f"{ms(max(self.admitted, default=float('nan')))}; /livez p99 {ms(self.percentile(self.livez, 0.99))}, "
                f"max {ms(max(self.livez, default=float('nan')))}; normal again {recovery} after the load")


async def _request(reader, writer, request: bytes) -> tuple[int, float]:
    """(status, Retry-After seconds or 0) of one request on a kept-alive connection."""
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, retry_after = 0, 0.0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"retry-after":
            retry_after = float(value)
    await reader.readexactly(length)
    return status, retry_after


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _run_level(port: int, connections: int, seconds: float, body: bytes, honour_retry_after: bool) -> Level:
    level = Level(connections)
    request = _post("/predict_json", body)
    stop = time.monotonic() + seconds

    async def client() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            level.errors += 1
            return
        try:
            while time.monotonic() < stop:
                started = time.monotonic()
                status, retry_after = await asyncio.wait_for(_request(reader, writer, request), 60)
                level.statuses[status] = level.statuses.get(status, 0) + 1
                if status == 200:
                    level.admitted.append(time.monotonic() - started)
                elif honour_retry_after and status in (429, 503):
                    # Back off as the answer says (1 s when it does not say), as the SDK does.
                    await asyncio.sleep(min(retry_after or 1.0, max(0.0, stop - time.monotonic())))
        except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError):
            level.errors += 1
        finally:
            writer.close()

    async def probe() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            started = time.monotonic()
            await _request(reader, writer, b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            level.livez.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
        writer.close()

    await asyncio.gather(probe(), *(client() for _ in range(connections)))
    # Recovery: the first lone request answered 200 in under 100 ms after the load stopped.
    ended = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() - ended < 30:
        started = time.monotonic()
        status, _ = await _request(reader, writer, request)
        if status == 200 and time.monotonic() - started < 0.1:
            level.recovery = time.monotonic() - ended
            break
        await asyncio.sleep(0.05)
    writer.close()
    return level


def _digit_body(data_dir: str | None) -> bytes:
    from PIL import Image

    from cnnkit.training.data import load_dataset

    digit = load_dataset("mnist", data_dir, validation_size=10, test_limit=1).x_test[0][..., 0]
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return json.dumps({"model": "digits", "images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="256,1024", help="levels (default 256,1024)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per level (default 15)")
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="send again at once after a 503 (a hostile client; default: wait as Retry-After says)")
    parser.add_argument("--baseline", action="store_true",
                        help="first measure the same service without admission control (the baseline)")
    parser.add_argument("--max-concurrency", type=int, help="the service's max_concurrency setting (default: its own)")
    parser.add_argument("--repository", help="a repository with a 'digits' model (default: train a tiny one)")
    parser.add_argument("--data-dir", default=os.environ.get("CNNKIT_DATA_DIR"),
                        help="data root (default $CNNKIT_DATA_DIR)")
    args = parser.parse_args(argv)
    import resource

    from cnnkit.serving.process import ServiceProcess

    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-overload-"))
    repository = Path(args.repository) if args.repository else None
    if repository is None:
        from tiny_runs import train_tiny_run

        from cnnkit.training.export import export_run

        repository = workdir / "model_repository"
        export_run(train_tiny_run("mnist_convnet", workdir, args.data_dir), name="digits", repository=repository,
                   data_dir=args.data_dir, check_accuracy=False)
    body = _digit_body(args.data_dir)
    configurations: list[tuple[str, dict[str, str]]] = [("admission control", {})]
    if args.baseline:
        # The same service without admission control, as before it existed: BentoML's cap of 512
        # requests in progress, no bound on the batch queue.
        configurations.insert(0, ("without admission control", {
            "CNNKIT_MAX_CONCURRENCY": "512", "CNNKIT_MAX_QUEUE": "1000000", "CNNKIT_MAX_QUEUE_MS": "1000000"}))
    for label, settings in configurations:
        environment = {"CNNKIT_ACCESS_LOG": "0", **settings}
        if args.max_concurrency and not settings:
            environment["CNNKIT_MAX_CONCURRENCY"] = str(args.max_concurrency)
        print(f"{label}:", flush=True)
        with ServiceProcess(repository, workdir, environment=environment) as service:
            for connections in (int(value) for value in args.connections.split(",")):
                cpu_before = os.times()
                level = asyncio.run(_run_level(service.http_port, connections, args.seconds, body,
                                               not args.ignore_retry_after))
                cpu = os.times()
                client_cpu = (cpu.user + cpu.system) - (cpu_before.user + cpu_before.system)
                print(level.report(), f"(load generator CPU {client_cpu / args.seconds:.0%} of a core)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
