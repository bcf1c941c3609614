"""RunDir: the names of a run directory's files, its checks and its state file, without data or TensorFlow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cnnkit.errors import ExportError, RunError
from cnnkit.training.config import config_from_dict, save_config
from cnnkit.training.rundir import RunDir, read_state

TRAINING = Path(__file__).resolve().parents[2] / "cnnkit" / "training"


def make_run(folder: Path) -> RunDir:
    """A run directory with nothing but its config.yaml, as training leaves it before the first epoch."""
    run = RunDir(folder)
    save_config(config_from_dict({"name": "tiny", "dataset": "mnist", "model": "lenet5", "channels": 1}),
                run.config)
    return run


def test_paths_name_the_files_of_the_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.path == tmp_path / "run"
    assert {
        "config": run.config, "data_summary": run.data_summary, "state": run.state, "last": run.last,
        "best": run.best, "history": run.history, "tensorboard": run.tensorboard, "model": run.model,
        "evaluation": run.evaluation, "metrics": run.metrics,
    } == {
        "config": tmp_path / "run" / "config.yaml",
        "data_summary": tmp_path / "run" / "data.json",
        "state": tmp_path / "run" / "state.json",
        "last": tmp_path / "run" / "last.keras",
        "best": tmp_path / "run" / "best.keras",
        "history": tmp_path / "run" / "history.csv",
        "tensorboard": tmp_path / "run" / "tensorboard",
        "model": tmp_path / "run" / "model.keras",
        "evaluation": tmp_path / "run" / "evaluation",
        "metrics": tmp_path / "run" / "evaluation" / "metrics.json",
    }
    assert not (tmp_path / "run").exists(), "building a RunDir must not touch the disk"


def test_a_run_dir_takes_strings_and_behaves_as_its_path(tmp_path):
    run = RunDir(str(tmp_path))
    assert run == RunDir(tmp_path) and hash(run) == hash(RunDir(tmp_path))
    assert str(run) == str(tmp_path)
    assert Path(run) == tmp_path
    assert repr(run) == f"RunDir({str(tmp_path)!r})"


def test_only_a_folder_with_a_config_is_a_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.exists() and not run.is_run()
    run.path.mkdir()
    assert run.exists() and not run.is_run()
    run.config.mkdir()
    assert not run.is_run(), "a folder named config.yaml is not a configuration"
    run.config.rmdir()
    make_run(run.path)
    assert run.is_run()
    assert run.require_run() is run
    assert run.load_config().name == "tiny"


def test_state_round_trip_is_atomic(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_state() == {}
    run.write_state({"epoch": 1, "best_value": 0.5})
    run.write_state({"epoch": 2, "best_value": 0.25, "finished": "2024-01-01T00:00:00"})
    assert run.read_state() == {"epoch": 2, "best_value": 0.25, "finished": "2024-01-01T00:00:00"}
    assert read_state(tmp_path) == run.read_state()
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]


def test_a_corrupt_state_file_is_a_run_error(tmp_path):
    run = RunDir(tmp_path)
    run.state.write_text('{"epoch": 1')
    with pytest.raises(RunError, match=r"state\.json is corrupt \("):
        run.read_state()


def test_a_folder_without_config_is_refused_with_the_run_error_message(tmp_path):
    run = RunDir(tmp_path / "missing")
    with pytest.raises(RunError) as caught:
        run.require_run()
    assert str(caught.value) == f"{tmp_path / 'missing'} is not a run directory (no config.yaml)."
    with pytest.raises(ExportError, match=r"is not a run directory \(no config\.yaml\)\.$"):
        run.require_run(ExportError)


def test_an_unfinished_run_is_refused_with_the_resume_hint(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(RunError) as caught:
        run.require_model()
    assert str(caught.value) == (
        f"{tmp_path} has no model.keras: the run has not finished. Resume it with "
        f"`cnnkit train --resume --output {tmp_path}`."
    )
    run.model.write_bytes(b"a model")
    assert run.require_model() == tmp_path / "model.keras"


def test_evaluation_refuses_a_run_without_a_model_before_loading_anything(tmp_path):
    from cnnkit.training.evaluate import evaluate_run

    with pytest.raises(RunError, match="is not a run directory"):
        evaluate_run(tmp_path / "missing")
    make_run(tmp_path)
    with pytest.raises(RunError, match="has no model.keras: the run has not finished"):
        evaluate_run(tmp_path)


def _imported_modules(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["evaluate", "export", "explain", "feature_maps", "results", "rundir", "data"])
def test_readers_of_a_run_do_not_import_training(module):
    assert "cnnkit.training.train" not in _imported_modules(TRAINING / f"{module}.py")


def test_rundir_imports_no_tensorflow_at_module_level():
    imported = _imported_modules(TRAINING / "rundir.py", module_level_only=True)
    assert not {name for name in imported if name.split(".")[0] in ("keras", "tensorflow")}
