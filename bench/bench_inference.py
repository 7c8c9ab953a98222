"""Speed and memory of inference_fcdensenet.py against the reference's approach. No arguments:

    python bench/bench_inference.py

1. Memory: the script segments a 16384x16384 uint16 TIFF (512 MB of pixels, uncompressed) in a
   subprocess with its default tiles; its peak resident memory is reported (target below 2.5 GB).
   Model: the tiniest FC-DenseNet (one layer per block, growth 2, 8 first filters), so that this
   takes 3-5 minutes on 2 shared CPU cores; with a real model the memory is dominated by the
   activations of one batch (FCDenseNet56: about 11 GB for the default 2048x2048 pixels a batch).
2. Speed: megapixels per second on a 2048x2048 uint16 image (a mosaic of data/images) for this
   implementation (tiles of at most 1024x1024: the default 2048 on a 4096x4096 image, scaled down by
   2 on each side; whole-image statistics, tiles batched, radius from the export; on
   the default engine, OpenVINO on a CPU, and on TensorFlow for comparison)
   and for a baseline doing what the reference does: a gradient-probe radius measured for every
   image with the reference's absolute threshold (reference_radius below; the stored radius comes
   from receptive_field.measure_effective_radius, whose threshold is relative to the peak gradient),
   then 832-pixel tiles stepping by 832 - 2 radius, clipped at the border, run one at a time.
   Same model (a small custom FC-DenseNet, 2 layers per block, growth 4, untrained; stored radius
   96, the reference's probe 128; FCDenseNet56 would take over 7 minutes for this part), same
   SavedModel, same run; each side runs twice (A B C C B A) and keeps its best time.

The full size (a 4096x4096 image with the default tiles) took 27 minutes under a load of 12-15 on a
2-core machine (2026-12-01); the scaled-down speed part brings it under 10. A line of progress per
phase. The machine is shared, so only the ratio is meaningful.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from fcdn.data import image_files  # noqa: E402
from fcdn.inference import (
    segmentation,  # noqa: E402
    tiling,  # noqa: E402
)

REFERENCE_TILE = 832
SPEED_SIZE = 2048
SPEED_TILE = 1024  # SPEED_SIZE / 2, as the default 2048 is on a 4096x4096 image
MEMORY_SIZE = 16384
MEMORY_TARGET_GB = 2.5
STARTED = time.perf_counter()


def progress(text):
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", flush=True)


def mosaic(size):
    """A size x size uint16 image tiled from the example images (repeated as needed)."""
    folder = os.path.join(REPO_ROOT, "data", "images")
    images = [image_files.read_image(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    side = images[0].shape[0]
    count = -(-size // side)
    rows = [np.concatenate([images[(r * count + c) % len(images)] for c in range(count)], axis=1)
            for r in range(min(count, 10))]
    block = np.concatenate(rows, axis=0)
    return np.tile(block, (-(-size // block.shape[0]), 1))[:size, :size]


def export(path, seed, **architecture):
    import keras

    import fcdensenet
    from fcdn.model import saved_model

    keras.utils.set_random_seed(seed)
    model = fcdensenet.build_model(variant=None, number_channels=1, number_classes=2, **architecture)
    saved_model.export_saved_model(model, path)
    return model


def measure_memory(workdir):
    """Peak RSS (GB) of the script segmenting a MEMORY_SIZE^2 TIFF, and its wall time."""
    import tifffile

    model_path = os.path.join(workdir, "tiniest")
    export(model_path, seed=3, layers_per_block=1, growth_rate=2, first_filters=8)
    images = os.path.join(workdir, "large")
    os.makedirs(images)
    tifffile.imwrite(os.path.join(images, "slide.tif"), mosaic(MEMORY_SIZE))  # uncompressed, contiguous
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "inference_fcdensenet.py"), "--saved_model_filepath",
         model_path, "--image_folder", images, "--output_folder", os.path.join(workdir, "large_masks")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"error: the script failed on the {MEMORY_SIZE}^2 image:\n{output}")
    print("\n".join(line for line in output.splitlines() if line.startswith(("slide", "done", "FC"))))
    with tifffile.TiffFile(os.path.join(workdir, "large_masks", "slide.tif")) as tiff:
        assert tiff.pages.first.shape == (MEMORY_SIZE, MEMORY_SIZE) and tiff.is_bigtiff
    return usage.ru_maxrss / 2**20, seconds  # ru_maxrss is in KiB on Linux


def reference_radius(model):
    """The reference's probe: a one-pixel loss back-propagated, |input gradient| > 1e-8, rounded up to 32.

    The loss is the cross-entropy of the centre pixel's softmax against class 0 on a random-noise
    image; the threshold is absolute, as in the reference (receptive_field.measure_effective_radius
    uses one relative to the peak gradient instead, which gives a smaller radius).
    """
    import tensorflow as tf

    import fcdensenet
    from fcdn.model import receptive_field

    width = 2 * receptive_field.theoretical_radius(model) + 2 * fcdensenet.SIZE_FACTOR
    height = 2 * fcdensenet.SIZE_FACTOR
    images = tf.constant(np.random.default_rng(0).standard_normal((1, height, width, model.input_shape[-1]),
                                                                  dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(images)
        probability = model(images, training=False)[0, height // 2, width // 2, 0]
        loss = -tf.math.log(probability + 1e-12)
    profile = np.abs(tape.gradient(loss, images).numpy()[0]).max(axis=(0, 2))
    columns = np.nonzero(profile > 1e-8)[0]
    extent = max(width // 2 - columns.min(), columns.max() - width // 2)
    return tiling.round_up(extent, fcdensenet.SIZE_FACTOR)


def reference_approach(image, model, predict):
    """What the reference does per image; returns (mask, computed pixels, radius)."""
    radius = reference_radius(model)  # probed again for every image
    zone = REFERENCE_TILE - 2 * radius
    height, width = image.shape[:2]
    padded = np.pad(image_files.zscore_normalize(image),
                    ((0, tiling.round_up(height, 32) - height), (0, tiling.round_up(width, 32) - width),
                     (0, 0)), mode="reflect")
    mask = np.empty(padded.shape[:2], np.uint8)
    computed = 0
    for y in range(0, height, zone):
        for x in range(0, width, zone):
            top, left = max(y - radius, 0), max(x - radius, 0)
            tile = padded[top:y + zone + radius, left:x + zone + radius]
            labels = np.argmax(predict(tile[np.newaxis]), axis=-1)[0]
            mask[y:y + zone, x:x + zone] = labels[y - top:y - top + zone, x - left:x - left + zone]
            computed += tile.shape[0] * tile.shape[1]
    return mask[:height, :width], computed, radius


def reference_kept_share(shape, radius):
    zone = REFERENCE_TILE - 2 * radius
    computed = 1
    for length in shape:
        computed *= sum(min(start + zone + radius, length) - max(start - radius, 0)
                        for start in range(0, length, zone))
    return shape[0] * shape[1] / computed


def this_implementation(image, metadata, predict):
    tile_size = tiling.check_tile_size(SPEED_TILE, metadata["radius"], metadata["size_factor"])
    grid = tiling.tile_grid(*image.shape, tile_size, metadata["radius"], metadata["size_factor"])
    batch_size = tiling.tiles_per_batch(0, grid.tile_shape, tile_size)
    mask = segmentation.segment_array(image, predict, metadata, tile_size, batch_size)
    return mask, grid, batch_size


def measure_speed(workdir):
    from fcdn.inference import engines as inference_engines
    from fcdn.model import saved_model

    model_path = os.path.join(workdir, "small")
    model = export(model_path, seed=4, layers_per_block=2, growth_rate=4)
    default, metadata, engine = inference_engines.load_predictor(model_path)  # the script's default: auto
    predictors = {engine: default, "tensorflow": saved_model.load_saved_model(model_path)[0]}
    image = mosaic(SPEED_SIZE)
    megapixels = image.size / 1e6
    for predict in predictors.values():
        predict(np.zeros((1, 64, 64, 1), np.float32))  # one-off start-up cost, paid by neither side

    # A B C C B A with the best time of each: the machine is shared, and its load drifts. The reference
    # approach runs on TensorFlow, as the reference does; ours on the default engine and on TensorFlow
    sides = list(dict.fromkeys([f"ours-{engine}", "ours-tensorflow", "reference"]))
    times, results = {side: [] for side in sides}, {}
    for side in sides + sides[::-1]:
        progress(f"speed: {side}")
        started = time.perf_counter()
        if side == "reference":
            baseline_mask, computed, baseline_radius = reference_approach(image, model, predictors["tensorflow"])
        else:
            results[side] = this_implementation(image, metadata, predictors[side.split("-", 1)[1]])
        times[side].append(time.perf_counter() - started)
    mask, grid, batch_size = results[f"ours-{engine}"]
    speeds = {side: megapixels / min(runs) for side, runs in times.items()}
    ours, baseline = speeds[f"ours-{engine}"], speeds["reference"]
    print(f"this implementation, default engine ({engine}): {ours:.3f} Mpx/s; "
          f"on tensorflow: {speeds['ours-tensorflow']:.3f} Mpx/s; radius {metadata['radius']} (stored at export), "
          f"{grid.tile_count} tiles of {grid.tile_shape[0]}x{grid.tile_shape[1]} in batches of {batch_size}, "
          f"kept {grid.kept_share():.0%} of the computed pixels")
    print(f"reference approach (tensorflow): {baseline:.3f} Mpx/s; radius {baseline_radius} probed per image, "
          f"{REFERENCE_TILE}-pixel tiles one at a time, kept {image.size / computed:.0%} of the computed pixels")
    print(f"with the stored radius {metadata['radius']} instead, the reference's tiles would keep "
          f"{reference_kept_share(image.shape[:2], metadata['radius']):.0%} of the computed pixels")
    print("seconds per run: " + "; ".join(
        f"{side} " + ", ".join(f"{seconds:.1f}" for seconds in runs) for side, runs in times.items()))
    print(f"masks agree on {np.mean(mask == baseline_mask):.4%} of the pixels (ours on {engine} and the reference); "
          f"ours on {engine} and on tensorflow: {np.mean(mask == results['ours-tensorflow'][0]):.4%}")
    return ours, baseline, engine


def main():
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as workdir:
        progress(f"memory: the script on a {MEMORY_SIZE}x{MEMORY_SIZE} TIFF, in a subprocess")
        peak_gb, seconds = measure_memory(workdir)
        print(f"peak resident memory for a {MEMORY_SIZE}x{MEMORY_SIZE} uint16 TIFF: {peak_gb:.2f} GB "
              f"(target < {MEMORY_TARGET_GB} GB), {seconds:.0f} s")
        progress(f"speed: exporting the model; a {SPEED_SIZE}x{SPEED_SIZE} image")
        ours, baseline, engine = measure_speed(workdir)
    print(f"inference Mpx/s (tiled batched on {engine} vs reference approach) ratio={ours / baseline:.2f} "
          f"target=2.0")


if __name__ == "__main__":
    main()
