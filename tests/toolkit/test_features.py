"""The frozen-base fast path: features computed once and cached, the head trained on them, the whole
model in the run; with the real VGG16 ImageNet weights it tells cats from dogs after a short fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnkit.errors import ConfigError
from cnnkit.training.config import config_from_dict

WEIGHTS = (Path(__file__).resolve().parents[3] / "shared" / "weights"
           / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")


def test_feature_cache_refuses_augmentation_and_fine_tuning():
    base = {"name": "x", "dataset": "cats_and_dogs", "model": "vgg16_transfer", "feature_cache": True}
    with pytest.raises(ConfigError, match="cannot be combined with augmentation or fine_tune"):
        config_from_dict({**base, "augmentation": {"horizontal_flip": True}})
    with pytest.raises(ConfigError, match="cannot be combined"):
        config_from_dict({**base, "fine_tune": {"from_layer": "block5_conv1", "epochs": 1}})


def test_the_base_runs_once_and_the_head_shares_the_models_layers(tmp_path, capsys):
    from cnnkit.training.features import base_features, split_at_frozen_base
    from cnnkit.training.models import create_model

    model = create_model("vgg16_transfer", input_shape=(32, 32, 3), weights="none", dense_units=8)
    base, head = split_at_frozen_base(model)
    assert base.output.shape[1:] == (512,) and head.layers[1] is model.get_layer("fc1")  # shared, not copied
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    first = base_features(base, images, tmp_path)
    again = base_features(base, images, tmp_path)
    np.testing.assert_array_equal(first, again)
    assert "from the cache" in capsys.readouterr().err and len(list((tmp_path / "features").iterdir())) == 1
    np.testing.assert_allclose(head(first), model(images.astype(np.float32)), rtol=1e-5, atol=1e-6)
    base_features(base, images[:4], tmp_path)  # other images: another entry
    assert len(list((tmp_path / "features").iterdir())) == 2


@pytest.mark.data
@pytest.mark.skipif(not WEIGHTS.is_file(), reason="no local VGG16 ImageNet weights (../shared/weights)")
def test_real_vgg16_features_tell_cats_from_dogs_after_a_head_only_fit(tmp_path, data_root, monkeypatch):
    from cnnkit.training.train import train

    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CNNKIT_VGG16_WEIGHTS", str(WEIGHTS))  # the recipe says weights: imagenet
    recipe = config_from_dict({
        "name": "tiny_vgg16_features", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"num_classes": 1, "weights": "imagenet", "dense_units": 64}, "image_size": [96, 96],
        "validation_size": 40, "train_limit": 160, "test_limit": 100, "epochs": 8, "batch_size": 20,
        "optimizer": "rmsprop", "learning_rate": 2e-4, "monitor": "val_loss", "feature_cache": True,
    })
    run_dir = train(recipe, run_dir=tmp_path / "run", data_dir=data_root, verbose=0)
    metrics = json.loads((Path(run_dir) / "evaluation" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.8, metrics["test_accuracy"]  # chance is 0.5
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # train and validation, once each
