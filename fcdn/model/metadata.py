"""fcdensenet_metadata.json, the file that makes an export describe itself, read without TensorFlow:
a script that runs the model on OpenVINO from its cache needs nothing else of the export."""

import json
import os

METADATA_FILENAME = "fcdensenet_metadata.json"
METADATA_FORMAT_VERSION = 1
NORMALIZATION = "zscore_per_channel"
SERVING_ENDPOINT = "serve"


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
