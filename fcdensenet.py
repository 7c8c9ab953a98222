"""FC-DenseNet (Jegou et al. 2017, "The One Hundred Layers Tiramisu") for Keras 3, channels-last.

    model = build_model("FCDenseNet56", number_channels=1, number_classes=2)
    export_saved_model(model, "out/saved_model")          # measures the receptive-field radius once
    predict, metadata = load_saved_model("out/saved_model")
    softmax = predict(batch)                               # float32 NHWC batch, H and W multiples of 32

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

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from records import SIZE_FACTOR

VARIANTS = {
    "FCDenseNet56": {"layers_per_block": (4, 4, 4, 4, 4, 4), "growth_rate": 12},
    "FCDenseNet67": {"layers_per_block": (5, 5, 5, 5, 5, 5), "growth_rate": 16},
    "FCDenseNet103": {"layers_per_block": (4, 5, 7, 10, 12, 15), "growth_rate": 16},
}
DEFAULT_VARIANT = "FCDenseNet56"
CUSTOM_NAME = "FCDenseNet-custom"
FIRST_FILTERS = 48
NUMBER_POOLS = 5  # 2**NUMBER_POOLS == SIZE_FACTOR
BN_MOMENTUM = 0.9
METADATA_FILENAME = "fcdensenet_metadata.json"
METADATA_FORMAT_VERSION = 1
NORMALIZATION = "zscore_per_channel"
SERVING_ENDPOINT = "serve"
LOGITS_LAYER = "logits"


# ----------------------------------------------------------------------------------------------
# argument checks


def check_input_size(height, width):
    """Raise ValueError unless height and width are positive multiples of SIZE_FACTOR (32)."""
    for name, value in (("height", height), ("width", width)):
        try:
            valid = int(value) == value and value > 0 and value % SIZE_FACTOR == 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"image {name} {value} is not a positive multiple of {SIZE_FACTOR} "
                f"(the FC-DenseNet pools {NUMBER_POOLS} times)"
            )


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


def _dense_layer(x, growth_rate, dropout_rate, name):
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.Conv2D(growth_rate, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    if dropout_rate > 0:
        x = layers.Dropout(dropout_rate, name=f"{name}_dropout")(x)
    return x


def _dense_block(x, number_layers, growth_rate, dropout_rate, name):
    """Return (the input stacked with every new map, the new maps alone)."""
    new_maps = []
    for index in range(number_layers):
        new = _dense_layer(x, growth_rate, dropout_rate, f"{name}_layer{index}")
        new_maps.append(new)
        x = layers.Concatenate(name=f"{name}_stack{index}")([x, new])
    return x, new_maps


def _transition_down(x, dropout_rate, regularizer, name):
    filters = x.shape[-1]
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
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
                weight_decay=1e-4):
    """Build an FC-DenseNet as a Keras Functional model: (N, H, W, C) float32 -> (N, H, W, classes) softmax.

    variant: "FCDenseNet56" (default), "FCDenseNet67", "FCDenseNet103", or None for a custom build;
    layers_per_block (an integer or 6 integers: 5 down blocks and the bottleneck, mirrored up) and
    growth_rate override the variant's. H and W must be multiples of 32 at call time. The softmax is
    float32 even under a mixed_float16 policy. model.name is the variant (or "FCDenseNet-custom").
    L2 `weight_decay` applies to the first convolution and the transitions (as the reference); the
    trainer must add `model.losses` to its loss for it to act.
    """
    name, blocks, growth_rate, first_filters = resolve_architecture(
        variant, layers_per_block, growth_rate, first_filters)
    number_channels = _check_positive_int("number_channels", number_channels)
    number_classes = _check_positive_int("number_classes", number_classes, minimum=2)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None

    inputs = keras.Input(shape=(None, None, number_channels), dtype="float32", name="images")
    x = layers.Conv2D(first_filters, 3, padding="same", use_bias=False, kernel_regularizer=regularizer,
                      name="first_conv")(inputs)
    skips = []
    for index in range(NUMBER_POOLS):
        x, _ = _dense_block(x, blocks[index], growth_rate, dropout_rate, f"down{index}")
        skips.append(x)
        x = _transition_down(x, dropout_rate, regularizer, f"down{index}_td")
    x, new_maps = _dense_block(x, blocks[NUMBER_POOLS], growth_rate, dropout_rate, "bottleneck")
    for index in range(NUMBER_POOLS):
        up = _transition_up(new_maps, regularizer, f"up{index}_tu")
        x = layers.Concatenate(name=f"up{index}_skip")([up, skips[-1 - index]])
        x, new_maps = _dense_block(x, blocks[NUMBER_POOLS + 1 + index], growth_rate, dropout_rate,
                                   f"up{index}")
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


# ----------------------------------------------------------------------------------------------
# receptive field


def _round_up(value, factor=SIZE_FACTOR):
    return int(factor * np.ceil(value / factor))


def _blocks_radius(blocks):
    # each 3x3 convolution reaches one pixel further at its own resolution: 2**depth input pixels
    scales = [2**depth for depth in range(NUMBER_POOLS + 1)] + [2**depth for depth in range(NUMBER_POOLS - 1, -1, -1)]
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
    _, blocks, _, _ = resolve_architecture(variant_or_model)
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
    check_input_size(probe_height, width)
    probe_model = model
    if LOGITS_LAYER in [layer.name for layer in model.layers]:
        # the logits do not saturate the way a softmax can, which would flatten the gradient
        probe_model = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)
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


# ----------------------------------------------------------------------------------------------
# SavedModel export and load


def _model_metadata(model, radius, extra_metadata):
    metadata = {
        "format_version": METADATA_FORMAT_VERSION,
        "variant": model.name,
        "number_classes": int(model.output_shape[-1]),
        "number_channels": int(model.input_shape[-1]),
        "radius": int(radius),
        "theoretical_radius": theoretical_radius(model),
        "size_factor": SIZE_FACTOR,
        "normalization": NORMALIZATION,
        "serving_endpoint": SERVING_ENDPOINT,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    extra_metadata = dict(extra_metadata or {})
    clashes = sorted(set(extra_metadata) & set(metadata))
    if clashes:
        raise ValueError(f"extra_metadata may not redefine {clashes}")
    metadata.update(extra_metadata)
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"extra_metadata is not JSON-serialisable: {error}") from None
    return metadata


def _write_saved_model(model, directory, metadata):
    spec = tf.TensorSpec([None, None, None, metadata["number_channels"]], tf.float32, name="images")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_ENDPOINT, lambda images: model(images, training=False), input_signature=[spec])
    archive.write_out(directory, verbose=False)
    with open(os.path.join(directory, METADATA_FILENAME), "w") as handle:
        json.dump(metadata, handle, indent=2, sort_keys=True)
        handle.write("\n")


def export_saved_model(model, path, extra_metadata=None, radius=None):
    """Write `model` as a self-describing SavedModel directory at `path`, atomically.

    The serving endpoint "serve" takes float32 [N, H, W, C] (H, W multiples of 32) and returns the
    softmax; fcdensenet_metadata.json inside the directory carries the variant, class and channel
    counts, radius (measured here by measure_effective_radius unless given), theoretical radius,
    size factor, normalisation, versions and extra_metadata. The export is built in a temporary
    directory beside `path` and renamed into place; an existing export at `path` is replaced only
    once the new one is complete. Returns the metadata.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not _is_our_export(path):
        raise ValueError(f"{path}: exists and is not an FC-DenseNet SavedModel; refusing to replace it")
    if radius is None:
        radius = measure_effective_radius(model)
    metadata = _model_metadata(model, radius, extra_metadata)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        _write_saved_model(model, staging, metadata)
        replace_directory(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return metadata


def _is_our_export(path):
    return os.path.isdir(path) and (
        not os.listdir(path) or os.path.isfile(os.path.join(path, METADATA_FILENAME)))


def replace_directory(source, target):
    """Rename a finished directory onto target; an existing target is removed only once it is replaced."""
    if not os.path.exists(target):
        os.rename(source, target)
        return
    parking = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    previous = os.path.join(parking, "previous")
    os.rename(target, previous)
    try:
        os.rename(source, target)
    except OSError:
        os.rename(previous, target)
        raise
    finally:
        shutil.rmtree(parking, ignore_errors=True)


def read_metadata(path):
    """The metadata dict of an export; ValueError (one line, naming the path) if it is not one of ours."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such SavedModel directory")
    metadata_path = os.path.join(path, METADATA_FILENAME)
    if not os.path.isfile(metadata_path):
        raise ValueError(f"{path}: not an FC-DenseNet SavedModel (no {METADATA_FILENAME})")
    try:
        with open(metadata_path) as handle:
            metadata = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{metadata_path}: unreadable metadata: {error}") from None
    required = ("variant", "number_classes", "number_channels", "radius", "size_factor", "normalization")
    missing = [key for key in required if not isinstance(metadata, dict) or key not in metadata]
    if missing:
        raise ValueError(f"{metadata_path}: metadata lacks {missing}")
    return metadata


def load_saved_model(path):
    """Load an export: return (predict, metadata).

    predict(batch) takes a float32 NHWC batch (numpy or tensor; H, W positive multiples of 32, C the
    model's channel count) and returns the softmax as a float32 numpy array (N, H, W, classes).
    Raises ValueError with a one-line message naming the path if it is missing or not one of ours.
    """
    metadata = read_metadata(path)
    try:
        loaded = tf.saved_model.load(os.fspath(path))
        serve = getattr(loaded, metadata.get("serving_endpoint", SERVING_ENDPOINT))
    except Exception as error:  # TF raises many types here; the user needs the path and the gist
        gist = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot load the SavedModel: {gist}") from None
    channels = metadata["number_channels"]

    def predict(batch):
        batch = tf.convert_to_tensor(batch, dtype_hint=tf.float32)
        if batch.shape.rank != 4 or batch.shape[-1] != channels:
            raise ValueError(f"predict wants an NHWC batch with {channels} channel(s), got shape {batch.shape}")
        check_input_size(batch.shape[1], batch.shape[2])
        return serve(tf.cast(batch, tf.float32)).numpy()

    predict.saved_model = loaded  # the restored variables live as long as the function
    return predict, metadata
