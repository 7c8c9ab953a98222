"""One image and mask pair into LMDB records: the pure per-file work of building the databases.

Without tiling, a pair is centre-cropped to multiples of 32 (one record); with tiling, it is cut
into the reference's overlapping tiles. Pairs smaller than that are reflect-padded at the
bottom/right first, so pixel (0, 0) keeps its place. The records are the reference's
(fcdn/data/records.py), so databases built here load in the NIST reference tool and back.

A TIFF is read by its axes (image_axes): a stack (z-stack, time series) gives a pair a plane, keyed
`<stem>_z3` (`_t1_z2`...), with the plane of a mask stack of the same axes and sizes, or the one 2-D
mask of the file for every plane when Reading.same_mask says so; channels, wherever the file keeps
them, are last in the record.
"""

import dataclasses
import os

import numpy as np

from fcdn.common.errors import with_path
from fcdn.data import image_axes
from fcdn.data.image_files import (
    ImageFileError,
    as_mask,
    as_supported_image,
    check_finite,
    non_finite_pixels,
    read_image,
)
from fcdn.data.records import SIZE_FACTOR, make_record

# FCDenseNet56's receptive-field radius: the reference strides tiles by tile_size - RADIUS
RADIUS = 384


def file_stem(name):
    """The part of a file name its records' keys start with."""
    return os.path.splitext(name)[0]


def crop_to_multiple(array, factor=SIZE_FACTOR):
    """Centre-crop height and width down to multiples of `factor`, dropping d//2 at the start."""
    height, width = array.shape[:2]
    top, left = (height % factor) // 2, (width % factor) // 2
    return array[top:top + height - height % factor, left:left + width - width % factor]


def pad_to_size(array, height, width):
    """Reflect-pad at the bottom/right up to height x width, so pixel (0, 0) keeps its place."""
    pad_rows, pad_cols = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if not pad_rows and not pad_cols:
        return array
    padding = [(0, pad_rows), (0, pad_cols)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding, mode="reflect")


def tile_origins(height, width, tile_size):
    """The reference's tile origins (y0, x0), x outer, with tiles past an edge slid back inside."""
    delta = tile_size - RADIUS
    if delta < 64:
        delta = int(0.8 * tile_size)
    origins = []
    for x0 in range(0, width, delta):
        for y0 in range(0, height, delta):
            origins.append((min(y0, height - tile_size), min(x0, width - tile_size)))
    # several origins can slide back onto the same tile; the reference wrote it twice under one key
    return list(dict.fromkeys(origins))


def load_pair(image_path, mask_path):
    image = as_supported_image(read_image(image_path), image_path)
    check_finite(image_path, non_finite_pixels(image))
    mask = as_mask(read_image(mask_path), mask_path)
    if image.shape[:2] != mask.shape:
        raise ImageFileError(f"{image_path}: image is {image.shape[0]}x{image.shape[1]} but its mask "
                             f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (height x width)")
    return image, mask


@dataclasses.dataclass(frozen=True)
class Reading:
    """How the images are read: the channel axis ("auto", "none" or an index), the TIFF series, and
    whether one 2-D mask stands for every plane of a stack."""

    channel_axis: object = "auto"
    series: int = 0
    same_mask: bool = False


def _mask_planes(image_path, mask_path, layout, reading):
    """plane index -> the mask of that plane (a class map of the image's height and width)."""
    if reading.same_mask:
        mask = as_mask(read_image(mask_path), mask_path)
        return lambda index: mask
    mask_layout, masks = image_axes.read_planes(mask_path, "auto", reading.series)
    if mask_layout.stack_shape != layout.stack_shape and masks.ndim == len(layout.stack_shape) + 2:
        mask_layout = image_axes.layout("", masks.shape, "none", mask_path)  # no axes: as stored
    if mask_layout.stack_shape != layout.stack_shape:
        raise ImageFileError(f"{image_path}: a stack of {layout.planes} planes ({layout.describe()}) but its mask "
                             f"{mask_path} is {mask_layout.describe()}: give a mask of the same axes and sizes, "
                             f"or one 2-D mask for every plane with --same_mask_for_planes 1")
    return lambda index: as_mask(mask_layout.plane(masks, index), mask_path)


def load_planes(image_path, mask_path, reading):
    """(key suffix, image, mask) of every plane of an image file and its mask; one '' pair for a 2-D image."""
    if not image_axes.is_tiff(image_path):
        yield "", *load_pair(image_path, mask_path)
        return
    layout, array = image_axes.read_planes(image_path, reading.channel_axis, reading.series)
    masks = _mask_planes(image_path, mask_path, layout, reading)
    for index in range(layout.planes):
        image = as_supported_image(layout.plane(array, index), image_path)
        check_finite(image_path, non_finite_pixels(image))
        mask = masks(index)
        if image.shape[:2] != mask.shape:
            what = f"plane {layout.plane_key(index)[1:]}" if layout.planes > 1 else "image"
            raise ImageFileError(f"{image_path}: {what} is {image.shape[0]}x{image.shape[1]} but its mask "
                                 f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (height x width)")
        yield layout.plane_key(index), image, mask


def pair_records(image, mask, stem, tile_size):
    """(key, value) records of one pair, the cropped pair or its tiles, and their bytes of pixels."""
    if tile_size:
        image, mask = pad_to_size(image, tile_size, tile_size), pad_to_size(mask, tile_size, tile_size)
        origins = tile_origins(image.shape[0], image.shape[1], tile_size)
        pieces = [(image[y0:y0 + tile_size, x0:x0 + tile_size], mask[y0:y0 + tile_size, x0:x0 + tile_size],
                   (y0, x0)) for y0, x0 in origins]
    else:
        image = crop_to_multiple(pad_to_size(image, SIZE_FACTOR, SIZE_FACTOR))
        mask = crop_to_multiple(pad_to_size(mask, SIZE_FACTOR, SIZE_FACTOR))
        pieces = [(image, mask, None)]
    records = [make_record(stem, piece_image, piece_mask, origin) for piece_image, piece_mask, origin in pieces]
    return records, sum(piece_image.nbytes + piece_mask.nbytes for piece_image, piece_mask, _ in pieces)


def encode_file(task):
    """Worker: one file name -> its records (those of every plane of a stack) and pixel bytes, or an
    error message naming the file."""
    name, image_folder, mask_folder, tile_size, reading = task
    image_path, mask_path = os.path.join(image_folder, name), os.path.join(mask_folder, name)
    records, pixel_bytes = [], 0
    try:
        for key, image, mask in load_planes(image_path, mask_path, reading):
            plane_records, plane_bytes = pair_records(image, mask, file_stem(name) + key, tile_size)
            records += plane_records
            pixel_bytes += plane_bytes
    except ImageFileError as error:
        return {"error": str(error)}
    except Exception as error:  # an unexpected failure still names the file, not a worker traceback
        return {"error": with_path(image_path, error)}
    minimum = tile_size or SIZE_FACTOR
    padded = image.shape[0] < minimum or image.shape[1] < minimum
    return {"records": records, "pixel_bytes": pixel_bytes, "padded": padded}
