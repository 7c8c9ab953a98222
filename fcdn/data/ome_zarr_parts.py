"""One NGFF label image written by several processes at once, each a share of its chunk rows.

    work = SharedLabel.join(source, dtype, target, settings)   # creates or joins the work folder
    (mean, std), read = work.statistics(source, parts, part_id)   # the statistics pass, shared
    work.write_chunk_row(row, block)                           # whole chunk rows of level 0, then a marker
    if work.complete():
        written = work.finish(source, number_classes, label_name, output_folder)   # None: another did

The parts share a hidden work folder beside the label's place, `.<label name>.parts`:
- `manifest.json`: what the work is (the image's path, shape, chunks and NGFF version, the label's
  pixel type, and `settings`: the model's fingerprint and every option that changes a pixel). A part
  whose manifest differs (another model, tile size, engine...) replaces the work folder: a chunk row
  is never mixed with one made otherwise.
- `label/`: the label image being built, created once (its group and arrays, as one process creates
  them), level 0 written chunk row by chunk row.
- `done/<row>`: a chunk row's marker. It is written (atomically) only after the row's chunk files are
  flushed to disk (fsync), so a marker means the whole row is there, after a kill or a crash alike;
  a row without one is computed again.
- `statistics/<start>-<stop>.json`: one block of the normalisation statistics pass. The blocks are
  merged in the image's order, exactly as one process merges them, so every part z-scores with the
  same bits; each part computes its own blocks first and then only those that no other part has
  stored yet (another part's from its last block up, towards that part coming down).

The part that finds every marker written finishes the label: it hard-links the chunk files of the
work folder (copies them where links are not possible) into a staging folder beside the label's
place, writes the lower levels and the metadata there (ome_zarr_io.finish_label_image), validates
it, renames it into place and lists it (ome_zarr_io.place_label_image), then removes the work folder.
Two parts finishing at once each build a complete, identical label, and a part killed while
finishing leaves a staging folder that the next write removes: no lock is ever held. A part that
finds the work folder gone while finishing leaves the label to the part that removed it.
"""

import errno
import json
import os
import shutil

import numpy as np

from fcdn.common import atomic_files
from fcdn.data import image_sources, ome_zarr_io

MANIFEST = "manifest.json"
LABEL = "label"
DONE = "done"
STATISTICS = "statistics"


class FinishedElsewhere(Exception):
    """The work folder went away while this part was finishing: another part finished the label."""


def work_folder(target):
    """The hidden work folder of the parts writing the label image `target`."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}.parts")


def manifest_for(source, dtype, folder, settings):
    """What a work folder is for: the parts that share one must all have the same. The image is named
    relative to the work folder, so that nodes mounting the shared file system elsewhere agree."""
    image = os.path.relpath(os.path.realpath(source.path), os.path.realpath(os.path.dirname(folder)))
    return {"image": image, "ngff_version": source.ngff_version,
            "shape": list(source.shape), "chunks": list(source.array.chunks),
            "image_dtype": str(source.array.dtype), "label_dtype": np.dtype(dtype).name,
            "settings": settings}


def _read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _discard(folder):
    """Remove a folder that others may be reading: renamed away first, so none sees it half removed."""
    trash = atomic_files.staging_path(folder)
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder):
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for parent, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(parent, name))
        _fsync(parent)


class SharedLabel:
    """The work folder of a label image written in parts (see the module's text)."""

    def __init__(self, folder, manifest):
        import zarr

        self.folder = folder
        self.manifest = manifest
        self.level0 = zarr.open_array(os.path.join(folder, LABEL, "0"), mode="r+")
        self.chunk_height = self.level0.chunks[-2]
        self.chunk_rows = -(-self.level0.shape[-2] // self.chunk_height)

    @classmethod
    def join(cls, source, dtype, target, settings):
        """The work folder of `target` for this image and settings: joined when another part made it,
        else made, replacing one made for other settings or another image."""
        folder = work_folder(target)
        manifest = json.loads(json.dumps(manifest_for(source, dtype, folder, settings)))  # as read back
        atomic_files.recover_directory(folder)  # staging folders of parts killed while making it
        for _ in range(3):
            found = _read_json(os.path.join(folder, MANIFEST))
            if found == manifest:
                return cls(folder, manifest)
            if os.path.lexists(folder):
                _discard(folder)
            cls._make(folder, source, dtype, manifest)
        raise ValueError(f"{folder}: other parts keep making this work folder for other settings or another "
                         "image: run one set of parts at a time")

    @staticmethod
    def _make(folder, source, dtype, manifest):
        """Build the work folder under a staging name and rename it into place, unless another part
        did so first (then theirs is used)."""
        staging = atomic_files.staging_path(folder)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            ome_zarr_io.create_label_image(os.path.join(staging, LABEL), source, dtype)
            for name in (DONE, STATISTICS):
                os.mkdir(os.path.join(staging, name))
            with open(os.path.join(staging, MANIFEST), "w") as handle:
                json.dump(manifest, handle, indent=2)
            try:
                os.rename(staging, folder)  # a directory is never renamed over another part's
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- the statistics pass ---------------------------------------------------------------------

    def _block_path(self, start, stop):
        return os.path.join(self.folder, STATISTICS, f"{start}-{stop}.json")

    def _block(self, source, start, stop, computed):
        stored = _read_json(self._block_path(start, stop))
        if isinstance(stored, dict):
            return image_sources.BlockStatistics(stored["count"], np.array(stored["mean"]), np.array(stored["m2"]),
                                                 stored["non_finite"])
        block = source.block_statistics(start, stop)
        computed.append((start, stop))
        # JSON keeps a float64 exactly (its shortest repr reads back to the same bits)
        atomic_files.write_text(self._block_path(start, stop), json.dumps(
            {"count": block.count, "mean": block.mean.tolist(), "m2": block.m2.tolist(),
             "non_finite": block.non_finite}))
        return block

    def statistics(self, source, parts, part_id):
        """The whole image's per-channel (mean, std), to the bit as source.statistics() gives them, and
        the blocks (start, stop) this call read. `parts` are the image rows [start, stop) of every part.
        The blocks of part `part_id` come first, top down; then those no other part has stored yet,
        each other part's from its last block up: a part that runs meanwhile computes its own top
        down, so the two meet halfway instead of computing the same blocks one after the other."""
        blocks = source.statistics_blocks()
        order = {}
        for index, (first_row, stop_row) in enumerate(parts):
            owned = [block for block in blocks if block[0] < stop_row and block[1] > first_row]
            for position, block in enumerate(owned):
                rank = (-1, position) if index == part_id else (len(owned) - 1 - position, index)
                order[block] = min(order.get(block, rank), rank)
        computed, found = [], {}
        for block in sorted(blocks, key=lambda block: order.get(block, (len(blocks), 0))):
            found[block] = self._block(source, *block, computed)
        return image_sources.merge_statistics(source.path, [found[block] for block in blocks]), computed

    # -- chunk rows --------------------------------------------------------------------------------

    def _marker(self, row):
        return os.path.join(self.folder, DONE, str(row))

    def is_done(self, row):
        return os.path.exists(self._marker(row))

    def done_rows(self):
        names = os.listdir(os.path.join(self.folder, DONE))
        return sorted(int(name) for name in names if name.isdigit() and int(name) < self.chunk_rows)

    def complete(self):
        return len(self.done_rows()) == self.chunk_rows

    def pixel_rows(self, row):
        """The image rows [start, stop) of chunk row `row`."""
        return row * self.chunk_height, min((row + 1) * self.chunk_height, self.level0.shape[-2])

    def write_chunk_row(self, row, block):
        """Write the mask rows of chunk row `row` (all of them, full width) and then its marker."""
        start, stop = self.pixel_rows(row)
        if block.shape != (stop - start, self.level0.shape[-1]):
            raise ValueError(f"{self.folder}: chunk row {row} takes {stop - start} rows of "
                             f"{self.level0.shape[-1]}, not {block.shape}")
        leading = (0,) * (self.level0.ndim - 2)
        self.level0[leading + (slice(start, stop), slice(None))] = block
        folder = self._row_folder(row)
        if os.path.isdir(folder):  # a row all of the fill value has no chunk file, hence no folder
            _fsync_tree(folder)
            _fsync(os.path.dirname(folder))  # the entry of the row's folder
        atomic_files.write_text(self._marker(row), "")

    def _row_folder(self, row):
        """Where zarr keeps the chunk files of one chunk row of level 0 ('/' separated keys)."""
        parts = (["c"] if self.manifest["ngff_version"] == "0.5" else []) + ["0"] * (self.level0.ndim - 2)
        return os.path.join(self.folder, LABEL, "0", *parts, str(row))

    # -- finishing ---------------------------------------------------------------------------------

    def finish(self, source, number_classes, label_name, output_folder):
        """Put the complete label image in place (pyramid, metadata, listing) and remove the work
        folder; None when another part finished it meanwhile, else ome_zarr_io's LabelsWritten."""
        def build(staging, source_image):
            try:
                _link_tree(os.path.join(self.folder, LABEL), staging)
            except FileNotFoundError:
                raise FinishedElsewhere() from None
            if not os.path.exists(os.path.join(self.folder, MANIFEST)):
                raise FinishedElsewhere()  # renamed away before every link was made: the label is incomplete
            return ome_zarr_io.finish_label_image(staging, source, number_classes, label_name, source_image)

        try:
            written = ome_zarr_io.place_label_image(source, build, label_name, output_folder)
        except FinishedElsewhere:
            return None
        _discard(self.folder)
        return written


def _link_tree(source_folder, target_folder):
    """Hard-link every file of `source_folder` into the empty `target_folder`, copying where the file
    system cannot link; zarr's unfinished writes (`*.partial`, left by a killed part) are left out."""
    for parent, folders, files in os.walk(source_folder):
        folders.sort()
        destination = os.path.join(target_folder, os.path.relpath(parent, source_folder))
        os.makedirs(destination, exist_ok=True)
        for name in sorted(files):
            if name.endswith(".partial"):
                continue
            origin, copy = os.path.join(parent, name), os.path.join(destination, name)
            try:
                os.link(origin, copy)
            except FileNotFoundError:
                raise
            except OSError:  # no hard links on this file system (or across it): a copy
                shutil.copyfile(origin, copy)
