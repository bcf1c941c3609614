"""Typed results: what the SDK's methods return, the same for HTTP and gRPC."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction: its name, its index in the model's outputs and its probability."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes for one image, most probable first, and the model version that answered."""

    model: str
    version: int
    classes: tuple[ClassScore, ...]

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.classes[0].label

    @property
    def probability(self) -> float:
        return self.classes[0].probability

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "classes": [{"label": c.label, "index": c.index, "probability": c.probability}
                            for c in self.classes]}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What the service says about one model version: classes, input, layers, training figures."""

    name: str
    version: int
    versions: tuple[int, ...]
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    feature_layers: tuple[LayerInfo, ...]
    default_layers: tuple[str, ...] = ()
    input_name: str = "image"
    test_accuracy: float | None = None
    dataset: str | None = None
    recipe: str | None = None
    providers: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(
            name=data["name"],
            version=int(data["version"]),
            versions=tuple(int(v) for v in data.get("versions", [data["version"]])),
            class_names=tuple(data["class_names"]),
            input_shape=tuple(int(size) for size in data["input"]["shape"]),
            feature_layers=tuple(LayerInfo(layer["name"], tuple(layer["output_shape"]))
                                 for layer in data.get("feature_layers", [])),
            default_layers=tuple(data.get("default_layers", ())),
            input_name=data["input"].get("name", "image"),
            test_accuracy=data.get("test_accuracy"),
            dataset=data.get("dataset"),
            recipe=data.get("recipe"),
            providers=tuple(data.get("providers") or ()),
            raw=dict(data),
        )

    def class_index(self, label: str) -> int:
        return self.class_names.index(label)


class FeatureMaps(Mapping[str, Any]):
    """Layer name -> activations (H, W, C numpy array), or -> PNG bytes of the grid with ``as_png``."""

    def __init__(self, model: str, version: int, maps: Mapping[str, Any]):
        self.model = model
        self.version = version
        self._maps = dict(maps)

    def __getitem__(self, layer: str) -> Any:
        return self._maps[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        shapes = {name: getattr(value, "shape", f"{len(value)} bytes") for name, value in self._maps.items()}
        return f"FeatureMaps(model={self.model!r}, version={self.version}, {shapes})"


@dataclass(frozen=True)
class GradCam:
    """Where in one image the evidence for a class lies (Grad-CAM at the model's last conv layer).

    ``heatmap`` is (H, W) in [0, 1] at the model's input size; ``overlay_png`` is the PNG of the
    heatmap in the jet colour map over the image, captioned with the class, its probability and the
    layer, above the colour scale; ``predicted`` is the model's top class.
    """

    model: str
    version: int
    layer: str
    class_name: str
    class_index: int
    probability: float
    predicted: ClassScore
    heatmap: np.ndarray = field(repr=False)
    overlay_png: bytes = field(repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GradCam:
        import base64

        predicted = data["predicted"]
        return cls(model=data["model"], version=int(data["version"]), layer=data["layer"],
                   class_name=data["class_name"], class_index=int(data["class_index"]),
                   probability=float(data["probability"]),
                   predicted=ClassScore(predicted["class_name"], int(predicted["class_index"]),
                                        float(predicted["probability"])),
                   heatmap=decode_array(data["heatmap"]).astype(np.float32),
                   overlay_png=base64.b64decode(data["overlay_png"]))


@dataclass(frozen=True)
class FilterPatterns:
    """The input patterns that most excite each chosen filter of a conv layer.

    ``grid_png`` tiles them, 8 to a row, numbered, under a title; ``mean_activation`` is
    (filters, 2): each filter's mean response (its convolution before the ReLU) before and after
    the gradient ascent; ``dead`` lists filters whose response the input cannot move (all-zero
    weights, or only zeros reach them), drawn black and crossed out. ``patterns`` (filters, H, W, C)
    uint8 comes only when asked for with ``arrays=True``.
    ``cached`` says the service had computed them before.
    """

    model: str
    version: int
    layer: str
    filters: tuple[int, ...]
    steps: int
    seed: int
    mean_activation: np.ndarray = field(repr=False)
    dead: tuple[int, ...]
    cached: bool
    grid_png: bytes = field(repr=False)
    patterns: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FilterPatterns:
        import base64

        return cls(model=data["model"], version=int(data["version"]), layer=data["layer"],
                   filters=tuple(int(index) for index in data["filters"]), steps=int(data["steps"]),
                   seed=int(data["seed"]), mean_activation=np.asarray(data["mean_activation"], np.float32),
                   dead=tuple(int(index) for index in data.get("dead", ())), cached=bool(data["cached"]),
                   grid_png=base64.b64decode(data["grid_png"]),
                   patterns=decode_array(data["patterns"]) if data.get("patterns") else None)


def gradcam_body(image_file: bytes, model: str, version: int | None, target: int | str | None) -> dict[str, Any]:
    """The JSON request of ``/gradcam_json`` and ``Extensions/GradCam``: a class by name (str) or index (int)."""
    import base64

    if target is not None and not isinstance(target, int | str):
        raise TypeError(f"target must be a class name (str) or index (int), got {target!r}.")
    return {"model": model, "version": version, "image_b64": base64.b64encode(image_file).decode("ascii"),
            "class_name": target if isinstance(target, str) else None,
            "class_index": target if isinstance(target, int) else None, "dtype": "float32"}


def filter_patterns_body(model: str, version: int | None, layer: str | None, filters: int | Sequence[int] | None,
                         steps: int, seed: int, arrays: bool) -> dict[str, Any]:
    """The JSON request of ``/filter_patterns`` and ``Extensions/FilterPatterns``."""
    return {"model": model, "version": version, "layer": layer,
            "filters": filters if filters is None or isinstance(filters, int) else [int(i) for i in filters],
            "steps": steps, "seed": seed, "arrays": arrays}


@dataclass(frozen=True)
class Health:
    """``live``: the process answers; ``ready``: models are loaded and it serves predictions."""

    live: bool
    ready: bool
    detail: str = ""


def predictions_from_rows(model: str, version: int, rows: Sequence[Sequence[Mapping[str, Any]]]) -> list[Prediction]:
    """Predictions from the service's JSON rows (``{"class", "index", "probability"}``)."""
    return [Prediction(model, version, tuple(ClassScore(entry["class"], int(entry["index"]),
                                                        float(entry["probability"])) for entry in row))
            for row in rows]


def decode_array(encoded: Mapping[str, Any]) -> np.ndarray:
    """An array from the service's JSON form: shape, dtype and little-endian base64 bytes."""
    import base64

    dtype = np.dtype(encoded["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype=dtype).reshape(encoded["shape"])
