"""The model repository: TF-Serving's layout, read and checked without TensorFlow.

::

    REPOSITORY/models.config                      TF-Serving model config listing every model
    REPOSITORY/NAME/VERSION/saved_model.pb        the SavedModel a stock tensorflow_model_server serves
    REPOSITORY/NAME/VERSION/variables/...
    REPOSITORY/NAME/VERSION/assets.extra/model.onnx       the same graph for ONNX Runtime
    REPOSITORY/NAME/VERSION/assets.extra/metadata.json    classes, input, layers, checks, sha256s

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

from training.errors import CnnkitError

REPOSITORY_ENV = "CNNKIT_MODEL_REPOSITORY"
DEFAULT_REPOSITORY = "model_repository"
EXTRA_DIR = "assets.extra"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
MODELS_CONFIG = "models.config"


class RepositoryError(CnnkitError, ValueError):
    """A model repository, model or version is missing, malformed or fails its integrity check."""


def resolve_repository(repository: str | os.PathLike | None) -> Path:
    """The repository from the option, else ``CNNKIT_MODEL_REPOSITORY``, else ./model_repository."""
    chosen = repository or os.environ.get(REPOSITORY_ENV) or DEFAULT_REPOSITORY
    return Path(chosen).expanduser()


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


def list_models(repository: Path) -> dict[str, list[int]]:
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
        available = ", ".join(sorted(list_models(root))) or "none"
        raise RepositoryError(f"No model {name!r} in repository {root}; models: {available}.")
    chosen = versions[-1] if version is None else int(version)
    if chosen not in versions:
        raise RepositoryError(
            f"Model {name!r} has no version {chosen}; versions: {', '.join(map(str, versions))}."
        )
    version_dir = model_dir / str(chosen)
    metadata = read_metadata(version_dir)
    if verify:
        verify_version(version_dir, metadata)
    return ModelVersion(name=name, version=chosen, path=version_dir, metadata=metadata)


def models_config_text(repository: Path) -> str:
    """TF-Serving's model config (text protobuf) listing every model of the repository."""
    lines = ["model_config_list {"]
    for name in list_models(repository):
        lines += [
            "  config {",
            f"    name: '{name}'",
            f"    base_path: '{(repository / name).resolve()}'",
            "    model_platform: 'tensorflow'",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"
