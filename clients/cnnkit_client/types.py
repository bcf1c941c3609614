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
