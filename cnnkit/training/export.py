"""Export a finished training run as a verified, versioned SavedModel + ONNX model.

``export_run`` writes ``REPOSITORY/NAME/VERSION/`` (see :mod:`cnnkit.repository`):

* a SavedModel whose signatures take ``image``: a float32 batch of raw pixel values (0..255, NHWC,
  the model's size; uint8 pixels converted to float, nothing else):

  - ``serving_default`` → ``probabilities`` (N, classes) and ``top_class`` (N,);
  - ``feature_maps`` → one output per convolution and pooling layer, named by the layer;
  - ``gradcam`` (models with a convolution layer), also taking ``class_index`` (N,) int32, -1 for
    the predicted class → ``heatmap`` (N, H, W), ``coarse_heatmap``, ``class_index``,
    ``probabilities`` (see :mod:`cnnkit.training.explain`);
  - ``filter_responses`` (models with a convolution layer) → each convolution's output before its
    activation, named by the layer, which filter patterns maximise (see :mod:`cnnkit.explain`);

* ``assets.extra/model.onnx``: the same graph with every one of those outputs, same names;
* ``assets.extra/metadata.json``: classes, input, preprocessing, feature layers, the run's recipe
  and test accuracy, the parity figures, the source commit and the sha256 of every file.

Single-unit sigmoid models (cats vs dogs) export two-column probabilities ``[1 - p, p]``, so every
model answers the same way. Before anything is renamed into the repository, the export checks that
Keras, the reloaded SavedModel and ONNX Runtime agree on a batch of real test images, and that the
test accuracy recomputed through ONNX Runtime matches the run's; a failed check leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ExplainError, ExportError
from cnnkit.explain import GRADCAM_SIGNATURE, FilterResponses, GradCamGraph
from cnnkit.io import atomic_write_text, make_readable
from cnnkit.repository import (
    EXTRA_DIR,
    FILTER_RESPONSES_SIGNATURE,
    METADATA_FILE,
    MODELS_CONFIG,
    ONNX_FILE,
    ModelVersion,
    artefact_files,
    last_version,
    list_versions,
    models_config_text,
    record_version,
    resolve_repository,
    sha256_file,
)

ONNX_OPSET = 17
PARITY_IMAGES = 32
# Outputs agree within PARITY_TOLERANCE times the output's own scale (its largest magnitude, at least
# 1): probabilities within 1e-4, and a VGG16 feature map whose values reach 2,000 within 0.2, which
# is float32 rounding over sums of thousands of terms (ImageNet weights: up to 0.005 measured).
PARITY_TOLERANCE = 1e-4
ACCURACY_TOLERANCE = 0.001  # 0.1 percentage point
GRADCAM_TOLERANCE = 1e-3  # heatmaps lie in [0, 1]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _log(message: str) -> None:
    print(f"[cnnkit] export: {message}", file=sys.stderr, flush=True)


def _preprocessing(model) -> str:
    names = {layer.__class__.__name__ for layer in model.layers}
    if "VGGPreprocess" in names:
        return "RGB to BGR and ImageNet channel means subtracted inside the model (VGG16)"
    if "Rescaling" in names:
        return "pixel values multiplied by 1/255 inside the model"
    return "none: the model takes the raw pixel values as they are"


class ServingGraph:
    """The functions that both the SavedModel and the ONNX graph are traced from."""

    def __init__(self, model):
        import keras
        import tensorflow as tf

        from cnnkit.training.models import feature_layers

        self.model = model
        self.layers = feature_layers(model)
        reserved = {"probabilities", "top_class"} & set(self.layers)
        if reserved:
            raise ExportError(f"Layer names {', '.join(reserved)} clash with the output names.")
        self.probe = keras.Model(
            model.inputs, [model.outputs[0]] + [model.get_layer(name).output for name in self.layers],
            name=f"{model.name}_serving",
        )
        # Each feature layer's output shape without the batch (for metadata and memory budgets).
        self.layer_shapes = {name: tuple(model.get_layer(name).output.shape[1:]) for name in self.layers}
        self.binary = int(model.outputs[0].shape[-1]) == 1
        self.input_shape = tuple(int(size) for size in model.input_shape[1:])
        self.spec = tf.TensorSpec((None, *self.input_shape), tf.float32, name="image")

    def _probabilities(self, scores):
        import tensorflow as tf

        scores = tf.cast(scores, tf.float32)
        if self.binary:
            scores = tf.concat([1.0 - scores, scores], axis=-1)
        return scores

    def outputs(self, image) -> dict[str, Any]:
        """Every output by name, for one traced call."""
        import tensorflow as tf

        results = self.probe(image, training=False)
        probabilities = self._probabilities(results[0])
        named = {"probabilities": probabilities, "top_class": tf.argmax(probabilities, axis=-1)}
        for name, activation in zip(self.layers, results[1:], strict=True):
            named[name] = tf.cast(activation, tf.float32)
        return named

    def predict(self, image):
        named = self.outputs(image)
        return {"probabilities": named["probabilities"], "top_class": named["top_class"]}

    def feature_maps(self, image):
        named = self.outputs(image)
        return {name: named[name] for name in self.layers}


def gradcam_graph(model) -> GradCamGraph | None:
    """The Grad-CAM function of the last convolution layer, or None for a model without one."""
    try:
        return GradCamGraph(model)
    except ExplainError:
        return None


def filter_responses_graph(model) -> FilterResponses | None:
    """The pre-activations of every convolution layer, or None for a model without one."""
    try:
        return FilterResponses(model)
    except ExplainError:
        return None


def write_saved_model(graph: ServingGraph, path: Path, gradcam: GradCamGraph | None = None,
                      responses: FilterResponses | None = None) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(graph.probe)
    archive.add_endpoint("serving_default", graph.predict, input_signature=[graph.spec])
    archive.add_endpoint("feature_maps", graph.feature_maps, input_signature=[graph.spec])
    if gradcam is not None:
        archive.track(gradcam.probe)
        archive.add_endpoint(GRADCAM_SIGNATURE, gradcam.__call__, input_signature=gradcam.specs)
    if responses is not None:
        archive.track(responses.probe)
        archive.add_endpoint(FILTER_RESPONSES_SIGNATURE, responses.__call__, input_signature=responses.specs)
    with contextlib.redirect_stdout(sys.stderr):  # ExportArchive prints a summary of endpoints.
        archive.write_out(str(path), verbose=False)


def write_onnx(graph: ServingGraph, path: Path, opset: int = ONNX_OPSET) -> None:
    import onnx
    import tensorflow as tf
    import tf2onnx

    function = tf.function(graph.outputs, input_signature=[graph.spec])
    with contextlib.redirect_stdout(sys.stderr):
        model_proto, _ = tf2onnx.convert.from_function(function, input_signature=[graph.spec],
                                                       opset=opset)
    # Name the dynamic batch dimension the same way on every input and output.
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.checker.check_model(model_proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_proto.SerializeToString())


def onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def allowed_difference(expected: np.ndarray) -> float:
    """The largest |difference| accepted for an output: PARITY_TOLERANCE relative to its scale."""
    values = np.asarray(expected, np.float64)
    scale = float(np.abs(values).max()) if values.size else 0.0
    return PARITY_TOLERANCE * max(1.0, scale)


def _max_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(first, np.float64) - np.asarray(second, np.float64))))


def check_gradcam_parity(gradcam: GradCamGraph, loaded, images: np.ndarray) -> dict[str, Any]:
    """Compare the Keras Grad-CAM with the reloaded SavedModel's ``gradcam`` signature; raise on mismatch."""
    import tensorflow as tf

    batch = tf.constant(np.asarray(images, dtype=np.float32))
    classes = tf.constant(np.full(len(images), -1, np.int32))
    reference = {name: np.asarray(value) for name, value in gradcam(batch, classes).items()}
    served = {name: value.numpy() for name, value in
              loaded.signatures[GRADCAM_SIGNATURE](image=batch, class_index=classes).items()}
    difference = _max_difference(reference["heatmap"], served["heatmap"])
    if not difference <= GRADCAM_TOLERANCE or not np.array_equal(reference["class_index"], served["class_index"]):
        raise ExportError(f"Export verification failed: the SavedModel's Grad-CAM differs from Keras "
                          f"(max |difference| {difference:.3g} > {GRADCAM_TOLERANCE}).")
    return {"images": len(images), "max_difference": difference, "tolerance": GRADCAM_TOLERANCE}


def check_filter_responses(responses: FilterResponses, graph: ServingGraph, loaded,
                           images: np.ndarray) -> dict[str, Any]:
    """The reloaded ``filter_responses`` signature against Keras, and each layer's activation of
    its response against the ``feature_maps`` output (so the two signatures describe one model)."""
    import tensorflow as tf

    batch = tf.constant(np.asarray(images, dtype=np.float32))
    reference = {name: np.asarray(value) for name, value in responses(batch).items()}
    served = {name: value.numpy() for name, value in loaded.signatures[FILTER_RESPONSES_SIGNATURE](image=batch).items()}
    maps = {name: value.numpy() for name, value in loaded.signatures["feature_maps"](image=batch).items()}
    worst = 0.0  # the largest difference relative to what its output allows
    for layer in responses.layers:
        if layer.name not in served:
            raise ExportError(f"Export verification failed: filter_responses has no output {layer.name!r}.")
        expected = reference[layer.name]
        worst = max(worst, _max_difference(expected, served[layer.name]) / allowed_difference(expected))
        if layer.name in maps:
            activated = np.asarray(layer.activation(tf.constant(served[layer.name])))
            worst = max(worst, _max_difference(activated, maps[layer.name]) / allowed_difference(maps[layer.name]))
    if not worst <= 1.0:
        raise ExportError(f"Export verification failed: the SavedModel's filter responses differ from Keras "
                          f"({worst:.3g} times the tolerance of {PARITY_TOLERANCE} of each output's scale).")
    return {"images": len(images), "layers": len(responses.layers), "max_difference_in_tolerances": worst,
            "tolerance": PARITY_TOLERANCE}


def check_parity(graph: ServingGraph, loaded, onnx_path: Path, images: np.ndarray) -> dict[str, Any]:
    """Compare Keras, the reloaded SavedModel (``tf.saved_model.load``) and ONNX Runtime on ``images``;
    raise on mismatch."""
    import tensorflow as tf

    batch = np.asarray(images, dtype=np.float32)
    reference = {name: np.asarray(value) for name, value in graph.outputs(tf.constant(batch)).items()}
    served = {name: value.numpy() for name, value in
              loaded.signatures["serving_default"](image=tf.constant(batch)).items()}
    served.update({name: value.numpy() for name, value in
                   loaded.signatures["feature_maps"](image=tf.constant(batch)).items()})
    session = onnx_session(onnx_path)
    names = [output.name for output in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(names, {"image": batch}), strict=True))

    report: dict[str, Any] = {"images": len(batch), "tolerance": PARITY_TOLERANCE,
                              "tolerance_is": "relative to each output's largest magnitude (at least 1)",
                              "outputs": {}}
    problems = []
    for name, expected in reference.items():
        if name == "top_class":
            continue
        for runtime, outputs in (("saved_model", served), ("onnx", onnx_outputs)):
            if name not in outputs:
                problems.append(f"{runtime} has no output {name!r}")
                continue
            if outputs[name].shape != expected.shape:
                problems.append(f"{runtime} {name}: shape {outputs[name].shape} != {expected.shape}")
                continue
            difference = _max_difference(expected, outputs[name])
            allowed = allowed_difference(expected)
            report["outputs"].setdefault(name, {})[runtime] = difference
            report.setdefault("allowed", {})[name] = allowed
            if not difference <= allowed:
                problems.append(f"{runtime} {name}: max |difference| {difference:.3g} > {allowed:.3g}")
    top = reference["probabilities"].argmax(axis=-1)
    for runtime, outputs in (("saved_model", served), ("onnx", onnx_outputs)):
        if "top_class" in outputs and not np.array_equal(outputs["top_class"], top):
            problems.append(f"{runtime}: top class differs from Keras")
        if "probabilities" in outputs and not np.array_equal(outputs["probabilities"].argmax(-1), top):
            problems.append(f"{runtime}: argmax of probabilities differs from Keras")
    report["max_difference"] = max(
        (value for runtimes in report["outputs"].values() for value in runtimes.values()), default=0.0
    )
    report["identical_top1"] = not any("top class" in p or "argmax" in p for p in problems)
    if problems:
        raise ExportError("Export verification failed: " + "; ".join(problems))
    return report


def accuracy_batch_size(activation_shapes: list[tuple[int, ...]], budget_bytes: int = 256 * 2**20,
                        most: int = 256) -> int:
    """Images per ONNX Runtime call when the export recomputes the test accuracy: at most ``most``,
    and few enough that the largest activation of a batch (float32, the shapes without the batch)
    stays within ``budget_bytes``. ONNX Runtime holds a few such tensors at once and its arena
    keeps them: VGG16 at 224x224 has 12.25 MiB of ``block1`` activations per image, so 256 images
    at a time ran a 24 GB machine out of memory, where 20 need about 1 GB."""
    largest = max((int(np.prod(shape)) * 4 for shape in activation_shapes), default=0)
    if largest <= 0:
        return most
    return max(1, min(most, budget_bytes // largest))


def onnx_accuracy(onnx_path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    session = onnx_session(onnx_path)
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        (top,) = session.run(["top_class"], {"image": batch})
        correct += int((top == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def source_commit() -> dict[str, Any]:
    """The cnnkit commit the export was made with, and whether the tree had local changes."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda item: len(item.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *[path for path in root.rglob("*") if path.is_dir()]]:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _staging_prefix(repository: Path) -> str:
    return f".{repository.resolve().name}.staging-"


def _sweep_stale_staging(repository: Path) -> None:
    """Remove staging folders of exports that were killed (their process no longer exists)."""
    parent = repository.resolve().parent
    if not parent.is_dir():
        return
    for entry in parent.glob(_staging_prefix(repository) + "*"):
        try:
            pid = int(entry.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def default_model_name(recipe_name: str) -> str:
    name = re.sub(r"[^a-z0-9_.-]+", "_", recipe_name.lower()).strip("_.-")
    return name or "model"


def export_run(
    run_dir: str | Path,
    *,
    name: str | None = None,
    repository: str | Path | None = None,
    data_dir: str | Path | None = None,
    parity_images: int = PARITY_IMAGES,
    check_accuracy: bool = True,
    base_path: str | None = None,
) -> ModelVersion:
    """Export a finished run into the repository as the next version of ``name``; return it.

    ``base_path``: where TF Serving will see the repository (``models.config``'s paths start
    with it); by default they are relative to the repository's root."""
    from cnnkit.training.data import load_recipe_dataset
    from cnnkit.training.models import float32_copy
    from cnnkit.training.rundir import MODEL_FILE, RunDir, load_run_model

    run = RunDir(run_dir).require_run(ExportError)
    run_path = run.path
    if not run.model.is_file():
        raise ExportError(f"{run_path} has no {MODEL_FILE}: finish the run first "
                          f"(`cnnkit train --resume --output {run_path}`).")
    if not run.metrics.is_file():
        raise ExportError(f"{run_path} has no evaluation: run `cnnkit evaluate {run_path}` first.")
    config = run.load_config()
    metrics = json.loads(run.metrics.read_text())
    name = name or default_model_name(config.name)
    if not NAME_PATTERN.match(name):
        raise ExportError(f"Model name {name!r} must be lower-case letters, digits, '_', '.' or '-'.")
    root = resolve_repository(repository)

    started = time.perf_counter()
    # A model trained with mixed precision (on a GPU) is exported as its float32 copy.
    model = float32_copy(load_run_model(run.model))
    dataset = load_recipe_dataset(config, data_dir)
    graph = ServingGraph(model)
    if tuple(dataset.input_shape) != graph.input_shape:
        raise ExportError(f"The data set's images {dataset.input_shape} do not fit the model's "
                          f"input {graph.input_shape}.")

    root.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(root)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(root)}{os.getpid()}-",
                                    dir=root.resolve().parent))
    try:
        version_dir = staging / "version"
        _log(f"writing the SavedModel of {run_path} ({len(graph.layers)} feature layers)")
        gradcam = gradcam_graph(model)
        responses = filter_responses_graph(model)
        write_saved_model(graph, version_dir, gradcam, responses)
        _log(f"converting to ONNX (opset {ONNX_OPSET})")
        onnx_path = version_dir / EXTRA_DIR / ONNX_FILE
        write_onnx(graph, onnx_path)

        _log(f"checking Keras, SavedModel and ONNX Runtime agree on {parity_images} test images")
        import tensorflow as tf

        loaded = tf.saved_model.load(str(version_dir))  # once, for both checks
        parity = check_parity(graph, loaded, onnx_path, dataset.x_test[:parity_images])
        verification: dict[str, Any] = {"parity": parity}
        if gradcam is not None:
            verification["gradcam"] = check_gradcam_parity(gradcam, loaded, dataset.x_test[:8])
        if responses is not None:
            verification["filter_responses"] = check_filter_responses(responses, graph, loaded, dataset.x_test[:8])
        if check_accuracy:
            _log(f"recomputing the test accuracy through ONNX Runtime on {len(dataset.x_test)} images")
            batch_size = accuracy_batch_size([graph.input_shape, *graph.layer_shapes.values()])
            accuracy = onnx_accuracy(onnx_path, dataset.x_test, dataset.y_test, batch_size=batch_size)
            expected = float(metrics["test_accuracy"])
            verification["test_accuracy"] = {"onnx": round(accuracy, 6), "run": expected,
                                              "images": int(len(dataset.x_test)), "batch_size": batch_size}
            if abs(accuracy - expected) > ACCURACY_TOLERANCE:
                raise ExportError(
                    f"Export verification failed: ONNX Runtime test accuracy {accuracy:.4f} differs "
                    f"from the run's {expected:.4f} by more than {ACCURACY_TOLERANCE * 100:.1f} point."
                )

        state = run.read_state()
        metadata: dict[str, Any] = {
            "name": name,
            "version": None,  # set below, once the version number is known
            "class_names": list(dataset.class_names),
            "input": {
                "name": "image",
                "shape": list(graph.input_shape),
                "dtype": "float32",
                "layout": "NHWC",
                "accepts": "raw pixel values 0..255 (uint8 pixels converted to float32)",
            },
            "preprocessing": _preprocessing(model),
            "outputs": {
                "serving_default": {
                    "probabilities": [None, len(dataset.class_names)],
                    "top_class": [None],
                },
                "feature_maps": {layer: [None, *shape] for layer, shape in graph.layer_shapes.items()},
            },
            "feature_layers": [
                {"name": layer, "kind": graph.probe.get_layer(layer).__class__.__name__,
                 "output_shape": list(shape)}
                for layer, shape in graph.layer_shapes.items()
            ],
            "sigmoid_output": graph.binary,
            # Grad-CAM is a SavedModel signature (TensorFlow computes the gradients); see cnnkit.training.explain.
            "explain": {
                "gradcam_layer": gradcam.layer if gradcam is not None else None,
                "gradcam_signature": GRADCAM_SIGNATURE if gradcam is not None else None,
                "filter_responses_signature": FILTER_RESPONSES_SIGNATURE if responses is not None else None,
            },
            "training": {
                "run_dir": str(run_path.resolve()),
                "recipe": config.to_dict(),
                "dataset": config.dataset,
                "test_accuracy": metrics.get("test_accuracy"),
                "test_images": metrics.get("test_images"),
                "epochs_trained": state.get("epoch"),
            },
            "parameters": int(model.count_params()),
            "onnx_opset": ONNX_OPSET,
            "verification": verification,
            "source": source_commit(),
            "exported": datetime.now().isoformat(timespec="seconds"),
            "files": {},
        }
        return _publish(staging, version_dir, root, name, metadata, started, base_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, version_dir: Path, root: Path, name: str, metadata: dict[str, Any],
             started: float, base_path: str | None = None) -> ModelVersion:
    """Hash, fsync and rename the staged version into place as the next free version number."""
    metadata["files"] = {relative: sha256_file(version_dir / relative)
                         for relative in artefact_files(version_dir)}
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(100):
        # Never a number used before, even by a version since deleted: servers and clients may
        # remember (or cache, or have refused) what that number was.
        version = max(max(list_versions(model_dir), default=0), last_version(model_dir)) + 1
        metadata["version"] = version
        (version_dir / EXTRA_DIR / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        make_readable(version_dir)  # 0644 files, 0755 folders: other users and TF Serving read them
        _fsync_tree(version_dir)
        target = model_dir / str(version)
        if target.exists():
            continue  # Another export took this number in the meantime.
        try:
            os.rename(version_dir, target)
        except OSError:
            if target.exists():
                continue
            raise
        record_version(model_dir, version)
        descriptor = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        atomic_write_text(root / MODELS_CONFIG, models_config_text(root, base_path))
        _log(f"{name} version {version} written to {target} in {time.perf_counter() - started:.1f}s "
             f"(max |difference| {metadata['verification']['parity']['max_difference']:.2g})")
        return ModelVersion(name=name, version=version, path=target, metadata=metadata)
    raise ExportError(f"Could not find a free version number under {model_dir}.")
