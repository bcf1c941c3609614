"""Feature maps of a trained model: the activations of its conv and pooling layers for one image.

The grids are drawn by ``cnnkit.pictures.feature_map_figure`` (titled, channels numbered, with the
colour scale), which the service shares.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cnnkit.errors import RunError
from cnnkit.io import atomic_save
from cnnkit.pictures import feature_map_figure, feature_map_title
from cnnkit.training.rundir import RunDir, load_run_model


def load_image_for_model(path: str | Path, input_shape) -> np.ndarray:
    """An image file as a uint8 array of the model's input shape (resized, grey or RGB)."""
    from cnnkit.training.data import _load_image

    height, width, channels = (int(size) for size in input_shape)
    try:
        return _load_image(Path(path), (height, width), channels)
    except FileNotFoundError as error:
        raise RunError(f"Image {path} does not exist.") from error
    except Exception as error:  # noqa: BLE001 - Pillow raises several kinds on bad files.
        raise RunError(f"Cannot read image {path}: {error}") from error


def compute_feature_maps(model, image: np.ndarray, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Activations (H, W, C) of the named layers (default: every conv layer) for one image."""
    import keras

    from cnnkit.training.models import feature_layers

    available = feature_layers(model)
    if layers is None:
        conv = keras.layers.Conv2D
        layers = [name for name in available if isinstance(model.get_layer(name), conv)]
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise RunError(
            f"Model {model.name} has no feature layer {', '.join(unknown)}; "
            f"feature layers: {', '.join(available)}."
        )
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in layers])
    outputs = probe(np.asarray(image, dtype=np.float32)[None], training=False)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    return {name: np.asarray(output)[0] for name, output in zip(layers, outputs, strict=True)}


def write_feature_map_grids(
    run_dir: str | Path, image_path: str | Path, layers: list[str] | None = None,
    output: str | Path | None = None,
) -> list[Path]:
    """Write one grid PNG per layer for ``image_path``; returns the written paths."""
    source = Path(run_dir)
    model_path = source if source.suffix == ".keras" else RunDir(source).model
    if not model_path.is_file():
        raise RunError(f"{model_path} does not exist: train the run to the end first.")
    model = load_run_model(model_path)
    image = load_image_for_model(image_path, model.input_shape[1:])
    target = Path(output) if output else (model_path.parent / "feature_maps")
    written = []
    for name, activations in compute_feature_maps(model, image, layers).items():
        grid = feature_map_figure(activations, title=feature_map_title(model.name, None, name, activations))
        path = target / f"{Path(image_path).stem}_{name}.png"
        atomic_save(path, functools.partial(grid.save, format="PNG"))
        written.append(path)
    return written
