"""The model zoo: a registry of small builder functions, one per course classifier.

Every model takes raw pixel values (0..255, uint8 or float) and does its own preprocessing
(rescaling, or VGG's channel-mean subtraction) in its first layers, so that SavedModel, ONNX, the
server and the clients all send the same raw images. Layers carry spelled-out names (``conv1``,
``pool1``...) because those names address feature maps in reports and in the service.

    >>> from cnnkit.training.models import create_model, list_models
    >>> model = create_model("lenet5")
    >>> model.count_params()
    61706
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras
from keras import layers

from cnnkit.errors import ModelError

_REGISTRY: dict[str, Callable[..., keras.Model]] = {}

VGG16_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
# ImageNet channel means in BGR order, as keras.applications.vgg16.preprocess_input uses them.
VGG_BGR_MEANS = (103.939, 116.779, 123.68)


def register_model(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
    """Add a builder to the registry under its function name."""
    _REGISTRY[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_REGISTRY)



def create_model(name: str, **overrides) -> keras.Model:
    """Build a registered model; ``overrides`` go to its builder (input_shape, num_classes...)."""
    if name not in _REGISTRY:
        raise ModelError(f"Unknown model {name!r}; available models: {', '.join(list_models())}.")
    try:
        return _REGISTRY[name](**overrides)
    except TypeError as error:
        raise ModelError(f"Bad arguments for model {name!r}: {error}") from error


def _classifier_head(x, num_classes: int, name: str = "predictions"):
    """Softmax over the classes, or one sigmoid unit for two classes when asked for.

    The output layer always computes in float32 so that mixed precision keeps stable probabilities.
    """
    if num_classes == 1:
        return layers.Dense(1, activation="sigmoid", dtype="float32", name=name)(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name=name)(x)


def _check_shape(input_shape: Sequence[int], minimum: int = 1) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ModelError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
    if shape[0] < minimum or shape[1] < minimum:
        raise ModelError(f"input_shape {shape} is too small: this model needs at least {minimum}px.")
    return shape  # type: ignore[return-value]


def _image_input(input_shape: Sequence[int]):
    return keras.Input(shape=tuple(input_shape), dtype="float32", name="image")


@register_model
def lenet5(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> keras.Model:
    """LeNet-5 as the course seeds it: tanh convolutions and average pooling."""
    shape = _check_shape(input_shape, minimum=12)
    inputs = _image_input(shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(6, 5, padding="same", activation="tanh", name="conv1")(x)
    x = layers.AveragePooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="tanh", name="conv2")(x)
    x = layers.AveragePooling2D(2, name="pool2")(x)
    # C5 covers the whole remaining 5x5 map at 28x28 input, as in the paper.
    x = layers.Conv2D(120, 5, activation="tanh", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(84, activation="tanh", name="fc1")(x)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="lenet5")


@register_model
def mnist_convnet(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> keras.Model:
    """The course's small digit convnet: Conv 32-64-64, two max-pools, Dense 64."""
    shape = _check_shape(input_shape, minimum=16)
    inputs = _image_input(shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="mnist_convnet")


@register_model
def fashion_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> keras.Model:
    """The course's Fashion-MNIST network: two 2x2 convolutions with dropout, Dense 256."""
    shape = _check_shape(input_shape, minimum=4)
    inputs = _image_input(shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(64, 2, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(0.3, name="dropout1")(x)
    x = layers.Conv2D(32, 2, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(0.3, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5, name="dropout3")(x)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="fashion_cnn")


def _conv_block_stack(
    inputs,
    filters: Sequence[int],
    convs_per_block: int,
    batch_norm: bool,
    l2: float,
    dropouts: Sequence[float],
    norm_first: bool = False,
):
    """Blocks of 3x3 convolutions (ReLU, optional batch norm after each), a 2x2 max-pool and dropout
    per block, then Flatten and a last dropout: ``conv1``, ``bn1``... ``pool1``, ``dropout1``...

    ``dropouts`` has one rate per block and one before the classifier. With ``norm_first`` the batch
    norm sits between each convolution (then without a bias, which the norm would cancel) and its
    ReLU, as in ResNets, instead of after the ReLU as in the course.
    """
    if len(dropouts) != len(filters) + 1:
        raise ModelError(f"dropouts needs {len(filters) + 1} rates ({len(filters)} blocks, classifier), "
                         f"got {list(dropouts)!r}.")
    if convs_per_block < 1 or not filters or min(filters) < 1:
        raise ModelError("conv blocks need at least one block of at least one convolution with filters >= 1.")
    regularizer = keras.regularizers.L2(l2) if l2 else None
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    conv_index = 0
    for block, width in enumerate(filters, start=1):
        for _ in range(convs_per_block):
            conv_index += 1
            if batch_norm and norm_first:
                x = layers.Conv2D(int(width), 3, padding="same", use_bias=False,
                                  kernel_regularizer=regularizer, name=f"conv{conv_index}")(x)
                x = layers.BatchNormalization(name=f"bn{conv_index}")(x)
                x = layers.ReLU(name=f"relu{conv_index}")(x)
                continue
            x = layers.Conv2D(
                int(width), 3, padding="same", activation="relu",
                kernel_regularizer=regularizer, name=f"conv{conv_index}",
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"bn{conv_index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
        x = layers.Dropout(dropouts[block - 1], name=f"dropout{block}")(x)
    x = layers.Flatten(name="flatten")(x)
    return layers.Dropout(dropouts[-1], name=f"dropout{len(filters) + 1}")(x)


@register_model
def cifar10_cnn(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    batch_norm: bool = False,
    l2: float = 1e-4,
    dropouts: Sequence[float] = (0.2, 0.2, 0.2, 0.4),
) -> keras.Model:
    """Three blocks of two 3x3 convolutions (32, 64, 128) with L2, pooling and dropout.

    With ``batch_norm`` a BatchNormalization layer follows each activation, as in the course.
    ``dropouts`` gives the rate after each of the three blocks and before the classifier.
    """
    shape = _check_shape(input_shape, minimum=8)
    if len(dropouts) != 4:
        raise ModelError(f"dropouts needs four rates (three blocks, classifier), got {dropouts!r}.")
    inputs = _image_input(shape)
    x = _conv_block_stack(inputs, (32, 64, 128), 2, batch_norm, l2, dropouts)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="cifar10_cnn_bn" if batch_norm else "cifar10_cnn")


@register_model
def conv_blocks(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    filters: Sequence[int] = (64, 128, 256),
    convs_per_block: int = 2,
    batch_norm: bool = True,
    l2: float = 5e-4,
    dropouts: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
    norm_first: bool = False,
) -> keras.Model:
    """The course's conv-block family, any width: ``cifar10_cnn`` with ``filters`` per block.

    For 28×28 grey images (Fashion-MNIST) as for 32×32 colour ones; each block halves the size.
    ``norm_first`` puts each batch norm before its ReLU (convolution, batch norm, ReLU).
    """
    shape = _check_shape(input_shape, minimum=2 ** len(filters))
    inputs = _image_input(shape)
    x = _conv_block_stack(inputs, filters, convs_per_block, batch_norm, l2, dropouts, norm_first)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="conv_blocks")


@register_model
def catsdogs_small(
    input_shape: Sequence[int] = (150, 150, 3), num_classes: int = 1, dropout: float = 0.5
) -> keras.Model:
    """The course's cats-vs-dogs convnet: Conv 32-64-128-128 (valid) with max-pools, Dense 512.

    ``num_classes=1`` is the course's single sigmoid unit (probability of the second class).
    """
    shape = _check_shape(input_shape, minimum=30)
    inputs = _image_input(shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for index, filters in enumerate((32, 64, 128, 128), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(512, activation="relu", name="fc1")(x)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="catsdogs_small")


@keras.saving.register_keras_serializable(package="cnnkit")
class VGGPreprocess(layers.Layer):
    """``keras.applications.vgg16.preprocess_input`` as a layer: RGB to BGR, minus ImageNet means.

    Keeping it inside the model means SavedModel and ONNX exports take raw RGB pixels too.
    """

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(VGG_BGR_MEANS, dtype=inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _vgg16_base(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The VGG16 convolutional base with ImageNet weights, a local weights file, or none."""
    if weights is not None and weights.lower() == "none":
        weights = None
    if weights == "imagenet":
        from cnnkit.settings import load_settings

        local = load_settings().vgg16_weights  # CNNKIT_VGG16_WEIGHTS: the file, named once
        if local is not None:
            weights = str(local.expanduser())
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ModelError(
            f"VGG16 weights file {weights} does not exist. Pass --weights with the path of "
            f"{VGG16_WEIGHTS_FILE}, 'imagenet' to download it, or 'none' for random weights."
        )
    try:
        return keras.applications.VGG16(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as error:  # noqa: BLE001 - downloads fail with a plain Exception.
        if weights == "imagenet":
            raise ModelError(
                f"Could not fetch the VGG16 ImageNet weights ({error}). Download "
                f"{VGG16_WEIGHTS_FILE} elsewhere and pass it with --weights FILE "
                f"(or --weights none to train from random weights)."
            ) from error
        raise ModelError(f"Could not load VGG16 weights from {weights}: {error}") from error


@register_model
def vgg16_transfer(
    input_shape: Sequence[int] = (150, 150, 3),
    num_classes: int = 1,
    weights: str | None = "imagenet",
    dense_units: int = 256,
    dropout: float = 0.5,
) -> keras.Model:
    """VGG16 convolutional base (frozen) + Dense head, VGG preprocessing inside the model.

    The base's layers are applied in the outer model itself rather than as a nested model, so every
    block is addressable by name (``block5_conv1``) for fine-tuning and feature maps. VGG16 has no
    batch normalization, so the frozen phase behaves the same in training and inference mode.
    Use :func:`set_trainable_from` for the fine-tuning phase.
    """
    shape = _check_shape(input_shape, minimum=32)
    if shape[2] != 3:
        raise ModelError(f"VGG16 needs RGB input (3 channels), got input_shape {shape}.")
    base = _vgg16_base(shape, weights)
    inputs = _image_input(shape)
    x = VGGPreprocess(name="vgg_preprocess")(inputs)
    for base_layer in base.layers[1:]:
        # A fresh copy of each layer with the base's weights: calling the base's own layers again
        # would give them a second graph node, and `layer.output` (feature maps, Grad-CAM, export)
        # would then point into the base model instead of this one.
        layer = base_layer.__class__.from_config(base_layer.get_config())
        layer.trainable = False
        x = layer(x)
        layer.set_weights(base_layer.get_weights())
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="fc1")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = _classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="vgg16_transfer")


def set_trainable_from(model: keras.Model, layer_name: str) -> list[str]:
    """Unfreeze ``layer_name`` and every layer after it; freeze the layers before it.

    Returns the names of the trainable layers. The model must be recompiled afterwards.
    """
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ModelError(f"Model {model.name} has no layer {layer_name!r}; layers: {', '.join(names)}.")
    start = names.index(layer_name)
    for index, layer in enumerate(model.layers):
        layer.trainable = index >= start
    return [layer.name for layer in model.layers if layer.trainable and layer.weights]


def feature_layers(model: keras.Model) -> list[str]:
    """Names of the convolution and pooling layers, in order: the model's feature maps."""
    kinds = (layers.Conv2D, layers.MaxPooling2D, layers.AveragePooling2D)
    return [layer.name for layer in model.layers if isinstance(layer, kinds)]


def float32_copy(model: keras.Model) -> keras.Model:
    """The model computing in float32 in every layer, with the same weights.

    Models trained on GPUs use the mixed_float16 policy, which their saved files keep; exports
    (SavedModel, ONNX) and their parity checks want float32 throughout. A model that already
    computes in float32 everywhere comes back as it is.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def float32_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=float32_layer)
    copy.set_weights(model.get_weights())
    return copy
