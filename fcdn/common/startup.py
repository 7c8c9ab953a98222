"""What every entry script does before TensorFlow is imported."""

import os


def quiet_tensorflow():
    """Keeps TensorFlow's C++ start-up notices (CPU features, absl, CUDA factories) out of the user's
    log: TF_CPP_MIN_LOG_LEVEL=2 hides its info and warning lines, errors still show. A value the
    user set wins (TF_CPP_MIN_LOG_LEVEL=0 shows everything)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
