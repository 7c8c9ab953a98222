"""A folder of small images: this project's inference against the reference's approach. No arguments:

    python bench/bench_folder.py

200 uint16 256x256 TIFFs (the example images, each twice) are segmented by FCDenseNet56 (untrained,
exported once; its stored radius comes from the export), read from and written to disk:
- this project: inference_runner.segment_images, as the script runs it (the default engine, images
  prepared ahead of the model, the 200 images batched across files up to the tile budget), and the
  same without cross-file batching (--batch_size 1: one image a pass), reported, not a target;
- the reference's approach: for every image, read it, probe the receptive-field radius with a
  gradient (bench_inference.reference_radius, the reference's absolute threshold), z-score it, run it
  through the model alone, write its mask.
Each side runs once after a warm-up (the reference side takes minutes); the machine is shared, so
only the ratio is meaningful. Ends with `... ratio=<X> target=10`.
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

COPIES = 2  # 100 example images, each twice: 200 files


def write_folder(folder):
    import tifffile

    source = os.path.join(REPO_ROOT, "data", "images")
    os.makedirs(folder)
    names = []
    for copy in range(COPIES):
        for name in sorted(os.listdir(source)):
            names.append(f"copy{copy}_{name}")
            tifffile.imwrite(os.path.join(folder, names[-1]), image_files.read_image(os.path.join(source, name)))
    return names


def this_project(predict, metadata, images, names, output, batch_size, device_count):
    from fcdn.inference import runner as inference_runner
    from fcdn.inference import tiling

    options = inference_runner.RunnerOptions(
        tile_size=tiling.check_tile_size(0, metadata["radius"], metadata["size_factor"]), output_folder=output,
        batch_size=batch_size)
    os.makedirs(output, exist_ok=True)
    started = time.perf_counter()
    results = list(inference_runner.segment_images([os.path.join(images, name) for name in names], predict,
                                                   metadata, options, device_count))
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
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import keras

    import fcdensenet
    from fcdn.inference import engines
    from fcdn.model import saved_model

    with tempfile.TemporaryDirectory(prefix="bench_folder_") as workdir:
        images = os.path.join(workdir, "images")
        names = write_folder(images)
        keras.utils.set_random_seed(0)
        model = fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2)
        model_path = os.path.join(workdir, "FCDenseNet56")
        saved_model.export_saved_model(model, model_path)
        predict, metadata, devices, engine = engines.load_model(model_path)
        tf_predict, _ = saved_model.load_saved_model(model_path)
        # warm-up: the traced shapes of both sides
        this_project(predict, metadata, images, names[:70], os.path.join(workdir, "warm"), 0, len(devices))
        reference_approach(model, tf_predict, images, names[:2], os.path.join(workdir, "warm_reference"))

        ours = this_project(predict, metadata, images, names, os.path.join(workdir, "ours"), 0, len(devices))
        unbatched = this_project(predict, metadata, images, names, os.path.join(workdir, "unbatched"), 1,
                                 len(devices))
        baseline = reference_approach(model, tf_predict, images, names, os.path.join(workdir, "reference"))
        agree = np.mean([np.mean(image_files.read_image(os.path.join(workdir, "ours", name))
                                 == image_files.read_image(os.path.join(workdir, "reference", name)))
                         for name in names])
    count = len(names)
    print(f"this project ({engine}): {count / ours:.2f} images/s ({ours:.1f} s for {count} images, batched across files); "
          f"without cross-file batching {count / unbatched:.2f} images/s ({unbatched:.1f} s)")
    print(f"reference approach: {count / baseline:.2f} images/s ({baseline:.1f} s: radius probe, then one "
          f"image a pass)")
    print(f"masks agree on {agree:.4%} of the pixels")
    print(f"folder of {count} 256x256 images, images/s (this project vs reference approach) "
          f"ratio={baseline / ours:.2f} target=10")


if __name__ == "__main__":
    main()
