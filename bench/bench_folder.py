"""A folder of small images: this project's inference against the reference's approach. No arguments:

    python bench/bench_folder.py                     # 40 images, the reference's approach on 8 of them
    python bench/bench_folder.py --count 200 --reference_sample 200        # the full-size run

uint16 256x256 TIFFs (the example images, repeated as needed) are segmented by FCDenseNet56
(untrained, exported once; its stored radius comes from the export), read from and written to disk:
- this project: inference_runner.segment_images, as the script runs it (the default engine, images
  prepared ahead of the model, the automatic batch of that engine: on a CPU one 256x256 image a
  pass), and the same with the automatic batch sized for a GPU's memory (tile_size^2 pixels: up to
  64 images a pass, batched across files), reported, not a target;
- the reference's approach on a sample of the folder, its time scaled to the whole folder: for
  every image, read it, probe the receptive-field radius with a gradient
  (bench_inference.reference_radius, the reference's absolute threshold), z-score it, run it through
  the model alone, write its mask.
Each side runs once after a warm-up on 2 images. The sizes fit under 10 minutes on a shared 2-core
machine (the full size, 200 images on every side, took over 15 there); the machine is shared, so
only the ratio is meaningful. A line of progress per phase. Ends with `... ratio=<X> target=10`.
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

from fcdn.data import image_files  # noqa: E402

STARTED = time.perf_counter()


def progress(text):
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", flush=True)


def write_folder(folder, count):
    """`count` TIFFs copied from data/images (repeated as needed); their names."""
    import tifffile

    source = os.path.join(REPO_ROOT, "data", "images")
    os.makedirs(folder)
    sources = sorted(os.listdir(source))
    names = []
    for index in range(count):
        name = sources[index % len(sources)]
        names.append(f"{index:04d}_{name}")
        tifffile.imwrite(os.path.join(folder, names[-1]), image_files.read_image(os.path.join(source, name)))
    return names


def this_project(predict, metadata, images, names, output, batch_pixels):
    from fcdn.inference import runner as inference_runner
    from fcdn.inference import tiling

    options = inference_runner.RunnerOptions(
        tile_size=tiling.check_tile_size(0, metadata["radius"], metadata["size_factor"]), output_folder=output,
        batch_pixels=batch_pixels)
    os.makedirs(output, exist_ok=True)
    started = time.perf_counter()
    results = list(inference_runner.segment_images([os.path.join(images, name) for name in names], predict,
                                                   metadata, options))
    seconds = time.perf_counter() - started
    failed = [result for result in results if result.error is not None]
    if failed:
        raise SystemExit(f"this project failed on {failed[0].path}: {failed[0].error}")
    return seconds


def reference_approach(model, predict, images, names, output):
    import tifffile

    os.makedirs(output, exist_ok=True)
    started = time.perf_counter()
    for name in names:
        image = image_files.read_image(os.path.join(images, name))
        bench_inference.reference_radius(model)  # the reference probes it again for every image
        normalised = image_files.zscore_normalize(image)[np.newaxis]
        mask = np.argmax(predict(normalised), axis=-1)[0].astype(np.uint8)
        tifffile.imwrite(os.path.join(output, name), mask, compression="zlib")
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40, help="images in the folder (full size: 200)")
    parser.add_argument("--reference_sample", type=int, default=8,
                        help="images the reference's approach runs on, its time scaled to the folder")
    args = parser.parse_args()
    import keras

    import fcdensenet
    from fcdn.inference import engines, tiling
    from fcdn.model import saved_model

    with tempfile.TemporaryDirectory(prefix="bench_folder_") as workdir:
        images = os.path.join(workdir, "images")
        names = write_folder(images, args.count)
        sample = names[:max(1, min(args.reference_sample, args.count))]
        progress(f"exporting FCDenseNet56 and loading it; {len(names)} images written")
        keras.utils.set_random_seed(0)
        model = fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2)
        model_path = os.path.join(workdir, "FCDenseNet56")
        saved_model.export_saved_model(model, model_path)
        predict, metadata, devices, engine = engines.load_model(model_path)
        tf_predict, _ = saved_model.load_saved_model(model_path)
        batch_pixels = tiling.automatic_batch_pixels(engine, devices)
        progress("warm-up on 2 images (traced shapes, both sides)")
        this_project(predict, metadata, images, names[:2], os.path.join(workdir, "warm"), batch_pixels)
        reference_approach(model, tf_predict, images, names[:2], os.path.join(workdir, "warm_reference"))
        progress(f"this project, {len(names)} images, the automatic batch of {engine}")
        ours = this_project(predict, metadata, images, names, os.path.join(workdir, "ours"), batch_pixels)
        progress(f"this project, {len(names)} images, the automatic batch sized for a GPU")
        gpu_sized = this_project(predict, metadata, images, names, os.path.join(workdir, "gpu_sized"), 0)
        progress(f"the reference's approach on {len(sample)} of the {len(names)} images")
        baseline = reference_approach(model, tf_predict, images, sample, os.path.join(workdir, "reference"))
        baseline *= len(names) / len(sample)
        agree = np.mean([np.mean(image_files.read_image(os.path.join(workdir, "ours", name))
                                 == image_files.read_image(os.path.join(workdir, "reference", name)))
                         for name in sample])
    count = len(names)
    tile_size = tiling.check_tile_size(0, metadata["radius"], metadata["size_factor"])
    per_pass = {pixels: min(count, tiling.tiles_per_batch(0, (256, 256), tile_size, pixels))
                for pixels in (batch_pixels, 0)}
    print(f"this project ({engine}): {count / ours:.2f} images/s ({ours:.1f} s for {count} images, "
          f"{per_pass[batch_pixels]} a pass); with the automatic batch sized for a GPU {count / gpu_sized:.2f} "
          f"images/s ({gpu_sized:.1f} s, {per_pass[0]} a pass, batched across files)")
    print(f"reference approach: {count / baseline:.2f} images/s ({baseline:.1f} s for {count} images, scaled from "
          f"{len(sample)}: radius probe, then one image a pass)")
    print(f"masks agree on {agree:.4%} of the pixels of the {len(sample)} images both sides segmented")
    print(f"folder of {count} 256x256 images, images/s (this project vs reference approach) "
          f"ratio={baseline / ours:.2f} target=10")


if __name__ == "__main__":
    main()
