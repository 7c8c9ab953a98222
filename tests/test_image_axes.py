"""Images read by their axes: real files written by tifffile (ImageJ hyperstacks, OME-TIFF, tifffile's
own metadata, pyramids, several series), and the flag that settles a file without axes metadata."""

import numpy as np
import pytest
import tifffile

from fcdn.data import image_axes, image_files


def stack_values(*shape):
    return np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)


def layout_of(path, **options):
    with image_axes.TiffStack(str(path), **options) as stack:
        return stack.layout, stack.read(), stack.simple


@pytest.mark.parametrize("axes, shape, planes, keys, mask_axes", [
    ("ZYX", (3, 32, 32), 3, ["_z0", "_z1", "_z2"], "ZYX"),
    ("TYX", (3, 32, 32), 3, ["_t0", "_t1", "_t2"], "TYX"),
    ("TZCYX", (2, 3, 2, 32, 32), 6, ["_t0_z0", "_t0_z1", "_t0_z2", "_t1_z0"], "TZYX"),
])
def test_imagej_hyperstacks_are_stacks_of_planes(tmp_path, axes, shape, planes, keys, mask_axes):
    values = stack_values(*shape)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, values, imagej=True, metadata={"axes": axes})
    layout, array, simple = layout_of(path)
    assert (layout.axes, layout.planes, layout.mask_axes, simple) == (axes, planes, mask_axes, False)
    assert [layout.plane_key(index) for index in range(len(keys))] == keys
    assert (layout.height, layout.width) == (32, 32)
    channels = shape[2] if "C" in axes else 1
    assert layout.plane(array, 1).shape == (32, 32, channels)
    expected = values.reshape(-1, *shape[-3:])[1] if "C" in axes else values.reshape(-1, 32, 32)[1]
    np.testing.assert_array_equal(layout.plane(array, 1), np.moveaxis(expected, 0, -1) if "C" in axes
                                  else expected[:, :, np.newaxis])


def test_a_channel_first_ome_tiff_is_one_multichannel_image(tmp_path):
    values = stack_values(2, 32, 40)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, values, ome=True, metadata={"axes": "CYX"})
    layout, array, _ = layout_of(path)
    assert (layout.axes, layout.planes, layout.channels, layout.plain) == ("CYX", 1, 2, False)
    image = image_files.read_image(str(path))  # every reader of 2-D images sees it channels last
    np.testing.assert_array_equal(image, np.moveaxis(values, 0, -1))


def test_ome_tiff_zyx_planes_read_by_rows_from_the_zarr_store(tmp_path):
    values = stack_values(3, 32, 32)
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, values, ome=True, metadata={"axes": "ZYX"}, tile=(16, 16))
    with image_axes.TiffStack(str(path)) as stack:
        band = stack.layout.plane(stack.array(), 2, slice(5, 9))
    np.testing.assert_array_equal(band[:, :, 0], values[2, 5:9])


def test_files_without_axes_keep_the_rule_of_2d_images(tmp_path):
    hwc = stack_values(32, 32, 5)
    tifffile.imwrite(tmp_path / "hwc.tif", hwc, photometric="minisblack")
    layout, _, simple = layout_of(tmp_path / "hwc.tif")
    assert (layout.axes, layout.channels, simple) == ("YXC", 5, True)
    np.testing.assert_array_equal(image_files.read_image(str(tmp_path / "hwc.tif")), hwc)


def test_channel_axis_settles_a_file_without_metadata(tmp_path):
    values = stack_values(3, 32, 32)
    path = tmp_path / "unknown.tif"
    tifffile.imwrite(path, values, photometric="minisblack")  # tifffile names the first axis Q
    layout, array, _ = layout_of(path, channel_axis="none")
    assert (layout.axes, layout.planes, layout.plane_key(2)) == ("QYX", 3, "_q2")
    layout, array, _ = layout_of(path, channel_axis=0)
    assert (layout.axes, layout.planes, layout.channels) == ("CYX", 1, 3)
    np.testing.assert_array_equal(layout.plane(array, 0), np.moveaxis(values, 0, -1))
    with pytest.raises(image_files.ImageFileError, match="outside the image's 3 axes"):
        layout_of(path, channel_axis=3)
    assert image_axes.parse_channel_axis(" -1 ") == -1
    with pytest.raises(ValueError, match="--channel_axis 'first'"):
        image_axes.parse_channel_axis("first")


def test_channel_axis_overrides_wrong_metadata(tmp_path):
    path = tmp_path / "wrong.tif"
    tifffile.imwrite(path, stack_values(2, 32, 32), imagej=True, metadata={"axes": "ZYX"})  # in truth 2 channels
    layout, _, _ = layout_of(path, channel_axis=0)
    assert (layout.axes, layout.planes, layout.channels) == ("CYX", 1, 2)


def test_multi_series_and_pyramids_read_one_series_at_full_resolution(tmp_path):
    path = tmp_path / "multi.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(stack_values(32, 32))
        writer.write(stack_values(3, 16, 16) + 7, photometric="minisblack", metadata={"axes": "ZYX"})
    layout, array, simple = layout_of(path)
    assert (layout.axes, layout.planes, simple) == ("YX", 1, False)
    layout, array, _ = layout_of(path, series=1)
    assert (layout.axes, layout.planes) == ("ZYX", 3)
    np.testing.assert_array_equal(layout.plane(array, 1)[:, :, 0], stack_values(3, 16, 16)[1] + 7)
    with pytest.raises(image_files.ImageFileError, match="--series 2: the file holds 2 series"):
        layout_of(path, series=2)
    pyramid = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid, ome=True) as writer:
        writer.write(stack_values(64, 64), subifds=1, metadata={"axes": "YX"}, tile=(16, 16))
        writer.write(stack_values(32, 32), subfiletype=1, tile=(16, 16))
    layout, array, simple = layout_of(pyramid)
    assert (layout.shape, simple) == ((64, 64), False)
    np.testing.assert_array_equal(array, stack_values(64, 64))


def test_read_image_refuses_a_stack_naming_its_axes(tmp_path):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, stack_values(3, 32, 32), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(image_files.ImageFileError, match=r"z.tif: a stack of 3 planes \(ZYX 3x32x32\)"):
        image_files.read_image(str(path))


def test_a_file_that_is_no_tiff_cannot_be_decoded(tmp_path):
    path = tmp_path / "corrupt.tif"
    path.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(image_files.ImageFileError, match="corrupt.tif: cannot decode"):
        image_files.read_image(str(path))
