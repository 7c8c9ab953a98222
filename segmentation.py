"""The tile loop of inference: per-class probabilities tile by tile, reduced to masks band by band.

    grid = tiling.tile_grid(height, width, tile_size, radius)
    tiles = tile_probabilities(source, grid, predict, mean, std, batch_size)
    for band in assemble_bands(tiles, grid, width, argmax_labels, np.uint8):
        ...                                     # full-width rows of the mask, top to bottom

As in nnU-Net, the model's output (the softmax) comes out of the loop whole and the caller decides
how to reduce it: the argmax for a mask, an average over flips for test-time augmentation, scaled
probabilities for a probability map. Only each tile's zone of responsibility leaves the loop.
"""

import dataclasses

import numpy as np

import image_files
import image_sources
import tiling


@dataclasses.dataclass(frozen=True)
class TileResult:
    """The probabilities (rows, columns, classes) of one tile's kept zone, and where it goes."""

    row: int  # the row of tiles it belongs to
    y: tiling.AxisWindow
    x: tiling.AxisWindow
    probabilities: np.ndarray


def take(array, index, axis):
    """array.take(index, axis), as a cheap slice when the index is a run of consecutive positions."""
    if index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
        return array[(slice(None),) * axis + (slice(index[0], index[-1] + 1),)]
    return array.take(index, axis=axis)


def tile_probabilities(source, grid, predict, mean, std, batch_size):
    """Yield a TileResult per tile, in grid order, running `batch_size` tiles per forward pass.

    Tiles are read from the source one row of tiles at a time (the rows it needs, reflect-padded at
    the bottom and right), z-scored with the whole image's mean and std, and batched across rows.
    """
    height, width, _ = source.shape
    row_index = tiling.reflect_index(height, grid.padded_shape[0])
    col_index = tiling.reflect_index(width, grid.padded_shape[1])
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
        probabilities = np.asarray(predict(np.stack(tiles)))
        for (r, y, x), tile in zip(batch, probabilities):
            kept = tile[y.keep_start - y.origin:y.keep_stop - y.origin,
                        x.keep_start - x.origin:x.keep_stop - x.origin]
            yield TileResult(r, y, x, kept)


def argmax_labels(probabilities):
    """The mask's reduction: the most probable class of every pixel."""
    return np.argmax(probabilities, axis=-1)


def assemble_bands(tiles, grid, width, reduce, dtype):
    """Paste `reduce(probabilities)` of every tile into full-width bands, one per row of tiles.

    Yields each band (rows, width[, ...]) of `dtype` top to bottom, as soon as its last tile is in,
    so no more than the bands of the tiles of one batch are ever held.
    """
    bands = {}  # row of tiles -> [band, tiles still to come]
    next_band = 0
    for tile in tiles:
        values = reduce(tile.probabilities)
        if tile.row not in bands:
            shape = (tile.y.keep_stop - tile.y.keep_start, width) + values.shape[2:]
            bands[tile.row] = [np.empty(shape, dtype), len(grid.rows[tile.row])]
        bands[tile.row][0][:, tile.x.keep_start:tile.x.keep_stop] = values
        bands[tile.row][1] -= 1
        while next_band in bands and bands[next_band][1] == 0:
            yield bands.pop(next_band)[0]
            next_band += 1


def segment_bands(source, grid, predict, mean, std, batch_size, dtype):
    """The mask of a source as full-width bands of rows, top to bottom."""
    tiles = tile_probabilities(source, grid, predict, mean, std, batch_size)
    return assemble_bands(tiles, grid, source.shape[1], argmax_labels, dtype)


def segment_array(image, predict, metadata, tile_size, batch_size=1):
    """The mask of an in-memory image (HW or HWC), tiled as the script tiles it."""
    source = image_sources.ArraySource(image)
    grid = tiling.tile_grid(*source.shape[:2], tile_size, metadata["radius"], metadata["size_factor"])
    mean, std = source.statistics()
    dtype = image_files.mask_dtype(metadata["number_classes"] - 1)
    return np.concatenate(list(segment_bands(source, grid, predict, mean, std, batch_size, dtype)))
