"""Atomic writes: a failed write never replaces or corrupts the file that was there."""

from __future__ import annotations

import json

import pytest

from cnnkit.io import atomic_save, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_the_whole_file(tmp_path):
    target = tmp_path / "deep" / "metrics.json"
    atomic_write_json(target, {"accuracy": 0.5})
    atomic_write_json(target, {"accuracy": 0.75})
    assert json.loads(target.read_text()) == {"accuracy": 0.75}
    assert [path.name for path in target.parent.iterdir()] == ["metrics.json"]


def test_a_failing_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.keras"
    atomic_write_text(target, "previous model")

    def crash_half_way(path):
        path.write_text("half a model")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(target, crash_half_way)
    assert target.read_text() == "previous model"
    assert [path.name for path in tmp_path.iterdir()] == ["model.keras"]


def test_atomic_writes_are_readable_by_others_like_ordinary_files(tmp_path):
    """A temporary file is created 0600; the written file must not keep that (other users, TF Serving)."""
    from cnnkit.io import FILE_MODE, atomic_write_text, make_readable

    atomic_write_text(tmp_path / "results.json", "{}")
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == FILE_MODE
    assert FILE_MODE & 0o044 == 0o044  # under the usual umask
    private = tmp_path / "tree"
    (private / "inner").mkdir(parents=True)
    (private / "inner" / "file").write_text("x")
    for path in (private, private / "inner", private / "inner" / "file"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    make_readable(private)
    assert (private / "inner").stat().st_mode & 0o055 == 0o055
    assert (private / "inner" / "file").stat().st_mode & 0o044 == 0o044


def test_models_config_paths_are_relative_or_under_the_mount_point(tmp_path):
    from cnnkit.repository import models_config_text

    (tmp_path / "digits" / "1").mkdir(parents=True)
    assert "base_path: 'digits'" in models_config_text(tmp_path)
    assert "base_path: '/models/digits'" in models_config_text(tmp_path, "/models/")
