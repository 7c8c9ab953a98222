"""Object tables of a folder of masks: one `<stem>_objects.csv` a mask and `objects_summary.csv`.

    failures = measure_folder("runs/x/masks", "runs/x/objects", image_folder="data/images")

A mask of at least `streaming_megapixels` is read and measured band by band (banded.BandedObjects),
a smaller one whole (objects.measure_whole): the same table either way. Lengths and areas are also
given in micrometres where the mask's file carries a pixel size (units.py); perimeter and
equivalent diameter only where its pixels are square.
"""

import csv
import io
import math
import os

import numpy as np

from fcdn.common import atomic_files
from fcdn.common.errors import with_path
from fcdn.data import ome_zarr_io
from fcdn.measure import banded, objects, planes

SUMMARY_FILE = "objects_summary.csv"
TABLE_SUFFIX = "_objects.csv"
BAND_PIXELS = banded.MAX_BAND_PIXELS


def table_name(mask_name):
    return os.path.splitext(mask_name)[0] + TABLE_SUFFIX


def list_masks(folder):
    """Sorted names of the masks in `folder`: TIFF, PNG and OME-Zarr (`*.zarr`) files."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: folder does not exist")
    extensions = (".tif", ".tiff", ".png", ".zarr")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(extensions)
                   and not name.startswith("."))
    if not names:
        raise ValueError(f"{folder}: no masks (.tif, .tiff, .png or .zarr) in this folder")
    by_table = {}
    for name in names:  # case-insensitive file systems too
        by_table.setdefault(table_name(name).lower(), []).append(name)
    shared = next((same for same in by_table.values() if len(same) > 1), None)
    if shared:
        raise ValueError(f"{folder}: {' and '.join(shared)} would both be measured into {table_name(shared[0])}")
    return names


def checked_mask_rows(rows, path):
    """Mask rows as a 2-D integer array; ValueError (one line) for floats, channels or negative classes."""
    if rows.shape[2] != 1:
        raise ValueError(f"{path}: mask has {rows.shape[2]} channels; masks must be single-channel")
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{path}: mask pixel type {rows.dtype} is not an integer type (masks hold classes)")
    if rows.size and rows.min() < 0:
        raise ValueError(f"{path}: mask holds negative values (min {rows.min()}); classes must be >= 0")
    return rows[:, :, 0]


def measure_source(mask, image=None):
    """The table of one mask source (and its image source, for intensities)."""
    height, width, _ = mask.shape
    if image is not None and image.shape[:2] != (height, width):
        raise ValueError(f"{image.path}: image is {image.shape[0]}x{image.shape[1]} but its mask "
                         f"{mask.path} is {height}x{width}")
    if not (mask.streamed or (image is not None and image.streamed)):
        return objects.measure_whole(checked_mask_rows(mask.rows(0, height), mask.path),
                                     None if image is None else image.rows(0, height))
    table = banded.BandedObjects(width, 0 if image is None else image.shape[2])
    step = max(1, BAND_PIXELS // width)
    for start in range(0, height, step):
        stop = min(start + step, height)
        table.add(start, checked_mask_rows(mask.rows(start, stop), mask.path),
                  None if image is None else image.rows(start, stop))
    return table.finish()


def measure_file(path, image_path, streaming_megapixels, label_name):
    """(columns, (y, x) micrometres or None, planes) of one mask file, and its image's intensities with
    `image_path`. A stack is measured plane by plane; its rows then start with `plane` (the plane's
    index) and the index along each stack axis (`t`, `z`, ...), and object ids run over the stack."""
    with planes.PlaneFile.open(path, streaming_megapixels, label_name) as mask:
        image = planes.PlaneFile.open(image_path, streaming_megapixels) if image_path else None
        try:
            if image is not None and image.count != mask.count:
                raise ValueError(f"{image_path}: image has {image.count} planes but its mask {path} "
                                 f"has {mask.count}")
            parts = []
            for index in range(mask.count):
                columns = measure_source(mask.source(index), None if image is None else image.source(index))
                if mask.count > 1:
                    count = len(columns["area_pixels"])
                    at = dict(zip(mask.axes, mask.position(index)), plane=index)
                    columns = {name: np.full(count, at[name], np.int64) for name in ("plane", *mask.axes)} | columns
                parts.append(columns)
        finally:
            if image is not None:
                image.close()
        columns = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return columns, mask.pixel_um, mask.count


def physical_columns(columns, pixel_um):
    """The micrometre columns of a table, given the (y, x) pixel size in micrometres."""
    if pixel_um is None:
        return {}
    size_y, size_x = pixel_um
    physical = {"area_um2": columns["area_pixels"] * size_y * size_x,
                "centroid_y_um": columns["centroid_y"] * size_y, "centroid_x_um": columns["centroid_x"] * size_x}
    if math.isclose(size_y, size_x, rel_tol=1e-6):  # a length along a boundary needs square pixels
        physical.update(perimeter_um=columns["perimeter"] * size_x,
                        equivalent_diameter_um=columns["equivalent_diameter"] * size_x)
    return physical


def csv_text(header, rows):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes any name as CSV quotes
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def _cell(value):
    if isinstance(value, (float, np.floating)):
        return f"{value:.10g}"
    return int(value) if isinstance(value, np.integer) else value


def write_table(path, columns, pixel_um):
    """`<stem>_objects.csv`: object_id, a stack's plane columns, the shape columns, the micrometre
    ones, the intensities."""
    physical = physical_columns(columns, pixel_um)
    intensity = [name for name in columns if name.startswith("intensity_")]
    position = [name for name in columns if name not in objects.SHAPE_COLUMNS and name not in intensity]
    names = [*position, *objects.SHAPE_COLUMNS, *physical, *intensity]
    merged = {**columns, **physical}
    count = len(columns["area_pixels"])
    rows = [[index + 1, *(_cell(merged[name][index]) for name in names)] for index in range(count)]
    atomic_files.write_text(path, csv_text(["object_id", *names], rows))


def measure_folder(mask_folder, output_folder, *, image_folder=None, streaming_megapixels=64.0,
                   label_name=ome_zarr_io.DEFAULT_LABEL_NAME, log=print):
    """Writes every mask's table and the folder's summary; returns the failures (one line each)."""
    names = list_masks(mask_folder)
    images = match_images(names, image_folder) if image_folder is not None else {}
    os.makedirs(output_folder, exist_ok=True)
    written, failures = [], []
    for name in names:
        path = os.path.join(mask_folder, name)
        try:
            columns, pixel_um, plane_count = measure_file(path, images.get(name), streaming_megapixels, label_name)
            table_path = os.path.join(output_folder, table_name(name))
            write_table(table_path, columns, pixel_um)
        except (ValueError, OSError) as error:  # a ValueError's line already names its file
            failures.append(str(error) if isinstance(error, ValueError) else with_path(path, error))
            log(f"failed: {failures[-1]}")
            continue
        written.append(table_path)
        planes_note = f" in {plane_count} planes" if plane_count > 1 else ""
        log(f"{name}: {len(columns['area_pixels'])} objects{planes_note}")
    write_summary(os.path.join(output_folder, SUMMARY_FILE), written)
    return failures


def write_summary(path, table_paths):
    """objects_summary.csv from the object tables written: one row for each table (each plane of a
    stack's table, its index in a `plane` column) and each class found in any of them (count 0 where
    a table has none), with the total and mean area in pixels, and in micrometres² where the tables
    have them. Read back from the tables, so that the parts of a job array each rewrite it whole from
    what all of them wrote so far."""
    counted = []
    for table_path in table_paths:
        with open(table_path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), reader.fieldnames or []
        counted.append((os.path.basename(table_path)[:-len(TABLE_SUFFIX)], header, rows))
    classes = sorted({int(row["class"]) for _, _, rows in counted for row in rows})
    with_planes = any("plane" in header for _, header, _ in counted)
    with_units = any("area_um2" in header for _, header, _ in counted)
    columns = ["image", *(["plane"] if with_planes else []), "class", "count", "total_area_pixels",
               "mean_area_pixels", *(["total_area_um2", "mean_area_um2"] if with_units else [])]
    lines = []
    for name, header, rows in counted:
        by_plane = {}
        for row in rows:
            by_plane.setdefault(row.get("plane", ""), []).append(row)
        for plane, plane_rows in sorted(by_plane.items(), key=lambda item: int(item[0] or 0)) or [("", [])]:
            for value in classes:
                line = [name, *([plane] if with_planes else []), value]
                line += _summary_cells([row for row in plane_rows if int(row["class"]) == value],
                                       "area_um2" in header if with_units else None)
                lines.append(line)
    atomic_files.write_text(path, csv_text(columns, lines))


def _summary_cells(rows, known_units):
    """count, total and mean area in pixels (and in micrometres² when known_units is not None: blank
    cells where the table has none)."""
    count, total = len(rows), sum(int(row["area_pixels"]) for row in rows)
    cells = [count, total, _cell(total / count) if count else ""]
    if known_units is None:
        return cells
    if not known_units:
        return cells + ["", ""]
    area = sum(float(row["area_um2"]) for row in rows)
    return cells + [_cell(area), _cell(area / count) if count else ""]


def match_images(mask_names, image_folder):
    """The image of each mask: the file of the image folder with the same stem (any extension)."""
    if not os.path.isdir(image_folder):
        raise ValueError(f"{image_folder}: folder does not exist")
    by_stem = {}
    for image_name in os.listdir(image_folder):
        if image_name.lower().endswith((".tif", ".tiff", ".png", ".jpg", ".jpeg", ".zarr")):
            by_stem.setdefault(os.path.splitext(image_name)[0], []).append(image_name)
    matches = {}
    for name in mask_names:
        candidates = by_stem.get(os.path.splitext(name)[0], [])
        if len(candidates) > 1:
            raise ValueError(f"{image_folder}: {len(candidates)} images match the mask {name}: "
                             f"{', '.join(sorted(candidates))}")
        if not candidates:
            raise ValueError(f"{image_folder}: no image matches the mask {name} (same name, any extension)")
        matches[name] = os.path.join(image_folder, candidates[0])
    return matches
