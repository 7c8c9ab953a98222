"""The planes of a mask or image file to measure: one for a 2-D file, one a plane for a stack.

    with PlaneFile.open("stack_mask.ome.tif", streaming_megapixels=64) as planes:
        planes.axes                      # 'tz': the stack axes of more than one plane
        for index in range(planes.count):
            planes.position(index)       # (1, 2): time point 1, slice 2
            source = planes.source(index)  # shape, streamed, rows(start, stop)

A TIFF is read by its series' axes (image_axes.TiffStack: ImageJ hyperstacks, OME-TIFF, tifffile's
own metadata), an OME-Zarr image or NGFF label image by its NGFF axes. A 2-D TIFF or PNG is opened
as inference opens it (image_sources.open_source). A plane of at least `streaming_megapixels` is
read band by band from tifffile's zarr store, never whole.
"""

import math
import os

import numpy as np

from fcdn.data import image_axes, image_files, image_sources, ome_zarr_io
from fcdn.measure import units


def pixel_size_um(source):
    """(y, x) micrometres of an image source (an OME-Zarr source's NGFF scale, a file's TIFF tags), or None."""
    if isinstance(source, ome_zarr_io.ZarrSource):
        return units.from_zarr(source)
    return units.from_tiff(getattr(source, "pixel_size", None))


class _TiffPlane:
    """Plane `index` of a TIFF stack, read by rows from the stack's store."""

    def __init__(self, path, layout, array, index, streaming_megapixels):
        self.path, self.layout, self.array, self.index = path, layout, array, index
        self.shape = (layout.height, layout.width, layout.channels)
        self.streamed = math.prod(self.shape) >= streaming_megapixels * 1e6

    def rows(self, start, stop):
        return image_files.as_supported_image(self.layout.plane(self.array, self.index, slice(start, stop)),
                                              self.path)


class PlaneFile:
    """The planes of one file: `count`, `axes` (lower-case letters of the stack axes longer than one),
    `position(index)` (the plane's index along each of them), `source(index)` and `pixel_um` ((y, x)
    micrometres or None)."""

    def __init__(self, path, count, axes, positions, make_source, pixel_um, closer):
        self.path, self.count, self.axes = path, count, axes
        self._positions, self._make_source, self.pixel_um, self._closer = positions, make_source, pixel_um, closer

    @classmethod
    def open(cls, path, streaming_megapixels, zarr_label_name=None):
        """zarr_label_name: for an OME-Zarr image, read its label image of that name (a mask) instead."""
        if path.lower().endswith(".zarr"):
            return cls._open_zarr(path, zarr_label_name)
        if image_axes.is_tiff(path):
            stack = image_axes.TiffStack(path)
            if not stack.simple:
                return cls._open_tiff_stack(path, stack, streaming_megapixels)
            stack.close()
        source = image_sources.open_source(path, streaming_megapixels)
        return cls(path, 1, "", lambda index: (), lambda index: source, pixel_size_um(source),
                   source.close)

    @classmethod
    def _open_tiff_stack(cls, path, stack, streaming_megapixels):
        layout = stack.layout
        if 0 in layout.shape:
            stack.close()
            raise image_files.ImageFileError(f"{path}: empty image ({layout.describe()})")
        longer = [axis for axis in layout.stack if layout.shape[axis] > 1]
        array = stack.array()

        def position(index):
            at = dict(zip(layout.stack, np.unravel_index(index, layout.stack_shape)))
            return tuple(int(at[axis]) for axis in longer)

        pixel_um = units.from_tiff(image_sources.read_pixel_size(stack.tiff))
        return cls(path, layout.planes, "".join(layout.axes[axis].lower() for axis in longer), position,
                   lambda index: _TiffPlane(path, layout, array, index, streaming_megapixels), pixel_um,
                   stack.close)

    @classmethod
    def _open_zarr(cls, path, label_name):
        labels = None if label_name is None else os.path.join(path, "labels", label_name)
        source = ome_zarr_io.ZarrSource.open(labels if labels and os.path.isdir(labels) else path)
        names = [name for name in source.axis_names if name not in ("y", "x", "c")]
        longer = [i for i, size in enumerate(source.stack_shape) if size > 1]

        def position(index):
            at = source.plane_position(index)
            return tuple(at[i] for i in longer)

        return cls(source.path, source.planes, "".join(names[i] for i in longer), position,
                   source.plane_source, pixel_size_um(source), source.close)

    def position(self, index):
        return self._positions(index)

    def source(self, index):
        return self._make_source(index)

    def close(self):
        self._closer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

