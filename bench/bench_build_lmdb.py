"""Throughput of build_lmdb.py with all cores against one process, on the example data replicated.

    python bench/bench_build_lmdb.py
    python bench/bench_build_lmdb.py --pairs 2000 --repeats 5

The example pairs are symlinked under new names into a temporary folder until there are at least
--pairs of them; both configurations then run the same build() (one process does the decoding itself
when workers=1), alternating, and each keeps its best run so a busy shared machine hurts both alike.
Throughput is MB of pixels (image + mask bytes written) per second of the whole build, pool start-up
included, each build going into an empty folder. Each configuration's first run also starts the
forkserver (about 0.1 s, paid once per build_lmdb.py command); the best run leaves that out.
"""

import argparse
import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from fcdn.data.build_pool import default_workers  # noqa: E402
from fcdn.data.image_files import list_images  # noqa: E402
from fcdn.data.lmdb_builder import build  # noqa: E402

TARGET = 1.5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image_folder", default=os.path.join(REPO_ROOT, "data", "images"),
                        help="source images")
    parser.add_argument("--mask_folder", default=os.path.join(REPO_ROOT, "data", "masks"), help="source masks")
    parser.add_argument("--pairs", type=int, default=1000, help="replicate the pairs to at least this many")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the best counts")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes of the parallel configuration")
    return parser.parse_args()


def replicate(image_folder, mask_folder, pairs, folder):
    """Symlink every source pair under new names until there are at least `pairs` of them."""
    names = list_images(mask_folder, "tif")
    images, masks = os.path.join(folder, "images"), os.path.join(folder, "masks")
    os.makedirs(images)
    os.makedirs(masks)
    copies = -(-pairs // len(names))
    for copy in range(copies):
        for name in names:
            replica = f"{os.path.splitext(name)[0]}_r{copy}.tif"
            os.symlink(os.path.abspath(os.path.join(image_folder, name)), os.path.join(images, replica))
            os.symlink(os.path.abspath(os.path.join(mask_folder, name)), os.path.join(masks, replica))
    return images, masks, copies * len(names)


def run_once(images, masks, output, workers):
    """One build into an empty folder (a first build: no earlier database to move aside and delete)."""
    os.makedirs(output)
    try:
        stats = build(images, masks, output, dataset_name="bench", seed=0, workers=workers,
                                 log=lambda line: None)
    finally:
        shutil.rmtree(output)
    return stats["pixel_bytes"] / 1e6 / stats["seconds"], stats


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_build_lmdb_") as folder:
        images, masks, count = replicate(args.image_folder, args.mask_folder, args.pairs, folder)
        output = os.path.join(folder, "out")
        best = {1: 0.0, args.workers: 0.0}
        for repeat in range(args.repeats):
            for workers in best:
                rate, stats = run_once(images, masks, output, workers)
                best[workers] = max(best[workers], rate)
                print(f"run {repeat + 1}: workers={stats['workers']} {stats['pixel_bytes'] / 1e6:.0f} MB of "
                      f"pixels in {stats['seconds']:.2f} s = {rate:.1f} MB/s", flush=True)
    single, parallel = best[1], best[args.workers]
    print(f"{count} pairs; best of {args.repeats}: 1 process {single:.1f} MB/s, "
          f"{args.workers} processes {parallel:.1f} MB/s")
    print(f"build_lmdb throughput (MB/s, all cores vs 1 process) ratio={parallel / single:.2f} target={TARGET}")


if __name__ == "__main__":
    main()
