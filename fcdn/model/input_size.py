"""The image sizes an FC-DenseNet takes, without TensorFlow: the OpenVINO engine checks its batches
with this, and a script that runs on OpenVINO need not load TensorFlow (seconds of its start)."""

from fcdn.data.records import SIZE_FACTOR

NUMBER_POOLS = 5  # 2**NUMBER_POOLS == SIZE_FACTOR


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
