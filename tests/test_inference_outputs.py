"""What inference keeps besides masks: test-time augmentation, probability maps, QC overlays, pixel sizes."""

import os
import xml.etree.ElementTree

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from conftest import last_line, run_inference

from fcdn.common import qc_pictures
from fcdn.data import image_sources
from fcdn.inference import mask_writers, pipeline, segmentation
from fcdn.measure import planes


def ome_physical_size(path):
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome, path
        root = xml.etree.ElementTree.fromstring(tiff.ome_metadata)
    pixels = next(element for element in root.iter() if element.tag.endswith("Pixels"))
    return {name: pixels.attrib.get(name) for name in image_sources.OME_PHYSICAL_SIZES}


# ---------------------------------------------------------------------------------------------
# pieces, without a model

def test_overlay_built_from_bands_equals_the_whole_picture():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (3000, 1100, 1)).astype(np.uint16)
    mask = np.zeros((3000, 1100), np.uint8)
    mask[500:1500, 200:900] = 1
    mask[2000:2600, 100:300] = 2
    overlay = qc_pictures.Overlay(3000, 1100, 1)
    assert overlay.stride == 2  # 3000 rows -> at most 2048
    for start, stop in ((0, 777), (777, 1501), (1501, 3000)):  # bands that do not start on the stride
        overlay.add(start, image[start:stop], mask[start:stop])
    picture = overlay.render()
    assert picture.shape == (1500, 550, 3) and picture.dtype == np.uint8
    whole = qc_pictures.draw_outlines(qc_pictures.stretch(image[::2, ::2].astype(np.float32)), mask[::2, ::2])
    assert np.array_equal(picture, whole)
    # outlines on the boundary in each class's colour, nothing inside or in the background
    assert np.array_equal(picture[250, 300], qc_pictures.class_colour(1))  # row 500 / 2, inside columns
    assert np.array_equal(picture[1000, 75], qc_pictures.class_colour(2))
    assert not np.array_equal(qc_pictures.class_colour(1), qc_pictures.class_colour(2))
    assert np.all(picture[500, 200] == picture[500, 200][0])  # inside class 1: grey
    assert np.all(picture[50, 50] == picture[50, 50][0])


def test_stretch_maps_the_percentiles_to_black_and_white_and_three_channels_to_rgb():
    ramp = np.linspace(0, 1000, 200 * 300, dtype=np.float32).reshape(200, 300, 1)
    grey = qc_pictures.stretch(ramp)
    assert grey.shape == (200, 300, 3) and np.all(grey[..., 0] == grey[..., 2])
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255 and 100 < grey[100, 150, 0] < 155
    rgb = qc_pictures.stretch(np.concatenate([ramp, 1000 - ramp, ramp * 0 + 5], axis=2))
    assert rgb[0, 0, 0] == 0 and rgb[0, 0, 1] == 255  # each channel stretched on its own
    four = qc_pictures.stretch(np.concatenate([ramp] * 4, axis=2))
    assert np.array_equal(four, grey)  # any other count: the first channel


def test_colours_cycle_after_the_palette():
    count = len(qc_pictures.PALETTE)
    assert np.array_equal(qc_pictures.class_colour(1), qc_pictures.class_colour(count + 1))
    assert not qc_pictures.colours_cycle(count + 1) and qc_pictures.colours_cycle(count + 2)


def test_a_failing_writer_stops_the_others_and_the_producer():
    written = []

    def slow_writer(items):
        for item in items:
            written.append(item)

    def failing_writer(items):
        for index, _ in enumerate(items):
            if index == 2:
                raise OSError(28, "No space left on device")

    produced = []

    def items():
        for index in range(1000):
            produced.append(index)
            yield index, index

    with pytest.raises(OSError, match="No space left"):
        pipeline.fan_out(items(), [slow_writer, failing_writer], depth=2)
    assert len(produced) < 20  # the producer stopped soon after the failure


def test_a_producer_failure_aborts_every_consumer():
    ended = []

    def consumer(items):
        try:
            for _ in items:
                pass
        except pipeline.Aborted:
            ended.append("aborted")
            raise

    def items():
        yield 1, 1
        raise ValueError("tile could not be read")

    with pytest.raises(ValueError, match="tile could not be read"):
        pipeline.fan_out(items(), [consumer, consumer])
    assert ended == ["aborted", "aborted"]


def test_probability_paths():
    assert mask_writers.probabilities_path("out", "a.b.tif") == os.path.join("out", "a.b_probabilities.tif")
    assert mask_writers.probabilities_path("out", "x.ome.tif") == os.path.join("out", "x_probabilities.ome.tif")


# ---------------------------------------------------------------------------------------------
# with a real model

@pytest.mark.slow
def test_test_time_augmentation_averages_the_eight_views_and_stays_exact_when_tiled(gray_model, mosaic):
    _, predict, metadata = gray_model
    image = mosaic[:320, :416]  # one tile at 2048; a multiple of 32 so no padding enters the views
    averaged = segmentation.dihedral_averaged(predict)
    one_pass = segmentation.segment_array(image, averaged, metadata, 2048)
    normalised = ((image - image.mean()) / image.std()).astype(np.float32)[None, :, :, None]
    views = []
    for turns in range(4):
        for flip in (False, True):
            view = np.rot90(normalised, turns, axes=(1, 2))
            view = view[:, :, ::-1] if flip else view
            result = predict(np.ascontiguousarray(view))
            result = result[:, :, ::-1] if flip else result
            views.append(np.rot90(result, -turns, axes=(1, 2)))
    expected = np.argmax(np.mean(views, axis=0)[0], axis=-1)
    assert np.mean(one_pass == expected) > 0.9999
    plain = segmentation.segment_array(image, predict, metadata, 2048)
    assert np.mean(plain != one_pass) > 0.001  # the augmentation changes an untrained model's mask
    tiled = segmentation.segment_array(mosaic[:700, :900], averaged, metadata, 288, batch_size=3)
    whole = segmentation.segment_array(mosaic[:700, :900], averaged, metadata, 2048)
    assert np.mean(tiled == whole) >= 0.999


@pytest.mark.slow
def test_probabilities_overlays_and_pixel_sizes_through_the_script(gray_model, mosaic, tmp_path):
    model_path, predict, metadata = gray_model
    images = tmp_path / "images"
    images.mkdir()
    ome = {"PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.7, "PhysicalSizeYUnit": "µm"}
    tifffile.imwrite(images / "cells.ome.tif", mosaic[:300, :400], metadata=dict(ome, axes="YX"))
    tifffile.imwrite(images / "plain.tif", mosaic[:200, :260], resolution=(2.5, 4.0), resolutionunit="CENTIMETER")
    tifffile.imwrite(images / "fiji.tif", mosaic[:64, :96], imagej=True, resolution=(5.0, 5.0),
                     metadata={"unit": "micron", "axes": "YX"})
    # large enough to stream (above 0.5 Mpx) and to be downscaled in its overlay
    tifffile.imwrite(images / "slide.tif", mosaic[:1500, :1100].repeat(2, axis=0), tile=(256, 256),
                     compression="zlib")
    result = run_inference("--saved_model_filepath", model_path, "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "masks"), "--save_probabilities", "1",
                           "--overlay_folder", str(tmp_path / "qc"), "--streaming_megapixels", "0.5",
                           "--tile_size", "1024")
    assert result.returncode == 0, result.stderr
    masks = tmp_path / "masks"
    assert sorted(os.listdir(masks)) == ["cells.ome.tif", "cells_probabilities.ome.tif", "fiji.tif",
                                         "fiji_probabilities.tif", "plain.tif", "plain_probabilities.tif",
                                         "slide.tif", "slide_probabilities.tif"]
    assert sorted(os.listdir(tmp_path / "qc")) == ["cells.ome.png", "fiji.png", "plain.png", "slide.png"]

    for stem, mask_name in (("cells", "cells.ome.tif"), ("plain", "plain.tif"), ("slide", "slide.tif")):
        mask = tifffile.imread(masks / mask_name)
        probabilities_name = next(name for name in os.listdir(masks) if name.startswith(stem + "_"))
        with tifffile.TiffFile(masks / probabilities_name) as tiff:
            assert tiff.pages.first.compression == 8  # zlib
            probabilities = tiff.asarray()
        assert probabilities.shape == mask.shape + (2,) and probabilities.dtype == np.uint8
        assert np.all(np.abs(probabilities.astype(int).sum(axis=-1) - 255) <= 1)
        agree = np.argmax(probabilities, axis=-1) == mask
        assert np.mean(agree) > 0.999  # only near-ties can differ after quantisation
    with tifffile.TiffFile(masks / "slide_probabilities.tif") as tiff:
        assert tiff.is_bigtiff and tiff.pages.first.is_tiled  # streamed, tile by tile

    # pixel sizes: OME sizes with units, and the resolution tags of a plain TIFF
    for name in ("cells.ome.tif", "cells_probabilities.ome.tif"):
        size = ome_physical_size(masks / name)
        assert float(size["PhysicalSizeX"]) == 0.65 and float(size["PhysicalSizeY"]) == 0.7
        assert size["PhysicalSizeXUnit"] == size["PhysicalSizeYUnit"] == "µm"
    for name in ("plain.tif", "plain_probabilities.tif"):
        with tifffile.TiffFile(masks / name) as tiff:
            page = tiff.pages.first
            assert page.get_resolution() == (2.5, 4.0) and int(page.resolutionunit) == 3  # centimetre
    # an ImageJ image's unit stays with its mask: 5 pixels a micron, read back as 0.2 um pixels
    with tifffile.TiffFile(masks / "fiji.tif") as tiff:
        assert tiff.imagej_metadata["unit"] == "micron" and tiff.pages.first.get_resolution() == (5.0, 5.0)
    with planes.PlaneFile.open(str(masks / "fiji.tif"), 64.0) as mask_file:
        assert mask_file.pixel_um == pytest.approx((0.2, 0.2))

    overlay = iio.imread(tmp_path / "qc" / "slide.png")
    assert overlay.shape == (1500, 550, 3)  # 3000x1100 at a stride of 2: nothing cropped or stretched
    small = iio.imread(tmp_path / "qc" / "plain.png")
    assert small.shape == (200, 260, 3)
    mask = tifffile.imread(masks / "plain.tif")
    edge = qc_pictures.outlines(mask) & (mask == 1)
    assert edge.any() and np.all(small[edge] == qc_pictures.class_colour(1))
    assert np.all(small[~qc_pictures.outlines(mask)][:, 0] == small[~qc_pictures.outlines(mask)][:, 1])


@pytest.mark.slow
def test_output_flags_refuse_bad_combinations(rgb_model, gray_model, tmp_path):
    model_path = gray_model[0]
    images = tmp_path / "images"
    images.mkdir()
    iio.imwrite(images / "a.png", np.zeros((32, 32), np.uint8))
    tifffile.imwrite(images / "a.tif", np.zeros((32, 32), np.uint16))
    common = ["--saved_model_filepath", model_path, "--image_folder", str(images)]

    result = run_inference(*common, "--output_folder", str(tmp_path / "out"), "--overlay_folder",
                           str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == (f"error: {tmp_path / 'out'}: the overlay folder must differ from the "
                                        f"output and image folders")
    result = run_inference(*common, "--output_folder", str(tmp_path / "out"), "--overlay_folder", str(images))
    assert result.returncode != 0 and "must differ" in last_line(result.stderr)
    result = run_inference(*common, "--output_folder", str(tmp_path / "out"), "--image_format", "png",
                           "--save_probabilities", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--save_probabilities 1 needs tif images" in last_line(result.stderr)
    assert not os.path.exists(tmp_path / "out")

    # 300 classes, 10 colours: said once, at the start
    rgb_images = tmp_path / "rgb"
    rgb_images.mkdir()
    tifffile.imwrite(rgb_images / "c.tif", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
                     photometric="rgb")
    result = run_inference("--saved_model_filepath", rgb_model[0], "--image_folder", str(rgb_images),
                           "--output_folder", str(tmp_path / "rgb_out"), "--overlay_folder", str(tmp_path / "qc"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("note: 299 classes but 10 outline colours: the colours repeat") == 1
    assert iio.imread(tmp_path / "qc" / "c.png").shape == (64, 64, 3)


def refusal(paths, mask_folder=None, **options):
    """check_outputs' one line for these images and options, or None when it accepts them."""
    from fcdn.inference import runner, segmenter

    try:
        segmenter.check_outputs([str(path) for path in paths], runner.RunnerOptions(tile_size=256, **options),
                                mask_folder)
    except ValueError as error:
        return str(error)
    return None


def test_no_output_replaces_an_input_or_another_images_output(tmp_path):
    images, truth, out = tmp_path / "images", tmp_path / "truth", tmp_path / "out"
    for folder in (images, truth, images / "out"):
        folder.mkdir()
    g, gp, a, capital_a = (images / name for name in ("g.tif", "g_probabilities.tif", "a.jpg", "a.JPG"))
    assert refusal([g], truth, output_folder=truth) == (
        f"{truth}: --output_folder is the --mask_folder: what is written would replace the ground-truth masks")
    assert refusal([g], truth, output_folder=out, overlay_folder=str(truth) + "/") == (
        f"{truth}/: --overlay_folder is the --mask_folder: what is written would replace the ground-truth masks")
    # a folder named in another case is the same folder where the file system ignores case
    assert refusal([g], truth, output_folder=tmp_path / "TRUTH") == (
        f"{tmp_path / 'TRUTH' / 'g.tif'}: an output of {g} would replace the ground-truth mask {truth / 'g.tif'}")
    assert refusal([g, gp], output_folder=out, save_probabilities=True) == (
        f"{out / 'g_probabilities.tif'}: both {g} and {gp} would write it (file names are compared ignoring case)")
    assert refusal([a, capital_a], output_folder=out) == (
        f"{out / 'a.png'}: both {a} and {capital_a} would write it (file names are compared ignoring case)")
    assert refusal([g, images / "G.png"], output_folder=out, overlay_folder=tmp_path / "qc") == (
        f"{tmp_path / 'qc' / 'G.png'}: both {g} and {images / 'G.png'} would write it (file names are compared "
        f"ignoring case)")
    assert refusal([g, images / "g_objects.csv.tif"], output_folder=out, measure_objects=True) is None
    assert refusal([g, images / "G.tiff"], output_folder=out, measure_objects=True) == (
        f"{out / 'G_objects.csv'}: both {g} and {images / 'G.tiff'} would write it (file names are compared "
        f"ignoring case)")
    # an output folder inside the image folder, and its overlays beside the images' folder: nothing
    # written there is listed as an input
    assert refusal([g, gp, a], truth, output_folder=images / "out", overlay_folder=tmp_path / "qc") is None
    # a link to the image folder is the image folder
    os.symlink(images, tmp_path / "linked")
    assert refusal([g], output_folder=out, overlay_folder=tmp_path / "linked") is not None
    assert refusal([images / "x.png", images / "y.png"], output_folder=out,
                   overlay_folder=tmp_path / "linked" / "out" / "..") is not None


@pytest.mark.slow
def test_inference_refuses_outputs_onto_its_inputs_before_any_work(gray_model, tmp_path):
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    tifffile.imwrite(images / "g.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(images / "G_probabilities.TIF", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(truth / "g.tif", np.ones((32, 32), np.uint8))
    common = ["--saved_model_filepath", gray_model[0], "--image_folder", str(images)]

    result = run_inference(*common, "--output_folder", truth, "--mask_folder", truth)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == (f"error: {truth}: --output_folder is the --mask_folder: what is written "
                                        f"would replace the ground-truth masks")
    assert sorted(os.listdir(truth)) == ["g.tif"] and tifffile.imread(truth / "g.tif").max() == 1
    result = run_inference(*common, "--output_folder", tmp_path / "out", "--save_probabilities", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == (
        f"error: {tmp_path / 'out' / 'g_probabilities.tif'}: both {images / 'G_probabilities.TIF'} and "
        f"{images / 'g.tif'} would write it (file names are compared ignoring case)")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_images_with_nan_or_inf_pixels_fail_alone(gray_model, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    whole = np.ones((32, 32), np.float32)  # read whole: below --streaming_megapixels
    whole[1, 2] = np.nan
    streamed = np.ones((64, 64), np.float32)  # read by rows
    streamed[60:62, 5] = [np.inf, -np.inf]
    tifffile.imwrite(images / "a_whole.tif", whole)
    tifffile.imwrite(images / "b_good.tif", np.ones((64, 64), np.float32))
    tifffile.imwrite(images / "c_streamed.tif", streamed)
    result = run_inference("--saved_model_filepath", gray_model[0], "--image_folder", images, "--output_folder",
                           out, "--streaming_megapixels", "0.002")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    failed = result.stderr[result.stderr.index("failed images:"):].strip().splitlines()
    assert failed == ["failed images:", f"  {images / 'a_whole.tif'}: 1 pixel(s) hold NaN or Inf values",
                      f"  {images / 'c_streamed.tif'}: 2 pixel(s) hold NaN or Inf values"]
    assert sorted(os.listdir(out)) == ["b_good.tif"]


@pytest.mark.slow
def test_file_names_that_are_not_utf8_show_escaped(gray_model, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    folder = os.fsencode(images)
    tifffile.imwrite(os.fsdecode(os.path.join(folder, b"\xff.tif")), np.ones((32, 32), np.uint16))
    with open(os.path.join(folder, b"bad\xfe.tif"), "wb") as broken:
        broken.write(b"not a TIFF")
    result = run_inference("--saved_model_filepath", gray_model[0], "--image_folder", images, "--output_folder", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "\\xff.tif: 32x32, 1 tile(s)" in result.stdout
    assert f"error: {images}/bad\\xfe.tif: cannot decode" in result.stderr
    assert f"  {images}/bad\\xfe.tif: cannot decode" in result.stderr.split("failed images:")[1]
    assert os.listdir(os.fsencode(out)) == [b"\xff.tif"]


def test_shown_escapes_what_would_break_a_line():
    from fcdn.common import errors

    assert errors.shown(os.fsdecode(b"a\xff.tif")) == "a\\xff.tif"
    assert errors.shown("a\nb\r\tc\x1b.tif") == "a\\nb\\r\\tc\\x1b.tif"
    assert errors.shown("\ud800 é µm") == "\\ud800 é µm"
    assert errors.with_path(os.fsdecode(b"\xff.tif"), ValueError("bad")) == "\\xff.tif: bad"
