"""Every setting of cnnkit in one typed object, read once.

A setting comes from, highest priority first: a command-line flag (``cnnkit serve --http-port
3001``), its environment variable (``CNNKIT_`` + the name in capitals, ``CNNKIT_HTTP_PORT=3001``),
a YAML file (``cnnkit serve --config serve.yaml``, or ``CNNKIT_CONFIG=serve.yaml``; keys are the
names below), then the default. List settings take a comma-separated string in the environment
(``CNNKIT_ORT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider``) and a YAML list in the file.
A misspelt key in the file, or a value of the wrong type anywhere, is refused with a message
naming the setting.

``cnnkit serve`` resolves the settings once and hands them to the service's processes as one JSON
file (``CNNKIT_SETTINGS_FILE``, written mode 0600), so flags and the YAML file reach every worker.

The table of settings in README.md ("Settings") is checked against this class by a test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cnnkit.errors import ConfigError

ENV_PREFIX = "CNNKIT_"
CONFIG_FILE_ENV = "CNNKIT_CONFIG"
SETTINGS_FILE_ENV = "CNNKIT_SETTINGS_FILE"
# Set by `cnnkit serve` for its worker processes: the server process they end with.
SERVER_PID_ENV = "CNNKIT_SERVER_PID"

CommaList = Annotated[list[str], NoDecode]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cnnkit``, else ``~/.cache/cnnkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnkit"


class Settings(BaseSettings):
    """cnnkit's settings (see the module docstring for where each value comes from)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # Where things are.
    data_dir: Path | None = Field(None, description="Data root with the standard layouts (else the Keras downloads).")
    model_repository: Path = Field(Path("model_repository"),
                                   description="The model repository to export into and serve.")
    cache_dir: Path | None = Field(
        None, description="Cache of filter patterns and frozen-base features (default ~/.cache/cnnkit).")
    vgg16_weights: Path | None = Field(
        None, description="Local VGG16 no-top weights file used where a recipe says weights: imagenet.")

    # Where the service listens.
    host: str = Field("127.0.0.1", description="Address the HTTP and gRPC servers listen on.")
    http_port: int = Field(3000, ge=0, le=65535, description="HTTP port (BentoML).")
    grpc_port: int = Field(8500, ge=-1, le=65535, description="gRPC port (TF Serving's API); -1 turns gRPC off.")
    grpc_threads: int = Field(16, ge=1, description=(
        "Threads serving the gRPC calls other than inference (metadata, status, explanations); inference "
        "runs on the gRPC server's event loop."))
    workers: int = Field(1, ge=1, description=(
        "Server processes: each serves HTTP (BentoML's workers) and gRPC (one port, SO_REUSEPORT) with "
        "its own ONNX Runtime sessions sharing the cores."))
    api_key: str | None = Field(None, description="When set, every route but health checks needs this key.")
    access_log: bool = Field(True, description="One log line per HTTP request (with its request id).")
    trace_requests: bool = Field(False, description=(
        "OpenTelemetry spans for each HTTP request (BentoML's tracing; export them with its tracing "
        "settings). Off, no spans are made: BentoML records three per request even with nothing exporting "
        "them, about a tenth of the HTTP server's time."))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of cnnkit's log lines.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or as one JSON object each.")
    cors_origins: CommaList = Field(
        [], description="Origins that browsers may call the HTTP API from (CORS); * for any; none: no CORS.")

    # What the service serves, and how.
    bento_models: CommaList = Field(
        [], description="Serve these BentoML store models (NAME:VERSION) instead of the repository.")
    poll_seconds: float = Field(2.0, gt=0,
        description="How often the repository is checked for new or removed versions.")
    ort_providers: CommaList = Field([],
        description="ONNX Runtime providers to use (default: CUDA when present, then CPU).")
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session (0: one per core).")
    ort_spin: bool = Field(False,
        description="Let ONNX Runtime's threads spin between runs (faster alone, burns a core).")
    max_batch_size: int = Field(64, ge=1, description="Most images in one ONNX Runtime call of the batcher.")
    batch_wait_ms: float = Field(0.0, ge=0, description="How long a batch waits for company (0: natural batching).")
    batch_gather_ms: float = Field(
        20.0, ge=0, description=("Under load (the serving loop busy with other calls), how long a batch may keep "
                                 "taking the calls the loop submits before it runs (0: never gather)."))
    inline_batch_ms: float = Field(
        1.0, ge=0, description=("A lone request whose model is measured to take at most this long runs in the "
                                "serving event loop instead of a thread (0: always a thread)."))
    max_concurrency: int = Field(
        64, ge=1, description=("Most HTTP requests in progress at once in each server process (counted once "
                               "their body has arrived); more are answered 429."))
    body_timeout: float = Field(
        10.0, gt=0, description=("Seconds an HTTP request body may pause between two pieces before it is "
                                 "answered 408 and its connection closed."))
    drain_seconds: float = Field(
        2.0, ge=0, description="After SIGTERM, how long /readyz answers 503 while requests are still served.")
    drain_timeout: int = Field(
        30, ge=1, description="After that, the most seconds in-flight and queued requests get to finish.")
    max_queue: int = Field(256, ge=1, description="Most requests waiting per model version; more are answered 503.")
    max_queue_ms: float = Field(
        500.0, gt=0, description="A request that waited longer than this for its batch is answered 503.")

    # What one request may carry.
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image file or request body, in bytes.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest decoded image (width x height).")
    max_images: int = Field(64, ge=1, description="Most images in one request.")

    # Grad-CAM and filter patterns (the TensorFlow worker process).
    explain_preload: bool = Field(False, description="Start the explanation worker with the service, not on first use.")
    explain_threads: int = Field(0, ge=0,
        description="TensorFlow threads of the explanation worker (0: TensorFlow's choice).")
    explain_nice: int = Field(10, ge=0, le=19, description="CPU priority the explanation worker lowers itself by.")
    explain_queue: int = Field(8, ge=1, description="Most explanations waiting at once (more answer 503).")
    explain_timeout: float = Field(50.0, gt=0, description="Seconds a request waits for its explanation (then 503).")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("bento_models", "ort_providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir.expanduser() if self.cache_dir is not None else default_cache_dir()

    @classmethod
    def table(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, description) of every setting, for the documentation."""
        rows = []
        for name, field in cls.model_fields.items():
            default = field.default
            shown = "none" if default is None or default == [] else str(default).lower() if isinstance(
                default, bool) else str(default)
            rows.append((ENV_PREFIX + name.upper(), shown, field.description or ""))
        return rows


def _describe(error: ValidationError, where: str) -> str:
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "(settings)"
        message = item["msg"] if item["type"] != "extra_forbidden" else "is not a setting"
        problems.append(f"{name} ({ENV_PREFIX}{name.upper()}): {message}")
    return f"Invalid settings ({where}): " + "; ".join(problems) + "."


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML file, as a mapping (checked when the settings are built)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise ConfigError(f"Cannot read the settings file {path}: {error}.") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"The settings file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"The settings file {path} must be a mapping of setting names to values.")
    return values


def load_settings(config_file: str | os.PathLike | None = None, **flags: Any) -> Settings:
    """The settings from flags (``None`` means not given), the environment, a YAML file and the defaults.

    Without ``config_file``, ``CNNKIT_CONFIG`` names the file, if set.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    config_file = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    where = f"flags, environment and {config_file}" if config_file else "flags and environment"
    try:
        from_environment = Settings(**given)
        if not config_file:
            return from_environment
        # The environment and the flags win over the file: keep every value they set explicitly.
        explicit = {name: getattr(from_environment, name) for name in from_environment.model_fields_set}
        return Settings(**{**read_config_file(config_file), **explicit})
    except ValidationError as error:
        raise ConfigError(_describe(error, where)) from error


def write_settings_file(settings: Settings, directory: str | os.PathLike) -> Path:
    """The resolved settings as JSON in ``directory`` (mode 0600: it may hold the API key)."""
    path = Path(directory) / "settings.json"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(settings.model_dump_json())
    return path


def service_settings() -> Settings:
    """The settings of a service process: the file ``cnnkit serve`` resolved, else flags-free loading."""
    path = os.environ.get(SETTINGS_FILE_ENV)
    if path:
        try:
            return Settings.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise ConfigError(f"Cannot read the service's settings file {path} ({SETTINGS_FILE_ENV}): "
                              f"{error}") from error
    return load_settings()
