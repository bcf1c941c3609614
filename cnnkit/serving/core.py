"""What the service does, independent of HTTP and gRPC: classify, feature maps, explanations and
model descriptions.

One ``InferenceCore`` per server process owns the model store, the batchers of every model version
and the explanation worker. The HTTP front end (BentoML) and the gRPC front end are built on the
same instance, so they share models, the version policy and the metrics; each serves from its own
event loop, with batchers of its own. Requests reach
it validated (see :mod:`cnnkit.serving.requests` and :mod:`cnnkit.serving.inputs`).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnkit.errors import InvalidInputError
from cnnkit.pictures import feature_map_figure, feature_map_title, gradcam_figure, pattern_figure, to_png
from cnnkit.repository import PREDICT_OUTPUTS
from cnnkit.serving import metrics
from cnnkit.serving.batching import MicroBatcher
from cnnkit.serving.explain import Explanations, FilterPatterns, GradCam, explain_layers
from cnnkit.serving.inputs import DEFAULT_LIMITS, InputLimits, top_k
from cnnkit.serving.model_store import LoadedModel, ModelStore
from cnnkit.settings import Settings

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


class VersionBatchers:
    """One micro-batcher per served model version (on one event loop), running that version's
    probabilities and counting its batches in the metrics. When a new version's batcher is made,
    those of retired versions are closed and dropped, so that their ONNX Runtime sessions can be freed."""

    def __init__(self, store: ModelStore, make: Callable[..., MicroBatcher]):
        self.store = store
        self.make = make
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._lock = threading.Lock()

    def get(self, model: LoadedModel) -> MicroBatcher:
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
    """Everything the front ends serve, once per server process: the model store, the version
    policy, the batchers, the explanations and the metrics.

    Every inference goes through :meth:`predict`, a coroutine: both front ends serve inference from
    an event loop (HTTP from BentoML's, gRPC from the gRPC server's). It takes the outputs a request
    wants: the classification outputs (``probabilities``, ``top_class``) are computed by the
    version's micro-batcher, together with other callers' images; any other output (feature maps)
    runs the session directly, in a thread. Either way the batch is counted in the metrics here,
    and nowhere else. A micro-batcher queues on the loop that made it, so each loop gets its own.
    """

    def __init__(self, store: ModelStore, *, limits: InputLimits = DEFAULT_LIMITS,
                 max_batch_size: int = 64, max_wait_ms: float = 0.0, max_queue: int | None = None,
                 max_queue_ms: float | None = None, explanations: Explanations | None = None,
                 inline_batch_ms: float = 1.0, batch_gather_ms: float = 20.0):
        self.store = store
        # Grad-CAM and filter patterns run in a TensorFlow worker process, shared by HTTP and gRPC.
        self.explanations = explanations if explanations is not None else Explanations()
        self.limits = limits
        self.max_batch_size = max_batch_size
        # Natural batching by default (see cnnkit.serving.batching); max_wait_ms trades latency for batch size.
        self.max_wait_ms = max_wait_ms
        # A lone request for a quick model runs in the event loop (see cnnkit.serving.batching).
        self.inline_batch_ms = inline_batch_ms
        # Under load a batch gathers the calls the loop is about to submit (see cnnkit.serving.batching).
        self.batch_gather_ms = batch_gather_ms
        # Admission control (see cnnkit.serving.batching): None leaves the queues unbounded.
        self.max_queue = max_queue
        self.max_queue_ms = max_queue_ms
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, VersionBatchers] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, store: ModelStore, settings: Settings,
                      explanations: Explanations | None = None) -> InferenceCore:
        limits = InputLimits(max_body_bytes=settings.max_body_bytes, max_image_pixels=settings.max_image_pixels,
                             max_batch=settings.max_images)
        return cls(store, limits=limits, max_batch_size=settings.max_batch_size, max_wait_ms=settings.batch_wait_ms,
                   max_queue=settings.max_queue, max_queue_ms=settings.max_queue_ms,
                   inline_batch_ms=settings.inline_batch_ms, batch_gather_ms=settings.batch_gather_ms,
                   explanations=explanations if explanations is not None else Explanations.from_settings(settings))

    def _make_batcher(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]],
                      on_batch: Callable[[int], None]) -> MicroBatcher:
        return MicroBatcher(infer, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                            on_batch=on_batch, max_queue=self.max_queue, max_queue_ms=self.max_queue_ms,
                            inline_ms=self.inline_batch_ms, gather_ms=self.batch_gather_ms)

    def loop_batchers(self) -> VersionBatchers:
        """The batchers of the running event loop (made on its first request)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batchers = self._loops.get(loop)
            if batchers is None:
                batchers = self._loops[loop] = VersionBatchers(self.store, self._make_batcher)
            return batchers

    def close_loop_batchers(self) -> None:
        """Stop the running event loop's batchers (a front end calls it before its loop stops)."""
        with self._lock:
            batchers = self._loops.pop(asyncio.get_running_loop(), None)
        if batchers is not None:
            batchers.close()

    def close(self) -> None:
        """Stop every loop's batchers and the explanation worker."""
        with self._lock:
            every = list(self._loops.values())
            self._loops.clear()
        for batchers in every:
            batchers.close()
        self.explanations.close()

    def model(self, name: str, version: int | str | None = None) -> LoadedModel:
        """The pinned version, else the latest (the request's metrics are labelled with it)."""
        model = self.store.get(name, version)
        metrics.served(model.name, model.version)
        return model

    def batcher(self, model: LoadedModel) -> MicroBatcher:
        """The model version's micro-batcher on the running event loop."""
        return self.loop_batchers().get(model)

    # The one predict path ----------------------------------------------------------------------

    def admit(self, model: LoadedModel) -> None:
        """Refuse a classification at once (OverloadedError: 503 / RESOURCE_EXHAUSTED) when the
        version's queue is full; the front ends call it, from their loop, before decoding anything."""
        self.batcher(model).admit()

    @staticmethod
    def _split(model: LoadedModel, outputs: Sequence[str] | None) -> tuple[list[str], bool]:
        wanted = list(outputs) if outputs else ["probabilities"]
        return wanted, set(wanted) <= set(PREDICT_OUTPUTS)

    @staticmethod
    def _classification(wanted: list[str], probabilities: np.ndarray) -> dict[str, np.ndarray]:
        everything = {"probabilities": probabilities,
                      "top_class": probabilities.argmax(axis=1).astype(np.int64)}
        return {name: everything[name] for name in wanted}

    def _run(self, model: LoadedModel, images: np.ndarray, wanted: list[str]) -> dict[str, np.ndarray]:
        outputs = model.run(images, wanted)
        metrics.record_batch(model.name, len(images))
        return outputs

    async def predict(self, model: LoadedModel, images: np.ndarray,
                      outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named outputs (default ``probabilities``) for a validated float32 batch: classification
        outputs batched without blocking the loop, other outputs in a thread."""
        wanted, batched = self._split(model, outputs)
        if batched:
            return self._classification(wanted, (await self.batcher(model).submit(images))["probabilities"])
        return await asyncio.to_thread(self._run, model, images, wanted)

    async def classify(self, model: LoadedModel, images: np.ndarray, k: int = 5) -> Classification:
        """Top-k classes for a validated float32 batch."""
        probabilities = (await self.predict(model, images))["probabilities"]
        return Classification(model.name, model.version, top_k(probabilities, model.class_names, k))

    def feature_maps(self, model: LoadedModel, image: np.ndarray, layers: Sequence[str] | None = None,
                     ) -> dict[str, np.ndarray]:
        """Activations (H, W, C) of the named layers (default: every convolution) for one image,
        from a thread (the session runs directly, not through a batcher)."""
        names = model.check_layers(layers)
        outputs = self._run(model, image[None] if image.ndim == 3 else image[:1], names)
        return {name: outputs[name][0] for name in names}

    @staticmethod
    def feature_map_arrays(maps: dict[str, np.ndarray], dtype: str = "float16") -> dict[str, Any]:
        return {name: encode_array(value, dtype) for name, value in maps.items()}

    @staticmethod
    def feature_map_pngs(model: LoadedModel, maps: dict[str, np.ndarray]) -> dict[str, bytes]:
        """One titled grid per layer (channel numbers, colour scale), the toolkit's picture."""
        return {name: to_png(feature_map_figure(value, title=feature_map_title(model.name, model.version, name, value)))
                for name, value in maps.items()}

    def gradcam(self, model: LoadedModel, image: np.ndarray, class_name: str | None = None,
                class_index: int | None = None, dtype: str = "float16") -> dict[str, Any]:
        """Grad-CAM of one validated image: the heatmap as an array and the overlay PNG (base64).

        At most one of ``class_name`` and ``class_index`` (checked by the request models); the
        predicted class when neither is given."""
        result: GradCam = self.explanations.gradcam(model, image, class_name if class_name is not None else class_index)
        overlay = gradcam_figure(image, result.heatmap, class_name=result.class_name, probability=result.probability,
                                 layer=result.layer, layer_shape=result.coarse_heatmap.shape,
                                 model=f"{result.model} v{result.version}",
                                 predicted=(result.predicted_name, result.predicted_probability))
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
        result: FilterPatterns = self.explanations.filter_patterns(model, layer, filters, steps=steps, seed=seed)
        answer: dict[str, Any] = {
            "model": result.model, "version": result.version, "layer": result.layer, "steps": result.steps,
            "seed": result.seed, "filters": result.filters, "cached": result.cached, "dead": result.dead,
            "mean_activation": [[float(before), float(after)] for before, after in result.mean_activation],
            "grid_png": base64.b64encode(to_png(pattern_figure(
                result.patterns, result.filters, dead=result.dead,
                title=f"{result.model} v{result.version} · {result.layer} · filter patterns ({result.steps} steps)",
            ))).decode("ascii"),
        }
        if arrays:
            answer["patterns"] = encode_array(result.patterns, "uint8")
        return answer

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        """What clients need to call a model: classes, input, layers, training figures."""
        metadata = model.metadata
        training = metadata.get("training", {})
        signatures = {name: list(signature.outputs)
                      for name, signature in model.signatures(served_only=False).items()}
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

    def describe_all(self) -> list[dict[str, Any]]:
        """The description of the latest version of every model."""
        return [self.describe(self.store.get(name)) for name in self.store.names()]
