"""The cnnkit service: BentoML for HTTP, with the TF-Serving gRPC server in the same process.

Start it with ``cnnkit serve`` or, from the project root, ``bentoml serve``. It serves every model
of the repository named by the settings (:mod:`cnnkit.settings`, default ``./model_repository``):

* HTTP (BentoML, port 3000): ``POST /predict`` (image upload), ``POST /predict_json`` (base64
  images or a pixel tensor), ``POST /feature_maps``, ``POST /gradcam``, ``POST /filter_patterns``
  (see :mod:`cnnkit.serving.explain`), ``POST /reload``; ``GET /models...`` and the
  TF-Serving REST API under ``/v1``; BentoML's ``/livez``, ``/readyz``, ``/metrics`` and Swagger UI.
* gRPC (setting ``grpc_port``, default 8500): TF Serving's PredictionService, ModelService, health.

The class stays thin: the request bodies are the pydantic models of :mod:`cnnkit.serving.requests`,
decoding lives in :mod:`cnnkit.serving.inputs`, inference in the one :class:`InferenceCore` that
both front ends share, and every route goes through :func:`route` (metrics and error answers).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import inspect
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from bentoml import IODescriptor  # noqa: E402
from bentoml.validators import ContentType  # noqa: E402
from pydantic import BaseModel, ValidationError, create_model  # noqa: E402

from cnnkit.errors import ServingError  # noqa: E402
from cnnkit.repository import resolve_repository  # noqa: E402
from cnnkit.serving import metrics  # noqa: E402
from cnnkit.serving.core import InferenceCore  # noqa: E402
from cnnkit.serving.http.bodies import JSON_WORKER, parse_json, read_body  # noqa: E402
from cnnkit.serving.http.errors import error_response  # noqa: E402
from cnnkit.serving.http.middleware import (  # noqa: E402
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    MountRootMiddleware,
    ValidationAnswerMiddleware,
    use_request_timeout_middleware,
)
from cnnkit.serving.http.rest import build_models_app, build_tf_serving_app  # noqa: E402
from cnnkit.serving.http.v2 import build_v2_app  # noqa: E402
from cnnkit.serving.inputs import check_count, decode_base64, decode_image, decode_images, tensor_from_json  # noqa: E402
from cnnkit.serving.logs import RequestIdMiddleware, configure_logging  # noqa: E402
from cnnkit.serving.model_store import ModelStore, RepositoryPoller  # noqa: E402
from cnnkit.serving.offload import off_loop_if_large  # noqa: E402
from cnnkit.serving.requests import (  # noqa: E402
    EmptyRequest,
    FeatureMapsJsonRequest,
    FeatureMapsRequest,
    FilterPatternsRequest,
    GradCamJsonRequest,
    GradCamRequest,
    PredictJsonRequest,
    PredictRequest,
    parse,
)
from cnnkit.settings import Settings, service_settings  # noqa: E402

if TYPE_CHECKING:
    from cnnkit.serving.grpc.server import GrpcServer

logger = logging.getLogger("cnnkit.serving")

# The routes' return type. Naming the media type up front matters for speed: without it BentoML
# builds the JSON schema of the return annotation on every response just to find its media type
# (about a tenth of the server's time per request for a small model).
JsonObject = Annotated[dict[str, Any], ContentType("application/json")]

# Read once when the service module is imported (by `cnnkit serve`'s BentoML processes).
SETTINGS = service_settings()


def repository_from_bento_store(tags: list[str]) -> Path:
    """A model repository view of BentoML store models: NAME/VERSION links to their exports."""
    import tempfile

    from cnnkit.bento import open_bento_model

    root = Path(tempfile.mkdtemp(prefix="cnnkit-bento-repository-"))
    for tag in tags:
        version = open_bento_model(tag)
        (root / version.name).mkdir(exist_ok=True)
        (root / version.name / str(version.version)).symlink_to(version.path, target_is_directory=True)
    return root


class _RequestBody(IODescriptor):
    """The base of the routes' input specs: a body that cannot be read at all (malformed JSON, a
    multipart form without a boundary or cut short) is the client's mistake, answered 400 with one
    line, not a 500 from deep inside the parser."""

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> IODescriptor:
        try:
            if cls.multipart_fields or not _is_json(request.headers.get("content-type")):
                return await super().from_http_request(request, serde)
            # JSON bodies are read here rather than by BentoML: counted against the body limit as
            # they stream, and validated in a worker thread when large, so that one 20 MB body does
            # not hold up the event loop (health checks, every other request) while it is parsed.
            body = await read_body(request, SETTINGS.max_body_bytes * 4 // 3 + 64 * 1024)
            fields = await parse_json(body) if body.strip() else {}
            return await off_loop_if_large(len(body), cls.model_validate, fields)
        except ValidationError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the body parser raises
            content_type = request.headers.get("content-type", "no content type")
            raise ValidationError.from_exception_data(cls.__name__, [{
                "type": "value_error", "loc": ("body",), "input": None,
                "ctx": {"error": ValueError(f"The body could not be read as {content_type}: {error}")},
            }]) from error


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def input_spec(request: type[BaseModel], **files: type) -> type[IODescriptor]:
    """The BentoML input spec of a route whose body is one of the shared request models.

    BentoML only collects the fields (and stores uploaded ``files``); the route validates them with
    :func:`parse`, so a bad field is answered like every other refusal, with one message naming it.
    The OpenAPI document still shows the request model's fields, types and descriptions.
    """
    fields: dict[str, Any] = {name: (Any, None) for name in request.model_fields}
    fields.update({name: (kind, ...) for name, kind in files.items()})
    spec = create_model(f"{request.__name__}Body", __base__=_RequestBody, __doc__=request.__doc__, **fields)

    def documented_schema(cls: type[IODescriptor], *args: Any, **kwargs: Any) -> dict[str, Any]:
        schema = IODescriptor.model_json_schema.__func__(cls, *args, **kwargs)  # type: ignore[attr-defined]
        schema.pop("title", None)
        schema["title"] = f"{request.__name__}Body"
        documented = request.model_json_schema()
        schema["properties"] = {**documented["properties"],
                                **{name: schema["properties"][name] for name in files}}
        schema["required"] = [*documented.get("required", []), *files]
        if "$defs" in documented:
            schema.setdefault("$defs", {}).update(documented["$defs"])
        return schema

    spec.model_json_schema = classmethod(documented_schema)  # type: ignore[method-assign,assignment]
    return spec


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a request sent (None: not sent, so the request model's default applies), files left out."""
    return {name: value for name, value in fields.items() if value is not None and name != "image"}


def route(endpoint: str) -> Callable:
    """Wrap a BentoML route: count it in the metrics (model, version, latency, errors) and answer a
    refused request with the one HTTP error renderer, ``{"error": message}`` and its status."""

    def decorate(function: Callable) -> Callable:
        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def answer_async(self: Any, **fields: Any) -> Any:
                with metrics.observe("http", endpoint, str(fields.get("model") or "-")) as observation:
                    try:
                        return await function(self, **fields)
                    except ServingError as error:
                        observation.code = str(error.http_status)
                        return error_response(error)

            return answer_async

        @functools.wraps(function)
        def answer(self: Any, **fields: Any) -> Any:
            with metrics.observe("http", endpoint, str(fields.get("model") or "-")) as observation:
                try:
                    return function(self, **fields)
                except ServingError as error:
                    observation.code = str(error.http_status)
                    return error_response(error)

        return answer

    return decorate


def _die_with_the_server() -> None:
    """In a worker process of ``cnnkit serve``: end when the server process that started it ends,
    even by ``kill -9`` (which cannot stop its workers itself), so that no worker keeps serving
    the ports unsupervised and a restart finds them free."""
    from cnnkit.serving.process import die_with_parent
    from cnnkit.settings import SERVER_PID_ENV

    server = os.environ.get(SERVER_PID_ENV, "")
    if not server.isdigit() or threading.current_thread() is not threading.main_thread():
        return
    die_with_parent()
    if os.getppid() != int(server):  # the server ended already (while this worker was starting)
        os.kill(os.getpid(), signal.SIGTERM)


def quiet_garbage_collector() -> None:
    """Freeze the objects start-up made (BentoML, OpenTelemetry, ONNX Runtime, pydantic: hundreds of
    thousands, none of them garbage) so collections stop walking them, and collect the young
    generation less often. Measured under 64 clients on TF Serving's REST route with JSON pixels, the
    collections that request parsing set off took about half the worker's time, and more as
    clients were added, since every request in flight adds objects a full collection walks."""
    gc.collect()
    gc.freeze()
    metrics.time_garbage_collections()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, 20_000), middle, old)


def session_threads(settings: Settings) -> int | None:
    """ONNX Runtime threads per session: the setting, else the cores shared by the workers
    (None, one per core, for a single worker)."""
    if settings.ort_threads:
        return settings.ort_threads
    if settings.workers > 1:
        return max(1, (os.cpu_count() or 1) // settings.workers)
    return None


def _current_core() -> InferenceCore:
    service = bentoml.get_current_service()
    if service is None:
        raise RuntimeError("The cnnkit service is not running.")
    return service.core


# traffic.timeout below is served by cnnkit's RequestTimeoutMiddleware (BentoML's leaks a timer per
# request for the whole timeout).
use_request_timeout_middleware()


@bentoml.asgi_app(build_tf_serving_app(_current_core), path="/v1")
@bentoml.asgi_app(build_v2_app(_current_core), path="/v2")
@bentoml.asgi_app(build_models_app(_current_core), path="/models")
@bentoml.service(
    name="cnnkit",
    # The concurrency cap is cnnkit's own (ConcurrencyLimitMiddleware, below): BentoML's counts a
    # request from its first byte, so stalled uploads could fill it.
    traffic={"timeout": 60},
    # No spans unless asked for: with or without an exporter BentoML's sampler records every span.
    **({} if SETTINGS.trace_requests else {"tracing": {"excluded_urls": ".*"}}),
    http={"host": SETTINGS.host, "port": SETTINGS.http_port},
    # N processes, each with its own event loop, batchers, ONNX Runtime sessions and gRPC server.
    workers=SETTINGS.workers,
    # The access lines are cnnkit's own, with the request id (see cnnkit.serving.logs).
    logging={"access": {"enabled": False}},
)
class Classifier:
    """Image classification, feature maps and model metadata for every model in the repository."""

    # Models from the BentoML store named in the bento_models setting are declared here, so that
    # `bentoml build` packs them into the Bento; without it the service reads a repository folder.
    for _index, _tag in enumerate(SETTINGS.bento_models):
        vars()[f"bento_model_{_index}"] = bentoml.models.BentoModel(_tag)

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings = settings if settings is not None else service_settings()
        configure_logging(settings.log_level, settings.log_format)
        _die_with_the_server()
        tags = settings.bento_models
        repository = repository_from_bento_store(tags) if tags else resolve_repository(settings.model_repository)
        self.store = ModelStore(repository, providers=settings.ort_providers, threads=session_threads(settings),
                                spin=settings.ort_spin)
        self.core = InferenceCore.from_settings(self.store, settings)
        if settings.explain_preload:
            self.core.explanations.start()
        self.store.refresh()
        if not self.store.names():
            logger.warning("no models in %s: export one with `cnnkit export RUN_DIR`", repository)
        self.draining = False
        self.grpc_server: GrpcServer | None = None  # (made below: the poller may ask it for health first)
        self._grpc_serving: bool | None = None
        self.poller = RepositoryPoller(self.store, settings.poll_seconds, on_refresh=self._sync_grpc_health).start()
        self._drain_on_sigterm()
        if settings.grpc_port >= 0:
            from cnnkit.serving.grpc.server import build_server

            self.grpc_server = build_server(
                self.core, host=settings.host, port=settings.grpc_port, api_key=settings.api_key,
                max_workers=settings.grpc_threads, reuse_port=settings.workers > 1,
            )
            self.grpc_server.start()
            self._sync_grpc_health()
            logger.info("gRPC (TF Serving's API) listening on %s:%d", settings.host, self.grpc_server.port)
        for model in self.store.all_models():
            logger.info("serving %s version %d with %s", model.name, model.version, ", ".join(model.providers))

    def __is_ready__(self) -> bool:
        return self.store.ready and bool(self.store.names()) and not self.draining

    def _sync_grpc_health(self) -> None:
        """One readiness for both protocols: gRPC health says SERVING exactly when /readyz says 200
        (a model is served, the service is not draining); updated after every repository refresh."""
        if self.grpc_server is None:
            return
        ready = self.__is_ready__()
        if ready == self._grpc_serving:
            return
        self.grpc_server.set_serving(ready)
        self._grpc_serving = ready

    def _drain_on_sigterm(self) -> None:
        """Graceful drain. On SIGTERM, readiness turns 503 (and gRPC health NOT_SERVING) at once, so
        load balancers stop sending; requests are still served for ``drain_seconds``; then the HTTP
        server stops taking connections and finishes the requests in progress (uvicorn's graceful
        shutdown, bounded by ``drain_timeout``), and the shutdown hook lets gRPC calls finish too.

        The HTTP server's own SIGTERM handler (installed before the service starts) is kept and
        called once the drain window is over. Only in the process's main thread (a real server)."""
        if threading.current_thread() is not threading.main_thread():
            return
        stop_server = signal.getsignal(signal.SIGTERM)
        if not callable(stop_server):
            return

        def drain(signum: int, frame: Any) -> None:
            if self.draining:
                return
            self.draining = True
            logger.info("SIGTERM: draining (readiness 503) for %.1f s, then finishing requests in progress",
                        self.settings.drain_seconds)
            if self.grpc_server is not None:
                self.grpc_server.set_serving(False, wait=False)  # (in a signal handler: not waiting)
            timer = threading.Timer(self.settings.drain_seconds, stop_server, args=(signum, frame))
            timer.daemon = True
            timer.start()

        signal.signal(signal.SIGTERM, drain)

    @bentoml.on_startup
    async def watch_event_loop(self) -> None:
        """Measure the serving event loop's lag (metric cnnkit_event_loop_lag_seconds) while it runs,
        and take what start-up built out of the garbage collector's way (see quiet_garbage_collector)."""
        self._loop_watch = asyncio.get_running_loop().create_task(metrics.watch_event_loop("http"))
        quiet_garbage_collector()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.poller.stop()
        if self.grpc_server is not None:
            # In-flight calls finish; new ones are refused.
            self.grpc_server.stop(grace=self.settings.drain_timeout)
        self.core.close()
        JSON_WORKER.close()
        logger.info("stopped")

    @bentoml.api(route="/predict", input_spec=input_spec(PredictRequest, image=Path))
    @route("predict")
    async def predict(self, **fields: Any) -> JsonObject:
        """Classify one uploaded image file (multipart): the top-k classes with probabilities."""
        request = parse(PredictRequest, _given(fields))
        served = self.core.model(request.model, request.version)
        self.core.admit(served)
        # Large files are decoded in a worker thread (Pillow releases the GIL): in the event
        # loop they would be decoded one concurrent request after the other.
        data = Path(fields["image"]).read_bytes()
        pixels = await off_loop_if_large(len(data), decode_image, data, served.input_shape, self.core.limits)
        result = await self.core.classify(served, pixels[None].astype("float32"), request.top_k)
        return result.to_dict()

    @bentoml.api(route="/predict_json", input_spec=input_spec(PredictJsonRequest))
    @route("predict_json")
    async def predict_json(self, **fields: Any) -> JsonObject:
        """Classify base64-encoded image files (``images``) or a pixel tensor batch (``instances``)."""
        request = parse(PredictJsonRequest, _given(fields))
        served = self.core.model(request.model, request.version)
        self.core.admit(served)
        if request.images is not None:
            check_count(len(request.images), self.core.limits)  # before decoding any base64
            files = [decode_base64(text) for text in request.images]
            batch = await off_loop_if_large(sum(map(len, files)), decode_images, files,
                                             served.input_shape, self.core.limits)
        else:
            # Pixel tensors of more than a few small images are converted in a worker thread.
            pixels = request.instances
            per_image = math.prod(served.input_shape)
            values = pixels.size if isinstance(pixels, np.ndarray) else len(pixels or []) * per_image
            batch = await off_loop_if_large(values, tensor_from_json, pixels, served.input_shape, self.core.limits)
        return (await self.core.classify(served, batch, request.top_k)).to_dict()

    @bentoml.api(route="/feature_maps", input_spec=input_spec(FeatureMapsRequest, image=Path))
    @route("feature_maps")
    def feature_maps(self, **fields: Any) -> JsonObject:
        """Activations of conv/pool layers for one uploaded image: arrays or PNG grids (base64)."""
        request = parse(FeatureMapsRequest, _given(fields))
        return self._feature_maps(Path(fields["image"]).read_bytes(), request)

    @bentoml.api(route="/feature_maps_json", input_spec=input_spec(FeatureMapsJsonRequest))
    @route("feature_maps_json")
    def feature_maps_json(self, **fields: Any) -> JsonObject:
        """The same for a base64-encoded image file in a JSON body."""
        request = parse(FeatureMapsJsonRequest, _given(fields))
        return self._feature_maps(decode_base64(request.image_b64), request)

    def _feature_maps(self, data: bytes, request: FeatureMapsRequest) -> dict[str, Any]:
        served = self.core.model(request.model, request.version)
        pixels = decode_image(data, served.input_shape, self.core.limits).astype("float32")
        maps = self.core.feature_maps(served, pixels, request.layers)
        result: dict[str, Any] = {"model": served.name, "version": served.version}
        if request.output == "png":
            result["png"] = {name: base64.b64encode(png).decode()
                             for name, png in self.core.feature_map_pngs(served, maps).items()}
        else:
            result["layers"] = self.core.feature_map_arrays(maps, request.dtype)
        return result

    @bentoml.api(route="/gradcam", input_spec=input_spec(GradCamRequest, image=Path))
    @route("gradcam")
    def gradcam(self, **fields: Any) -> JsonObject:
        """Grad-CAM of one uploaded image for a class (default: the predicted one): heatmap + overlay PNG."""
        request = parse(GradCamRequest, _given(fields))
        return self._gradcam(Path(fields["image"]).read_bytes(), request)

    @bentoml.api(route="/gradcam_json", input_spec=input_spec(GradCamJsonRequest))
    @route("gradcam_json")
    def gradcam_json(self, **fields: Any) -> JsonObject:
        """The same for a base64-encoded image file in a JSON body."""
        request = parse(GradCamJsonRequest, _given(fields))
        return self._gradcam(decode_base64(request.image_b64), request)

    def _gradcam(self, data: bytes, request: GradCamRequest) -> dict[str, Any]:
        served = self.core.model(request.model, request.version)
        pixels = decode_image(data, served.input_shape, self.core.limits)
        return self.core.gradcam(served, pixels, request.class_name, request.class_index, request.dtype)

    @bentoml.api(route="/filter_patterns", input_spec=input_spec(FilterPatternsRequest))
    @route("filter_patterns")
    def filter_patterns(self, **fields: Any) -> JsonObject:
        """What each filter of a conv layer responds to (gradient ascent), as a grid PNG; cached per version."""
        request = parse(FilterPatternsRequest, _given(fields))
        served = self.core.model(request.model, request.version)
        return self.core.filter_patterns(served, request.layer, request.filters, request.steps, request.seed,
                                         request.arrays)

    @bentoml.api(route="/reload", input_spec=input_spec(EmptyRequest))
    def reload(self, **fields: Any) -> JsonObject:
        """Load versions that appeared in the repository since the last poll (admin)."""
        loaded = self.store.refresh()
        self._sync_grpc_health()
        return {"loaded": loaded, "models": {name: self.store.versions(name) for name in self.store.names()},
                "errors": self.store.errors}


class _DocumentedService(type(Classifier)):  # type: ignore[misc]
    """BentoML's service object, with cnnkit's name, version and description in the OpenAPI document
    (BentoML fills in "None" as the version and its own team as the contact)."""

    __slots__ = ()

    @property
    def openapi_spec(self) -> Any:
        import attrs
        from bentoml._internal.service.openapi.specification import Info, OpenAPISpecification
        from bentoml._internal.utils.cattr import bentoml_cattr

        from cnnkit import __version__
        from cnnkit.serving.http.openapi import complete

        spec = attrs.evolve(super().openapi_spec, info=Info(title="cnnkit", version=__version__, description=(
            "Image-classification CNNs served over HTTP and TF Serving's gRPC API: predictions, feature "
            "maps, Grad-CAM heatmaps and filter patterns, model metadata, health and metrics.")))
        # The mounted routes (/v1, /models) and the true error schema (cnnkit.serving.http.openapi).
        return bentoml_cattr.structure(complete(spec.asdict()), OpenAPISpecification)


Classifier.__class__ = _DocumentedService  # type: ignore[method-assign]

# The first middleware added is the outermost: every answer (a refusal too) gets its request id and
# access line, and CORS preflights are answered before the API key is asked for.
Classifier.add_asgi_middleware(RequestIdMiddleware, access_log=SETTINGS.access_log)  # type: ignore[attr-defined]
Classifier.add_asgi_middleware(ValidationAnswerMiddleware)  # type: ignore[attr-defined]
Classifier.add_asgi_middleware(MountRootMiddleware)  # type: ignore[attr-defined]
if SETTINGS.cors_origins:
    from starlette.middleware.cors import CORSMiddleware

    Classifier.add_asgi_middleware(  # type: ignore[attr-defined]
        CORSMiddleware, allow_origins=SETTINGS.cors_origins, allow_methods=["GET", "POST"],
        allow_headers=["content-type", "x-api-key", "authorization", "x-request-id"],
        expose_headers=["x-request-id", "retry-after"], max_age=600,
    )
# Bodies carry at most max_body_bytes of image data, plus room for base64 (4/3) and JSON framing;
# they are read whole (with a pause limit) before a request counts against the concurrency cap.
# An explanation whose client closes the connection first is withdrawn from the worker.
Classifier.add_asgi_middleware(  # type: ignore[attr-defined]
    BodyLimitMiddleware, limit=SETTINGS.max_body_bytes * 4 // 3 + 64 * 1024, body_timeout=SETTINGS.body_timeout,
    watched_paths=("/gradcam", "/gradcam_json", "/filter_patterns"),
)
# The cap is per server process: the kernel does not spread connections evenly between the
# processes of `--workers N` (with two processes and 64 kept-alive clients, one process often holds
# 40), so a share of max_concurrency / N per process refused requests well below the total.
Classifier.add_asgi_middleware(  # type: ignore[attr-defined]
    ConcurrencyLimitMiddleware, limit=SETTINGS.max_concurrency
)
if SETTINGS.api_key:
    Classifier.add_asgi_middleware(ApiKeyMiddleware, api_key=SETTINGS.api_key)  # type: ignore[attr-defined]
