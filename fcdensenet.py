"""FC-DenseNet (Jegou et al. 2017, "The One Hundred Layers Tiramisu") for Keras 3, channels-last.

    model = build_model("FCDenseNet56", number_channels=1, number_classes=2)
    softmax = model(batch, training=False)                 # float32 NHWC batch, H and W multiples of 32

This module builds models and nothing else: no file I/O. saved_model.py exports and loads them,
receptive_field.py measures how far a pixel's context reaches.

Architecture (the paper's; the reference differs where noted):
- a 3x3 convolution with 48 filters (no bias, L2 as the reference);
- 5 dense blocks down, each followed by a transition down (BN, ReLU, 1x1 convolution keeping the
  filter count, dropout, 2x2 max pool; the reference has no dropout here);
- a bottleneck dense block;
- 5 transitions up (3x3 stride-2 transposed convolution over only the new feature maps of the block
  below; linear as in the paper, the reference adds a ReLU), each concatenated with its skip
  connection and followed by a dense block whose new maps alone go up to the next transition;
- a 1x1 convolution to the classes over the last block's full stack (as the paper's code; the
  reference uses only its new maps), then a float32 softmax.
A dense layer is BN (momentum 0.9), ReLU, 3x3 convolution (growth-rate filters, no bias), dropout.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from fcdn.data.records import SIZE_FACTOR  # noqa: F401 (part of this module's API)
from fcdn.model.input_size import NUMBER_POOLS, check_input_size  # noqa: F401 (part of this module's API)
from fcdn.model.variants import BN_MOMENTUM, DEFAULT_VARIANT, VARIANTS  # noqa: F401 (part of this module's API)

CUSTOM_NAME = "FCDenseNet-custom"
FIRST_FILTERS = 48
LOGITS_LAYER = "logits"


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _full_block_list(layers_per_block):
    """The 6 down+bottleneck block sizes mirrored into all 11 (5 down, bottleneck, 5 up)."""
    if isinstance(layers_per_block, (int, np.integer)) and not isinstance(layers_per_block, bool):
        layers_per_block = [layers_per_block] * (NUMBER_POOLS + 1)
    layers_per_block = list(layers_per_block)
    if len(layers_per_block) != NUMBER_POOLS + 1:
        raise ValueError(
            f"layers_per_block must be an integer or {NUMBER_POOLS + 1} integers "
            f"(5 down blocks and the bottleneck; the up path mirrors them), got {layers_per_block!r}"
        )
    for count in layers_per_block:
        _check_positive_int("every entry of layers_per_block", count)
    down = [int(count) for count in layers_per_block]
    return down + down[-2::-1]


def resolve_architecture(variant=DEFAULT_VARIANT, layers_per_block=None, growth_rate=None,
                         first_filters=FIRST_FILTERS):
    """Return (name, 11 block sizes, growth rate, first filters) for a variant and its overrides.

    The name is the variant's when the result is exactly a paper variant, else "FCDenseNet-custom".
    `variant=None` asks for a custom build: then layers_per_block and growth_rate are required.
    """
    if variant is None:
        if layers_per_block is None or growth_rate is None:
            raise ValueError("a custom FC-DenseNet (variant=None) needs layers_per_block and growth_rate")
        defaults = {}
    elif variant in VARIANTS:
        defaults = VARIANTS[variant]
    else:
        raise ValueError(f"unknown FC-DenseNet variant {variant!r}; choose one of {sorted(VARIANTS)}")
    blocks = _full_block_list(defaults["layers_per_block"] if layers_per_block is None else layers_per_block)
    growth_rate = _check_positive_int(
        "growth_rate", defaults["growth_rate"] if growth_rate is None else growth_rate)
    first_filters = _check_positive_int("first_filters", first_filters)
    name = CUSTOM_NAME
    for known, config in VARIANTS.items():
        if (blocks == _full_block_list(config["layers_per_block"])
                and growth_rate == config["growth_rate"] and first_filters == FIRST_FILTERS):
            name = known
    return name, blocks, growth_rate, first_filters


# ----------------------------------------------------------------------------------------------
# the model


def _dense_layer(x, growth_rate, dropout_rate, batch_norm_momentum, name):
    x = layers.BatchNormalization(momentum=batch_norm_momentum, name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    if dropout_rate > 0:
        x = layers.Dropout(dropout_rate, name=f"{name}_dropout")(x)
    return x


def _dense_block(x, number_layers, growth_rate, dropout_rate, batch_norm_momentum, name):
    """Return (the input stacked with every new map, the new maps alone)."""
    new_maps = []
    for index in range(number_layers):
        new = _dense_layer(x, growth_rate, dropout_rate, batch_norm_momentum, f"{name}_layer{index}")
        new_maps.append(new)
        x = layers.Concatenate(name=f"{name}_stack{index}")([x, new])
    return x, new_maps


def _transition_down(x, dropout_rate, batch_norm_momentum, regularizer, name):
    filters = x.shape[-1]
    x = layers.BatchNormalization(momentum=batch_norm_momentum, name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.Conv2D(filters, 1, padding="same", use_bias=False, kernel_regularizer=regularizer,
                      name=f"{name}_conv")(x)
    if dropout_rate > 0:
        x = layers.Dropout(dropout_rate, name=f"{name}_dropout")(x)
    return layers.MaxPooling2D(2, strides=2, name=f"{name}_pool")(x)


def _transition_up(new_maps, regularizer, name):
    # upsampling only the block's new maps (not its input) is what keeps the up path affordable
    x = new_maps[0] if len(new_maps) == 1 else layers.Concatenate(name=f"{name}_new_maps")(new_maps)
    return layers.Conv2DTranspose(x.shape[-1], 3, strides=2, padding="same",
                                  kernel_regularizer=regularizer, name=f"{name}_conv")(x)


def build_model(variant=DEFAULT_VARIANT, number_channels=1, number_classes=2, dropout_rate=0.2,
                layers_per_block=None, growth_rate=None, first_filters=FIRST_FILTERS,
                weight_decay=1e-4, batch_norm_momentum=BN_MOMENTUM):
    """Build an FC-DenseNet as a Keras Functional model: (N, H, W, C) float32 -> (N, H, W, classes) softmax.

    variant: "FCDenseNet56" (default), "FCDenseNet67", "FCDenseNet103", or None for a custom build;
    layers_per_block (an integer or 6 integers: 5 down blocks and the bottleneck, mirrored up) and
    growth_rate override the variant's. H and W must be multiples of 32 at call time. The softmax is
    float32 even under a mixed_float16 policy. model.name is the variant (or "FCDenseNet-custom").
    L2 `weight_decay` applies to the first convolution and the transitions (as the reference); the
    trainer must add `model.losses` to its loss for it to act. `batch_norm_momentum` is the
    BatchNormalization layers' moving-statistics momentum: the model's test-time normalisation is an
    average over about the last 1 / (1 - momentum) training steps.
    """
    name, blocks, growth_rate, first_filters = resolve_architecture(
        variant, layers_per_block, growth_rate, first_filters)
    number_channels = _check_positive_int("number_channels", number_channels)
    number_classes = _check_positive_int("number_classes", number_classes, minimum=2)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if not 0.0 < batch_norm_momentum < 1.0:
        raise ValueError(f"batch_norm_momentum must be in (0, 1), got {batch_norm_momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None

    inputs = keras.Input(shape=(None, None, number_channels), dtype="float32", name="images")
    x = layers.Conv2D(first_filters, 3, padding="same", use_bias=False, kernel_regularizer=regularizer,
                      name="first_conv")(inputs)
    skips = []
    for index in range(NUMBER_POOLS):
        x, _ = _dense_block(x, blocks[index], growth_rate, dropout_rate, batch_norm_momentum, f"down{index}")
        skips.append(x)
        x = _transition_down(x, dropout_rate, batch_norm_momentum, regularizer, f"down{index}_td")
    x, new_maps = _dense_block(x, blocks[NUMBER_POOLS], growth_rate, dropout_rate, batch_norm_momentum,
                               "bottleneck")
    for index in range(NUMBER_POOLS):
        up = _transition_up(new_maps, regularizer, f"up{index}_tu")
        x = layers.Concatenate(name=f"up{index}_skip")([up, skips[-1 - index]])
        x, new_maps = _dense_block(x, blocks[NUMBER_POOLS + 1 + index], growth_rate, dropout_rate,
                                   batch_norm_momentum, f"up{index}")
    x = layers.Conv2D(number_classes, 1, padding="same", name=LOGITS_LAYER)(x)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def make_predict_function(model, jit_compile=False):
    """A compiled inference-mode forward pass: f(float32 NHWC batch) -> softmax tensor.

    One trace serves every batch and image size (the signature leaves N, H and W open). On the CPU
    jit_compile=False is the faster choice (see bench/bench_model.py).
    """
    spec = tf.TensorSpec([None, None, None, model.input_shape[-1]], tf.float32, name="images")

    def forward(images):
        return model(images, training=False)

    return tf.function(forward, input_signature=[spec], jit_compile=jit_compile)
