"""Milliseconds per 512x512 single-channel float32 example: composed augmentation vs the reference's way.

The baseline does what the reference's augment_image did, with the same parameter distributions:
skimage.transform.rotate, then skimage.transform.warp for translate + scale, numpy flips, float64
noise, scipy Gaussian blur, each geometric step on the image (bilinear) and on the mask (order 0).
This project's augment.augment builds one affine matrix and warps image and mask once each, with
OpenCV when it is installed (`opencv-python-headless`, single-threaded here), else scikit-image.
The headline ratio is for the image alone (the stricter figure: the reference's order-0 mask warps
go through scikit-image's slow generic path, which inflates the image + mask baseline).

    python bench/bench_augment.py
    python bench/bench_augment.py --rounds 10 --per_round 20
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import scipy.ndimage
import skimage.transform

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--rounds", type=int, default=7, help="alternating measurement rounds (median kept)")
    parser.add_argument("--per_round", type=int, default=15, help="examples per method per round")
    return parser.parse_args()


def reference_augment(image, mask, config, rng):
    """The reference's sequence: two full warps per array, then flips, noise and blur, float64 noise."""
    height, width = image.shape[:2]
    if config.rotation:
        angle = rng.uniform(0, 360)
        image = skimage.transform.rotate(image, angle, mode="reflect", preserve_range=True)
        mask = skimage.transform.rotate(mask, angle, order=0, mode="reflect", preserve_range=True)
    translation = (int(config.jitter_severity * width * rng.random()) * rng.choice([-1, 1]),
                   int(config.jitter_severity * height * rng.random()) * rng.choice([-1, 1]))
    scale = (rng.uniform(1 - config.scale_severity, 1 + config.scale_severity),
             rng.uniform(1 - config.scale_severity, 1 + config.scale_severity))
    transform = skimage.transform.AffineTransform(scale=scale, translation=translation)
    image = skimage.transform.warp(image, transform.inverse, mode="reflect", preserve_range=True)
    mask = skimage.transform.warp(mask, transform.inverse, order=0, mode="reflect", preserve_range=True)
    if config.reflection:
        if rng.random() < 0.5:
            image, mask = np.fliplr(image), np.fliplr(mask)
        if rng.random() < 0.5:
            image, mask = np.flipud(image), np.flipud(mask)
    sigma = rng.uniform(-config.noise_severity, config.noise_severity) * (image.max() - image.min())
    image = image + sigma * rng.standard_normal(image.shape)
    blur = rng.uniform(-config.blur_max_sigma, config.blur_max_sigma)
    if blur > 0:
        image = scipy.ndimage.gaussian_filter(image, blur)
    return image.astype(np.float32), mask.astype(np.uint8)


def composed(backend):
    return lambda image, mask, config, rng: augment.augment(image[:, :, np.newaxis], mask, config, rng,
                                                            backend)


def make_example(size):
    """A smooth image with cell-like blobs and its binary mask."""
    rng = np.random.default_rng(0)
    image = scipy.ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 8).astype(np.float32)
    image = (image - image.min()) * 4000.0
    mask = (image > np.percentile(image, 70)).astype(np.uint8)
    return image, mask


def time_method(method, image, mask, config, rng, count):
    start = time.perf_counter()
    for _ in range(count):
        method(image, mask, config, rng)
    return (time.perf_counter() - start) / count * 1e3


def measure(methods, image, mask, config, args):
    """Median ms per example of each method, alternating rounds so that load changes hit both."""
    rng = np.random.default_rng(1)
    for method in methods.values():
        method(image, mask, config, rng)  # warm-up
    results = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            results[name].append(time_method(method, image, mask, config, rng, args.per_round))
    return {name: statistics.median(values) for name, values in results.items()}


def main():
    args = parse_args()
    if augment.cv2 is not None:
        augment.cv2.setNumThreads(1)  # one core, like the baseline and like one reader worker
    config = augment.AugmentationConfig()
    image, mask = make_example(args.size)
    print(f"{args.size}x{args.size} float32 image + uint8 mask, settings {config.to_dict()}")
    print(f"backends available: {', '.join(augment.BACKENDS)}; default {augment.DEFAULT_BACKEND}")
    methods = {"baseline": lambda i, m, c, r: reference_augment(i, m[:1, :1], c, r)}
    methods.update({backend: lambda i, m, c, r, b=backend: composed(b)(i, None, c, r)
                    for backend in augment.BACKENDS})
    image_only = measure(methods, image, mask, config, args)
    methods = {"baseline": reference_augment}
    methods.update({backend: composed(backend) for backend in augment.BACKENDS})
    with_mask = measure(methods, image, mask, config, args)
    for name, figures in (("image + mask", with_mask), ("image only", image_only)):
        parts = [f"{key} {value:.2f} ms (ratio {figures['baseline'] / value:.2f})"
                 for key, value in figures.items() if key != "baseline"]
        print(f"{name}: baseline {figures['baseline']:.2f} ms, composed: {', '.join(parts)}")
    ratio = image_only["baseline"] / image_only[augment.DEFAULT_BACKEND]
    print(f"augment ms per {args.size}x{args.size} image (baseline / composed) ratio={ratio:.2f} target=3.0")


if __name__ == "__main__":
    main()
