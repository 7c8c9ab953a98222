"""--precision int8: an NNCF-quantized OpenVINO model whose masks agree with float32's, its cache keyed by
the calibration, its gate, and the refusals.

The models are conftest's tiny FC-DenseNet (one layer per block, growth 2). For the int8 path, its
random features get a classifier fitted by least squares to the real masks of 8 of data/'s images
(a linear probe, in a second), so that its classes follow the cells as a trained model's do rather
than sit at near ties everywhere; the bare random one fails the gate. Calibration runs on 16 tiles
(and 4 held out) of the repository's real images, so each quantization takes seconds.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import tifffile
from conftest import DATA_IMAGES, REPO_ROOT, TINY

import inference_fcdensenet as inference
from fcdn.inference import engines, int8, openvino_cache
from fcdn.inference.segmenter import Segmenter

CALIBRATION = dict(calibration_tiles=16)
NAMES = sorted(os.listdir(DATA_IMAGES))
IMAGE = os.path.join(DATA_IMAGES, NAMES[-1])  # not among the 20 calibration images chosen from the 100


@pytest.fixture(scope="module")
def probed_model(tmp_path_factory):
    """The tiny gray 2-class model with its classifier fitted to the masks of 8 real images."""
    import keras

    import fcdensenet
    from fcdn.data import image_files
    from fcdn.model import saved_model

    keras.utils.set_random_seed(1)
    model = fcdensenet.build_model(number_channels=1, number_classes=2, **TINY)
    images = np.stack([image_files.zscore_normalize(tifffile.imread(os.path.join(DATA_IMAGES, name)))
                       for name in NAMES[60:68]])
    foreground = np.stack([tifffile.imread(os.path.join(DATA_IMAGES, "..", "masks", name)) > 0
                           for name in NAMES[60:68]]).reshape(-1)
    logits = model.get_layer(fcdensenet.LOGITS_LAYER)
    features = np.asarray(keras.Model(model.input, logits.input)(images)).reshape(-1, logits.input.shape[-1])
    design = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    weights = np.linalg.lstsq(design, np.where(foreground, 1.0, -1.0), rcond=None)[0].astype(np.float32)
    logits.set_weights([np.stack([-weights[:-1], weights[:-1]], axis=-1)[np.newaxis, np.newaxis],
                        np.array([-weights[-1], weights[-1]], np.float32)])
    path = str(tmp_path_factory.mktemp("int8") / "probed")
    saved_model.export_saved_model(model, path, radius=96)  # the radius plays no part here: skip its probe
    return path


def segment(model, folder, lines, **keywords):
    segmenter = Segmenter(model, log=lines.append, **keywords)
    results = segmenter.segment_files([IMAGE], folder)
    assert results[0].error is None, results[0].failure
    return segmenter, tifffile.imread(os.path.join(folder, os.path.basename(IMAGE)))


def int8_entries():
    root = os.path.join(openvino_cache.cache_root(), openvino_cache.CACHE_FOLDER)
    entries = {}
    for key in os.listdir(root):
        with open(os.path.join(root, key, openvino_cache.RECORD_NAME)) as handle:
            record = json.load(handle)
        if record["precision"] == "int8" or "gate" in record:
            entries[key] = record
    return entries


@pytest.mark.slow
def test_int8_masks_agree_with_float32s_on_a_real_image(probed_model, tmp_path):
    lines = []
    segmenter, quantized = segment(probed_model, str(tmp_path / "int8"), lines, precision="int8",
                                   calibration_folder=DATA_IMAGES, **CALIBRATION)
    assert segmenter.engine == "openvino" and segmenter.precision == "int8"
    gate = [line for line in lines if line.startswith("int8: masks agree with float32's on ")]
    assert len(gate) == 1 and "in 4 held-out tiles (gate 99.5%; calibrated on 16 tiles of" in gate[0], lines
    assert lines[-2].endswith("; engine openvino int8"), lines
    _, exact = segment(probed_model, str(tmp_path / "float32"), [], engine="openvino")
    agreement = float(np.mean(quantized == exact))
    print(f"int8 masks agree with float32's on {agreement:.4%} of {IMAGE}; {gate[0]}")
    assert agreement >= int8.GATE
    assert 0.01 < float(np.mean(exact)) < 0.99  # both classes present: the agreement is not a constant's
    (record,) = [record for record in int8_entries().values() if record.get("calibration") == DATA_IMAGES
                and record.get("source") == probed_model]
    assert record["passed"] and record["agreement"] >= int8.GATE and record["held_out_tiles"] == 4


@pytest.mark.slow
def test_int8_cache_is_keyed_by_the_calibration(probed_model, tmp_path, monkeypatch):
    import nncf

    lines = []
    first = engines.load_predictor(probed_model, "openvino", "int8", DATA_IMAGES, log=lines.append,
                                   **CALIBRATION)[0]
    before = int8_entries()
    lines.clear()

    def no_quantization(*args, **kwargs):
        raise AssertionError("quantized again although the cache holds this calibration's model")

    with monkeypatch.context() as patch:
        patch.setattr(nncf, "quantize", no_quantization)
        again = engines.load_predictor(probed_model, "openvino", "int8", DATA_IMAGES, log=lines.append,
                                       **CALIBRATION)[0]
    tile = np.random.default_rng(1).standard_normal((1, 64, 64, 1), dtype=np.float32)
    np.testing.assert_array_equal(again(tile), first(tile))
    assert int8_entries() == before and again.precision == "int8"
    # other images to calibrate on: another int8 model, the first kept
    other = tmp_path / "other"
    other.mkdir()
    for name in NAMES[40:60]:
        shutil.copy(os.path.join(DATA_IMAGES, name), other / name)
    engines.load_predictor(probed_model, "openvino", "int8", str(other), log=lines.append, **CALIBRATION)
    after = int8_entries()
    assert set(before) < set(after) and len(after) == len(before) + 1
    assert [line for line in lines if line.startswith("int8: quantizing")] == [
        f"int8: quantizing with NNCF on 20 tiles of {other} (once: kept in {openvino_cache.cache_root()})"]


@pytest.mark.slow
def test_a_model_that_fails_the_gate_runs_in_float32(gray_model, tmp_path):
    lines = []
    segmenter, masks = segment(gray_model[0], str(tmp_path / "out"), lines, precision="int8",
                               calibration_folder=DATA_IMAGES, accuracy_control=False, **CALIBRATION)
    refused = [line for line in lines if line.startswith("int8 refused: masks agree with float32's on ")]
    assert len(refused) == 1 and refused[0].endswith(": float32 is used"), lines
    assert segmenter.precision == "float32" and lines[-2].endswith("; engine openvino"), lines
    _, exact = segment(gray_model[0], str(tmp_path / "float32"), [], engine="openvino")
    np.testing.assert_array_equal(masks, exact)
    # the failed gate is kept too: the next run says so at once, without quantizing again
    again = []
    engines.load_predictor(gray_model[0], "openvino", "int8", DATA_IMAGES, accuracy_control=False,
                           log=again.append, **CALIBRATION)
    assert again == refused


@pytest.mark.slow
def test_int8_refusals_are_one_line(gray_model, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.zeros((64, 64), np.uint16))
    common = ["--saved_model_filepath", gray_model[0], "--image_folder", str(images), "--output_folder",
              str(tmp_path / "out"), "--precision", "int8"]
    refusals = [
        (["--engine", "tensorflow"], {}, "error: --precision int8 runs on OpenVINO: use --engine openvino or auto, "
                                         "not tensorflow"),
        # the tiny model was exported outside a training run: it records no training database
        ([], {}, "error: --precision int8 calibrates on the model's training tiles, but it records no training "
                 "database: give --calibration_folder"),
        (["--calibration_folder", str(tmp_path / "none")], {}, f"error: {tmp_path / 'none'}: calibration folder "
                                                               f"does not exist"),
        ([], {"nncf": None}, "error: --precision int8 needs the nncf package (pip install nncf"),
    ]
    for flags, modules, expected in refusals:
        with monkeypatch.context() as patch:
            for name, module in modules.items():
                patch.setitem(sys.modules, name, module)  # None: an import of it fails, as when not installed
            with pytest.raises(SystemExit) as exit_info:
                inference.main(common + flags)
        message = str(exit_info.value.code)
        assert message.startswith(expected) and "\n" not in message, message
    assert not (tmp_path / "out").exists()
    capsys.readouterr()


@pytest.mark.slow
def test_openvino_output_writes_the_int8_model_to_ship(probed_model, tmp_path, capsys):
    import openvino

    folder = tmp_path / "shipped"
    inference.main(["--saved_model_filepath", probed_model, "--precision", "int8", "--calibration_folder",
                    DATA_IMAGES, "--calibration_tiles", "16", "--openvino_output", str(folder)])
    assert sorted(os.listdir(folder)) == ["fcdensenet_metadata.json", "model.bin", "model.xml", "record.json"]
    record = json.loads((folder / "record.json").read_text())
    assert record["precision"] == "int8" and record["passed"]
    model = openvino.Core().read_model(str(folder / "model.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote the OpenVINO model (int8) to {folder}"


def test_calibration_tiles_come_from_the_training_database_the_model_records(tmp_path):
    database = os.path.join(REPO_ROOT, "tests", "fixtures", "nist-built-lmdb", "tiled128", "train-nist.lmdb")
    metadata = {"number_channels": 1, "training": {"train_database": os.path.abspath(database)}}
    tiles, source = int8.calibration_tiles(metadata, count=16)
    assert source == os.path.abspath(database)
    assert len(tiles) == 20 and {tile.shape for tile in tiles} == {(128, 128, 1)}  # 16 and 4 held out of 27 records
    assert all(abs(float(tile.mean())) < 1e-3 and tile.dtype == np.float32 for tile in tiles)  # z-scored
    assert [len(part) for part in int8.split(tiles)] == [16, 4]
    assert int8.tiles_digest(tiles) != int8.tiles_digest(int8.calibration_tiles(metadata, count=12)[0])
    metadata["training"]["train_database"] = str(tmp_path / "moved.lmdb")
    with pytest.raises(ValueError, match=f"but its training database {tmp_path / 'moved.lmdb'} is not there: "
                                         f"give --calibration_folder"):
        int8.calibration_tiles(metadata, count=16)
    with pytest.raises(ValueError, match="model takes 3"):
        int8.calibration_tiles(dict(metadata, number_channels=3), calibration_folder=DATA_IMAGES, count=16)


def test_image_folder_may_be_left_out_only_to_write_the_openvino_model(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--saved_model_filepath", str(tmp_path), "--output_folder", str(tmp_path / "out")])
    assert str(exit_info.value.code) == ("error: --image_folder is required (unless --openvino_output alone is "
                                         "wanted)")
    assert inference.parse_args(["--saved_model_filepath", "m", "--image_folder", "i"]).precision == "float32"
