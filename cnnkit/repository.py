"""The model repository: TF-Serving's layout, read and checked without TensorFlow.

::

    REPOSITORY/models.config                      TF-Serving model config listing every model
    REPOSITORY/NAME/VERSION/saved_model.pb        the SavedModel a stock tensorflow_model_server serves
    REPOSITORY/NAME/VERSION/variables/...
    REPOSITORY/NAME/VERSION/assets.extra/model.onnx       the same graph for ONNX Runtime
    REPOSITORY/NAME/VERSION/assets.extra/metadata.json    classes, input, layers, checks, sha256s

``metadata.json`` is described by :class:`ModelMetadata` (checked when a version is opened), and
what a version answers (its signatures, their inputs and outputs) by :func:`signatures`: the one
description that the SavedModel metadata of both protocols and the service's model descriptions
are built from.

Versions are positive integers. A version is only ever created whole (exports stage beside the
repository and rename into place), and :func:`open_version` refuses one whose files do not match
the sha256 sums recorded in its ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnnkit.errors import RepositoryError

EXTRA_DIR = "assets.extra"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
MODELS_CONFIG = "models.config"


# What a version's metadata.json holds -----------------------------------------------------------


class InputSpec(BaseModel):
    """The model's input: raw pixels (0..255) of this (height, width, channels)."""

    shape: tuple[int, int, int]
    dtype: str = "float32"


class FeatureLayer(BaseModel):
    """A convolution or pooling layer whose activations the model exports."""

    name: str = Field(min_length=1)
    kind: str
    output_shape: list[int]

    @property
    def is_convolution(self) -> bool:
        return "Conv" in self.kind


class ModelMetadata(BaseModel):
    """The typed view of ``assets.extra/metadata.json`` (fields the service relies on; the rest,
    such as the verification figures, are kept as they are)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int = Field(ge=1)
    class_names: list[str] = Field(min_length=1)
    input: InputSpec
    preprocessing: str | None = None
    feature_layers: list[FeatureLayer] = []
    explain: dict[str, Any] | None = None
    training: dict[str, Any] = {}
    source: dict[str, Any] | None = None
    files: dict[str, str] = {}

    @property
    def conv_layers(self) -> list[str]:
        return [layer.name for layer in self.feature_layers if layer.is_convolution]

    @property
    def gradcam_layer(self) -> str | None:
        return (self.explain or {}).get("gradcam_layer")


def check_metadata(metadata: dict[str, Any], where: str | os.PathLike) -> ModelMetadata:
    """``metadata`` as :class:`ModelMetadata`, or a RepositoryError naming what is missing or wrong."""
    try:
        return ModelMetadata.model_validate(metadata)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        raise RepositoryError(f"{where}: {METADATA_FILE} is not valid ({problems}); refusing this version.") from error


# What a version answers: its signatures ---------------------------------------------------------

PREDICT_SIGNATURE = "serving_default"
FEATURE_MAPS_SIGNATURE = "feature_maps"
GRADCAM_SIGNATURE = "gradcam"
# Each convolution's output before its activation, for filter patterns (cnnkit.explain.FilterResponses).
FILTER_RESPONSES_SIGNATURE = "filter_responses"
PREDICT_OUTPUTS = ("probabilities", "top_class")
GRADCAM_OUTPUTS = ("heatmap", "coarse_heatmap", "class_index", "probabilities")
# Names clients may use for the default signature.
PREDICT_SIGNATURE_ALIASES = ("", PREDICT_SIGNATURE, "predict")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature: its data type and shape (None: any size)."""

    dtype: str  # "float32" or "int64"
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


def signatures(metadata: ModelMetadata, *, served_only: bool = True) -> dict[str, Signature]:
    """The signatures of a version: ``serving_default`` and ``feature_maps`` (served by ONNX
    Runtime), and ``gradcam`` when the export wrote one (served by the explanation worker; left
    out with ``served_only``)."""
    image = TensorSpec("float32", (None, *metadata.input.shape))
    found = {
        PREDICT_SIGNATURE: Signature(PREDICT_SIGNATURE, {"image": image}, {
            "probabilities": TensorSpec("float32", (None, len(metadata.class_names))),
            "top_class": TensorSpec("int64", (None,)),
        }),
        FEATURE_MAPS_SIGNATURE: Signature(FEATURE_MAPS_SIGNATURE, {"image": image}, {
            layer.name: TensorSpec("float32", (None, *layer.output_shape)) for layer in metadata.feature_layers
        }),
    }
    if not served_only and metadata.gradcam_layer:
        height, width, _ = metadata.input.shape
        found[GRADCAM_SIGNATURE] = Signature(GRADCAM_SIGNATURE, {
            "image": image, "class_index": TensorSpec("int64", (None,)),
        }, {
            "heatmap": TensorSpec("float32", (None, height, width)),
            "coarse_heatmap": TensorSpec("float32", (None, None, None)),
            "class_index": TensorSpec("int64", (None,)),
            "probabilities": TensorSpec("float32", (None, len(metadata.class_names))),
        })
    return found


def resolve_repository(repository: str | os.PathLike | None) -> Path:
    """The repository from the option, else the ``model_repository`` setting
    (``CNNKIT_MODEL_REPOSITORY``, default ./model_repository)."""
    if not repository:
        from cnnkit.settings import load_settings

        repository = load_settings().model_repository
    return Path(repository).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artefact_files(version_dir: Path) -> list[str]:
    """Every file of a version except metadata.json itself, as sorted POSIX relative paths."""
    files = []
    for path in version_dir.rglob("*"):
        relative = path.relative_to(version_dir).as_posix()
        if path.is_file() and relative != f"{EXTRA_DIR}/{METADATA_FILE}":
            files.append(relative)
    return sorted(files)


def list_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(entry.name) for entry in model_dir.iterdir()
                  if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0)


LAST_VERSION_FILE = ".last_version"


def last_version(model_dir: Path) -> int:
    """The highest version number ever published under ``model_dir`` (0 if none was recorded)."""
    try:
        return int((model_dir / LAST_VERSION_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


def record_version(model_dir: Path, version: int) -> None:
    """Remember ``version`` as published, so that no later export reuses its number."""
    from cnnkit.io import atomic_write_text

    if version > last_version(model_dir):
        atomic_write_text(model_dir / LAST_VERSION_FILE, f"{version}\n")


def version_fingerprint(version_dir: Path) -> tuple:
    """Every file's path, size and modification time: changes when a version folder is replaced."""
    entries = []
    for path in sorted(version_dir.rglob("*")):
        try:
            status = path.stat()
        except OSError:
            continue
        entries.append((path.relative_to(version_dir).as_posix(), status.st_size, status.st_mtime_ns))
    return tuple(entries)


def scan_repository(repository: Path) -> dict[str, list[int]]:
    """Model names and their versions (names without any version are left out)."""
    if not repository.is_dir():
        return {}
    found = {entry.name: list_versions(entry) for entry in sorted(repository.iterdir())
             if entry.is_dir() and not entry.name.startswith(".")}
    return {name: versions for name, versions in found.items() if versions}


@dataclass
class ModelVersion:
    """One verified version of a model in the repository."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / EXTRA_DIR / ONNX_FILE


def read_metadata(version_dir: Path) -> dict[str, Any]:
    path = version_dir / EXTRA_DIR / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise RepositoryError(
            f"{version_dir} has no {EXTRA_DIR}/{METADATA_FILE}: not a cnnkit export."
        ) from error
    except (OSError, json.JSONDecodeError) as error:
        raise RepositoryError(f"{path} is unreadable or corrupt ({error}).") from error


def verify_version(version_dir: Path, metadata: dict[str, Any]) -> None:
    """Check every artefact against the sha256 recorded at export; raise on any difference."""
    recorded: dict[str, str] = metadata.get("files", {})
    if not recorded:
        raise RepositoryError(f"{version_dir}: metadata.json records no file hashes; refusing it.")
    present = set(artefact_files(version_dir))
    missing = sorted(set(recorded) - present)
    if missing:
        raise RepositoryError(f"{version_dir}: missing file(s) {', '.join(missing)}; refusing this version.")
    unexpected = sorted(present - set(recorded))
    if unexpected:
        raise RepositoryError(
            f"{version_dir}: file(s) not in metadata.json: {', '.join(unexpected)}; refusing this version."
        )
    for relative, expected in recorded.items():
        actual = sha256_file(version_dir / relative)
        if actual != expected:
            raise RepositoryError(
                f"{version_dir / relative} has sha256 {actual}, but metadata.json records {expected}: "
                f"the file changed after export; refusing this version (export the run again)."
            )


def open_version(repository: str | os.PathLike | None, name: str, version: int | None = None,
                 *, verify: bool = True) -> ModelVersion:
    """A model version from the repository (the latest when ``version`` is None), hash-checked."""
    root = resolve_repository(repository)
    model_dir = root / name
    versions = list_versions(model_dir)
    if not versions:
        available = ", ".join(sorted(scan_repository(root))) or "none"
        raise RepositoryError(f"No model {name!r} in repository {root}; models: {available}.")
    chosen = versions[-1] if version is None else int(version)
    if chosen not in versions:
        raise RepositoryError(
            f"Model {name!r} has no version {chosen}; versions: {', '.join(map(str, versions))}."
        )
    version_dir = model_dir / str(chosen)
    metadata = read_metadata(version_dir)
    check_metadata(metadata, version_dir)
    if verify:
        verify_version(version_dir, metadata)
    return ModelVersion(name=name, version=chosen, path=version_dir, metadata=metadata)


def models_config_text(repository: Path, base_path: str | None = None) -> str:
    """TF-Serving's model config (text protobuf) listing every model of the repository.

    Each model's ``base_path`` is ``BASE_PATH/NAME`` where the repository will be mounted (e.g.
    ``/models`` in a container), else the bare ``NAME``, relative to the repository's root (TF
    Serving resolves it against its working directory: start it in the repository), so the
    repository can be moved or mounted anywhere.
    """
    lines = ["model_config_list {"]
    for name in scan_repository(repository):
        path = f"{base_path.rstrip('/')}/{name}" if base_path else name
        lines += [
            "  config {",
            f"    name: '{name}'",
            f"    base_path: '{path}'",
            "    model_platform: 'tensorflow'",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"
