"""Import exported model versions into the BentoML model store.

A repository version ``NAME/VERSION`` becomes the BentoML model ``NAME:VERSION``. Its files are
copied unchanged under ``export/`` inside the BentoML model folder (BentoML keeps its own
``model.yaml`` at the top), so the service can hash-check them exactly like a repository version.
Labels carry what ``bentoml models list`` users filter on; metadata carries the classes and input.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cnnkit.repository import ModelVersion, RepositoryError, read_metadata, verify_version

EXPORT_SUBDIR = "export"


def _bentoml():
    # No usage analytics from an offline machine; BentoML reads this when it is imported.
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    import bentoml

    return bentoml


def bento_labels(metadata: dict) -> dict[str, str]:
    training = metadata.get("training", {})
    accuracy = training.get("test_accuracy")
    labels = {
        "framework": "savedmodel-onnx",
        "dataset": str(training.get("dataset", "")),
        "recipe": str(training.get("recipe", {}).get("name", "")),
        "test_accuracy": "" if accuracy is None else f"{accuracy:.4f}",
        "repository_version": str(metadata.get("version", "")),
        "source_commit": str((metadata.get("source") or {}).get("commit") or "")[:12],
    }
    return {key: value for key, value in labels.items() if value}


def import_to_bentoml(version: ModelVersion) -> str:
    """Copy a verified repository version into the BentoML store; return its tag (NAME:VERSION).

    Importing the same version twice is a no-op when the stored copy has the same ONNX hash, and an
    error when it differs (a BentoML tag, like a repository version, is never overwritten).
    """
    bentoml = _bentoml()
    verify_version(version.path, version.metadata)
    tag = f"{version.name}:{version.version}"
    onnx_hash = version.metadata["files"].get("assets.extra/model.onnx")
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("onnx_sha256") == onnx_hash:
            return str(existing.tag)
        raise RepositoryError(
            f"The BentoML store already holds {tag} with different files; delete it with "
            f"`bentoml models delete {tag}` or export a new version."
        )
    metadata = {
        "class_names": list(version.metadata["class_names"]),
        "input_shape": list(version.metadata["input"]["shape"]),
        "input_dtype": version.metadata["input"]["dtype"],
        "feature_layers": [layer["name"] for layer in version.metadata["feature_layers"]],
        "onnx_sha256": onnx_hash,
        "export_subdir": EXPORT_SUBDIR,
    }
    with bentoml.models.create(
        tag, module="cnnkit", labels=bento_labels(version.metadata), metadata=metadata,
    ) as model:
        shutil.copytree(version.path, Path(model.path) / EXPORT_SUBDIR)
    return str(model.tag)


def open_bento_model(tag: str) -> ModelVersion:
    """A model from the BentoML store as a hash-checked ModelVersion."""
    bentoml = _bentoml()
    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as error:
        raise RepositoryError(f"The BentoML store has no model {tag!r} (`bentoml models list`).") from error
    path = Path(model.path) / EXPORT_SUBDIR
    metadata = read_metadata(path)
    verify_version(path, metadata)
    return ModelVersion(name=model.tag.name, version=int(metadata["version"]), path=path,
                        metadata=metadata)
