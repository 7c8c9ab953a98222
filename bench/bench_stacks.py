"""A z-stack against the same planes as files. No arguments:

    python bench/bench_stacks.py

20 uint16 planes of 512x512 (each 2x2 of the example images) are segmented by a small FC-DenseNet
(one layer a block, growth 8, 16 first filters; untrained, exported once), read from and written to
disk, as the script runs them (runner.segment_images, 4 planes a forward pass on both sides):
- as one 20-plane ImageJ ZYX hyperstack, written as one ZYX mask;
- as 20 single-plane TIFFs, written as 20 masks.
The model is small so that what differs, the reading, batching and writing around it, weighs in the
time. After a warm-up, the two sides run in turn ROUNDS times and the fastest run of each counts;
the machine is shared, so only the ratio is meaningful. The masks of the stack must equal the 20
masks. Ends with `... ratio=<X> target=1` (stack planes/s over files' planes/s: a stack is no
slower a plane).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from fcdn.data import image_files  # noqa: E402

PLANES = 20
ROUNDS = 3
# planes a forward pass on both sides (the automatic budget, 16, needs more memory than a shared
# machine spares)
BATCH = 4
SMALL = dict(variant=None, layers_per_block=1, growth_rate=8, first_filters=16)


def write_inputs(folder):
    """The stack (stack/stack.tif) and its planes (files/plane_NN.tif)."""
    import tifffile

    source = os.path.join(REPO_ROOT, "data", "images")
    tiles = [image_files.read_image(os.path.join(source, name)) for name in sorted(os.listdir(source))]
    planes = np.stack([np.block([[tiles[4 * k], tiles[4 * k + 1]], [tiles[4 * k + 2], tiles[4 * k + 3]]])
                       for k in range(PLANES)])
    os.makedirs(os.path.join(folder, "stack"))
    os.makedirs(os.path.join(folder, "files"))
    tifffile.imwrite(os.path.join(folder, "stack", "stack.tif"), planes, imagej=True, metadata={"axes": "ZYX"})
    for index, plane in enumerate(planes):
        tifffile.imwrite(os.path.join(folder, "files", f"plane_{index:02d}.tif"), plane)
    return planes.shape


def segment(predict, metadata, paths, output, device_count):
    from fcdn.inference import runner, tiling

    options = runner.RunnerOptions(tile_size=tiling.check_tile_size(0, metadata["radius"], metadata["size_factor"]),
                                   output_folder=output, batch_size=BATCH)
    os.makedirs(output, exist_ok=True)
    started = time.perf_counter()
    results = list(runner.segment_images(paths, predict, metadata, options, device_count))
    seconds = time.perf_counter() - started
    failed = [result for result in results if result.error is not None]
    if failed:
        raise SystemExit(f"{failed[0].path}: {failed[0].error}")
    return seconds


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import keras
    import tifffile

    import fcdensenet
    from fcdn.inference import engines
    from fcdn.model import saved_model

    with tempfile.TemporaryDirectory(prefix="bench_stacks_") as workdir:
        shape = write_inputs(workdir)
        keras.utils.set_random_seed(0)
        model = fcdensenet.build_model(number_channels=1, number_classes=2, **SMALL)
        model_path = os.path.join(workdir, "model")
        saved_model.export_saved_model(model, model_path)
        predict, metadata, devices, engine = engines.load_model(model_path)
        stack = [os.path.join(workdir, "stack", "stack.tif")]
        files = [os.path.join(workdir, "files", f"plane_{index:02d}.tif") for index in range(PLANES)]
        segment(predict, metadata, files[:4], os.path.join(workdir, "warm"), len(devices))  # traced shapes
        as_files = as_stack = float("inf")
        for _ in range(ROUNDS):
            as_files = min(as_files, segment(predict, metadata, files, os.path.join(workdir, "out_files"),
                                             len(devices)))
            as_stack = min(as_stack, segment(predict, metadata, stack, os.path.join(workdir, "out_stack"),
                                             len(devices)))
        masks = tifffile.imread(os.path.join(workdir, "out_stack", "stack.tif"))
        equal = all(np.array_equal(masks[index], tifffile.imread(os.path.join(workdir, "out_files",
                                                                              f"plane_{index:02d}.tif")))
                    for index in range(PLANES))
    print(f"engine {engine}; {shape[0]} planes of {shape[1]}x{shape[2]}")
    print(f"as one ZYX stack: {PLANES / as_stack:.2f} planes/s ({as_stack:.2f} s, fastest of {ROUNDS})")
    print(f"as {PLANES} files: {PLANES / as_files:.2f} planes/s ({as_files:.2f} s, fastest of {ROUNDS})")
    print(f"the stack's mask equals the {PLANES} masks: {equal}")
    print(f"{PLANES}-plane 512x512 stack against {PLANES} files, planes/s (stack vs files) "
          f"ratio={as_files / as_stack:.2f} target=1")


if __name__ == "__main__":
    main()
