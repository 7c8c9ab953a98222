"""Segment every image in a folder with an FC-DenseNet SavedModel written by train_fcdensenet.py.

    python inference_fcdensenet.py --saved_model_filepath runs/hes/saved_model \
        --image_folder data/images --output_folder out/masks
    python inference_fcdensenet.py --saved_model_filepath runs/hes/saved_model \
        --image_folder slides --output_folder out/slides --tile_size 2048 --batch_size 1
    python inference_fcdensenet.py --saved_model_filepath runs/rgb/saved_model \
        --image_folder photos --output_folder out/photos --image_format .png

Every mask keeps its image's file name, height and width and holds one class index per pixel
(uint8, uint16 or int32: the smallest type that holds number_classes - 1). The class, channel count
and receptive-field radius come from the SavedModel's metadata.

Images are z-score normalised with whole-image statistics (as in training), reflect-padded to a
multiple of 32 and cut into tiles that each keep only their central "zone of responsibility": the
tile minus the model's radius on every side, plus the outer margin at the image border. Every kept
pixel thus saw the context it would have in one pass over the whole image. Of the tilings whose
tiles hold at most --tile_size squared pixels, the one that computes the fewest pixels is used, so
tiles may be rectangles. An image no larger than a tile runs in one pass; tiles of one image run in
batches; the radius was measured once, at export.

TIFF masks are zlib-compressed, tiled (1024x1024) when larger than one tile. TIFF images at or above
--streaming_megapixels are never loaded whole: the statistics come from a streaming pass, tiles are
read from the file (uncompressed data directly, tiled/striped data segment by segment) and the mask is
written tile by tile as a tiled BigTIFF, so images larger than memory work. png images give png
masks; jpg images give png masks of the same name stem, because a mask must be stored losslessly.
Each mask is written under a temporary name and renamed when complete.
"""

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

import image_files
import segmentation_metrics

# A forward pass holds at most tile_size x tile_size pixels (one tile, or a batch of smaller ones
# when --batch_size is 0). The default, 2048 x 2048, is about 11.5 GB of activations for FCDenseNet56
# or FCDenseNet103 (2.7 and 2.8 GB per megapixel: peak memory of a forward pass on this CPU), so a
# 16 GB GPU holds it.
DEFAULT_TILE_SIZE = 2048
OUTPUT_TIFF_TILE = 1024
# Above this size (bytes of mask) a TIFF needs 64-bit offsets; compressed masks stay far below it.
BIGTIFF_BYTES = 2**31
# Rows of pixels per block when the streaming pass computes the normalisation statistics.
STATISTICS_BLOCK_PIXELS = 2**22


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--saved_model_filepath", required=True,
                        help="SavedModel folder exported by train_fcdensenet.py")
    parser.add_argument("--image_folder", required=True, help="folder of images to segment")
    parser.add_argument("--output_folder", required=True,
                        help="folder for the masks (created if missing; must differ from --image_folder)")
    parser.add_argument("--image_format", default="tif",
                        help="extension of the images to segment (tif, png, jpg; a leading '.' is accepted)")
    parser.add_argument("--tile_size", type=int, default=0,
                        help="tiles hold at most tile_size x tile_size pixels (squares or, where that "
                             "computes fewer pixels, rectangles of no larger area): a multiple of 32 and at "
                             "least 3x the model's radius (rounded up to 32); 0 = 2048, or 4x the radius "
                             "when that is larger")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="tiles per forward pass; 0 = as many as fit in tile_size x tile_size pixels "
                             "(2048x2048 by default, which fits a 16 GB GPU)")
    parser.add_argument("--streaming_megapixels", type=float, default=64.0,
                        help="TIFF images with at least this many megapixels (height x width x channels) "
                             "are read and written tile by tile instead of whole")
    parser.add_argument("--mask_folder", default=None,
                        help="optional folder of ground-truth masks under the images' file names: the "
                             "masks written are scored against them (pixel accuracy, IoU per class, "
                             "mean IoU)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Tiling: pure functions of the image size, so the exact coverage can be tested without a model.

@dataclasses.dataclass(frozen=True)
class AxisWindow:
    """One tile along one axis: it reads padded pixels [origin, origin + tile) and keeps
    image pixels [keep_start, keep_stop)."""

    origin: int
    keep_start: int
    keep_stop: int


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tiles of tile_shape over an image reflect-padded to padded_shape; rows[i][j] = (y, x) windows."""

    tile_shape: tuple
    padded_shape: tuple
    rows: tuple

    @property
    def tile_count(self):
        return sum(len(row) for row in self.rows)

    def kept_share(self):
        """Fraction of the computed pixels that end up in the mask."""
        height = self.rows[-1][0][0].keep_stop
        width = self.rows[0][-1][1].keep_stop
        return height * width / (self.tile_count * self.tile_shape[0] * self.tile_shape[1])


def round_up(value, multiple):
    return -(-int(value) // multiple) * multiple


def axis_tilings(length, radius, size_factor=32):
    """Every useful way to cut one axis into equal tiles: [(tile count, tile length)], fewest first.

    A tile length is the smallest multiple of size_factor with which that many tiles, overlapping by
    twice the margin (the radius rounded up to size_factor), cover the padded axis; a count is
    listed only when it makes the tiles shorter than the count before it did.
    """
    padded = round_up(length, size_factor)
    margin = round_up(radius, size_factor)
    tilings = [(1, padded)]
    count = 1
    while tilings[-1][1] > 2 * margin + size_factor:
        count += 1
        # n tiles of length t cover the axis when n * (t - 2 margin) + 2 margin >= padded
        tile = round_up(-(-(padded + 2 * margin * (count - 1)) // count), size_factor)
        if tile < tilings[-1][1]:
            tilings.append((count, tile))
    return tilings


def axis_windows(length, tile, radius, size_factor=32):
    """Tiles of `tile` pixels along one axis of `length` pixels: [AxisWindow, ...].

    The kept ranges partition [0, length). Every kept pixel has at least `margin` (the radius
    rounded up to size_factor) computed pixels on both sides inside its tile, except where the
    tile touches the image border. Origins are multiples of size_factor, so every tile sees the
    pooling grid that one pass over the whole padded image would.
    """
    padded = round_up(length, size_factor)
    if tile >= padded:
        return [AxisWindow(0, 0, length)]
    margin = round_up(radius, size_factor)
    zone = tile - 2 * margin
    if zone <= 0:
        raise ValueError(f"tile size {tile} leaves no zone of responsibility for radius {radius}")
    windows = []
    origin = keep_start = 0
    while origin + tile < padded and keep_start < length:
        keep_stop = min(origin + tile - margin, length)
        windows.append(AxisWindow(origin, keep_start, keep_stop))
        keep_start = keep_stop
        origin += zone
    if keep_start < length:
        # The last tile ends at the padded border; the loop condition guarantees its kept part
        # still starts at least `margin` pixels inside it.
        windows.append(AxisWindow(padded - tile, keep_start, length))
    return windows


def tile_grid(height, width, tile_size, radius, size_factor=32):
    """The tiling of an image that computes the fewest pixels with tiles of at most tile_size^2 pixels.

    Tiles may be rectangles: what a forward pass needs in memory grows with a tile's area, and
    a 4096x4096 image, say, costs 6 tiles of 2144x1504 pixels (87% of them kept) where square
    tiles of at most 2048 take 9 of 1504x1504 (82%). Ties go to fewer, then squarer, tiles.
    """
    row_tilings = axis_tilings(height, radius, size_factor)
    column_tilings = axis_tilings(width, radius, size_factor)
    candidates = [(rows * tile_height * columns * tile_width, rows * columns, abs(tile_height - tile_width),
                   tile_height, tile_width)
                  for rows, tile_height in row_tilings for columns, tile_width in column_tilings
                  if tile_height * tile_width <= tile_size * tile_size]
    if not candidates:
        raise ValueError(f"tile size {tile_size} is too small for radius {radius}")
    *_, tile_height, tile_width = min(candidates)
    y_windows = axis_windows(height, tile_height, radius, size_factor)
    x_windows = axis_windows(width, tile_width, radius, size_factor)
    rows = tuple(tuple((y, x) for x in x_windows) for y in y_windows)
    padded = (round_up(height, size_factor), round_up(width, size_factor))
    return TileGrid((tile_height, tile_width), padded, rows)


def check_tile_size(tile_size, radius, size_factor=32):
    """The user's --tile_size (0 = automatic) checked against this model; ValueError if unusable."""
    margin = round_up(radius, size_factor)
    if tile_size == 0:
        return max(DEFAULT_TILE_SIZE, 4 * margin)
    if tile_size <= 0 or tile_size % size_factor:
        raise ValueError(f"--tile_size {tile_size} must be a positive multiple of {size_factor}")
    if tile_size < 3 * margin:
        # The reference's rule: the zone of responsibility (tile - 2 radius) is at least the radius.
        raise ValueError(f"--tile_size {tile_size} is too small for the model's radius {radius}: "
                         f"use at least {3 * margin}")
    return tile_size


def tiles_per_batch(batch_size, tile_shape, tile_size):
    """--batch_size, or for 0 as many tiles as fit in the tile_size^2 pixels a forward pass may hold."""
    return batch_size or max(1, tile_size * tile_size // (tile_shape[0] * tile_shape[1]))


def reflect_index(length, padded_length):
    """Source index of every position of an axis reflect-padded at its end (numpy's 'reflect')."""
    return np.pad(np.arange(length), (0, padded_length - length), mode="reflect")


# ---------------------------------------------------------------------------------------------
# Image sources: whole arrays, or TIFF files read a band of rows at a time.

class ArraySource:
    """An image already in memory (HWC)."""

    def __init__(self, image):
        self.image = image if image.ndim == 3 else image[:, :, np.newaxis]
        self.shape = self.image.shape

    def rows(self, start, stop):
        return self.image[start:stop]

    def statistics(self):
        # Exactly what image_files.zscore_normalize computes for the whole image.
        image = np.asarray(self.image, dtype=np.float32)
        return image.mean(axis=(0, 1), dtype=np.float64), image.std(axis=(0, 1), dtype=np.float64)


class TiffSource:
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

    def statistics(self):
        """Per-channel mean and std in one pass over blocks of rows (Chan et al.'s merge)."""
        height, width, channels = self.shape
        page = self.page
        step = max(1, STATISTICS_BLOCK_PIXELS // (width * channels))
        if not page.is_final:
            segment_height = page.tilelength if page.is_tiled else min(page.rowsperstrip, height)
            step = max(1, step // segment_height) * segment_height  # decode each segment once
        count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
        for start in range(0, height, step):
            block = self.rows(start, min(start + step, height)).astype(np.float32)
            block_count = block.shape[0] * block.shape[1]
            block_mean = block.mean(axis=(0, 1), dtype=np.float64)
            block_m2 = np.square(block - block_mean.astype(np.float32), dtype=np.float64).sum(axis=(0, 1))
            delta = block_mean - mean
            total = count + block_count
            mean = mean + delta * block_count / total
            m2 = m2 + block_m2 + delta**2 * count * block_count / total
            count = total
        self._band = (None, None, None)
        return mean, np.sqrt(m2 / count)


def open_source(path, streaming_megapixels):
    """An ArraySource, or a TiffSource for a TIFF at or above the streaming size."""
    extension = os.path.splitext(path)[1].lower()
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
            source.close()
    image = image_files.read_image(path)
    return ArraySource(image_files.as_supported_image(image, path))


# ---------------------------------------------------------------------------------------------
# Segmentation

def mask_dtype(number_classes):
    """uint8 when the largest class fits, else uint16, else int32."""
    if number_classes - 1 <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if number_classes - 1 <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def take(array, index, axis):
    """array.take(index, axis), as a cheap slice when the index is a run of consecutive positions."""
    if index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
        return array[(slice(None),) * axis + (slice(index[0], index[-1] + 1),)]
    return array.take(index, axis=axis)


def segment_bands(source, grid, predict, mean, std, batch_size, dtype):
    """Yield the mask as full-width bands of rows, top to bottom, one band per row of tiles.

    Tiles are batched across rows of tiles, so a band is yielded once its last tile has run.
    """
    height, width, _ = source.shape
    row_index = reflect_index(height, grid.padded_shape[0])
    col_index = reflect_index(width, grid.padded_shape[1])
    bands = {}  # row of tiles -> [mask rows, tiles still to run]
    next_band = 0
    queue = [(r, y, x) for r, row in enumerate(grid.rows) for y, x in row]
    pixels_row, pixels_start, pixels = None, 0, None  # the source rows the current row of tiles reads
    for first in range(0, len(queue), batch_size):
        batch = queue[first:first + batch_size]
        tiles = []
        for r, y, x in batch:
            rows = row_index[y.origin:y.origin + grid.tile_shape[0]]
            if pixels_row != r:
                pixels_row, pixels_start = r, int(rows.min())
                pixels = source.rows(pixels_start, int(rows.max()) + 1)
            tile = take(pixels, rows - pixels_start, 0)
            tile = take(tile, col_index[x.origin:x.origin + grid.tile_shape[1]], 1)
            tiles.append(image_files.zscore_normalize(tile, mean, std))
        labels = np.argmax(np.asarray(predict(np.stack(tiles))), axis=-1)
        for (r, y, x), tile_labels in zip(batch, labels):
            if r not in bands:
                bands[r] = [np.empty((y.keep_stop - y.keep_start, width), dtype), len(grid.rows[r])]
            bands[r][0][:, x.keep_start:x.keep_stop] = tile_labels[
                y.keep_start - y.origin:y.keep_stop - y.origin,
                x.keep_start - x.origin:x.keep_stop - x.origin]
            bands[r][1] -= 1
        while next_band in bands and bands[next_band][1] == 0:
            yield bands.pop(next_band)[0]
            next_band += 1


def segment_array(image, predict, metadata, tile_size, batch_size=1):
    """The mask of an in-memory image (HW or HWC), tiled as the script tiles it."""
    source = ArraySource(image)
    grid = tile_grid(*source.shape[:2], tile_size, metadata["radius"], metadata["size_factor"])
    mean, std = source.statistics()
    dtype = mask_dtype(metadata["number_classes"])
    return np.concatenate(list(segment_bands(source, grid, predict, mean, std, batch_size, dtype)))


# ---------------------------------------------------------------------------------------------
# Writing masks

def output_path(output_folder, name):
    """Same file name; jpg inputs get a .png mask because a mask must be stored losslessly."""
    stem, extension = os.path.splitext(name)
    if extension.lower() in (".jpg", ".jpeg"):
        extension = ".png"
    return os.path.join(output_folder, stem + extension)


def temporary_path(path):
    folder, name = os.path.split(path)
    stem, extension = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.partial-{os.getpid()}{extension}")


def write_tiff(path, mask_or_tiles, shape, dtype):
    import tifffile

    streamed = not isinstance(mask_or_tiles, np.ndarray)
    tiled = streamed or shape[0] > OUTPUT_TIFF_TILE or shape[1] > OUTPUT_TIFF_TILE
    big = streamed or shape[0] * shape[1] * dtype.itemsize >= BIGTIFF_BYTES
    with tifffile.TiffWriter(path, bigtiff=big) as writer:
        writer.write(mask_or_tiles, shape=shape, dtype=dtype, compression="zlib",
                     tile=(OUTPUT_TIFF_TILE, OUTPUT_TIFF_TILE) if tiled else None)


def write_png(path, mask):
    import imageio.v3 as iio

    if mask.dtype == np.int32:
        raise ValueError(f"{path}: png cannot store {mask.max() + 1} classes: use tif images")
    iio.imwrite(path, mask, extension=".png")


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


def write_atomically(path, write):
    """Run write(temporary path) and rename onto path, so an old mask is replaced only by a whole one."""
    temporary = temporary_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ---------------------------------------------------------------------------------------------
# The script

def load_model(path):
    if not os.path.isdir(path):
        raise ValueError(f"{path}: SavedModel folder does not exist")
    import fcdensenet

    return fcdensenet.load_saved_model(path)


def segment_file(path, output_folder, predict, metadata, args):
    """Segment one image and write its mask; returns (height, width, tile count)."""
    source = open_source(path, args.streaming_megapixels)
    try:
        height, width, channels = source.shape
        if channels != metadata["number_channels"]:
            raise image_files.ImageFileError(
                f"{path}: image has {channels} channel(s), the model expects {metadata['number_channels']}")
        grid = tile_grid(height, width, args.tile_size, metadata["radius"], metadata["size_factor"])
        mean, std = source.statistics()
        dtype = mask_dtype(metadata["number_classes"])
        batch_size = tiles_per_batch(args.batch_size, grid.tile_shape, args.tile_size)
        bands = segment_bands(source, grid, predict, mean, std, batch_size, dtype)
        target = output_path(output_folder, os.path.basename(path))
        if isinstance(source, TiffSource):
            write_atomically(target, lambda temporary: write_tiff(
                temporary, tiff_tiles(bands, width, dtype), (height, width), dtype))
        else:
            mask = np.concatenate(list(bands))
            if target.lower().endswith(".png"):
                write_atomically(target, lambda temporary: write_png(temporary, mask))
            else:
                write_atomically(target, lambda temporary: write_tiff(temporary, mask, mask.shape, dtype))
        return height, width, grid.tile_count
    finally:
        if isinstance(source, TiffSource):
            source.close()


def score_mask(predicted_path, mask_folder, number_classes):
    """Confusion matrix of a written mask against the ground truth of the same file name."""
    truth_path = os.path.join(mask_folder, os.path.basename(predicted_path))
    truth = image_files.read_image(truth_path)
    predicted = image_files.read_image(predicted_path)
    if truth.shape != predicted.shape:
        raise ValueError(f"{truth_path}: ground truth is {truth.shape[1]}x{truth.shape[0]}, "
                         f"the image {predicted.shape[1]}x{predicted.shape[0]}")
    try:
        return segmentation_metrics.confusion_matrix(truth, predicted, number_classes)
    except ValueError as error:
        raise ValueError(f"{truth_path}: {error}") from None


def print_scores(confusion):
    accuracy, iou, mean_iou = segmentation_metrics.segmentation_metrics(confusion)
    iou_text = " ".join(f"{value:.4f}" for value in iou)
    print(f"scores against the ground truth: pixel accuracy {accuracy:.4f} mean IoU {mean_iou:.4f} "
          f"IoU per class [{iou_text}]")


def prepare(args):
    """Check the flags and list the images; exits with one line on any problem."""
    try:
        args.image_format = image_files.normalize_extension(args.image_format)
        names = image_files.list_images(args.image_folder, args.image_format)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not names:
        sys.exit(f"error: {args.image_folder}: no .{args.image_format} images")
    if args.batch_size < 0:
        sys.exit(f"error: --batch_size {args.batch_size} must be at least 1 (or 0: automatic)")
    if args.mask_folder is not None and not os.path.isdir(args.mask_folder):
        sys.exit(f"error: {args.mask_folder}: mask folder does not exist")
    if os.path.realpath(args.output_folder) == os.path.realpath(args.image_folder):
        sys.exit(f"error: {args.output_folder}: the output folder must differ from the image folder")
    return names


def main(argv=None):
    args = parse_args(argv)
    names = prepare(args)
    try:
        predict, metadata = load_model(args.saved_model_filepath)
        args.tile_size = check_tile_size(args.tile_size, metadata["radius"], metadata["size_factor"])
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        os.makedirs(args.output_folder, exist_ok=True)
    except OSError as error:
        sys.exit(f"error: {args.output_folder}: cannot create the output folder ({error.strerror})")
    print(f"{metadata['variant']}: {metadata['number_channels']} channel(s), {metadata['number_classes']} "
          f"classes, radius {metadata['radius']}; tiles of at most {args.tile_size}x{args.tile_size} pixels, "
          f"{args.batch_size or 'automatic'} per batch")

    number_classes = metadata["number_classes"]
    confusion = np.zeros((number_classes, number_classes), dtype=np.int64)
    failures, megapixels, started = [], 0.0, time.perf_counter()
    for name in names:
        path = os.path.join(args.image_folder, name)
        image_started = time.perf_counter()
        try:
            height, width, tiles = segment_file(path, args.output_folder, predict, metadata, args)
            if args.mask_folder is not None:
                written = output_path(args.output_folder, name)
                confusion += score_mask(written, args.mask_folder, number_classes)
        except Exception as error:  # one bad image must not stop the others
            message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            message = message if message.startswith(path) else f"{path}: {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)
            failures.append(message)
            continue
        megapixels += height * width / 1e6
        print(f"{name}: {height}x{width}, {tiles} tile(s), {time.perf_counter() - image_started:.2f} s",
              flush=True)

    seconds = time.perf_counter() - started
    print(f"done: {len(names) - len(failures)} image(s) segmented, {len(failures)} failed, "
          f"{megapixels:.1f} Mpx in {seconds:.1f} s ({megapixels / max(seconds, 1e-9):.2f} Mpx/s)")
    if args.mask_folder is not None:
        print_scores(confusion)
    if failures:
        print("failed images:\n" + "\n".join(f"  {message}" for message in failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
