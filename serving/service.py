"""The cnnkit service: BentoML for HTTP, with the TF-Serving gRPC server in the same process.

Start it with ``cnnkit serve`` or, from the project root, ``bentoml serve``. It serves every model
of the repository in ``CNNKIT_MODEL_REPOSITORY`` (default ``./model_repository``):

* HTTP (BentoML, port 3000): ``POST /predict`` (image upload), ``POST /predict_json`` (base64
  images or a pixel tensor), ``POST /feature_maps``, ``POST /gradcam``, ``POST /filter_patterns``
  (see :mod:`serving.explain`), ``POST /reload``; ``GET /models...`` and the
  TF-Serving REST API under ``/v1``; BentoML's ``/livez``, ``/readyz``, ``/metrics`` and Swagger UI.
* gRPC (``CNNKIT_GRPC_PORT``, default 8500): TF Serving's PredictionService, ModelService, health.

The class stays thin: decoding, validation and top-k live in :mod:`serving.inputs`, inference in
:mod:`serving.core`, the REST routes in :mod:`serving.rest`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from bentoml.validators import ContentType  # noqa: E402

from serving.core import InferenceCore  # noqa: E402
from serving.errors import InvalidInputError, ServingError  # noqa: E402
from serving.inputs import (  # noqa: E402
    DEFAULT_LIMITS,  # noqa: E402
    check_count,
    decode_base64,
    decode_image,
    decode_images,
    tensor_from_json,
)
from serving.middleware import API_KEY_ENV, ApiKeyMiddleware, BodyLimitMiddleware  # noqa: E402
from serving.model_store import ModelStore, RepositoryPoller  # noqa: E402
from serving.rest import build_models_app, build_tf_serving_app  # noqa: E402
from training.repository import resolve_repository  # noqa: E402

logger = logging.getLogger("cnnkit.serving")

# The routes' return type. Naming the media type up front matters for speed: without it BentoML
# builds the JSON schema of the return annotation on every response just to find its media type
# (about a tenth of the server's time per request for a small model).
JsonObject = Annotated[dict[str, Any], ContentType("application/json")]

HTTP_PORT = int(os.environ.get("CNNKIT_HTTP_PORT", "3000"))
HOST = os.environ.get("CNNKIT_HOST", "127.0.0.1")
BENTO_MODELS_ENV = "CNNKIT_BENTO_MODELS"


def bento_model_tags() -> list[str]:
    """Models to serve from the BentoML store (``CNNKIT_BENTO_MODELS=digits:1,cifar10:latest``)."""
    return [tag.strip() for tag in os.environ.get(BENTO_MODELS_ENV, "").split(",") if tag.strip()]


def repository_from_bento_store(tags: list[str]) -> Path:
    """A model repository view of BentoML store models: NAME/VERSION links to their exports."""
    import tempfile

    from training.bento import open_bento_model

    root = Path(tempfile.mkdtemp(prefix="cnnkit-bento-repository-"))
    for tag in tags:
        version = open_bento_model(tag)
        (root / version.name).mkdir(exist_ok=True)
        (root / version.name / str(version.version)).symlink_to(version.path, target_is_directory=True)
    return root


# Image files up to this size are decoded in the event loop: a 28x28 PNG decodes in about 50 µs,
# less than handing it to a worker thread costs; larger files (photos) go to a thread.
INLINE_DECODE_BYTES = 32 * 1024


async def _off_loop_if_large(size: int, function, *args):
    """``function(*args)`` in the event loop for small inputs, else in a worker thread."""
    if size <= INLINE_DECODE_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def _current_core() -> InferenceCore:
    service = bentoml.get_current_service()
    if service is None:
        raise RuntimeError("The cnnkit service is not running.")
    return service.core


def _refuse(ctx: bentoml.Context, error: ServingError) -> dict[str, Any]:
    """Answer a refused request with its status and ``{"error": message}``, as the REST routes do.

    Called directly (not through the server) there is no response to set: the error is raised.
    """
    try:
        ctx.response.status_code = error.http_status
    except LookupError:
        raise error from None
    return {"error": error.message}


@bentoml.asgi_app(build_tf_serving_app(_current_core), path="/v1")
@bentoml.asgi_app(build_models_app(_current_core), path="/models")
@bentoml.service(
    name="cnnkit",
    workers=1,
    traffic={"timeout": 60, "max_concurrency": 512},
    http={"host": HOST, "port": HTTP_PORT},
    # One log line per request; CNNKIT_ACCESS_LOG=0 turns it off (about 0.7 ms less per request here).
    logging={"access": {"enabled": os.environ.get("CNNKIT_ACCESS_LOG", "1") != "0"}},
)
class Classifier:
    """Image classification, feature maps and model metadata for every model in the repository."""

    # Models from the BentoML store named in CNNKIT_BENTO_MODELS are declared here, so that
    # `bentoml build` packs them into the Bento; without it the service reads a repository folder.
    for _index, _tag in enumerate(bento_model_tags()):
        vars()[f"bento_model_{_index}"] = bentoml.models.BentoModel(_tag)

    def __init__(self) -> None:
        tags = bento_model_tags()
        repository = repository_from_bento_store(tags) if tags else resolve_repository(None)
        self.store = ModelStore(repository)
        self.core = InferenceCore(self.store)
        if os.environ.get("CNNKIT_EXPLAIN_PRELOAD", "0") == "1":
            self.core.explanations.start()
        self.store.refresh()
        if not self.store.names():
            logger.warning("no models in %s: export one with `cnnkit export RUN_DIR`", repository)
        self.poller = RepositoryPoller(self.store, float(os.environ.get("CNNKIT_POLL_SECONDS", "2"))).start()
        self.grpc_server = None
        grpc_port = int(os.environ.get("CNNKIT_GRPC_PORT", "8500"))
        if grpc_port >= 0:
            from serving.grpc_server import build_server, mark_serving

            self.grpc_server, bound, health = build_server(
                self.store, host=HOST, port=grpc_port, api_key=os.environ.get(API_KEY_ENV) or None,
                limits=self.core.limits, explanations=self.core.explanations,
            )
            self.grpc_server.start()
            mark_serving(health)
            logger.info("gRPC (TF-Serving API) listening on %s:%d", HOST, bound)

    def __is_ready__(self) -> bool:
        return self.store.ready and bool(self.store.names())

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.poller.stop()
        self.core.explanations.close()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=5)

    @bentoml.api(route="/predict")
    async def predict(self, ctx: bentoml.Context, image: Path, model: str, version: int | None = None,
                      top_k: int = 5) -> JsonObject:
        """Classify one uploaded image file (multipart): the top-k classes with probabilities."""
        try:
            served = self.core.model(model, version)
            # Large files are decoded in a worker thread (Pillow releases the GIL): in the event
            # loop they would be decoded one concurrent request after the other.
            data = image.read_bytes()
            pixels = await _off_loop_if_large(len(data), decode_image, data, served.input_shape, self.core.limits)
            result = await self.core.classify(served, pixels[None].astype("float32"), top_k)
            return result.to_dict()
        except ServingError as error:
            return _refuse(ctx, error)

    @bentoml.api(route="/predict_json")
    async def predict_json(self, ctx: bentoml.Context, model: str, images: list[str] | None = None,
                           instances: list[Any] | None = None, version: int | None = None,
                           top_k: int = 5) -> JsonObject:
        """Classify base64-encoded image files (``images``) or a pixel tensor batch (``instances``)."""
        try:
            served = self.core.model(model, version)
            if (images is None) == (instances is None):
                raise InvalidInputError("Send exactly one of 'images' (base64 files) or 'instances' (pixels).")
            if images is not None:
                check_count(len(images), self.core.limits)  # before decoding any base64
                files = [decode_base64(text) for text in images]
                batch = await _off_loop_if_large(sum(map(len, files)), decode_images, files,
                                                 served.input_shape, self.core.limits)
            else:
                batch = tensor_from_json(instances, served.input_shape, self.core.limits)
            return (await self.core.classify(served, batch, top_k)).to_dict()
        except ServingError as error:
            return _refuse(ctx, error)

    @bentoml.api(route="/feature_maps")
    def feature_maps(self, ctx: bentoml.Context, image: Path, model: str, layers: list[str] | None = None,
                     version: int | None = None, output: Literal["array", "png"] = "array",
                     dtype: Literal["float16", "float32"] = "float16") -> JsonObject:
        """Activations of conv/pool layers for one uploaded image: arrays or PNG grids (base64)."""
        try:
            return self._feature_maps(image.read_bytes(), model, layers, version, output, dtype)
        except ServingError as error:
            return _refuse(ctx, error)

    @bentoml.api(route="/feature_maps_json")
    def feature_maps_json(self, ctx: bentoml.Context, image_b64: str, model: str, layers: list[str] | None = None,
                          version: int | None = None, output: Literal["array", "png"] = "array",
                          dtype: Literal["float16", "float32"] = "float16") -> JsonObject:
        """The same for a base64-encoded image file in a JSON body."""
        try:
            return self._feature_maps(decode_base64(image_b64), model, layers, version, output, dtype)
        except ServingError as error:
            return _refuse(ctx, error)

    def _feature_maps(self, data: bytes, model: str, layers: list[str] | None, version: int | None,
                      output: str, dtype: str) -> dict[str, Any]:
        served = self.core.model(model, version)
        pixels = decode_image(data, served.input_shape, self.core.limits).astype("float32")
        maps = self.core.feature_maps(served, pixels, layers)
        result: dict[str, Any] = {"model": served.name, "version": served.version}
        if output == "png":
            result["png"] = {name: base64.b64encode(png).decode()
                             for name, png in self.core.feature_map_pngs(maps).items()}
        else:
            result["layers"] = self.core.feature_map_arrays(maps, dtype)
        return result

    @bentoml.api(route="/gradcam")
    def gradcam(self, ctx: bentoml.Context, image: Path, model: str, version: int | None = None,
                class_name: str | None = None, class_index: int | None = None,
                dtype: Literal["float16", "float32"] = "float16") -> JsonObject:
        """Grad-CAM of one uploaded image for a class (default: the predicted one): heatmap + overlay PNG."""
        try:
            return self._gradcam(image.read_bytes(), model, version, class_name, class_index, dtype)
        except ServingError as error:
            return _refuse(ctx, error)

    @bentoml.api(route="/gradcam_json")
    def gradcam_json(self, ctx: bentoml.Context, image_b64: str, model: str, version: int | None = None,
                     class_name: str | None = None, class_index: int | None = None,
                     dtype: Literal["float16", "float32"] = "float16") -> JsonObject:
        """The same for a base64-encoded image file in a JSON body."""
        try:
            return self._gradcam(decode_base64(image_b64), model, version, class_name, class_index, dtype)
        except ServingError as error:
            return _refuse(ctx, error)

    def _gradcam(self, data: bytes, model: str, version: int | None, class_name: str | None,
                 class_index: int | None, dtype: str) -> dict[str, Any]:
        served = self.core.model(model, version)
        pixels = decode_image(data, served.input_shape, self.core.limits)
        return self.core.gradcam(served, pixels, class_name, class_index, dtype)

    @bentoml.api(route="/filter_patterns")
    def filter_patterns(self, ctx: bentoml.Context, model: str, version: int | None = None,
                        layer: str | None = None, filters: int | list[int] | None = None, steps: int = 40,
                        seed: int = 0, arrays: bool = False) -> JsonObject:
        """What each filter of a conv layer responds to (gradient ascent), as a grid PNG; cached per version."""
        try:
            return self.core.filter_patterns(self.core.model(model, version), layer, filters, steps, seed, arrays)
        except ServingError as error:
            return _refuse(ctx, error)

    @bentoml.api(route="/reload")
    def reload(self) -> JsonObject:
        """Load versions that appeared in the repository since the last poll (admin)."""
        loaded = self.store.refresh()
        return {"loaded": loaded, "models": {name: self.store.versions(name) for name in self.store.names()},
                "errors": self.store.errors}


# Bodies carry at most max_body_bytes of image data, plus room for base64 (4/3) and JSON framing.
Classifier.add_asgi_middleware(  # type: ignore[attr-defined]
    BodyLimitMiddleware, limit=DEFAULT_LIMITS.max_body_bytes * 4 // 3 + 64 * 1024
)
if os.environ.get(API_KEY_ENV):
    Classifier.add_asgi_middleware(ApiKeyMiddleware, api_key=os.environ[API_KEY_ENV])  # type: ignore[attr-defined]
