"""Segmenting a stack (z-stack, time series, any TIFF whose axes hold more than one 2-D plane) plane by
plane, into outputs with the image's axes less C.

    stack = open_stack(path, options)          # None: a 2-D image, read as before
    for index in range(stack.planes):
        source = stack.plane_source(index)     # an ImageSource of one plane (its own statistics)
        consumers = stack.plane_consumers(index, source, metadata, options)

Each plane is a 2-D image of its own: the runner prepares, batches and segments it as it would a
file, so planes that pad to one shape share batches and a stack's mask equals the masks of its
planes segmented one by one. The planes' mask (and probability) bands go, in plane order, to one
writer thread per output file (StackFeed), which builds the file under a temporary name: it appears
only when its last plane is in, and a failed plane removes it. The overlay is the middle plane's.

A stack whose pixels reach --streaming_megapixels is never held whole: each plane is read from
tifffile's zarr store of the series' full-resolution level (a plane reaching it too, one band of rows
at a time) and its outputs are written tile by tile. A smaller stack is decoded once.
"""

import dataclasses
import os
import queue
import threading
import time

from fcdn.data import image_axes, image_files, image_sources, ome_zarr_io
from fcdn.inference import mask_writers, pipeline, segmentation

POLL_SECONDS = 0.1
_END_PLANE = object()


class StackFeed:
    """One output file of a stack: its planes' bands, handed over plane by plane to a writer thread.

    write(planes) consumes an iterator of per-plane band iterators. plane_consumer(index) is what the
    runner's fan_out feeds with plane `index`'s bands; the last plane's returns once the file is
    written (raising the writer's error). abort() stops the writer, which then leaves no file.
    """

    def __init__(self, planes, write):
        self.planes = planes
        self.write = write
        self.channel = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.write(self._plane() for _ in range(self.planes))
        except BaseException as error:  # reported to the plane that waits for it
            self.error = error
            self.stop.set()

    def _plane(self):
        while True:
            try:
                item = self.channel.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.stop.is_set():
                    raise pipeline.Aborted("a plane of this stack failed") from None
                continue
            if item is _END_PLANE:
                return
            yield item

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.channel.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue
        raise self.error or pipeline.Aborted("another plane of this stack failed")

    def plane_consumer(self, index):
        def consume(bands):
            if index == 0 and not self.stop.is_set():
                self.thread.start()
            try:
                for band in bands:
                    self._put(band)
                self._put(_END_PLANE)
            except BaseException:
                self.abort()  # the writer has removed its temporary file when this returns
                raise
            if index == self.planes - 1:
                self.thread.join()
                if self.error is not None:
                    raise self.error
        return consume

    def abort(self):
        self.stop.set()
        if self.thread.ident is not None:  # started (perhaps just now, by the first plane)
            self.thread.join()


@dataclasses.dataclass(frozen=True)
class StackDescription:
    """How a stack's outputs are described: the axes and sizes of its stack and the file's kind."""

    axes: str
    stack_shape: tuple
    kind: str
    imagej: dict


def _description(layout, kind, imagej):
    # channel-like axes of size 1 beside the chosen one would be a second channel axis: left out
    kept = [i for i in layout.stack if not (layout.shape[i] == 1 and layout.axes[i] in "CS")]
    return StackDescription("".join(layout.axes[i] for i in kept) + "YX",
                            tuple(layout.shape[i] for i in kept), kind, imagej)


class StackImage:
    """An image that the runner segments plane by plane: its plane sources, the feeds of its output
    files, and what became of its planes. Subclasses set `path`, `planes`, `description` (of the
    outputs, a StackDescription), `shape` (height, width), `streamed`, `pixel_size`, and provide
    plane_source(index, options) and _mask_write(dtype, number_classes, options)."""

    def __init__(self):
        self.feeds = []
        self.failed = False
        self.done = self.tiles = 0
        self.started = time.perf_counter()

    def open_feeds(self, number_classes, dtype, options):
        """The writers of the stack's mask (and probability map), before its first plane is segmented."""
        self.feeds = [StackFeed(self.planes, self._mask_write(dtype, number_classes, options))]
        if options.save_probabilities:
            height, width = self.shape
            probabilities = mask_writers.StackTiffWriter(
                mask_writers.probabilities_path(options.output_folder, os.path.basename(self.path)),
                self.description)
            self.feeds.append(StackFeed(self.planes, lambda planes: probabilities.write(
                planes, (height, width, number_classes), "uint8", self.streamed, self.pixel_size)))

    def plane_outputs(self, index, dtype):
        """(segmentation.Output, consumer) of plane `index`'s mask and probabilities."""
        reductions = [segmentation.Output(segmentation.argmax_labels, dtype),
                      segmentation.Output(segmentation.quantised_probabilities, "uint8")]
        return [(output, feed.plane_consumer(index)) for output, feed in zip(reductions, self.feeds)]

    def fail(self):
        """Stop the stack's writers (no output file is left); True the first time (its failure to report)."""
        first = not self.failed
        self.failed = True
        for feed in self.feeds:
            feed.abort()
        return first


class TiffStackImage(StackImage):
    """A TIFF segmented plane by plane, written as one TIFF of its axes less C."""

    def __init__(self, path, tiff_stack, streaming_megapixels):
        super().__init__()
        self.path = path
        self.layout = layout = tiff_stack.layout
        self.planes = layout.planes
        self.shape = (layout.height, layout.width)
        self.description = _description(layout, tiff_stack.kind, tiff_stack.imagej)
        self.pixel_size = image_sources.read_pixel_size(tiff_stack.tiff)
        plane_values = layout.height * layout.width * layout.channels
        self.plane_streamed = plane_values >= streaming_megapixels * 1e6
        self.streamed = plane_values * layout.planes >= streaming_megapixels * 1e6
        # a small stack is decoded once; a large one is read plane by plane, each plane on its own handle
        self.array = None if self.streamed else tiff_stack.read()

    def describe(self):
        return self.layout.describe()

    def plane_source(self, index, options):
        """The ImageSource of plane `index`."""
        if self.array is not None:
            return self._array_source(self.layout.plane(self.array, index))
        stack = image_axes.TiffStack(self.path, options.series, options.channel_axis)
        if not self.plane_streamed:
            with stack:
                return self._array_source(self.layout.plane(stack.array(), index))
        return PlaneSource(self, stack, index)

    def _array_source(self, plane):
        source = image_sources.ArraySource(image_files.as_supported_image(plane, self.path), self.path)
        source.pixel_size = self.pixel_size
        return source

    def _mask_write(self, dtype, number_classes, options):
        mask = mask_writers.StackTiffWriter(
            mask_writers.output_path(options.output_folder, os.path.basename(self.path)), self.description)
        return lambda planes: mask.write(planes, self.shape, dtype, self.streamed, self.pixel_size)


class ZarrStackImage(StackImage):
    """An OME-Zarr image of more than one plane (t, z): an NGFF label image of its axes less c."""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.path = source.path
        self.planes = source.planes
        self.shape = source.shape[:2]
        names = [name for name in source.axis_names if name != "c"]
        self.description = StackDescription("".join(names[:-2]).upper() + "YX", source.stack_shape, "shaped", {})
        self.streamed = True
        self.pixel_size = None

    def describe(self):
        return f"{''.join(self.source.axis_names)} {'x'.join(str(size) for size in self.source.array.shape)}"

    def plane_source(self, index, options):
        return self.source.plane_source(index)

    def _mask_write(self, dtype, number_classes, options):
        target = ome_zarr_io.label_target(self.source, options.label_name, options.output_folder)

        def write(planes):
            written = ome_zarr_io.write_labels(self.source, planes, dtype, number_classes, options.label_name,
                                               options.output_folder)
            if written.replaced:
                print(f"note: {target}: replaced the earlier label image of that name", flush=True)

        return write


class PlaneSource(image_sources.ImageSource):
    """One plane of a large stack, read one band of rows at a time from tifffile's zarr store."""

    streamed = True

    def __init__(self, stack_image, tiff_stack, index):
        self.path = stack_image.path
        self.layout = stack_image.layout
        self.pixel_size = stack_image.pixel_size
        self.index = index
        self.tiff_stack = tiff_stack
        self.array = tiff_stack.array()
        self.shape = (self.layout.height, self.layout.width, self.layout.channels)

    def rows(self, start, stop):
        return image_files.as_supported_image(self.layout.plane(self.array, self.index, slice(start, stop)),
                                              self.path)

    def statistics_rows(self):
        chunk_height = self.array.chunks[self.layout.y]
        return max(1, super().statistics_rows() // chunk_height) * chunk_height

    def close(self):
        self.tiff_stack.close()


def open_stack(path, options, zarr=False):
    """A TiffStackImage for a TIFF read plane by plane (a stack, a channel-first image, another series
    or a pyramid), a ZarrStackImage for an OME-Zarr image of several planes, or None for an image read
    as a 2-D one always was."""
    if zarr:
        source = ome_zarr_io.ZarrSource.open(path)
        if source.planes > 1:
            return ZarrStackImage(source)
        source.close()
        return None
    if not image_axes.is_tiff(path):
        return None
    with image_axes.TiffStack(path, options.series, options.channel_axis) as tiff_stack:
        if tiff_stack.simple and options.channel_axis == "auto" and options.series == 0:
            return None
        if 0 in tiff_stack.layout.shape:
            raise image_files.ImageFileError(f"{path}: empty image ({tiff_stack.layout.describe()})")
        return TiffStackImage(path, tiff_stack, options.streaming_megapixels)
