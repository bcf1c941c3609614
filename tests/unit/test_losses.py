"""Label smoothing on integer labels, and the recipe fields that turn it and the warm-up on."""

from __future__ import annotations

import numpy as np
import pytest

from cnnkit.errors import ConfigError
from cnnkit.training.config import apply_overrides, load_recipe


def test_smoothed_loss_is_the_categorical_loss_on_smoothed_one_hot_targets():
    import keras

    from cnnkit.training.losses import SmoothedSparseCrossentropy

    probabilities = np.asarray([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.asarray([0, 2])
    smoothed = float(SmoothedSparseCrossentropy(0.3)(labels, probabilities))
    targets = np.full((2, 3), 0.1, np.float32)  # s / k = 0.3 / 3
    targets[[0, 1], labels] = 0.8  # 1 - s + s / k
    expected = float(np.mean(-(targets * np.log(probabilities)).sum(axis=1)))
    assert smoothed == pytest.approx(expected, rel=1e-5)
    plain = float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities))
    assert float(SmoothedSparseCrossentropy(0.0)(labels[:, None], probabilities)) == pytest.approx(plain, rel=1e-5)
    # It survives a save: the config round-trips through the registered class.
    config = keras.saving.serialize_keras_object(SmoothedSparseCrossentropy(0.2))
    assert keras.saving.deserialize_keras_object(config).label_smoothing == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        SmoothedSparseCrossentropy(1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["label_smoothing=1.5"], r"label_smoothing must be in \[0, 1\)"),
        (["warmup_epochs=2", "lr_schedule=constant"], "positive with lr_schedule: cosine"),
        (["warmup_epochs=30", "lr_schedule=cosine", "epochs=30"], "must be fewer than epochs"),
        (["warmup_epochs=-1", "lr_schedule=cosine"], "warmup_epochs must be 0"),
    ],
)
def test_recipe_checks_smoothing_and_warm_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_recipe("mnist_lenet5"), overrides)
