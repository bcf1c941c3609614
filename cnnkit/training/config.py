"""Recipe configuration: small YAML files of dataclass fields, overridable from the command line.

A recipe names a data set, a model from the zoo and the training settings that reproduce one row of
the course. ``cnnkit train RECIPE --epochs 3 --set augmentation.rotation=0.1`` overrides fields;
the resolved configuration is saved as ``config.yaml`` in the run directory, and ``--resume`` and
``cnnkit evaluate`` read it back from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnkit.errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"
OPTIMIZERS = ("adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass
class AugmentationConfig:
    """Random train-time transformations, as fractions (keras preprocessing layer factors)."""

    rotation: float = 0.0  # fraction of a full turn
    translation: float = 0.0  # fraction of height / width
    zoom: float = 0.0
    shear: float = 0.0
    horizontal_flip: bool = False
    brightness: float = 0.0

    @property
    def enabled(self) -> bool:
        return any(
            (self.rotation, self.translation, self.zoom, self.shear, self.horizontal_flip,
             self.brightness)
        )


@dataclass
class FineTuneConfig:
    """A second phase: unfreeze from ``from_layer``, recompile with a low learning rate."""

    from_layer: str = "block5_conv1"
    epochs: int = 10
    learning_rate: float = 1e-5
    optimizer: str = "rmsprop"


@dataclass
class RecipeConfig:
    name: str
    dataset: str
    model: str
    description: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset_path: str | None = None  # for the "folder" data set
    image_size: list[int] | None = None  # (height, width) for folder data sets
    channels: int = 3
    validation_size: int = 5000
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    # Decoupled weight decay (AdamW-style, the Keras optimizers' own ``weight_decay``): each step
    # shrinks every weight by learning_rate * weight_decay of itself. 0 turns it off.
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    # With the cosine schedule: the learning rate climbs linearly from 0 over this many epochs first.
    warmup_epochs: int = 0
    # The training target: 1 - s + s/k for the true class and s/k for the others (0: one-hot).
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0  # 0 disables early stopping
    monitor: str = "val_accuracy"
    steps_per_execution: int = 1
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    fine_tune: FineTuneConfig | None = None
    # The course's fast path for a frozen base: run the base once over the images (features cached
    # on disk), then train only the layers after it on those features (cnnkit.training.features).
    feature_cache: bool = False
    # With feature_cache and augmentation: the frozen base runs once over this many augmented views
    # of every training image (cached too); each epoch trains the head on one view of each image,
    # drawn at random, instead of running the base over freshly augmented images every epoch.
    feature_views: int = 0
    # With feature_cache: the first layer that runs every epoch; the (frozen) layers before it run
    # once. Default: the fine_tune section's from_layer, else the first layer with trainable weights.
    # Two recipes that split at the same layer, with the same images and augmentation, share the cache.
    feature_cache_from: str | None = None
    # Start from the weights of another run (its run directory or a .keras file) instead of the
    # model's own initialisation; the architectures must match. With ``epochs: 0`` and a
    # ``fine_tune`` section, a run goes straight to fine-tuning a frozen-base run's model.
    init_from: str | None = None
    # Evaluation averages each test image's probabilities with its mirror image's (test-time
    # augmentation); for data sets whose classes do not change under a left-right flip.
    test_time_flip: bool = False
    seed: int = 1337
    course_accuracy: float | None = None  # the figure the course reports, for reports

    def validate(self) -> RecipeConfig:
        if self.epochs < 0 or (self.epochs == 0 and (self.fine_tune is None or self.init_from is None)):
            raise ConfigError(
                f"epochs must be at least 1, got {self.epochs} (0 is allowed only with init_from and "
                "fine_tune: the run goes straight to fine-tuning the model it starts from)."
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be 0 (off) or positive, got {self.weight_decay}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.lr_schedule != "cosine"):
            raise ConfigError(
                f"warmup_epochs must be 0, or positive with lr_schedule: cosine; got {self.warmup_epochs}."
            )
        if self.warmup_epochs >= max(self.epochs, 1) and self.warmup_epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs}).")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.image_size is not None and len(self.image_size) != 2:
            raise ConfigError(f"image_size must be [height, width], got {self.image_size!r}.")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}.")
        if self.early_stopping_patience < 0:
            raise ConfigError("early_stopping_patience must be 0 (off) or positive.")
        if self.steps_per_execution < 1:
            raise ConfigError("steps_per_execution must be at least 1.")
        if self.feature_cache_from is not None and not self.feature_cache:
            raise ConfigError("feature_cache_from needs feature_cache: true.")
        if self.feature_views < 0:
            raise ConfigError(f"feature_views must be 0 (off) or positive, got {self.feature_views}.")
        if self.feature_cache and self.augmentation.enabled and self.feature_views < 1:
            raise ConfigError("feature_cache with augmentation needs feature_views (at least 1): how many augmented "
                              "views of each training image the frozen base computes once.")
        if self.feature_views and not (self.feature_cache and self.augmentation.enabled):
            raise ConfigError("feature_views needs feature_cache: true and an augmentation section.")
        if self.fine_tune is not None:
            if self.fine_tune.optimizer not in OPTIMIZERS:
                raise ConfigError(f"fine_tune.optimizer must be one of {', '.join(OPTIMIZERS)}.")
            if self.fine_tune.epochs < 1:
                raise ConfigError("fine_tune.epochs must be at least 1.")
        return self

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.fine_tune.epochs if self.fine_tune else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any], where: str):
    """Build a dataclass from a mapping, naming unknown keys instead of a TypeError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}.")
    names = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"Unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(names))}."
        )
    values = dict(values)
    if cls is RecipeConfig:
        if values.get("augmentation") is not None:
            values["augmentation"] = _build(
                AugmentationConfig, values["augmentation"], f"{where}.augmentation"
            )
        else:
            values.pop("augmentation", None)
        if values.get("fine_tune") is not None:
            values["fine_tune"] = _build(FineTuneConfig, values["fine_tune"], f"{where}.fine_tune")
    for item in dataclasses.fields(cls):
        if item.name in values:
            value = values[item.name]
            if "float" in str(item.type) and isinstance(value, str):
                # YAML 1.1 reads "1e-4" (no dot) as a string; people mean the number.
                with contextlib.suppress(ValueError):
                    values[item.name] = value = float(value)
            _check_type(item.name, str(item.type), value, where)
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
}


def _check_type(name: str, annotation: str, value: Any, where: str) -> None:
    """Refuse values of the wrong kind (``epochs: ten``) with a message naming the field."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return
        raise ConfigError(f"{where}: {name} must not be empty.")
    for kind in kinds:
        if kind.startswith("list"):
            if isinstance(value, list):
                return
        elif kind.startswith("dict"):
            if isinstance(value, dict):
                return
        elif kind in _SCALAR_TYPES:
            allowed = _SCALAR_TYPES[kind]
            # bool is an int in Python; a flag where a number belongs is still a mistake.
            if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
                return
        else:
            return  # Nested dataclasses are built and checked by _build itself.
    raise ConfigError(f"{where}: {name} must be {annotation}, got {value!r}.")


def config_from_dict(values: dict[str, Any], where: str = "recipe") -> RecipeConfig:
    return _build(RecipeConfig, values, where).validate()


def list_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def load_config_file(path: str | os.PathLike) -> RecipeConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"Cannot read configuration {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return config_from_dict(values or {}, where=str(path))


def load_recipe(name_or_path: str) -> RecipeConfig:
    """A recipe by name (see ``list_recipes``) or the path of a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return load_config_file(candidate)
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown recipe {name_or_path!r}; available recipes: {', '.join(list_recipes())}.")
    return load_config_file(path)


def apply_overrides(config: RecipeConfig, overrides: list[str]) -> RecipeConfig:
    """Apply ``key=value`` overrides (dotted keys for nested fields; values parsed as YAML)."""
    values = config.to_dict()
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override {override!r} must look like key=value (e.g. epochs=5).")
        key, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"Override {override!r}: cannot parse value ({error}).") from error
        target = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                if part == "fine_tune" and target.get(part) is None:
                    target[part] = {}
                else:
                    raise ConfigError(f"Override {override!r}: {part!r} is not a section.")
            target = target[part]
        target[parts[-1]] = value
    return config_from_dict(values, where="overrides")


def save_config(config: RecipeConfig, path: str | os.PathLike) -> None:
    from cnnkit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
