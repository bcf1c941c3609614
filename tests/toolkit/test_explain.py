"""Grad-CAM and filter patterns in the toolkit: the checks, both sources, the pictures and the commands."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main as cli_main
from cnnkit.errors import ExplainError
from cnnkit.explain import (
    GradCamGraph,
    SavedModelExplainer,
    check_conv_layer,
    check_filters,
    is_dead,
    parse_filters,
    resolve_class,
)
from cnnkit.pictures import heatmap_overlay, pattern_grid
from cnnkit.training.explain import KerasExplainer, open_explainer

BLOB = (slice(2, 6), slice(10, 14))  # rows 2..5, columns 10..13 of a 16x16 image


def blob_model(binary: bool = False):
    """A 16x16 grey model with hand-set weights: ``blob`` when the image has a bright patch.

    conv1 channel 0 averages brightness, conv2 channel 0 passes it on (channel 1 stays silent and
    the other channels are random), global average pooling, and a head that votes "blob" for
    brightness. Grad-CAM for "blob" must light up where the patch is.
    """
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    units, activation = (1, "sigmoid") if binary else (2, "softmax")
    outputs = layers.Dense(units, activation=activation, name="predictions")(x)
    model = keras.Model(inputs, outputs, name="blob_binary" if binary else "blob")
    generator = np.random.default_rng(0)
    first = np.zeros((3, 3, 1, 4), np.float32)
    first[:, :, 0, 0] = 1 / 9
    first[:, :, 0, 2:] = generator.normal(0, 0.3, (3, 3, 2))
    model.get_layer("conv1").set_weights([first, np.zeros(4, np.float32)])
    second = np.zeros((3, 3, 4, 4), np.float32)
    second[1, 1, 0, 0] = 1.0
    second[:, :, 2:, 2:] = generator.normal(0, 0.3, (3, 3, 2, 2))
    model.get_layer("conv2").set_weights([second, np.array([0, -5, 0, 0], np.float32)])
    if binary:  # one sigmoid unit: class 1 ("blob") is p, class 0 ("empty") is 1 - p
        head = [np.array([[20.0], [0], [0], [0]], np.float32), np.array([-1.0], np.float32)]
    else:  # class 0 "blob", class 1 "empty"
        head = [np.array([[20.0, -20.0], [0, 0], [0, 0], [0, 0]], np.float32), np.array([-1.0, 1.0], np.float32)]
    model.get_layer("predictions").set_weights(head)
    return model


def blob_image() -> np.ndarray:
    image = np.zeros((16, 16, 1), np.float32)
    image[BLOB] = 255
    return image


@pytest.fixture(scope="module")
def blob():
    return blob_model()


@pytest.fixture(scope="module")
def blob_saved_model(blob, tmp_path_factory):
    """The blob model exported the way `cnnkit export` writes it (serving, feature maps, Grad-CAM)."""
    from cnnkit.training.export import ServingGraph, filter_responses_graph, gradcam_graph, write_saved_model

    path = tmp_path_factory.mktemp("blob") / "1"
    gradcam = gradcam_graph(blob)
    write_saved_model(ServingGraph(blob), path, gradcam, filter_responses_graph(blob))
    metadata = {
        "name": "blob", "version": 1, "class_names": ["blob", "empty"], "input": {"shape": [16, 16, 1]},
        "feature_layers": [{"name": name, "kind": "Conv2D", "output_shape": [16, 16, 4]}
                           for name in ("conv1", "conv2")],
        "explain": {"gradcam_layer": gradcam.layer},
    }
    return path, metadata


# The checks ---------------------------------------------------------------------------------------


def test_resolve_class_by_name_index_or_predicted():
    names = ["cat", "dog"]
    assert resolve_class(None, names) == -1
    assert resolve_class("dog", names) == 1
    assert resolve_class(0, names) == 0
    assert resolve_class("1", names) == 1
    with pytest.raises(ExplainError, match="Unknown class 'horse'; classes: cat, dog"):
        resolve_class("horse", names)
    with pytest.raises(ExplainError, match="out of range"):
        resolve_class(2, names)
    with pytest.raises(ExplainError, match="out of range"):
        resolve_class(-3, names)


def test_layer_and_filter_checks():
    assert check_conv_layer(None, ["conv1", "conv2"], "m") == "conv2"
    with pytest.raises(ExplainError, match="no convolution layer 'pool'; convolution layers: conv1, conv2"):
        check_conv_layer("pool", ["conv1", "conv2"], "m")
    with pytest.raises(ExplainError, match="has no convolution layer: there is nothing to explain"):
        check_conv_layer(None, [], "dense_only")
    assert check_filters(None, 100, "conv") == list(range(64))
    assert check_filters(8, 4, "conv") == [0, 1, 2, 3]
    assert check_filters([3, 1, 3], 4, "conv") == [3, 1]
    with pytest.raises(ExplainError, match="has 4 filters"):
        check_filters([4], 4, "conv")
    with pytest.raises(ExplainError, match="at least one"):
        check_filters(0, 4, "conv")
    assert parse_filters("16") == 16
    assert parse_filters("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_filters(None) is None
    with pytest.raises(ExplainError, match="Filters must look like"):
        parse_filters("a-b")


# Grad-CAM -------------------------------------------------------------------------------------------


def _inside_outside(heatmap: np.ndarray) -> tuple[float, float]:
    mask = np.zeros(heatmap.shape, bool)
    mask[BLOB] = True
    return float(heatmap[mask].mean()), float(heatmap[~mask].mean())


@pytest.mark.parametrize("binary", [False, True])
def test_gradcam_lights_up_the_blob(binary):
    model = blob_model(binary)
    explainer = KerasExplainer(model, ["empty", "blob"] if binary else ["blob", "empty"])
    result = explainer.gradcam(blob_image())
    assert result.class_name == "blob" and result.layer == "conv2"
    assert result.heatmap.shape == (16, 16) and result.heatmap.dtype == np.float32
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() == pytest.approx(1.0)
    peak = np.unravel_index(result.heatmap.argmax(), result.heatmap.shape)
    assert BLOB[0].start <= peak[0] < BLOB[0].stop and BLOB[1].start <= peak[1] < BLOB[1].stop
    inside, outside = _inside_outside(result.heatmap)
    assert inside > 0.6 > 0.2 > outside
    # The other class has evidence against it at the blob: nothing lights up there.
    other = explainer.gradcam(blob_image(), "empty")
    assert other.class_name == "empty" and _inside_outside(other.heatmap)[0] < 0.05


def test_gradcam_follows_the_blob_when_it_moves(blob):
    explainer = KerasExplainer(blob, ["blob", "empty"])
    moved = np.zeros((16, 16, 1), np.float32)
    moved[11:15, 1:5] = 255
    heatmap = explainer.gradcam(moved, "blob").heatmap
    assert heatmap[11:15, 1:5].mean() > 0.6 and heatmap[2:6, 10:14].mean() < 0.2


def test_gradcam_checks_its_input(blob):
    explainer = KerasExplainer(blob, ["blob", "empty"])
    with pytest.raises(ExplainError, match=r"shape \(8, 8, 1\); model blob takes \(16, 16, 1\)"):
        explainer.gradcam(np.zeros((8, 8, 1)))
    with pytest.raises(ExplainError, match="Unknown class 'cat'"):
        explainer.gradcam(blob_image(), "cat")
    with pytest.raises(ExplainError, match="no convolution layer 'pool'"):
        explainer.gradcam(blob_image(), layer="pool")
    assert explainer.gradcam(blob_image(), layer="conv1").layer == "conv1"


def test_models_without_convolutions_are_refused():
    import keras

    inputs = keras.Input((16, 16, 1), name="image")
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    dense_only = keras.Model(inputs, outputs, name="dense_only")
    with pytest.raises(ExplainError, match="dense_only has no convolution layer"):
        GradCamGraph(dense_only)
    with pytest.raises(ExplainError, match="has no convolution layer"):
        KerasExplainer(dense_only).filter_patterns(None)


def keras_io_gradcam(image: np.ndarray, model, layer: str) -> np.ndarray:
    """The keras-io Grad-CAM recipe (keras.io/examples/vision/grad_cam), written out as its guide
    does: the head's softmax removed, the gradient of the top score with respect to the layer's
    output, pooled over the image, weights the channels; ReLU, then divided by the maximum."""
    import keras
    import tensorflow as tf

    original, model = model, keras.models.clone_model(model)
    model.set_weights(original.get_weights())
    model.layers[-1].activation = None
    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        layer_output, predictions = grad_model(image[None])
        top = tf.argmax(predictions[0])
        class_channel = predictions[:, top]
    gradients = tape.gradient(class_channel, layer_output)
    pooled = tf.reduce_mean(gradients, axis=(0, 1, 2))
    heatmap = tf.squeeze(layer_output[0] @ pooled[..., tf.newaxis])
    return (tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)).numpy()


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_gradcam_matches_the_keras_io_recipe(blob, layer):
    image = blob_image() + np.random.default_rng(4).uniform(0, 60, (16, 16, 1)).astype(np.float32)
    expected = keras_io_gradcam(image, blob, layer)
    result = KerasExplainer(blob, ["blob", "empty"]).gradcam(image, layer=layer)
    assert result.coarse_heatmap.shape == expected.shape
    np.testing.assert_allclose(result.coarse_heatmap, expected, atol=1e-5)


@pytest.mark.data
def test_gradcam_matches_the_keras_io_recipe_on_a_trained_digits_model(tiny_digits_run, digit_file):
    from cnnkit.training.feature_maps import load_image_for_model

    explainer = open_explainer(tiny_digits_run)
    image = load_image_for_model(digit_file, explainer.input_shape).astype(np.float32)
    for layer in explainer.conv_layers[:2]:
        result = explainer.gradcam(image, layer=layer)
        np.testing.assert_allclose(result.coarse_heatmap, keras_io_gradcam(image, explainer.model, layer), atol=1e-5)


def test_saved_model_signature_matches_keras(blob, blob_saved_model):
    path, metadata = blob_saved_model
    keras_result = KerasExplainer(blob, ["blob", "empty"]).gradcam(blob_image())
    saved = SavedModelExplainer(path, metadata)
    served = saved.gradcam(blob_image())
    assert served.class_name == "blob"
    np.testing.assert_allclose(served.heatmap, keras_result.heatmap, atol=1e-5)
    np.testing.assert_allclose(served.probabilities, keras_result.probabilities, atol=1e-6)
    with pytest.raises(ExplainError, match="available for layer conv2 only"):
        saved.gradcam(blob_image(), layer="conv1")


def test_saved_model_without_gradcam_says_to_export_again(blob, tmp_path):
    from cnnkit.training.export import ServingGraph, write_saved_model

    write_saved_model(ServingGraph(blob), tmp_path / "1")
    metadata = {"name": "blob", "version": 1, "class_names": ["blob", "empty"], "input": {"shape": [16, 16, 1]},
                "feature_layers": [{"name": "conv2", "kind": "Conv2D", "output_shape": [16, 16, 4]}]}
    with pytest.raises(ExplainError, match="exported without a Grad-CAM signature.*cnnkit export"):
        SavedModelExplainer(tmp_path / "1", metadata).gradcam(blob_image())


# Filter patterns -------------------------------------------------------------------------------------


def test_filter_patterns_raise_each_filters_response(blob, blob_saved_model):
    explainer = KerasExplainer(blob, ["blob", "empty"])
    filters, patterns, gains = explainer.filter_patterns("conv2", [0, 1, 2, 3], steps=20)
    assert filters == [0, 1, 2, 3]
    assert patterns.shape == (4, 16, 16, 1) and patterns.dtype == np.uint8
    assert gains.shape == (4, 2)
    # Filter 1 has all-zero weights (and a bias of -5): its response is -5 whatever the input, so it
    # is dead and drawn black rather than as noise. Every other filter's response rises.
    assert [is_dead(before, after) for before, after in gains] == [False, True, False, False]
    np.testing.assert_allclose(gains[1], [-5.0, -5.0])
    assert not patterns[1].any() and all(patterns[index].any() for index in (0, 2, 3))
    assert np.all(gains[[0, 2, 3], 1] > gains[[0, 2, 3], 0])
    # The brightness filter is maximised by a bright image.
    assert patterns[0].mean() > 100
    # The exported filter_responses signature gives the same patterns.
    path, metadata = blob_saved_model
    _, served, served_gains = SavedModelExplainer(path, metadata).filter_patterns("conv2", [0, 1, 2, 3], steps=20)
    assert np.abs(served.astype(int) - patterns.astype(int)).max() <= 1
    np.testing.assert_allclose(served_gains, gains, rtol=1e-4, atol=1e-5)


def test_a_filter_that_never_fires_after_its_relu_still_has_a_pattern(blob):
    """The ascent climbs the pre-activation: a filter whose ReLU is silent on every start (the
    brightness filter with a bias of -1000) gets a pattern, where the rectified response gave none."""
    import keras

    model = keras.models.clone_model(blob)
    model.set_weights(blob.get_weights())
    kernel, bias = model.get_layer("conv2").get_weights()
    bias[0] = -1000.0
    model.get_layer("conv2").set_weights([kernel, bias])
    explainer = KerasExplainer(model, ["blob", "empty"])
    # The pre-activation is the convolution before its ReLU.
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 1)).astype(np.float32)
    response = np.asarray(explainer._activations("conv2")(images))
    probe = keras.Model(model.inputs, model.get_layer("conv2").output)
    np.testing.assert_allclose(np.maximum(response, 0), np.asarray(probe(images)), atol=1e-5)
    assert response[..., 0].max() < 0  # silent after the ReLU everywhere
    _, patterns, gains = explainer.filter_patterns("conv2", [0], steps=20)
    assert not is_dead(*gains[0]) and gains[0, 1] > gains[0, 0] and patterns[0].mean() > 100


def test_an_export_without_filter_responses_falls_back_to_the_feature_maps(blob, tmp_path):
    from cnnkit.training.export import ServingGraph, write_saved_model

    write_saved_model(ServingGraph(blob), tmp_path / "1")
    metadata = {"name": "blob", "version": 1, "class_names": ["blob", "empty"], "input": {"shape": [16, 16, 1]},
                "feature_layers": [{"name": "conv2", "kind": "Conv2D", "output_shape": [16, 16, 4]}]}
    _, _, gains = SavedModelExplainer(tmp_path / "1", metadata).filter_patterns("conv2", [0, 1], steps=5)
    # The rectified response of the all-zero filter is 0 (its ReLU of -5), and dead all the same.
    np.testing.assert_allclose(gains[1], [0.0, 0.0])
    assert not is_dead(*gains[0]) and is_dead(*gains[1])


def test_filter_patterns_are_reproducible_by_seed(blob):
    explainer = KerasExplainer(blob, ["blob", "empty"])
    first = explainer.filter_patterns("conv1", 4, steps=3, seed=1)[1]
    assert np.array_equal(first, explainer.filter_patterns("conv1", 4, steps=3, seed=1)[1])
    assert not np.array_equal(first, explainer.filter_patterns("conv1", 4, steps=3, seed=2)[1])


# Pictures ---------------------------------------------------------------------------------------------


def test_heatmap_overlay_is_jet_over_the_image():
    image = np.full((28, 28, 1), 100, np.uint8)
    heatmap = np.zeros((28, 28), np.float32)
    heatmap[:14] = 1.0
    overlay = np.asarray(heatmap_overlay(image, heatmap))
    assert overlay.shape == (224, 224, 3)  # enlarged 8x to at least 224 px
    hot, cold = overlay[20, 100], overlay[200, 100]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where 1, blue where 0
    # alpha 0.4 over grey 100: 0.6 * 100 + 0.4 * jet
    assert abs(int(cold[1]) - 60) <= 2
    with pytest.raises(ValueError, match="heatmap must have shape"):
        heatmap_overlay(image, np.zeros((2, 2, 2)))


def test_pattern_grid_layout():
    patterns = np.zeros((10, 16, 16, 3), np.uint8)
    patterns[9] = 255
    grid = np.asarray(pattern_grid(patterns, columns=4, minimum_cell=32, gap=2))
    assert grid.shape == (3 * 32 + 2 * 2, 4 * 32 + 3 * 2, 3)  # 3 rows of 4; cells doubled to 32 px
    assert grid[2 * 34 + 5, 34 + 5].tolist() == [255, 255, 255]  # the tenth pattern: row 2, column 1
    with pytest.raises(ValueError, match="patterns must have shape"):
        pattern_grid(np.zeros((2, 16, 16, 2)))


# The commands ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_file(tmp_path_factory, data_root):
    from cnnkit.training.data import load_dataset

    dataset = load_dataset("mnist", data_root, validation_size=10, test_limit=1)
    path = tmp_path_factory.mktemp("explain") / "digit.png"
    Image.fromarray(dataset.x_test[0][..., 0]).save(path)
    return path


@pytest.mark.data
def test_explain_command_from_a_run_and_from_the_repository(tiny_digits_run, digits_repository, digit_file,
                                                            tmp_path, capsys):
    out = tmp_path / "run.png"
    assert cli_main(["explain", str(tiny_digits_run), str(digit_file), "--class", "3", "--out", str(out)]) == 0
    assert "Grad-CAM of class '3'" in capsys.readouterr().err
    # The overlay (enlarged to 224 px) with its caption and colour scale under it.
    width, height = Image.open(out).size
    assert width >= 224 + 16 and height >= 224 + 100
    from_run = np.load(out.with_suffix(".npy"))
    assert from_run.shape == (28, 28) and from_run.min() >= 0 and from_run.max() <= 1
    # The exported version's gradcam signature gives the same heatmap as the run's Keras model.
    served = tmp_path / "served.png"
    assert cli_main(["explain", str(digits_repository / "digits"), str(digit_file), "--class", "3",
                     "--out", str(served)]) == 0
    np.testing.assert_allclose(np.load(served.with_suffix(".npy")), from_run, atol=1e-4)
    metadata = json.loads((digits_repository / "digits" / "1" / "assets.extra" / "metadata.json").read_text())
    # LeNet-5's last convolution (C5) is 1x1: Grad-CAM uses the one before, which has a spatial extent.
    assert metadata["explain"]["gradcam_layer"] == "conv2"
    assert open_explainer(tiny_digits_run).conv_layers[-1] == "conv3"
    assert metadata["verification"]["gradcam"]["max_difference"] <= 1e-3


@pytest.mark.data
def test_explain_command_errors(tiny_digits_run, digit_file, tmp_path, capsys):
    assert cli_main(["explain", str(tiny_digits_run), str(digit_file), "--class", "eleven"]) == 2
    assert "Unknown class 'eleven'" in capsys.readouterr().err
    assert cli_main(["explain", str(tiny_digits_run), str(digit_file), "--layer", "nope"]) == 2
    assert "no convolution layer 'nope'" in capsys.readouterr().err
    assert cli_main(["explain", str(tmp_path), str(digit_file)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert cli_main(["explain", str(tiny_digits_run), str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.data
def test_filter_patterns_command(tiny_digits_run, tmp_path, capsys):
    out = tmp_path / "patterns.png"
    assert cli_main(["filter-patterns", str(tiny_digits_run), "--filters", "0-5", "--steps", "5",
                     "--out", str(out)]) == 0
    assert re.search(r"6 filters; mean response raised from \S+ to \S+; 0 dead", capsys.readouterr().err)
    width, height = Image.open(out).size
    # One row of six 28 px patterns, tripled, with margins, a title above and a legend below.
    assert width >= 6 * 84 + 5 * 2 and height > 84 + 60
    assert cli_main(["filter-patterns", str(tiny_digits_run), "--layer", "pool1"]) == 2
    assert "no convolution layer 'pool1'" in capsys.readouterr().err


def test_a_freshly_built_vgg16_transfer_model_can_be_explained_and_exported():
    """Its layers are copies of the VGG16 base's, so each layer's output belongs to this model."""
    from cnnkit.training.export import ServingGraph
    from cnnkit.training.models import create_model

    model = create_model("vgg16_transfer", weights="none", input_shape=(32, 32, 3))
    assert len(ServingGraph(model).layers) == 18
    result = KerasExplainer(model, ["cat", "dog"]).gradcam(np.full((32, 32, 3), 128, np.float32))
    assert result.layer == "block5_conv3" and result.heatmap.shape == (32, 32)
