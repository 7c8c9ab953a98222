"""export_bioimageio.py: the package passes bioimageio.core's test_model for both weight formats,
gives inference_fcdensenet.py's mask, describes the model as the tools need, and refuses bad input.

The model is a tiny untrained FC-DenseNet (one layer per block, growth 2, 8 first filters; radius 96,
so inputs are 224 + n * 32 pixels), exported once per module; the test image is a real 256x256
uint16 image of data/images. Needs requirements-bioimageio.txt (skipped without it).
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tifffile

pytest.importorskip("bioimageio.core")
pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")

from conftest import REPO_ROOT

import export_bioimageio as exporter  # noqa: E402
from fcdn.common import qc_pictures  # noqa: E402
from fcdn.data import records  # noqa: E402
from fcdn.export import bioimageio as package_export  # noqa: E402
from fcdn.model import saved_model as saved_model_api  # noqa: E402

SCRIPT = os.path.join(REPO_ROOT, "export_bioimageio.py")
DATA_IMAGES = os.path.join(REPO_ROOT, "data", "images")
TEST_IMAGE = os.path.join(DATA_IMAGES, sorted(os.listdir(DATA_IMAGES))[0])
TINY = dict(variant=None, layers_per_block=1, growth_rate=2, first_filters=8)
WEIGHT_FORMATS = ["tensorflow_saved_model_bundle", "onnx"]
# below this difference between the two class probabilities the argmax may flip between float
# computations that differ by rounding (the tools' eps, another summation order)
TIE_MARGIN = 1e-5


def export_tiny_model(path, number_channels=1, number_classes=2, seed=1, extra_metadata=None):
    import keras

    import fcdensenet

    keras.utils.set_random_seed(seed)
    model = fcdensenet.build_model(number_channels=number_channels, number_classes=number_classes, **TINY)
    saved_model_api.export_saved_model(model, path, extra_metadata=extra_metadata)
    return str(path)


def segment_array(image, predict, metadata):
    """inference_fcdensenet.py's mask of an in-memory image, in one tile."""
    try:
        from fcdn.inference.segmentation import segment_array as segment  # where the refactor on main moves it
    except ModuleNotFoundError:
        from inference_fcdensenet import segment_array as segment
    return segment(image, predict, metadata, tile_size=2048)


def export(saved_model, output, **options):
    """The package through the Python API, with keywords."""
    return package_export.export_package(saved_model, str(output), project_url="", log=lambda line: None, **options)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("models") / "gray")


@pytest.fixture(scope="module")
def package(saved_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("package")
    return export(saved_model, folder / "model.bioimageio.zip", test_image=TEST_IMAGE,
                  class_names=["background", "cell"], run_tests=False)


@pytest.fixture(scope="module")
def description(package):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    with package_export.quiet_validation():
        loaded = load_description(package, perform_io_checks=True)
    assert isinstance(loaded, v0_5.ModelDescr), loaded.validation_summary.format()
    return loaded


def real_image():
    return tifffile.imread(TEST_IMAGE)


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".tmp-" in name]


# ---------------------------------------------------------------------------------------------
# the package, through bioimageio.core

@pytest.mark.slow
@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_bioimageio_core_test_model_passes(package, weight_format, tmp_path, monkeypatch):
    from bioimageio.core import test_model

    monkeypatch.chdir(tmp_path)  # the TensorFlow backend unzips the bundle into the working directory
    with package_export.quiet_validation():
        summary = test_model(package, weight_format=weight_format)
    assert summary.status == "passed", summary.format()
    names = [detail.name for detail in summary.details if detail.status == "passed"]
    assert any(name.startswith("Reproduce test outputs") for name in names)
    assert sum(name.startswith(f"Run {weight_format} inference") for name in names) == 6  # batch 1, 2 x n 0, 1, 2


def core_probabilities(description, weight_format, image, **predict_flags):
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model

    pipeline = create_prediction_pipeline(description, weight_format=weight_format)
    try:
        sample = create_sample_for_model(description, inputs={"input": image[None, :, :, None].astype(np.float32)},
                                         sample_id="image")
        if predict_flags.get("input_block_shape"):
            output = pipeline.predict_sample_with_fixed_blocking(sample, **predict_flags)
        else:
            output = pipeline.predict_sample_without_blocking(sample, **predict_flags)
    finally:
        pipeline.unload()
    return output.members["probabilities"].data.values[0]


@pytest.mark.slow
@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_package_gives_the_inference_mask_on_one_tile(saved_model, description, weight_format, tmp_path,
                                                      monkeypatch):
    from fcdn.data import image_files

    monkeypatch.chdir(tmp_path)
    image = real_image()
    predict, metadata = saved_model_api.load_saved_model(saved_model)
    ours = segment_array(image, predict, metadata)
    reference = predict(image_files.zscore_normalize(image)[np.newaxis])[0]
    # as test_model runs it: the package's normalisation, no halo padding around the whole image
    probabilities = core_probabilities(description, weight_format, image, skip_input_padding=True,
                                       skip_output_cropping=True)
    assert probabilities.shape == (256, 256, 2)
    assert np.abs(probabilities - reference).max() < 1e-5
    mask = np.argmax(probabilities, axis=-1)
    assert 0 < ours.sum() < ours.size  # both classes occur, so the comparison means something
    margin = np.abs(reference[..., 1] - reference[..., 0])
    assert np.all((mask == ours) | (margin < TIE_MARGIN))


@pytest.mark.slow
def test_tiled_prediction_through_core_matches_away_from_the_border(saved_model, description, tmp_path,
                                                                    monkeypatch):
    """Blocks of 320 pixels (128 kept + the 96-pixel halo on both sides) give the whole-image mask
    wherever a pixel is at least the radius inside the image: the halo is the model's radius."""
    from bioimageio.core.axis import AxisId

    monkeypatch.chdir(tmp_path)
    names = sorted(os.listdir(DATA_IMAGES))[:4]
    tiles = [tifffile.imread(os.path.join(DATA_IMAGES, name)) for name in names]
    image = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
    predict, metadata = saved_model_api.load_saved_model(saved_model)
    ours = segment_array(image, predict, metadata)
    block = {"input": {AxisId("batch"): 1, AxisId("y"): 320, AxisId("x"): 320, AxisId("channel"): 1}}
    mask = np.argmax(core_probabilities(description, "tensorflow_saved_model_bundle", image,
                                        input_block_shape=block), axis=-1)
    radius = metadata["radius"]
    assert np.array_equal(mask[radius:-radius, radius:-radius], ours[radius:-radius, radius:-radius])


# ---------------------------------------------------------------------------------------------
# what the package holds

def test_description_has_the_sizes_halo_normalisation_and_names(description):
    from bioimageio.spec.model import v0_5

    (tensor,) = description.inputs
    assert [axis.id for axis in tensor.axes] == ["batch", "y", "x", "channel"]
    for axis in tensor.axes[1:3]:
        assert (axis.size.min, axis.size.step) == (2 * 96 + 32, 32)
    (normalization,) = [step for step in tensor.preprocessing if isinstance(step, v0_5.ZeroMeanUnitVarianceDescr)]
    assert list(normalization.kwargs.axes) == ["y", "x"]
    (output,) = description.outputs
    assert output.id == "probabilities"
    assert [axis.halo for axis in output.axes[1:3]] == [96, 96]
    assert [axis.size.axis_id for axis in output.axes[1:3]] == ["y", "x"]
    assert output.axes[3].channel_names == ["background", "cell"]
    assert description.weights.onnx.opset_version <= 17
    assert description.weights.onnx.parent == "tensorflow_saved_model_bundle"
    assert str(description.cite[0].doi) == "10.1109/CVPRW.2017.156"
    assert any("usnistgov" in str(entry.url) for entry in description.cite)


def test_package_files(package):
    import imageio.v3 as iio

    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        bundle = zipfile.ZipFile(io.BytesIO(archive.read("tf_saved_model.zip")))
        readme = archive.read("README.md").decode()
        cover = iio.imread(archive.read("cover.png"), extension=".png")
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
        test_output = np.load(io.BytesIO(archive.read("test_output.npy")))
    assert {"rdf.yaml", "README.md", "cover.png", "model.onnx", "tf_saved_model.zip"} <= names
    assert "saved_model.pb" in bundle.namelist() and "variables/variables.index" in bundle.namelist()
    assert "\n# Validation\n" in readme
    assert cover.shape == (256, 256, 3) and cover.dtype == np.uint8
    image = real_image()
    np.testing.assert_array_equal(test_input[0, :, :, 0], image)  # 256 = 224 + 32: kept whole
    assert test_output.shape == (1, 256, 256, 2)
    np.testing.assert_allclose(test_output.sum(axis=-1), 1.0, atol=1e-5)
    # the outlines drawn on the cover are those of the test output's mask
    mask = np.argmax(test_output[0], axis=-1)
    outline = qc_pictures.outlines(mask) & (mask > 0)
    assert outline.any() and np.all(cover[outline] == qc_pictures.class_colour(1))


def test_bundle_serves_a_dict_keyed_by_the_output_id(package, saved_model, tmp_path):
    """bioimageio.core calls keras.layers.TFSMLayer(bundle, call_endpoint="serve") and wants a dict."""
    import keras

    with zipfile.ZipFile(package) as archive:
        zipfile.ZipFile(io.BytesIO(archive.read("tf_saved_model.zip"))).extractall(tmp_path / "bundle")
    batch = np.random.default_rng(0).standard_normal((1, 64, 96, 1)).astype(np.float32)
    wrapped = keras.layers.TFSMLayer(str(tmp_path / "bundle"), call_endpoint="serve")(batch)
    original = keras.layers.TFSMLayer(saved_model, call_endpoint="serve")(batch)
    assert not isinstance(original, dict)  # why the exporter re-wraps the SavedModel
    assert list(wrapped) == ["probabilities"]
    np.testing.assert_array_equal(wrapped["probabilities"].numpy(), original.numpy())


def test_fit_to_valid_size_crops_or_pads_to_minimum_plus_steps():
    image = np.arange(100 * 700).reshape(100, 700, 1)
    fitted = package_export.fit_to_valid_size(image, minimum=224, step=32, largest=512)
    assert fitted.shape == (224, 512, 1)  # 100 -> padded to 224; 700 -> 512 = 224 + 9 * 32
    np.testing.assert_array_equal(fitted[:100, :, 0], image[:, 94:606, 0])  # centred crop
    np.testing.assert_array_equal(fitted[100:199, :, 0], image[-2::-1, 94:606, 0])  # reflected
    assert package_export.fit_to_valid_size(image, minimum=224, step=32, largest=300).shape == (224, 288, 1)


def test_tool_normalisation_equals_ours_where_std_exceeds_one():
    from fcdn.data import image_files

    image = real_image()
    np.testing.assert_allclose(package_export.tool_normalize(image), image_files.zscore_normalize(image),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_test_record_of_the_training_run_is_the_default_test_image(tmp_path):
    import lmdb

    rng = np.random.default_rng(3)
    image = rng.integers(0, 4000, (256, 256, 1)).astype(np.uint16)
    database = tmp_path / "test.lmdb"
    environment = lmdb.open(str(database), map_size=1 << 24)
    with environment.begin(write=True) as transaction:
        transaction.put(*records.make_record("image000", image, (image[..., 0] > 2000).astype(np.uint8)))
    environment.close()
    saved_model = export_tiny_model(tmp_path / "trained", extra_metadata={
        "training": {"test_database": str(database), "epoch": 3, "mean_iou": 0.5}})
    package = export(saved_model, tmp_path / "model.zip", weight_formats=["tensorflow_saved_model_bundle"],
                     run_tests=False)
    with zipfile.ZipFile(package) as archive:
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
        readme = archive.read("README.md").decode()
        assert "model.onnx" not in archive.namelist()
    np.testing.assert_array_equal(test_input[0], image)
    assert "mean_iou 0.5000" in readme


# ---------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written

def run_main(*argv):
    with pytest.raises(SystemExit) as exit_info:
        exporter.main(list(argv))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_refuses_a_saved_model_that_is_not_ours(tmp_path):
    import tensorflow as tf

    foreign = tmp_path / "foreign"
    tf.saved_model.save(tf.Module(), str(foreign))
    message = run_main("--saved_model_filepath", str(foreign), "--output", str(tmp_path / "model.zip"),
                       "--test_image", TEST_IMAGE)
    assert message.startswith(f"error: {foreign}: not an FC-DenseNet SavedModel")
    assert sorted(os.listdir(tmp_path)) == ["foreign"]


def test_refuses_an_output_that_is_not_a_package(saved_model, tmp_path):
    target = tmp_path / "notes.zip"
    target.write_text("my notes")
    message = run_main("--saved_model_filepath", saved_model, "--output", str(target), "--test_image", TEST_IMAGE)
    assert message == f"error: {target}: exists and is not a bioimage.io package; refusing to replace it"
    assert target.read_text() == "my notes" and not leftovers(tmp_path)


@pytest.mark.slow
def test_refuses_a_test_image_with_other_channels_in_one_line(saved_model, tmp_path):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((256, 256, 3), np.uint8))
    target = tmp_path / "model.zip"
    result = subprocess.run([sys.executable, SCRIPT, "--saved_model_filepath", saved_model, "--output", str(target),
                             "--test_image", str(rgb)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {rgb}: image has 3 channel(s), the model expects 1")
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["rgb.tif"]


@pytest.mark.slow
def test_a_failed_package_test_writes_nothing_and_says_so_in_one_line(saved_model, tmp_path, monkeypatch):
    def failing_tests(package, weight_formats, folder):
        raise RuntimeError("bioimageio.core test_model failed for tensorflow_saved_model_bundle: outputs differ\n"
                           "details that the user does not need")

    monkeypatch.setattr(package_export, "run_model_tests", failing_tests)
    target = tmp_path / "model.zip"
    message = run_main("--saved_model_filepath", saved_model, "--output", str(target), "--test_image", TEST_IMAGE,
                       "--weight_formats", "tensorflow_saved_model_bundle", "--project_url", "")
    assert message == (f"error: {target}: not written: bioimageio.core test_model failed for "
                       f"tensorflow_saved_model_bundle: outputs differ")
    assert os.listdir(tmp_path) == []


def test_the_script_tells_its_version(capsys):
    import fcdn

    with pytest.raises(SystemExit) as exit_info:
        exporter.parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.endswith(f" {fcdn.__version__}\n")


def test_replaces_an_existing_package(package, saved_model, tmp_path):
    target = tmp_path / "model.zip"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as copy:
        copy.writestr("rdf.yaml", source.read("rdf.yaml"))  # a package, if an incomplete one
    export(saved_model, target, test_image=TEST_IMAGE, weight_formats="tensorflow_saved_model_bundle",
           run_tests=False, name="Replaced model")
    with zipfile.ZipFile(target) as archive:
        assert "tf_saved_model.zip" in archive.namelist()
        assert "Replaced model" in archive.read("rdf.yaml").decode()
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_trainer_writes_the_package_at_the_end_of_a_run(tmp_path):
    import lmdb

    rng = np.random.default_rng(5)
    databases = {}
    for name, count in (("train", 4), ("test", 2)):
        path = tmp_path / f"{name}.lmdb"
        environment = lmdb.open(str(path), map_size=1 << 24)
        with environment.begin(write=True) as transaction:
            for index in range(count):
                image = rng.integers(0, 1000, (32, 32, 1)).astype(np.uint16)
                mask = (image[..., 0] > 500).astype(np.uint8)
                transaction.put(*records.make_record(f"image{index}", image, mask))
        environment.close()
        with open(path / records.FILENAMES_CSV, "w") as handle:
            handle.write("".join(f"image{index}.tif\n" for index in range(count)))
        databases[name] = str(path)
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train_fcdensenet.py"), "--train_database", databases["train"],
         "--test_database", databases["test"], "--output_dir", str(output_dir), "--layers_per_block", "1",
         "--growth_rate", "4", "--max_epochs", "1", "--test_every_n_steps", "2", "--batch_size", "2",
         "--seed", "1", "--export_bioimageio", "1"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bioimageio.core test_model passed" in result.stdout
    package = output_dir / "model.bioimageio.zip"
    with zipfile.ZipFile(package) as archive:
        readme = archive.read("README.md").decode()
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
    assert f"test_database: {databases['test']}" in readme
    with open(output_dir / "saved_model" / "fcdensenet_metadata.json") as handle:
        radius = json.load(handle)["radius"]
    assert test_input.shape[1:] == (2 * radius + 32, 2 * radius + 32, 1)  # a 32x32 record padded to the minimum
    assert not list(tmp_path.glob("bioimageio_unzipped*"))  # the tests ran in a scratch folder
