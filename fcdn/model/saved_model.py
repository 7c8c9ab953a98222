"""FC-DenseNet SavedModels that describe themselves: export, metadata and loading.

    metadata = export_saved_model(model, "runs/x/saved_model")   # measures the radius once
    predict, metadata = load_saved_model("runs/x/saved_model")
    softmax = predict(batch)          # float32 NHWC batch, H and W multiples of 32, z-scored per channel

The export directory holds the SavedModel (endpoint "serve": images -> softmax) and
fcdensenet_metadata.json: variant, classes, channels, receptive-field radius, size factor,
normalisation, versions and what the trainer adds, so inference needs only the path.
"""

import contextlib
import json
import os

import keras
import tensorflow as tf

import fcdensenet
from fcdn.common import atomic_files, errors
from fcdn.data.records import SIZE_FACTOR
from fcdn.model import receptive_field
from fcdn.model.metadata import (  # noqa: F401 (read_metadata: part of this module's API)
    METADATA_FILENAME,
    METADATA_FORMAT_VERSION,
    NORMALIZATION,
    SERVING_ENDPOINT,
    read_metadata,
)


def _model_metadata(model, radius, extra_metadata):
    metadata = {
        "format_version": METADATA_FORMAT_VERSION,
        "variant": model.name,
        "number_classes": int(model.output_shape[-1]),
        "number_channels": int(model.input_shape[-1]),
        "radius": int(radius),
        "theoretical_radius": receptive_field.theoretical_radius(model),
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
        radius = receptive_field.measure_effective_radius(model)
    metadata = _model_metadata(model, radius, extra_metadata)
    with atomic_files.replacing_directory(path) as staging:
        _write_saved_model(model, staging, metadata)
    return metadata


def _is_our_export(path):
    return os.path.isdir(path) and (
        not os.listdir(path) or os.path.isfile(os.path.join(path, METADATA_FILENAME)))


def load_saved_model(path, device=None):
    """Load an export: return (predict, metadata).

    predict(batch) takes a float32 NHWC batch (numpy or tensor; H, W positive multiples of 32, C the
    model's channel count) and returns the softmax as a float32 numpy array (N, H, W, classes).
    `device` (a TensorFlow device name) places the restored variables and the computation there, so
    one process can hold a copy of the model on every GPU. Raises ValueError with a one-line message
    naming the path if it is missing or not one of ours.
    """
    metadata = read_metadata(path)
    placement = tf.device(device) if device else contextlib.nullcontext()
    try:
        with placement:
            loaded = tf.saved_model.load(os.fspath(path))
        serve = getattr(loaded, metadata.get("serving_endpoint", SERVING_ENDPOINT))
    except Exception as error:  # TF raises many types here; the user needs the path and the gist
        raise ValueError(f"{path}: cannot load the SavedModel: {errors.gist(error)}") from None
    channels = metadata["number_channels"]

    def predict(batch):
        batch = tf.convert_to_tensor(batch, dtype_hint=tf.float32)
        if batch.shape.rank != 4 or batch.shape[-1] != channels:
            raise ValueError(f"predict wants an NHWC batch with {channels} channel(s), got shape {batch.shape}")
        fcdensenet.check_input_size(batch.shape[1], batch.shape[2])
        with (tf.device(device) if device else contextlib.nullcontext()):
            return serve(tf.cast(batch, tf.float32)).numpy()

    predict.saved_model = loaded  # the restored variables live as long as the function
    return predict, metadata
