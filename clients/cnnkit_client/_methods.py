"""The public methods of the clients, written once: ``SyncMethods`` for ``Client`` and
``GrpcClient``, ``AsyncMethods`` for ``AsyncClient`` and ``AsyncGrpcClient``.

Each method builds its plan with the client's ``_*_plan`` method (HTTP calls or gRPC calls, see
:mod:`cnnkit_client._plan`) and runs it with the client's ``_attempt``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from cnnkit_client._plan import Plan, arun, run, slow_timeout
from cnnkit_client.images import ImageLike
from cnnkit_client.retry import Retry
from cnnkit_client.types import FeatureMaps, FilterPatterns, GradCam, Health, ModelInfo, Prediction

T = TypeVar("T")


class _Plans:
    """The plans every client builds (HTTP and gRPC implement them)."""

    retry: Retry
    default_timeout: float | None

    def _predict_plan(self, images: ImageLike | Sequence[ImageLike], model: str, version: int | None,
                      top_k: int) -> Plan[Prediction | list[Prediction]]:
        raise NotImplementedError

    def _feature_maps_plan(self, image: ImageLike, model: str, layers: Sequence[str] | None, version: int | None,
                           as_png: bool) -> Plan[FeatureMaps]:
        raise NotImplementedError

    def _gradcam_plan(self, image: ImageLike, model: str, target: int | str | None,
                      version: int | None) -> Plan[GradCam]:
        raise NotImplementedError

    def _filter_patterns_plan(self, model: str, layer: str | None, filters: int | Sequence[int] | None,
                              steps: int, seed: int, version: int | None, arrays: bool) -> Plan[FilterPatterns]:
        raise NotImplementedError

    def _models_plan(self) -> Plan[list[ModelInfo]]:
        raise NotImplementedError

    def _metadata_plan(self, model: str, version: int | None) -> Plan[ModelInfo]:
        raise NotImplementedError

    def _health_plan(self) -> Plan[Health]:
        raise NotImplementedError


class SyncMethods(_Plans):
    def _attempt(self, call: Any, timeout: float | None) -> Any:
        raise NotImplementedError

    def _run(self, plan: Plan[T], timeout: float | None) -> T:
        return run(plan, lambda call: self._attempt(call, timeout), self.retry)

    def predict(self, images: ImageLike | Sequence[ImageLike], *, model: str, version: int | None = None,
                top_k: int = 5, timeout: float | None = None) -> Any:
        """The top-k classes of one image (a ``Prediction``) or of many (a list, in order).

        An image is a path, file bytes, a PIL image or a uint8 numpy array; a list, a tuple or a
        4-D array is many. Batches larger than ``max_images_per_request`` are split.
        """
        return self._run(self._predict_plan(images, model, version, top_k), timeout)

    def feature_maps(self, image: ImageLike, *, model: str, layers: Sequence[str] | None = None,
                     version: int | None = None, as_png: bool = False, timeout: float | None = None) -> FeatureMaps:
        """Activations of the named layers (default: every convolution) for one image, or PNG grids."""
        return self._run(self._feature_maps_plan(image, model, layers, version, as_png), timeout)

    def gradcam(self, image: ImageLike, *, model: str, target: int | str | None = None,
                version: int | None = None, timeout: float | None = None) -> GradCam:
        """Grad-CAM of one image for a class (name or index; default: the predicted class)."""
        return self._run(self._gradcam_plan(image, model, target, version),
                         slow_timeout(timeout, self.default_timeout))

    def filter_patterns(self, *, model: str, layer: str | None = None, filters: int | Sequence[int] | None = None,
                        steps: int = 40, seed: int = 0, version: int | None = None, arrays: bool = False,
                        timeout: float | None = None) -> FilterPatterns:
        """What each filter of a conv layer responds to (default: the last conv layer, first 64 filters).

        The first call for a layer can take seconds to minutes (it is cached per model version).
        """
        return self._run(self._filter_patterns_plan(model, layer, filters, steps, seed, version, arrays),
                         slow_timeout(timeout, self.default_timeout))

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the service serves (its latest version)."""
        return self._run(self._models_plan(), timeout)

    def metadata(self, model: str, *, version: int | None = None, timeout: float | None = None) -> ModelInfo:
        return self._run(self._metadata_plan(model, version), timeout)

    def health(self, *, timeout: float | None = None) -> Health:
        """Liveness and readiness; raises ``ConnectError`` when nothing answers."""
        return self._run(self._health_plan(), timeout)


class AsyncMethods(_Plans):
    """The same methods, awaited; the calls of one plan (a split batch) are sent concurrently."""

    def _attempt(self, call: Any, timeout: float | None) -> Awaitable[Any]:
        raise NotImplementedError

    async def _run(self, plan: Plan[T], timeout: float | None) -> T:
        return await arun(plan, lambda call: self._attempt(call, timeout), self.retry)

    async def predict(self, images: ImageLike | Sequence[ImageLike], *, model: str, version: int | None = None,
                      top_k: int = 5, timeout: float | None = None) -> Any:
        return await self._run(self._predict_plan(images, model, version, top_k), timeout)

    async def feature_maps(self, image: ImageLike, *, model: str, layers: Sequence[str] | None = None,
                           version: int | None = None, as_png: bool = False,
                           timeout: float | None = None) -> FeatureMaps:
        return await self._run(self._feature_maps_plan(image, model, layers, version, as_png), timeout)

    async def gradcam(self, image: ImageLike, *, model: str, target: int | str | None = None,
                      version: int | None = None, timeout: float | None = None) -> GradCam:
        return await self._run(self._gradcam_plan(image, model, target, version),
                               slow_timeout(timeout, self.default_timeout))

    async def filter_patterns(self, *, model: str, layer: str | None = None,
                              filters: int | Sequence[int] | None = None, steps: int = 40, seed: int = 0,
                              version: int | None = None, arrays: bool = False,
                              timeout: float | None = None) -> FilterPatterns:
        return await self._run(self._filter_patterns_plan(model, layer, filters, steps, seed, version, arrays),
                               slow_timeout(timeout, self.default_timeout))

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return await self._run(self._models_plan(), timeout)

    async def metadata(self, model: str, *, version: int | None = None, timeout: float | None = None) -> ModelInfo:
        return await self._run(self._metadata_plan(model, version), timeout)

    async def health(self, *, timeout: float | None = None) -> Health:
        return await self._run(self._health_plan(), timeout)
