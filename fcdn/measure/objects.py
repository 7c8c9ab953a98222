"""Objects of a mask, measured: the 8-connected components of each foreground class.

Two ways to one table. A mask held whole is labelled and measured by scikit-image
(`regionprops_table`). A mask too large for memory arrives in bands of full-width rows
(`BandedObjects`): each band is labelled alone, the labels of neighbouring bands are joined across
each seam (union-find over the pairs of labels that touch there, diagonals included), and every
object's sums are accumulated, so the table equals the whole mask's without ever holding it.

Columns, per object, in the order of each object's first pixel in raster order (the order of
scikit-image's labels): `class`, `area_pixels`, `centroid_y`, `centroid_x`, `bbox_min_y`,
`bbox_min_x`, `bbox_max_y`, `bbox_max_x` (exclusive, as scikit-image), `perimeter`
(scikit-image's, 4-connected), `equivalent_diameter` (of the disc of the same area),
`eccentricity` (of the ellipse of the same second moments; 0 for a single pixel, as
scikit-image), and with an image `intensity_mean_c<k>`, `intensity_min_c<k>`,
`intensity_max_c<k>` for each channel k.
"""

import math

import numpy as np
from scipy import ndimage
from skimage import measure

SHAPE_COLUMNS = ("class", "area_pixels", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x",
                 "bbox_max_y", "bbox_max_x", "perimeter", "equivalent_diameter", "eccentricity")
INTENSITIES = ("mean", "min", "max")

# skimage.measure.perimeter's weights: a boundary pixel's 3x3 neighbourhood of boundary pixels,
# coded by a convolution, says how much boundary it carries (1, sqrt 2, or their mean)
_CODE_KERNEL = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], dtype=np.uint8)
_CODE_WEIGHTS = np.zeros(50)
_CODE_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_CODE_WEIGHTS[[21, 33]] = math.sqrt(2)
_CODE_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2
_CROSS = ndimage.generate_binary_structure(2, 1)
# rows of context a perimeter needs on each side: one for the erosion, one for the convolution
PERIMETER_CONTEXT = 2


def intensity_columns(channels):
    return [f"intensity_{statistic}_c{channel}" for channel in range(channels) for statistic in INTENSITIES]


def label_objects(mask):
    """Labels of the 8-connected components of each nonzero value of `mask` (1, 2, ... in raster order)."""
    return measure.label(mask, background=0, connectivity=2)


def measure_whole(mask, image=None):
    """The table (a dict of column arrays) of a mask held whole; `image` (HWC) adds intensities."""
    labels = label_objects(mask)
    properties = ["label", "area", "centroid", "bbox", "perimeter", "equivalent_diameter_area", "eccentricity"]
    if image is not None:
        properties += ["intensity_mean", "intensity_min", "intensity_max"]
        if image.dtype == np.float32:  # scikit-image averages in the image's type: float32 loses digits
            image = image.astype(np.float64)
    table = measure.regionprops_table(labels, intensity_image=image, properties=properties)
    columns = {
        "class": np.asarray(ndimage.maximum(mask, labels, table["label"]), dtype=np.int64).reshape(-1),
        "area_pixels": table["area"].astype(np.int64),
        "centroid_y": table["centroid-0"], "centroid_x": table["centroid-1"],
        "bbox_min_y": table["bbox-0"], "bbox_min_x": table["bbox-1"],
        "bbox_max_y": table["bbox-2"], "bbox_max_x": table["bbox-3"],
        "perimeter": table["perimeter"], "equivalent_diameter": table["equivalent_diameter_area"],
        "eccentricity": table["eccentricity"],
    }
    for channel in range(0 if image is None else image.shape[2]):
        for statistic in INTENSITIES:
            columns[f"intensity_{statistic}_c{channel}"] = table[f"intensity_{statistic}-{channel}"]
    return columns


def perimeter_contributions(window):
    """Each pixel's share of its object's perimeter, for the rows of `window` (mask rows) but the
    PERIMETER_CONTEXT first and last, which are context (zeros beyond the image's edges).

    scikit-image measures an object's perimeter on its own pixels; two pixels of one class that
    touch (diagonally too) are one object, so within a pixel's 5x5 neighbourhood "of my object"
    is "of my class", and the perimeter is a sum of per-pixel terms that a band can compute.
    """
    shares = np.zeros(window.shape, dtype=np.float64)
    inner = window[PERIMETER_CONTEXT:-PERIMETER_CONTEXT]
    for value in np.unique(inner):
        if value == 0:
            continue
        pixels = window == value
        boundary = pixels & ~ndimage.binary_erosion(pixels, _CROSS, border_value=0)
        codes = ndimage.convolve(boundary.astype(np.uint8), _CODE_KERNEL, mode="constant", cval=0)
        shares[boundary] = _CODE_WEIGHTS[codes[boundary]]
    return shares[PERIMETER_CONTEXT:-PERIMETER_CONTEXT]


def finish_columns(area, sums, bbox, perimeter, classes):
    """The shape columns from exact integer sums: area, (Sy, Sx, Syy, Sxx, Sxy) and bbox per object."""
    sum_y, sum_x, sum_yy, sum_xx, sum_xy = sums
    area_float = area.astype(np.float64)
    centroid_y, centroid_x = sum_y / area_float, sum_x / area_float
    # central second moments from exact integers (Python ints: n * Syy - Sy**2 overflows int64)
    n = area.astype(object)
    mu_yy = (n * sum_yy.astype(object) - sum_y.astype(object) ** 2).astype(np.float64) / area_float**2
    mu_xx = (n * sum_xx.astype(object) - sum_x.astype(object) ** 2).astype(np.float64) / area_float**2
    mu_xy = (n * sum_xy.astype(object) - sum_y.astype(object) * sum_x.astype(object)).astype(
        np.float64) / area_float**2
    # scikit-image's inertia tensor [[mu_xx, -mu_xy], [-mu_xy, mu_yy]] and its eigenvalues
    tensors = np.stack([np.stack([mu_xx, -mu_xy], -1), np.stack([-mu_xy, mu_yy], -1)], -2)
    eigenvalues = np.clip(np.linalg.eigvalsh(tensors), 0, None) if len(area) else np.zeros((0, 2))
    small, large = eigenvalues[:, 0], eigenvalues[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(large > 0, np.sqrt(np.clip(1 - small / large, 0, None)), 0.0)
    return {
        "class": classes, "area_pixels": area, "centroid_y": centroid_y, "centroid_x": centroid_x,
        "bbox_min_y": bbox[:, 0], "bbox_min_x": bbox[:, 1], "bbox_max_y": bbox[:, 2], "bbox_max_x": bbox[:, 3],
        "perimeter": perimeter, "equivalent_diameter": np.sqrt(4 * area_float / np.pi),
        "eccentricity": eccentricity,
    }
