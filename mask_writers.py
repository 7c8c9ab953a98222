"""Where inference writes masks: one writer per output format, each fed full-width bands of rows.

    writer = mask_writer("out/masks", "slide.tif")      # TiffMaskWriter for out/masks/slide.tif
    writer.write(bands, shape=(height, width), dtype=np.uint8, streamed=True)

Every writer builds its file under a temporary name and renames it into place when complete
(atomic_files), so a mask that exists is whole. TIFF masks are zlib-compressed, tiled (1024x1024)
when larger than one tile; a streamed mask (its image was never held whole) is written tile by tile
as a tiled BigTIFF and never held whole either. png and jpg images get png masks: a mask must be
stored losslessly.
"""

import os

import numpy as np

import atomic_files

OUTPUT_TIFF_TILE = 1024
# Above this size (bytes of mask) a TIFF needs 64-bit offsets; compressed masks stay far below it.
BIGTIFF_BYTES = 2**31


def output_path(output_folder, name):
    """Same file name; jpg inputs get a .png mask because a mask must be stored losslessly."""
    stem, extension = os.path.splitext(name)
    if extension.lower() in (".jpg", ".jpeg"):
        extension = ".png"
    return os.path.join(output_folder, stem + extension)


def tiff_tiles(bands, width, dtype):
    """Re-cut full-width bands of mask rows into 1024x1024 TIFF tiles, in storage order."""
    buffer = np.empty((OUTPUT_TIFF_TILE, width), dtype)
    filled = 0
    for band in bands:
        used = 0
        while used < len(band):
            count = min(OUTPUT_TIFF_TILE - filled, len(band) - used)
            buffer[filled:filled + count] = band[used:used + count]
            filled, used = filled + count, used + count
            if filled == OUTPUT_TIFF_TILE:
                for x in range(0, width, OUTPUT_TIFF_TILE):
                    yield buffer[:, x:x + OUTPUT_TIFF_TILE].copy()  # the writer may hold tiles a while
                filled = 0
    if filled:  # the writer zero-pads the last row of tiles
        for x in range(0, width, OUTPUT_TIFF_TILE):
            yield buffer[:filled, x:x + OUTPUT_TIFF_TILE].copy()


class MaskWriter:
    """Writes one mask, atomically, from an iterator of full-width bands of rows (top to bottom)."""

    def __init__(self, path):
        self.path = path

    def write(self, bands, shape, dtype, streamed=False):
        """Consume `bands` into the mask file; streamed: never hold the whole mask."""
        with atomic_files.replacing_file(self.path) as temporary:
            self._write(temporary, bands, shape, np.dtype(dtype), streamed)

    def _write(self, path, bands, shape, dtype, streamed):
        raise NotImplementedError


class TiffMaskWriter(MaskWriter):
    def _write(self, path, bands, shape, dtype, streamed):
        import tifffile

        if streamed:
            data, tiled, big = tiff_tiles(bands, shape[1], dtype), True, True
        else:
            data = np.concatenate(list(bands))
            tiled = shape[0] > OUTPUT_TIFF_TILE or shape[1] > OUTPUT_TIFF_TILE
            big = data.nbytes >= BIGTIFF_BYTES
        with tifffile.TiffWriter(path, bigtiff=big) as writer:
            writer.write(data, shape=shape, dtype=dtype, compression="zlib",
                         tile=(OUTPUT_TIFF_TILE, OUTPUT_TIFF_TILE) if tiled else None)


class PngMaskWriter(MaskWriter):
    def _write(self, path, bands, shape, dtype, streamed):
        import imageio.v3 as iio

        if dtype == np.int32:
            raise ValueError(f"{self.path}: png cannot store more than 65536 classes: use tif images")
        iio.imwrite(path, np.concatenate(list(bands)), extension=".png")


WRITERS = {".tif": TiffMaskWriter, ".tiff": TiffMaskWriter, ".png": PngMaskWriter}


def mask_writer(output_folder, image_name):
    """The writer for the mask of `image_name` in `output_folder`, chosen by the mask's extension."""
    path = output_path(output_folder, image_name)
    return WRITERS[os.path.splitext(path)[1].lower()](path)
