"""measure_objects on stacks: each plane measured as the same plane alone would be, with its plane's
index and its position along each stack axis in the rows, the summary counted plane by plane."""

import csv
import os

import numpy as np
import tifffile
import zarr

from fcdn.measure import objects, tables


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plane_masks(count, size=24):
    """`count` masks of different objects: plane k holds k + 1 squares of class 1 and one pixel of class 2."""
    masks = np.zeros((count, size, size), np.uint8)
    for plane in range(count):
        for square in range(plane + 1):
            masks[plane, 2 + 5 * square:5 + 5 * square, 2:5 + plane] = 1
        masks[plane, size - 2, size - 2 - plane] = 2
    return masks


def assert_rows_equal_the_planes(rows, masks, images=None):
    """Rows of a stack's table = the tables of its planes measured alone, in plane order."""
    expected = []
    for plane, mask in enumerate(masks):
        table = objects.measure_whole(mask, None if images is None else images[plane])
        expected += [(plane, {name: table[name][i] for name in table}) for i in range(len(table["class"]))]
    assert [int(row["object_id"]) for row in rows] == list(range(1, len(expected) + 1))
    for row, (plane, values) in zip(rows, expected, strict=True):
        assert int(row["plane"]) == plane
        for name, value in values.items():
            assert abs(float(row[name]) - float(value)) <= 1e-6 * max(1.0, abs(float(value))), name


def test_an_imagej_z_stack_is_measured_plane_by_plane_with_the_plane_in_the_rows(tmp_path):
    masks = plane_masks(3)
    os.makedirs(tmp_path / "masks")
    tifffile.imwrite(tmp_path / "masks" / "stack.tif", masks, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "unit": "um"})
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "out", log=lambda line: None) == []
    rows = read_rows(tmp_path / "out" / "stack_objects.csv")
    assert list(rows[0])[:4] == ["object_id", "plane", "z", "class"]
    assert_rows_equal_the_planes(rows, masks)
    assert [row["z"] for row in rows] == [row["plane"] for row in rows]
    assert float(rows[0]["area_um2"]) == float(rows[0]["area_pixels"]) * 0.25  # 0.5 um pixels
    summary = read_rows(tmp_path / "out" / tables.SUMMARY_FILE)
    assert [(row["plane"], row["class"], row["count"]) for row in summary] == [
        ("0", "1", "1"), ("0", "2", "1"), ("1", "1", "2"), ("1", "2", "1"), ("2", "1", "3"), ("2", "2", "1")]


def test_a_time_series_of_one_slice_names_only_the_axis_that_varies(tmp_path):
    masks = plane_masks(2)
    os.makedirs(tmp_path / "masks")
    tifffile.imwrite(tmp_path / "masks" / "movie.ome.tif", masks[:, np.newaxis], metadata={"axes": "TZYX"})
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "out", log=lambda line: None) == []
    rows = read_rows(tmp_path / "out" / "movie.ome_objects.csv")
    assert list(rows[0])[:4] == ["object_id", "plane", "t", "class"]
    assert [int(row["t"]) for row in rows] == [0, 0, 1, 1, 1]
    assert_rows_equal_the_planes(rows, masks)


def test_a_stack_image_gives_each_plane_its_own_intensities_and_a_plane_count_mismatch_is_one_line(tmp_path):
    masks = plane_masks(2)
    images = np.random.default_rng(0).integers(0, 4000, (2, 2, 24, 24)).astype(np.uint16)  # ZCYX
    for folder in ("masks", "images", "short"):
        os.makedirs(tmp_path / folder)
    tifffile.imwrite(tmp_path / "masks" / "s.tif", masks, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "images" / "s.tif", images, imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "short" / "s.tif", images[:1], imagej=True, metadata={"axes": "ZCYX"})
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "out", image_folder=tmp_path / "images",
                                 log=lambda line: None) == []
    rows = read_rows(tmp_path / "out" / "s_objects.csv")
    assert_rows_equal_the_planes(rows, masks, np.moveaxis(images, 1, -1))
    assert "intensity_mean_c1" in rows[0]
    failures = tables.measure_folder(tmp_path / "masks", tmp_path / "out2", image_folder=tmp_path / "short",
                                     log=lambda line: None)
    assert failures == [f"{tmp_path / 'short' / 's.tif'}: image has 1 planes but its mask "
                        f"{tmp_path / 'masks' / 's.tif'} has 2"]
    assert not os.path.exists(tmp_path / "out2" / "s_objects.csv")


def test_planes_read_band_by_band_give_the_table_of_planes_read_whole(tmp_path, monkeypatch):
    masks = plane_masks(3, size=40)
    masks[1, 10:30, 20] = 1  # a vertical line that crosses every band
    os.makedirs(tmp_path / "masks")
    tifffile.imwrite(tmp_path / "masks" / "z.tif", masks, imagej=True, metadata={"axes": "ZYX"}, rowsperstrip=4)
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "whole", log=lambda line: None) == []
    monkeypatch.setattr(tables, "BAND_PIXELS", 40 * 3)  # bands of 3 rows
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "bands", streaming_megapixels=1e-4,
                                 log=lambda line: None) == []
    assert read_rows(tmp_path / "bands" / "z_objects.csv") == read_rows(tmp_path / "whole" / "z_objects.csv")
    assert_rows_equal_the_planes(read_rows(tmp_path / "whole" / "z_objects.csv"), masks)


def test_an_ngff_label_image_of_a_z_stack_is_measured_plane_by_plane(tmp_path):
    masks = plane_masks(2)
    root = zarr.open_group(str(tmp_path / "masks" / "cells.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=masks, chunks=(1, 24, 24))
    axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]
    root.attrs["image-label"] = {"version": "0.4"}
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "out", log=lambda line: None) == []
    rows = read_rows(tmp_path / "out" / "cells_objects.csv")
    assert list(rows[0])[:4] == ["object_id", "plane", "z", "class"]
    assert_rows_equal_the_planes(rows, masks)
    assert float(rows[-1]["area_um2"]) == 0.25


def test_a_stack_without_objects_gets_a_table_of_its_columns_and_the_log_counts_its_planes(tmp_path):
    os.makedirs(tmp_path / "masks")
    tifffile.imwrite(tmp_path / "masks" / "empty.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": "ZYX"})
    lines = []
    assert tables.measure_folder(tmp_path / "masks", tmp_path / "out", log=lines.append) == []
    assert lines == ["empty.tif: 0 objects in 3 planes"]
    with open(tmp_path / "out" / "empty_objects.csv") as handle:
        assert handle.read().splitlines()[0].startswith("object_id,plane,z,class,")
