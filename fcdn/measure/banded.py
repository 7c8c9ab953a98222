"""The object table of a mask that arrives in bands of full-width rows, top to bottom.

    objects = BandedObjects(width, channels=3)
    for start, mask_rows, image_rows in bands:      # any band heights, in order
        objects.add(start, mask_rows, image_rows)
    table = objects.finish()                        # the columns of objects.measure_whole

Each band is labelled alone with provisional ids; a union-find joins the ids that touch across a
seam (the band's first row against the previous band's last, diagonals included). Every sum is an
exact integer, kept per provisional id and added up per joined object at the end, so the table is
the whole mask's to the last digit of its integer columns (the floating ones within rounding).
Memory: two bands' worth of rows, and a few numbers an object.
"""

import numpy as np
from scipy import ndimage

from fcdn.measure import objects as objects_table

# bands are cut to at most this many pixels, so that the float sums of a band stay exact integers
# (x * x * pixels < 2**53) and its temporaries stay small
MAX_BAND_PIXELS = 2**22
CONTEXT = objects_table.PERIMETER_CONTEXT


class _Sums:
    """Per provisional id: area, coordinate sums, bounding box, first pixel, class, perimeter,
    and intensity sums, minima and maxima; grown as ids are handed out."""

    def __init__(self, channels):
        self.channels = channels
        self.size = 0
        self.integers = np.zeros((0, 10), dtype=np.int64)  # area, Sy Sx Syy Sxx Sxy, bbox 4
        self.first = np.zeros(0, dtype=np.int64)
        self.classes = np.zeros(0, dtype=np.int64)
        self.perimeter = np.zeros(0)
        self.intensity = np.zeros((0, 3, channels))  # sum, min, max per channel
        self.parent = np.zeros(0, dtype=np.int64)

    def grow(self, size):
        extra = size - self.size
        self.integers = np.concatenate([self.integers, np.zeros((extra, 10), np.int64)])
        self.first = np.concatenate([self.first, np.zeros(extra, np.int64)])
        self.classes = np.concatenate([self.classes, np.zeros(extra, np.int64)])
        self.perimeter = np.concatenate([self.perimeter, np.zeros(extra)])
        self.intensity = np.concatenate([self.intensity, np.zeros((extra, 3, self.channels))])
        self.parent = np.concatenate([self.parent, np.arange(self.size, size, dtype=np.int64)])
        self.size = size

    def find(self, item):
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, first, second):
        first, second = self.find(first), self.find(second)
        if first != second:  # the earlier id stays the root
            self.parent[max(first, second)] = min(first, second)


def _band_sums(local, count, start):
    """Area, exact coordinate sums (image coordinates) and bounding boxes of labels 1..count of a band."""
    height, width = local.shape
    flat = local.ravel()
    rows = np.repeat(np.arange(height, dtype=np.float64), width)  # band-relative: small exact sums
    columns = np.tile(np.arange(width, dtype=np.float64), height)

    def per_label(weights):
        return np.rint(np.bincount(flat, weights=weights, minlength=count + 1)[1:]).astype(np.int64)

    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.int64)
    sum_y, sum_x = per_label(rows), per_label(columns)
    sum_yy, sum_xx, sum_xy = per_label(rows * rows), per_label(columns * columns), per_label(rows * columns)
    # from band rows to image rows: y = start + r
    sums = [sum_y + area * start, sum_x, sum_yy + 2 * start * sum_y + area * start * start, sum_xx,
            sum_xy + start * sum_x]
    boxes = np.array([(s[0].start + start, s[1].start, s[0].stop + start, s[1].stop)
                      for s in ndimage.find_objects(local, max_label=count)], dtype=np.int64).reshape(-1, 4)
    return np.column_stack([area, *sums, boxes])


def _seam_pairs(above_labels, above_mask, below_labels, below_mask):
    """(above id, below id) of the pixels of one class that touch across a seam, diagonals included."""
    pairs = []
    for shift in (-1, 0, 1):  # the pixel below sits at x + shift
        low, high = max(0, -shift), len(above_mask) - max(0, shift)
        above_slice, below_slice = slice(low, high), slice(low + shift, high + shift)
        touching = (above_mask[above_slice] == below_mask[below_slice]) & (above_mask[above_slice] != 0)
        pairs.append(np.column_stack([above_labels[above_slice][touching], below_labels[below_slice][touching]]))
    return np.unique(np.concatenate(pairs), axis=0)


class BandedObjects:
    """Accumulates the object table of a mask fed as bands of rows (see the module's docstring)."""

    def __init__(self, width, channels=0):
        self.width = width
        self.channels = channels
        self.sums = _Sums(channels)
        self.sums.grow(1)  # id 0: background
        self.rows_seen = 0
        self.done = 0  # rows whose perimeter shares are added
        self.buffer_start = 0  # the rows kept for the perimeter's context: [buffer_start, rows_seen)
        self.mask_buffer = np.zeros((0, width), dtype=np.int64)
        self.label_buffer = np.zeros((0, width), dtype=np.int64)

    def add(self, start, mask_rows, image_rows=None):
        """Rows [start, start + len(mask_rows)) of the mask (HW or HW1) and, for intensities, of the image (HWC)."""
        mask_rows = np.asarray(mask_rows)
        if mask_rows.ndim == 3:
            mask_rows = mask_rows[:, :, 0]
        if start != self.rows_seen or mask_rows.shape[1] != self.width:
            raise ValueError(f"band of rows [{start}, {start + len(mask_rows)}) x {mask_rows.shape[1]} does not "
                             f"follow rows [0, {self.rows_seen}) x {self.width}")
        step = max(1, MAX_BAND_PIXELS // self.width)
        for offset in range(0, len(mask_rows), step):
            part = None if image_rows is None else image_rows[offset:offset + step]
            self._add(start + offset, mask_rows[offset:offset + step], part)

    def _add(self, start, mask_rows, image_rows):
        local = objects_table.label_objects(mask_rows)
        count, first_id = int(local.max(initial=0)), self.sums.size
        self.sums.grow(first_id + count)
        ids = slice(first_id, first_id + count)
        self.sums.integers[ids] = _band_sums(local, count, start)
        # scikit-image numbers labels in raster order, so label k first appears where the running
        # maximum of the labels first reaches k
        running = np.maximum.accumulate(local.ravel())
        first_index = np.flatnonzero(np.diff(running, prepend=0))
        self.sums.first[ids] = start * self.width + first_index
        self.sums.classes[ids] = mask_rows.ravel()[first_index]
        if image_rows is not None and count:
            self._add_intensities(local, count, np.asarray(image_rows), ids)
        labels = np.where(local > 0, local.astype(np.int64) + (first_id - 1), 0)
        if self.rows_seen:
            for above, below in _seam_pairs(self.label_buffer[-1], self.mask_buffer[-1], labels[0], mask_rows[0]):
                self.sums.union(above, below)
        self.mask_buffer = np.concatenate([self.mask_buffer, mask_rows.astype(np.int64)])
        self.label_buffer = np.concatenate([self.label_buffer, labels])
        self.rows_seen = start + len(mask_rows)
        self._add_perimeter(self.rows_seen - CONTEXT, final=False)

    def _add_intensities(self, local, count, image_rows, ids):
        index = np.arange(1, count + 1)
        image_rows = image_rows.reshape(image_rows.shape[0], image_rows.shape[1], -1)
        for channel in range(self.channels):
            values = image_rows[:, :, channel].astype(np.float64)
            self.sums.intensity[ids, 0, channel] = ndimage.sum_labels(values, local, index)
            self.sums.intensity[ids, 1, channel] = ndimage.minimum(values, local, index)
            self.sums.intensity[ids, 2, channel] = ndimage.maximum(values, local, index)

    def _add_perimeter(self, stop, final):
        """Adds the perimeter shares of rows [done, stop), whose context rows are all here by now."""
        if stop <= self.done:
            return
        # the buffer starts CONTEXT rows above `done`, or at the image's top (zeros above it)
        top_padding = CONTEXT - (self.done - self.buffer_start)
        window = self.mask_buffer[:stop + CONTEXT - self.buffer_start]
        parts = [np.zeros((top_padding, self.width), np.int64), window]
        if final:
            parts.append(np.zeros((CONTEXT, self.width), np.int64))
        shares = objects_table.perimeter_contributions(np.concatenate(parts))
        labels = self.label_buffer[self.done - self.buffer_start:stop - self.buffer_start]
        self.sums.perimeter += np.bincount(labels.ravel(), weights=shares.ravel(), minlength=self.sums.size)
        self.done = stop
        keep = max(0, self.done - CONTEXT)  # context rows the next shares still need
        self.mask_buffer = self.mask_buffer[keep - self.buffer_start:]
        self.label_buffer = self.label_buffer[keep - self.buffer_start:]
        self.buffer_start = keep

    def finish(self):
        """The table, as objects.measure_whole returns it for the same mask (and image)."""
        self._add_perimeter(self.rows_seen, final=True)
        sums = self.sums
        roots = sums.parent.copy()
        while True:
            deeper = roots[roots]
            if np.array_equal(deeper, roots):
                break
            roots = deeper
        objects, which = np.unique(roots[1:], return_inverse=True)
        integers = np.zeros((len(objects), 10), np.int64)
        np.add.at(integers[:, :6], which, sums.integers[1:, :6])
        integers[:, 6:8] = np.iinfo(np.int64).max
        np.minimum.at(integers[:, 6:8], which, sums.integers[1:, 6:8])
        np.maximum.at(integers[:, 8:], which, sums.integers[1:, 8:])
        first = np.full(len(objects), np.iinfo(np.int64).max)
        np.minimum.at(first, which, sums.first[1:])
        perimeter = np.zeros(len(objects))
        np.add.at(perimeter, which, sums.perimeter[1:])
        order = np.argsort(first, kind="stable")
        columns = objects_table.finish_columns(
            integers[order, 0], integers[order, 1:6].T, integers[order, 6:10], perimeter[order],
            sums.classes[objects][order])
        columns.update(self._intensity_columns(which, len(objects), integers[:, 0], order))
        return columns

    def _intensity_columns(self, which, count, area, order):
        totals = np.zeros((count, self.channels))
        low = np.full((count, self.channels), np.inf)
        high = np.full((count, self.channels), -np.inf)
        np.add.at(totals, which, self.sums.intensity[1:, 0])
        np.minimum.at(low, which, self.sums.intensity[1:, 1])
        np.maximum.at(high, which, self.sums.intensity[1:, 2])
        columns = {}
        for channel in range(self.channels):
            columns[f"intensity_mean_c{channel}"] = (totals[:, channel] / area)[order]
            columns[f"intensity_min_c{channel}"] = low[order, channel]
            columns[f"intensity_max_c{channel}"] = high[order, channel]
        return columns
