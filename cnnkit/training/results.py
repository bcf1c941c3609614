"""A Markdown table of the runs under a folder: what the README's results table is made from.

Each row also names the run directory and the settings in which the run differs from the shipped
recipe of its name (``--set`` overrides, or a recipe that has changed since the run).

Reads only the files each run directory already holds (``config.yaml``, ``state.json``,
``evaluation/metrics.json``), so it needs no TensorFlow and works while runs are still training.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnnkit.errors import ConfigError, RunError
from cnnkit.training.config import RecipeConfig, load_recipe
from cnnkit.training.rundir import CONFIG_FILE, RunDir


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "–"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.2f}%"


# Fields that describe a recipe rather than change what it trains.
_NOT_SETTINGS = {"name", "description", "course_accuracy"}


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes_from_recipe(config: RecipeConfig) -> str:
    """The run's settings that differ from the shipped recipe of the same name, as ``key=value``.

    Runs of a recipe name that is not shipped (a YAML file of one's own) show "own recipe".
    """
    try:
        shipped = load_recipe(config.name)
    except ConfigError:
        return "own recipe"
    ours, theirs = _flatten(config.to_dict()), _flatten(shipped.to_dict())
    changed = [f"{key}={ours.get(key)}" for key in sorted(set(ours) | set(theirs))
               if key not in _NOT_SETTINGS and ours.get(key) != theirs.get(key)]
    return ", ".join(changed) or "–"


def run_row(run_dir: Path) -> dict[str, str]:
    """One table row; runs without an evaluation show their progress instead of a test figure."""
    run = RunDir(run_dir)
    config = run.load_config()
    state = run.read_state()
    metrics_path = run.metrics
    epochs = f"{state.get('epoch', 0)}/{config.total_epochs}"
    if state.get("stopped_early_at"):
        epochs += f" (early stop, best {state.get('best_epoch')})"
    if metrics_path.exists() and state.get("finished"):
        metrics = json.loads(metrics_path.read_text())
        accuracy = _percent(metrics["test_accuracy"])
    else:
        best = state.get("best_value")
        accuracy = "training" + (f" (best {config.monitor} {best:.4f})" if best is not None else "")
    return {
        "recipe": config.name,
        "model": config.model,
        "epochs": epochs,
        "time": _duration(state.get("train_seconds")),
        "accuracy": accuracy,
        "course": _percent(config.course_accuracy),
        "run": run_dir.name,
        "changes": changes_from_recipe(config),
    }


def results_table(runs_root: str | Path) -> str:
    root = Path(runs_root)
    if not root.is_dir():
        raise RunError(f"{root} is not a folder of run directories.")
    rows = [run_row(path.parent) for path in sorted(root.glob(f"*/{CONFIG_FILE}"))]
    if not rows:
        raise RunError(f"{root} holds no run directories (folders with a {CONFIG_FILE}).")
    lines = [
        "| recipe | model | epochs | training time | test accuracy | course | run | changes from the recipe |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['model']} | {row['epochs']} | {row['time']} | "
                     f"{row['accuracy']} | {row['course']} | {row['run']} | {row['changes']} |")
    return "\n".join(lines)
