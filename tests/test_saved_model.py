"""saved_model.py: self-describing exports, loading, atomic replacement, and paths that are not ours."""

import json
import os

import numpy as np
import pytest

import fcdensenet
from fcdn.model import receptive_field, saved_model

pytestmark = pytest.mark.slow  # real models / worker processes / scripts

TINY = {"variant": None, "number_channels": 2, "number_classes": 3, "layers_per_block": 1, "growth_rate": 4,
        "first_filters": 8}


@pytest.fixture(scope="module")
def tiny_model():
    return fcdensenet.build_model(**TINY)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(7).standard_normal((2, 64, 96, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    metadata = saved_model.export_saved_model(tiny_model, path, extra_metadata={"epoch": 3, "note": "tiny"})
    return path, metadata


def test_export_load_round_trip(tiny_model, exported, batch):
    path, metadata = exported
    predict, loaded = saved_model.load_saved_model(path)
    assert loaded == metadata
    with open(os.path.join(path, saved_model.METADATA_FILENAME)) as handle:
        assert json.load(handle) == metadata
    assert loaded["variant"] == "FCDenseNet-custom"
    assert loaded["number_classes"] == 3 and loaded["number_channels"] == 2
    assert loaded["radius"] == receptive_field.measure_effective_radius(tiny_model)
    assert loaded["theoretical_radius"] == 96
    assert loaded["size_factor"] == 32 and loaded["normalization"] == "zscore_per_channel"
    assert loaded["epoch"] == 3 and loaded["note"] == "tiny"
    out = predict(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, tiny_model(batch, training=False).numpy(), atol=1e-5)
    square = batch[:1, :32, :32]
    np.testing.assert_allclose(predict(square), tiny_model(square, training=False).numpy(), atol=1e-5)


def test_predict_rejects_bad_batches(exported, batch):
    predict, _ = saved_model.load_saved_model(exported[0])
    with pytest.raises(ValueError, match="2 channel"):
        predict(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        predict(batch[:, :40])
    with pytest.raises(ValueError):
        predict(batch[0])


def test_export_replaces_an_existing_export_and_leaves_no_temporaries(tmp_path, batch):
    path = tmp_path / "model"
    first = fcdensenet.build_model(**TINY)
    second = fcdensenet.build_model(**TINY)
    saved_model.export_saved_model(first, path, radius=64)
    saved_model.export_saved_model(second, path, radius=96)
    assert os.listdir(tmp_path) == ["model"]
    predict, metadata = saved_model.load_saved_model(path)
    assert metadata["radius"] == 96
    np.testing.assert_allclose(predict(batch), second(batch, training=False).numpy(), atol=1e-5)
    assert not np.allclose(predict(batch), first(batch, training=False).numpy(), atol=1e-5)


def test_export_refuses_to_clobber_foreign_directories_and_bad_metadata(tmp_path, tiny_model):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "test_loss.csv").write_text("0.5\n")
    with pytest.raises(ValueError, match="not an FC-DenseNet SavedModel"):
        saved_model.export_saved_model(tiny_model, foreign, radius=64)
    assert (foreign / "test_loss.csv").read_text() == "0.5\n"
    with pytest.raises(ValueError, match="redefine"):
        saved_model.export_saved_model(tiny_model, tmp_path / "m", extra_metadata={"radius": 1}, radius=64)
    with pytest.raises(ValueError, match="JSON"):
        saved_model.export_saved_model(tiny_model, tmp_path / "m", extra_metadata={"x": object()}, radius=64)
    assert sorted(os.listdir(tmp_path)) == ["results"]


def test_load_rejects_missing_and_foreign_paths(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(ValueError, match="no such SavedModel") as error:
        saved_model.load_saved_model(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="not an FC-DenseNet SavedModel") as error:
        saved_model.load_saved_model(foreign)
    assert str(foreign) in str(error.value) and "\n" not in str(error.value)
    (foreign / saved_model.METADATA_FILENAME).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable metadata"):
        saved_model.load_saved_model(foreign)
    (foreign / saved_model.METADATA_FILENAME).write_text(json.dumps(
        {"variant": "FCDenseNet56", "number_classes": 2, "number_channels": 1, "radius": 384, "size_factor": 32,
         "normalization": "zscore_per_channel"}))
    with pytest.raises(ValueError, match="cannot load the SavedModel") as error:
        saved_model.load_saved_model(foreign)
    assert str(foreign) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_export_is_one_line_naming_it(exported, tmp_path, damage):
    import shutil

    path = str(tmp_path / "damaged")
    shutil.copytree(exported[0], path)
    variables = os.path.join(path, "variables", "variables.data-00000-of-00001")
    if damage == "truncated":  # as a copy cut short by a full disk or a killed transfer
        os.truncate(variables, os.path.getsize(variables) // 2)
    else:
        os.remove(variables)
    with pytest.raises(ValueError) as error:
        saved_model.load_saved_model(path)
    message = str(error.value)
    assert message.startswith(f"{path}: cannot load the SavedModel") and "\n" not in message, message
