"""Export: layout, signatures, ONNX, parity, metadata and hashes, versions, atomicity, BentoML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import kill_when

from cnnkit.repository import RepositoryError, open_version, scan_repository, sha256_file
from cnnkit.training.config import config_from_dict
from cnnkit.training.export import ExportError, accuracy_batch_size, export_run, onnx_accuracy
from cnnkit.training.train import train

pytestmark = pytest.mark.data

REPOSITORY = Path(__file__).resolve().parents[2]


def _environment(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BENTOML_DO_NOT_TRACK="True", **extra)


@pytest.fixture(scope="module")
def digits_run(tiny_digits_run):
    return tiny_digits_run


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("runs") / "vgg"
    recipe = config_from_dict({
        "name": "tiny_vgg", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"weights": "none", "num_classes": 1, "dense_units": 8},
        "image_size": [32, 32], "validation_size": 32, "train_limit": 64, "test_limit": 100,
        "epochs": 1, "batch_size": 32, "optimizer": "rmsprop", "learning_rate": 1e-5,
        "monitor": "val_loss",
    })
    return train(recipe, run_dir=run_dir, data_dir=data_root, verbose=0)


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory, data_root):
    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    return export_run(digits_run, repository=repository, data_dir=data_root)


def test_layout_is_tf_serving_with_extras_beside_it(exported):
    version_dir = exported.path
    assert version_dir.name == "1" and version_dir.parent.name == "tiny_digits"
    for relative in ("saved_model.pb", "variables/variables.index", "assets.extra/model.onnx",
                     "assets.extra/metadata.json"):
        assert (version_dir / relative).is_file(), relative
    config = (version_dir.parents[1] / "models.config").read_text()
    assert "name: 'tiny_digits'" in config and "base_path: 'tiny_digits'" in config  # movable
    # Readable by other users (a container's user, a stock TF Serving), not the 0600 of temporary files.
    for path in [version_dir.parents[1] / "models.config", version_dir, *version_dir.rglob("*")]:
        assert path.stat().st_mode & 0o044 == 0o044, path
        if path.is_dir():
            assert path.stat().st_mode & 0o055 == 0o055, path
    # Nothing but the repository itself is left beside it (the staging folder is gone).
    assert [entry.name for entry in version_dir.parents[2].iterdir()] == ["model_repository"]


def test_saved_model_signatures_have_our_names(exported):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported.path))
    assert set(loaded.signatures) == {"serving_default", "feature_maps", "gradcam", "filter_responses"}
    responses = loaded.signatures["filter_responses"]
    assert set(responses.structured_outputs) == {"conv1", "conv2", "conv3"}  # LeNet-5's convolutions
    metadata = exported.metadata
    assert metadata["explain"]["filter_responses_signature"] == "filter_responses"
    assert metadata["verification"]["filter_responses"]["max_difference_in_tolerances"] <= 1.0
    gradcam = loaded.signatures["gradcam"]
    assert set(gradcam.structured_input_signature[1]) == {"class_index", "image"}
    assert set(gradcam.structured_outputs) == {"heatmap", "coarse_heatmap", "class_index", "probabilities"}
    serving = loaded.signatures["serving_default"]
    assert list(serving.structured_input_signature[1]) == ["image"]
    assert set(serving.structured_outputs) == {"probabilities", "top_class"}
    layers = [layer["name"] for layer in exported.metadata["feature_layers"]]
    assert set(loaded.signatures["feature_maps"].structured_outputs) == set(layers)
    # Any batch size works, and probabilities sum to one.
    for batch in (1, 5):
        result = serving(image=tf.zeros((batch, 28, 28, 1)))
        assert result["probabilities"].shape == (batch, 10)
        np.testing.assert_allclose(result["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)


def test_onnx_graph_is_valid_and_carries_the_same_outputs(exported):
    import onnx
    import onnxruntime

    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) <= 18
    session = onnxruntime.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    layers = [layer["name"] for layer in exported.metadata["feature_layers"]]
    assert {output.name for output in session.get_outputs()} == {"probabilities", "top_class", *layers}
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape == ["batch", 28, 28, 1]
    probabilities, top = session.run(["probabilities", "top_class"],
                                     {"image": np.zeros((3, 28, 28, 1), np.float32)})
    assert probabilities.shape == (3, 10) and top.shape == (3,)


def test_metadata_records_classes_input_layers_run_checks_and_hashes(exported, digits_run):
    metadata = json.loads((exported.path / "assets.extra" / "metadata.json").read_text())
    assert metadata["name"] == "tiny_digits" and metadata["version"] == 1
    assert metadata["class_names"] == [str(digit) for digit in range(10)]
    assert metadata["input"]["shape"] == [28, 28, 1] and metadata["input"]["dtype"] == "float32"
    assert "1/255" in metadata["preprocessing"]
    assert [layer["name"] for layer in metadata["feature_layers"]] == [
        "conv1", "pool1", "conv2", "pool2", "conv3"]
    assert metadata["feature_layers"][0]["output_shape"] == [28, 28, 6]
    run_metrics = json.loads((digits_run / "evaluation" / "metrics.json").read_text())
    assert metadata["training"]["test_accuracy"] == run_metrics["test_accuracy"]
    assert metadata["training"]["recipe"]["name"] == "tiny_digits"
    parity = metadata["verification"]["parity"]
    assert parity["images"] == 32 and parity["identical_top1"] and parity["max_difference"] <= 1e-4
    assert set(parity["outputs"]) == {"probabilities", "conv1", "pool1", "conv2", "pool2", "conv3"}
    accuracy = metadata["verification"]["test_accuracy"]
    assert accuracy["images"] == 300 and abs(accuracy["onnx"] - accuracy["run"]) <= 0.001
    assert accuracy["batch_size"] == 256  # 18 KiB of activations an image: the cap, not the budget
    assert len(metadata["source"]["commit"]) == 40
    assert set(metadata["files"]) >= {"saved_model.pb", "assets.extra/model.onnx"}
    for relative, digest in metadata["files"].items():
        assert sha256_file(exported.path / relative) == digest


def test_the_accuracy_check_batches_by_activation_size_with_the_same_answer(exported):
    # VGG16 at 224x224: block1's 224x224x64 float32 activations are 12.25 MiB an image.
    vgg16_224 = [(224, 224, 3), (224, 224, 64), (112, 112, 128), (14, 14, 512)]
    assert accuracy_batch_size(vgg16_224) == 20
    assert accuracy_batch_size(vgg16_224, budget_bytes=1) == 1
    assert accuracy_batch_size([(28, 28, 6)]) == 256
    # The batch size does not change the answer.
    onnx_path = exported.path / "assets.extra" / "model.onnx"
    images = np.random.default_rng(0).uniform(0, 255, (50, 28, 28, 1)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 50)
    assert onnx_accuracy(onnx_path, images, labels, batch_size=7) == onnx_accuracy(onnx_path, images, labels)


def test_versions_increase_and_earlier_ones_stay_untouched(exported, digits_run, data_root):
    before = open_version(exported.path.parents[1], "tiny_digits", 1).metadata["files"]
    second = export_run(digits_run, repository=exported.path.parents[1], data_dir=data_root,
                        check_accuracy=False)
    assert second.version == 2 and second.path.name == "2"
    assert scan_repository(exported.path.parents[1]) == {"tiny_digits": [1, 2]}
    assert open_version(exported.path.parents[1], "tiny_digits").version == 2
    assert open_version(exported.path.parents[1], "tiny_digits", 1).metadata["files"] == before


def test_parity_tolerance_scales_with_each_outputs_magnitude():
    """VGG16 with ImageNet weights has feature maps in the thousands, where float32 rounding alone
    differs by 0.005 between Keras and ONNX Runtime: 1e-4 absolute failed its export."""
    from cnnkit.training.export import allowed_difference

    assert allowed_difference(np.asarray([0.2, 0.9])) == pytest.approx(1e-4)  # probabilities
    assert allowed_difference(np.asarray([[-2000.0, 5.0]])) == pytest.approx(0.2)
    assert allowed_difference(np.zeros((0, 3))) == pytest.approx(1e-4)
    # float32 sums of thousands of large terms, in two orders, stay within it.
    terms = np.random.default_rng(0).normal(0, 30, (64, 4608)).astype(np.float32)
    forward = terms.sum(axis=1, dtype=np.float32)
    backward = terms[:, ::-1].cumsum(axis=1, dtype=np.float32)[:, -1]
    assert np.abs(forward - backward).max() <= allowed_difference(forward)


def test_a_failed_verification_leaves_nothing_behind(digits_run, tmp_path, data_root, monkeypatch):
    import cnnkit.training.export

    monkeypatch.setattr(cnnkit.training.export, "PARITY_TOLERANCE", -1.0)
    repository = tmp_path / "model_repository"
    with pytest.raises(ExportError, match="Export verification failed"):
        export_run(digits_run, repository=repository, data_dir=data_root, check_accuracy=False)
    assert scan_repository(repository) == {}
    assert [entry.name for entry in tmp_path.iterdir()] in ([], ["model_repository"])
    assert not (repository / "models.config").exists()


def test_a_run_trained_with_mixed_precision_exports_in_float32(tmp_path, data_root):
    """GPU training uses mixed_float16, and the saved model keeps that policy in its layers."""
    import keras
    import onnx

    recipe = config_from_dict({
        "name": "tiny_mixed", "dataset": "mnist", "model": "mnist_convnet", "channels": 1,
        "validation_size": 200, "train_limit": 500, "test_limit": 200, "epochs": 1,
        "batch_size": 64,
    })
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        run_dir = train(recipe, run_dir=tmp_path / "run", data_dir=data_root, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    saved = keras.models.load_model(run_dir / "model.keras")
    assert saved.get_layer("conv1").dtype_policy.name == "mixed_float16"

    version = export_run(run_dir, repository=tmp_path / "repo", data_dir=data_root,
                         check_accuracy=False)
    assert version.metadata["verification"]["parity"]["max_difference"] < 1e-4
    # The float32 export keeps the trained weights: it predicts what the float16 model predicts.
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1)).astype("float32")
    exported_probabilities = tf.saved_model.load(str(version.path)).signatures["serving_default"](
        image=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(exported_probabilities, np.asarray(saved(images), dtype="float32"), atol=1e-2)
    graph = onnx.load(str(version.path / "assets.extra" / "model.onnx")).graph
    float16 = onnx.TensorProto.FLOAT16
    assert not [node.name for node in graph.node
                if any(attribute.name == "to" and attribute.i == float16 for attribute in node.attribute)]


def test_vgg_style_binary_model_exports_two_column_probabilities(vgg_run, tmp_path, data_root):
    version = export_run(vgg_run, repository=tmp_path / "repo", data_dir=data_root)
    metadata = version.metadata
    assert metadata["class_names"] == ["cats", "dogs"] and metadata["sigmoid_output"]
    assert "VGG16" in metadata["preprocessing"]
    assert len(metadata["feature_layers"]) == 18  # 13 convolutions and 5 poolings
    import onnxruntime

    session = onnxruntime.InferenceSession(str(version.onnx_path), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.float32)
    probabilities, top, block5 = session.run(["probabilities", "top_class", "block5_pool"],
                                             {"image": pixels})
    assert probabilities.shape == (4, 2) and block5.shape == (4, 1, 1, 512)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(top, probabilities.argmax(axis=1))


def test_a_changed_file_makes_the_loader_refuse_the_version(exported, tmp_path):
    import shutil

    repository = tmp_path / "copy"
    shutil.copytree(exported.path.parents[1], repository)
    version_dir = repository / "tiny_digits" / "1"
    assert open_version(repository, "tiny_digits", 1).version == 1
    variables = version_dir / "variables" / "variables.data-00000-of-00001"
    content = bytearray(variables.read_bytes())
    content[len(content) // 2] ^= 0xFF
    variables.write_bytes(bytes(content))
    with pytest.raises(RepositoryError, match="variables.data-00000-of-00001 has sha256 .* refusing"):
        open_version(repository, "tiny_digits", 1)
    (version_dir / "assets.extra" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match="missing file.*model.onnx"):
        open_version(repository, "tiny_digits", 1)
    with pytest.raises(RepositoryError, match="no version 7; versions: 1, 2|no version 7; versions: 1"):
        open_version(repository, "tiny_digits", 7)
    with pytest.raises(RepositoryError, match="No model 'nope'.*tiny_digits"):
        open_version(repository, "nope")


def _snapshot(repository: Path) -> dict[str, str]:
    return {str(path.relative_to(repository)): sha256_file(path)
            for path in sorted(repository.rglob("*")) if path.is_file()}


def test_killing_an_export_leaves_the_repository_as_it_was(exported, digits_run, tmp_path, data_root):
    import shutil

    repository = tmp_path / "model_repository"
    shutil.copytree(exported.path.parents[1], repository)
    before = _snapshot(repository)
    # Wait until the export has staged files (the staging folder appears beside the repository),
    # then kill it; once more a little later, while it converts or verifies.
    for extra_delay in (0.0, 3.0):
        process = subprocess.Popen(
            [sys.executable, "-m", "cnnkit", "export", str(digits_run), "--repository",
             str(repository), "--data-dir", str(data_root)],
            env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPOSITORY,
        )
        kill_when(process, lambda: any(entry.name.startswith(".model_repository.staging-")
                                       for entry in tmp_path.iterdir()), delay=extra_delay)
        assert _snapshot(repository) == before
    # The next export sweeps the dead exports' staging folders and takes the next version.
    version = export_run(digits_run, repository=repository, data_dir=data_root, check_accuracy=False)
    assert version.version == max(scan_repository(repository)["tiny_digits"])
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model_repository"]


def test_export_command_imports_into_the_bentoml_store(digits_run, tmp_path, data_root):
    bentoml_home = tmp_path / "bentoml"
    environment = _environment(BENTOML_HOME=str(bentoml_home))
    result = subprocess.run(
        [sys.executable, "-m", "cnnkit", "export", str(digits_run), "--name", "digits",
         "--repository", str(tmp_path / "repo"), "--data-dir", str(data_root), "--bentoml"],
        env=environment, capture_output=True, text=True, timeout=600, cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("digits/1")
    assert "imported into the BentoML model store as digits:1" in result.stderr
    listing = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "models", "list",
                              "-o", "json"], env=environment, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    models = json.loads(listing.stdout)
    assert [model["tag"] for model in models] == ["digits:1"]
    code = ("from cnnkit.bento import open_bento_model\n"
            "v = open_bento_model('digits:1')\nprint(v.metadata['class_names'][3], v.version)\n")
    opened = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert opened.returncode == 0 and opened.stdout.split() == ["3", "1"], opened.stderr
    info = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "models", "get", "digits:1",
                           "-o", "json"], env=environment, capture_output=True, text=True, timeout=300)
    labels = json.loads(info.stdout)["labels"]
    assert labels["dataset"] == "mnist" and labels["recipe"] == "tiny_digits"

    # The project's bentofile builds offline (lock_packages: false) with the stored model inside;
    # a minimal service stands in for serving/ here, with the project's build options unchanged.
    build = tmp_path / "build"
    build.mkdir()
    bentofile = (REPOSITORY / "bentofile.yaml").read_text()
    assert "lock_packages: false" in bentofile
    bentofile = bentofile.replace('"cnnkit.serving.http.service:Classifier"', '"minimal_service:Minimal"')
    (build / "bentofile.yaml").write_text(bentofile)
    (build / "minimal_service.py").write_text(
        "import bentoml\n\n\n@bentoml.service\nclass Minimal:\n"
        "    model = bentoml.models.BentoModel('digits:1')\n\n"
        "    @bentoml.api\n    def ping(self) -> str:\n        return 'pong'\n"
    )
    built = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build"], cwd=build,
                           env=environment, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    bento = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "get", "cnnkit:latest",
                            "-o", "json"], env=environment, capture_output=True, text=True, timeout=300)
    described = json.loads(bento.stdout)
    assert described["service"] == "minimal_service:Minimal"
    assert [model["tag"] for model in described["services"][0]["models"]] == ["digits:1"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["export", "/nonexistent/run"], "is not a run directory"),
    ],
)
def test_export_command_errors(arguments, message):
    result = subprocess.run([sys.executable, "-m", "cnnkit", *arguments], env=_environment(),
                            capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert result.returncode == 2 and message in result.stderr


def test_unfinished_run_and_bad_names_are_refused(digits_run, tmp_path):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(digits_run, unfinished)
    (unfinished / "model.keras").unlink()
    with pytest.raises(ExportError, match="has no model.keras: finish the run first"):
        export_run(unfinished, repository=tmp_path / "repo")
    with pytest.raises(ExportError, match="Model name 'Bad Name!' must be"):
        export_run(digits_run, name="Bad Name!", repository=tmp_path / "repo")
