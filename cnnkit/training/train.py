"""Training a recipe into a run directory, with checkpoints, early stopping and resume.

The files of a run directory are listed in :mod:`cnnkit.training.rundir`, whose ``RunDir`` names them.
Every file is written atomically, so killing a run at any moment leaves a resumable directory.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import keras

from cnnkit.errors import ConfigError, RunError
from cnnkit.io import atomic_save, atomic_write_json, atomic_write_text
from cnnkit.training import data as data_module
from cnnkit.training.config import RecipeConfig, save_config
from cnnkit.training.models import create_model, set_trainable_from
from cnnkit.training.rundir import CONFIG_FILE, RunDir, load_run_model

logger = logging.getLogger(__name__)


def configure_devices():
    """The distribution strategy for this machine, with mixed precision on GPUs.

    On CPU nothing changes: the default strategy and float32. With one GPU, a one-device strategy;
    with several, MirroredStrategy. GPUs also get memory growth and the mixed_float16 policy (the
    models keep their output layer in float32).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return tf.distribute.get_strategy()
    for gpu in gpus:
        # An already initialised GPU keeps its existing setting.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    keras.mixed_precision.set_global_policy("mixed_float16")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/gpu:0")


def feature_split(config: RecipeConfig) -> str | None:
    """The first layer that runs every epoch on cached features (None: the first trainable one):
    the recipe's ``feature_cache_from``, else the layer fine-tuning starts from, which stays frozen
    before it in both phases."""
    if config.feature_cache_from is not None:
        return config.feature_cache_from
    return config.fine_tune.from_layer if config.fine_tune is not None else None


def augmentation_tag(config: RecipeConfig) -> str:
    """A short digest of the augmentation settings and seed, naming cached augmented features."""
    settings = json.dumps([dataclasses.asdict(config.augmentation), config.seed], sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:12]


def build_augmentation(config: RecipeConfig, seed: int | None = None) -> keras.Sequential | None:
    """Keras preprocessing layers for the recipe's augmentation, applied to training batches only
    (their random draws start from ``seed``, default the recipe's)."""
    settings = config.augmentation
    if not settings.enabled:
        return None
    seed = config.seed if seed is None else seed
    steps: list[keras.layers.Layer] = []
    if settings.horizontal_flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if settings.rotation:
        steps.append(keras.layers.RandomRotation(settings.rotation, fill_mode="nearest", seed=seed))
    if settings.translation:
        steps.append(
            keras.layers.RandomTranslation(
                settings.translation, settings.translation, fill_mode="nearest", seed=seed
            )
        )
    if settings.shear:
        steps.append(keras.layers.RandomShear(settings.shear, settings.shear, fill_mode="nearest", seed=seed))
    if settings.zoom:
        steps.append(keras.layers.RandomZoom(settings.zoom, fill_mode="nearest", seed=seed))
    if settings.brightness:
        steps.append(keras.layers.RandomBrightness(settings.brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name="augmentation")


def is_binary(model: keras.Model) -> bool:
    """True for a single sigmoid unit (probability of the second class)."""
    return int(model.output_shape[-1]) == 1


def _optimizer(name: str, learning_rate, weight_decay: float = 0.0):
    # Keras takes weight_decay=None for "off"; 0.0 would add a no-op decay step.
    decay = weight_decay or None
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=decay)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, weight_decay=decay)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=decay)


def compile_model(
    model: keras.Model,
    optimizer: str,
    learning_rate: float,
    *,
    schedule: str = "constant",
    decay_steps: int = 1,
    warmup_steps: int = 0,
    steps_per_execution: int = 1,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
) -> None:
    rate: Any = learning_rate
    if schedule == "cosine":
        if warmup_steps > 0:
            # From 0 up to the learning rate over the warm-up, then the cosine over the rest.
            rate = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, decay_steps - warmup_steps),
                warmup_target=learning_rate, warmup_steps=warmup_steps,
            )
        else:
            rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, decay_steps))
    if is_binary(model):
        loss: Any = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        metrics: list[Any] = [keras.metrics.BinaryAccuracy(name="accuracy")]
    else:
        if label_smoothing:
            from cnnkit.training.losses import SmoothedSparseCrossentropy

            loss = SmoothedSparseCrossentropy(label_smoothing)
        else:
            loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(
        optimizer=_optimizer(optimizer, rate, weight_decay),
        loss=loss,
        metrics=metrics,
        steps_per_execution=steps_per_execution,
        jit_compile=_use_xla(),
    )


def compile_for_recipe(model: keras.Model, config: RecipeConfig, steps_per_epoch: int) -> None:
    """Compile for the recipe's first phase: its optimizer, schedule, warm-up, decay and smoothing."""
    compile_model(
        model, config.optimizer, config.learning_rate,
        schedule=config.lr_schedule, decay_steps=steps_per_epoch * config.epochs,
        warmup_steps=steps_per_epoch * config.warmup_epochs,
        steps_per_execution=config.steps_per_execution, weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
    )


def _use_xla() -> bool | str:
    """XLA on GPUs only: on these CPUs it trains about half as fast as the oneDNN kernels.

    Measured with cifar10_cnn (batch normalization, batch 64) on 2 CPU cores: 78 images/s with
    XLA against 147 without.
    """
    import tensorflow as tf

    return "auto" if tf.config.list_physical_devices("GPU") else False


class RunCheckpoint(keras.callbacks.Callback):
    """Checkpoints, early stopping and resume state in one place, all written atomically.

    After each epoch: ``best.keras`` when the monitored value improved, ``last.keras`` always, then
    ``state.json`` (written last, so it never points at a checkpoint that is not there yet).
    Stops training after ``patience`` epochs without improvement (0: never). Its state survives a
    resume, so a resumed run stops exactly where an uninterrupted one would have.
    """

    def __init__(self, run: RunDir, monitor: str, patience: int, state: dict[str, Any]):
        super().__init__()
        self.run = run
        self.monitor = monitor
        self.patience = patience
        self.mode = "min" if "loss" in monitor else "max"
        self.state = state
        self.phase_wait = 0
        # What the checkpoints hold: the model being fitted, unless it is a part of a larger one
        # (the head trained on cached features saves the whole model).
        self.saved_model: keras.Model | None = None

    def _improved(self, value: float) -> bool:
        best = self.state.get("best_value")
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best

    def on_train_begin(self, logs=None):
        self.phase_wait = int(self.state.get("wait", 0))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            raise RunError(
                f"The monitored metric {self.monitor!r} is not among this run's metrics "
                f"({', '.join(sorted(logs))}): set monitor in the recipe."
            )
        value = float(value)
        if math.isfinite(value) and self._improved(value):
            atomic_save(self.run.best, (self.saved_model or self.model).save)
            self.state.update(best_value=value, best_epoch=epoch + 1)
            self.phase_wait = 0
        else:
            self.phase_wait += 1
        atomic_save(self.run.last, (self.saved_model or self.model).save)
        seconds = float(self.state.get("train_seconds", 0.0)) + time.perf_counter() - self.epoch_started
        self.state.update(
            epoch=epoch + 1, wait=self.phase_wait, train_seconds=round(seconds, 1), updated=_now()
        )
        if self.patience and self.phase_wait >= self.patience:
            self.model.stop_training = True
            self.state["stopped_early_at"] = epoch + 1
        self.run.write_state(self.state)


class EpochProgress(keras.callbacks.Callback):
    """The one progress display of a run (Keras's own is off).

    In a terminal, a bar over the epoch's steps with the running loss, replaced at the end of the
    epoch by one line: epoch, time, estimated time left for the whole run, and the metrics. Piped
    or logged, only that line, so a log holds one line per epoch.
    """

    def __init__(self, total_epochs: int, stream=None, bar: bool | None = None):
        super().__init__()
        self.total_epochs = total_epochs
        self.stream = stream or sys.stderr
        self.show_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.durations: list[float] = []
        self._bar: Any = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        if self.show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=(self.params or {}).get("steps"), desc=f"epoch {epoch + 1}/{self.total_epochs}",
                             unit="step", file=self.stream, leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            # With steps_per_execution, Keras calls this once per execution with the last step's index.
            self._bar.n = batch + 1
            loss = (logs or {}).get("loss")
            if isinstance(loss, float | int):
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.refresh()

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.durations.append(time.perf_counter() - self.started)
        mean = sum(self.durations) / len(self.durations)
        left = (self.total_epochs - epoch - 1) * mean
        metrics = "  ".join(f"{key}={value:.4f}" for key, value in sorted((logs or {}).items())
                            if isinstance(value, float | int))
        print(
            f"[cnnkit] epoch {epoch + 1}/{self.total_epochs}  {self.durations[-1]:.1f}s  "
            f"ETA {_duration(left)}  {metrics}",
            file=self.stream,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def default_run_dir(recipe_name: str, root: str | Path = "runs") -> Path:
    return Path(root) / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _trim_history(path: Path, completed_epochs: int) -> None:
    """Drop history rows of epochs that were logged but never checkpointed (a killed run)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) < completed_epochs]
    if len(kept) != len(rows):
        lines = [",".join(row) for row in kept]
        atomic_write_text(path, "\n".join(lines) + "\n")


def train(
    config: RecipeConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    resume: bool = False,
    epochs: int | None = None,
    evaluate: bool = True,
    verbose: int | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    distributed: bool = False,
) -> Path:
    """Train ``config`` into ``run_dir`` (or resume the run there) and return the run directory.

    With ``resume``, the configuration is read back from the run directory (``epochs`` may raise
    its epoch count), the model and optimizer come from ``last.keras`` and training continues at
    the first epoch that was not completed.

    With ``distributed``, this process is one worker of the cluster that ``TF_CONFIG`` describes
    (see :mod:`cnnkit.training.distributed`): the chief writes ``run_dir``, the others only read it.
    """
    if resume:
        if run_dir is None or not RunDir(run_dir).is_run():
            raise RunError(f"Cannot resume: {run_dir} is not a run directory (no {CONFIG_FILE}).")
        run_path = Path(run_dir)
        run = RunDir(run_path)
        config = run.load_config()
        state = run.read_state()
    else:
        if config is None:
            raise RunError("train() needs a configuration unless it resumes a run.")
        run_path = Path(run_dir) if run_dir is not None else default_run_dir(config.name)
        run = RunDir(run_path)
        if run.state.exists():
            raise RunError(
                f"{run_path} already holds a run: pass --resume to continue it or choose another --output."
            )
        state = {}
    if epochs is not None:
        config.epochs = epochs
        config.validate()
    place = None
    if distributed:
        from cnnkit.training.distributed import cluster_place, multi_worker_strategy

        place = cluster_place()
        if config.fine_tune is not None or config.feature_cache:
            raise RunError("--distributed trains one-phase recipes: no fine_tune section, no feature_cache.")
        strategy = multi_worker_strategy()
    else:
        strategy = configure_devices()
    chief = place is None or place.is_chief
    # The chief writes the run directory; another worker writes its checkpoints into a folder of its
    # own (removed at the end) and reads the chief's state and last checkpoint when resuming.
    writes = run if chief else RunDir(tempfile.mkdtemp(prefix=f"cnnkit-worker-{place.index if place else 0}-"))
    keras.utils.set_random_seed(config.seed)
    # Load the data first, so that a missing data set leaves no half-made run directory behind.
    dataset = data_module.load_recipe_dataset(config, data_dir)
    summary = dataset.summary()
    if chief:
        run_path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config)
        atomic_write_json(run.data_summary, summary)
    if dataset.unreadable:
        print(
            f"[cnnkit] warning: {len(dataset.unreadable)} unreadable image(s) were left out "
            f"(listed in {run.data_summary})",
            file=sys.stderr,
        )
    print(
        f"[cnnkit] {config.name}: {summary['train']} train / {summary['validation']} validation / "
        f"{summary['test']} test images of {dataset.input_shape}, {dataset.num_classes} classes",
        file=sys.stderr,
    )

    start_epoch = int(state.get("epoch", 0))
    if start_epoch >= config.total_epochs and state.get("finished"):
        print(f"[cnnkit] {run_path} already finished {start_epoch} epochs.", file=sys.stderr)
    steps_per_epoch = math.ceil(len(dataset.x_train) / config.batch_size)
    augmentation = build_augmentation(config)
    train_data = data_module.make_pipeline(
        dataset.x_train, dataset.y_train, config.batch_size,
        shuffle=True, augmentation=augmentation, seed=config.seed,
    )
    val_data = data_module.make_pipeline(dataset.x_val, dataset.y_val, config.batch_size)
    if len(dataset.x_val) == 0:
        raise RunError("The validation split is empty: set validation_size above 0.")

    with strategy.scope():
        if resume and run.last.exists():
            model = load_run_model(run.last)
            print(f"[cnnkit] resuming {run_path} after epoch {start_epoch}", file=sys.stderr)
        else:
            if resume:
                start_epoch, state = 0, {}
            model = create_model(
                config.model,
                input_shape=dataset.input_shape,
                **{"num_classes": dataset.num_classes, **config.model_args},
            )
            if config.init_from:
                initialise_from(model, config.init_from)
            compile_for_recipe(model, config, steps_per_epoch)
    if chief:
        _trim_history(run.history, start_epoch)
    state.setdefault("started", _now())
    state.pop("finished", None)
    checkpoint = RunCheckpoint(writes, config.monitor, config.early_stopping_patience, state)
    fitted = model
    if config.feature_cache and start_epoch < config.total_epochs:
        # The frozen base runs once (features cached); only the head trains, on the features.
        # The head shares its layers with `model`, so checkpoints and model.keras hold the whole model.
        from cnnkit.settings import load_settings
        from cnnkit.training.features import feature_data

        with strategy.scope():
            fitted, train_data, val_data = feature_data(
                model, dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val, config.batch_size,
                load_settings().resolved_cache_dir, config.seed, views=config.feature_views,
                # Each augmented view draws its own transformations (a seed of its own).
                augmentation_for_view=lambda view: build_augmentation(config, seed=config.seed + 7919 * (view + 1)),
                tag=augmentation_tag(config), split_at=feature_split(config))
            compile_for_recipe(fitted, config, steps_per_epoch)
        checkpoint.saved_model = model
    callbacks = [
        # The history row is written (and flushed) before the checkpoint's state.json says the epoch
        # is done: a run killed between the two loses no row (a row past state.json is trimmed).
        keras.callbacks.CSVLogger(str(writes.history), append=True),
        checkpoint,
        *([keras.callbacks.TensorBoard(str(run.tensorboard), profile_batch=0)] if place is None else []),
        # The run's one progress display; verbose=0 trains silently.
        *([EpochProgress(config.total_epochs)] if verbose != 0 and chief else []),
        *(extra_callbacks or []),
    ]

    if place is not None:
        from cnnkit.training.distributed import fit_distributed

        print(f"[cnnkit] worker {place.index} of {place.workers}{' (chief)' if chief else ''}, "
              f"global batch {config.batch_size}", file=sys.stderr)
        fit_distributed(model, strategy, train_data, val_data, epochs=config.epochs, initial_epoch=start_epoch,
                        global_batch_size=config.batch_size, callbacks=callbacks,
                        label_smoothing=config.label_smoothing)
    phases = [(0, config.epochs)] if place is None else []
    if config.fine_tune is not None:
        phases.append((config.epochs, config.total_epochs))
    for phase_index, (phase_start, phase_end) in enumerate(phases):
        if start_epoch >= phase_end:
            continue
        if phase_index == 1 and start_epoch == phase_start:
            # Phase two of transfer learning: unfreeze the top block, recompile at a low rate.
            _restore_best(model, run)
            with strategy.scope():
                tune = config.fine_tune
                if tune is None:
                    raise ValueError(f"Recipe {config.name!r} has two phases but no fine_tune section.")
                trainable = set_trainable_from(model, tune.from_layer)
                # With feature_cache, `fitted` is the model after the cached layers (sharing its layers).
                compile_model(
                    fitted, tune.optimizer, tune.learning_rate,
                    steps_per_execution=config.steps_per_execution, label_smoothing=config.label_smoothing,
                )
            checkpoint.state["wait"] = 0
            print(f"[cnnkit] fine-tuning {', '.join(trainable)}", file=sys.stderr)
        fitted.fit(
            train_data,
            validation_data=val_data,
            epochs=phase_end,
            initial_epoch=start_epoch,
            callbacks=callbacks,
            verbose=0,  # EpochProgress is the one display
            shuffle=False,  # The pipeline shuffles itself, every epoch.
        )
        start_epoch = int(checkpoint.state.get("epoch", start_epoch))
        if checkpoint.state.get("stopped_early_at") and phase_index == 0 and len(phases) > 1:
            # Early stopping ends the feature-extraction phase, not the whole run.
            checkpoint.state.pop("stopped_early_at")
            start_epoch = phase_end
            checkpoint.state["epoch"] = phase_end
        fitted.stop_training = False

    _restore_best(model, writes)
    if not chief:
        shutil.rmtree(writes.path, ignore_errors=True)
        print(f"[cnnkit] worker {place.index if place else 0} done; the chief wrote {run_path}", file=sys.stderr)
        return run_path
    atomic_save(run.model, model.save)
    checkpoint.state["finished"] = _now()
    run.write_state(checkpoint.state)
    print(f"[cnnkit] model written to {run.model}", file=sys.stderr)
    if evaluate:
        from cnnkit.training.evaluate import evaluate_run

        # A distributed model's predictions are collective ops with workers that have finished: the
        # chief evaluates a fresh copy of the written model, outside the strategy.
        evaluate_run(run_path, data_dir=data_dir, dataset=dataset, model=model if place is None else None)
    return run_path


def initialise_from(model: keras.Model, source: str | Path) -> Path:
    """Load the weights of another run (its directory or a ``.keras`` file) into ``model``.

    Only the weights are read (layer by layer, in order), so the source may have been written by an
    older cnnkit; an architecture that does not match raises a :class:`ConfigError` naming both.
    """
    path = Path(source)
    if path.is_dir():
        run = RunDir(path)
        candidates = [run.model, run.best, run.last]
        found = next((candidate for candidate in candidates if candidate.exists()), None)
        if found is None:
            raise ConfigError(f"init_from: {path} holds no model ({', '.join(c.name for c in candidates)}).")
        path = found
    elif not path.exists():
        raise ConfigError(f"init_from: {path} does not exist (give a run directory or a .keras file).")
    try:
        model.load_weights(path)
    except Exception as error:  # noqa: BLE001 - Keras raises assorted errors on mismatched files.
        raise ConfigError(
            f"init_from: the weights in {path} do not fit the model {model.name!r}: {error}"
        ) from error
    print(f"[cnnkit] starting from the weights in {path}", file=sys.stderr)
    return path


def _restore_best(model: keras.Model, run: RunDir) -> None:
    if run.best.exists():
        model.load_weights(run.best)
