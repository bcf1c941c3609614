"""Training runs end to end on small real subsets: artefacts, resume, early stopping, CLI errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processes import kill_when

from cnnkit.errors import ConfigError, RunError
from cnnkit.training.config import config_from_dict
from cnnkit.training.rundir import read_state
from cnnkit.training.train import configure_devices, train

pytestmark = pytest.mark.data

REPOSITORY = Path(__file__).resolve().parents[2]


def tiny_recipe(**changes):
    values = {
        "name": "tiny_lenet5",
        "dataset": "mnist",
        "model": "lenet5",
        "channels": 1,
        "validation_size": 500,
        "train_limit": 2000,
        "test_limit": 500,
        "epochs": 2,
        "batch_size": 64,
        "optimizer": "adam",
        "learning_rate": 0.003,
        "course_accuracy": 0.993,
    }
    values.update(changes)
    return config_from_dict(values)


def history_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def cli(*arguments, env=None, timeout=600):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "cnnkit", *arguments], capture_output=True,
                          text=True, env=environment, timeout=timeout, cwd=REPOSITORY)


def test_cpu_keeps_the_default_strategy_and_float32():
    import keras
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("This check is about CPU-only machines.")
    strategy = configure_devices()
    assert strategy.num_replicas_in_sync == 1
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = tiny_recipe(augmentation={"rotation": 0.02, "translation": 0.05})
    train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0)
    return run_dir


def test_short_training_run_beats_chance_and_writes_every_artefact(finished_run):
    for name in ("config.yaml", "data.json", "state.json", "best.keras", "last.keras",
                 "history.csv", "model.keras"):
        assert (finished_run / name).is_file(), name
    assert any((finished_run / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((finished_run / "evaluation" / "metrics.json").read_text())
    assert metrics["test_images"] == 500
    assert metrics["test_accuracy"] > 0.6  # chance is 0.1
    assert metrics["epochs_trained"] == 2 and metrics["parameters"] == 61706
    assert len(metrics["per_class"]) == 10
    assert np.asarray(metrics["confusion_matrix"]).sum() == 500
    for picture in ("confusion_matrix.png", "curves.png", "misclassified.png", "summary.png"):
        with Image.open(finished_run / "evaluation" / picture) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    # The contact sheet holds the curves, the matrix and a row of images: wide and tall.
    with Image.open(finished_run / "evaluation" / "summary.png") as sheet:
        assert sheet.size[0] > 1200 and sheet.size[1] > 700
    report = (finished_run / "evaluation" / "report.md").read_text()
    assert "![summary](summary.png)" in report
    assert "test accuracy" in report.lower() and "| 9 |" in report
    assert history_epochs(finished_run) == [0, 1]
    data_summary = json.loads((finished_run / "data.json").read_text())
    assert (data_summary["train"], data_summary["validation"], data_summary["test"]) == (2000, 500, 500)
    # No temporary files are left behind by the atomic writes.
    assert not list(finished_run.rglob(".*.tmp*"))


def test_evaluate_command_rewrites_the_same_figures(finished_run, data_root):
    before = json.loads((finished_run / "evaluation" / "metrics.json").read_text())
    (finished_run / "evaluation" / "metrics.json").unlink()
    result = cli("evaluate", str(finished_run), "--data-dir", str(data_root))
    assert result.returncode == 0, result.stderr
    after = json.loads((finished_run / "evaluation" / "metrics.json").read_text())
    assert after["test_accuracy"] == pytest.approx(before["test_accuracy"], abs=1e-6)
    assert "test accuracy" in result.stderr


def test_test_time_flip_averages_each_image_with_its_mirror_image(finished_run, data_root, tmp_path):
    from cnnkit.training.evaluate import predict_probabilities
    from cnnkit.training.rundir import load_run_model

    model = load_run_model(finished_run / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    plain = predict_probabilities(model, images)
    mirrored = predict_probabilities(model, images[:, :, ::-1])
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the digits model is not mirror-symmetric
    np.testing.assert_allclose(predict_probabilities(model, images, flip=True), (plain + mirrored) / 2,
                               atol=1e-6)

    # The command-line switch overrides the recipe's setting and the metrics say which was used.
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = cli("evaluate", str(run), "--data-dir", str(data_root), "--test-time-flip")
    assert result.returncode == 0, result.stderr
    assert "(test-time flip)" in result.stderr
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["test_time_flip"] is True and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert json.loads((finished_run / "evaluation" / "metrics.json").read_text())["test_time_flip"] is False


def test_feature_map_command_writes_a_grid(finished_run, tmp_path):
    image = tmp_path / "seven.png"
    Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))).save(image)
    result = cli("feature-maps", str(finished_run), str(image), "--layer", "conv1",
                 "--out", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "maps" / "seven_conv1.png"
    assert result.stdout.strip() == str(written)
    with Image.open(written) as grid:
        assert grid.mode == "RGB" and grid.size[0] > grid.size[1]  # six channels in one row

    missing = cli("feature-maps", str(finished_run), str(image), "--layer", "no_such_layer")
    assert missing.returncode == 2 and "no feature layer no_such_layer" in missing.stderr


def test_resume_continues_from_the_saved_epoch_with_its_optimizer(tmp_path, data_root):
    run_dir = tmp_path / "run"
    train(tiny_recipe(epochs=1), run_dir=run_dir, data_dir=data_root, verbose=0, evaluate=False)
    assert read_state(run_dir)["epoch"] == 1
    import keras

    steps = int(keras.models.load_model(run_dir / "last.keras").optimizer.iterations.numpy())
    assert steps == 2000 // 64 + 1

    train(run_dir=run_dir, data_dir=data_root, resume=True, epochs=3, verbose=0, evaluate=False)
    state = read_state(run_dir)
    assert state["epoch"] == 3 and state["finished"]
    assert history_epochs(run_dir) == [0, 1, 2]
    resumed = keras.models.load_model(run_dir / "last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 3 * steps


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_weight_decay_shrinks_every_weight_by_rate_times_decay(optimizer):
    import keras

    from cnnkit.training.train import compile_model

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    compile_model(model, optimizer, 0.1, weight_decay=0.2)
    before = [keras.ops.convert_to_numpy(variable) for variable in model.trainable_variables]
    # With zero gradients the only change is the decoupled decay: w <- w * (1 - rate * decay).
    model.optimizer.apply_gradients(
        [(keras.ops.zeros_like(variable), variable) for variable in model.trainable_variables]
    )
    for old, variable in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), old * (1 - 0.1 * 0.2), rtol=1e-6)

    compile_model(model, optimizer, 0.1)
    assert model.optimizer.weight_decay is None


def test_weight_decay_of_a_recipe_survives_resume(tmp_path, data_root):
    import keras

    run_dir = tmp_path / "run"
    train(tiny_recipe(epochs=1, weight_decay=0.01), run_dir=run_dir, data_dir=data_root, verbose=0,
          evaluate=False)
    assert keras.models.load_model(run_dir / "last.keras").optimizer.weight_decay == pytest.approx(0.01)
    train(run_dir=run_dir, data_dir=data_root, resume=True, epochs=2, verbose=0, evaluate=False)
    resumed = keras.models.load_model(run_dir / "last.keras")
    assert resumed.optimizer.weight_decay == pytest.approx(0.01)
    assert read_state(run_dir)["epoch"] == 2


def test_a_killed_run_resumes_where_its_last_checkpoint_left_off(tmp_path, data_root):
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(
        "name: slow\ndataset: mnist\nmodel: lenet5\nchannels: 1\nvalidation_size: 500\n"
        "train_limit: 3000\ntest_limit: 200\nepochs: 30\nbatch_size: 32\n"
    )
    run_dir = tmp_path / "run"
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CNNKIT_DATA_DIR=str(data_root))
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "train", str(recipe), "--output", str(run_dir)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPOSITORY,
    )
    kill_when(process, lambda: (run_dir / "state.json").exists() and read_state(run_dir).get("epoch", 0) >= 1)
    killed_at = read_state(run_dir)["epoch"]
    assert 1 <= killed_at < 30

    result = cli("train", "--resume", "--output", str(run_dir), "--epochs", str(killed_at + 1),
                 "--no-evaluate", env={"CNNKIT_DATA_DIR": str(data_root)})
    assert result.returncode == 0, result.stderr
    assert f"resuming {run_dir} after epoch {killed_at}" in result.stderr
    assert history_epochs(run_dir) == list(range(killed_at + 1))
    assert read_state(run_dir)["epoch"] == killed_at + 1


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path, data_root):
    import keras

    run_dir = tmp_path / "run"
    # A learning rate this small leaves the validation accuracy unchanged after epoch 1.
    recipe = tiny_recipe(epochs=6, optimizer="sgd", learning_rate=1e-12, early_stopping_patience=2)
    train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0, evaluate=False)
    state = read_state(run_dir)
    assert state["stopped_early_at"] == 3
    assert state["best_epoch"] == 1
    assert history_epochs(run_dir) == [0, 1, 2]
    best = keras.models.load_model(run_dir / "best.keras")
    final = keras.models.load_model(run_dir / "model.keras")
    for expected, actual in zip(best.get_weights(), final.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, actual)


def test_transfer_learning_runs_both_phases(tmp_path, data_root):
    run_dir = tmp_path / "vgg"
    recipe = config_from_dict({
        "name": "tiny_vgg", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"weights": "none", "num_classes": 1, "dense_units": 16},
        "image_size": [32, 32], "validation_size": 32, "train_limit": 64, "test_limit": 64,
        "epochs": 1, "batch_size": 32, "optimizer": "rmsprop", "learning_rate": 1e-4,
        "monitor": "val_loss", "fine_tune": {"from_layer": "block5_conv1", "epochs": 1},
    })
    train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0)
    assert history_epochs(run_dir) == [0, 1]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["class_names"] == ["cats", "dogs"] and metrics["test_images"] == 64
    import keras

    model = keras.models.load_model(run_dir / "last.keras")
    assert model.get_layer("block5_conv1").trainable and not model.get_layer("block4_conv3").trainable


def test_init_from_goes_straight_to_fine_tuning_the_source_model(tmp_path, data_root):
    import keras

    from cnnkit.training.models import create_model
    from cnnkit.training.train import initialise_from

    values = {
        "name": "tiny_vgg", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"weights": "none", "num_classes": 1, "dense_units": 16},
        "image_size": [32, 32], "validation_size": 32, "train_limit": 64, "test_limit": 64,
        "epochs": 1, "batch_size": 32, "optimizer": "rmsprop", "learning_rate": 1e-4,
        "monitor": "val_loss",
    }
    source = tmp_path / "frozen"
    train(config_from_dict(values), run_dir=source, data_dir=data_root, verbose=0, evaluate=False)
    with pytest.raises(ConfigError, match="0 is allowed only with init_from and fine_tune"):
        config_from_dict({**values, "epochs": 0, "init_from": str(source)})

    # The loaded weights are the source's, layer for layer.
    fresh = create_model("vgg16_transfer", input_shape=(32, 32, 3), num_classes=1, weights="none", dense_units=16)
    assert initialise_from(fresh, source) == source / "model.keras"
    for expected, actual in zip(keras.models.load_model(source / "model.keras").get_weights(),
                                fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, actual)

    tuned = tmp_path / "tuned"
    recipe = config_from_dict({**values, "epochs": 0, "init_from": str(source),
                               "fine_tune": {"from_layer": "block5_conv1", "epochs": 1}})
    train(recipe, run_dir=tuned, data_dir=data_root, verbose=0, evaluate=False)
    assert history_epochs(tuned) == [0]
    model = keras.models.load_model(tuned / "model.keras")
    assert model.get_layer("block5_conv1").trainable and not model.get_layer("block4_conv3").trainable
    # Phase one was skipped: the frozen layers still hold the source's weights.
    frozen = keras.models.load_model(source / "model.keras")
    np.testing.assert_array_equal(model.get_layer("block1_conv1").get_weights()[0],
                                  frozen.get_layer("block1_conv1").get_weights()[0])


def test_init_from_a_different_architecture_names_the_mismatch(tmp_path, finished_run):
    from cnnkit.training.models import create_model
    from cnnkit.training.train import initialise_from

    with pytest.raises(ConfigError, match="do not fit the model"):
        initialise_from(create_model("lenet5", input_shape=(28, 28, 1), num_classes=5), finished_run)
    with pytest.raises(ConfigError, match="does not exist"):
        initialise_from(create_model("lenet5", input_shape=(28, 28, 1), num_classes=10), tmp_path / "nothing")


def test_label_smoothing_and_warm_up_train_save_and_resume(tmp_path, data_root):
    import keras

    from cnnkit.training.losses import SmoothedSparseCrossentropy
    from cnnkit.training.rundir import load_run_model

    run_dir = tmp_path / "smooth"
    recipe = tiny_recipe(epochs=2, lr_schedule="cosine", warmup_epochs=1, label_smoothing=0.1)
    train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0, evaluate=False)
    model = load_run_model(run_dir / "last.keras")  # the registered loss comes back with it
    assert isinstance(model.loss, SmoothedSparseCrossentropy) and model.loss.label_smoothing == pytest.approx(0.1)
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    steps = 2000 // 64 + 1  # one epoch of warm-up
    assert float(schedule(0)) == 0.0 and float(schedule(steps // 2)) == pytest.approx(0.0015, rel=0.05)
    assert float(schedule(steps)) == pytest.approx(0.003, rel=1e-3) and float(schedule(2 * steps)) < 1e-5
    train(run_dir=run_dir, data_dir=data_root, resume=True, epochs=3, verbose=0, evaluate=False)
    assert history_epochs(run_dir) == [0, 1, 2]


def test_starting_over_an_existing_run_is_refused(finished_run, data_root):
    with pytest.raises(RunError, match="already holds a run: pass --resume"):
        train(tiny_recipe(), run_dir=finished_run, data_dir=data_root, verbose=0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", "no_such_recipe"], "Unknown recipe 'no_such_recipe'"),
        (["train", "--resume"], "--resume needs --output"),
        (["train", "--resume", "--output", "/nonexistent/run"], "not a run directory"),
        (["evaluate", "/nonexistent/run"], "not a run directory"),
        (["train", "mnist_lenet5", "--set", "epochs=zero"], "epochs must be int"),
        (["train", "mnist_lenet5", "--data-dir", "/nonexistent/data"], "does not exist.*prepare.py"),
    ],
)
def test_command_line_errors_are_one_clear_line(arguments, message):
    result = cli(*arguments)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    import re

    assert re.search(f"cnnkit: error: .*{message}", result.stderr), result.stderr


def test_missing_data_leaves_no_run_directory(tmp_path):
    result = cli("train", "mnist_lenet5", "--data-dir", str(tmp_path), "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "mnist.npz is missing" in result.stderr
    assert not (tmp_path / "run").exists()


def test_results_table_names_what_a_run_changed_from_its_recipe(tmp_path):
    from cnnkit.training.config import apply_overrides, load_recipe, save_config
    from cnnkit.training.results import results_table

    shipped = tmp_path / "shipped" / "config.yaml"
    changed = tmp_path / "changed" / "config.yaml"
    for path in (shipped, changed):
        path.parent.mkdir()
    save_config(load_recipe("mnist_lenet5"), shipped)
    save_config(apply_overrides(load_recipe("mnist_lenet5"), ["epochs=3", "augmentation.zoom=0.2",
                                                              "description=mine"]), changed)
    rows = {line.split(" | ")[-2]: line for line in results_table(tmp_path).splitlines()[2:]}
    assert rows["changed"].endswith("| changed | augmentation.zoom=0.2, epochs=3 |")
    assert rows["shipped"].endswith("| shipped | – |")
    assert "| 0/3 |" in rows["changed"] and "training" in rows["changed"]


def test_results_table_lists_finished_runs(finished_run, tmp_path):
    result = cli("results", str(finished_run.parent))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((finished_run / "evaluation" / "metrics.json").read_text())
    row = next(line for line in result.stdout.splitlines() if line.startswith("| tiny_lenet5"))
    assert f"{metrics['test_accuracy'] * 100:.2f}%" in row and "| 2/2 |" in row and "99.30%" in row
    # tiny_lenet5 is no shipped recipe; the run's folder is named.
    assert row.endswith("| tiny | own recipe |")
    empty = cli("results", str(tmp_path))
    assert empty.returncode == 2 and "holds no run directories" in empty.stderr
