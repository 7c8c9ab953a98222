"""A mask's pixel size in micrometres, from whatever its file says, or None.

Read from, in this order: OME PhysicalSizeX/Y (an OME-TIFF; micrometres when no unit is given, as
the OME schema says), the TIFF resolution tags with an inch or centimetre ResolutionUnit, an
ImageJ TIFF's `unit` (its resolution tags then count pixels per that unit), and for an OME-Zarr
label image the scale of its full-resolution level on y and x with those axes' units. A PNG, or a
TIFF whose resolution has no unit, has none.
"""

import math

MICROMETRES = {
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "in": 25400.0, "inch": 25400.0,
}
TIFF_RESOLUTION_UNITS = {2: "inch", 3: "cm"}


def micrometres(value, unit):
    """`value` in `unit`, in micrometres; None for an unknown unit or a value that is not a positive number."""
    factor = MICROMETRES.get(str(unit).strip().lower()) if unit is not None else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if factor is None or not math.isfinite(value) or value <= 0:
        return None
    return value * factor


def from_tiff(pixel_size):
    """(y, x) micrometres from an image_sources.PixelSize, or None."""
    if pixel_size is None:
        return None
    if pixel_size.ome and "PhysicalSizeX" in pixel_size.ome and "PhysicalSizeY" in pixel_size.ome:
        ome = pixel_size.ome
        sizes = (micrometres(ome["PhysicalSizeY"], ome.get("PhysicalSizeYUnit", "µm")),
                 micrometres(ome["PhysicalSizeX"], ome.get("PhysicalSizeXUnit", "µm")))
        return sizes if None not in sizes else None
    unit = TIFF_RESOLUTION_UNITS.get(pixel_size.resolution_unit) or pixel_size.imagej_unit
    if pixel_size.resolution is None or unit is None:
        return None
    x_per_unit, y_per_unit = pixel_size.resolution
    if not (x_per_unit and y_per_unit):
        return None
    sizes = (micrometres(1 / y_per_unit, unit), micrometres(1 / x_per_unit, unit))
    return sizes if None not in sizes else None


def from_zarr(source):
    """(y, x) micrometres of a ome_zarr_io.ZarrSource's full-resolution level, or None."""
    names = [name for name in source.axis_names if name != "c"]
    scale = [1.0] * len(names)
    for transforms in (source.levels[0].transforms, source.global_transforms or []):
        for transform in transforms:
            if transform.get("type") == "scale":
                scale = [factor * value for factor, value in zip(scale, transform["scale"])]
    units = {axis.get("name"): axis.get("unit") for axis in source.axes if isinstance(axis, dict)}
    sizes = tuple(micrometres(scale[names.index(axis)], units.get(axis)) for axis in ("y", "x"))
    return sizes if None not in sizes else None
