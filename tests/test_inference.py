"""inference_fcdensenet.py: exact tiling, every pixel type and layout, output files, bad input.

The models (fixtures in conftest.py) are tiny untrained FC-DenseNets exported with
saved_model.export_saved_model, which measures their radius (96 pixels).
"""

import os

import numpy as np
import pytest
import tifffile
from conftest import last_line, run_inference

from fcdn.data import image_files, image_sources
from fcdn.inference import mask_writers, segmentation, tiling
from fcdn.inference import runner as inference_runner

# ---------------------------------------------------------------------------------------------
# tiling geometry (no model)

@pytest.mark.parametrize("radius", [0, 40, 96, 128])
def test_axis_tilings_keep_every_pixel_once_with_full_context(radius):
    margin = tiling.round_up(radius, 32)
    for length in [1, 31, 32, 33, 70, 100, 333, 383, 384, 385, 517, 1000, 1100, 1500, 4097]:
        padded = tiling.round_up(length, 32)
        tilings = tiling.axis_tilings(length, radius)
        assert tilings[0] == (1, padded)
        assert [tile for _, tile in tilings] == sorted({tile for _, tile in tilings}, reverse=True)
        for count, tile in tilings:
            windows = tiling.axis_windows(length, tile, radius)
            assert len(windows) == count and tile % 32 == 0
            assert windows[0].keep_start == 0 and windows[-1].keep_stop == length
            for before, after in zip(windows, windows[1:]):
                assert before.keep_stop == after.keep_start  # no gap, no overlap
            for window in windows:
                assert window.keep_start < window.keep_stop
                assert window.origin % 32 == 0 and 0 <= window.origin and window.origin + tile <= padded
                if window.keep_start > 0:
                    assert window.keep_start - window.origin >= margin
                if window.keep_stop < length:
                    assert window.origin + tile - window.keep_stop >= margin
            if count > 1:
                # the shortest tile for that count: 32 pixels less and `count` tiles no longer cover
                assert count * (tile - 32 - 2 * margin) + 2 * margin < padded


@pytest.mark.parametrize("shape", [(100, 70), (333, 517), (1500, 1100), (31, 2049)])
def test_tile_grid_writes_every_pixel_exactly_once(shape):
    grid = tiling.tile_grid(*shape, 384, 96)
    written = np.zeros(shape, np.int32)
    for row in grid.rows:
        for y, x in row:
            written[y.keep_start:y.keep_stop, x.keep_start:x.keep_stop] += 1
            assert y.origin + grid.tile_shape[0] <= grid.padded_shape[0]
            assert x.origin + grid.tile_shape[1] <= grid.padded_shape[1]
    assert np.all(written == 1)
    assert grid.tile_shape[0] * grid.tile_shape[1] <= 384 * 384
    assert 0 < grid.kept_share() <= 1


def square_tiles_computed_pixels(height, width, tile_size, radius):
    """Pixels computed by the fewest square-bounded tiles per axis (each side at most tile_size)."""
    computed = 1
    for length in (height, width):
        count, tile = next((count, tile) for count, tile in tiling.axis_tilings(length, radius)
                           if tile <= tile_size)
        computed *= count * tile
    return computed


@pytest.mark.parametrize("shape", [(4096, 4096), (2500, 2500), (3000, 1000), (16384, 16384), (700, 9000)])
def test_tile_grid_computes_no_more_than_square_tiles_within_the_same_area(shape):
    grid = tiling.tile_grid(*shape, 2048, 96)
    computed = grid.tile_count * grid.tile_shape[0] * grid.tile_shape[1]
    assert grid.tile_shape[0] * grid.tile_shape[1] <= 2048 * 2048
    assert computed <= square_tiles_computed_pixels(*shape, 2048, 96)
    assert grid.kept_share() == pytest.approx(shape[0] * shape[1] / computed)


def test_tile_grid_uses_rectangles_where_they_compute_less():
    # 4096 rows: 2 tiles of (4096 + 2 * 96) / 2 = 2144; 3 tiles of (4096 + 4 * 96) / 3 -> 1504
    grid = tiling.tile_grid(4096, 4096, 2048, 96)
    assert sorted(grid.tile_shape) == [1504, 2144] and grid.tile_count == 6
    assert square_tiles_computed_pixels(4096, 4096, 2048, 96) == 9 * 1504 * 1504
    # a 3000x1000 image fits one tile of 3008x1024 pixels (fewer than 2048 x 2048): one pass
    assert tiling.tile_grid(3000, 1000, 2048, 96).tile_count == 1


def test_tile_size_rules():
    assert tiling.check_tile_size(0, 96) == 2048
    assert tiling.check_tile_size(0, 1120) == 4 * 1120
    assert tiling.check_tile_size(288, 96) == 288  # the zone (96) is the radius: allowed
    with pytest.raises(ValueError, match="at least 288"):
        tiling.check_tile_size(256, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiling.check_tile_size(300, 96)
    # library callers that skip check_tile_size: no tiling of a 4096 image fits 192x192 with margin 96
    with pytest.raises(ValueError, match="too small for radius 96"):
        tiling.tile_grid(4096, 4096, 192, 96)


def test_a_forward_pass_holds_at_most_tile_size_squared_pixels():
    assert tiling.tiles_per_batch(0, (512, 512), 2048) == 16
    assert tiling.tiles_per_batch(0, (1504, 2144), 2048) == 1
    # a smaller --tile_size lowers the memory of a pass: smaller tiles do not come back in bigger batches
    assert tiling.tiles_per_batch(0, (1024, 1024), 1024) == 1
    assert tiling.tiles_per_batch(0, (480, 672), 1024) == 3
    assert tiling.tiles_per_batch(5, (1024, 1024), 1024) == 5  # an explicit --batch_size wins


def test_an_automatic_batch_on_the_cpu_holds_one_256_pixel_tile():
    cpu = tiling.automatic_batch_pixels("openvino", ["CPU"])
    assert cpu == tiling.automatic_batch_pixels("tensorflow", ["/job:localhost/replica:0/task:0/device:CPU:0"])
    assert tiling.tiles_per_batch(0, (256, 256), 2048, cpu) == 1
    assert tiling.tiles_per_batch(0, (64, 64), 2048, cpu) == 16  # tiny tiles still share a pass
    assert tiling.tiles_per_batch(0, (1504, 2144), 2048, cpu) == 1
    gpu = tiling.automatic_batch_pixels("tensorflow", ["/job:localhost/replica:0/task:0/device:GPU:0"])
    assert tiling.tiles_per_batch(0, (256, 256), 2048, gpu) == 64  # a GPU's budget: tile_size squared


def test_mask_dtype_and_output_names():
    def mask_dtype(number_classes):  # the mask holds classes up to number_classes - 1
        return image_files.mask_dtype(number_classes - 1)

    assert mask_dtype(2) == np.uint8 and mask_dtype(256) == np.uint8
    assert mask_dtype(257) == np.uint16 and mask_dtype(65536) == np.uint16
    assert mask_dtype(65537) == np.int32
    assert mask_writers.output_path("out", "a.b.tif") == os.path.join("out", "a.b.tif")
    assert mask_writers.output_path("out", "x.PNG") == os.path.join("out", "x.PNG")
    assert mask_writers.output_path("out", "photo.JPG") == os.path.join("out", "photo.png")  # lossless


# ---------------------------------------------------------------------------------------------
# segmentation with a real SavedModel (in process)

@pytest.mark.slow
def test_tiled_equals_one_pass_for_two_tile_sizes(gray_model, mosaic):
    _, predict, metadata = gray_model
    assert metadata["radius"] == 96
    whole = segmentation.segment_array(mosaic, predict, metadata, tile_size=1504)
    assert whole.shape == mosaic.shape and whole.dtype == np.uint8
    assert 0.05 < whole.mean() < 0.95  # the untrained model still draws both classes
    for tile_size in (288, 512):  # 288: the zone is exactly the radius, the reference's minimum
        grid = tiling.tile_grid(*mosaic.shape, tile_size, 96)
        assert grid.tile_count > 4
        assert (tile_size == 288) == (grid.tile_shape[0] == grid.tile_shape[1])  # 512: rectangles
        tiled = segmentation.segment_array(mosaic, predict, metadata, tile_size, batch_size=3)
        assert np.mean(tiled == whole) >= 0.999
    # the same tiles without context disagree: the comparison above would catch a wrong margin
    blind = segmentation.segment_array(mosaic, predict, dict(metadata, radius=0), 288, batch_size=3)
    assert np.mean(blind == whole) < 0.999


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_pixel_types_and_odd_sizes(gray_model, mosaic, dtype):
    _, predict, metadata = gray_model
    crop = mosaic[:333, :517]
    image = {
        np.uint8: lambda: (crop // 64).astype(np.uint8),
        np.uint16: lambda: crop,
        np.int32: lambda: crop.astype(np.int32) - 30000,  # negative pixels are valid int32
        np.float32: lambda: crop.astype(np.float32) * 0.01 + 5,
    }[dtype]()
    assert image.dtype == dtype and crop.max() // 64 <= 255
    mask = segmentation.segment_array(image, predict, metadata, tile_size=288, batch_size=2)
    assert mask.shape == (333, 517) and mask.dtype == np.uint8
    if dtype == np.uint8:  # 8-bit quantisation changes the image: compare with the same values
        reference = segmentation.segment_array(image.astype(np.float32), predict, metadata, 288)
        assert np.array_equal(mask, reference)
    else:  # z-scoring makes the mask independent of an affine change of the pixel values
        reference = segmentation.segment_array(crop, predict, metadata, 288)
        assert np.mean(mask == reference) > 0.999


@pytest.mark.slow
def test_hwc_image_with_a_three_channel_model(rgb_model, mosaic):
    _, predict, metadata = rgb_model
    image = np.stack([mosaic[:333, :517], mosaic[333:666, :517], mosaic[666:999, :517]], axis=-1)
    whole = segmentation.segment_array(image, predict, metadata, tile_size=544)
    assert whole.shape == (333, 517) and whole.dtype == np.uint16  # 300 classes
    assert 255 < whole.max() < 300
    tiled = segmentation.segment_array(image, predict, metadata, tile_size=288, batch_size=4)
    assert np.mean(tiled == whole) >= 0.999


# ---------------------------------------------------------------------------------------------
# the script, as a user runs it

def write_folder(folder, mosaic):
    os.makedirs(folder)
    images = {
        "small_u8.tif": (mosaic[:100, :70] // 256).astype(np.uint8),
        "odd_i32.tif": mosaic[:333, :517].astype(np.int32),
        "wide_f32.tif": mosaic[:40, :1030].astype(np.float32),
        "whole.tif": mosaic[:700, :500],
    }
    for name, image in images.items():
        tifffile.imwrite(os.path.join(folder, name), image)
    # a tiled, compressed layout, streamed segment by segment
    tifffile.imwrite(os.path.join(folder, "slide.tif"), mosaic[:700, :500], tile=(128, 128), compression="zlib")
    tifffile.imwrite(os.path.join(folder, "rgb.tif"), np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with open(os.path.join(folder, "corrupt.tif"), "wb") as handle:
        handle.write(b"II*\x00 this is not a tiff")
    return images


@pytest.mark.slow
def test_script_segments_a_folder_and_reports_bad_images(gray_model, mosaic, tmp_path):
    model_path, predict, metadata = gray_model
    images = write_folder(str(tmp_path / "images"), mosaic)
    output = tmp_path / "masks"
    output.mkdir()
    (output / "whole.tif").write_bytes(b"stale mask from an earlier run")

    # 0.3 megapixels: slide.tif and whole.tif (0.35) are streamed, the others read whole
    result = run_inference("--saved_model_filepath", model_path, "--image_folder", str(tmp_path / "images"),
                           "--output_folder", str(output), "--image_format", ".tif", "--tile_size", "288",
                           "--streaming_megapixels", "0.3")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "rgb.tif: image has 3 channel(s), the model expects 1" in result.stderr
    assert "corrupt.tif: cannot decode" in result.stderr
    assert "done: 5 image(s) segmented, 2 failed" in result.stdout
    assert "odd_i32.tif: 333x517" in result.stdout
    assert sorted(os.listdir(output)) == sorted([*images, "slide.tif"])  # no temporary files left

    for name, image in images.items():
        mask = tifffile.imread(str(output / name))
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        expected = segmentation.segment_array(image, predict, metadata, 288)
        assert np.mean(mask == expected) > 0.9999, name
    with tifffile.TiffFile(str(output / "slide.tif")) as tiff:
        page = tiff.pages.first
        assert tiff.is_bigtiff and page.is_tiled and page.compression == 8  # zlib / deflate
        assert np.array_equal(page.asarray(), tifffile.imread(str(output / "whole.tif")))
    with tifffile.TiffFile(str(output / "odd_i32.tif")) as tiff:
        assert tiff.pages.first.compression == 8 and not tiff.is_bigtiff


@pytest.mark.slow
def test_streamed_tiff_with_rectangular_tiles_equals_the_in_memory_mask(gray_model, mosaic, tmp_path):
    _, predict, metadata = gray_model
    image = mosaic[:700, :1100]
    grid = tiling.tile_grid(*image.shape, 512, 96)
    assert grid.tile_shape[0] != grid.tile_shape[1] and len(grid.rows) > 1
    path = str(tmp_path / "slide.tif")
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    settings = inference_runner.RunnerOptions(tile_size=512, output_folder=str(tmp_path), batch_size=4,
                                              streaming_megapixels=0.1)
    source = image_sources.open_source(path, settings.streaming_megapixels)
    assert isinstance(source, image_sources.TiffSource)  # read band by band, not whole
    source.close()
    inference_runner.segment_file(path, predict, metadata, settings)  # replaces slide.tif
    streamed = tifffile.imread(path)
    assert np.array_equal(streamed, segmentation.segment_array(image, predict, metadata, 512, batch_size=4))


@pytest.mark.slow
def test_png_images_give_png_masks(gray_model, mosaic, tmp_path):
    import imageio.v3 as iio

    model_path, predict, metadata = gray_model
    folder = tmp_path / "pngs"
    folder.mkdir()
    iio.imwrite(str(folder / "eight.png"), (mosaic[:90, :130] // 256).astype(np.uint8))
    iio.imwrite(str(folder / "sixteen.png"), mosaic[:45, :61])
    iio.imwrite(str(folder / "ignored.jpg"), np.zeros((32, 32), np.uint8))
    result = run_inference("--saved_model_filepath", model_path, "--image_folder", str(folder),
                           "--output_folder", str(tmp_path / "out"), "--image_format", "png")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["eight.png", "sixteen.png"]
    mask = iio.imread(str(tmp_path / "out" / "sixteen.png"))
    assert mask.shape == (45, 61) and mask.dtype == np.uint8
    expected = segmentation.segment_array(mosaic[:45, :61], predict, metadata, 2048)
    assert np.array_equal(mask, expected)


@pytest.mark.slow
def test_bad_saved_model_and_folders(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    common = ["--output_folder", str(tmp_path / "out")]

    result = run_inference("--saved_model_filepath", str(tmp_path / "missing"), "--image_folder", str(images), *common)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {images}: no .tif images" in result.stderr  # the folder is checked first

    tifffile.imwrite(str(images / "a.tif"), np.zeros((32, 32), np.uint16))
    (images / "b.png").write_bytes(b"")
    result = run_inference("--saved_model_filepath", str(tmp_path / "missing"), "--image_folder", str(images), *common)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: SavedModel folder does not exist"

    result = run_inference("--saved_model_filepath", str(tmp_path / "missing"), "--image_folder", str(images),
                           "--image_format", "jpg", *common)
    assert result.returncode != 0 and f"error: {images}: no .jpg images" in result.stderr

    result = run_inference("--saved_model_filepath", str(images), "--image_folder", str(images), *common)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith(f"error: {images}: not an FC-DenseNet SavedModel")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_tile_size_checked_against_the_model(gray_model, tmp_path):
    model_path, _, _ = gray_model
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(str(images / "a.tif"), np.zeros((32, 32), np.uint16))
    result = run_inference("--saved_model_filepath", model_path, "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "out"), "--tile_size", "256")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == "error: --tile_size 256 is too small for the model's radius 96: use at least 288"
