"""Where inference reads images from: one interface for an array in memory and a TIFF streamed by rows.

    with open_source("slide.tif", streaming_megapixels=64) as source:
        height, width, channels = source.shape
        mean, std = source.statistics()          # per channel, over the whole image
        band = source.rows(0, 512)               # (512, width, channels)

A TIFF of at least `streaming_megapixels` is never loaded whole: uncompressed contiguous pixels are
read straight from the file, tiled or striped ones by decoding only the segments that hold the rows
asked for. Other images are decoded whole into an ArraySource.
"""

import dataclasses
import math
import os
import xml.etree.ElementTree

import numpy as np

from fcdn.data import image_files

# Values per block when the streaming pass computes the normalisation statistics.
STATISTICS_BLOCK_PIXELS = 2**22


@dataclasses.dataclass(frozen=True)
class PixelSize:
    """An image's pixel size, as its TIFF stored it, for the outputs made from it to carry.

    resolution: (x, y) pixels per resolution_unit (TIFF XResolution, YResolution), or None;
    resolution_unit: the TIFF ResolutionUnit (1 none, 2 inch, 3 centimetre);
    ome: the OME Pixels attributes PhysicalSizeX/Y and their units, or None for a plain TIFF;
    imagej_unit: an ImageJ TIFF's `unit` (its resolution then counts pixels per that unit), or None.
    """

    resolution: tuple = None
    resolution_unit: int = None
    ome: dict = None
    imagej_unit: str = None


OME_PHYSICAL_SIZES = ("PhysicalSizeX", "PhysicalSizeXUnit", "PhysicalSizeY", "PhysicalSizeYUnit")


def _ome_physical_size(tiff):
    """PhysicalSizeX/Y (and units) of the first OME Pixels element, or None."""
    if not tiff.is_ome or not tiff.ome_metadata:
        return None
    try:
        root = xml.etree.ElementTree.fromstring(tiff.ome_metadata)
    except xml.etree.ElementTree.ParseError:
        return None
    pixels = next((element for element in root.iter() if element.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes = {name: pixels.attrib[name] for name in OME_PHYSICAL_SIZES if name in pixels.attrib}
    for name in ("PhysicalSizeX", "PhysicalSizeY"):
        if name in sizes:
            sizes[name] = float(sizes[name])
    return sizes or None


def read_pixel_size(tiff):
    """The PixelSize of an open tifffile.TiffFile (resolution tags of its first page, OME sizes)."""
    page = tiff.pages.first
    resolution = unit = None
    if "XResolution" in page.tags and "YResolution" in page.tags:
        resolution = page.get_resolution()
        unit = int(page.resolutionunit)
    imagej_unit = (tiff.imagej_metadata or {}).get("unit") if tiff.is_imagej else None
    return PixelSize(resolution, unit, _ome_physical_size(tiff), imagej_unit)


@dataclasses.dataclass(frozen=True)
class BlockStatistics:
    """One block of rows of the statistics pass: its pixel count, per-channel mean and sum of squared
    deviations (float64), and how many of its pixels are NaN or Inf."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    non_finite: int


def merged_blocks(blocks):
    """The BlockStatistics of consecutive blocks of rows, merged in their order (Chan et al.): the
    same blocks give the same bits, whoever computed them."""
    channels = len(blocks[0].mean)
    count, mean, m2, non_finite = 0, np.zeros(channels), np.zeros(channels), 0
    for block in blocks:
        non_finite += block.non_finite
        delta = block.mean - mean
        total = count + block.count
        mean = mean + delta * block.count / total
        m2 = m2 + block.m2 + delta**2 * count * block.count / total
        count = total
    return BlockStatistics(count, mean, m2, non_finite)


def merge_statistics(path, blocks):
    """Per-channel (mean, std) of the image whose blocks of rows, top to bottom, are `blocks`
    (BlockStatistics). ImageFileError when a pixel is NaN or Inf."""
    merged = merged_blocks(blocks)
    image_files.check_finite(path, merged.non_finite)
    return merged.mean, np.sqrt(merged.m2 / merged.count)


def _piece_statistics(piece):
    non_finite = image_files.non_finite_pixels(piece)
    piece = piece.astype(np.float32)
    mean = piece.mean(axis=(0, 1), dtype=np.float64)
    piece -= mean.astype(np.float32)  # in place: one float32 copy of the piece, not two
    m2 = np.square(piece, dtype=np.float64).sum(axis=(0, 1))
    return BlockStatistics(piece.shape[0] * piece.shape[1], mean, m2, non_finite)


class ImageSource:
    """What inference reads an image through.

    Subclasses set `path`, `shape` (height, width, channels) and `streamed` (True when the image is
    never held whole, so its mask should be written band by band too) and provide rows(start, stop):
    pixels [start, stop) of every column, (rows, width, channels) in a supported pixel type.
    statistics() streams over blocks of rows; close() frees what the source holds.
    """

    path = None
    shape = None
    streamed = False
    pixel_size = None  # a PixelSize where the file says

    def rows(self, start, stop):
        raise NotImplementedError

    def statistics_rows(self):
        """Rows per block of the statistics pass: about STATISTICS_BLOCK_PIXELS values."""
        height, width, channels = self.shape
        return max(1, STATISTICS_BLOCK_PIXELS // (width * channels))

    def statistics_blocks(self):
        """(start, stop) of every block of rows of the statistics pass, top to bottom."""
        height, step = self.shape[0], self.statistics_rows()
        return [(start, min(start + step, height)) for start in range(0, height, step)]

    def block_statistics(self, start, stop):
        """The BlockStatistics of rows [start, stop): what statistics() merges, block by block.

        A block may be a whole strip or chunk (decoded once); it is taken STATISTICS_BLOCK_PIXELS
        values at a time, so that its float copies stay that small whatever the file's layout."""
        block = self.rows(start, stop)
        rows = max(1, STATISTICS_BLOCK_PIXELS // (block.shape[1] * block.shape[2]))
        return merged_blocks([_piece_statistics(block[first:first + rows])
                              for first in range(0, block.shape[0], rows)])

    def statistics(self):
        """Per-channel mean and std (float64) in one pass over blocks of rows (Chan et al.'s merge)."""
        return merge_statistics(self.path, [self.block_statistics(*block) for block in self.statistics_blocks()])

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


class ArraySource(ImageSource):
    """An image already in memory (HW or HWC)."""

    def __init__(self, image, path=None):
        self.path = path
        self.image = image if image.ndim == 3 else image[:, :, np.newaxis]
        self.shape = self.image.shape

    def rows(self, start, stop):
        return self.image[start:stop]

    def statistics(self):
        image_files.check_finite(self.path, image_files.non_finite_pixels(self.image))
        # Exactly what image_files.zscore_normalize computes for the whole image.
        image = np.asarray(self.image, dtype=np.float32)
        return image.mean(axis=(0, 1), dtype=np.float64), image.std(axis=(0, 1), dtype=np.float64)


class TiffSource(ImageSource):
    """A single-image TIFF read one band of full-width rows at a time, never whole.

    Uncompressed contiguous pixels are read straight from the file; tiled or striped pixels (any
    compression) by decoding only the segments that hold the requested rows.
    """

    def __init__(self, path, tiff, page):
        self.path = path
        self.tiff = tiff
        self.page = page
        height, width = page.imagelength, page.imagewidth
        self.shape = (height, width, page.samplesperpixel)
        self.streamed = True
        self.pixel_size = read_pixel_size(tiff)
        self._band = (None, None, None)

    @staticmethod
    def open(path):
        """A TiffSource, or None when the file's layout cannot be read by rows."""
        import tifffile

        tiff = tifffile.TiffFile(path)
        try:
            page = tiff.pages.first
            supported = (
                len(tiff.pages) == 1
                and page.imagedepth == 1
                and (page.planarconfig == 1 or page.samplesperpixel == 1)
                and page.dtype is not None
                and (page.is_final or len(page.dataoffsets) == math.prod(page.chunked))
            )
        except Exception:
            tiff.close()
            raise
        if not supported:
            tiff.close()
            return None
        return TiffSource(path, tiff, page)

    def close(self):
        self.tiff.close()

    def rows(self, start, stop):
        cached_start, cached_stop, band = self._band
        if (cached_start, cached_stop) != (start, stop):
            band = self._read_rows(start, stop)
            band = image_files.as_supported_image(band, self.path)
            self._band = (start, stop, band)
        return band

    def _read_rows(self, start, stop):
        height, width, channels = self.shape
        page = self.page
        handle = self.tiff.filehandle
        if page.is_final:
            dtype = np.dtype(self.tiff.byteorder + page.dtype.char)
            row_items = width * channels
            handle.seek(page.dataoffsets[0] + start * row_items * dtype.itemsize)
            band = handle.read_array(dtype, (stop - start) * row_items)
            return band.reshape(stop - start, width, channels).astype(page.dtype, copy=False)
        segment_height = page.tilelength if page.is_tiled else min(page.rowsperstrip, height)
        segment_width = page.tilewidth if page.is_tiled else width
        columns = -(-width // segment_width)
        band = np.zeros((stop - start, width, channels), page.dtype)
        decode = page.decode
        for segment_row in range(start // segment_height, -(-stop // segment_height)):
            for segment_column in range(columns):
                index = segment_row * columns + segment_column
                handle.seek(page.dataoffsets[index])
                data = handle.read(page.databytecounts[index]) if page.databytecounts[index] else None
                segment, position, _ = decode(data, index, jpegtables=page.jpegtables)
                if segment is None:
                    continue
                segment = segment.reshape(segment.shape[-3:])
                y0, x0 = position[2], position[3]
                y1, x1 = min(y0 + segment.shape[0], height), min(x0 + segment.shape[1], width)
                low, high = max(y0, start), min(y1, stop)
                band[low - start:high - start, x0:x1] = segment[low - y0:high - y0, :x1 - x0]
        return band

    def statistics_rows(self):
        step = super().statistics_rows()
        page = self.page
        if not page.is_final:
            segment_height = page.tilelength if page.is_tiled else min(page.rowsperstrip, self.shape[0])
            step = max(1, step // segment_height) * segment_height  # decode each segment once
        return step

    def statistics(self):
        statistics = super().statistics()
        self._band = (None, None, None)
        return statistics


def open_source(path, streaming_megapixels):
    """An ArraySource, or a TiffSource for a TIFF at or above the streaming size."""
    extension = os.path.splitext(path)[1].lower()
    pixel_size = None
    if extension in (".tif", ".tiff"):
        try:
            source = TiffSource.open(path)
        except Exception as error:  # tifffile raises many types for a corrupt file
            raise image_files.ImageFileError(
                f"{path}: cannot decode ({type(error).__name__}: {error})") from None
        if source is not None:
            height, width, channels = source.shape
            if height * width * channels >= streaming_megapixels * 1e6:
                return source
            pixel_size = source.pixel_size
            source.close()
        else:  # a layout that cannot be read by rows: read whole, keep the pixel size all the same
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                pixel_size = read_pixel_size(tiff)
    image = image_files.read_image(path)
    source = ArraySource(image_files.as_supported_image(image, path), path)
    source.pixel_size = pixel_size
    return source
