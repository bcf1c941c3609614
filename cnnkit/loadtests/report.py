"""The load-test report: per concurrency level and protocol, throughput, latency percentiles,
errors, the server's batch sizes and resources; written as JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LevelResult:
    """One locust run: ``users`` concurrent users of one protocol for ``seconds``."""

    protocol: str
    users: int
    seconds: float
    requests: int
    failures: int
    requests_per_second: float
    median_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    by_name: dict[str, dict[str, float]] = field(default_factory=dict)
    failure_messages: dict[str, int] = field(default_factory=dict)
    mean_batch_size: float | None = None
    server_cpu_percent: float | None = None
    server_rss_mb_start: float | None = None
    server_rss_mb_end: float | None = None
    gpu_utilization_percent: float | None = None
    gpu_memory_mb: float | None = None


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_locust_csv(prefix: str | os.PathLike, *, protocol: str, users: int, seconds: float) -> LevelResult:
    """A ``LevelResult`` from locust's ``PREFIX_stats.csv`` and ``PREFIX_failures.csv``."""
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.is_file():
        raise FileNotFoundError(f"locust wrote no statistics ({stats_path} is missing)")
    with open(stats_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_name = {}
    aggregated = None
    for row in rows:
        summary: dict[str, Any] = {
                   "requests": int(_number(row["Request Count"])), "failures": int(_number(row["Failure Count"])),
                   "requests_per_second": _number(row["Requests/s"]), "median_ms": _number(row["50%"]),
                   "p95_ms": _number(row["95%"]), "p99_ms": _number(row["99%"]),
                   "mean_ms": _number(row["Average Response Time"])}
        if row["Name"] == "Aggregated":
            aggregated = summary
        else:
            by_name[f"{row['Type']} {row['Name']}"] = summary
    if aggregated is None:
        raise ValueError(f"{stats_path} has no Aggregated row")
    failures: dict[str, int] = {}
    failures_path = Path(f"{prefix}_failures.csv")
    if failures_path.is_file():
        with open(failures_path, newline="") as handle:
            for row in csv.DictReader(handle):
                message = f"{row['Name']}: {row['Error']}"[:300]
                failures[message] = failures.get(message, 0) + int(_number(row["Occurrences"]))
    return LevelResult(protocol=protocol, users=users, seconds=seconds, by_name=by_name,
                       failure_messages=failures, **aggregated)


def _format(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}"


def markdown(results: list[LevelResult], meta: dict[str, Any]) -> str:
    lines = [f"# Load test: model `{meta.get('model')}`", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "model"]
    lines += ["", "| protocol | users | requests | failures | requests/s | p50 ms | p95 ms | p99 ms | "
                  "mean batch | server CPU % | server RSS MB (start → end) | GPU % | GPU MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        rss = f"{_format(result.server_rss_mb_start, 0)} → {_format(result.server_rss_mb_end, 0)}"
        lines.append(
            f"| {result.protocol} | {result.users} | {result.requests:,} | {result.failures:,} | "
            f"{_format(result.requests_per_second)} | {_format(result.median_ms, 0)} | {_format(result.p95_ms, 0)} | "
            f"{_format(result.p99_ms, 0)} | {_format(result.mean_batch_size)} | "
            f"{_format(result.server_cpu_percent, 0)} | {rss} | {_format(result.gpu_utilization_percent, 0)} | "
            f"{_format(result.gpu_memory_mb, 0)} |")
    failed = [result for result in results if result.failure_messages]
    if failed:
        lines += ["", "## Failures", ""]
        for result in failed:
            for message, count in sorted(result.failure_messages.items(), key=lambda item: -item[1])[:5]:
                lines.append(f"- {result.protocol}, {result.users} users: {count} × {message}")
    lines += ["", "![throughput](throughput.png)", "", "![latency](latency.png)", ""]
    return "\n".join(lines)


def plot(results: list[LevelResult], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({result.protocol for result in results})
    written = []
    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for protocol in protocols:
        points = sorted((r.users, r.requests_per_second) for r in results if r.protocol == protocol)
        axis.plot(*zip(*points, strict=True), marker="o", label=protocol)
    axis.set(xlabel="concurrent users", ylabel="requests/s", title="Throughput", xscale="log")
    _user_ticks(axis, results)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    written.append(_save(figure, directory / "throughput.png"))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for protocol, color in zip(protocols, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        for attribute, style in (("median_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            points = sorted((r.users, getattr(r, attribute)) for r in results if r.protocol == protocol)
            axis.plot(*zip(*points, strict=True), style, marker="o", color=color,
                      label=f"{protocol} {attribute.split('_')[0].replace('median', 'p50')}")
    axis.set(xlabel="concurrent users", ylabel="latency (ms)", title="Latency", xscale="log", yscale="log")
    _user_ticks(axis, results)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    written.append(_save(figure, directory / "latency.png"))
    plt.close(figure)
    return written


def _user_ticks(axis: Any, results: list[LevelResult]) -> None:
    levels = sorted({result.users for result in results})
    axis.set_xticks(levels, [str(level) for level in levels])
    axis.minorticks_off()


def _save(figure: Any, path: Path) -> Path:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        figure.savefig(handle, format="png")
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


def write_report(results: list[LevelResult], directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Path]:
    """``report.json``, ``report.md``, ``throughput.png`` and ``latency.png`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / "report.json", directory / "report.md"
    _atomic_text(json_path, json.dumps({"meta": meta, "levels": [asdict(result) for result in results]}, indent=2))
    _atomic_text(markdown_path, markdown(results, meta))
    throughput, latency = plot(results, directory)
    return {"json": json_path, "markdown": markdown_path, "throughput": throughput, "latency": latency}
