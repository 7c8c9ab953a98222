"""Where inference writes masks and probability maps: one writer per format, fed full-width bands of rows.

    writer = mask_writer("out/masks", "slide.tif")      # TiffMaskWriter for out/masks/slide.tif
    writer.write(bands, shape=(height, width), dtype=np.uint8, streamed=True)

Every writer builds its file under a temporary name and renames it into place when complete
(atomic_files), so a mask that exists is whole. TIFF masks are zlib-compressed, tiled (1024x1024)
when larger than one tile; a streamed mask (its image was never held whole) is written tile by tile
as a tiled BigTIFF and never held whole either. png and jpg images get png masks: a mask must be
stored losslessly. A TIFF output carries its image's pixel size: the resolution tags, for an
OME-TIFF image the OME PhysicalSizeX/Y with their units, and for an ImageJ image its unit.
"""

import os

import numpy as np

from fcdn.common import atomic_files

OUTPUT_TIFF_TILE = 1024
# Above this size (bytes of mask) a TIFF needs 64-bit offsets; compressed masks stay far below it.
BIGTIFF_BYTES = 2**31


def output_path(output_folder, name):
    """Same file name; jpg inputs get a .png mask because a mask must be stored losslessly."""
    stem, extension = os.path.splitext(name)
    if extension.lower() in (".jpg", ".jpeg"):
        extension = ".png"
    return os.path.join(output_folder, stem + extension)


def rebanded(bands, rows, width, dtype, samples=()):
    """Re-cut full-width bands of any heights into blocks of `rows` rows (the last may be shorter).

    Yields (first row, block); the block is a view of one buffer that the next block overwrites, so a
    consumer that keeps it must copy it.
    """
    buffer = np.empty((rows, width) + tuple(samples), dtype)
    filled = start = 0
    for band in bands:
        used = 0
        while used < len(band):
            count = min(rows - filled, len(band) - used)
            buffer[filled:filled + count] = band[used:used + count]
            filled, used = filled + count, used + count
            if filled == rows:
                yield start, buffer
                start, filled = start + rows, 0
    if filled:
        yield start, buffer[:filled]


def tiff_tiles(bands, width, dtype, samples=()):
    """Re-cut full-width bands of rows (rows, width, *samples) into 1024x1024 TIFF tiles, in storage order."""
    for _, block in rebanded(bands, OUTPUT_TIFF_TILE, width, dtype, samples):
        # the writer zero-pads a short last row of tiles, and may hold tiles a while: copies
        for x in range(0, width, OUTPUT_TIFF_TILE):
            yield block[:, x:x + OUTPUT_TIFF_TILE].copy()


def _tiff_options(pixel_size, samples, plain):
    """TiffWriter and write() keyword arguments that carry the image's pixel size. plain: a mask that
    ImageJ's format can hold (uint8 or uint16, no samples, not a BigTIFF), which keeps an ImageJ
    image's `unit`: without it the resolution tags count pixels per no unit at all."""
    opener, options = {"ome": False}, {}
    if pixel_size is None:
        return opener, options
    if pixel_size.resolution is not None:
        options.update(resolution=pixel_size.resolution, resolutionunit=pixel_size.resolution_unit)
    if pixel_size.ome:
        opener["ome"] = True
        options["metadata"] = dict(pixel_size.ome, axes="YXS" if samples else "YX")
    elif pixel_size.imagej_unit and plain and not samples:
        opener["imagej"] = True
        options["metadata"] = {"unit": pixel_size.imagej_unit, "axes": "YX"}
    return opener, options


class MaskWriter:
    """Writes one output image, atomically, from an iterator of full-width bands of rows (top to bottom)."""

    def __init__(self, path):
        self.path = path

    def write(self, bands, shape, dtype, streamed=False, pixel_size=None):
        """Consume `bands` into the file; streamed: never hold the whole image; shape (H, W[, samples])."""
        with atomic_files.replacing_file(self.path) as temporary:
            self._write(temporary, bands, tuple(shape), np.dtype(dtype), streamed, pixel_size)

    def _write(self, path, bands, shape, dtype, streamed, pixel_size):
        raise NotImplementedError


class TiffMaskWriter(MaskWriter):
    """zlib-compressed TIFF; tiled when larger than a tile; a streamed one tile by tile as BigTIFF.

    Extra dimensions of the bands (a probability map's classes) are stored as contiguous samples
    (minisblack), which Fiji and napari read as channels.
    """

    def _write(self, path, bands, shape, dtype, streamed, pixel_size):
        import tifffile

        samples = shape[2:]
        if streamed:
            data, tiled, big = tiff_tiles(bands, shape[1], dtype, samples), True, True
        else:
            data = np.concatenate(list(bands))
            tiled = shape[0] > OUTPUT_TIFF_TILE or shape[1] > OUTPUT_TIFF_TILE
            big = data.nbytes >= BIGTIFF_BYTES
        plain = not big and dtype in (np.uint8, np.uint16)
        opener, options = _tiff_options(pixel_size, samples, plain)
        if samples:
            options.update(photometric="minisblack", planarconfig="contig")
        with tifffile.TiffWriter(path, bigtiff=big, **opener) as writer:
            writer.write(data, shape=shape, dtype=dtype, compression="zlib",
                         tile=(OUTPUT_TIFF_TILE, OUTPUT_TIFF_TILE) if tiled else None, **options)


class PngMaskWriter(MaskWriter):
    def _write(self, path, bands, shape, dtype, streamed, pixel_size):
        import imageio.v3 as iio

        if dtype == np.int32:
            raise ValueError(f"{self.path}: png cannot store more than 65536 classes: use tif images")
        iio.imwrite(path, np.concatenate(list(bands)), extension=".png")


WRITERS = {".tif": TiffMaskWriter, ".tiff": TiffMaskWriter, ".png": PngMaskWriter}


def mask_writer(output_folder, image_name):
    """The writer for the mask of `image_name` in `output_folder`, chosen by the mask's extension."""
    path = output_path(output_folder, image_name)
    return WRITERS[os.path.splitext(path)[1].lower()](path)


def probabilities_path(output_folder, image_name):
    """`<stem>_probabilities.tif` beside the mask (`.ome.tif` for an OME-TIFF image)."""
    name = os.path.basename(image_name)
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return os.path.join(output_folder, name[:-len(suffix)] + "_probabilities.ome.tif")
    return os.path.join(output_folder, os.path.splitext(name)[0] + "_probabilities.tif")


def probabilities_writer(output_folder, image_name):
    """The writer of an image's probability map: one uint8 channel per class (255 = probability 1)."""
    return TiffMaskWriter(probabilities_path(output_folder, image_name))


def _stack_options(description, pixel_size, samples):
    """TiffWriter and write() keyword arguments of a stack's output: its axes in the image's kind of
    metadata (ImageJ hyperstack, OME, or tifffile's own), and the image's pixel size."""
    axes = description.axes + ("S" if samples else "")
    opener, options = {}, {"photometric": "minisblack"}
    if pixel_size is not None and pixel_size.resolution is not None:
        options.update(resolution=pixel_size.resolution, resolutionunit=pixel_size.resolution_unit)
    ome = dict(pixel_size.ome) if pixel_size is not None and pixel_size.ome else {}
    if description.kind == "imagej" and not samples:  # an ImageJ hyperstack holds no samples but RGB
        opener["imagej"] = True
        options["metadata"] = dict(description.imagej, axes=axes)
    elif description.kind == "ome" or ome:
        opener["ome"] = True
        options["metadata"] = dict(ome, axes=axes)
    else:
        options["metadata"] = {"axes": axes}
    if samples:
        options["planarconfig"] = "contig"
    return opener, options


class StackTiffWriter(MaskWriter):
    """A stack's mask or probability map: one zlib-compressed TIFF of the image's axes less C, fed the
    bands of its planes one plane after the other (an iterator of per-plane band iterators).

    description: `axes` (the stack axes and YX), `stack_shape`, `kind` ('imagej', 'ome' or 'shaped')
    and `imagej` (the ImageJ metadata kept: unit, spacing, finterval). A streamed stack is written
    tile by tile as a tiled BigTIFF (an ImageJ one as a classic TIFF, which ImageJ requires).
    """

    def __init__(self, path, description):
        super().__init__(path)
        self.description = description

    def _write(self, path, planes, shape, dtype, streamed, pixel_size):
        import tifffile

        samples = shape[2:]
        full_shape = tuple(self.description.stack_shape) + shape
        opener, options = _stack_options(self.description, pixel_size, samples)
        tiled = streamed or shape[0] > OUTPUT_TIFF_TILE or shape[1] > OUTPUT_TIFF_TILE
        if streamed:
            data = (tile for bands in planes for tile in tiff_tiles(bands, shape[1], dtype, samples))
        else:
            data = np.stack([np.concatenate(list(bands)) for bands in planes]).reshape(full_shape)
        big = not opener.get("imagej") and (streamed or data.nbytes >= BIGTIFF_BYTES)
        with tifffile.TiffWriter(path, bigtiff=big, **opener) as writer:
            writer.write(data, shape=full_shape, dtype=dtype, compression="zlib",
                         tile=(OUTPUT_TIFF_TILE, OUTPUT_TIFF_TILE) if tiled else None, **options)
