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


def test_feature_cache_needs_views_for_augmentation():
    base = {"name": "x", "dataset": "cats_and_dogs", "model": "vgg16_transfer", "feature_cache": True}
    with pytest.raises(ConfigError, match="needs feature_views"):
        config_from_dict({**base, "augmentation": {"horizontal_flip": True}})
    with pytest.raises(ConfigError, match="feature_cache_from needs feature_cache"):
        config_from_dict({**base, "feature_cache": False, "feature_cache_from": "block5_conv1"})
    with pytest.raises(ConfigError, match="feature_views needs feature_cache"):
        config_from_dict({**base, "feature_cache": False, "feature_views": 4, "augmentation": {"zoom": 0.1}})
    with pytest.raises(ConfigError, match="feature_views must be 0"):
        config_from_dict({**base, "feature_views": -1})
    recipe = config_from_dict({**base, "feature_views": 4, "augmentation": {"zoom": 0.1}})
    assert recipe.feature_views == 4


def test_augmented_views_are_computed_once_each_and_epochs_draw_among_them(tmp_path, capsys):
    """Each view is its own augmentation of every image, cached on its own (an interrupted run
    resumes at the next view); the training data gives each image one of its views."""
    import keras

    from cnnkit.training.features import augmented_base_features, feature_data, split_at_frozen_base
    from cnnkit.training.models import create_model

    keras.utils.set_random_seed(0)
    model = create_model("vgg16_transfer", input_shape=(32, 32, 3), weights="none", dense_units=8)
    base, _ = split_at_frozen_base(model)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(6, dtype=np.int64) % 2
    made: list[int] = []

    def augmentation_for_view(view):
        made.append(view)
        return keras.Sequential([keras.layers.RandomTranslation(0.2, 0.2, seed=100 + view)])

    views = augmented_base_features(base, images, augmentation_for_view, 3, tmp_path, tag="t1")
    plain = np.asarray(base(images.astype(np.float32), training=False))
    assert views.shape == (3, *plain.shape) and made == [0, 1, 2]
    assert not np.allclose(views[0], views[1]) and not np.allclose(views[0], plain)  # augmented, differently
    (tmp_path / "features" / next(name for name in sorted(p.name for p in (tmp_path / "features").iterdir())
                                  if "view2of3" in name)).unlink()  # as if stopped during view 2
    again = augmented_base_features(base, images, augmentation_for_view, 3, tmp_path, tag="t1")
    assert made == [0, 1, 2, 1] and "2 of 3 augmented views from the cache" in capsys.readouterr().err
    np.testing.assert_array_equal(again[0], views[0])
    augmented_base_features(base, images, augmentation_for_view, 3, tmp_path, tag="t2")  # other settings
    assert made[-3:] == [0, 1, 2]

    head, train, _ = feature_data(model, images, labels, images[:2], labels[:2], 6, tmp_path, seed=1,
                                  augmentation_for_view=augmentation_for_view, views=3, tag="t1")
    rows = [features for epoch in range(4) for features, _ in train]
    drawn = set()
    for batch in rows:
        # Every row is one of the three cached views of some image.
        candidates = views.reshape(18, -1)
        distances = np.abs(candidates[None] - np.asarray(batch).reshape(len(batch), 1, -1)).max(axis=2)
        assert (distances.min(axis=1) < 1e-6).all()
        drawn.update(int(row) // 6 for row in distances.argmin(axis=1))
    assert len(drawn) >= 2  # the epochs do not all use the same view
    assert head.layers[-1] is model.layers[-1]


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
def test_a_run_with_augmented_feature_views_trains_the_whole_model(tmp_path, data_root, monkeypatch):
    """feature_cache + augmentation + feature_views: the views are computed once, the head trains on
    them, and the run holds the whole model, evaluated on images as usual."""
    from cnnkit.training.train import train

    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = config_from_dict({
        "name": "tiny_vgg16_views", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"num_classes": 1, "weights": "none", "dense_units": 8}, "image_size": [32, 32],
        "validation_size": 10, "train_limit": 30, "test_limit": 20, "epochs": 2, "batch_size": 10,
        "feature_cache": True, "feature_views": 2, "augmentation": {"horizontal_flip": True, "zoom": 0.1},
    })
    run_dir = Path(train(recipe, run_dir=tmp_path / "run", data_dir=data_root, verbose=0))
    cached = sorted(path.name for path in (tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 3 and sum("view" in name for name in cached) == 2  # two views, one validation set
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 3  # header and two epochs
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and (run_dir / "model.keras").is_file()


def test_the_split_can_be_named_but_never_after_a_trained_layer():
    from cnnkit.training.features import split_at_frozen_base
    from cnnkit.training.models import create_model, set_trainable_from

    model = create_model("vgg16_transfer", input_shape=(32, 32, 3), weights="none", dense_units=8)
    base, head = split_at_frozen_base(model, "block5_conv1")
    assert base.layers[-1].name == "block4_pool" and head.layers[1] is model.get_layer("block5_conv1")
    with pytest.raises(ConfigError, match="has no layer 'block9'"):
        split_at_frozen_base(model, "block9")
    set_trainable_from(model, "block4_conv1")
    with pytest.raises(ConfigError, match="must be frozen, but 'block4_conv1' trains"):
        split_at_frozen_base(model, "block5_conv1")


@pytest.mark.data
def test_fine_tuning_on_cached_augmented_features_trains_the_top_block_only(tmp_path, data_root, monkeypatch):
    """Phase one trains the head over cached block4 features (block5 frozen); phase two unfreezes
    block5 and trains it on the same cache; the blocks below never change."""
    import keras

    from cnnkit.training.train import train

    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = config_from_dict({
        "name": "tiny_vgg16_tune_views", "dataset": "cats_and_dogs", "model": "vgg16_transfer",
        "model_args": {"num_classes": 1, "weights": "none", "dense_units": 8}, "image_size": [32, 32],
        "validation_size": 10, "train_limit": 30, "test_limit": 20, "epochs": 1, "batch_size": 10,
        "feature_cache": True, "feature_views": 2, "augmentation": {"horizontal_flip": True},
        "fine_tune": {"from_layer": "block5_conv1", "epochs": 1, "learning_rate": 1e-3},
    })
    keras.utils.set_random_seed(recipe.seed)
    from cnnkit.training.models import create_model

    initial = create_model("vgg16_transfer", input_shape=(32, 32, 3), num_classes=1, weights="none", dense_units=8)
    run_dir = Path(train(recipe, run_dir=tmp_path / "run", data_dir=data_root, verbose=0))
    trained = keras.models.load_model(run_dir / "last.keras")  # after the last epoch (model.keras is the best)
    cached = sorted(path.name for path in (tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 3 and all("block5" not in name for name in cached)  # the base ends at block4_pool
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 3  # one epoch per phase
    for name in ("block1_conv1", "block4_conv3"):  # frozen throughout: as initialised (same seed)
        np.testing.assert_array_equal(trained.get_layer(name).get_weights()[0],
                                      initial.get_layer(name).get_weights()[0])
    assert not np.array_equal(trained.get_layer("block5_conv3").get_weights()[0],
                              initial.get_layer("block5_conv3").get_weights()[0])  # fine-tuned


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
