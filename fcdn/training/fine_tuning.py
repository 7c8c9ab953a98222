"""Fine-tuning: a run's first weights come from a trained model's SavedModel (--init_from).

The architecture comes from the source model and must be the one the flags build: the same
variant (or layers per block and growth rate), the same channels as the training records. A
different --number_classes keeps every weight but the classifier (the final 1x1 convolution,
`logits`), which starts as a fresh model's. The source's path and what its metadata says of it
are part of the run's settings, so a resumed run checks them and the new SavedModel records them.
Only a fresh run is initialised: a resumed one continues from its resume point.
"""

import os

import tensorflow as tf

import fcdensenet
from fcdn.model import saved_model

CLASSIFIER_LAYER = "logits"
# what the source's metadata tells of it, kept in the run's settings (the training block's keys)
SOURCE_TRAINING_KEYS = ("train_database", "epoch", "global_step", "mean_iou", "layers_per_block", "growth_rate")


def describe_source(path):
    """What the run records of its source model; ValueError (one line) if `path` is not one of ours."""
    metadata = saved_model.read_metadata(path)
    training = metadata.get("training") if isinstance(metadata.get("training"), dict) else {}
    description = {"path": os.path.abspath(path), "variant": metadata["variant"],
                   "number_channels": metadata["number_channels"], "number_classes": metadata["number_classes"]}
    description.update({key: training.get(key) for key in SOURCE_TRAINING_KEYS})
    return description


def check_source(source, args, channels):
    """ValueError (one line) unless this run's flags and records build the source's architecture."""
    path = source["path"]
    variant = fcdensenet.resolve_architecture(args.model, args.layers_per_block, args.growth_rate,
                                              fcdensenet.FIRST_FILTERS)[0]
    if variant != source["variant"]:
        raise ValueError(f"{path}: --init_from is an {source['variant']} but the flags build an {variant}: "
                         f"pass --model {source['variant']} (and its --layers_per_block and --growth_rate)")
    if source["number_channels"] != channels:
        raise ValueError(f"{path}: --init_from takes {source['number_channels']} channel(s) but the records of "
                         f"{args.train_database} have {channels}")


def load_initial_weights(model, source):
    """Assigns the source's weights to `model` (its classifier too when the classes agree); returns
    the names of the variables left as initialised."""
    path = source["path"]
    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:  # TensorFlow raises many types for a damaged SavedModel
        raise ValueError(f"{path}: cannot load the SavedModel: {type(error).__name__}") from None
    stored = {variable.name.split(":")[0]: variable for variable in loaded.variables}
    new_classifier = source["number_classes"] != int(model.output_shape[-1])
    fresh = []
    for variable in model.variables:
        if "seed_generator" in variable.path or (
                new_classifier and variable.path.startswith(CLASSIFIER_LAYER + "/")):
            fresh.append(variable.path)
            continue
        value = stored.get(variable.path)
        if value is None or tuple(value.shape) != tuple(variable.shape):
            found = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise ValueError(f"{path}: --init_from: its {variable.path} is {found} where this run's model has "
                             f"{tuple(variable.shape)}: the architecture flags must match the source model's")
        variable.assign(value)
    return fresh


def source_line(source, classes):
    """The line the trainer prints at start."""
    trained = (f", trained on {source['train_database']} to epoch {source['epoch']} (mean IoU "
               f"{source['mean_iou']:.4f})" if source.get("epoch") is not None and source.get("mean_iou") is not None
               else "")
    head = (f"; a new classifier for {classes} classes (the source has {source['number_classes']})"
            if source["number_classes"] != classes else "")
    return f"initial weights: {source['path']} ({source['variant']}{trained}){head}"
