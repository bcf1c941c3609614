"""Serve an exported model and explain it through the service, as a user would, with the SDK.

Starts ``cnnkit serve`` on a repository, then over HTTP and gRPC: classifies real test photos (or
digits) and reports accuracy and latency per protocol; asks for Grad-CAM overlays of a few of them
(one per class, at the model's Grad-CAM layer, e.g. VGG16's ``block5_conv3``); and asks for the
feature-map grids of a list of layers. Writes the pictures into ``--out`` and prints a table.

    python benchmarks/served_model_tour.py --repository DIR --model catsdogs_vgg16
        --images DATA_ROOT/cats_and_dogs_filtered/validation [--limit 200]
        [--layers block1_conv1,block2_conv2,block3_conv3,block4_conv3,block5_conv3] [--out DIR]

``--images`` is a folder with one subfolder per class (the classes named as the model names them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}


def labelled_images(root: Path, limit: int) -> list[tuple[Path, str]]:
    """Up to ``limit`` images, the classes taken in turn, with their class (the subfolder's name)."""
    per_class = {folder.name: sorted(path for path in folder.iterdir() if path.suffix.lower() in EXTENSIONS)
                 for folder in sorted(root.iterdir()) if folder.is_dir()}
    if not per_class:
        raise SystemExit(f"{root} has no class subfolders")
    chosen: list[tuple[Path, str]] = []
    index = 0
    while len(chosen) < limit and any(index < len(paths) for paths in per_class.values()):
        for name, paths in per_class.items():
            if index < len(paths) and len(chosen) < limit:
                chosen.append((paths[index], name))
        index += 1
    return chosen


def classify(client, images: list[tuple[Path, str]], model: str) -> tuple[float, list[float]]:
    correct, latencies = 0, []
    for path, label in images:
        started = time.perf_counter()
        prediction = client.predict(path, model=model, top_k=1)
        latencies.append((time.perf_counter() - started) * 1000)
        correct += prediction.label == label
    return correct / len(images), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help="a folder of class subfolders")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--layers", default=None, help="comma-separated layers for feature maps (default: all)")
    parser.add_argument("--out", default="served_model_tour")
    args = parser.parse_args()

    from cnnkit.serving.process import ServiceProcess
    from cnnkit_client import Client, GrpcClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = labelled_images(Path(args.images), args.limit)
    layers = args.layers.split(",") if args.layers else None
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="cnnkit-tour-") as workdir, \
            ServiceProcess(args.repository, workdir) as service, \
            Client(service.url, timeout=600) as http, GrpcClient(service.grpc_target, timeout=600) as grpc:
        info = http.metadata(args.model)
        rows.append(("model", f"{info.name} version {info.version}"))
        for name, client in (("HTTP", http), ("gRPC", grpc)):
            client.predict(images[0][0], model=args.model)  # warm-up
            accuracy, latencies = classify(client, images, args.model)
            ordered = sorted(latencies)
            rows.append((f"{name}: accuracy on {len(images)} images", f"{accuracy * 100:.1f}%"))
            rows.append((f"{name}: one image, p50 / p99", f"{statistics.median(ordered):.1f} / "
                                                          f"{ordered[int(0.99 * (len(ordered) - 1))]:.1f} ms"))
        seen: set[str] = set()
        for path, label in images:
            if label in seen:
                continue
            seen.add(label)
            started = time.perf_counter()
            heatmap = http.gradcam(path, model=args.model)
            took = time.perf_counter() - started
            target = out / f"gradcam_{label}_{path.stem}.png"
            target.write_bytes(heatmap.overlay_png)
            rows.append((f"Grad-CAM of a {label} photo ({path.name})",
                         f"{heatmap.class_name} {heatmap.probability:.3f} at {heatmap.layer}, {took:.2f} s"))
            if len(seen) == 1:
                started = time.perf_counter()
                grids = http.feature_maps(path, model=args.model, layers=layers, as_png=True)
                took = time.perf_counter() - started
                for layer, png in grids.items():
                    (out / f"feature_maps_{label}_{layer}.png").write_bytes(png)
                rows.append((f"feature-map grids of the {label} photo", f"{', '.join(grids)} in {took:.2f} s"))
    print("| measure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"pictures in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
