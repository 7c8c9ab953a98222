import json

import numpy as np
import pytest

import augment
from augment import AugmentationConfig, AugmentationParameters


@pytest.fixture(params=augment.BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def example():
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 20.0, size=(32, 32, 2)).astype(np.float32)
    mask = rng.choice(np.array([0, 3, 5], dtype=np.uint8), size=(32, 32))
    return image, mask


def test_identity_parameters_return_input_unchanged(example):
    image, mask = example
    out_image, out_mask = augment.apply_parameters(image, mask, AugmentationParameters(), None)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image.dtype == np.float32 and out_mask.dtype == np.uint8


def test_augment_image_without_flags_returns_its_input():
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    mask = (image % 3).astype(np.uint8)
    out_image, out_mask = augment.augment_image(image, mask)
    assert out_image is image and out_mask is mask


@pytest.mark.parametrize("angle,turns", [(90, 1), (180, 2), (270, 3), (-90, 3), (450, 1)])
def test_quarter_turns_match_rot90(example, angle, turns, backend):
    image, mask = example
    parameters = AugmentationParameters(angle=angle)
    out_image, out_mask = augment.apply_parameters(image, mask, parameters, None, backend)
    np.testing.assert_array_equal(out_image, np.rot90(image, turns))
    np.testing.assert_array_equal(out_mask, np.rot90(mask, turns))


@pytest.mark.parametrize("reflect_x,reflect_y,axes", [(True, False, (1,)), (False, True, (0,)),
                                                      (True, True, (0, 1))])
def test_reflections_match_flip(example, reflect_x, reflect_y, axes, backend):
    image, mask = example
    parameters = AugmentationParameters(reflect_x=reflect_x, reflect_y=reflect_y)
    out_image, out_mask = augment.apply_parameters(image, mask, parameters, None, backend)
    np.testing.assert_array_equal(out_image, np.flip(image, axes))
    np.testing.assert_array_equal(out_mask, np.flip(mask, axes))


def test_turn_and_reflection_compose_on_a_non_square_image(backend):
    rng = np.random.default_rng(1)
    image = rng.random((32, 64, 1), dtype=np.float32)
    mask = rng.integers(0, 4, size=(32, 64)).astype(np.uint8)
    # a half turn followed by a left-right reflection is an up-down flip
    parameters = AugmentationParameters(angle=180, reflect_x=True)
    out_image, out_mask = augment.apply_parameters(image, mask, parameters, None, backend)
    np.testing.assert_array_equal(out_image, np.flip(image, 0))
    np.testing.assert_array_equal(out_mask, np.flip(mask, 0))


def test_translation_moves_whole_pixels_and_reflects_at_the_border(example, backend):
    image, mask = example
    parameters = AugmentationParameters(translate_x=3, translate_y=-2)
    out_image, out_mask = augment.apply_parameters(image, mask, parameters, None, backend)
    np.testing.assert_array_equal(out_image[:-2, 3:], image[2:, :-3])
    np.testing.assert_array_equal(out_mask[:-2, 3:], mask[2:, :-3])
    # reflect padding mirrors about the edge pixel: output column 0 shows input column 3
    np.testing.assert_array_equal(out_mask[:-2, 0], mask[2:, 3])


def test_numpy_nearest_path_matches_the_compiled_one(example):
    _, mask = example
    parameters = AugmentationParameters(angle=90, reflect_x=True, translate_x=5)
    matrix = augment.inverse_matrix(parameters, *mask.shape)
    # reflection first, then the turn, then the shift (the forward order of inverse_matrix)
    expected = np.rot90(np.flip(mask, 1))[:, :-5]
    np.testing.assert_array_equal(augment._nearest_warp_numpy(mask, matrix)[:, 5:], expected)
    np.testing.assert_array_equal(augment.warp_mask(mask, matrix)[:, 5:], expected)


@pytest.mark.parametrize("dtype,classes", [(np.uint8, [0, 3, 5]), (np.int32, [0, 7, 2 ** 30])])
def test_mask_keeps_its_dtype_and_only_input_classes(dtype, classes, backend):
    rng = np.random.default_rng(3)
    image = rng.random((64, 64, 1), dtype=np.float32)
    mask = rng.choice(np.array(classes, dtype=dtype), size=(64, 64))
    config = AugmentationConfig()
    for _ in range(10):
        out_image, out_mask = augment.augment(image, mask, config, rng, backend)
        assert out_mask.dtype == dtype and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= set(classes)
        assert out_image.dtype == np.float32 and out_image.shape == image.shape


def test_augment_image_keeps_a_2d_image_2d():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 4000, size=(64, 32)).astype(np.uint16)
    out_image, out_mask = augment.augment_image(image, None, rotation_flag=True, reflection_flag=True,
                                                noise_augmentation_severity=0.02, rng=rng)
    assert out_image.shape == (64, 32) and out_image.dtype == np.float32 and out_mask is None


def test_same_generator_state_gives_the_same_augmentation(example):
    image, mask = example
    first = augment.augment(image, mask, AugmentationConfig(), np.random.default_rng(11))
    second = augment.augment(image, mask, AugmentationConfig(), np.random.default_rng(11))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_parameter_distributions_cover_the_reference_ranges():
    config = AugmentationConfig(intensity_severity=0.05)
    rng = np.random.default_rng(0)
    draws = [augment.draw_parameters(config, (200, 100, 1), rng) for _ in range(4000)]

    def values(name):
        return np.array([getattr(d, name) for d in draws], dtype=np.float64)

    for name in ("reflect_x", "reflect_y"):
        assert 0.45 < values(name).mean() < 0.55
    angle = values("angle")
    assert angle.min() >= 0 and angle.max() < 360 and angle.min() < 5 and angle.max() > 355
    translate_x, translate_y = values("translate_x"), values("translate_y")
    assert np.all(translate_x == np.round(translate_x))
    assert np.abs(translate_x).max() == 9 and np.abs(translate_y).max() == 19  # int(0.1 * size * u)
    assert (translate_x < 0).any() and (translate_x > 0).any()
    for name in ("scale_x", "scale_y"):
        scale = values(name)
        assert scale.min() >= 0.9 and scale.max() <= 1.1 and scale.min() < 0.91 and scale.max() > 1.09
    noise = values("noise_fraction")
    assert noise.min() >= -0.02 and noise.max() <= 0.02 and noise.min() < -0.019 and noise.max() > 0.019
    blur = values("blur_sigma")
    assert blur.min() >= -2 and blur.max() <= 2 and 0.45 < (blur > 0).mean() < 0.55
    intensity = values("intensity_fraction")
    assert np.abs(intensity).max() <= 0.05 and np.abs(intensity).max() > 0.049
    assert (intensity < 0).any() and (intensity > 0).any()


def test_disabled_augmentations_draw_identity():
    config = AugmentationConfig(reflection=False, rotation=False, jitter_severity=0, noise_severity=0,
                                scale_severity=0, blur_max_sigma=0, intensity_severity=0)
    parameters = augment.draw_parameters(config, (32, 32), np.random.default_rng(0))
    assert parameters == AugmentationParameters()


def test_noise_scales_with_the_dynamic_range():
    image = np.zeros((256, 256, 1), dtype=np.float32)
    image[0, 0, 0] = 1000.0  # dynamic range 1000
    parameters = AugmentationParameters(noise_fraction=-0.01)
    out_image, _ = augment.apply_parameters(image, None, parameters, np.random.default_rng(0))
    assert abs(float(np.std(out_image[1:])) - 10.0) < 0.5


def test_config_defaults_are_the_reference_settings():
    assert AugmentationConfig().to_dict() == {
        "reflection": True, "rotation": True, "jitter_severity": 0.1, "noise_severity": 0.02,
        "scale_severity": 0.1, "blur_max_sigma": 2.0, "intensity_severity": 0.0,
    }


def test_config_from_json_round_trip(tmp_path):
    path = tmp_path / "augmentation.json"
    path.write_text(json.dumps({"rotation": False, "blur_max_sigma": 1, "intensity_severity": 0.05}))
    config = AugmentationConfig.from_json(path)
    assert config.rotation is False and config.blur_max_sigma == 1 and config.intensity_severity == 0.05
    assert config.reflection is True  # absent keys keep their defaults
    assert AugmentationConfig(**config.to_dict()) == config


@pytest.mark.parametrize("content,words", [
    ('{"rotations": true}', ["rotations", "unknown"]),
    ('{"rotation": 1}', ["rotation", "true or false"]),
    ('{"noise_severity": "0.1"}', ["noise_severity", "number"]),
    ('{"jitter_severity": -0.1}', ["jitter_severity", ">= 0"]),
    ('{"scale_severity": 1.5}', ["scale_severity"]),
    ('[1, 2]', ["JSON object"]),
    ('{"rotation": tru', ["not valid JSON"]),
])
def test_config_from_json_errors_name_the_file_and_key(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        AugmentationConfig.from_json(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_config_from_json_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="absent.json: cannot read"):
        AugmentationConfig.from_json(path)


@pytest.mark.skipif("opencv" not in augment.BACKENDS, reason="OpenCV is not installed")
def test_opencv_backend_agrees_with_scikit_image():
    rng = np.random.default_rng(5)
    image = rng.normal(500, 100, size=(64, 64, 5)).astype(np.float32)  # more channels than one call takes
    parameters = AugmentationParameters(angle=33, translate_x=4, scale_x=1.07, scale_y=0.95, blur_sigma=1.3)
    fast, _ = augment.apply_parameters(image, None, parameters, None, "opencv")
    slow, _ = augment.apply_parameters(image, None, parameters, None, "scikit-image")
    assert fast.shape == slow.shape and fast.dtype == np.float32
    # OpenCV interpolates in 1/32-pixel steps; compare to the image's spread
    assert np.abs(fast - slow).max() < 0.05 * 100


def test_unknown_backend_is_rejected(example):
    image, mask = example
    with pytest.raises(ValueError, match="backend"):
        augment.apply_parameters(image, mask, AugmentationParameters(), None, "pillow")
