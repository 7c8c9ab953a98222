"""An 8-bit OpenVINO model against the float32 one, on the CPU. No arguments:

    python bench/bench_int8.py

FCDenseNet56 (1 channel, 2 classes, random weights: speed does not depend on the weights) exported
once and quantized by NNCF as --precision int8 does (fcdn/inference/int8.post_training), calibrated
on 16 tiles of 256x256 from data/images. Both models are compiled as inference compiles them
(engines.OpenVinoPredictor) and run on a 1024x1024 mosaic of data/images in 4 tiles of 512x512, A B B A with
the best time of each (the machine may be shared and its load drifts), after one warm-up call each.
Also prints the share of pixels whose mask agrees, which says nothing of a trained model's: an
untrained network's classes are near ties. Takes about 5 minutes on 2 cores under a load of 12-15.
"""

import os
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench_engines import export_fcdensenet56, report_speeds  # noqa: E402  (bench/ is the script's folder)

from fcdn.inference import engines, int8, openvino_cache  # noqa: E402

SIZE = 1024
TILE = 512
CALIBRATION_TILES = 16


def large_image():
    """SIZE x SIZE z-scored pixels: the repository's 256x256 images side by side."""
    from fcdn.data import image_files

    folder = os.path.join(REPO_ROOT, "data", "images")
    side = SIZE // 256
    names = sorted(os.listdir(folder))[:side * side]
    images = [image_files.read_image(os.path.join(folder, name)) for name in names]
    mosaic = np.block([[images[side * row + column] for column in range(side)] for row in range(side)])
    return image_files.zscore_normalize(mosaic)[np.newaxis]


def main():
    import nncf
    import openvino

    with tempfile.TemporaryDirectory(prefix="bench_int8_") as workdir:
        os.environ[openvino_cache.CACHE_ENV] = os.path.join(workdir, "cache")  # not the user's own cache
        path = os.path.join(workdir, "fcdensenet56")
        export_fcdensenet56(path)
        model = engines._convert(openvino, path, {"number_channels": 1})
        tiles, _ = int8.calibration_tiles({"number_channels": 1}, os.path.join(REPO_ROOT, "data", "images"),
                                          CALIBRATION_TILES)
        started = time.perf_counter()
        quantized = int8.post_training(nncf, model, int8.split(tiles)[0])
        print(f"quantization on {len(int8.split(tiles)[0])} tiles: {time.perf_counter() - started:.1f} s", flush=True)
        predictors = {"float32": engines.OpenVinoPredictor(openvino, model, 1),
                      "int8": engines.OpenVinoPredictor(openvino, quantized, 1, "int8")}
        image = large_image()
        tiles = [image[:, row:row + TILE, column:column + TILE] for row in range(0, SIZE, TILE)
                 for column in range(0, SIZE, TILE)]
        outputs = {name: predict(tiles[0]) for name, predict in predictors.items()}  # warm-up
        print("warm-up done", flush=True)
        times = {name: [] for name in predictors}
        for name in ("int8", "float32", "float32", "int8"):
            started = time.perf_counter()
            for tile in tiles:
                predictors[name](tile)
            times[name].append(time.perf_counter() - started)
    speed = report_speeds(times, SIZE * SIZE / 1e6)
    agreement = np.mean(outputs["int8"].argmax(-1) == outputs["float32"].argmax(-1))
    print(f"masks agree on {agreement:.4%} of a tile's pixels (untrained weights: near ties)")
    print(f"int8 against float32 (OpenVINO, FCDenseNet56, {SIZE}x{SIZE}) Mpx/s ratio="
          f"{speed['int8'] / speed['float32']:.2f} target=1.5")


if __name__ == "__main__":
    main()
