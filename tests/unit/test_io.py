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
