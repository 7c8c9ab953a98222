"""Which axes of an image file are its height, width and channels, and which make a stack of planes.

    layout = read_layout("stack.ome.tif")          # the first series, axes from its metadata
    layout.axes, layout.planes                     # 'TZCYX', 6 (2 time points x 3 slices)
    for index in range(layout.planes):
        plane = layout.plane(array, index)         # (height, width, channels)
        layout.plane_key(index)                    # '_t1_z2'

Y and X are the image; C (and tifffile's S, the samples of a pixel such as RGB) is the channel
axis wherever it stands; every other axis (Z, T, Q, ...) is a stack of 2-D planes. The axes come
from tifffile's series (ImageJ hyperstacks, OME-TIFF, tifffile's own `axes` metadata) or the NGFF
metadata of an OME-Zarr image. A file whose axes are unknown (tifffile names them Q or I; png and
jpg) keeps the rule of 2-D images: HW, or HWC with channels last. `channel_axis` settles a file whose
metadata is missing or wrong: an index into the stored array's axes, or "none"; Y and X are then
its last two other axes.
"""

import dataclasses
import math
import os

import numpy as np

from fcdn.data import image_files

CHANNEL_LETTERS = "CS"
UNKNOWN_LETTERS = "QI"


def parse_channel_axis(value):
    """'auto' (the file's metadata), 'none' (no channel axis) or an integer index; ValueError else."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--channel_axis {value!r}: expected auto, none or an axis index such as 0 or -1") from None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axes of a stored array: one letter each (the channel axis is C), the shape, and where Y, X and
    C stand; the remaining axes (`stack`) index the 2-D planes."""

    axes: str
    shape: tuple
    y: int
    x: int
    channel: int = None

    @property
    def stack(self):
        return tuple(i for i in range(len(self.shape)) if i not in (self.y, self.x, self.channel))

    @property
    def stack_shape(self):
        return tuple(self.shape[i] for i in self.stack)

    @property
    def planes(self):
        return math.prod(self.stack_shape)

    @property
    def height(self):
        return self.shape[self.y]

    @property
    def width(self):
        return self.shape[self.x]

    @property
    def channels(self):
        return 1 if self.channel is None else self.shape[self.channel]

    @property
    def mask_axes(self):
        """The axes of a mask of this image: its own, less C."""
        return "".join(letter for i, letter in enumerate(self.axes) if i != self.channel)

    @property
    def plain(self):
        """Whether the array already is HW or HWC (no stack, channels last): a 2-D image as read before."""
        return not self.stack and self.y < self.x and self.channel in (None, len(self.shape) - 1)

    def plane_key(self, index):
        """What names a plane in a record key: '_z3', '_t1_z2' (axes of size 1 left out), '' for one plane."""
        position = np.unravel_index(index, self.stack_shape) if self.stack else ()
        return "".join(f"_{self.axes[axis].lower()}{int(at)}"
                       for axis, at in zip(self.stack, position) if self.shape[axis] > 1)

    def selection(self, index, rows=slice(None)):
        """The index of plane `index` (rows `rows`) in the stored array, and the transposition to HWC."""
        position = np.unravel_index(index, self.stack_shape) if self.stack else ()
        at = dict(zip(self.stack, (int(value) for value in position)))
        selection = tuple(at.get(i, rows if i == self.y else slice(None)) for i in range(len(self.shape)))
        kept = sorted(i for i in (self.y, self.x, self.channel) if i is not None)
        order = tuple(kept.index(i) for i in (self.y, self.x, self.channel) if i is not None)
        return selection, order

    def plane(self, array, index, rows=slice(None)):
        """Plane `index` of an array of this layout (numpy, zarr, ...) as HWC: rows `rows` of it."""
        selection, order = self.selection(index, rows)
        plane = np.transpose(np.asarray(array[selection]), order)
        return plane if self.channel is not None else plane[:, :, np.newaxis]

    def describe(self):
        return f"{self.axes} {'x'.join(str(size) for size in self.shape)}"


def layout(axes, shape, channel_axis="auto", path=None, known=True):
    """The Layout of an array with tifffile/NGFF axes letters; ImageFileError when no 2-D image can be
    read from it. known=False: the letters carry no meaning (today's rule: HW or HWC)."""
    axes, shape = axes.upper(), tuple(int(size) for size in shape)
    where = path or "the image"
    if channel_axis not in ("auto", None):
        return _chosen_layout(axes, shape, channel_axis, where)
    if not known or any(letter in UNKNOWN_LETTERS for letter in axes) or "Y" not in axes or "X" not in axes:
        if len(shape) == 2:
            return Layout("YX", shape, 0, 1)
        if len(shape) == 3:
            return Layout("YXC", shape, 0, 1, 2)
        raise image_files.ImageFileError(
            f"{where}: expected a 2-D image (HW or HWC), got shape {shape} without axes metadata: say which "
            f"axis holds the channels with --channel_axis (or none)")
    channels = [i for i, letter in enumerate(axes) if letter in CHANNEL_LETTERS]
    many = [i for i in channels if shape[i] > 1]
    if len(many) > 1:
        raise image_files.ImageFileError(
            f"{where}: axes {axes} ({'x'.join(map(str, shape))}) have two channel axes: choose one with --channel_axis")
    channel = (many or channels or [None])[0]
    letters = "".join("C" if i == channel else letter for i, letter in enumerate(axes))
    return Layout(letters, shape, axes.index("Y"), axes.index("X"), channel)


def _chosen_layout(axes, shape, channel_axis, where):
    """The layout the user set: channel axis `channel_axis` (or none), Y and X the last two others."""
    ndim = len(shape)
    channel = None
    if channel_axis != "none":
        if not -ndim <= channel_axis < ndim:
            raise image_files.ImageFileError(
                f"{where}: --channel_axis {channel_axis} is outside the image's {ndim} axes ({axes} "
                f"{'x'.join(map(str, shape))})")
        channel = channel_axis % ndim
    others = [i for i in range(ndim) if i != channel]
    if len(others) < 2:
        raise image_files.ImageFileError(f"{where}: shape {shape} leaves no height and width beside the channels")
    y, x = others[-2:]
    letters = []
    for i, letter in enumerate(axes if len(axes) == ndim else "Q" * ndim):
        if i in (y, x, channel):
            letter = {y: "Y", x: "X", channel: "C"}[i]
        elif letter in "YXCS":
            letter = "Q"
        letters.append(letter)
    return Layout("".join(letters), shape, y, x, channel)


class TiffStack:
    """One series of a TIFF file, level 0 (the full resolution of a pyramid), read by its axes.

    `layout`, `kind` ('imagej', 'ome' or 'shaped': how a mask of it is described), `imagej` (the
    ImageJ metadata a mask keeps: unit, spacing, finterval), `simple` (a single-series, single-level
    file whose array is HW or HWC: read as 2-D images always were). array() opens tifffile's zarr
    store of the level (chunks are its strips or tiles), read() decodes the whole level.
    """

    def __init__(self, path, series=0, channel_axis="auto"):
        import tifffile

        self.path = path
        try:
            self.tiff = tifffile.TiffFile(path)
        except FileNotFoundError:
            raise image_files.ImageFileError(f"{path}: file does not exist") from None
        except Exception as error:  # tifffile raises many types for a corrupt file
            raise image_files.ImageFileError(f"{path}: cannot decode ({type(error).__name__}: {error})") from None
        try:
            self._open(series, channel_axis)
        except BaseException:
            self.tiff.close()
            raise

    def _open(self, series, channel_axis):
        count = len(self.tiff.series)
        if count == 0:
            raise image_files.ImageFileError(f"{self.path}: cannot decode (no image in the file)")
        if not 0 <= series < count:
            raise image_files.ImageFileError(f"{self.path}: --series {series}: the file holds {count} series")
        self.series = self.tiff.series[series]
        kind = self.series.kind.lower()
        self.kind = kind if kind in ("imagej", "ome") else "shaped"
        known = kind in ("imagej", "ome") or not any(letter in UNKNOWN_LETTERS for letter in self.series.axes)
        self.layout = layout(self.series.axes, self.series.shape, channel_axis, self.path, known)
        metadata = (self.tiff.imagej_metadata or {}) if self.tiff.is_imagej else {}
        self.imagej = {key: metadata[key] for key in ("unit", "spacing", "finterval") if key in metadata}
        self.simple = count == 1 and len(self.series.levels) == 1 and self.layout.plain

    def array(self):
        import zarr

        return zarr.open(self.series.aszarr(level=0), mode="r")

    def read(self):
        try:
            return self.series.levels[0].asarray()
        except Exception as error:  # decoders raise many types for a corrupt file
            raise image_files.ImageFileError(f"{self.path}: cannot decode ({type(error).__name__}: {error})") from None

    def close(self):
        self.tiff.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def is_tiff(path):
    return os.path.splitext(path)[1].lower() in (".tif", ".tiff")


def read_planes(path, channel_axis="auto", series=0):
    """(layout, stored array) of a whole image file: a TIFF's series by its axes, png/jpg by today's rule."""
    if is_tiff(path):
        with TiffStack(path, series, channel_axis) as stack:
            return stack.layout, stack.read()
    array = image_files.read_image(path)
    return layout("", array.shape, channel_axis, path, known=False), array
