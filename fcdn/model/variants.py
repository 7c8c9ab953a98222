"""The FC-DenseNet variants by name, without TensorFlow: the trainer offers them as flag choices and
checks its flags before TensorFlow loads (seconds of its start). fcdensenet builds them."""

VARIANTS = {
    "FCDenseNet56": {"layers_per_block": (4, 4, 4, 4, 4, 4), "growth_rate": 12},
    "FCDenseNet67": {"layers_per_block": (5, 5, 5, 5, 5, 5), "growth_rate": 16},
    "FCDenseNet103": {"layers_per_block": (4, 5, 7, 10, 12, 15), "growth_rate": 16},
}
DEFAULT_VARIANT = "FCDenseNet56"
BN_MOMENTUM = 0.9  # the batch-normalisation momentum of the paper and the reference
