"""measure_objects.py: object tables by hand on small masks, streamed equal to whole, physical units
from each kind of metadata, and bad input."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from conftest import REPO_ROOT, last_line

from fcdn.measure import banded, objects, tables

SCRIPT = os.path.join(REPO_ROOT, "measure_objects.py")


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def banded_table(mask, image=None, band=1):
    table = banded.BandedObjects(mask.shape[1], 0 if image is None else image.shape[2])
    for start in range(0, mask.shape[0], band):
        table.add(start, mask[start:start + band], None if image is None else image[start:start + band])
    return table.finish()


def assert_same_table(expected, actual):
    assert list(expected) == list(actual)
    for name in expected:
        np.testing.assert_allclose(np.asarray(actual[name], float), np.asarray(expected[name], float),
                                   rtol=1e-9, atol=1e-9, err_msg=name)


def test_every_column_of_a_rectangle_and_a_diagonal_line_by_hand():
    mask = np.zeros((8, 9), np.uint8)
    mask[1:4, 2:6] = 1                        # a 3x4 rectangle of class 1
    mask[5, 0] = mask[6, 1] = mask[7, 2] = 2  # a diagonal line of class 2: one object (8-connected)
    image = np.arange(72, dtype=np.uint16).reshape(8, 9, 1)
    for table in (objects.measure_whole(mask, image), banded_table(mask, image, band=2)):
        assert list(table["class"]) == [1, 2]
        assert list(table["area_pixels"]) == [12, 3]
        assert table["centroid_y"][0] == 2.0 and table["centroid_x"][0] == 3.5
        assert table["centroid_y"][1] == 6.0 and table["centroid_x"][1] == 1.0
        assert [table[f"bbox_{side}"][0] for side in ("min_y", "min_x", "max_y", "max_x")] == [1, 2, 4, 6]
        assert [table[f"bbox_{side}"][1] for side in ("min_y", "min_x", "max_y", "max_x")] == [5, 0, 8, 3]
        # every boundary pixel of a rectangle carries 1; of a diagonal line only the middle carries sqrt 2
        assert table["perimeter"][0] == pytest.approx(10.0)
        assert table["perimeter"][1] == pytest.approx(math.sqrt(2))
        assert table["equivalent_diameter"][0] == pytest.approx(math.sqrt(4 * 12 / math.pi))
        # a 3x4 block: variances (3**2 - 1) / 12 and (4**2 - 1) / 12 along y and x
        assert table["eccentricity"][0] == pytest.approx(math.sqrt(1 - (8 / 12) / (15 / 12)))
        assert table["eccentricity"][1] == pytest.approx(1.0)  # a line
        values = image[1:4, 2:6, 0]
        assert table["intensity_mean_c0"][0] == pytest.approx(values.mean())
        assert (table["intensity_min_c0"][0], table["intensity_max_c0"][0]) == (values.min(), values.max())


def test_classes_that_touch_are_separate_objects_and_one_pixel_has_eccentricity_zero():
    mask = np.array([[1, 1, 2, 2],
                     [0, 0, 0, 0],
                     [3, 0, 0, 1]], np.uint8)
    table = objects.measure_whole(mask)
    assert list(table["class"]) == [1, 2, 3, 1]
    assert list(table["area_pixels"]) == [2, 2, 1, 1]
    assert table["eccentricity"][2] == 0.0
    assert_same_table(table, banded_table(mask, band=1))


def spiral(size):
    """A one-pixel-wide square spiral: one object that crosses every row many times."""
    mask = np.zeros((size, size), np.uint8)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        mask[top, left:right + 1] = mask[top:bottom + 1, right] = 1
        mask[bottom, left:right + 1] = 1
        mask[top + 2:bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top - 1, left] = 1  # the step into the next turn
    return mask


@pytest.mark.parametrize("band", [1, 2, 3, 4, 7, 16])
def test_streamed_tables_equal_the_whole_mask_table(band):
    rng = np.random.default_rng(band)
    cases = [spiral(31)]
    crossing = np.zeros((20, 12), np.uint8)
    crossing[:, 5] = 1          # a column through every band
    crossing[:, 8:10] = 2
    cases.append(crossing)
    diagonal = np.zeros((12, 12), np.uint8)
    for row in range(12):
        diagonal[row, row] = 1  # touches only diagonally across every seam
        diagonal[row, 11 - row] = 3
    cases.append(diagonal)
    line = np.zeros((10, 15), np.uint8)
    line[band % 10, :] = 1      # a one-pixel-wide line on a band boundary
    line[(band - 1) % 10, 3] = 1
    cases.append(line)
    for _ in range(6):
        cases.append((rng.random((23, 17)) < 0.5) * rng.integers(1, 4, (23, 17)).astype(np.uint8))
    for mask in cases:
        image = rng.normal(100, 20, mask.shape + (2,)).astype(np.float32)
        assert_same_table(objects.measure_whole(mask, image), banded_table(mask, image, band))


@pytest.mark.slow
def test_the_script_streams_a_large_mask_with_the_same_table(tmp_path):
    rng = np.random.default_rng(0)
    mask = (rng.random((300, 200)) < 0.45).astype(np.uint8) * rng.integers(1, 3, (300, 200)).astype(np.uint8)
    image = rng.integers(0, 4000, (300, 200)).astype(np.uint16)
    for folder in ("masks", "images"):
        (tmp_path / folder).mkdir()
    tifffile.imwrite(tmp_path / "masks" / "a b$%{.tif", mask, rowsperstrip=16)
    tifffile.imwrite(tmp_path / "images" / "a b$%{.tif", image)
    outputs = []
    for megapixels in (1000, 0.01):  # whole, then band by band (3 bands of 2**22 // 200 rows... one band here)
        output = tmp_path / f"out-{megapixels}"
        result = run_script("--mask_folder", tmp_path / "masks", "--image_folder", tmp_path / "images",
                            "--output_folder", output, "--streaming_megapixels", megapixels)
        assert result.returncode == 0, result.stderr
        outputs.append(read_rows(output / "a b$%{_objects.csv"))
    assert outputs[0] == outputs[1]
    whole = objects.measure_whole(mask, image[:, :, None])
    assert len(outputs[0]) == len(whole["area_pixels"])
    assert [int(row["area_pixels"]) for row in outputs[0]] == list(whole["area_pixels"])
    summary = read_rows(tmp_path / "out-0.01" / "objects_summary.csv")
    assert [(row["image"], row["class"]) for row in summary] == [("a b$%{", "1"), ("a b$%{", "2")]
    for row in summary:
        areas = whole["area_pixels"][whole["class"] == int(row["class"])]
        assert (int(row["count"]), int(row["total_area_pixels"])) == (len(areas), areas.sum())


def test_banded_objects_use_bands_of_many_rows_too(monkeypatch):
    monkeypatch.setattr(banded, "MAX_BAND_PIXELS", 64)  # cut a 40-row band into bands of 4 rows
    mask = spiral(16)
    table = banded.BandedObjects(16)
    table.add(0, mask)
    assert_same_table(objects.measure_whole(mask), table.finish())


def square_mask():
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:8] = 1
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resolution_cm", "imagej_micron", "ome_nm", "ngff_micrometer"])
def test_micrometre_columns_from_each_kind_of_metadata(tmp_path, kind):
    folder = tmp_path / "masks"
    folder.mkdir()
    mask = square_mask()
    if kind == "resolution_cm":  # 2000 pixels a centimetre: 5 micrometres a pixel
        tifffile.imwrite(folder / "m.tif", mask, resolution=(2000, 2000), resolutionunit="CENTIMETER")
    elif kind == "imagej_micron":
        tifffile.imwrite(folder / "m.tif", mask, imagej=True, resolution=(0.2, 0.2), metadata={"unit": "micron"})
    elif kind == "ome_nm":
        tifffile.imwrite(folder / "m.ome.tif", mask,
                         metadata={"axes": "YX", "PhysicalSizeX": 5000.0, "PhysicalSizeXUnit": "nm",
                                   "PhysicalSizeY": 5000.0, "PhysicalSizeYUnit": "nm"})
    else:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image

        group = zarr.open_group(str(folder / "m.zarr"), mode="w", zarr_format=2)
        write_image(mask, group, axes="yx", fmt=FormatV04(), scale_factors=(), scale={"y": 5.0, "x": 5.0},
                    axes_units={"y": "micrometer", "x": "micrometer"})
    result = run_script("--mask_folder", folder, "--output_folder", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    (table_file,) = [name for name in os.listdir(tmp_path / "out") if name.endswith("_objects.csv")]
    (row,) = read_rows(tmp_path / "out" / table_file)
    assert float(row["area_um2"]) == pytest.approx(20 * 25)
    assert float(row["perimeter_um"]) == pytest.approx(14 * 5)
    assert float(row["centroid_x_um"]) == pytest.approx(5.0 * 5)
    summary = read_rows(tmp_path / "out" / "objects_summary.csv")
    assert float(summary[0]["total_area_um2"]) == pytest.approx(500)


@pytest.mark.slow
def test_a_mask_without_a_pixel_size_has_no_micrometre_columns(tmp_path):
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "m.tif", square_mask())
    assert run_script("--mask_folder", tmp_path / "masks", "--output_folder", tmp_path / "out").returncode == 0
    (row,) = read_rows(tmp_path / "out" / "m_objects.csv")
    assert "area_um2" not in row and row["area_pixels"] == "20"


@pytest.mark.slow
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    masks, images, empty = tmp_path / "masks", tmp_path / "images", tmp_path / "empty"
    for folder in (masks, images, empty):
        folder.mkdir()
    tifffile.imwrite(masks / "float.tif", square_mask().astype(np.float32))
    tifffile.imwrite(masks / "good.tif", square_mask())
    tifffile.imwrite(images / "float.tif", np.zeros((20, 30), np.uint16))
    tifffile.imwrite(images / "good.tif", np.zeros((21, 30), np.uint16))

    result = run_script("--mask_folder", empty, "--output_folder", tmp_path / "out")
    assert result.returncode == 1
    assert last_line(result.stderr) == f"error: {empty}: no masks (.tif, .tiff, .png or .zarr) in this folder"

    result = run_script("--mask_folder", masks, "--image_folder", images, "--output_folder", tmp_path / "out")
    assert result.returncode == 1
    assert f"failed: {masks / 'float.tif'}: mask pixel type float32 is not an integer type" in result.stdout
    assert f"failed: {images / 'good.tif'}: image is 21x30 but its mask {masks / 'good.tif'} is 20x30" \
        in result.stdout
    assert not os.path.exists(tmp_path / "out" / "float_objects.csv")
    assert read_rows(tmp_path / "out" / "objects_summary.csv") == []


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    import measure_objects

    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "good.tif", square_mask())
    (tmp_path / "taken").write_text("a file where the output folder should go")
    with pytest.raises(SystemExit) as stopped:
        measure_objects.main(["--mask_folder", str(tmp_path / "masks"), "--output_folder",
                              str(tmp_path / "taken" / "out")])
    message = str(stopped.value.code)
    assert message.startswith(f"error: {tmp_path / 'taken'}") and "Error: Not a directory" in message, message
    assert "\n" not in message


def test_masks_are_listed_and_matched_to_images_by_stem(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.tif", "a.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="2 images match the mask a.tif: a.png, a.tif"):
        tables.match_images(["a.tif"], str(tmp_path / "images"))
    with pytest.raises(ValueError, match="no image matches the mask b.tif"):
        tables.match_images(["b.tif"], str(tmp_path / "images"))


@pytest.mark.slow
def test_inference_measures_the_masks_it_writes_as_the_script_measures_them(gray_model, mosaic, tmp_path):
    from conftest import run_inference

    path, _, _ = gray_model
    images = tmp_path / "images"
    images.mkdir()
    for index, (top, left) in enumerate([(0, 0), (400, 300), (900, 600)]):
        tifffile.imwrite(images / f"image{index}.tif", mosaic[top:top + 600, left:left + 500],
                         resolution=(1e4 / 0.65, 1e4 / 0.65), resolutionunit="CENTIMETER")
    output = tmp_path / "masks"
    segmented = run_inference("--saved_model_filepath", path, "--image_folder", images, "--output_folder", output,
                              "--measure_objects", "1", "--tile_size", "288")  # several tiles an image
    assert segmented.returncode == 0, segmented.stderr
    measured = run_script("--mask_folder", output, "--image_folder", images, "--output_folder", tmp_path / "tables")
    assert measured.returncode == 0, measured.stderr
    for index in range(3):
        during = read_rows(output / f"image{index}_objects.csv")
        after = read_rows(tmp_path / "tables" / f"image{index}_objects.csv")
        assert len(during) == len(after) > 0 and list(during[0]) == list(after[0])
        assert "area_um2" in during[0] and "intensity_mean_c0" in during[0]
        for row_during, row_after in zip(during, after):
            for name, value in row_during.items():
                assert float(value) == pytest.approx(float(row_after[name]), rel=1e-8), name
    assert read_rows(output / "objects_summary.csv") == read_rows(tmp_path / "tables" / "objects_summary.csv")

    # a missing table makes its image one to do again
    os.remove(output / "image1_objects.csv")
    again = run_inference("--saved_model_filepath", path, "--image_folder", images, "--output_folder", output,
                          "--measure_objects", "1", "--skip_existing", "1")
    assert again.returncode == 0, again.stderr
    assert "skipping 2 image(s) whose outputs exist" in again.stdout
    assert os.path.isfile(output / "image1_objects.csv")
