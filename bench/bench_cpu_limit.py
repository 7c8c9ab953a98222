"""CPU inference against the machine's limit: the model's FLOPs, the CPU's float32 peak, the engine
alone and the script end to end. No arguments:

    python bench/bench_cpu_limit.py                                   # sizes for 2 shared cores
    python bench/bench_cpu_limit.py --image_size 4096 --folder_count 200   # the full size

For FCDenseNet56 and FCDenseNet103 (untrained: the arithmetic does not depend on the weights), each
exported once and run on the default engine (OpenVINO on a CPU):
1. the engine alone on one tile of the shape the script cuts the large image into (one forward
   pass, after one at that shape to warm up): GFLOP/s, counted from the model's layers
   (fcdn/model/flops.py: 2 FLOPs a multiply-add of the convolutions, transposed convolutions and
   batch normalisations), and its share of the CPU's float32 peak (fcdn/common/cpu_peak.py: cores x
   clock x FLOPs per cycle of the widest instruction set in /proc/cpuinfo's flags);
2. the script end to end (Segmenter.segment_files, as inference_fcdensenet.py runs it: images read,
   normalised, tiled, batched, their masks assembled and written; the model loaded beforehand) on a
   large image (a mosaic of data/images) and on a folder of 256x256 images (data/images): Mpx/s,
   the kept share of the tiling (image pixels / computed pixels), and the share of the engine's own
   throughput on the same computed pixels (the engine's seconds for those tiles, at the batch the
   script uses, over the script's seconds).
The last line's ratio is the lowest of those shares (target 0.9: the script loses at most 10% to
everything that is not the model).

Sizes: the full size (a 4096x4096 image in the default tiles, 200 images) is about 40 computed
megapixels a model, the engine's own passes included; at the 0.023 and 0.015 Mpx/s FCDenseNet56 and
103 reached on a loaded 2-core machine that is over an hour, so the defaults are scaled down to run in under 10 minutes
there: a 512x512 image (one tile of the default size, so its kept share is 100%; the full size's
4096x4096 keeps 87% of 6 tiles) and 8 images. Exporting the two models (their radius measured by a
gradient, the SavedModel traced and converted to OpenVINO) takes much of those minutes; a progress
line per phase shows where the time goes. The machine may be shared: compare shares within one run.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_inference  # noqa: E402

VARIANTS = ("FCDenseNet56", "FCDenseNet103")
FOLDER_IMAGE_SIZE = 256
TARGET = 0.9
STARTED = time.perf_counter()


def progress(text):
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", flush=True)


def write_inputs(workdir, image_size, folder_count):
    """The large image's path and the folder's image paths (data/images, repeated as needed)."""
    import tifffile

    from fcdn.data import image_files

    large = os.path.join(workdir, "large", "mosaic.tif")
    os.makedirs(os.path.dirname(large))
    tifffile.imwrite(large, bench_inference.mosaic(image_size))
    source = os.path.join(REPO_ROOT, "data", "images")
    names = sorted(os.listdir(source))
    folder = os.path.join(workdir, "folder")
    os.makedirs(folder)
    paths = []
    for index in range(folder_count):
        paths.append(os.path.join(folder, f"{index:04d}_{names[index % len(names)]}"))
        tifffile.imwrite(paths[-1], image_files.read_image(os.path.join(source, names[index % len(names)])))
    return large, paths


def engine_seconds(predict, tile_shape, batch):
    """Seconds of one forward pass of `batch` tiles of tile_shape, after one pass to warm up."""
    tiles = np.random.default_rng(0).standard_normal((batch, *tile_shape, 1), dtype=np.float32)
    predict(tiles)
    started = time.perf_counter()
    predict(tiles)
    return time.perf_counter() - started


def end_to_end_seconds(segmenter, paths, output):
    started = time.perf_counter()
    results = segmenter.segment_files(paths, output)
    seconds = time.perf_counter() - started
    failed = [result.failure for result in results if result.error is not None]
    if failed:
        raise SystemExit(f"error: the script failed: {failed[0]}")
    return seconds


def measure_variant(variant, workdir, inputs, args, peak):
    """Print the variant's figures; returns its two shares of the engine's throughput."""
    import keras

    import fcdensenet
    from fcdn.inference import segmenter as inference_segmenter
    from fcdn.inference import tiling
    from fcdn.model import flops, saved_model

    progress(f"{variant}: exporting and loading")
    keras.utils.set_random_seed(0)
    model = fcdensenet.build_model(variant, number_channels=1, number_classes=2)
    path = os.path.join(workdir, variant)
    saved_model.export_saved_model(model, path)
    segmenter = inference_segmenter.Segmenter(path, tile_size=args.tile_size, log=lambda line: None).load()
    metadata, large, folder = segmenter.metadata, *inputs
    grid = tiling.tile_grid(args.image_size, args.image_size, segmenter.tile_size, metadata["radius"],
                            metadata["size_factor"])
    batch_pixels = tiling.automatic_batch_pixels(segmenter.engine, segmenter.device_names)
    shares = []
    for name, paths, tile_shape, computed_tiles, kept in (
            (f"{args.image_size}x{args.image_size} image", [large], grid.tile_shape, grid.tile_count,
             grid.kept_share()),
            (f"folder of {len(folder)} {FOLDER_IMAGE_SIZE}x{FOLDER_IMAGE_SIZE} images", folder,
             (FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE), len(folder), 1.0)):
        batch = tiling.tiles_per_batch(0, tile_shape, segmenter.tile_size, batch_pixels)
        progress(f"{variant}: the engine alone on {batch} tile(s) of {tile_shape[0]}x{tile_shape[1]}")
        seconds = engine_seconds(segmenter.predict, tile_shape, batch)
        tile_flops = flops.forward_flops(model, *tile_shape)
        gflops = batch * tile_flops / seconds / 1e9
        engine_megapixels = batch * tile_shape[0] * tile_shape[1] / seconds / 1e6
        print(f"{variant}, engine ({segmenter.engine}) on {batch} tile(s) of {tile_shape[0]}x{tile_shape[1]}: "
              f"{seconds:.2f} s, {tile_flops / 1e9:.1f} GFLOP a tile "
              f"({tile_flops / (tile_shape[0] * tile_shape[1]):,.0f} FLOP a pixel), {gflops:.1f} GFLOP/s = "
              f"{gflops / peak.gflops:.1%} of the peak, {engine_megapixels:.3f} computed Mpx/s", flush=True)
        progress(f"{variant}: the script end to end on the {name}")
        script = end_to_end_seconds(segmenter, paths, os.path.join(workdir, f"{variant}_masks_{len(shares)}"))
        image_megapixels = sum(_pixels(path) for path in paths) / 1e6
        engine_share = computed_tiles / batch * seconds / script
        shares.append(engine_share)
        print(f"{variant}, script on the {name}: {script:.1f} s, {image_megapixels / script:.3f} Mpx/s of image; "
              f"{computed_tiles} tile(s), kept {kept:.1%} of the computed pixels; "
              f"{engine_share:.1%} of the engine's throughput on the same computed pixels", flush=True)
    return shares


def _pixels(path):
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        height, width = tiff.pages.first.shape[:2]
    return height * width


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=512, help="the large image's side (full size: 4096)")
    parser.add_argument("--tile_size", type=int, default=0,
                        help="the script's --tile_size (0: its default, 2048)")
    parser.add_argument("--folder_count", type=int, default=8,
                        help="256x256 images in the folder (full size: 200)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="the models run")
    args = parser.parse_args()
    from fcdn.common import cpu_peak

    peak = cpu_peak.float32_peak()
    print(peak.describe(), flush=True)
    shares = {}
    with tempfile.TemporaryDirectory(prefix="bench_cpu_limit_") as workdir:
        inputs = write_inputs(workdir, args.image_size, args.folder_count)
        for variant in args.variants:
            shares[variant] = measure_variant(variant, workdir, inputs, args, peak)
    worst_variant, worst = min(((variant, min(pair)) for variant, pair in shares.items()), key=lambda item: item[1])
    print(f"script end to end vs the engine alone on the same computed pixels (lowest: {worst_variant}) "
          f"ratio={worst:.2f} target={TARGET}")


if __name__ == "__main__":
    main()
