"""Grad-CAM and filter patterns of a run's Keras model, and the toolkit's ``explain`` and
``filter-patterns`` commands. The computations themselves live in :mod:`cnnkit.explain`, shared with
the service's explanation worker (which explains exported SavedModels)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ExplainError
from cnnkit.explain import (
    PATTERN_STEPS,
    BaseExplainer,
    FilterAscent,
    GradCamGraph,
    GradCamResult,
    SavedModelExplainer,
    check_conv_layer,
    check_filters,
    default_gradcam_layer,
    pre_activation,
)
from cnnkit.training.rundir import MODEL_FILE, RunDir, load_run_model


class KerasExplainer(BaseExplainer):
    """Grad-CAM and filter patterns of a Keras model (any convolution layer)."""

    def __init__(self, model, class_names: Sequence[str] | None = None):
        import keras

        self.model = model
        self.name = model.name
        self.input_shape = tuple(int(size) for size in model.input_shape[1:])  # type: ignore[assignment]
        self.conv_layers = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        self.layer_channels = {name: int(model.get_layer(name).output.shape[-1]) for name in self.conv_layers}
        units = int(model.outputs[0].shape[-1])
        count = 2 if units == 1 else units
        self.class_names = list(class_names) if class_names else [str(index) for index in range(count)]
        self._graphs: dict[str, Any] = {}
        self._ascents: dict[tuple[str, int], FilterAscent] = {}

    def default_gradcam_layer(self) -> str | None:
        return default_gradcam_layer(self.model)

    def _gradcam_batch(self, images, classes, layer):
        import tensorflow as tf

        if layer not in self._graphs:
            graph = GradCamGraph(self.model, layer)
            self._graphs[layer] = tf.function(graph.__call__, input_signature=graph.specs)
        outputs = self._graphs[layer](tf.constant(images), tf.constant(classes))
        return {name: value.numpy() for name, value in outputs.items()}

    def _activations(self, layer):
        import keras

        conv = self.model.get_layer(layer)
        probe = keras.Model(self.model.inputs, conv.input)
        return lambda images: pre_activation(conv, probe(images, training=False))


def open_explainer(source: str | Path) -> BaseExplainer:
    """A run directory (its model.keras), a .keras file, a repository model folder (its latest
    version) or a version folder."""
    from cnnkit.repository import EXTRA_DIR, METADATA_FILE, list_versions

    path = Path(source)
    run = RunDir(path)
    if path.is_dir() and run.is_run():
        if not run.model.is_file():
            raise ExplainError(f"{path} has no {MODEL_FILE}: finish the run first.")
        return _keras_explainer(run.model, run)
    if path.suffix == ".keras" and path.is_file():
        return _keras_explainer(path, RunDir(path.parent))
    if path.is_dir() and list_versions(path):
        path = path / str(list_versions(path)[-1])
    if path.is_dir() and (path / EXTRA_DIR / METADATA_FILE).is_file():
        from cnnkit.repository import open_version

        version = open_version(path.parent.parent, path.parent.name, int(path.name))
        return SavedModelExplainer(version.path, version.metadata)
    raise ExplainError(f"{source} is neither a run directory, a .keras file, nor a model (version) "
                       f"folder of a model repository.")


def _keras_explainer(model_path: Path, run: RunDir) -> KerasExplainer:
    """An explainer of ``model_path``, with the class names of ``run``'s evaluation when it has one."""
    class_names = None
    if run.metrics.is_file():
        class_names = json.loads(run.metrics.read_text()).get("class_names")
    return KerasExplainer(load_run_model(model_path), class_names)


# Toolkit commands -------------------------------------------------------------------------------


def write_gradcam(source: str | Path, image_path: str | Path, target: int | str | None = None, *,
                  output: str | Path | None = None, layer: str | None = None) -> tuple[Path, GradCamResult]:
    """Grad-CAM of one image file: write the overlay PNG (and the heatmap as .npy beside it)."""
    from cnnkit.io import atomic_save, atomic_write_bytes
    from cnnkit.pictures import gradcam_figure
    from cnnkit.training.feature_maps import load_image_for_model

    explainer = open_explainer(source)
    image = load_image_for_model(image_path, explainer.input_shape)
    result = explainer.gradcam(image, target, layer)
    path = Path(output) if output else Path(f"{Path(image_path).stem}_gradcam_{result.class_name}.png")
    predicted = explainer.class_names[result.predicted_index]
    overlay = gradcam_figure(image, result.heatmap, class_name=result.class_name, probability=result.probability,
                             layer=result.layer, layer_shape=result.coarse_heatmap.shape, model=explainer.name,
                             predicted=(predicted, float(result.probabilities[result.predicted_index])))
    atomic_save(path, lambda temporary: overlay.save(temporary, format="PNG"))
    buffer = _npy_bytes(result.heatmap)
    atomic_write_bytes(path.with_suffix(".npy"), buffer)
    return path, result


def write_filter_patterns(source: str | Path, layer: str | None, filters: Sequence[int] | int | None = None, *,
                          output: str | Path | None = None, steps: int = PATTERN_STEPS, seed: int = 0,
                          columns: int = 8, show_progress: bool = True) -> tuple[Path, list[int], np.ndarray]:
    """Filter patterns of one convolution layer as a grid PNG; returns (path, filters, gains)."""
    from tqdm import tqdm

    from cnnkit.explain import dead_filters
    from cnnkit.io import atomic_save
    from cnnkit.pictures import pattern_figure

    explainer = open_explainer(source)
    chosen_layer = check_conv_layer(layer, explainer.conv_layers, explainer.name)
    count = len(check_filters(filters, explainer.layer_channels[chosen_layer], chosen_layer))
    with tqdm(total=count, unit="filter", desc=f"{chosen_layer} patterns", disable=not show_progress) as bar:
        indices, patterns, gains = explainer.filter_patterns(chosen_layer, filters, steps=steps, seed=seed,
                                                             progress=bar.update)
    path = Path(output) if output else Path(f"{explainer.name}_{chosen_layer}_patterns.png")
    grid = pattern_figure(patterns, indices, dead=dead_filters(indices, gains), columns=columns,
                          title=f"{explainer.name} · {chosen_layer} · filter patterns ({steps} steps)")
    atomic_save(path, lambda temporary: grid.save(temporary, format="PNG"))
    return path, indices, gains


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()
