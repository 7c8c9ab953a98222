"""Object tables of a 16384x16384 mask with about 100,000 objects: streamed memory and time.

    python bench/bench_measure_objects.py
    python bench/bench_measure_objects.py --size 8192

Writes a tiled TIFF mask of two classes: small blobs on a grid (about 100,000 at the default size),
plus long objects that cross every band (a spiral arm, full-height columns). Then runs
measure_objects.py on it twice in fresh processes: streamed (band by band, the default for a mask of
this size) and whole (--streaming_megapixels above its size: scikit-image's regionprops_table on the
mask read at once, the baseline). Each run's peak resident memory comes from the kernel
(getrusage of the child); both tables must be equal. The last line is the streamed run's headroom
under the 2 GB bound: ratio = 2 GB / streamed peak, target 1 (at least).
"""

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_BYTES = 2 * 1024**3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="height and width of the mask")
    parser.add_argument("--spacing", type=int, default=52, help="grid step of the small blobs")
    return parser.parse_args()


def make_mask(size, spacing, seed=0):
    """Blobs of random size on a grid (classes 1 and 2), and class-1 objects crossing every band."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for top in range(0, size - spacing, spacing):
        radii = rng.integers(3, spacing // 2 - 2, size // spacing)
        classes = rng.integers(1, 3, size // spacing).astype(np.uint8)
        for index, left in enumerate(range(0, size - spacing, spacing)):
            radius = radii[index]
            mask[top + 2:top + 2 + radius, left + 2:left + 2 + 2 * radius] = classes[index]
    mask[:, size // 3] = 1  # full-height lines through every band and every blob row
    mask[:, 2 * size // 3:2 * size // 3 + 3] = 2
    return mask


def run_measure(mask_folder, output_folder, streaming_megapixels):
    """(seconds, peak resident bytes) of one measure_objects.py run in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "measure_objects.py"), "--mask_folder",
                                mask_folder, "--output_folder", output_folder, "--streaming_megapixels",
                                str(streaming_megapixels)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, in KiB on Linux
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"error: measure_objects.py exited with {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as folder:
        masks = os.path.join(folder, "masks")
        os.mkdir(masks)
        start = time.perf_counter()
        mask = make_mask(args.size, args.spacing)
        tifffile.imwrite(os.path.join(masks, "slide.tif"), mask, tile=(512, 512), compression="zlib")
        del mask
        print(f"wrote a {args.size}x{args.size} mask in {time.perf_counter() - start:.1f} s; measuring it "
              f"streamed, then whole", flush=True)
        streamed_seconds, streamed_peak = run_measure(masks, os.path.join(folder, "streamed"), 16)
        print(f"streamed: {streamed_seconds:.1f} s, peak {streamed_peak / 1e9:.2f} GB", flush=True)
        whole_seconds, whole_peak = run_measure(masks, os.path.join(folder, "whole"), 1e6)
        print(f"whole (regionprops_table): {whole_seconds:.1f} s, peak {whole_peak / 1e9:.2f} GB", flush=True)
        with open(os.path.join(folder, "streamed", "objects_summary.csv")) as handle:
            objects = sum(int(line.split(",")[2]) for line in handle.readlines()[1:])
        same = filecmp.cmp(os.path.join(folder, "streamed", "slide_objects.csv"),
                           os.path.join(folder, "whole", "slide_objects.csv"), shallow=False)
        print(f"{objects} objects; tables {'identical' if same else 'DIFFER'}; streamed "
              f"{args.size**2 / streamed_seconds / 1e6:.1f} Mpx/s, whole {args.size**2 / whole_seconds / 1e6:.1f} Mpx/s")
    print(f"measure_objects streamed peak memory (2 GB bound / peak) ratio={BOUND_BYTES / streamed_peak:.2f} target=1")


if __name__ == "__main__":
    main()
