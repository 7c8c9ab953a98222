"""The tile loop of inference: per-class probabilities tile by tile, reduced to masks band by band.

    grid = tiling.tile_grid(height, width, tile_size, radius)
    tiles = tile_probabilities(source, grid, predict, mean, std, batch_size)
    for start, (mask,) in assemble_bands(tiles, grid, width, [Output(argmax_labels, np.uint8)]):
        ...                                     # full-width rows of the mask, from row `start`

As in nnU-Net, the model's output (the softmax) comes out of the loop whole and the caller decides
how to reduce it: the argmax for a mask, an average over flips for test-time augmentation, scaled
probabilities for a probability map. Only each tile's zone of responsibility leaves the loop.
"""

import collections
import dataclasses

import numpy as np

from fcdn.common import devices
from fcdn.data import image_files, image_sources
from fcdn.inference import tiling


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


class _TileReader:
    """Cuts the tiles of one image's grid out of its source, reflect-padded and z-scored."""

    def __init__(self, source, grid, mean, std):
        self.source, self.grid, self.mean, self.std = source, grid, mean, std
        height, width, _ = source.shape
        self.row_index = tiling.reflect_index(height, grid.padded_shape[0])
        self.col_index = tiling.reflect_index(width, grid.padded_shape[1])
        self.pixels_row, self.pixels_start, self.pixels = None, 0, None  # the rows the current row of tiles reads

    def tile(self, r, y, x):
        rows = self.row_index[y.origin:y.origin + self.grid.tile_shape[0]]
        if self.pixels_row != r:
            self.pixels_row, self.pixels_start = r, int(rows.min())
            self.pixels = self.source.rows(self.pixels_start, int(rows.max()) + 1)
        tile = take(self.pixels, rows - self.pixels_start, 0)
        tile = take(tile, self.col_index[x.origin:x.origin + self.grid.tile_shape[1]], 1)
        return image_files.zscore_normalize(tile, self.mean, self.std)


def _kept(tile, y, x):
    return tile[y.keep_start - y.origin:y.keep_stop - y.origin, x.keep_start - x.origin:x.keep_stop - x.origin]


def _run(predict, batches):
    """predict over (keys, batch) pairs, through a DevicePool's map when given one: (keys, probabilities)."""
    pool = predict if isinstance(predict, devices.DevicePool) else devices.DevicePool([predict])
    keys = collections.deque()

    def arrays():
        for batch_keys, batch in batches:
            keys.append(batch_keys)
            yield batch

    for probabilities in pool.map(arrays()):
        yield keys.popleft(), np.asarray(probabilities)


def batches_holding(grid, batch_size, tile_rows):
    """The first tile (in grid order) of each batch of `batch_size` tiles, as the whole grid is
    batched, that holds a tile of the rows of tiles `tile_rows` (a range)."""
    counts = [len(row) for row in grid.rows]
    first_tile = sum(counts[:tile_rows.start])
    last_tile = sum(counts[:tile_rows.stop]) - 1
    return range(first_tile // batch_size * batch_size, last_tile + 1, batch_size)


def tile_probabilities(source, grid, predict, mean, std, batch_size, tile_rows=None):
    """Yield a TileResult per tile, in grid order, running `batch_size` tiles per forward pass.

    Tiles are read from the source one row of tiles at a time (the rows it needs, reflect-padded at
    the bottom and right), z-scored with the whole image's mean and std, and batched across rows.
    `predict` is a function or a devices.DevicePool, whose devices then run batches side by side.
    tile_rows (a range of rows of tiles) runs only the batches that hold their tiles, the very
    batches a run over the whole grid makes (so every tile's probabilities are those of that run,
    to the bit, whatever the runtime does with a batch), and yields only their tiles.
    """
    reader = _TileReader(source, grid, mean, std)
    queue = [(r, y, x) for r, row in enumerate(grid.rows) for y, x in row]
    tile_rows = range(len(grid.rows)) if tile_rows is None else tile_rows
    batches = ((queue[first:first + batch_size],
                np.stack([reader.tile(*key) for key in queue[first:first + batch_size]]))
               for first in batches_holding(grid, batch_size, tile_rows))
    for keys, probabilities in _run(predict, batches):
        for (r, y, x), tile in zip(keys, probabilities):
            if r in tile_rows:
                yield TileResult(r, y, x, _kept(tile, y, x))


def single_tile_probabilities(images, predict, batch_size):
    """Batch across images: the one TileResult of each (source, grid, mean, std) whose grid is one tile.

    Every grid must have the same tile shape. Yields (index in `images`, TileResult) in order.
    """
    def batches():
        for first in range(0, len(images), batch_size):
            group = list(range(first, min(first + batch_size, len(images))))
            tiles = []
            for index in group:
                source, grid, mean, std = images[index]
                y, x = grid.rows[0][0]
                tiles.append(_TileReader(source, grid, mean, std).tile(0, y, x))
            yield group, np.stack(tiles)

    for group, probabilities in _run(predict, batches()):
        for index, tile in zip(group, probabilities):
            y, x = images[index][1].rows[0][0]
            yield index, TileResult(0, y, x, _kept(tile, y, x))


def argmax_labels(probabilities):
    """The mask's reduction: the most probable class of every pixel."""
    return np.argmax(probabilities, axis=-1)


def quantised_probabilities(probabilities):
    """The probability map's reduction: every class's probability as uint8, 0 to 255."""
    return np.rint(probabilities * 255.0).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Output:
    """One thing made of the probabilities: a reduction of each tile, stored in bands of `dtype`."""

    reduce: object
    dtype: object


def assemble_bands(tiles, grid, width, outputs, first_row=0):
    """Paste every output's reduction of every tile into full-width bands, one per row of tiles.

    Yields (first image row, [band of each output]) top to bottom, each band (rows, width[, ...]) of
    its output's dtype, as soon as the last tile of its row is in: no more than the bands of the
    tiles of one batch are ever held. The tiles start at the row of tiles `first_row`.
    """
    bands = {}  # row of tiles -> [first row, [band per output], tiles still to come]
    next_band = first_row
    for tile in tiles:
        values = [output.reduce(tile.probabilities) for output in outputs]
        if tile.row not in bands:
            rows = tile.y.keep_stop - tile.y.keep_start
            arrays = [np.empty((rows, width) + value.shape[2:], output.dtype)
                      for value, output in zip(values, outputs)]
            bands[tile.row] = [tile.y.keep_start, arrays, len(grid.rows[tile.row])]
        entry = bands[tile.row]
        for array, value in zip(entry[1], values):
            array[:, tile.x.keep_start:tile.x.keep_stop] = value
        entry[2] -= 1
        while next_band in bands and bands[next_band][2] == 0:
            start, arrays, _ = bands.pop(next_band)
            yield start, arrays
            next_band += 1


def segment_bands(source, grid, predict, mean, std, batch_size, dtype):
    """The mask of a source as full-width bands of rows, top to bottom."""
    tiles = tile_probabilities(source, grid, predict, mean, std, batch_size)
    for _, (mask,) in assemble_bands(tiles, grid, source.shape[1], [Output(argmax_labels, dtype)]):
        yield mask


def dihedral_averaged(predict):
    """predict averaged over the 8 flips and quarter turns of each batch (test-time augmentation).

    Each view is predicted and turned back before the average, so the result is aligned with the
    input; the eight passes run one after another and hold no more memory than one. Tiles are
    multiples of the size factor on both sides, so every view sees the same pooling grid.
    """
    def averaged(batch):
        batch = np.asarray(batch)
        total = None
        for turns in range(4):
            for flip in (False, True):
                view = np.rot90(batch, turns, axes=(1, 2))
                view = view[:, :, ::-1] if flip else view
                probabilities = np.asarray(predict(np.ascontiguousarray(view)))
                probabilities = probabilities[:, :, ::-1] if flip else probabilities
                probabilities = np.rot90(probabilities, -turns, axes=(1, 2))
                total = probabilities.astype(np.float32) if total is None else total + probabilities
        return total / 8.0

    return averaged


def segment_array(image, predict, metadata, tile_size, batch_size=1):
    """The mask of an in-memory image (HW or HWC), tiled as the script tiles it."""
    source = image_sources.ArraySource(image)
    grid = tiling.tile_grid(*source.shape[:2], tile_size, metadata["radius"], metadata["size_factor"])
    mean, std = source.statistics()
    dtype = image_files.mask_dtype(metadata["number_classes"] - 1)
    return np.concatenate(list(segment_bands(source, grid, predict, mean, std, batch_size, dtype)))
