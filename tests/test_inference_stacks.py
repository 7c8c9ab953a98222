"""Inference on stacks (z-stacks, time series, channel-first, multi-series and pyramidal TIFFs): each
plane segmented as its own 2-D image, the outputs written with the image's axes less C.

The fast tests run the real runner, tiling and writers with a small numpy model whose answer depends
on each plane's own normalisation; one slow test runs the script with an exported model."""

import os

import numpy as np
import pytest
import tifffile
from conftest import run_inference

from fcdn.inference import runner

METADATA = {"number_channels": 1, "number_classes": 2, "radius": 16, "size_factor": 32}


class BrightModel:
    """Class 1 where the z-scored first channel is above 0.3 (so a plane's own mean and std matter);
    it records the batch sizes it was given."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(len(batch))
        bright = 1.0 / (1.0 + np.exp(-4.0 * (np.asarray(batch)[..., :1] - 0.3)))
        return np.concatenate([1 - bright, bright], axis=-1).astype(np.float32)


def segment(paths, output_folder, model=None, metadata=METADATA, **options):
    options = runner.RunnerOptions(**dict(dict(tile_size=96, output_folder=output_folder and str(output_folder)),
                                          **options))
    if output_folder is not None:
        os.makedirs(output_folder, exist_ok=True)
    if options.overlay_folder:
        os.makedirs(options.overlay_folder, exist_ok=True)
    return list(runner.segment_images([str(path) for path in paths], model or BrightModel(), metadata, options))


def planes_values(shape, seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    # planes of different brightness: a stack-wide normalisation would give other masks
    scale = np.arange(1, int(np.prod(shape[:-2])) + 1).reshape(shape[:-2] + (1, 1))
    return (rng.integers(0, 1000, shape) * scale).astype(dtype)


@pytest.mark.parametrize("streaming_megapixels, height, width", [(64, 40, 48), (0.001, 130, 150)])
def test_an_imagej_hyperstack_mask_equals_its_planes_segmented_one_by_one(tmp_path, streaming_megapixels,
                                                                          height, width):
    values = planes_values((2, 3, height, width))
    images, planes = tmp_path / "images", tmp_path / "planes"
    images.mkdir()
    planes.mkdir()
    tifffile.imwrite(images / "cells.tif", values, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TZYX", "spacing": 0.5, "unit": "um"})
    for t in range(2):
        for z in range(3):
            tifffile.imwrite(planes / f"cells_t{t}_z{z}.tif", values[t, z])
    options = dict(streaming_megapixels=streaming_megapixels, save_probabilities=True,
                   overlay_folder=str(tmp_path / "qc"))
    [result] = segment([images / "cells.tif"], tmp_path / "out", **options)
    assert result.error is None and (result.height, result.width, result.planes) == (height, width, 6)
    one_by_one = segment(sorted(planes.iterdir()), tmp_path / "one", streaming_megapixels=streaming_megapixels)
    assert all(plane.error is None for plane in one_by_one)
    with tifffile.TiffFile(tmp_path / "out" / "cells.tif") as mask:
        series = mask.series[0]
        assert (series.kind, series.axes, series.shape) == ("imagej", "TZYX", (2, 3, height, width))
        assert mask.imagej_metadata["spacing"] == 0.5 and mask.imagej_metadata["unit"] == "um"
        assert mask.pages.first.get_resolution() == (2.0, 2.0)
        stack = series.asarray()
    for t in range(2):
        for z in range(3):
            np.testing.assert_array_equal(stack[t, z], tifffile.imread(tmp_path / "one" / f"cells_t{t}_z{z}.tif"))
    assert 0 < stack.mean() < 1  # both classes found
    with tifffile.TiffFile(tmp_path / "out" / "cells_probabilities.tif") as probabilities:
        assert (probabilities.series[0].axes, probabilities.series[0].shape) == ("TZYXS", (2, 3, height, width, 2))
    assert os.listdir(tmp_path / "qc") == ["cells.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["cells.tif", "cells_probabilities.tif"]


def test_planes_of_one_stack_share_batches_as_small_files_do(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", planes_values((5, 32, 32)), imagej=True, metadata={"axes": "ZYX"})
    model = BrightModel()
    [result] = segment([tmp_path / "z.tif"], tmp_path / "out", model, tile_size=128, batch_size=4)
    assert result.error is None and result.tiles == 5
    assert model.batches == [4, 1]


def test_a_channel_first_ome_tiff_keeps_its_ome_axes_and_pixel_size(tmp_path):
    values = planes_values((2, 3, 2, 32, 32))  # T, Z, C
    tifffile.imwrite(tmp_path / "c.ome.tif", values, ome=True,
                     metadata={"axes": "TZCYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    metadata = dict(METADATA, number_channels=2)
    [result] = segment([tmp_path / "c.ome.tif"], tmp_path / "out", metadata=metadata)
    assert result.error is None and result.planes == 6
    with tifffile.TiffFile(tmp_path / "out" / "c.ome.tif") as mask:
        assert (mask.series[0].axes, mask.series[0].shape) == ("TZYX", (2, 3, 32, 32))
        assert 'PhysicalSizeX="0.25"' in mask.ome_metadata
    [two_d] = segment([tmp_path / "c.ome.tif"], tmp_path / "wrong", metadata=METADATA)
    assert "image has 2 channel(s), the model expects 1" in str(two_d.error)


def test_another_series_and_a_pyramid_full_resolution(tmp_path):
    with tifffile.TiffWriter(tmp_path / "multi.tif") as writer:
        writer.write(planes_values((32, 32)))
        writer.write(planes_values((3, 40, 40), seed=1), photometric="minisblack", metadata={"axes": "ZYX"})
    [result] = segment([tmp_path / "multi.tif"], tmp_path / "out", series=1)
    assert result.error is None and result.planes == 3
    assert tifffile.imread(tmp_path / "out" / "multi.tif").shape == (3, 40, 40)
    with tifffile.TiffWriter(tmp_path / "pyramid.ome.tif", ome=True) as writer:
        writer.write(planes_values((3, 64, 64)), subifds=1, metadata={"axes": "ZYX"}, tile=(32, 32))
        writer.write(planes_values((3, 32, 32)), subfiletype=1, tile=(32, 32))
    [result] = segment([tmp_path / "pyramid.ome.tif"], tmp_path / "out", streaming_megapixels=0.001)
    assert result.error is None and (result.height, result.planes) == (64, 3)
    with tifffile.TiffFile(tmp_path / "out" / "pyramid.ome.tif") as mask:
        assert (mask.series[0].axes, mask.series[0].shape) == ("ZYX", (3, 64, 64))


def test_channel_axis_none_makes_a_file_without_axes_a_stack(tmp_path):
    tifffile.imwrite(tmp_path / "q.tif", planes_values((3, 32, 32)), photometric="minisblack")
    [as_read] = segment([tmp_path / "q.tif"], tmp_path / "out")  # HWC: 3 rows of 32 pixels of 32 channels
    assert "image has 32 channel(s), the model expects 1" in str(as_read.error)
    [result] = segment([tmp_path / "q.tif"], tmp_path / "out", channel_axis="none")
    assert result.error is None and result.planes == 3
    with tifffile.TiffFile(tmp_path / "out" / "q.tif") as mask:
        assert (mask.series[0].axes, mask.series[0].shape) == ("QYX", (3, 32, 32))


@pytest.mark.parametrize("streaming_megapixels", [64, 0.001])
def test_a_bad_plane_fails_its_stack_alone_and_leaves_no_file(tmp_path, streaming_megapixels):
    values = planes_values((4, 32, 32), dtype=np.float32)
    values[2, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "a.tif", values, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "b.tif", values[:2], imagej=True, metadata={"axes": "ZYX"})
    results = segment([tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "out", save_probabilities=True,
                      streaming_megapixels=streaming_megapixels)
    assert [os.path.basename(result.path) for result in results] == ["a.tif", "b.tif"]
    assert "1 pixel(s) hold NaN or Inf values" in str(results[0].error) and results[1].error is None
    assert sorted(os.listdir(tmp_path / "out")) == ["b.tif", "b_probabilities.tif"]


def test_object_tables_of_a_stack_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", planes_values((2, 32, 32)), imagej=True, metadata={"axes": "ZYX"})
    [result] = segment([tmp_path / "z.tif"], tmp_path / "out", measure_objects=True)
    assert "--measure_objects 1 measures 2-D images; this is a stack of 2 planes" in str(result.error)
    assert "measure its mask with measure_objects.py" in str(result.error)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_the_script_segments_and_scores_a_z_stack(gray_model, tmp_path):
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    tifffile.imwrite(images / "z.tif", planes_values((3, 32, 32)), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(images / "q.tif", planes_values((2, 32, 32)), photometric="minisblack")
    tifffile.imwrite(truth / "z.tif", np.zeros((3, 32, 32), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(truth / "q.tif", np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    result = run_inference("--saved_model_filepath", gray_model[0], "--image_folder", images, "--output_folder",
                           tmp_path / "out", "--mask_folder", truth, "--channel_axis", "none")
    assert result.returncode == 0, result.stderr
    assert "z.tif: 32x32 x 3 planes, 3 tile(s)" in result.stdout
    assert "done: 2 image(s) segmented, 0 failed" in result.stdout
    assert "scores against the ground truth: pixel accuracy" in result.stdout
    assert tifffile.imread(tmp_path / "out" / "z.tif").shape == (3, 32, 32)


def test_an_ome_zarr_tczyx_stack_gets_a_tzyx_label_image_of_its_planes(tmp_path):
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV05()  # labels of both NGFF versions share the writing of a stack

    def write(path, data, axes):
        group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
        write_image(data, group, axes=axes, fmt=fmt, scale_factors=(2,),
                    storage_options={"chunks": tuple(32 if name in "yx" else 1 for name in axes)})

    values = planes_values((1, 1, 2, 64, 48))
    write(tmp_path / "volume.zarr", values, "tczyx")
    for z in range(2):
        write(tmp_path / f"plane{z}.zarr", values[0, 0, z], "yx")
    [result] = segment([tmp_path / "volume.zarr"], None)
    assert result.error is None and result.planes == 2
    one_by_one = segment([tmp_path / f"plane{z}.zarr" for z in range(2)], None)
    assert all(plane.error is None for plane in one_by_one)
    label = zarr.open_group(str(tmp_path / "volume.zarr" / "labels" / "fcdensenet"), mode="r")
    assert label["0"].shape == (1, 2, 64, 48) and label["1"].shape == (1, 2, 32, 24)
    for z in range(2):
        plane = zarr.open_array(str(tmp_path / f"plane{z}.zarr" / "labels" / "fcdensenet" / "0"), mode="r")[:]
        np.testing.assert_array_equal(label["0"][0, z], plane)
        np.testing.assert_array_equal(label["1"][0, z], plane[::2, ::2])
    attributes = label.attrs.asdict()
    axes = attributes.get("ome", attributes)["multiscales"][0]["axes"]
    assert [axis["name"] for axis in axes] == ["t", "z", "y", "x"]
