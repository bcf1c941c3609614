"""The models the service serves: one ONNX Runtime session per model version, loaded once.

``ModelStore`` reads a model repository (see :mod:`cnnkit.repository`), hash-checks and loads
every version of every model, warms each session up, and answers "which version?" with the
version policy: the latest version unless the request pins one. ``refresh()`` (called by a poller
or the admin route) loads versions that appeared since and retires ones that disappeared; a new
version is loaded and warmed *before* it becomes the latest, so requests never see a half-loaded
model and in-flight requests finish on the session they started with.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import InvalidInputError, NotFoundError, RepositoryError, UnavailableError, shown
from cnnkit.repository import (
    FEATURE_MAPS_SIGNATURE,
    PREDICT_OUTPUTS,
    PREDICT_SIGNATURE,
    PREDICT_SIGNATURE_ALIASES,
    ModelMetadata,
    ModelVersion,
    Signature,
    check_metadata,
    open_version,
    scan_repository,
    signatures,
    version_fingerprint,
)
from cnnkit.serving import metrics

logger = logging.getLogger(__name__)

SIGNATURES = (PREDICT_SIGNATURE, FEATURE_MAPS_SIGNATURE)


def choose_providers(wanted: Sequence[str] = ()) -> list[str]:
    """The ``wanted`` providers that this ONNX Runtime has (setting ``ort_providers``), else CUDA
    when onnxruntime-gpu sees a GPU, always with the CPU provider as the fallback."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if wanted:
        chosen = [name for name in wanted if name in available]
        return chosen or ["CPUExecutionProvider"]
    return [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]


def session_options(threads: int | None = None, spin: bool | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One request's batch uses every core; concurrent requests queue in the batcher instead of
    # fighting over threads. The ort_threads setting overrides the choice.
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # By default ONNX Runtime's pool threads keep spinning for a while after each run, waiting for
    # the next one. Between small requests that burns a core the server's own threads (HTTP event
    # loop, gRPC) need, so they sleep instead; ``spin`` (setting ``ort_spin``) restores spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


@dataclass
class LoadedModel:
    """One model version with its ONNX Runtime session."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    session: Any
    providers: list[str]
    loaded_at: float = field(default_factory=time.time)

    @cached_property
    def info(self) -> ModelMetadata:
        """The metadata, typed (checked when the version was loaded; parsed once per version)."""
        return ModelMetadata.model_validate(self.metadata)

    def signatures(self, served_only: bool = True) -> dict[str, Signature]:
        return signatures(self.info, served_only=served_only)

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        height, width, channels = (int(size) for size in self.metadata["input"]["shape"])
        return height, width, channels

    @property
    def feature_layers(self) -> list[dict[str, Any]]:
        return list(self.metadata["feature_layers"])

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.metadata["feature_layers"]]

    @property
    def conv_layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.metadata["feature_layers"] if "Conv" in layer["kind"]]

    def run(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the session on a validated float32 batch, returning the named outputs."""
        names = list(outputs)
        values = self.session.run(names, {"image": np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(names, values, strict=True))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.run(images, ["probabilities"])["probabilities"]

    def check_layers(self, layers: Sequence[str] | None) -> list[str]:
        """The requested feature layers (default: every convolution layer), or NotFoundError."""
        if not layers:
            return self.conv_layer_names
        unknown = [layer for layer in layers if layer not in self.layer_names]
        if unknown:
            raise NotFoundError(
                f"Model {self.name} version {self.version} has no feature layer "
                f"{', '.join(map(repr, unknown))}; layers: {', '.join(self.layer_names)}."
            )
        return list(dict.fromkeys(layers))

    def signature_outputs(self, signature: str) -> list[str]:
        if signature in PREDICT_SIGNATURE_ALIASES:
            return list(PREDICT_OUTPUTS)
        if signature == FEATURE_MAPS_SIGNATURE:
            return self.layer_names
        raise InvalidInputError(
            f"Serving signature name: \"{signature}\" not found in signature def; "
            f"signatures: {', '.join(SIGNATURES)}."
        )


def load_model(version: ModelVersion, providers: Sequence[str] = (),
               threads: int | None = None, spin: bool = False) -> LoadedModel:
    import onnxruntime

    check_metadata(version.metadata, version.path)
    chosen = choose_providers(providers)
    session = onnxruntime.InferenceSession(str(version.onnx_path), session_options(threads, spin),
                                           providers=chosen)
    loaded = LoadedModel(name=version.name, version=version.version, path=version.path,
                         metadata=version.metadata, session=session,
                         providers=session.get_providers())
    # Warm up: the first run allocates buffers and picks kernels; do it before serving traffic.
    warm = loaded.run(np.zeros((1, *loaded.input_shape), np.float32), [output.name for output in session.get_outputs()])
    classes = warm["probabilities"].shape[-1] if "probabilities" in warm else None
    if classes is not None and classes != len(loaded.class_names):
        raise RepositoryError(
            f"{version.path}: metadata.json names {len(loaded.class_names)} classes but the model outputs "
            f"{classes} probabilities; refusing this version."
        )
    return loaded


class ModelStore:
    """Every version of every model in a repository, with the latest-unless-pinned policy."""

    def __init__(self, repository: str | os.PathLike, *, providers: Sequence[str] = (),
                 threads: int | None = None, spin: bool = False):
        self.repository = Path(repository)
        self.providers = providers
        self.threads = threads
        self.spin = spin
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self.ready = False
        self.errors: dict[str, str] = {}
        self._failed: dict[str, tuple] = {}  # versions refused, with their files' fingerprint then

    # Loading ---------------------------------------------------------------------------------

    def refresh(self) -> dict[str, list[int]]:
        """Load new versions, retire removed ones; returns what was loaded, by model name.

        A version that fails its hash check or cannot be loaded is skipped (and reported in
        ``errors``); the versions already serving keep serving.
        """
        with self._refresh_lock:
            found = scan_repository(self.repository)
            metrics.know_models(found)
            loaded: dict[str, list[int]] = {}
            for name, versions in found.items():
                current = self._models.get(name, {})
                for version in versions:
                    key = f"{name}/{version}"
                    if version in current:
                        continue
                    fingerprint = version_fingerprint(self.repository / name / str(version))
                    if self._failed.get(key) == fingerprint:
                        continue  # refused before and unchanged since; a new copy is tried again
                    self.errors.pop(key, None)
                    try:
                        model = load_model(open_version(self.repository, name, version),
                                           self.providers, self.threads, self.spin)
                    except (RepositoryError, OSError) as error:
                        self._failed[key] = fingerprint
                        self.errors[key] = str(error)
                        logger.error("not serving %s: %s", key, error)
                        continue
                    except Exception as error:  # noqa: BLE001 - ONNX Runtime load failures.
                        self._failed[key] = fingerprint
                        self.errors[key] = f"ONNX Runtime could not load it: {error}"
                        logger.error("not serving %s: %s", key, error)
                        continue
                    with self._lock:
                        self._models.setdefault(name, {})[version] = model
                    loaded.setdefault(name, []).append(version)
                    if self.ready:  # at start-up the service lists every version once they are all loaded
                        logger.info("now serving %s version %d with %s", name, version, ", ".join(model.providers))
            with self._lock:
                for name in list(self._models):
                    for version in list(self._models[name]):
                        if version not in found.get(name, []):
                            del self._models[name][version]
                            logger.info("retired %s version %d", name, version)
                    if not self._models[name]:
                        del self._models[name]
            self.ready = True
            return loaded

    # Lookup ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._models.get(name, {}))

    def get(self, name: str, version: int | str | None = None) -> LoadedModel:
        """The pinned version, else the latest; NotFoundError names what exists."""
        if not self.ready:
            raise UnavailableError("The models are still loading.")
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                available = ", ".join(sorted(self._models)) or "none"
                raise NotFoundError(f"Servable not found for request: Latest({shown(name)}); models: {available}.")
            if version is None or version == "":
                return versions[max(versions)]
            try:
                number = int(version)
            except (TypeError, ValueError) as error:
                raise NotFoundError(f"Model version must be a positive integer, got {shown(repr(version))}.") from error
            if number not in versions:
                raise NotFoundError(
                    f"Servable not found for request: Specific({shown(name)}, {number}); versions: "
                    f"{', '.join(map(str, sorted(versions)))}."
                )
            return versions[number]

    def served_versions(self) -> set[tuple[str, int]]:
        """(name, version) of every version now served."""
        with self._lock:
            return {(name, version) for name, versions in self._models.items() for version in versions}

    def all_models(self) -> list[LoadedModel]:
        with self._lock:
            return [model for versions in self._models.values() for model in versions.values()]


class RepositoryPoller:
    """Calls ``store.refresh()`` every ``interval`` seconds in a daemon thread."""

    def __init__(self, store: ModelStore, interval: float = 2.0, on_refresh: Callable[[], None] | None = None):
        self.store = store
        self.interval = interval
        self.on_refresh = on_refresh  # called after every refresh (the service updates its gRPC health)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cnnkit-repository-poller", daemon=True)

    def start(self) -> RepositoryPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.refresh()
                if self.on_refresh is not None:
                    self.on_refresh()
            except Exception:  # noqa: BLE001 - keep polling; the error is logged.
                logger.exception("refreshing the model repository failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
