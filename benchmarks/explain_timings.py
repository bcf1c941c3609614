"""How long Grad-CAM and filter patterns take, and what they cost plain predictions.

For each model (by default the digits convnet, 28x28, and the small cats/dogs convnet, 150x150,
each trained for one epoch on 64 images: the weights do not change the speed), exported as the
service would serve it:

1. Grad-CAM per image: in-process Keras (the toolkit's ``cnnkit explain``), and through the
   service's worker process (cold: the first call starts TensorFlow and loads the SavedModel; warm).
2. Filter patterns per layer: ``--filters`` filters of every convolution layer, 40 steps, through
   the worker (seconds per layer and per filter), then the same request again from the cache.
3. Predictions while explanations run: the p50/p99 latency of single-image ONNX Runtime
   predictions, alone and while the worker computes filter patterns, with the worker at its default
   lower priority (nice 10) and at normal priority (nice 0).

    python benchmarks/explain_timings.py [--models digits,catsdogs] [--filters 16] [--vgg16]

``--vgg16`` adds the in-process timings of the VGG16 transfer model (random weights; ImageNet
weights are not reachable here). Timings are printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RECIPES = {"digits": "mnist_convnet", "catsdogs": "catsdogs_small"}


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prediction_latencies(model, image: np.ndarray, seconds: float) -> tuple[float, float, int]:
    """p50 and p99 (ms) of back-to-back single-image predictions for ``seconds``."""
    batch = image[None].astype(np.float32)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        model.predict(batch)
        latencies.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), len(latencies)


def under_explain_load(store, model, image, workdir: Path, niceness: int, seconds: float, filters: int):
    """Prediction latency while a worker at ``niceness`` computes filter patterns continuously."""
    from cnnkit.serving.explain import Explanations

    explanations = Explanations(cache_dir=workdir / f"cache-nice{niceness}", niceness=niceness, timeout=600)
    explanations.start()
    explanations.gradcam(model, image)  # the worker is up and the model loaded before timing
    stop = threading.Event()

    def keep_busy() -> None:
        seed = 100
        while not stop.is_set():
            explanations.filter_patterns(model, None, filters, steps=40, seed=seed)
            seed += 1

    busy = threading.Thread(target=keep_busy, daemon=True)
    busy.start()
    time.sleep(1.0)
    try:
        return prediction_latencies(model, image, seconds)
    finally:
        stop.set()
        busy.join(timeout=600)
        explanations.close()


def benchmark_model(name: str, repository: Path, image: np.ndarray, run_dir: Path, workdir: Path,
                    filters: int, load_seconds: float) -> None:
    from cnnkit.serving.explain import Explanations
    from cnnkit.serving.model_store import ModelStore
    from cnnkit.training.explain import open_explainer

    print(f"\n== {name} ({'x'.join(map(str, image.shape))}) ==")
    keras_explainer = open_explainer(run_dir)
    keras_explainer.gradcam(image)
    in_process = median_seconds(lambda: keras_explainer.gradcam(image), 10)
    print(f"Grad-CAM, in-process Keras (cnnkit explain)   {in_process * 1000:8.1f} ms per image (warm median)")

    store = ModelStore(repository)
    store.refresh()
    model = store.get(name)
    explanations = Explanations(cache_dir=workdir / f"cache-{name}", timeout=600)
    try:
        started = time.perf_counter()
        explanations.gradcam(model, image)
        cold = time.perf_counter() - started
        warm = median_seconds(lambda: explanations.gradcam(model, image), 10)
        print(f"Grad-CAM, service worker, first call          {cold:8.2f} s (starts TensorFlow, loads the SavedModel)")
        print(f"Grad-CAM, service worker, warm                {warm * 1000:8.1f} ms per image")
        for layer in model.conv_layer_names:
            channels = int(next(item for item in model.feature_layers if item["name"] == layer)["output_shape"][-1])
            first = list(range(min(filters, channels)))
            second = list(range(len(first), min(2 * len(first), channels))) or first
            started = time.perf_counter()
            result = explanations.filter_patterns(model, layer, first, steps=40)
            traced = time.perf_counter() - started
            started = time.perf_counter()
            warm_result = explanations.filter_patterns(model, layer, second, steps=40)
            warm_seconds = time.perf_counter() - started
            started = time.perf_counter()
            again = explanations.filter_patterns(model, layer, first, steps=40)
            cached = time.perf_counter() - started
            print(f"filter patterns {layer:<8} first {len(first):3d} filters {traced:6.2f} s (traces the ascent); "
                  f"next {len(second):3d} {warm_seconds:6.2f} s = {warm_seconds / len(second) * 1000:5.0f} ms/filter; "
                  f"dead {len(result.dead) + len(warm_result.dead):2d}; cached {cached * 1000:4.1f} ms "
                  f"(cached={again.cached})")
    finally:
        explanations.close()

    alone = prediction_latencies(model, image, load_seconds)
    print(f"predict alone                       p50 {alone[0]:6.2f} ms  p99 {alone[1]:7.2f} ms  ({alone[2]} calls)")
    for niceness in (10, 0):
        busy = under_explain_load(store, model, image, workdir, niceness, load_seconds, filters)
        print(f"predict while patterns run (nice {niceness:2d}) p50 {busy[0]:6.2f} ms  p99 {busy[1]:7.2f} ms  "
              f"({busy[2]} calls; p50 x{busy[0] / alone[0]:.2f})")


def benchmark_vgg16(filters: int) -> None:
    from cnnkit.training.explain import KerasExplainer
    from cnnkit.training.models import create_model

    print("\n== vgg16_transfer (150x150x3, random weights, in-process Keras) ==")
    model = create_model("vgg16_transfer", weights="none")
    explainer = KerasExplainer(model, ["cat", "dog"])
    image = np.random.default_rng(0).integers(0, 256, (150, 150, 3)).astype(np.float32)
    explainer.gradcam(image)
    seconds = median_seconds(lambda: explainer.gradcam(image), 3)
    print(f"Grad-CAM at {explainer.default_gradcam_layer():<14} {seconds:8.2f} s per image")
    for layer in ("block1_conv1", "block3_conv1", "block5_conv3"):
        started = time.perf_counter()
        indices, _, _ = explainer.filter_patterns(layer, filters, steps=40)
        seconds = time.perf_counter() - started
        print(f"filter patterns {layer:<14} {len(indices):3d} filters {seconds:7.2f} s "
              f"({seconds / len(indices):5.2f} s/filter, tracing included)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,catsdogs")
    parser.add_argument("--filters", type=int, default=16, help="filters per layer (default 16)")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="per prediction-latency measurement")
    parser.add_argument("--vgg16", action="store_true", help="also time the VGG16 transfer model in-process")
    parser.add_argument("--data-dir", default=os.environ.get("CNNKIT_DATA_DIR"))
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("set --data-dir or CNNKIT_DATA_DIR")

    from tiny_runs import train_tiny_run

    from cnnkit.training.data import load_dataset
    from cnnkit.training.export import export_run

    print(f"cores: {os.cpu_count()}; worker threads: all, nice 10 unless stated")
    workdir = Path(tempfile.mkdtemp(prefix="cnnkit-explain-bench-"))
    try:
        for name in [item.strip() for item in args.models.split(",") if item.strip()]:
            if name not in RECIPES:
                parser.error(f"unknown model {name!r}; choose from {', '.join(RECIPES)}")
            run_dir = train_tiny_run(RECIPES[name], workdir / name, args.data_dir)
            repository = workdir / "model_repository"
            export_run(run_dir, name=name, repository=repository, data_dir=args.data_dir, check_accuracy=False)
            from cnnkit.training.config import load_config_file

            config = load_config_file(run_dir / "config.yaml")
            dataset = load_dataset(config.dataset, args.data_dir, validation_size=config.validation_size,
                                   image_size=config.image_size, channels=config.channels,
                                   dataset_path=config.dataset_path, test_limit=1)
            benchmark_model(name, repository, dataset.x_test[0], run_dir, workdir, args.filters,
                            args.load_seconds)
        if args.vgg16:
            benchmark_vgg16(min(args.filters, 8))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
