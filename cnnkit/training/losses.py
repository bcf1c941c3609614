"""Losses the recipes may ask for beyond Keras's own, registered so saved runs load again."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cnnkit")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels with label smoothing.

    Keras's ``SparseCategoricalCrossentropy`` has no ``label_smoothing``: the labels are one-hot
    encoded here and passed to the categorical cross-entropy, which has. With smoothing ``s`` over
    ``k`` classes the target is ``1 - s + s / k`` for the true class and ``s / k`` for the others.
    """

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        labels = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(labels, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
