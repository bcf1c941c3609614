"""A run directory and the files in it: the one place that spells out their names.

A run directory holds::

    config.yaml      the resolved recipe (what --resume and evaluate read back)
    data.json        split sizes, class names and any unreadable files that were left out
    state.json       the last completed epoch, the best monitored value, early-stopping state
    last.keras       the model and optimizer state after the last completed epoch (resume point)
    best.keras       the model at the best monitored epoch
    history.csv      one row of metrics per epoch
    tensorboard/     TensorBoard logs
    model.keras      the final model (best weights restored), written when training ends
    evaluation/      metrics.json and report pictures (see cnnkit.training.evaluate)

Training (:mod:`cnnkit.training.train`) writes these files, evaluation, export, the explanations and
the results table read them back through :class:`RunDir`. This module imports neither TensorFlow nor
Keras until a model is loaded, so the command line can check a run directory before it starts them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.errors import RunError, UserError
from cnnkit.io import atomic_write_json
from cnnkit.training.config import RecipeConfig, load_config_file

if TYPE_CHECKING:
    import keras

CONFIG_FILE = "config.yaml"
DATA_SUMMARY_FILE = "data.json"
STATE_FILE = "state.json"
LAST_FILE = "last.keras"
BEST_FILE = "best.keras"
HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
MODEL_FILE = "model.keras"
EVALUATION_DIR = "evaluation"
METRICS_FILE = "metrics.json"


class RunDir:
    """The files of one run directory, by what they hold rather than by their names.

    Building a ``RunDir`` touches nothing on disk: the properties are paths that need not exist yet
    (a new run), and ``is_run()`` or the ``require_*`` checks say whether they do.
    """

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # The files ---------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        """The resolved recipe the run trains (``config.yaml``); its presence makes a run directory."""
        return self.path / CONFIG_FILE

    @property
    def data_summary(self) -> Path:
        """Split sizes, class names and left-out unreadable files (``data.json``)."""
        return self.path / DATA_SUMMARY_FILE

    @property
    def state(self) -> Path:
        """The progress of the run: last completed epoch, best value, early stopping (``state.json``)."""
        return self.path / STATE_FILE

    @property
    def last(self) -> Path:
        """The model and optimizer after the last completed epoch, where a resume starts (``last.keras``)."""
        return self.path / LAST_FILE

    @property
    def best(self) -> Path:
        """The model at the best monitored epoch (``best.keras``)."""
        return self.path / BEST_FILE

    @property
    def history(self) -> Path:
        """One row of metrics per epoch (``history.csv``)."""
        return self.path / HISTORY_FILE

    @property
    def tensorboard(self) -> Path:
        """The folder of TensorBoard logs (``tensorboard/``)."""
        return self.path / TENSORBOARD_DIR

    @property
    def model(self) -> Path:
        """The final model, written when training ends (``model.keras``)."""
        return self.path / MODEL_FILE

    @property
    def evaluation(self) -> Path:
        """The folder of test metrics and report pictures (``evaluation/``)."""
        return self.path / EVALUATION_DIR

    @property
    def metrics(self) -> Path:
        """The test metrics the evaluation writes (``evaluation/metrics.json``)."""
        return self.evaluation / METRICS_FILE

    # Checks ------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the folder exists, whether or not it holds a run yet."""
        return self.path.is_dir()

    def is_run(self) -> bool:
        """True when the folder is a run directory: it has a ``config.yaml``."""
        return self.config.is_file()

    def require_run(self, error: type[UserError] = RunError) -> RunDir:
        """This run directory, or ``error`` when the folder holds no ``config.yaml``."""
        if not self.is_run():
            raise error(f"{self.path} is not a run directory (no {CONFIG_FILE}).")
        return self

    def require_model(self) -> Path:
        """The final model's path, or a ``RunError`` that says how to finish the run."""
        if not self.model.is_file():
            raise RunError(
                f"{self.path} has no {MODEL_FILE}: the run has not finished. Resume it with "
                f"`cnnkit train --resume --output {self.path}`."
            )
        return self.model

    # Reading and writing -----------------------------------------------------------------------

    def load_config(self) -> RecipeConfig:
        """The recipe saved in ``config.yaml``."""
        return load_config_file(self.config)

    def read_state(self) -> dict[str, Any]:
        """The saved progress of the run; empty before the first epoch has finished."""
        if not self.state.exists():
            return {}
        try:
            return json.loads(self.state.read_text())
        except json.JSONDecodeError as error:
            raise RunError(f"{self.state} is corrupt ({error}).") from error

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace ``state.json`` atomically, so a killed run never leaves half of it behind."""
        atomic_write_json(self.state, state)


def read_state(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved progress of the run in ``run_dir``: shorthand for ``RunDir(run_dir).read_state()``."""
    return RunDir(run_dir).read_state()


def load_run_model(path: str | os.PathLike[str]) -> keras.Model:
    """A ``.keras`` file of a run (final model or checkpoint), with the custom layers it may use."""
    import keras

    # Importing cnnkit.training.models and .losses registers the custom layers (VGGPreprocess) and
    # losses (label smoothing) for deserialisation.
    import cnnkit.training.losses  # noqa: F401
    import cnnkit.training.models  # noqa: F401

    try:
        return keras.models.load_model(path)
    except Exception as error:  # noqa: BLE001 - Keras raises assorted errors on bad files.
        raise RunError(f"Cannot load the model {path}: {error}") from error
