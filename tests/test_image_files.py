import numpy as np
import pytest
import tifffile

from fcdn.data import image_files


def test_zscore_divides_only_where_std_exceeds_one():
    image = np.stack([np.arange(64, dtype=np.float32).reshape(8, 8) * 10,
                      np.full((8, 8), 7.0, np.float32)], axis=-1)
    image[0, 0, 1] = 8.0  # std well below 1: only the mean is removed
    normalized = image_files.zscore_normalize(image)
    assert normalized.dtype == np.float32
    assert np.allclose(normalized[..., 0].mean(), 0, atol=1e-5) and np.isclose(normalized[..., 0].std(), 1)
    assert np.allclose(normalized[..., 1], image[..., 1] - image[..., 1].mean())


def test_given_statistics_are_used():
    image = np.full((4, 4), 10.0)
    assert np.allclose(image_files.zscore_normalize(image, mean=[4.0], std=[3.0]), 2.0)


@pytest.mark.parametrize("dtype, expected", [(np.bool_, np.uint8), (np.int8, np.int32), (np.int16, np.int32),
                                             (np.float16, np.float32), (np.float64, np.float32),
                                             (np.uint16, np.uint16)])
def test_lossless_conversions(dtype, expected):
    converted = image_files.as_supported_image(np.ones((2, 2), dtype), "x.tif")
    assert converted.dtype == expected and np.all(converted == 1)


def test_unsafe_conversion_names_the_file():
    with pytest.raises(image_files.ImageFileError, match="big.tif: pixel type uint32"):
        image_files.as_supported_image(np.array([[2**32 - 1]], np.uint32), "big.tif")


def test_read_image_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"not a tiff at all")
    with pytest.raises(image_files.ImageFileError, match="corrupt.tif: cannot decode"):
        image_files.read_image(str(corrupt))
    with pytest.raises(image_files.ImageFileError, match="missing.png: file does not exist"):
        image_files.read_image(str(tmp_path / "missing.png"))


def test_list_images_matches_the_extension_case_insensitively(tmp_path):
    for name in ("b.TIF", "a.tif", "c.png", "d.tiff"):
        tifffile.imwrite(tmp_path / name, np.zeros((2, 2), np.uint8))
    assert image_files.list_images(str(tmp_path), ".tif") == ["a.tif", "b.TIF"]
    with pytest.raises(ValueError, match="bmp"):
        image_files.normalize_extension("bmp")
