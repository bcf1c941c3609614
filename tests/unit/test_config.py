"""Recipes: every shipped recipe loads, overrides apply, mistakes are named."""

from __future__ import annotations

import pytest

from cnnkit.errors import ConfigError
from cnnkit.training.config import (
    apply_overrides,
    list_recipes,
    load_config_file,
    load_recipe,
    save_config,
)
from cnnkit.training.models import list_models


def test_every_shipped_recipe_is_valid_and_names_a_registered_model():
    names = list_recipes()
    assert {"mnist_lenet5", "mnist_convnet", "fashion_cnn", "cifar10_bn_aug", "catsdogs_small",
            "catsdogs_small_aug", "catsdogs_vgg16_finetune"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.model in list_models()


def test_overrides_reach_nested_fields_and_parse_values():
    recipe = apply_overrides(
        load_recipe("cifar10_bn_aug"),
        ["epochs=3", "augmentation.rotation=0.1", "model_args.batch_norm=false", "learning_rate=1e-4"],
    )
    assert recipe.epochs == 3
    assert recipe.augmentation.rotation == 0.1
    assert recipe.model_args == {"batch_norm": False}
    assert recipe.learning_rate == pytest.approx(1e-4)


def test_fine_tune_section_can_be_added_by_override():
    recipe = apply_overrides(load_recipe("catsdogs_vgg16_features"), ["feature_cache=false", "fine_tune.epochs=2"])
    assert recipe.fine_tune is not None and recipe.fine_tune.epochs == 2
    assert recipe.total_epochs == recipe.epochs + 2
    # With the feature cache on, fine-tuning trains the layers from its from_layer on cached features.
    cached = apply_overrides(load_recipe("catsdogs_vgg16_features"), ["fine_tune.epochs=2"])
    assert cached.feature_cache and cached.fine_tune is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs", "must look like key=value"),
        ("epoch=3", "Unknown key.*epoch.*known:.*epochs"),
        ("augmentation.spin=1", "Unknown key.*recipe|Unknown key.*augmentation"),
        ("epochs=ten", "epochs must be int, got 'ten'"),
        ("epochs=0", "epochs must be at least 1"),
        ("optimizer=adagrad", "optimizer must be one of adam, rmsprop, sgd"),
        ("learning_rate=-1", "learning_rate must be positive"),
        ("weight_decay=-0.1", r"weight_decay must be 0 \(off\) or positive"),
        ("image_size=[1, 2, 3]", r"image_size must be \[height, width\]"),
        ("augmentation.horizontal_flip=3", "horizontal_flip must be bool"),
        ("epochs.count=3", "'epochs' is not a section"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_recipe("mnist_lenet5"), [override])


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ValueError, match="Unknown recipe 'imagenet'.*mnist_lenet5"):
        load_recipe("imagenet")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    recipe = apply_overrides(load_recipe("catsdogs_vgg16_finetune"), ["fine_tune.epochs=4"])
    save_config(recipe, tmp_path / "config.yaml")
    assert load_config_file(tmp_path / "config.yaml") == recipe
    # A recipe file given by path works like a named one.
    assert load_recipe(str(tmp_path / "config.yaml")) == recipe


def test_broken_yaml_file_is_reported(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_recipe(str(path))


def test_exponent_notation_is_a_number_in_files_too(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\ndataset: mnist\nmodel: lenet5\nlearning_rate: 3e-4\n"
                    "fine_tune:\n  learning_rate: 1e-5\n")
    recipe = load_recipe(str(path))
    assert recipe.learning_rate == pytest.approx(3e-4)
    assert recipe.fine_tune.learning_rate == pytest.approx(1e-5)
