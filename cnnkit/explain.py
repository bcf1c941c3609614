"""Seeing inside a trained CNN: class activation heatmaps (Grad-CAM) and filter patterns.

Both are computed with TensorFlow gradients, from either of two sources that give the same numbers:

* a Keras model (a run directory's ``model.keras``), through :class:`KerasExplainer`;
* an exported SavedModel (a model repository version), through :class:`SavedModelExplainer`: its
  ``gradcam`` signature (written by the export from :class:`GradCamGraph`) and its ``feature_maps``
  signature, which is differentiable once reloaded.

Grad-CAM follows Selvaraju et al. as the course draws it: the gradient of the class score with
respect to the last convolution layer's activations, averaged over space, weights that layer's
channels; the weighted sum goes through a ReLU, is divided by its maximum (so it lies in [0, 1]) and
is upsampled bilinearly to the input size. The class score is the pre-activation of the softmax (or
sigmoid) output, not the probability: a confident prediction saturates the probability, whose
gradient then vanishes and leaves an all-zero map.

A filter pattern is the input that maximises one filter's mean response: gradient ascent from a
grey image with a little noise, with the gradient divided by its root mean square at each step
(40 steps of 1 grey level by default), then standardised for display, as the course does for VGG16.
The response is the convolution's pre-activation (its output before the ReLU): a ReLU that is
silent on the starting image has no gradient to climb, which left many tiles black, whereas the
pre-activation moves with the input for every filter with non-zero weights. A filter whose response
does not change at all is *dead* (all-zero weights, or only zero inputs reach it) and drawn black.
All the requested filters of a layer are optimised together as one batch.

The service computes both in a separate worker process (see :mod:`cnnkit.serving.explain`) so that
TensorFlow never sits in the way of plain predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ExplainError
from cnnkit.repository import FEATURE_MAPS_SIGNATURE, FILTER_RESPONSES_SIGNATURE, GRADCAM_SIGNATURE

PATTERN_STEPS = 40
PATTERN_STEP_SIZE = 1.0
PATTERN_BATCH = 32
# The ascent runs in pieces of this many steps, with a check between them (a time limit, a caller
# who went away), so that stopping it never waits for a whole batch of filters.
PATTERN_CHECK_STEPS = 20
DEFAULT_PATTERN_FILTERS = 64


# Choosing classes and layers -------------------------------------------------------------------


def resolve_class(target: int | str | None, class_names: Sequence[str]) -> int:
    """The class index for a class name or index; -1 (the predicted class) for None."""
    if target is None or target == "":
        return -1
    names = list(class_names)
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target in names:
            return names.index(target)
        raise ExplainError(f"Unknown class {target!r}; classes: {', '.join(names)}.")
    index = int(target)
    if not 0 <= index < len(names):
        raise ExplainError(f"Class index {index} is out of range: the model has {len(names)} classes "
                           f"(0..{len(names) - 1}: {', '.join(names)}).")
    return index


def check_conv_layer(layer: str | None, conv_layers: Sequence[str], model_name: str) -> str:
    """The named convolution layer (default: the last one), or a clear error."""
    if not conv_layers:
        raise ExplainError(f"Model {model_name} has no convolution layer: there is nothing to explain.")
    if layer is None or layer == "":
        return conv_layers[-1]
    if layer not in conv_layers:
        raise ExplainError(f"Model {model_name} has no convolution layer {layer!r}; "
                           f"convolution layers: {', '.join(conv_layers)}.")
    return layer


def check_filters(filters: Sequence[int] | int | None, channels: int, layer: str) -> list[int]:
    """Filter indices of a layer with ``channels`` filters: a list, a count (the first N) or None."""
    if filters is None:
        return list(range(min(channels, DEFAULT_PATTERN_FILTERS)))
    if isinstance(filters, int | np.integer):
        count = int(filters)
        if count < 1:
            raise ExplainError(f"Ask for at least one filter, got {count}.")
        return list(range(min(count, channels)))
    chosen = [int(index) for index in filters]
    if not chosen:
        raise ExplainError("Ask for at least one filter.")
    bad = [index for index in chosen if not 0 <= index < channels]
    if bad:
        raise ExplainError(f"Layer {layer} has {channels} filters (0..{channels - 1}); "
                           f"no filter {', '.join(map(str, bad))}.")
    return list(dict.fromkeys(chosen))


def parse_filters(text: str | None) -> list[int] | int | None:
    """Command-line filters: ``16`` (the first 16), ``0,3,7`` or ``0-7,12``."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    chosen: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                start, end = (int(value) for value in part.split("-", 1))
                chosen.extend(range(start, end + 1))
            else:
                chosen.append(int(part))
    except ValueError as error:
        raise ExplainError(f"Filters must look like 16, 0,3,7 or 0-7,12; got {text!r}.") from error
    return chosen


# Grad-CAM as a TensorFlow function --------------------------------------------------------------


class GradCamGraph:
    """The Grad-CAM computation of a Keras model, traced into the export's ``gradcam`` signature.

    ``__call__(image, class_index)`` takes a float32 batch of raw pixels and an int32 class index
    per image (-1: the predicted class) and returns ``heatmap`` (N, H, W) in [0, 1] at the input
    size, ``class_index`` (N,) as explained, ``probabilities`` (N, classes; two columns for a
    sigmoid model) and ``coarse_heatmap`` (N, h, w) at the layer's own resolution.
    """

    def __init__(self, model, layer: str | None = None):
        import keras

        self.model = model
        conv = [item.name for item in model.layers if isinstance(item, keras.layers.Conv2D)]
        self.layer = check_conv_layer(layer or default_gradcam_layer(model), conv, model.name)
        head = model.layers[-1]
        activation = getattr(getattr(head, "activation", None), "__name__", "")
        # The score is the head's pre-activation when the head is a Dense softmax/sigmoid layer.
        self.head = head if isinstance(head, keras.layers.Dense) and activation in ("softmax", "sigmoid") else None
        outputs = [model.get_layer(self.layer).output, model.outputs[0]]
        if self.head is not None:
            outputs.append(self.head.input)
        self.probe = keras.Model(model.inputs, outputs, name=f"{model.name}_gradcam")
        self.binary = int(model.outputs[0].shape[-1]) == 1
        self.num_classes = 2 if self.binary else int(model.outputs[0].shape[-1])
        self.input_shape = tuple(int(size) for size in model.input_shape[1:])
        self.specs = [tf_spec((None, *self.input_shape), "float32", "image"),
                      tf_spec((None,), "int32", "class_index")]

    def __call__(self, image, class_index):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            results = self.probe(image, training=False)
            activations = tf.cast(results[0], tf.float32)
            output = tf.cast(results[1], tf.float32)
            if self.head is not None:
                scores = tf.matmul(tf.cast(results[2], tf.float32), tf.cast(self.head.kernel, tf.float32))
                scores = scores + tf.cast(self.head.bias, tf.float32) if self.head.use_bias else scores
            else:
                scores = output
            if self.binary:
                # The log-odds of class 1 is z, of class 0 is -z.
                scores = tf.concat([-scores, scores], axis=-1)
                probabilities = tf.concat([1.0 - output, output], axis=-1)
            else:
                probabilities = output
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            class_index = tf.cast(class_index, tf.int32)
            tf.debugging.assert_less(class_index, self.num_classes,
                                     message=f"class_index must be below {self.num_classes}")
            chosen = tf.where(class_index < 0, predicted, class_index)
            # Images of a batch are independent, so the gradient of the sum is each image's own.
            score = tf.reduce_sum(tf.gather(scores, chosen, axis=1, batch_dims=1))
        gradients = tape.gradient(score, activations)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(activations * weights, axis=-1))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.where(peak > 0, cam / tf.maximum(peak, 1e-12), tf.zeros_like(cam))
        heatmap = tf.image.resize(cam[..., None], self.input_shape[:2], method="bilinear")[..., 0]
        return {"heatmap": tf.clip_by_value(heatmap, 0.0, 1.0), "class_index": chosen,
                "probabilities": probabilities, "coarse_heatmap": cam}


def default_gradcam_layer(model) -> str | None:
    """The last convolution layer whose output still has a spatial extent (LeNet-5's C5 is 1×1,
    which would make every heatmap flat), else the last convolution layer; None without one."""
    import keras

    conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    spatial = [layer for layer in conv if int(layer.output.shape[1] or 0) * int(layer.output.shape[2] or 0) > 1]
    chosen = spatial or conv
    return chosen[-1].name if chosen else None


def pre_activation(layer, inputs):
    """What a Keras convolution computes before its activation: ``Conv2D.call`` without the last step."""
    from keras import ops

    outputs = layer.convolution_op(inputs, layer.kernel)
    if layer.use_bias:
        outputs = ops.add(outputs, ops.reshape(layer.bias, (1,) * (len(outputs.shape) - 1) + (-1,)))
    return outputs


class FilterResponses:
    """Every convolution layer's pre-activation for a batch of raw pixels, by layer name: what
    filter patterns maximise. Exported as the ``filter_responses`` signature."""

    def __init__(self, model):
        import keras

        self.layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        if not self.layers:
            raise ExplainError(f"Model {model.name} has no convolution layer.")
        self.probe = keras.Model(model.inputs, [layer.input for layer in self.layers],
                                 name=f"{model.name}_filter_inputs")
        self.input_shape = tuple(int(size) for size in model.input_shape[1:])
        self.specs = [tf_spec((None, *self.input_shape), "float32", "image")]

    def __call__(self, image):
        import tensorflow as tf

        inputs = self.probe(image, training=False)
        if not isinstance(inputs, list | tuple):
            inputs = [inputs]
        return {layer.name: tf.cast(pre_activation(layer, value), tf.float32)
                for layer, value in zip(self.layers, inputs, strict=True)}


def is_dead(before: float, after: float) -> bool:
    """Whether gradient ascent left a filter's mean response where it was: no gradient at all, so
    the input is unchanged and the response equal up to float32 rounding."""
    return float(after) - float(before) <= 1e-6 * (1.0 + abs(float(before)))


def dead_filters(filters: Sequence[int], gains: Any) -> list[int]:
    """The filters among ``filters`` whose (before, after) mean response in ``gains`` is dead."""
    return [int(index) for index, (before, after) in zip(filters, gains, strict=True) if is_dead(before, after)]


def tf_spec(shape, dtype: str, name: str):
    import tensorflow as tf

    return tf.TensorSpec(shape, getattr(tf, dtype), name=name)


# Filter patterns ------------------------------------------------------------------------------


def deprocess_pattern(image: np.ndarray) -> np.ndarray:
    """One optimised input as uint8: standardised, std 0.1 around 0.5, clipped (the course's way)."""
    values = np.asarray(image, dtype=np.float64)
    values = values - values.mean()
    values = values / (values.std() + 1e-5) * 0.1 + 0.5
    return (np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


class FilterAscent:
    """Gradient ascent on filters' mean activations in one layer, traced once and reused.

    ``activations(images)`` returns the layer's activations (N, h, w, channels) for a float32 batch
    of raw pixels (any batch size).
    """

    def __init__(self, activations: Callable[[Any], Any], input_shape: Sequence[int], *,
                 steps: int = PATTERN_STEPS, step_size: float = PATTERN_STEP_SIZE):
        import tensorflow as tf

        if steps < 1:
            raise ExplainError(f"steps must be at least 1, got {steps}.")
        height, width, channels = (int(size) for size in input_shape)
        self.input_shape = (height, width, channels)
        # Any batch size with one trace: the last chunk is smaller, and a signature may leave it unknown.
        specs = [tf.TensorSpec((None, height, width, channels), tf.float32), tf.TensorSpec((None,), tf.int32)]

        def mean_activation(images, indices):
            values = tf.cast(activations(images), tf.float32)
            # Leave out a 2-pixel border where there is one, as the course does, to avoid edge effects.
            if values.shape[1] is not None and values.shape[1] > 4 and values.shape[2] > 4:
                values = values[:, 2:-2, 2:-2, :]
            per_filter = tf.reduce_mean(values, axis=(1, 2))
            return tf.gather(per_filter, indices, axis=1, batch_dims=1)

        def ascend(images, indices, count):
            for _ in tf.range(count):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    loss = tf.reduce_sum(mean_activation(images, indices))
                gradients = tape.gradient(loss, images)
                scale = tf.sqrt(tf.reduce_mean(tf.square(gradients), axis=(1, 2, 3), keepdims=True)) + 1e-5
                images = images + step_size * gradients / scale
            return images

        self.steps = steps
        self.mean_activation = tf.function(mean_activation, input_signature=specs)
        self.ascend = tf.function(ascend, input_signature=[*specs, tf.TensorSpec((), tf.int32)])

    def run(self, filters: Sequence[int], *, seed: int = 0, batch_size: int = PATTERN_BATCH,
            progress: Callable[[int], None] | None = None,
            check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The patterns (F, H, W, C) as uint8 and each filter's mean response (F, 2) before and
        after the ascent; a dead filter (:func:`is_dead`: the ascent could not move its response)
        is drawn black. ``progress`` is called with the number of filters done; ``check`` every
        ``PATTERN_CHECK_STEPS`` steps (it raises to stop the work: the service's time limits)."""
        import tensorflow as tf

        generator = np.random.default_rng(seed)
        patterns, gains = [], []
        chosen = [int(index) for index in filters]
        for start in range(0, len(chosen), batch_size):
            indices = tf.constant(np.asarray(chosen[start : start + batch_size], dtype=np.int32))
            shape = (int(indices.shape[0]), *self.input_shape)
            # Grey with a little noise first. Where the response is rectified (older exports have no
            # pre-activations), a filter silent there has no gradient to climb, so those filters
            # start again from full-range noise, then from dark noise.
            images = generator.random(shape, dtype=np.float32) * 20.0 + 128.0
            before = self.mean_activation(tf.constant(images), indices).numpy()
            for amplitude in (255.0, 40.0):
                silent = before <= 0
                if not silent.any():
                    break
                candidate = generator.random(shape, dtype=np.float32) * amplitude
                response = self.mean_activation(tf.constant(candidate), indices).numpy()
                better = silent & (response > 0)
                images[better] = candidate[better]
                before = np.where(better, response, before)
            result = tf.constant(images)
            for done in range(0, self.steps, PATTERN_CHECK_STEPS):
                result = self.ascend(result, indices, tf.constant(min(PATTERN_CHECK_STEPS, self.steps - done)))
                if check is not None:
                    check()
            after = self.mean_activation(result, indices).numpy()
            for image, first, last in zip(result.numpy(), before, after, strict=True):
                # A dead filter shows as a black cell rather than as meaningless noise.
                dead = is_dead(first, last)
                patterns.append(np.zeros(self.input_shape, np.uint8) if dead else deprocess_pattern(image))
            gains.append(np.stack([before, after], axis=1))
            if progress is not None:
                progress(int(indices.shape[0]))
        return np.stack(patterns), np.concatenate(gains).astype(np.float32)


# Two sources: a Keras model and an exported SavedModel -------------------------------------------


@dataclass
class GradCamResult:
    """Grad-CAM of one image."""

    class_index: int
    class_name: str
    probability: float
    predicted_index: int
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], the input size
    coarse_heatmap: np.ndarray  # (h, w) at the layer's resolution
    layer: str
    probabilities: np.ndarray


class BaseExplainer:
    """What both sources share: classes, layers and the checks on what is asked."""

    name: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    conv_layers: list[str]
    layer_channels: dict[str, int]
    _ascents: dict[tuple[str, int], FilterAscent]

    def _gradcam_batch(self, images: np.ndarray, classes: np.ndarray, layer: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _activations(self, layer: str) -> Callable[[Any], Any]:
        raise NotImplementedError

    def gradcam_layers(self) -> list[str]:
        """The layers Grad-CAM can use with this source."""
        return self.conv_layers

    def default_gradcam_layer(self) -> str | None:
        return None

    def gradcam(self, image: np.ndarray, target: int | str | None = None,
                layer: str | None = None) -> GradCamResult:
        """Grad-CAM for one image (H, W, C) of raw pixels and a class (default: the predicted one)."""
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.shape != self.input_shape:
            raise ExplainError(f"The image has shape {pixels.shape}; model {self.name} takes {self.input_shape}.")
        chosen_layer = check_conv_layer(layer or self.default_gradcam_layer(), self.conv_layers, self.name)
        if chosen_layer not in self.gradcam_layers():
            raise ExplainError(f"Grad-CAM of {self.name} is available for layer "
                               f"{', '.join(self.gradcam_layers())} only, not {chosen_layer!r}.")
        index = resolve_class(target, self.class_names)
        outputs = self._gradcam_batch(pixels[None], np.asarray([index], np.int32), chosen_layer)
        probabilities = np.asarray(outputs["probabilities"][0], np.float32)
        explained = int(outputs["class_index"][0])
        return GradCamResult(
            class_index=explained, class_name=self.class_names[explained],
            probability=float(probabilities[explained]), predicted_index=int(probabilities.argmax()),
            heatmap=np.asarray(outputs["heatmap"][0], np.float32),
            coarse_heatmap=np.asarray(outputs["coarse_heatmap"][0], np.float32),
            layer=chosen_layer, probabilities=probabilities,
        )

    def filter_patterns(self, layer: str, filters: Sequence[int] | int | None = None, *,
                        steps: int = PATTERN_STEPS, seed: int = 0,
                        progress: Callable[[int], None] | None = None,
                        check: Callable[[], None] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(filter indices, patterns (F, H, W, C) uint8, mean activation before/after (F, 2))."""
        chosen_layer = check_conv_layer(layer, self.conv_layers, self.name)
        indices = check_filters(filters, self.layer_channels[chosen_layer], chosen_layer)
        key = (chosen_layer, steps)
        if key not in self._ascents:  # traced once per layer and step count
            self._ascents[key] = FilterAscent(self._activations(chosen_layer), self.input_shape, steps=steps)
        patterns, gains = self._ascents[key].run(indices, seed=seed, progress=progress, check=check)
        return indices, patterns, gains


class SavedModelExplainer(BaseExplainer):
    """Grad-CAM and filter patterns of an exported model version (SavedModel signatures)."""

    def __init__(self, version_dir: str | Path, metadata: dict[str, Any] | None = None):
        import tensorflow as tf

        self.path = Path(version_dir)
        if metadata is None:
            from cnnkit.repository import read_metadata

            metadata = read_metadata(self.path)
        self.metadata = metadata
        self.name = str(metadata.get("name", self.path.parent.name))
        self.class_names = list(metadata["class_names"])
        self.input_shape = tuple(int(size) for size in metadata["input"]["shape"])  # type: ignore[assignment]
        conv = [layer for layer in metadata["feature_layers"] if "Conv" in layer["kind"]]
        self.conv_layers = [layer["name"] for layer in conv]
        self.layer_channels = {layer["name"]: int(layer["output_shape"][-1]) for layer in conv}
        self.loaded = tf.saved_model.load(str(self.path))
        self.gradcam_layer = (metadata.get("explain") or {}).get("gradcam_layer")
        self._ascents: dict[tuple[str, int], FilterAscent] = {}

    def gradcam_layers(self) -> list[str]:
        if GRADCAM_SIGNATURE not in self.loaded.signatures or not self.gradcam_layer:
            raise ExplainError(
                f"Model {self.name} version {self.metadata.get('version')} was exported without a "
                f"Grad-CAM signature (before cnnkit had one): export its run again with `cnnkit export`."
            )
        return [self.gradcam_layer]

    def default_gradcam_layer(self) -> str | None:
        return self.gradcam_layer

    def _gradcam_batch(self, images, classes, layer):
        import tensorflow as tf

        outputs = self.loaded.signatures[GRADCAM_SIGNATURE](image=tf.constant(images),
                                                           class_index=tf.constant(classes))
        return {name: value.numpy() for name, value in outputs.items()}

    def _activations(self, layer):
        # Versions exported before the filter_responses signature offer only the rectified maps.
        if FILTER_RESPONSES_SIGNATURE in self.loaded.signatures:
            responses = self.loaded.signatures[FILTER_RESPONSES_SIGNATURE]
            return lambda images: responses(image=images)[layer]
        signature = self.loaded.signatures[FEATURE_MAPS_SIGNATURE]
        return lambda images: signature(image=images)[layer]
