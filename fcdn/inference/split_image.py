"""One OME-Zarr image segmented by several processes (a job array's tasks): each a block of chunk rows.

    settings = run_settings(saved_model_path, engine, tile_size, batch_size, tta)
    for result in segment_parts(paths, predict, metadata, options, settings, num_parts=3, part_id=1):
        ...                                   # an ImageResult per image: this part's rows of it

Part k of n takes the chunk rows [k * R // n, (k + 1) * R // n) of the label's R chunk rows (whole
output chunks, so no two parts ever write one chunk). It runs the batches of tiles that one process
would run over the whole image and that hold a tile of its rows, the very same batches, so that its
probabilities are those of one process to the bit; their tiles read the model's radius of context
(and up to a tile's zone more) beyond the part's rows. The normalisation statistics are shared block
by block, the chunk rows are written straight into the shared label array with a marker after each,
and the part that finds every row marked writes the pyramid and metadata and puts the label in place
(ome_zarr_parts). With skip_existing, chunk rows already marked are not computed again.
"""

import hashlib
import os
import time

from fcdn.data import image_files, ome_zarr_io, ome_zarr_parts
from fcdn.inference import mask_writers, segmentation, tiling
from fcdn.inference.runner import ImageResult


def part_chunk_rows(chunk_rows, num_parts, part_id):
    """The chunk rows of part `part_id` of `num_parts`: a contiguous range, the parts' sizes differing
    by one at most (empty when there are more parts than rows)."""
    return range(part_id * chunk_rows // num_parts, (part_id + 1) * chunk_rows // num_parts)


def model_fingerprint(path):
    """SHA-256 of a SavedModel's files (relative names and bytes; a link counts by where it points,
    never followed), other than OpenVINO's conversion cache: parts of one image run one model."""
    digest = hashlib.sha256()
    for parent, folders, files in os.walk(path):
        folders[:] = sorted(name for name in folders if not (parent == path and "openvino" in name))
        for name in sorted(files):
            file_path = os.path.join(parent, name)
            digest.update(os.path.relpath(file_path, path).encode() + b"\0")
            if os.path.islink(file_path):
                digest.update(b"link:" + os.readlink(file_path).encode())
            elif os.path.isfile(file_path):
                with open(file_path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def run_settings(saved_model_path, engine, tile_size, batch_size, tta):
    """Everything besides the image that decides a label's pixels: parts must agree on all of it."""
    return {"model": model_fingerprint(saved_model_path), "engine": engine, "tile_size": tile_size,
            "batch_size": batch_size, "tta": bool(tta)}


def tile_rows_for(grid, first_row, stop_row):
    """The rows of tiles whose kept rows meet image rows [first_row, stop_row)."""
    needed = [index for index, row in enumerate(grid.rows)
              if row[0][0].keep_start < stop_row and row[0][0].keep_stop > first_row]
    return range(needed[0], needed[-1] + 1)


def _cropped(bands, first_row, stop_row):
    """Full-width bands (first row, [mask]) cut down to image rows [first_row, stop_row)."""
    for start, (mask,) in bands:
        low, high = max(start, first_row), min(start + len(mask), stop_row)
        if low < high:
            yield mask[low - start:high - start]


class ImagePart:
    """One part's work on one image: its chunk rows, computed, written and marked."""

    def __init__(self, source, metadata, options, settings, num_parts, part_id):
        self.source, self.options = source, options
        height, width, channels = source.shape
        if source.planes > 1:
            raise image_files.ImageFileError(f"{source.path}: a stack of {source.planes} planes: --split_image 1 "
                                             "splits images of one plane")
        if channels != metadata["number_channels"]:
            raise image_files.ImageFileError(
                f"{source.path}: image has {channels} channel(s), the model expects {metadata['number_channels']}")
        self.number_classes = metadata["number_classes"]
        self.dtype = image_files.mask_dtype(self.number_classes - 1)
        self.grid = tiling.tile_grid(height, width, options.tile_size, metadata["radius"], metadata["size_factor"])
        self.target = ome_zarr_io.label_target(source, options.label_name, options.output_folder)
        self.work = ome_zarr_parts.SharedLabel.join(source, self.dtype, self.target, settings)
        self.parts = [range(*self._pixel_span(part_chunk_rows(self.work.chunk_rows, num_parts, index)))
                      for index in range(num_parts)]
        self.part_id, self.num_parts = part_id, num_parts
        self.rows = part_chunk_rows(self.work.chunk_rows, num_parts, part_id)

    def _pixel_span(self, chunk_rows):
        if not chunk_rows:
            return 0, 0
        return self.work.pixel_rows(chunk_rows[0])[0], self.work.pixel_rows(chunk_rows[-1])[1]

    def statistics(self):
        (mean, std), _ = self.work.statistics(self.source, [(part.start, part.stop) for part in self.parts],
                                              self.part_id)
        return mean, std

    def compute(self, todo, mean, std, predict):
        """Compute and write the chunk rows `todo` (sorted); returns the tiles run."""
        first_row, stop_row = self.work.pixel_rows(todo[0])[0], self.work.pixel_rows(todo[-1])[1]
        tile_rows = tile_rows_for(self.grid, first_row, stop_row)
        batch_size = tiling.tiles_per_batch(self.options.batch_size, self.grid.tile_shape, self.options.tile_size)
        tiles = segmentation.tile_probabilities(self.source, self.grid, predict, mean, std, batch_size, tile_rows)
        output = segmentation.Output(segmentation.argmax_labels, self.dtype)
        bands = segmentation.assemble_bands(tiles, self.grid, self.source.shape[1], [output], tile_rows.start)
        wanted = set(todo)
        for start, block in mask_writers.rebanded(_cropped(bands, first_row, stop_row), self.work.chunk_height,
                                                  self.source.shape[1], self.dtype):
            row = (first_row + start) // self.work.chunk_height
            if row in wanted:
                self.work.write_chunk_row(row, block)
        return sum(len(self.grid.rows[index]) for index in tile_rows)


def segment_part(path, predict, metadata, options, settings, num_parts, part_id, skip_existing, log):
    """This part's chunk rows of one OME-Zarr image, and the label put in place when they were the
    last ones missing. Returns an ImageResult (height: the rows this part computed)."""
    started = time.perf_counter()
    with ome_zarr_io.ZarrSource.open(path) as source:
        part = ImagePart(source, metadata, options, settings, num_parts, part_id)
        rows = part.rows
        todo = [row for row in rows if not (skip_existing and part.work.is_done(row))]
        if len(todo) < len(rows):
            log(f"{path}: {len(rows) - len(todo)} of this part's {len(rows)} chunk row(s) already done")
        tiles = computed_rows = 0
        if todo:
            mean, std = part.statistics()
            tiles = part.compute(todo, mean, std, predict)
            computed_rows = sum(stop - start for start, stop in map(part.work.pixel_rows, todo))
        done = len(part.work.done_rows())
        if done < part.work.chunk_rows:
            log(f"{path}: {done} of {part.work.chunk_rows} chunk rows done; the part that completes them "
                f"writes the label")
        else:
            written = part.work.finish(source, part.number_classes, options.label_name, options.output_folder)
            if written is not None:
                note = " (replacing the earlier one)" if written.replaced else ""
                log(f"{path}: every chunk row done: label image {written.path} written{note}")
        return ImageResult(path, computed_rows, source.shape[1], tiles, time.perf_counter() - started)


def segment_parts(paths, predict, metadata, options, settings, num_parts, part_id, skip_existing=False,
                  log=print):
    """An ImageResult per OME-Zarr image: this part's share of its chunk rows (see segment_part); an
    image that fails does not stop the others."""
    for path in paths:
        try:
            yield segment_part(path, predict, metadata, options, settings, num_parts, part_id, skip_existing, log)
        except Exception as error:  # one bad image must not stop the others
            yield ImageResult(path, error=error)
