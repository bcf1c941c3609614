"""Folder scoring throughput: ``cnnkit score`` against a sequential one-request-per-image loop.

Scores real JPEGs (cats_and_dogs_filtered/train: 2,000 photos of any size) with a cats/dogs model
(150x150x3, 3.45 M parameters) served by a real ``cnnkit serve`` on loopback:

1. the baseline: ``Client.predict(path)`` for one image after the other (HTTP), for at most
   ``--baseline-seconds`` (its rate does not change with the folder size);
2. ``cnnkit score`` over HTTP and over gRPC (bounded concurrency, batches);
3. ``cnnkit score --local`` (in-process ONNX Runtime, no server).

    python benchmarks/score_folder.py [--repository DIR --model NAME] [--images 2000]

Without ``--repository`` it trains the small cats/dogs convnet for one epoch on 64 images (the
weights do not change the speed) and exports it. Prints images/s of each and the ratios (target:
``cnnkit score`` at least 10x the sequential loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_repository(workdir: Path, data_dir: str | None) -> tuple[Path, str]:
    from tiny_runs import train_tiny_run

    from cnnkit.training.export import export_run

    run_dir = train_tiny_run("catsdogs_small", workdir, data_dir)
    repository = workdir / "model_repository"
    export_run(run_dir, name="catsdogs", repository=repository, data_dir=data_dir, check_accuracy=False)
    return repository, "catsdogs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", help="a model repository (default: build a cats/dogs model)")
    parser.add_argument("--model", default="catsdogs")
    parser.add_argument("--data-dir", default=os.environ.get("CNNKIT_DATA_DIR"))
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to score (default 2000)")
    parser.add_argument("--baseline-seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("set --data-dir or CNNKIT_DATA_DIR (a data root with cats_and_dogs_filtered/)")

    from cnnkit.serving.local import LocalClient
    from cnnkit.serving.process import ServiceProcess
    from cnnkit_client import Client, GrpcClient
    from cnnkit_client.scoring import find_images, score_folder

    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-score-bench-"))
    try:
        source = find_images(Path(args.data_dir) / "cats_and_dogs_filtered" / "train")[: args.images]
        folder = workdir / "images"
        for path in source:  # a private copy, so the benchmark owns the folder it scores
            target = folder / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        megabytes = sum(path.stat().st_size for path in source) / 1e6
        print(f"{len(source)} JPEGs, {megabytes:.1f} MB, from {source[0].parent.parent}")
        if args.repository:
            repository, model = Path(args.repository), args.model
        else:
            print("building a cats/dogs model (1 epoch on 64 images) ...")
            repository, model = build_repository(workdir, args.data_dir)

        results: list[tuple[str, int, float]] = []
        with ServiceProcess(repository, workdir) as service:
            images = find_images(folder)
            with Client(service.url) as client:
                client.predict(images[0], model=model)  # warm-up
                started, done = time.perf_counter(), 0
                for path in images:
                    client.predict(path, model=model)
                    done += 1
                    if time.perf_counter() - started > args.baseline_seconds:
                        break
                results.append(("sequential loop, 1 image per request (HTTP)", done, time.perf_counter() - started))
            for label, name, predictor in (
                    ("cnnkit score --url (HTTP)", "http", Client(service.url, timeout=120)),
                    ("cnnkit score --grpc", "grpc", GrpcClient(service.grpc_target, timeout=120))):
                with predictor:
                    out = workdir / f"{name}.csv"
                    summary = score_folder(predictor, folder, out, model=model, concurrency=args.concurrency,
                                           batch_size=args.batch_size, progress=False)
                results.append((label, summary.scored + summary.errors, summary.seconds))
        with LocalClient(repository) as local:
            summary = score_folder(local, folder, workdir / "local.csv", model=model, concurrency=2,
                                   batch_size=args.batch_size, progress=False)
        results.append(("cnnkit score --local (in-process)", summary.scored + summary.errors, summary.seconds))

        baseline = results[0][1] / results[0][2]
        print(f"\n{'mode':48s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'vs loop':>8s}")
        for label, count, seconds in results:
            rate = count / seconds
            print(f"{label:48s} {count:7d} {seconds:8.1f} {rate:9.1f} {rate / baseline:7.1f}x")
        print(f"\nconcurrency {args.concurrency}, {args.batch_size} images per request, {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
