"""One OME-Zarr image split over parts (--split_image 1) against one process. No arguments:

    python bench/bench_split_zarr.py

A 6144x1024 uint16 OME-Zarr image (noise; 256x512 chunks: 24 chunk rows) is segmented by the tiny
FCDenseNet of the tests (radius 96; tiles of at most 512x512, TensorFlow) with inference_fcdensenet.py:
- one process, without --split_image (the reference);
- 1, 2 and 3 parts with --split_image 1, run as a job array of two slots would run them: at most two
  processes at a time, the next one started when one ends.
Each time is the wall time from the first start to the last end, process start-up included (it is
what a job array pays too). Every run writes its label into a fresh copy of the image; the labels
of the parts are checked equal to the reference's, file by file.

Reads: every process logs the rows it asks the image for; zarr decodes whole chunks, so each read
counts the chunk rows it touches. Reported per part: the chunk rows of its own share, and those it
decoded outside its share, in MB of pixels: for the statistics (blocks no other part had stored yet)
and for its tiles (their context, and the tiles of the batches it shares with a neighbour). The
statistics blocks are set to one chunk row (STATISTICS_BLOCK_PIXELS = 256 x 1024), as they are for
any image of 16384 or more columns at this chunk height; the reference runs with the same blocks.

Ends with `split_zarr one_process_over_one_part ratio=<X> target=0.9`: the split path's own cost on
one part, against one process. The machine is shared: only figures of one run compare.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

HEIGHT, WIDTH, CHUNK = (6144, 1024, (256, 512))
SLOTS = 2
FLAGS = ["--image_format", "zarr", "--tile_size", "512", "--engine", "tensorflow"]

COUNTING_SCRIPT = """
import atexit, json, os, sys
sys.path.insert(0, {root!r})
from fcdn.data import image_sources, ome_zarr_io
image_sources.STATISTICS_BLOCK_PIXELS = {block_pixels}
reads, inside, rows, block = [], [], ome_zarr_io.ZarrSource.rows, ome_zarr_io.ZarrSource.block_statistics
def counted(self, start, stop):
    reads.append((start, stop, bool(inside)))
    return rows(self, start, stop)
def counted_block(self, start, stop):
    inside.append(1)
    try:
        return block(self, start, stop)
    finally:
        inside.pop()
ome_zarr_io.ZarrSource.rows, ome_zarr_io.ZarrSource.block_statistics = counted, counted_block
atexit.register(lambda: json.dump(reads, open(os.environ["READ_LOG"], "w")))
import inference_fcdensenet
inference_fcdensenet.main(sys.argv[1:])
"""


def write_image(folder):
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image as ome_write_image

    data = (np.random.default_rng(0).random((HEIGHT, WIDTH)) * 4000).astype(np.uint16)
    os.makedirs(folder)
    group = zarr.open_group(os.path.join(folder, "slide.zarr"), mode="w", zarr_format=3)
    ome_write_image(data, group, axes="yx", fmt=FormatV05(), scale_factors=(2,), storage_options={"chunks": CHUNK})


def command(model, folder, log, extra):
    script = COUNTING_SCRIPT.format(root=REPO_ROOT, block_pixels=CHUNK[0] * WIDTH)
    return ([sys.executable, "-c", script, "--saved_model_filepath", model,
             "--image_folder", folder] + FLAGS + extra, dict(os.environ, READ_LOG=log, TF_CPP_MIN_LOG_LEVEL="2"))


def run_slots(jobs):
    """Run (argv, env) jobs, SLOTS at a time; returns the wall seconds from first start to last end."""
    started, pending, running = time.perf_counter(), list(jobs), []
    while pending or running:
        while pending and len(running) < SLOTS:
            argv, env = pending.pop(0)
            running.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True))
        time.sleep(0.2)
        for process in [process for process in running if process.poll() is not None]:
            running.remove(process)
            output = process.stdout.read()
            if process.returncode != 0:
                raise SystemExit(f"a run failed:\n{output[-3000:]}")
    return time.perf_counter() - started


def decoded_rows(log):
    """Chunk rows decoded, with repeats, by the reads of a log: ([by the statistics pass], [by tiles])."""
    with open(log) as handle:
        reads = json.load(handle)
    decoded = ([], [])
    for start, stop, statistics in reads:
        decoded[0 if statistics else 1].extend(range(start // CHUNK[0], (stop - 1) // CHUNK[0] + 1))
    return decoded


def label_tree(folder):
    label = os.path.join(folder, "slide.zarr", "labels")
    files = {}
    for parent, _, names in os.walk(label):
        for name in names:
            with open(os.path.join(parent, name), "rb") as handle:
                files[os.path.relpath(os.path.join(parent, name), label)] = handle.read()
    return files


def main():
    from conftest import export_tiny_model

    from fcdn.inference import split_image

    chunk_rows = HEIGHT // CHUNK[0]
    megabytes = CHUNK[0] * WIDTH * 2 / 1e6  # one decoded chunk row of pixels
    with tempfile.TemporaryDirectory(prefix="bench_split_zarr_") as workdir:
        model = os.path.join(workdir, "model")
        export_tiny_model(model, number_channels=1, number_classes=2, seed=1)
        image = os.path.join(workdir, "image")
        write_image(image)
        runs = {}
        for parts in (0, 1, 2, 3):  # 0: one process, no split
            folder = os.path.join(workdir, f"run{parts}")
            shutil.copytree(image, folder)
            logs = [os.path.join(workdir, f"reads{parts}_{part}.json") for part in range(max(parts, 1))]
            extra = [["--split_image", "1", "--num_parts", str(parts), "--part_id", str(part)] if parts else []
                     for part in range(max(parts, 1))]
            seconds = run_slots([command(model, folder, log, flags) for log, flags in zip(logs, extra)])
            runs[parts] = (seconds, [decoded_rows(log) for log in logs], label_tree(folder))
        reference_seconds, ((statistics, tiles),), reference_label = runs[0]
        print(f"one process: {reference_seconds:.1f} s; decoded {len(statistics) * megabytes:.1f} MB of pixels for "
              f"the statistics and {len(tiles) * megabytes:.1f} MB for the tiles, of an image of "
              f"{chunk_rows * megabytes:.1f} MB")
        for parts in (1, 2, 3):
            seconds, reads, label = runs[parts]
            assert label == reference_label, f"{parts} part(s): the label differs from one process's"
            print(f"{parts} part(s), {SLOTS} at a time: {seconds:.1f} s ({reference_seconds / seconds:.2f}x one "
                  f"process); label identical to one process's")
            for part, (statistics, tiles) in enumerate(reads):
                own = set(split_image.part_chunk_rows(chunk_rows, parts, part))
                print(f"  part {part}: own {len(own) * megabytes:.1f} MB ({len(own)} chunk rows); decoded outside "
                      f"its share: statistics {sum(row not in own for row in statistics) * megabytes:.1f} MB, "
                      f"tiles {sum(row not in own for row in tiles) * megabytes:.1f} MB (all tiles: "
                      f"{len(tiles) * megabytes:.1f} MB)")
    print(f"split_zarr one_process_over_one_part ratio={reference_seconds / runs[1][0]:.2f} target=0.9")


if __name__ == "__main__":
    main()
