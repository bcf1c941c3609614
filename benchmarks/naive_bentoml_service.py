"""The baseline for benchmarks/serving_throughput.py: an image classifier served the way BentoML's docs would
have a user write it: the Keras model loaded in ``__init__``, ``model.predict`` on each request's
image, no batching, one worker.

    NAIVE_KERAS_MODEL=runs/mnist_convnet/model.keras NAIVE_CLASS_NAMES='["0",...]' \\
        bentoml serve benchmarks.naive_bentoml_service:NaiveClassifier --port 3001
"""

from __future__ import annotations

import json
import os

import bentoml
import numpy as np
from PIL.Image import Image


@bentoml.service(workers=1)
class NaiveClassifier:
    def __init__(self) -> None:
        import keras

        import cnnkit.training.models  # noqa: F401 - registers cnnkit's layers (VGG16 preprocessing) with Keras

        self.model = keras.saving.load_model(os.environ["NAIVE_KERAS_MODEL"])
        self.class_names = json.loads(os.environ["NAIVE_CLASS_NAMES"])
        _, self.height, self.width, self.channels = self.model.input_shape

    @bentoml.api
    def classify(self, image: Image) -> dict:
        image = image.convert("L" if self.channels == 1 else "RGB").resize((self.width, self.height))
        pixels = np.asarray(image, dtype="float32").reshape(1, self.height, self.width, self.channels)
        probabilities = self.model.predict(pixels, verbose=0)[0]
        if len(probabilities) == 1:  # a sigmoid output: the probability of class 1
            probabilities = np.array([1.0 - probabilities[0], probabilities[0]])
        best = int(np.argmax(probabilities))
        return {"label": self.class_names[best], "probability": float(probabilities[best])}
