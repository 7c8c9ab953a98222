"""How far a pixel's context reaches in an FC-DenseNet: the receptive-field radius.

Inference keeps, of every tile, only the pixels whose whole context lies inside it, so it needs this
radius: the theoretical one from the architecture, and the effective one measured once by a gradient
probe when the model is exported (saved_model.py stores it in the model's metadata).

    radius = measure_effective_radius(model)     # 128 for an untrained FCDenseNet56
    cap = theoretical_radius("FCDenseNet56")     # 384
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import fcdensenet
from fcdn.data.records import SIZE_FACTOR


def _round_up(value, factor=SIZE_FACTOR):
    return int(factor * np.ceil(value / factor))


def _blocks_radius(blocks):
    # each 3x3 convolution reaches one pixel further at its own resolution: 2**depth input pixels
    scales = [2**depth for depth in range(fcdensenet.NUMBER_POOLS + 1)] + [2**depth for depth in range(fcdensenet.NUMBER_POOLS - 1, -1, -1)]
    return 1 + sum(count * scale for count, scale in zip(blocks, scales))


def _graph_radius(model):
    """Walk a Functional model: (scale, radius) per tensor, 3x3 convolutions counted as _blocks_radius."""
    state = {id(tensor): (1, 0) for tensor in model.inputs}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            inputs = [state.get(id(tensor)) for tensor in node.input_tensors]
            if not inputs or None in inputs:
                continue
            scale = min(entry[0] for entry in inputs)
            radius = max(entry[1] for entry in inputs)
            if isinstance(layer, layers.Conv2DTranspose):
                scale //= layer.strides[0]
            elif isinstance(layer, layers.Conv2D):
                radius += (layer.kernel_size[0] - 1) // 2 * layer.dilation_rate[0] * scale
                scale *= layer.strides[0]
            elif isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
                scale *= layer.strides[0]
            for tensor in node.output_tensors:
                state[id(tensor)] = (scale, radius)
    return max(state[id(tensor)][1] for tensor in model.outputs)


def theoretical_radius(variant_or_model):
    """The theoretical receptive-field radius in pixels, rounded up to a multiple of 32.

    Takes a variant name or a model built here. Convention of the paper and the reference (it gives
    their 384 / 480 / 1120): every 3x3 convolution adds 2**depth pixels, pooling and transposed
    convolutions add nothing (they widen the exact field by a few tens of pixels: the input gradient
    of an FCDenseNet56 reaches about 400 pixels from the centre).
    """
    if isinstance(variant_or_model, keras.Model):
        return _round_up(_graph_radius(variant_or_model))
    _, blocks, _, _ = fcdensenet.resolve_architecture(variant_or_model)
    return _round_up(_blocks_radius(blocks))


def measure_effective_radius(model, relative_threshold=1e-6, probe_height=2 * SIZE_FACTOR, seed=0):
    """The effective receptive-field radius, by a gradient probe (the reference's method).

    Feeds one random-noise image of probe_height x (2 * theoretical + 64) pixels in inference mode
    (dropout off, BN on its moving statistics), back-propagates a fixed random mix of the centre
    pixel's logits to the input, and takes the horizontal extent over which the input gradient is
    non-negligible: mean |gradient| over channels, max over rows, above relative_threshold times its
    peak. Half that extent is rounded up to a multiple of 32 and capped by theoretical_radius(model).

    The reference thresholded |grad| > 1e-8 absolutely, which depends on the scale of the weights and
    of the probe loss; a threshold relative to the peak does not. The default, six decades below the
    peak (about float32's resolution), gives 128 for an untrained FCDenseNet56 and 160 for an untrained
    FCDenseNet103 (their gradients decay fast; trained weights spread them); relative_threshold=0
    returns the whole (capped) field, since every pixel inside it gets some gradient.
    """
    cap = theoretical_radius(model)
    width = 2 * cap + 2 * SIZE_FACTOR
    fcdensenet.check_input_size(probe_height, width)
    probe_model = model
    if fcdensenet.LOGITS_LAYER in [layer.name for layer in model.layers]:
        # the logits do not saturate the way a softmax can, which would flatten the gradient
        probe_model = keras.Model(model.inputs, model.get_layer(fcdensenet.LOGITS_LAYER).output)
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.standard_normal((1, probe_height, width, model.input_shape[-1]), dtype=np.float32))
    mix = tf.constant(rng.standard_normal(probe_model.output_shape[-1]), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        centre = probe_model(images, training=False)[0, probe_height // 2, width // 2, :]
        target = tf.reduce_sum(tf.cast(centre, tf.float32) * mix)
    gradient = np.abs(tape.gradient(target, images).numpy()[0]).mean(axis=-1)
    profile = gradient.max(axis=0)
    peak = profile.max()
    if not np.isfinite(peak) or peak <= 0:
        return cap
    columns = np.nonzero(profile > relative_threshold * peak)[0]
    extent = max(width // 2 - columns.min(), columns.max() - width // 2)
    return min(_round_up(max(extent, 1)), cap)
