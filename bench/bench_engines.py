"""OpenVINO against TensorFlow on the same SavedModel, on the CPU. No arguments:

    python bench/bench_engines.py

FCDenseNet56 (1 channel, 2 classes, random weights) exported once; one 1024x1024 tile of noise run by
each engine as inference_engines.load_predictor builds it (OpenVINO: float32, LATENCY hint, unpinned
threads; TensorFlow: the SavedModel's "serve" function), A B B A with the best time of each (the machine
is shared and its load drifts), after one warm-up call each. Also: the largest difference between the
two softmaxes and the share of pixels whose argmax (mask) agrees. Takes 2-6 minutes on 2 shared cores.
"""

import os
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from fcdn.inference import engines as inference_engines  # noqa: E402
from fcdn.inference import openvino_cache  # noqa: E402

SIZE = 1024


def export_fcdensenet56(path):
    import keras

    import fcdensenet
    from fcdn.model import saved_model

    keras.utils.set_random_seed(11)
    model = fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2)
    saved_model.export_saved_model(model, path, radius=0)  # the radius plays no part here: skip its probe


def report_speeds(times, megapixels):
    """Prints each engine's best Mpx/s over its runs (a dict of lists of seconds); returns them."""
    speed = {name: megapixels / min(runs) for name, runs in times.items()}
    for name, runs in times.items():
        print(f"{name}: {speed[name]:.3f} Mpx/s (seconds per run: {', '.join(f'{s:.2f}' for s in runs)})")
    return speed


def main():
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as workdir:
        os.environ[openvino_cache.CACHE_ENV] = os.path.join(workdir, "cache")  # not the user's own cache
        path = os.path.join(workdir, "fcdensenet56")
        export_fcdensenet56(path)
        started = time.perf_counter()
        predictors = {"openvino": inference_engines.load_predictor(path, "openvino")[0]}
        print(f"OpenVINO conversion and compilation: {time.perf_counter() - started:.1f} s "
              f"(once a model: the converted model is cached)")
        predictors["tensorflow"] = inference_engines.load_predictor(path, "tensorflow")[0]
        tile = np.random.default_rng(0).standard_normal((1, SIZE, SIZE, 1), dtype=np.float32)
        outputs = {name: predict(tile) for name, predict in predictors.items()}  # warm-up
        times = {name: [] for name in predictors}
        for name in ("openvino", "tensorflow", "tensorflow", "openvino"):
            started = time.perf_counter()
            predictors[name](tile)
            times[name].append(time.perf_counter() - started)
    speed = report_speeds(times, SIZE * SIZE / 1e6)
    difference = np.abs(outputs["openvino"] - outputs["tensorflow"]).max()
    agreement = np.mean(outputs["openvino"].argmax(-1) == outputs["tensorflow"].argmax(-1))
    print(f"largest probability difference {difference:.2e}; masks agree on {agreement:.4%} of the pixels")
    print(f"OpenVINO vs TensorFlow Mpx/s, FCDenseNet56 {SIZE}x{SIZE} "
          f"ratio={speed['openvino'] / speed['tensorflow']:.2f} target=1.5")


if __name__ == "__main__":
    main()
