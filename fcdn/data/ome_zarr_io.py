"""OME-Zarr images in, NGFF label images out: NGFF 0.4 on Zarr v2 and NGFF 0.5 on Zarr v3.

    for name in list_zarr_images("images"):
        with ZarrSource.open(os.path.join("images", name)) as source:   # an ImageSource
            label_target(source, label_name, output_folder)   # refuses a read-only zarr, before any work
            mean, std = source.statistics()
            bands = segmentation.segment_bands(source, grid, predict, mean, std, batch_size, dtype)
            written = write_labels(source, bands, dtype, number_classes, label_name, output_folder)
            # written.path, written.replaced (an existing label of that name was replaced), .levels

Reading: `ZarrSource` opens the first multiscale of an OME-Zarr image and serves full-width bands of
rows of its full-resolution level, read chunk by chunk (only the chunks the rows touch), and the
per-channel normalisation statistics in one streaming pass. Axes come from the metadata: yx, cyx or
yxc, after any number of other axes (t, z: a stack of planes; plane_source(index) reads one).

Writing: `write_labels` turns the bands of a mask, top to bottom, into an NGFF label image of the
image's NGFF version, either inside the image (`labels/<name>`) or, with an output folder, as
`<output_folder>/<stem>.zarr` whose `image-label.source.image` points back at the image. Its axes are
the image's without the channel axis (t and z are kept), and it has one level per image
level, of the same height and width, with the image level's coordinate transformations, so it
overlays the image level by level. Level 0 is written band by band, whole chunk rows at a time;
level k is nearest-neighbour subsampled from the stored level k-1: label_k[i, j] =
label_k-1[i * fy, j * fx], with f = round(previous size / size) per axis (so a pyramid that halves
its height and width gives mask[::2**k, ::2**k]). The model never runs twice.

Atomicity (atomic_files, the project's one way to write safely): the label image is built in a
hidden staging folder beside its final place, validated with ome-zarr-models, renamed into place (an
existing one of the same name is parked first and deleted once the new one is in) and only then
added to the `labels` listing, whose metadata file is replaced atomically. An interrupted run leaves
the listing untouched; its staging folder is removed on the way out or, after a SIGKILL, by the next
write of the same label (atomic_files.recover_directory, which also puts back a parked label).

Metadata of what is written is built with ome-zarr-models' pydantic models (so it is checked as it
is built) and the result is validated with them before it is listed; the input is read leniently
(its own few keys only), since yxc images are not valid for those models.
"""

import copy
import dataclasses
import json
import math
import os

# Loaded before TensorFlow can be: TensorFlow exports a zstd of its own, and numcodecs' zstd, when
# loaded after it, binds to that one, which compresses the same chunk to other bytes. Importing it
# here, ahead of any TensorFlow import in the scripts and the inference API, keeps a label's chunk
# files the same whichever process writes them (the parts of a split image and one process alike).
import numcodecs.zstd  # noqa: F401
import numpy as np

from fcdn.common import atomic_files, qc_pictures
from fcdn.data import image_files, image_sources
from fcdn.inference import mask_writers

DEFAULT_LABEL_NAME = "fcdensenet"
# NGFF version -> the Zarr format it is stored in.
ZARR_FORMATS = {"0.4": 2, "0.5": 3}
# Label chunks copy the image's chunk height and width, up to this: a buffered chunk row of a
# 16384-pixel-wide int32 mask then stays at 128 MB.
MAX_LABEL_CHUNK = 2048
# Twelve well-separated colours for the first classes (background 0 is transparent).
def list_zarr_images(folder):
    """Sorted names of the `*.zarr` directories in `folder` (case-insensitive extension)."""
    if not os.path.isdir(folder):
        raise image_files.ImageFileError(f"{folder}: folder does not exist")
    return sorted(name for name in os.listdir(folder)
                  if name.lower().endswith(".zarr") and os.path.isdir(os.path.join(folder, name)))


# ---------------------------------------------------------------------------------------------
# Reading

@dataclasses.dataclass(frozen=True)
class Level:
    """One resolution level of the image: its array path, height and width, and its
    coordinateTransformations (a list of dicts) restricted to the label axes."""

    path: str
    height: int
    width: int
    transforms: list


def _fail(path, problem):
    return image_files.ImageFileError(f"{path}: {problem}")


def _open_group(path):
    import zarr

    if not os.path.exists(path):
        raise _fail(path, "does not exist")
    if not os.path.isdir(path):
        raise _fail(path, "not a directory (an OME-Zarr image is a .zarr folder)")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several types for a folder that is no zarr group
        raise _fail(path, f"not a zarr group ({type(error).__name__})") from None


def _first_dict(value):
    """The first entry of a JSON list when it is an object, else None."""
    return value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else None


def _multiscale(path, group):
    """(NGFF version, first multiscales entry) of an image group, or ImageFileError.

    NGFF 0.5 keeps its metadata under attributes["ome"], its version beside "multiscales"; NGFF 0.4
    keeps "multiscales" at the top of .zattrs, the version inside each multiscale.
    """
    attributes = group.attrs.asdict()
    zarr_format = group.metadata.zarr_format
    if zarr_format == 3:
        metadata = attributes.get("ome") if isinstance(attributes.get("ome"), dict) else {}
        version = metadata.get("version")
    else:
        metadata = attributes
        version = (_first_dict(attributes.get("multiscales")) or {}).get("version")
    multiscale = _first_dict(metadata.get("multiscales"))
    if multiscale is None:
        other = [key for key in ("plate", "well", "bioformats2raw.layout", "labels") if key in metadata]
        hint = f" (it holds '{other[0]}' metadata: open one of its images)" if other else ""
        raise _fail(path, f"not an OME-Zarr image: no multiscales metadata{hint}")
    if ZARR_FORMATS.get(version) != zarr_format:
        raise _fail(path, f"NGFF version {version!r} on Zarr v{zarr_format} is not supported "
                          "(NGFF 0.4 on Zarr v2 or NGFF 0.5 on Zarr v3)")
    return version, multiscale


def _axis_names(path, multiscale, ndim):
    """Lower-case axis names and the axes metadata, checked against the array's dimensions."""
    axes = multiscale.get("axes")
    if not isinstance(axes, list) or len(axes) != ndim:
        raise _fail(path, f"multiscales axes {axes!r} do not match the {ndim} dimensions of the array")
    if not all(isinstance(axis, dict) and isinstance(axis.get("name"), str) for axis in axes):
        raise _fail(path, f"multiscales axes are not objects with names: {axes!r}")
    return [axis["name"].lower() for axis in axes], axes


def _check_layout(path, names, shape):
    """The image's y, x and c axes must read yx, cyx or yxc, y and x after the stack's axes (t, z, ...)."""
    kept = "".join(name for name in names if name in ("y", "x", "c"))
    if kept not in ("yx", "cyx", "yxc") or [name for name in names if name != "c"][-2:] != ["y", "x"]:
        described = ", ".join(f"{name}={size}" for name, size in zip(names, shape))
        raise _fail(path, f"unsupported axes {''.join(names)} ({described}): expected yx, cyx or yxc, "
                          "after any stack axes (t, z)")
    return kept


class ZarrSource(image_sources.ImageSource):
    """The full-resolution level of an OME-Zarr image, read one band of full-width rows at a time.

    An image_sources.ImageSource: `path`, `shape` (height, width, channels), rows(), statistics()
    (streamed over whole chunk rows), close(), a context manager; `streamed` is True: the image is
    never held whole. For the label writer: `ngff_version`, `axes`, `axis_names`, `levels`.
    """

    streamed = True

    def __init__(self, path, version, array, names, axes, levels, global_transforms=None):
        self.path = path
        self.ngff_version = version
        self.array = array
        self.axis_names = names          # of the image array, e.g. ['t', 'c', 'z', 'y', 'x']
        self.axes = axes                 # the image's axes metadata (list of dicts)
        self.levels = levels             # tuple of Level, full resolution first
        # The multiscale's own coordinateTransformations (applied after each level's), label axes only.
        self.global_transforms = global_transforms
        self.layout = _check_layout(path, names, array.shape)
        self.stack_shape = tuple(size for name, size in zip(names, array.shape) if name not in ("y", "x", "c"))
        self.position = (0,) * len(self.stack_shape)  # the plane read: its index along each stack axis
        sizes = dict(zip(names, array.shape))
        self.shape = (sizes["y"], sizes["x"], sizes.get("c", 1))
        if 0 in self.shape:
            raise _fail(path, f"empty image ({self.shape[0]}x{self.shape[1]}, {self.shape[2]} channel(s))")

    @classmethod
    def open(cls, path):
        """A ZarrSource, or ImageFileError with a one-line message starting with the path."""
        import zarr

        group = _open_group(path)
        version, multiscale = _multiscale(path, group)
        datasets = multiscale.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(
                isinstance(dataset, dict) and isinstance(dataset.get("path"), str) for dataset in datasets):
            raise _fail(path, "multiscales metadata without datasets paths")
        arrays = []
        for dataset in datasets:
            try:
                array = group[dataset["path"]]
            except KeyError:
                raise _fail(path, f"multiscales dataset '{dataset['path']}' does not exist") from None
            if not isinstance(array, zarr.Array):
                raise _fail(path, f"multiscales dataset '{dataset['path']}' is not an array")
            arrays.append(array)
        names, axes = _axis_names(path, multiscale, arrays[0].ndim)
        if len(set(names)) != len(names) or any(array.ndim != len(names) for array in arrays):
            raise _fail(path, f"axes {''.join(names)} do not match every level's dimensions")
        _check_layout(path, names, arrays[0].shape)
        levels = _levels(names, datasets, arrays)
        global_transforms = _label_transforms(multiscale.get("coordinateTransformations"), names) or None
        return cls(path, version, arrays[0], names, axes, levels, global_transforms)

    @property
    def label_axes(self):
        """The image's axes metadata without the channel axis: those of the label image."""
        return [axis for axis, name in zip(self.axes, self.axis_names) if name != "c"]

    @property
    def planes(self):
        return math.prod(self.stack_shape)

    def plane_position(self, index):
        return tuple(int(at) for at in np.unravel_index(index, self.stack_shape)) if self.stack_shape else ()

    def plane_key(self, index):
        """What names a plane: '_z3', '_t1_z2' (axes of size 1 left out)."""
        stack_names = [name for name in self.axis_names if name not in ("y", "x", "c")]
        return "".join(f"_{name}{at}" for name, at, size in zip(stack_names, self.plane_position(index),
                                                               self.stack_shape) if size > 1)

    def plane_source(self, index):
        """A source of plane `index` of the stack (the same array, another position)."""
        plane = copy.copy(self)
        plane.position = self.plane_position(index)
        return plane

    def rows(self, start, stop):
        """Pixels of rows [start, stop) of the plane as (stop - start, width, channels), read chunk-wise."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) outside the image's {self.shape[0]} rows")
        position = iter(self.position)
        selection = tuple(slice(start, stop) if name == "y" else slice(None) if name in ("x", "c")
                          else next(position) for name in self.axis_names)
        band = np.asarray(self.array[selection])
        if self.layout == "yx":
            band = band[:, :, np.newaxis]
        elif self.layout == "cyx":
            band = np.moveaxis(band, 0, -1)
        return image_files.as_supported_image(band, self.path)

    def statistics_rows(self):
        """Rows per block of the statistics pass (ImageSource.statistics): whole chunk rows of about
        STATISTICS_BLOCK_PIXELS values, so each chunk is decoded once."""
        chunk_height = self.array.chunks[self.axis_names.index("y")]
        return max(1, super().statistics_rows() // chunk_height) * chunk_height

    def close(self):
        # zarr's local store holds no open file between reads; dropping the array is enough.
        self.array = None


def _label_transforms(transforms, names):
    """The vector scale and translation transforms of a list, without their channel entry."""
    keep = [index for index, name in enumerate(names) if name != "c"]
    kept = []
    for transform in transforms if isinstance(transforms, list) else []:
        kind = transform.get("type") if isinstance(transform, dict) else None
        vector = transform.get(kind) if kind in ("scale", "translation") else None
        if isinstance(vector, list) and len(vector) == len(names):
            kept.append({"type": kind, kind: [float(vector[index]) for index in keep]})
    return kept


def _levels(names, datasets, arrays):
    """Level of every dataset: its y/x size and its transforms without the channel entry."""
    keep = [index for index, name in enumerate(names) if name != "c"]
    y, x = names.index("y"), names.index("x")
    base = arrays[0].shape
    levels = []
    for dataset, array in zip(datasets, arrays):
        transforms = _label_transforms(dataset.get("coordinateTransformations"), names)
        if not transforms or transforms[0]["type"] != "scale":
            # No usable vector scale (absent, or stored by path): the level's factor to level 0.
            factor = {y: base[y] / array.shape[y], x: base[x] / array.shape[x]}
            transforms = [{"type": "scale", "scale": [factor.get(i, 1.0) for i in keep]}]
        levels.append(Level(dataset["path"], array.shape[y], array.shape[x], transforms))
    return tuple(levels)


# ---------------------------------------------------------------------------------------------
# Writing: metadata

def label_colors(number_classes):
    """One distinct RGBA colour per class: 0 transparent, then the QC overlays' PALETTE (so a label
    layer shows the classes in the colours of the overlay PNGs), then colours spread over the
    24-bit RGB cube (multiplying by an odd constant is a bijection modulo 2**24), skipping repeats."""
    colors, used = [(0, 0, 0, 0)], set()
    for value in range(1, number_classes):
        if value <= len(qc_pictures.PALETTE):
            rgb = tuple(int(channel) for channel in qc_pictures.PALETTE[value - 1])
        else:
            code = (value * 0x9E3779) % (1 << 24)
            while (code >> 16, (code >> 8) & 255, code & 255) in used:
                code = (code + 1) % (1 << 24)
            rgb = (code >> 16, (code >> 8) & 255, code & 255)
        used.add(rgb)
        colors.append((*rgb, 255))
    return colors


def label_attributes(source, number_classes, name, source_image):
    """The label image's group attributes (multiscales and image-label), built with ome-zarr-models."""
    if source.ngff_version == "0.5":
        from ome_zarr_models.v05 import axes, image_label, image_label_types, multiscales
    else:
        from ome_zarr_models.v04 import axes, image_label, image_label_types, multiscales
    label_axes = [axes.Axis(**axis) for axis in source.label_axes]
    datasets = [multiscales.Dataset(path=str(index), coordinateTransformations=level.transforms)
                for index, level in enumerate(source.levels)]
    extra = {"version": "0.4"} if source.ngff_version == "0.4" else {}
    multiscale = multiscales.Multiscale(
        axes=label_axes, datasets=datasets, coordinateTransformations=source.global_transforms,
        name=name, type="nearest",
        metadata={"description": "label_k[i, j] = label_k-1[i * fy, j * fx], f = round(previous size / size)"},
        **extra)
    colors = [image_label_types.Color(label_value=value, rgba=rgba)
              for value, rgba in enumerate(label_colors(number_classes))]
    label = image_label_types.Label(colors=colors, source=image_label_types.Source(image=source_image),
                                    version=source.ngff_version)
    attributes = image_label.ImageLabelAttrs(multiscales=[multiscale], image_label=label, **(
        {"version": "0.5"} if source.ngff_version == "0.5" else {}))
    document = attributes.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {"ome": document} if source.ngff_version == "0.5" else document


def validate_label_image(path, version):
    """Validate a written label image with ome-zarr-models; ValueError naming the path if invalid."""
    import zarr

    if version == "0.5":
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image_label import ImageLabel
    try:
        ImageLabel.from_zarr(zarr.open_group(path, mode="r", zarr_format=ZARR_FORMATS[version]))
    except Exception as error:  # pydantic and zarr raise many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: the label image written is not valid NGFF {version}: {first_line}") from None


# ---------------------------------------------------------------------------------------------
# Writing: arrays

def _label_chunks(source):
    """(chunk height, chunk width) of the labels: the image's, at most MAX_LABEL_CHUNK."""
    chunks = source.array.chunks
    y, x = source.axis_names.index("y"), source.axis_names.index("x")
    return min(chunks[y], MAX_LABEL_CHUNK), min(chunks[x], MAX_LABEL_CHUNK)


def _create_levels(group, source, dtype):
    """One empty label array per image level, named 0, 1, ...; the image's stack axes (t, z) lead."""
    leading = source.stack_shape
    chunk_height, chunk_width = _label_chunks(source)
    names = [axis["name"] for axis in source.label_axes]
    options = ({"dimension_names": names} if source.ngff_version == "0.5"
               else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})  # NGFF 0.4 wants '/'
    return [group.create_array(str(index), shape=leading + (level.height, level.width),
                               chunks=(1,) * len(leading) + (chunk_height, chunk_width), dtype=dtype,
                               fill_value=0, **options)
            for index, level in enumerate(source.levels)]


def _checked_bands(bands, height, width, path):
    """The mask bands, each checked to fit the image; the rows they hold must add up to its height."""
    rows = 0
    for band in bands:
        band = np.asarray(band)
        if band.ndim != 2 or band.shape[1] != width or rows + len(band) > height:
            raise ValueError(f"{path}: a mask band of shape {band.shape} does not fit the "
                             f"{height}x{width} image after {rows} rows")
        rows += len(band)
        yield band
    if rows != height:
        raise ValueError(f"{path}: the mask bands hold {rows} rows, the image {height}")


def _chunk_rows(bands, height, width, chunk_height, dtype, path):
    """Re-cut full-width bands of mask rows into whole chunk rows: (first row, rows) in order."""
    yield from mask_writers.rebanded(_checked_bands(bands, height, width, path), chunk_height, width, dtype)


def _write_full_resolution(array, bands, dtype, path, leading):
    height, width = array.shape[-2:]
    for row, rows in _chunk_rows(bands, height, width, array.chunks[-2], dtype, path):
        array[leading + (slice(row, row + len(rows)), slice(None))] = rows


def _downsample(previous, array, leading):
    """Nearest-neighbour level of plane `leading` from the stored previous one, one chunk row at a time."""
    (previous_height, previous_width), (height, width) = previous.shape[-2:], array.shape[-2:]
    factor_y = max(1, round(previous_height / height))
    factor_x = max(1, round(previous_width / width))
    columns = np.minimum(np.arange(width) * factor_x, previous_width - 1)
    step = array.chunks[-2]
    for start in range(0, height, step):
        rows = np.minimum(np.arange(start, min(start + step, height)) * factor_y, previous_height - 1)
        block = np.asarray(previous[leading + (slice(int(rows[0]), int(rows[-1]) + 1), slice(None))])
        array[leading + (slice(start, start + len(rows)), slice(None))] = \
            block[rows - rows[0]][:, columns]


def create_label_image(path, source, dtype):
    """An empty label image in the empty folder `path`: its group and one array per image level, no
    metadata yet; returns the arrays."""
    import zarr

    group = zarr.open_group(path, mode="w", zarr_format=ZARR_FORMATS[source.ngff_version])
    return _create_levels(group, source, np.dtype(dtype))


def finish_label_image(path, source, number_classes, name, source_image):
    """Complete a label image whose level 0 is written: the lower levels, subsampled from it, and the
    metadata; validated. Returns its level count."""
    import zarr

    group = zarr.open_group(path, mode="r+", zarr_format=ZARR_FORMATS[source.ngff_version])
    arrays = [group[str(index)] for index in range(len(source.levels))]
    for previous, array in zip(arrays, arrays[1:]):
        for index in range(source.planes):
            _downsample(previous, array, source.plane_position(index))
    group.attrs.update(label_attributes(source, number_classes, name, source_image))
    validate_label_image(path, source.ngff_version)
    return len(arrays)


def build_label_image(path, source, bands, dtype, number_classes, name, source_image):
    """Write a complete, validated label image as a zarr group in the empty folder `path`; returns
    its level count. For a stack of planes, `bands` is an iterator of the planes' band iterators."""
    arrays = create_label_image(path, source, dtype)
    planes = bands if source.planes > 1 else [bands]
    for index, plane in enumerate(planes):
        _write_full_resolution(arrays[0], plane, np.dtype(dtype), source.path, source.plane_position(index))
    return finish_label_image(path, source, number_classes, name, source_image)


# ---------------------------------------------------------------------------------------------
# Writing: where, the labels listing, and the atomic commit

@dataclasses.dataclass(frozen=True)
class LabelsWritten:
    """What write_labels did: the label image's path, whether it replaced an existing one of that
    name, how many levels it has, and (inside the image) the labels listing it was added to."""

    path: str
    replaced: bool
    levels: int
    listing: list = None


def check_label_name(label_name):
    """A label name is one plain folder name; ValueError otherwise."""
    if (not label_name or label_name in (".", "..") or any(c in label_name for c in "/\\")
            or label_name.startswith((".", "__"))):
        raise ValueError(f"--label_name {label_name!r}: must be a plain folder name, not starting "
                         "with '.' or '__' and without '/'")
    return label_name


def _writable(folder):
    # os.access also answers False on a read-only file system, even for root.
    return os.access(folder, os.W_OK | os.X_OK)


def label_target(source, label_name=DEFAULT_LABEL_NAME, output_folder=None):
    """Where write_labels will put the label image, checked before any work is done.

    Inside the image: `<image>/labels/<label_name>`, which needs a writable image zarr.
    With `output_folder`: `<output_folder>/<stem>.zarr`, which may replace only an earlier label image.
    ValueError / ImageFileError with a one-line message naming the path otherwise.
    """
    check_label_name(label_name)
    if output_folder is None:
        labels = os.path.join(source.path, "labels")
        if os.path.exists(labels) and not os.path.isdir(labels):
            raise _fail(labels, "is not a labels group folder")
        if not _writable(labels if os.path.isdir(labels) else source.path):
            raise _fail(source.path, "the image zarr is read-only: use --output_folder to write the "
                                     "labels elsewhere")
        return os.path.join(labels, label_name)
    stem = os.path.basename(os.path.normpath(source.path))
    stem = stem[:-len(".zarr")] if stem.lower().endswith(".zarr") else stem
    target = os.path.join(output_folder, stem + ".zarr")
    if os.path.realpath(target) == os.path.realpath(source.path):
        raise _fail(target, "the label image would overwrite its own image: choose another --output_folder")
    if os.path.exists(target) and not _is_label_image(target):
        raise _fail(target, "exists and is not a label image: not replaced")
    folder = output_folder if os.path.isdir(output_folder) else os.path.dirname(os.path.abspath(output_folder))
    if not _writable(folder):
        raise _fail(output_folder, "output folder is not writable")
    return target


def _is_label_image(path):
    try:
        attributes = _open_group(path).attrs.asdict()
    except image_files.ImageFileError:
        return False
    return "image-label" in attributes.get("ome", attributes)


def _metadata_file(folder, version):
    return os.path.join(folder, "zarr.json" if version == "0.5" else ".zattrs")


def _read_labels_listing(folder, version):
    """(metadata document, listed names) of a labels group; an empty group's when it has none."""
    path = _metadata_file(folder, version)
    if not os.path.exists(path):
        document = {"zarr_format": 3, "node_type": "group", "attributes": {}} if version == "0.5" else {}
    else:
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, ValueError) as error:
            raise _fail(folder, f"unreadable labels metadata ({error})") from None
    attributes = document.setdefault("attributes", {}).setdefault("ome", {}) if version == "0.5" else document
    listing = attributes.get("labels", [])
    if not isinstance(listing, list):
        raise _fail(folder, f"labels metadata lists {listing!r}, not a list of names")
    return document, listing


def _write_labels_listing(folder, version, document, listing):
    if version == "0.5":
        # ome-zarr-py 0.18 leaves 'version' out of this group; ome-zarr-models rejects it without.
        document["attributes"]["ome"].update(version="0.5", labels=listing)
    else:
        document["labels"] = listing
        group_file = os.path.join(folder, ".zgroup")
        if not os.path.exists(group_file):
            atomic_files.write_text(group_file, json.dumps({"zarr_format": 2}))
    atomic_files.write_text(_metadata_file(folder, version), json.dumps(document, indent=2))


def write_labels(source, bands, dtype, number_classes, label_name=DEFAULT_LABEL_NAME, output_folder=None):
    """Write the mask given as full-width bands of rows, top to bottom, as an NGFF label image (a stack:
    an iterator of its planes' band iterators, in plane order).

    Inside the image zarr (`labels/<label_name>`, added to the labels listing once complete) or, with
    `output_folder`, as `<output_folder>/<stem>.zarr` pointing back at the image. Returns a
    LabelsWritten; `.replaced` says whether a label image of that name was replaced. Errors are
    ValueError / ImageFileError with one line naming the path; the bands are not consumed when the
    target is refused.
    """
    def build(staging, source_image):
        return build_label_image(staging, source, bands, dtype, number_classes, label_name, source_image)

    return place_label_image(source, build, label_name, output_folder)


def place_label_image(source, build, label_name=DEFAULT_LABEL_NAME, output_folder=None):
    """Put a label image in place atomically: `build(staging, source_image)` writes it whole into an
    empty staging folder beside its place and returns its level count (source_image: the path back to
    the image, for its metadata); it is then renamed into place and listed. Returns a LabelsWritten."""
    target = label_target(source, label_name, output_folder)
    folder, name = os.path.split(target)
    version = source.ngff_version
    if output_folder is None:
        document, listing = _read_labels_listing(folder, version)
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(_metadata_file(folder, version)):
            _write_labels_listing(folder, version, document, listing)
        source_image = "../../"
    else:
        os.makedirs(folder, exist_ok=True)
        source_image = os.path.relpath(os.path.abspath(source.path), os.path.abspath(target))
    # Runs killed mid-way left a staging folder, or the previous label parked between two renames.
    atomic_files.recover_directory(target)
    replaced = os.path.exists(target)
    with atomic_files.replacing_directory(target) as staging:
        levels = build(staging, source_image)
    if output_folder is not None:
        return LabelsWritten(target, replaced, levels)
    document, listing = _read_labels_listing(folder, version)
    if name not in listing:
        listing = listing + [name]
    _write_labels_listing(folder, version, document, listing)  # also repairs a missing version
    return LabelsWritten(target, replaced, levels, listing)
