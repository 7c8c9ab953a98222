"""Segmenting a list of images: each one prepared ahead of the model, small ones batched together.

    options = RunnerOptions(tile_size=2048, output_folder="out/masks")
    for result in segment_images(paths, predict, metadata, options):
        print(result.path, result.error or f"{result.height}x{result.width}")

An image is prepared (opened, checked against the model, its outputs chosen and checked, its
normalisation statistics computed) in a background thread while the model runs on the images
before it. Consecutive images that fit one tile of the same shape run through the model together,
up to the batch budget of every device; larger images run tile by tile. Each image's outputs (mask
or NGFF label, probability map, QC overlay) are written in threads of their own (pipeline.fan_out).
A path ending in .zarr is an OME-Zarr image whose labels go inside it (or, with an output folder,
beside the masks); any other path is an image file.
"""

import dataclasses
import os
import time

import numpy as np

from fcdn.common import errors, qc_pictures
from fcdn.data import image_files, image_sources, ome_zarr_io
from fcdn.inference import mask_writers, pipeline, segmentation, stacks, tiling
from fcdn.measure import banded, planes, tables

# images prepared ahead of the model: the next one's statistics pass (a whole read of a large image)
# overlaps the model's work on the current one; more would hold more images in memory
LOOK_AHEAD = 2


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """How images are read and cut into tiles, and what is written for each of them."""

    tile_size: int  # already checked against the model's radius (tiling.check_tile_size)
    output_folder: str = None  # None: OME-Zarr images keep their labels inside; other images need one
    batch_size: int = 0  # tiles per forward pass; 0: as many as fit in batch_pixels
    batch_pixels: int = 0  # an automatic batch's pixels; 0: tile_size^2 (tiling.automatic_batch_pixels)
    streaming_megapixels: float = 64.0  # TIFF images this large are read and written tile by tile
    label_name: str = ome_zarr_io.DEFAULT_LABEL_NAME
    save_probabilities: bool = False
    overlay_folder: str = None
    measure_objects: bool = False  # an object table <stem>_objects.csv beside each mask
    channel_axis: object = "auto"  # TIFF: "auto" (the file's axes), "none" or an axis index (image_axes)
    series: int = 0  # TIFF: the series segmented


@dataclasses.dataclass
class ImageResult:
    """What became of one image: its size and tile count, or the error that stopped it; with ground
    truth, its confusion matrix."""

    path: str
    height: int = 0
    width: int = 0
    tiles: int = 0
    seconds: float = 0.0
    error: Exception = None
    confusion: np.ndarray = None
    planes: int = 1  # a stack's planes, each height x width

    @property
    def megapixels(self):
        return self.height * self.width * self.planes / 1e6

    @property
    def failure(self):
        """The one-line `path: why` of a failed image, or None."""
        return None if self.error is None else errors.with_path(self.path, self.error)


def is_zarr_image(path):
    """Whether a path names an OME-Zarr image (a .zarr folder) rather than an image file."""
    return os.path.normpath(path).lower().endswith(".zarr")


@dataclasses.dataclass
class ImageJob:
    """An image ready for the model: its source, tile grid, statistics and output consumers."""

    path: str
    source: image_sources.ImageSource
    grid: tiling.TileGrid
    mean: np.ndarray
    std: np.ndarray
    outputs: tuple
    consumers: tuple
    started: float
    stack: object = None  # a plane of a stacks.TiffStackImage

    @property
    def single_tile(self):
        return self.grid.tile_count == 1


def open_image(path, options):
    """The image source of a file (or of an OME-Zarr folder)."""
    if is_zarr_image(path):
        return ome_zarr_io.ZarrSource.open(path)
    return image_sources.open_source(path, options.streaming_megapixels)


def mask_consumer(source, name, dtype, number_classes, options):
    """The consumer of the mask's bands: a mask file, or an NGFF label image (checked here, before any work)."""
    height, width, _ = source.shape
    if not is_zarr_image(name):
        mask = mask_writers.mask_writer(options.output_folder, name)
        return lambda bands: mask.write(bands, (height, width), dtype, source.streamed, source.pixel_size)
    target = ome_zarr_io.label_target(source, options.label_name, options.output_folder)

    def write_labels(bands):
        written = ome_zarr_io.write_labels(source, bands, dtype, number_classes, options.label_name,
                                           options.output_folder)
        if written.replaced:
            print(f"note: {target}: replaced the earlier label image of that name", flush=True)

    return write_labels


def output_consumers(source, name, metadata, options):
    """What is made of one image's probabilities: (segmentation.Output, consumer of its bands) pairs."""
    height, width, _ = source.shape
    number_classes = metadata["number_classes"]
    dtype = image_files.mask_dtype(number_classes - 1)
    pairs = [(segmentation.Output(segmentation.argmax_labels, dtype),
              mask_consumer(source, name, dtype, number_classes, options))]
    if options.save_probabilities:
        probabilities = mask_writers.probabilities_writer(options.output_folder, name)
        pairs.append((segmentation.Output(segmentation.quantised_probabilities, np.uint8),
                      lambda bands: probabilities.write(bands, (height, width, number_classes), np.uint8,
                                                        source.streamed, source.pixel_size)))
    # these have no reduction of their own: they take the mask's rows with the image's
    if options.overlay_folder is not None:
        pairs.append((None, overlay_consumer(source, name, options.overlay_folder)))
    if options.measure_objects:
        pairs.append((None, objects_consumer(source, name, options.output_folder)))
    return pairs


def overlay_consumer(source, name, overlay_folder):
    """A consumer of (first row, image rows, mask rows) that writes the image's QC picture."""
    path = os.path.join(overlay_folder, os.path.splitext(name)[0] + ".png")

    def build(items):
        overlay = qc_pictures.Overlay(*source.shape)
        for start, image_rows, mask_rows in items:
            overlay.add(start, image_rows, mask_rows)
        qc_pictures.write_png(path, overlay.render())

    return build


def objects_consumer(source, name, output_folder):
    """A consumer of (first row, image rows, mask rows) that writes the image's object table, measured
    from the bands as they are written (never by reading the mask back)."""
    height, width, channels = source.shape
    path = os.path.join(output_folder, tables.table_name(name))

    def measure(items):
        table = banded.BandedObjects(width, channels)
        for start, image_rows, mask_rows in items:
            table.add(start, mask_rows, image_rows)
        tables.write_table(path, table.finish(), planes.pixel_size_um(source))

    return measure


def output_paths(path, options):
    """The files an image's outputs are written to (what skipping existing outputs looks for)."""
    name = os.path.basename(os.path.normpath(path))
    if is_zarr_image(path):
        paths = [os.path.join(path, "labels", options.label_name) if options.output_folder is None
                 else os.path.join(options.output_folder, name[:-len(".zarr")] + ".zarr")]
    else:
        paths = [mask_writers.output_path(options.output_folder, name)]
    if options.save_probabilities:
        paths.append(mask_writers.probabilities_path(options.output_folder, name))
    if options.overlay_folder is not None:
        paths.append(os.path.join(options.overlay_folder, os.path.splitext(name)[0] + ".png"))
    if options.measure_objects:
        paths.append(os.path.join(options.output_folder, tables.table_name(name)))
    return paths


def prepare_image(path, metadata, options):
    """Open an image, check it, choose its outputs and compute its statistics: an ImageJob."""
    started = time.perf_counter()
    name = os.path.basename(os.path.normpath(path))
    source = open_image(path, options)
    return prepare_job(path, source, lambda: output_consumers(source, name, metadata, options), metadata,
                       options, started)


def prepare_job(path, source, outputs, metadata, options, started, stack=None):
    """Check an open source against the model, choose its outputs (`outputs()`: (Output, consumer)
    pairs, checked before any work) and compute its statistics: an ImageJob; the source is closed
    on failure."""
    try:
        height, width, channels = source.shape
        if channels != metadata["number_channels"]:
            raise image_files.ImageFileError(
                f"{path}: image has {channels} channel(s), the model expects {metadata['number_channels']}")
        grid = tiling.tile_grid(height, width, options.tile_size, metadata["radius"], metadata["size_factor"])
        pairs, consumers = zip(*outputs())
        mean, std = source.statistics()
    except BaseException:
        source.close()
        raise
    return ImageJob(path, source, grid, mean, std, pairs, consumers, started, stack)


def prepare_planes(stack, metadata, options):
    """(path, ImageJob or None, error or None) for every plane of a stack, in order; the first failure
    ends them (the stack then writes nothing)."""
    dtype = image_files.mask_dtype(metadata["number_classes"] - 1)
    middle = stack.planes // 2
    for index in range(stack.planes):
        if stack.failed:
            return
        started = time.perf_counter()
        try:
            if options.measure_objects:
                raise image_files.ImageFileError(
                    f"{stack.path}: --measure_objects 1 measures 2-D images; this is a stack of "
                    f"{stack.planes} planes ({stack.describe()}): measure its mask with measure_objects.py")
            if index == 0:
                stack.open_feeds(metadata["number_classes"], dtype, options)
            source = stack.plane_source(index, options)

            def outputs(source=source, index=index):
                pairs = stack.plane_outputs(index, dtype)
                if options.overlay_folder is not None and index == middle:
                    pairs.append((None, overlay_consumer(source, os.path.basename(stack.path),
                                                         options.overlay_folder)))
                return pairs

            yield stack.path, prepare_job(stack.path, source, outputs, metadata, options, started, stack), None
        except Exception as error:  # the stack fails as one image
            if stack.fail():
                yield stack.path, None, error
            return


def with_image_rows(bands, source, count):
    """Each band's arrays, then `count` times (first row, the image's rows, the mask's rows)."""
    for start, arrays in bands:
        rows = source.rows(start, start + len(arrays[0]))
        yield arrays + [(start, rows, arrays[0])] * count


def finish_image(job, tiles):
    """Reduce an image's tiles into its outputs and write them; returns its ImageResult."""
    height, width, _ = job.source.shape
    reductions = [output for output in job.outputs if output is not None]
    bands = segmentation.assemble_bands(tiles, job.grid, width, reductions)
    with_rows = len(job.outputs) - len(reductions)  # the overlay and the object table, last
    items = with_image_rows(bands, job.source, with_rows) if with_rows else (arrays for _, arrays in bands)
    try:
        pipeline.fan_out(items, job.consumers)
    finally:
        job.source.close()
    return ImageResult(job.path, height, width, job.grid.tile_count, time.perf_counter() - job.started)


def segment_file(path, predict, metadata, options):
    """Segment one image and write its outputs; returns (height, width, tile count)."""
    job = prepare_image(path, metadata, options)
    batch_size = tiling.tiles_per_batch(options.batch_size, job.grid.tile_shape, options.tile_size,
                                        options.batch_pixels)
    tiles = segmentation.tile_probabilities(job.source, job.grid, predict, job.mean, job.std, batch_size)
    result = finish_image(job, tiles)
    return result.height, result.width, result.tiles


def prepared(paths, metadata, options):
    """(path, ImageJob or None, error or None) for every path (every plane of a stack), in order."""
    for path in paths:
        try:
            stack = stacks.open_stack(path, options, zarr=is_zarr_image(path))
            if stack is not None:
                yield from prepare_planes(stack, metadata, options)
                continue
            yield path, prepare_image(path, metadata, options), None
        except Exception as error:  # one bad image must not stop the others
            yield path, None, error


def reported(job, result):
    """The result to report for a job: a 2-D image's own; for a plane of a stack, the stack's once
    its last plane is written (sizes of a plane, tiles and seconds of all), or its first failure."""
    stack = job.stack
    if stack is None:
        return result
    if result.error is not None:
        return result if stack.fail() else None
    if stack.failed:
        return None
    stack.done += 1
    stack.tiles += result.tiles
    if stack.done < stack.planes:
        return None
    return ImageResult(stack.path, result.height, result.width, stack.tiles, time.perf_counter() - stack.started,
                       planes=stack.planes)


def groups(prepared_images, budget):
    """Consecutive single-tile images of one tile shape, up to `budget` of them, or one other item."""
    group = []
    for path, job, error in prepared_images:
        joins = job is not None and job.single_tile and (not group or job.grid.tile_shape == group[0].grid.tile_shape)
        if group and (not joins or len(group) >= budget(group[0])):
            yield group, None
            group = []
        if job is None:
            yield [path], error
        elif job.single_tile:
            group.append(job)
        else:
            yield [job], None
    if group:
        yield group, None


def run_group(group, predict, options):
    """Segment a group of jobs (several single-tile ones batched, or one of many tiles)."""
    batch_size = tiling.tiles_per_batch(options.batch_size, group[0].grid.tile_shape, options.tile_size,
                                        options.batch_pixels)
    if not group[0].single_tile:
        job = group[0]
        try:
            result = finish_image(job, segmentation.tile_probabilities(job.source, job.grid, predict, job.mean,
                                                                       job.std, batch_size))
        except Exception as error:
            if job.stack is None:
                raise
            result = ImageResult(job.path, error=error)
        yield job, result
        return
    images = [(job.source, job.grid, job.mean, job.std) for job in group]
    for index, tile in segmentation.single_tile_probabilities(images, predict, batch_size):
        try:
            yield group[index], finish_image(group[index], [tile])
        except Exception as error:  # a failed write of one image must not stop the others
            yield group[index], ImageResult(group[index].path, error=error)


def segment_images(paths, predict, metadata, options, device_count=1):
    """An ImageResult per path, in order; the next images are prepared while the model runs."""
    def budget(job):  # images per group: a batch for every device
        return device_count * tiling.tiles_per_batch(options.batch_size, job.grid.tile_shape, options.tile_size,
                                                     options.batch_pixels)

    for group, error in groups(pipeline.prefetch(prepared(paths, metadata, options), LOOK_AHEAD), budget):
        if error is not None:
            yield ImageResult(group[0], error=error)
            continue
        done = 0
        try:
            for job, result in run_group(group, predict, options):
                done += 1
                result = reported(job, result)
                if result is not None:
                    yield result
        except Exception as failure:  # the model failed: the group's other images fail, the rest go on
            for job in group[done:]:
                job.source.close()
                result = reported(job, ImageResult(job.path, error=failure))
                if result is not None:
                    yield result
