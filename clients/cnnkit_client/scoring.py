"""Batch scoring of an image folder: ``cnnkit score DIR --model NAME`` (also ``cnnkit-score``).

Walks DIR recursively, sends the images in batches with at most ``--concurrency`` requests in
flight, and appends one row per image to a CSV or JSON-lines file: the path (relative to DIR), the
top-k labels and probabilities, the model version, or the error. A progress bar shows rate and ETA.

Resuming: a rerun reads the output first and skips every image it already holds for the same model
and version (a result, or an error the image itself caused, such as a corrupt file); the version is
resolved once at the start (the latest, unless ``--version`` pins one) and every request pins it, so
one output never mixes versions, and scoring with another model or version scores everything
again. An unknown model stops the run before anything is scored, naming the models that exist.
Rows are only ever appended, each with one write, so an interrupted run leaves whole rows; a torn
last line (power cut) is cut off and that image scored again. When the service is unreachable the
run stops: nothing is recorded for the images it could not try, so the rerun continues with them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cnnkit_client.errors import CnnkitError, ConnectError, InvalidInputError, NotFoundError
from cnnkit_client.types import Prediction

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
CSV_COLUMNS = ["path", "model", "version", "label", "probability", "top_labels", "top_probabilities", "error"]
# Errors an image causes by itself: recorded and skipped on a rerun. Others are retried next time.
PERMANENT_ERRORS = (InvalidInputError,)


class Predictor(Protocol):
    def predict(self, images: Any, *, model: str, version: int | None = None, top_k: int = 5,
                timeout: float | None = None) -> Any: ...

    def metadata(self, model: str, *, version: int | None = None) -> Any: ...

    def close(self) -> None: ...


def find_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (by suffix, case-insensitive), sorted, following no symlinked dirs."""
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder.")
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(directory, name))
    return found


@dataclass
class Row:
    path: str
    model: str = ""
    version: int | None = None
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""
    transient: bool = False  # an error worth retrying on the next run

    @classmethod
    def of(cls, path: str, prediction: Prediction) -> Row:
        return cls(path, prediction.model, prediction.version, [c.label for c in prediction.classes],
                   [c.probability for c in prediction.classes])


class ResultsFile:
    """The output: CSV or JSON lines (by suffix), appended one whole row per write."""

    def __init__(self, path: Path):
        self.path = path
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise InvalidInputError(f"--out must end in .csv or .jsonl, got {path.name}.")
        self.is_csv = suffix == ".csv"
        self._fd: int | None = None

    def done(self, model: str, version: int | None) -> set[str]:
        """Paths already scored with ``model`` at ``version`` (any version when None: a predictor that
        cannot say which it serves), results and permanent errors; repairs a torn last line first."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:  # cut the torn last row, nothing else
                handle.truncate(keep)
            data = data[:keep]
        text = data.decode("utf-8")
        done: set[str] = set()
        if self.is_csv:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames and reader.fieldnames != CSV_COLUMNS:
                raise InvalidInputError(
                    f"{self.path} has columns {reader.fieldnames}, not cnnkit's; choose another --out."
                )
            rows: Iterator[dict[str, Any]] = iter(reader)
        else:
            rows = (json.loads(line) for line in text.splitlines() if line.strip())
        for row in rows:
            retry = row.get("retry") or str(row.get("error") or "").startswith("[retry] ")
            same = row.get("model") == model and (version is None or str(row.get("version") or "") == str(version))
            if same and not retry:
                done.add(row["path"])
        return done

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new and self.is_csv:
            self._write(self._csv_line(CSV_COLUMNS))

    def append(self, row: Row) -> None:
        if self.is_csv:
            # A transient error is marked in its message so the next run retries that image.
            error = f"[retry] {row.error}" if row.transient else row.error
            line = self._csv_line([row.path, row.model, "" if row.version is None else row.version,
                                   row.labels[0] if row.labels else "",
                                   f"{row.probabilities[0]:.6g}" if row.probabilities else "",
                                   "|".join(row.labels), "|".join(f"{p:.6g}" for p in row.probabilities), error])
        else:
            record: dict[str, Any] = {"path": row.path, "model": row.model, "version": row.version,
                                      "label": row.labels[0] if row.labels else None,
                                      "probability": row.probabilities[0] if row.probabilities else None,
                                      "top": [{"label": label, "probability": probability} for label, probability
                                              in zip(row.labels, row.probabilities, strict=True)],
                                      "error": row.error or None}
            if row.transient:
                record["retry"] = True
            line = json.dumps(record) + "\n"
        self._write(line)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _csv_line(values: list[Any]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()

    def _write(self, line: str) -> None:
        if self._fd is None:
            raise RuntimeError("ResultsFile.open() was not called.")
        data = line.encode("utf-8")
        written = os.write(self._fd, data)  # O_APPEND: one write per row
        while written < len(data):  # only on a short write (disk nearly full)
            written += os.write(self._fd, data[written:])


@dataclass
class Summary:
    scored: int = 0
    skipped: int = 0
    errors: int = 0
    per_class: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    stopped: str = ""

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        lines = [f"scored {self.scored} images, {self.errors} errors, {self.skipped} already in the output; "
                 f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s"]
        if self.per_class:
            width = max(len(label) for label in self.per_class)
            lines += [f"  {label:<{width}}  {count}" for label, count in self.per_class.most_common()]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped} (rerun the same command to continue)")
        return "\n".join(lines)


def _score_batch(predictor: Predictor, root: Path, paths: list[Path], model: str, version: int | None,
                 top_k: int) -> list[Row]:
    """Rows for one batch; when the batch is refused (one bad file), each image is scored alone."""
    names = [path.relative_to(root).as_posix() for path in paths]
    try:
        predictions = predictor.predict(paths, model=model, version=version, top_k=top_k)
        return [Row.of(name, prediction) for name, prediction in zip(names, predictions, strict=True)]
    except (ConnectError, NotFoundError):
        raise  # the service or the model is missing: not a per-file problem
    except CnnkitError as error:
        if len(paths) == 1:
            return [_error_row(names[0], model, version, error)]
    rows = []
    for path, name in zip(paths, names, strict=True):
        try:
            rows.append(Row.of(name, predictor.predict(path, model=model, version=version, top_k=top_k)))
        except (ConnectError, NotFoundError):
            raise
        except CnnkitError as error:
            rows.append(_error_row(name, model, version, error))
    return rows


def _error_row(name: str, model: str, version: int | None, error: CnnkitError) -> Row:
    return Row(name, model=model, version=version, error=error.message,
               transient=not isinstance(error, PERMANENT_ERRORS))


def resolve_version(predictor: Predictor, model: str, version: int | None = None) -> int | None:
    """The version that will score: the pinned one, else the latest the predictor serves (None for a
    predictor that cannot describe its models). NotFoundError names the models that exist."""
    describe = getattr(predictor, "metadata", None)
    if describe is None:
        return version
    return int(describe(model, version=version).version)


def score_folder(predictor: Predictor, root: Path, out: Path, *, model: str, version: int | None = None,
                 top_k: int = 5, concurrency: int = 8, batch_size: int = 16, progress: bool = True,
                 on_row: Callable[[Row], None] | None = None) -> Summary:
    """Score every image under ``root`` into ``out``; see the module docstring."""
    if concurrency < 1 or batch_size < 1 or top_k < 1:
        raise InvalidInputError("--concurrency, --batch-size and --top-k must be at least 1.")
    root = Path(root)
    results = ResultsFile(Path(out))
    images = find_images(root)
    try:
        version = resolve_version(predictor, model, version)
    except ConnectError as error:
        return Summary(stopped=error.message)
    done = results.done(model, version)
    todo = [path for path in images if path.relative_to(root).as_posix() not in done]
    summary = Summary(skipped=len(images) - len(todo))
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    bar = _progress(len(todo), progress)
    started = time.perf_counter()
    results.open()
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cnnkit-score") as pool:
            pending: set[Future[list[Row]]] = set()
            queue = iter(batches)
            while True:
                while len(pending) < concurrency and not summary.stopped:  # bounded in flight
                    batch = next(queue, None)
                    if batch is None:
                        break
                    pending.add(pool.submit(_score_batch, predictor, root, batch, model, version, top_k))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        rows = future.result()
                    except (ConnectError, NotFoundError) as error:
                        summary.stopped = summary.stopped or error.message
                        continue
                    for row in rows:
                        results.append(row)
                        if row.error:
                            summary.errors += 1
                        else:
                            summary.scored += 1
                            summary.per_class[row.labels[0]] += 1
                        if on_row is not None:
                            on_row(row)
                    bar.update(len(rows))
    finally:
        results.close()
        bar.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="scoring", dynamic_ncols=True, file=sys.stderr, disable=not enabled)


LocalPredictor = Callable[[str], Predictor]


def add_arguments(parser: argparse.ArgumentParser, *, local: bool = False) -> None:
    """The scoring options; ``--local`` only where the caller can score in-process (``cnnkit score``)."""
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--model", required=True, help="model name")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="cnnkit HTTP service (default http://127.0.0.1:3000)")
    where.add_argument("--grpc", metavar="TARGET", help="cnnkit gRPC service, HOST:PORT")
    if local:
        where.add_argument("--local", metavar="REPOSITORY",
                           help="score in-process with ONNX Runtime from a model repository")
    parser.add_argument("--version", type=int, help="model version (default: the latest, resolved once at the start)")
    parser.add_argument("--out", type=Path, default=Path("scores.csv"),
                        help="results .csv or .jsonl, appended (default scores.csv)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per request (default 16)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--api-key", default=os.environ.get("CNNKIT_API_KEY"), help="default $CNNKIT_API_KEY")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_predictor(args: argparse.Namespace, local_predictor: LocalPredictor | None = None) -> Predictor:
    """The client the arguments name; ``local_predictor(repository)`` serves ``--local``."""
    if getattr(args, "local", None):
        if local_predictor is None:
            raise InvalidInputError("--local needs the full cnnkit install: use `cnnkit score --local`.")
        return local_predictor(args.local)
    if args.grpc:
        from cnnkit_client._grpc import GrpcClient

        return GrpcClient(args.grpc, api_key=args.api_key, timeout=args.timeout)
    from cnnkit_client._http import DEFAULT_URL, Client

    return Client(args.url or DEFAULT_URL, api_key=args.api_key, timeout=args.timeout)


def run(args: argparse.Namespace, local_predictor: LocalPredictor | None = None) -> int:
    """Score as the arguments say; prints the summary. Exit status 0, or 1 when stopped early."""
    try:
        predictor = make_predictor(args, local_predictor)
        try:
            summary = score_folder(predictor, args.folder, args.out, model=args.model, version=args.version,
                                   top_k=args.top_k,
                                   concurrency=args.concurrency, batch_size=args.batch_size,
                                   progress=not args.no_progress)
        finally:
            predictor.close()
    except CnnkitError as error:
        print(f"cnnkit score: {error}", file=sys.stderr)
        return 2
    print(summary.report())
    print(f"results: {args.out}")
    return 1 if summary.stopped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnkit-score", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
