"""Tiling for inference: pure functions of the image size, so exact coverage is testable without a model.

An image is reflect-padded to a multiple of the size factor (32) and cut into tiles that each keep
only their central "zone of responsibility": the tile less the model's receptive-field radius on
every side, plus the outer margin at the image border. Every kept pixel thus saw the context it would
have had in one pass over the whole image. Of the tilings whose tiles hold at most tile_size^2
pixels, the one that computes the fewest pixels is used, so tiles may be rectangles.

    grid = tile_grid(4096, 4096, tile_size=2048, radius=96)   # 6 tiles of 2144x1504
    for row in grid.rows:
        for y, x in row:                                      # AxisWindow per axis
            ...
"""

import dataclasses

import numpy as np

# A forward pass holds at most tile_size x tile_size pixels (one tile, or a batch of smaller ones
# when --batch_size is 0). The default, 2048 x 2048, is about 11.5 GB of activations for FCDenseNet56
# or FCDenseNet103 (2.7 and 2.8 GB per megapixel: peak memory of a forward pass on this CPU), so a
# 16 GB GPU holds it.
DEFAULT_TILE_SIZE = 2048
# On a CPU a pixel costs the same at any batch size (FCDenseNet56 on 256x256 images, one or 8 a pass,
# interleaved: 3.06 and 3.16 s an image), so a GPU's budget would only add memory there (64 images
# of 256x256 hold about 11 GB of activations) and make each image wait for its batch's last: an
# automatic batch on the CPU holds one 256x256 tile's pixels (several smaller tiles, whose per-call
# overhead batching still amortises)
CPU_BATCH_PIXELS = 256 * 256


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


def tiles_per_batch(batch_size, tile_shape, tile_size, batch_pixels=0):
    """--batch_size, or for 0 as many tiles as fit in the pixels a forward pass may hold: batch_pixels,
    or tile_size^2 when that is 0 (a GPU's memory; CPU engines pass CPU_BATCH_PIXELS)."""
    budget = batch_pixels or tile_size * tile_size
    return batch_size or max(1, budget // (tile_shape[0] * tile_shape[1]))


def automatic_batch_pixels(engine, device_names):
    """The pixel budget of an automatic batch: CPU_BATCH_PIXELS where the model runs on the CPU (OpenVINO,
    or TensorFlow on CPU devices), else 0 (tile_size^2, sized for a GPU's memory)."""
    on_cpu = engine == "openvino" or all("CPU" in name.upper().rsplit("/", 1)[-1] for name in device_names)
    return CPU_BATCH_PIXELS if on_cpu else 0


def reflect_index(length, padded_length):
    """Source index of every position of an axis reflect-padded at its end (numpy's 'reflect')."""
    return np.pad(np.arange(length), (0, padded_length - length), mode="reflect")
