"""``LocalClient``: the SDK's ``predict`` in-process, from a model repository, with no server.

It runs the service's own code (the same decoding, the same ONNX Runtime session, the same top-k),
so ``cnnkit score --local`` writes what the service would answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cnnkit.errors import RepositoryError, ServingError
from cnnkit.serving.inputs import DEFAULT_LIMITS, decode_images
from cnnkit.serving.inputs import top_k as top_k_rows
from cnnkit.serving.model_store import ModelStore
from cnnkit_client.errors import from_http_status
from cnnkit_client.images import ImageLike, encode_images
from cnnkit_client.types import ModelInfo, Prediction, predictions_from_rows


class LocalClient:
    def __init__(self, repository: str | os.PathLike, *, threads: int | None = None):
        self.store = ModelStore(repository, threads=threads)
        try:
            self.store.refresh()
        except RepositoryError as error:
            raise from_http_status(404, str(error)) from error
        self.limits = DEFAULT_LIMITS

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the sessions go with the object."""

    def metadata(self, model: str, *, version: int | None = None) -> ModelInfo:
        """What the service's ``GET /models/NAME`` would say of the version (classes, input, layers)."""
        try:
            served = self.store.get(model, version)
        except ServingError as error:
            raise from_http_status(error.http_status, error.message) from error
        return ModelInfo.from_dict({
            "name": served.name, "version": served.version, "versions": self.store.versions(served.name),
            "class_names": served.class_names, "input": served.metadata["input"],
            "feature_layers": served.feature_layers, "default_layers": served.conv_layer_names,
            "providers": served.providers,
        })

    def predict(self, images: ImageLike | Sequence[ImageLike], *, model: str, version: int | None = None,
                top_k: int = 5, timeout: float | None = None) -> Any:
        encoded, single = encode_images(images)
        try:
            served = self.store.get(model, version)
            predictions: list[Prediction] = []
            for start in range(0, len(encoded), self.limits.max_batch):
                batch = decode_images(encoded[start:start + self.limits.max_batch], served.input_shape, self.limits)
                rows = top_k_rows(served.predict(batch), served.class_names, top_k)
                predictions += predictions_from_rows(served.name, served.version, rows)
        except ServingError as error:
            raise from_http_status(error.http_status, error.message) from error
        return predictions[0] if single else predictions

