"""What the service does, independent of HTTP and gRPC: classify, feature maps, model descriptions.

``InferenceCore`` owns the model store and one micro-batcher per model version. The HTTP front end
(BentoML) and the gRPC front end call the same methods, so they share models, the version policy
and the metrics.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from serving import metrics
from serving.batching import Batching, MicroBatcher
from serving.errors import InvalidInputError
from serving.explain import Explanations, FilterPatterns, GradCam, explain_layers
from serving.inputs import DEFAULT_LIMITS, InputLimits, top_k
from serving.model_store import LoadedModel, ModelStore
from training.visualize import feature_map_grid, heatmap_overlay, pattern_grid, to_png

ARRAY_DTYPES = ("float16", "float32", "uint8")


def encode_array(array: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    """A compact JSON form of an array: shape, dtype and little-endian bytes in base64."""
    if dtype not in ARRAY_DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(ARRAY_DTYPES)}, got {dtype!r}.")
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"shape": list(data.shape), "dtype": dtype, "data": base64.b64encode(data.tobytes()).decode()}


@dataclass
class Classification:
    model: str
    version: int
    predictions: list[list[dict[str, Any]]]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "predictions": self.predictions}


Batcher = TypeVar("Batcher", bound=Batching)


class VersionBatchers(Generic[Batcher]):
    """One batcher per served model version, running that version's probabilities and counting
    its batches in the metrics. Used by both front ends (``MicroBatcher`` for HTTP's event loop,
    ``ThreadBatcher`` for gRPC's threads). When a new version's batcher is made, those of retired
    versions are closed and dropped, so that their ONNX Runtime sessions can be freed."""

    def __init__(self, store: ModelStore,
                 make: Callable[[Callable[[np.ndarray], dict[str, np.ndarray]], Callable[[int], None]], Batcher]):
        self.store = store
        self.make = make
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._lock = threading.Lock()

    def get(self, model: LoadedModel) -> Batcher:
        key = (model.name, model.version)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                served = self.store.served_versions()
                for retired in [name for name in self._batchers if name not in served]:
                    self._batchers.pop(retired).close()
                batcher = self._batchers[key] = self.make(
                    lambda images: model.run(images, ["probabilities"]),
                    lambda size: metrics.record_batch(model.name, size),
                )
            return batcher

    def close(self) -> None:
        with self._lock:
            for batcher in self._batchers.values():
                batcher.close()
            self._batchers.clear()

    def __iter__(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            return iter(list(self._batchers))


class InferenceCore:
    def __init__(self, store: ModelStore, *, limits: InputLimits = DEFAULT_LIMITS,
                 max_batch_size: int = 64, max_wait_ms: float | None = None,
                 explanations: Explanations | None = None):
        self.store = store
        # Grad-CAM and filter patterns run in a TensorFlow worker process, shared by HTTP and gRPC.
        self.explanations = explanations if explanations is not None else Explanations()
        self.limits = limits
        self.max_batch_size = max_batch_size
        # Natural batching by default (see serving.batching); CNNKIT_BATCH_WAIT_MS trades latency for batch size.
        if max_wait_ms is None:
            max_wait_ms = float(os.environ.get("CNNKIT_BATCH_WAIT_MS", "0"))
        self.max_wait_ms = max_wait_ms
        self._batchers = VersionBatchers(store, lambda infer, on_batch: MicroBatcher(
            infer, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms, on_batch=on_batch))

    def model(self, name: str, version: int | str | None = None) -> LoadedModel:
        return self.store.get(name, version)

    def batcher(self, model: LoadedModel) -> MicroBatcher:
        """The model version's micro-batcher (call it from the event loop that serves requests)."""
        return self._batchers.get(model)

    async def classify(self, model: LoadedModel, images: np.ndarray, k: int = 5) -> Classification:
        """Top-k classes for a validated float32 batch, through the model's micro-batcher."""
        outputs = await self.batcher(model).submit(images)
        return Classification(model.name, model.version,
                              top_k(outputs["probabilities"], model.class_names, k))

    def feature_maps(self, model: LoadedModel, image: np.ndarray, layers: Sequence[str] | None = None,
                     ) -> dict[str, np.ndarray]:
        """Activations (H, W, C) of the named layers (default: every convolution) for one image."""
        names = model.check_layers(layers)
        outputs = model.run(image[None] if image.ndim == 3 else image[:1], names)
        metrics.record_batch(model.name, 1)
        return {name: outputs[name][0] for name in names}

    @staticmethod
    def feature_map_arrays(maps: dict[str, np.ndarray], dtype: str = "float16") -> dict[str, Any]:
        return {name: encode_array(value, dtype) for name, value in maps.items()}

    @staticmethod
    def feature_map_pngs(maps: dict[str, np.ndarray]) -> dict[str, bytes]:
        return {name: to_png(feature_map_grid(value)) for name, value in maps.items()}

    def gradcam(self, model: LoadedModel, image: np.ndarray, class_name: str | None = None,
                class_index: int | None = None, dtype: str = "float16") -> dict[str, Any]:
        """Grad-CAM of one validated image: the heatmap as an array and the overlay PNG (base64)."""
        if class_name is not None and class_index is not None:
            raise InvalidInputError("Send at most one of 'class_name' and 'class_index'.")
        if dtype not in ARRAY_DTYPES[:2]:
            raise InvalidInputError(f"dtype must be float16 or float32, got {dtype!r}.")
        result: GradCam = self.explanations.gradcam(model, image, class_name if class_name is not None else class_index)
        overlay = heatmap_overlay(image, result.heatmap)
        return {
            "model": result.model, "version": result.version, "layer": result.layer,
            "class_index": result.class_index, "class_name": result.class_name, "probability": result.probability,
            "predicted": {"class_index": result.predicted_index, "class_name": result.predicted_name,
                          "probability": result.predicted_probability},
            "heatmap": encode_array(result.heatmap, dtype),
            "overlay_png": base64.b64encode(to_png(overlay)).decode("ascii"),
        }

    def filter_patterns(self, model: LoadedModel, layer: str | None = None, filters: Any = None,
                        steps: int = 40, seed: int = 0, arrays: bool = False) -> dict[str, Any]:
        """Filter patterns of a conv layer: a grid PNG (base64), per-filter gains, optionally the arrays."""
        if filters is not None and not (isinstance(filters, int) or (
                isinstance(filters, list) and all(isinstance(index, int) for index in filters))):
            raise InvalidInputError("'filters' must be a count or a list of filter indices.")
        if not isinstance(seed, int):
            raise InvalidInputError(f"'seed' must be an integer, got {seed!r}.")
        result: FilterPatterns = self.explanations.filter_patterns(model, layer, filters, steps=steps, seed=seed)
        answer: dict[str, Any] = {
            "model": result.model, "version": result.version, "layer": result.layer, "steps": result.steps,
            "seed": result.seed, "filters": result.filters, "cached": result.cached, "dead": result.dead,
            "mean_activation": [[float(before), float(after)] for before, after in result.mean_activation],
            "grid_png": base64.b64encode(to_png(pattern_grid(result.patterns))).decode("ascii"),
        }
        if arrays:
            answer["patterns"] = encode_array(result.patterns, "uint8")
        return answer

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        """What clients need to call a model: classes, input, layers, training figures."""
        metadata = model.metadata
        training = metadata.get("training", {})
        signatures = {"serving_default": ["probabilities", "top_class"], "feature_maps": model.layer_names}
        if explain_layers(model)["gradcam_layer"]:
            signatures["gradcam"] = ["heatmap", "coarse_heatmap", "class_index", "probabilities"]
        return {
            "name": model.name,
            "version": model.version,
            "versions": self.store.versions(model.name),
            "class_names": model.class_names,
            "input": metadata["input"],
            "preprocessing": metadata.get("preprocessing"),
            "feature_layers": model.feature_layers,
            "default_layers": model.conv_layer_names,
            "signatures": signatures,
            "explain": explain_layers(model),
            "test_accuracy": training.get("test_accuracy"),
            "dataset": training.get("dataset"),
            "recipe": (training.get("recipe") or {}).get("name"),
            "providers": model.providers,
            "source": metadata.get("source"),
        }

    def list_models(self) -> list[dict[str, Any]]:
        return [self.describe(self.store.get(name)) for name in self.store.names()]
