"""What the service does, independent of HTTP and gRPC: classify, feature maps, model descriptions.

``InferenceCore`` owns the model store and one micro-batcher per model version. The HTTP front end
(BentoML) and the gRPC front end call the same methods, so they share models, the version policy
and the metrics.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import metrics
from serving.batching import MicroBatcher
from serving.errors import InvalidInputError
from serving.inputs import DEFAULT_LIMITS, InputLimits, top_k
from serving.model_store import LoadedModel, ModelStore
from training.visualize import feature_map_grid, to_png

ARRAY_DTYPES = ("float16", "float32")


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


class InferenceCore:
    def __init__(self, store: ModelStore, *, limits: InputLimits = DEFAULT_LIMITS,
                 max_batch_size: int = 64, max_wait_ms: float | None = None):
        self.store = store
        self.limits = limits
        self.max_batch_size = max_batch_size
        # Natural batching by default (see serving.batching); CNNKIT_BATCH_WAIT_MS trades latency for batch size.
        if max_wait_ms is None:
            max_wait_ms = float(os.environ.get("CNNKIT_BATCH_WAIT_MS", "0"))
        self.max_wait_ms = max_wait_ms
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}

    def model(self, name: str, version: int | str | None = None) -> LoadedModel:
        return self.store.get(name, version)

    def batcher(self, model: LoadedModel) -> MicroBatcher:
        key = (model.name, model.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = MicroBatcher(
                lambda images: model.run(images, ["probabilities"]),
                max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                on_batch=lambda size: metrics.record_batch(model.name, size),
            )
            self._batchers[key] = batcher
        return batcher

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

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        """What clients need to call a model: classes, input, layers, training figures."""
        metadata = model.metadata
        training = metadata.get("training", {})
        return {
            "name": model.name,
            "version": model.version,
            "versions": self.store.versions(model.name),
            "class_names": model.class_names,
            "input": metadata["input"],
            "preprocessing": metadata.get("preprocessing"),
            "feature_layers": model.feature_layers,
            "default_layers": model.conv_layer_names,
            "signatures": {"serving_default": ["probabilities", "top_class"],
                           "feature_maps": model.layer_names},
            "test_accuracy": training.get("test_accuracy"),
            "dataset": training.get("dataset"),
            "recipe": (training.get("recipe") or {}).get("name"),
            "providers": model.providers,
            "source": metadata.get("source"),
        }

    def list_models(self) -> list[dict[str, Any]]:
        return [self.describe(self.store.get(name)) for name in self.store.names()]
