"""``cnnkit train --distributed``: two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy,
against a one-worker run, and a killed cluster resumed from its last completed epoch."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cnnkit.errors import RunError
from cnnkit.training.distributed import cluster_place

pytestmark = pytest.mark.data

RECIPE = {"name": "tiny_digits", "dataset": "mnist", "model": "lenet5", "channels": 1, "validation_size": 500,
          "train_limit": 4000, "test_limit": 1000, "epochs": 2, "batch_size": 64, "learning_rate": 0.003}


def _ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for item in sockets:
        item.bind(("127.0.0.1", 0))
    ports = [item.getsockname()[1] for item in sockets]
    for item in sockets:
        item.close()
    return ports


def _start_workers(arguments: list[str], data_root: Path, logs: Path) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _ports(2)]}
    processes = []
    for index in range(2):
        environment = dict(os.environ, CNNKIT_DATA_DIR=str(data_root), TF_CPP_MIN_LOG_LEVEL="2",
                           TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(logs / f"worker-{index}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *arguments, "--distributed"],
                                          env=environment, stdout=log, stderr=subprocess.STDOUT))
    return processes


def _accuracy(run: Path) -> float:
    return json.loads((run / "evaluation" / "metrics.json").read_text())["test_accuracy"]


def _epochs(run: Path) -> list[int]:
    with open(run / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_two_workers_train_like_one(tmp_path, data_root):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    workers = _start_workers([str(recipe), "--output", str(tmp_path / "two")], data_root, tmp_path)
    for process in workers:
        assert process.wait(timeout=600) == 0, [log.read_text()[-3000:] for log in tmp_path.glob("worker-*.log")]
    single = subprocess.run([sys.executable, "-m", "cnnkit", "train", str(recipe), "--output", str(tmp_path / "one")],
                            env=dict(os.environ, CNNKIT_DATA_DIR=str(data_root)), capture_output=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    assert _epochs(tmp_path / "two") == [0, 1]
    assert abs(_accuracy(tmp_path / "two") - _accuracy(tmp_path / "one")) <= 0.01
    assert _accuracy(tmp_path / "two") > 0.85
    # Only the chief wrote: one run directory, no worker leftovers.
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["one", "two"]


def test_a_killed_cluster_resumes_from_its_last_epoch(tmp_path, data_root):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "epochs": 4, "train_limit": 6000}))
    run = tmp_path / "run"
    workers = _start_workers([str(recipe), "--output", str(run)], data_root, tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = run / "state.json"
        if state.exists() and json.loads(state.read_text()).get("epoch", 0) >= 1:
            break
        assert all(process.poll() is None for process in workers), "a worker ended before the first epoch"
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGKILL)  # one machine lost mid-run; the chief cannot go on alone
    workers[0].send_signal(signal.SIGKILL)
    for process in workers:
        process.wait(timeout=60)
    done = json.loads((run / "state.json").read_text())["epoch"]
    assert 1 <= done < 4 and "finished" not in json.loads((run / "state.json").read_text())
    restarted = _start_workers(["--resume", "--output", str(run)], data_root, tmp_path)
    for process in restarted:
        assert process.wait(timeout=600) == 0, [log.read_text()[-3000:] for log in tmp_path.glob("worker-*.log")]
    assert _epochs(run) == [0, 1, 2, 3]
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 4 and state["finished"]
    assert _accuracy(run) > 0.85


def test_tf_config_is_checked():
    with pytest.raises(RunError, match="--distributed needs TF_CONFIG"):
        cluster_place({})
    with pytest.raises(RunError, match="not a cluster description"):
        cluster_place({"TF_CONFIG": "{nope"})
    with pytest.raises(RunError, match="type 'ps'"):
        cluster_place({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}})})
    place = cluster_place({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                    "task": {"type": "worker", "index": 1}})})
    assert place.workers == 2 and not place.is_chief
