"""``cnnkit loadtest``: headless locust at each concurrency level, against a running service or one
it starts, with the server's batch sizes, CPU, memory (and GPU) recorded; then the report.

    cnnkit loadtest --model digits --start --repository model_repository --users 1,8,32,64 --duration 30s
    cnnkit loadtest --model digits --url http://127.0.0.1:3000 --grpc 127.0.0.1:8500 --report loadtest-report

Each level runs ``locust --headless`` in a subprocess for ``--duration`` (killed if it overruns
by a minute), loopback only. The statistics of every level are kept under ``REPORT/raw/``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from cnnkit.loadtests.report import LevelResult, read_locust_csv, write_report

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"http": "HttpPredictUser", "grpc": "GrpcPredictUser", "v2-json": "V2HttpJsonUser",
                "v2-binary": "V2HttpBinaryUser", "v2-grpc": "V2GrpcUser"}
GRPC_PROTOCOLS = ("grpc", "v2-grpc")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class LoadTestError(Exception):
    """A setting or a situation the user can fix (printed as one message)."""


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise LoadTestError(f"--users must be a comma-separated list of numbers, got {text!r}.") from error
    if not levels or any(level < 1 for level in levels):
        raise LoadTestError(f"--users needs one or more numbers of at least 1, got {text!r}.")
    return levels


def parse_duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``2m``, ``1m30s`` or ``1h``."""
    match = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text)
    if not match or not any(match.groups()):
        raise LoadTestError(f"--duration must look like 30s, 2m or 1m30s, got {text!r}.")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise LoadTestError("--duration must be at least 1 second.")
    return float(total)


def check_loopback(url: str | None, grpc_target: str | None) -> None:
    host = httpx.URL(url).host if url else None
    grpc_host = grpc_target.rsplit(":", 1)[0] if grpc_target else None
    for name in (host, grpc_host):
        if name is not None and name not in LOOPBACK:
            raise LoadTestError(f"Load tests run against loopback only (127.0.0.1); {name} is not.")


def prepare_images(description: dict[str, Any], folder: Path, count: int, data_dir: str | None) -> Path:
    """Real test images of the model's data set as files in ``folder`` (PNG for the array data sets,
    the original JPEGs for cats vs dogs)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = description.get("dataset")
    if dataset in ("mnist", "fashion_mnist", "cifar10"):
        from PIL import Image

        from cnnkit.training.data import load_dataset

        test = load_dataset(dataset, data_dir, validation_size=10, test_limit=count)
        for index, image in enumerate(test.x_test):
            pixels = image[..., 0] if image.shape[-1] == 1 else image
            Image.fromarray(pixels).save(folder / f"test{index:05d}.png")
        return folder
    if dataset == "cats_and_dogs":
        from cnnkit.training.data import resolve_data_dir
        from cnnkit_client.scoring import find_images

        root = resolve_data_dir(data_dir)
        if root is None:
            raise LoadTestError("Cats vs dogs test images need the data root: --data-dir or CNNKIT_DATA_DIR.")
        for path in find_images(root / "cats_and_dogs_filtered" / "validation")[:count]:
            shutil.copyfile(path, folder / f"{path.parent.name}-{path.name}")
        return folder
    raise LoadTestError(f"No test images known for data set {dataset!r}: pass --images DIR.")


def scrape_batches(url: str, model: str, headers: dict[str, str]) -> tuple[float, float]:
    """(sum, count) of the model's ``cnnkit_inference_batch_size`` histogram from ``/metrics``."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(r'^cnnkit_inference_batch_size_(sum|count)\{[^}]*model="' + re.escape(model) +
                         r'"[^}]*\}\s+([0-9.e+-]+)', re.MULTILINE)
    for kind, value in pattern.findall(text):
        totals[kind] += float(value)
    return totals["sum"], totals["count"]


class ResourceSampler:
    """CPU (sum over the process tree, in % of one core) and resident memory of the server, and the
    GPU's utilisation and memory through NVML when there is one; sampled every half second."""

    def __init__(self, pid: int | None):
        import psutil

        self.process = psutil.Process(pid) if pid else None
        self._known: list[Any] = []
        self.cpu: list[float] = []
        self.rss_mb: list[float] = []
        self.gpu_util: list[float] = []
        self.gpu_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = _nvml_handle()

    def _tree(self) -> list[Any]:
        """The server and its worker processes, the same objects each time (``cpu_percent`` measures
        since the previous call on the same object)."""
        if self.process is None:
            return []
        try:
            current = [self.process, *self.process.children(recursive=True)]
        except Exception:  # noqa: BLE001 - the server went away
            return []
        known = {process.pid: process for process in self._known}
        self._known = [known.get(process.pid, process) for process in current]
        return self._known

    def _run(self) -> None:
        for process in self._tree():
            _safe(process.cpu_percent)  # the first call only starts the measurement
        while not self._stop.wait(0.5):
            processes = self._tree()
            if processes:
                self.cpu.append(sum(_safe(process.cpu_percent) or 0.0 for process in processes))
                self.rss_mb.append(sum(getattr(_safe(process.memory_info), "rss", 0) for process in processes) / 2**20)
            if self._nvml is not None:
                import pynvml

                self.gpu_util.append(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu)
                self.gpu_mb.append(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used / 2**20)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def apply(self, result: LevelResult) -> None:
        if self.cpu:
            result.server_cpu_percent = sum(self.cpu) / len(self.cpu)
        if self.rss_mb:
            result.server_rss_mb_start, result.server_rss_mb_end = self.rss_mb[0], self.rss_mb[-1]
        if self.gpu_util:
            result.gpu_utilization_percent = sum(self.gpu_util) / len(self.gpu_util)
            result.gpu_memory_mb = max(self.gpu_mb)


def _safe(function: Any) -> Any:
    try:
        return function()
    except Exception:  # noqa: BLE001 - a worker process may exit between listing and reading
        return None


def _nvml_handle() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0) if pynvml.nvmlDeviceGetCount() else None
    except Exception:  # noqa: BLE001 - no NVML library or no GPU: CPU-only report
        return None


def run_level(protocol: str, users: int, seconds: float, *, url: str, grpc_target: str | None, model: str,
              images: Path, raw: Path, server_pid: int | None, feature_map_weight: int,
              api_key: str | None, processes: int = 1) -> LevelResult:
    prefix = raw / f"{protocol}-{users}"
    environment = dict(os.environ, CNNKIT_LOADTEST_MODEL=model, CNNKIT_LOADTEST_IMAGES=str(images),
                       CNNKIT_LOADTEST_FEATURE_MAP_WEIGHT=str(feature_map_weight))
    if grpc_target:
        environment["CNNKIT_LOADTEST_GRPC"] = grpc_target
    if api_key:
        environment["CNNKIT_API_KEY"] = api_key
    headers = {"x-api-key": api_key} if api_key else {}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{int(seconds)}s",
               "--stop-timeout", "10", "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "0",
               "--loglevel", "WARNING", USER_CLASSES[protocol]]
    if processes != 1:
        # Locust forks this many load processes (-1: one per core); one process tops out near one
        # core's worth of requests, too few for a GPU server.
        command[-1:-1] = ["--processes", str(processes)]
    batches_before = scrape_batches(url, model, headers)
    with ResourceSampler(server_pid) as sampler, open(f"{prefix}.log", "wb") as log:
        try:
            finished = subprocess.run(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=seconds + 60)
        except subprocess.TimeoutExpired as error:
            raise LoadTestError(f"locust ran more than a minute past --duration ({prefix}.log)") from error
    if finished.returncode != 0:
        raise LoadTestError(f"locust failed with status {finished.returncode}: "
                            f"{Path(f'{prefix}.log').read_text(errors='replace')[-2000:]}")
    result = read_locust_csv(prefix, protocol=protocol, users=users, seconds=seconds)
    batches_after = scrape_batches(url, model, headers)
    images_batched = batches_after[0] - batches_before[0]
    calls = batches_after[1] - batches_before[1]
    result.mean_batch_size = images_batched / calls if calls else None
    sampler.apply(result)
    return result


def run_loadtest(*, url: str, grpc_target: str | None, model: str, levels: list[int], seconds: float,
                 report: Path, protocols: list[str], images: Path | None = None, data_dir: str | None = None,
                 server_pid: int | None = None, feature_map_weight: int = 1, api_key: str | None = None,
                 image_count: int = 200, meta: dict[str, Any] | None = None,
                 processes: int = 1) -> list[LevelResult]:
    check_loopback(url, grpc_target)
    if processes == 0 or processes < -1:
        raise LoadTestError(f"--processes must be at least 1, or -1 for one per CPU core; got {processes}.")
    unknown = [protocol for protocol in protocols if protocol not in USER_CLASSES]
    if unknown or not protocols:
        raise LoadTestError(f"--protocols takes {', '.join(USER_CLASSES)} (comma-separated), "
                            f"got {','.join(protocols)!r}.")
    if any(protocol in GRPC_PROTOCOLS for protocol in protocols) and not grpc_target:
        raise LoadTestError("The gRPC load test needs --grpc HOST:PORT.")
    headers = {"x-api-key": api_key} if api_key else {}
    try:
        description = httpx.get(f"{url}/models/{model}", headers=headers, timeout=30)
    except httpx.HTTPError as error:
        raise LoadTestError(f"Cannot reach the service at {url}: {error}") from error
    if description.status_code != 200:
        raise LoadTestError(f"The service does not serve model {model!r}: {description.text[:300]}")
    described = description.json()
    report.mkdir(parents=True, exist_ok=True)
    raw = report / "raw"
    raw.mkdir(exist_ok=True)
    if images is None:
        images = prepare_images(described, raw / "images", image_count, data_dir)
    results = []
    for protocol in protocols:
        for users in levels:
            result = run_level(protocol, users, seconds, url=url, grpc_target=grpc_target, model=model,
                               images=images, raw=raw, server_pid=server_pid,
                               feature_map_weight=feature_map_weight, api_key=api_key, processes=processes)
            results.append(result)
            print(f"{protocol:9s} {users:4d} users: {result.requests:7,d} requests, {result.failures} failures, "
                  f"{result.requests_per_second:8.1f}/s, p50 {result.median_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, "
                  f"batch {result.mean_batch_size or 0:.1f}", flush=True)
    info = {"model": model, "version": described.get("version"), "providers": described.get("providers"),
            "duration per level": f"{seconds:.0f} s", "cpus": os.cpu_count(),
            "command": " ".join(["cnnkit loadtest", *sys.argv[2:]]) if sys.argv[1:2] == ["loadtest"] else None,
            "feature-map share": f"{feature_map_weight}/{19 + feature_map_weight} of HTTP calls",
            "locust processes": processes if processes > 0 else f"one per core ({os.cpu_count()})",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **(meta or {})}
    write_report(results, report, info)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits", help="model to load-test (default digits)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running service (default http://127.0.0.1:3000)")
    target.add_argument("--start", action="store_true", help="start the service (cnnkit serve) for the test")
    parser.add_argument("--repository", help="with --start: the model repository (default as cnnkit serve)")
    parser.add_argument("--grpc", metavar="TARGET", help="gRPC HOST:PORT (with --start: the started service's)")
    parser.add_argument("--protocols", default=None,
                        help="any of http, grpc, v2-json, v2-binary, v2-grpc (the Open Inference Protocol), "
                             "comma-separated (default: http, plus grpc when known)")
    parser.add_argument("--users", default="1,8,32,64", help="concurrency levels (default 1,8,32,64)")
    parser.add_argument("--duration", default="30s", help="per level (default 30s)")
    parser.add_argument("--report", default="loadtest-report", help="report folder (default loadtest-report)")
    parser.add_argument("--images", help="a folder of test images (default: the model's test set)")
    parser.add_argument("--data-dir", help="data root for the test images (default $CNNKIT_DATA_DIR)")
    parser.add_argument("--feature-map-weight", type=int, default=1,
                        help="HTTP feature-map calls per 19 predictions (default 1; 0: none)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's PID, for CPU and memory")
    parser.add_argument("--processes", type=int, default=1,
                        help="locust load processes (default 1; -1: one per CPU core, for a big or GPU server)")


def run(args: argparse.Namespace) -> int:
    try:
        levels = parse_levels(args.users)
        seconds = parse_duration(args.duration)
        from cnnkit.settings import load_settings

        api_key = load_settings().api_key
        common = {"model": args.model, "levels": levels, "seconds": seconds, "report": Path(args.report),
                  "images": Path(args.images) if args.images else None, "data_dir": args.data_dir,
                  "feature_map_weight": args.feature_map_weight, "api_key": api_key, "processes": args.processes}
        if args.start:
            from cnnkit.repository import resolve_repository
            from cnnkit.serving.process import ServiceProcess

            repository = resolve_repository(args.repository)
            with ServiceProcess(repository, Path(args.report) / "service", api_key=api_key) as service:
                protocols = (args.protocols or "http,grpc").split(",")
                run_loadtest(url=service.url, grpc_target=service.grpc_target, protocols=protocols,
                             server_pid=service.pid, **common)
        else:
            protocols = (args.protocols or ("http,grpc" if args.grpc else "http")).split(",")
            run_loadtest(url=args.url or "http://127.0.0.1:3000", grpc_target=args.grpc, protocols=protocols,
                         server_pid=args.server_pid, **common)
    except LoadTestError as error:
        print(f"cnnkit loadtest: {error}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.report) / 'report.md'}")
    return 0
