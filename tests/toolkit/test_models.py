"""The model zoo: registry behaviour, the course's parameter counts, preprocessing inside models."""

from __future__ import annotations

import numpy as np
import pytest

from cnnkit.errors import ModelError
from cnnkit.training.models import (
    VGG16_WEIGHTS_FILE,
    create_model,
    feature_layers,
    list_models,
    set_trainable_from,
)


@pytest.mark.parametrize(
    ("name", "arguments", "parameters"),
    [
        ("lenet5", {}, 61706),
        ("mnist_convnet", {}, 93322),
        ("fashion_cnn", {}, 412778),
        ("cifar10_cnn", {}, 307498),
        ("cifar10_cnn", {"batch_norm": True}, 309290),
        ("catsdogs_small", {}, 3453121),
        # The recipes' wider blocks: Fashion-MNIST (28x28 grey) and CIFAR-10.
        ("conv_blocks", {"input_shape": (28, 28, 1), "filters": (32, 64, 128)}, 299754),
        ("conv_blocks", {"filters": (48, 96, 192)}, 678202),
    ],
)
def test_parameter_counts_match_the_course(name, arguments, parameters):
    assert create_model(name, **arguments).count_params() == parameters


def test_vgg16_transfer_layout_and_phases():
    model = create_model("vgg16_transfer", weights=None)
    # VGG16 base 14,714,688 + Dense 8192*256 + 256 + Dense 256 + 1.
    assert model.count_params() == 14714688 + 8192 * 256 + 256 + 257
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 8192 * 256 + 256 + 257  # Phase one: the base is frozen.
    unfrozen = set_trainable_from(model, "block5_conv1")
    assert unfrozen[:3] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert not model.get_layer("block4_conv3").trainable
    assert model.get_layer("block5_conv1").trainable


def test_vgg_preprocessing_lives_inside_the_model():
    model = create_model("vgg16_transfer", weights=None, input_shape=(32, 32, 3))
    layer = model.get_layer("vgg_preprocess")
    pixels = np.full((1, 2, 2, 3), [10.0, 20.0, 30.0], dtype=np.float32)
    expected = np.array([30 - 103.939, 20 - 116.779, 10 - 123.68], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(layer(pixels))[0, 0, 0], expected, rtol=1e-6)


def test_models_rescale_raw_pixels_themselves():
    model = create_model("mnist_convnet")
    assert model.input.dtype == "float32"
    scaled = [layer for layer in model.layers if layer.__class__.__name__ == "Rescaling"]
    assert scaled and scaled[0].scale == pytest.approx(1 / 255)


def test_unknown_model_lists_the_registry():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'.*lenet5.*vgg16_transfer"):
        create_model("resnet50")
    assert {"lenet5", "mnist_convnet", "fashion_cnn", "cifar10_cnn", "catsdogs_small",
            "vgg16_transfer"} <= set(list_models())


def test_conv_blocks_share_cifar10_cnns_layer_names_and_check_their_rates():
    same = create_model("conv_blocks", filters=(32, 64, 128), l2=1e-4, dropouts=(0.2, 0.2, 0.2, 0.4))
    course = create_model("cifar10_cnn", batch_norm=True)
    assert [layer.name for layer in same.layers] == [layer.name for layer in course.layers]
    assert same.count_params() == course.count_params()
    with pytest.raises(ModelError, match="dropouts needs 3 rates"):
        create_model("conv_blocks", filters=(8, 16), dropouts=(0.1, 0.1))
    with pytest.raises(ModelError, match="too small"):
        create_model("conv_blocks", input_shape=(4, 4, 1), filters=(8, 16, 32))


def test_bad_builder_arguments_are_a_model_error():
    with pytest.raises(ModelError, match="Bad arguments for model 'lenet5'"):
        create_model("lenet5", colour=True)
    with pytest.raises(ModelError, match="input_shape must be"):
        create_model("lenet5", input_shape=(28, 28))


def test_missing_vgg_weights_file_names_the_weights_option(tmp_path):
    with pytest.raises(ModelError, match="does not exist. Pass --weights"):
        create_model("vgg16_transfer", weights=str(tmp_path / "missing.h5"))


def test_unreadable_vgg_weights_file_is_reported(tmp_path):
    bad = tmp_path / VGG16_WEIGHTS_FILE
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="Could not load VGG16 weights"):
        create_model("vgg16_transfer", weights=str(bad))


def test_vgg_weights_file_round_trip(tmp_path):
    """A local weights file (the --weights FILE path) loads into the base exactly."""
    import keras

    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / VGG16_WEIGHTS_FILE
    source.save_weights(str(path).replace(".h5", ".weights.h5"))
    weights_file = str(path).replace(".h5", ".weights.h5")
    model = create_model("vgg16_transfer", weights=weights_file, input_shape=(32, 32, 3))
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0], source.get_layer("block5_conv3").get_weights()[0]
    )


def test_feature_layers_are_the_conv_and_pool_layers_in_order():
    names = feature_layers(create_model("lenet5"))
    assert names[0].startswith("conv") and any(name.startswith("pool") for name in names)
    assert len(names) == 5


def test_unreachable_imagenet_weights_name_the_weights_option(tmp_path):
    import os
    import subprocess
    import sys

    # A fresh Keras cache (read once, at import) so that no earlier download can hide the error.
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras-home"), TF_CPP_MIN_LOG_LEVEL="3")
    code = "from cnnkit.training.models import create_model\ncreate_model('vgg16_transfer')\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "ModelError: Could not fetch the VGG16 ImageNet weights" in result.stderr
    assert "--weights FILE" in result.stderr


def test_float32_copy_of_a_mixed_precision_model_has_float32_layers_and_the_same_weights():
    import keras
    import numpy as np

    from cnnkit.training.models import create_model, float32_copy

    plain = create_model("lenet5", input_shape=(28, 28, 1))
    assert float32_copy(plain) is plain
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = create_model("cifar10_cnn", input_shape=(16, 16, 3), batch_norm=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("conv1").dtype_policy.name == "mixed_float16"
    copy = float32_copy(mixed)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert copy.name == mixed.name and [layer.name for layer in copy.layers] == [layer.name for layer in mixed.layers]
    for ours, theirs in zip(copy.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(copy.predict(images, verbose=0), mixed.predict(images, verbose=0), atol=1e-2)


def test_the_zoo_listing_names_what_the_registry_builds():
    from cnnkit.training.zoo import describe_zoo

    listed = [name for name, _description in describe_zoo()]
    assert "lenet5" in listed and all(description for _name, description in describe_zoo())
    assert listed == list_models()  # the source listing and the registry agree


def test_conv_blocks_can_normalise_before_each_relu():
    model = create_model("conv_blocks", input_shape=(16, 16, 3), filters=(8, 16), dropouts=(0.1, 0.1, 0.2),
                         norm_first=True)
    names = [layer.name for layer in model.layers]
    # Convolution, batch norm, ReLU; the convolutions lose the bias the norm would cancel.
    assert names[2:5] == ["conv1", "bn1", "relu1"]
    assert not model.get_layer("conv1").use_bias and model.get_layer("conv1").activation.__name__ == "linear"
    course_order = create_model("conv_blocks", input_shape=(16, 16, 3), filters=(8, 16), dropouts=(0.1, 0.1, 0.2))
    biases = 8 + 8 + 16 + 16
    assert model.count_params() == course_order.count_params() - biases
    probabilities = model.predict(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("float32"),
                                  verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
