"""GPU figures for docs/benchmarks.md, on the first visible GPU; under 8 minutes on one. No arguments:

    bash bench/gpu_check.sh          # or: python bench/gpu_check.py

Where TensorFlow sees no GPU it says so and exits with status 0. Otherwise it prints:
1. inference Mpx/s of FCDenseNet56 and FCDenseNet103 (untrained) on a 4096x4096 uint16 image with
   the default tiles and batch, and on 64 images of 512x512 with one image a pass against the
   automatic batch (images batched across files);
2. training images/s of FCDenseNet56 on 512x512 records, float32 against --mixed_precision 1,
   with 2 and 4 readers (the trainer's own progress lines; starvation lines counted).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_inference  # noqa: E402

TRAIN_STEPS = 40  # per epoch: a warm-up epoch and one more, then the rate of the second


def gpu_name():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)


def inference_figures(workdir, variant):
    import keras
    import tifffile

    import fcdensenet
    from fcdn.inference import engines, tiling
    from fcdn.inference import runner as inference_runner
    from fcdn.model import saved_model

    keras.utils.set_random_seed(0)
    path = os.path.join(workdir, variant)
    saved_model.export_saved_model(fcdensenet.build_model(variant, number_channels=1, number_classes=2), path)
    predict, metadata, _, _ = engines.load_model(path, "tensorflow")
    folders = {"large": [bench_inference.mosaic(4096)], "small": [bench_inference.mosaic(512)] * 64}
    figures = {}
    for label, images in folders.items():
        folder = os.path.join(workdir, f"{variant}-{label}")
        os.makedirs(folder)
        for index, image in enumerate(images):
            tifffile.imwrite(os.path.join(folder, f"{index:03d}.tif"), image)
        paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
        for batch_size in ((0,) if label == "large" else (1, 0)):
            options = inference_runner.RunnerOptions(
                tile_size=tiling.check_tile_size(0, metadata["radius"], metadata["size_factor"]),
                output_folder=folder + "-out", batch_size=batch_size)
            os.makedirs(options.output_folder, exist_ok=True)
            list(inference_runner.segment_images(paths[:2], predict, metadata, options))  # trace the shapes
            started = time.perf_counter()
            results = list(inference_runner.segment_images(paths, predict, metadata, options))
            seconds = time.perf_counter() - started
            megapixels = sum(result.height * result.width for result in results) / 1e6
            figures[(label, batch_size)] = megapixels / seconds
    return figures


def training_figures(workdir):
    import lmdb

    from fcdn.data import records

    database = os.path.join(workdir, "train-512.lmdb")
    image = bench_inference.mosaic(2048)
    env = lmdb.open(database, map_size=1 << 30)
    with env.begin(write=True) as transaction:
        for index in range(16):
            y, x = 512 * (index // 4), 512 * (index % 4)
            crop = image[y:y + 512, x:x + 512]
            transaction.put(*records.make_record(f"r{index:02d}", crop, (crop > np.median(crop)).astype(np.uint8)))
    env.close()
    figures = {}
    for mixed in (0, 1):
        for readers in (2, 4):
            output = os.path.join(workdir, f"run-{mixed}-{readers}")
            command = [sys.executable, os.path.join(REPO_ROOT, "train_fcdensenet.py"), "--train_database", database,
                       "--test_database", database, "--output_dir", output, "--test_every_n_steps", str(TRAIN_STEPS),
                       "--max_epochs", "2", "--log_every_n_steps", "10", "--reader_count", str(readers),
                       "--mixed_precision", str(mixed), "--batch_size", "4"]
            log = subprocess.run(command, capture_output=True, text=True, timeout=600).stdout
            rates = [float(value) for value in re.findall(r"epoch 1 step \d+/\d+ .* images/s ([0-9.]+)", log)]
            figures[(mixed, readers)] = (max(rates) if rates else float("nan"),
                                         log.count("Input Queue Starvation !!!!"))
    return figures


def main():
    name = gpu_name()
    if name is None:
        print("gpu_check: TensorFlow sees no GPU on this machine; nothing to measure (install "
              "tensorflow[and-cuda] on a GPU node and run again)")
        return
    print(f"GPU: {name}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for variant in ("FCDenseNet56", "FCDenseNet103"):
            figures = inference_figures(workdir, variant)
            print(f"{variant} inference: 4096x4096 {figures[('large', 0)]:.1f} Mpx/s; 64 images of 512x512: "
                  f"one a pass {figures[('small', 1)]:.1f} Mpx/s, batched {figures[('small', 0)]:.1f} Mpx/s")
        for (mixed, readers), (rate, starving) in training_figures(workdir).items():
            print(f"FCDenseNet56 training 512x512, batch 4, {'mixed float16' if mixed else 'float32'}, "
                  f"{readers} readers: {rate:.1f} images/s, starvation lines: {starving}")


if __name__ == "__main__":
    main()
