import json
import os

import keras
import numpy as np
import pytest

import fcdensenet
from records import SIZE_FACTOR

# (3 channels, 11 classes) as in the paper's CamVid setting
PAPER = {
    "FCDenseNet56": {"parameters": 1.40e6, "convolutions": 56, "radius": 384},
    "FCDenseNet67": {"parameters": 3.50e6, "convolutions": 67, "radius": 480},
    "FCDenseNet103": {"parameters": 9.43e6, "convolutions": 103, "radius": 1120},
}
TINY = {"variant": None, "number_channels": 2, "number_classes": 3, "layers_per_block": 1, "growth_rate": 4,
        "first_filters": 8}


def count_convolutions(model):
    # the paper counts every convolution and transposed convolution, nothing else
    return sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)) for layer in model.layers)


@pytest.fixture(scope="module")
def paper_models():
    return {name: fcdensenet.build_model(name, number_channels=3, number_classes=11) for name in PAPER}


@pytest.fixture(scope="module")
def tiny_model():
    return fcdensenet.build_model(**TINY)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(7).standard_normal((2, 64, 96, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    metadata = fcdensenet.export_saved_model(tiny_model, path, extra_metadata={"epoch": 3, "note": "tiny"})
    return path, metadata


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_variant_size_and_depth(paper_models, name):
    model = paper_models[name]
    expected = PAPER[name]
    assert model.name == name
    assert abs(model.count_params() - expected["parameters"]) <= 0.02 * expected["parameters"]
    assert count_convolutions(model) == expected["convolutions"]
    assert model.input_shape == (None, None, None, 3)
    assert model.output_shape == (None, None, None, 11)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_theoretical_radius_of_paper_variants(paper_models, name):
    assert fcdensenet.theoretical_radius(name) == PAPER[name]["radius"]
    # the graph walk over the built model must agree with the block arithmetic
    assert fcdensenet.theoretical_radius(paper_models[name]) == PAPER[name]["radius"]


def test_custom_variants_are_named_and_get_a_radius(tiny_model):
    assert tiny_model.name == "FCDenseNet-custom"
    # 1 + (1+2+4+8+16 + 32 + 16+8+4+2+1) = 95 -> 96
    assert fcdensenet.theoretical_radius(tiny_model) == 96
    wider = fcdensenet.build_model(None, layers_per_block=[2, 1, 1, 1, 1, 1], growth_rate=4)
    # one 3x3 convolution more at full resolution in the first and in the last block: 97 -> 128
    assert fcdensenet.theoretical_radius(wider) == 128
    # one more in the bottleneck, at 1/32 resolution: 95 + 32 -> 128
    assert fcdensenet.theoretical_radius(fcdensenet.build_model(
        None, layers_per_block=[1, 1, 1, 1, 1, 2], growth_rate=4)) == 128
    same_as_56 = fcdensenet.build_model(None, layers_per_block=[4] * 6, growth_rate=12)
    assert same_as_56.name == "FCDenseNet56"
    deeper = fcdensenet.build_model("FCDenseNet56", layers_per_block=[1, 1, 1, 1, 1, 2], growth_rate=4)
    assert deeper.name == "FCDenseNet-custom"
    # up path mirrors the down path: 2 * 5 + 2 dense layers, first conv, 5 TD, 5 TU, classifier
    assert count_convolutions(deeper) == 12 + 1 + 5 + 5 + 1


@pytest.mark.parametrize("kwargs", [
    {"variant": "FCDenseNet42"},
    {"variant": None, "growth_rate": 4},
    {"number_channels": 0},
    {"number_classes": 1},
    {"number_classes": 2.5},
    {"layers_per_block": [4, 4, 4]},
    {"layers_per_block": [4, 4, 0, 4, 4, 4]},
    {"growth_rate": 0},
    {"first_filters": -1},
    {"dropout_rate": 1.0},
    {"weight_decay": -1e-4},
])
def test_build_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fcdensenet.build_model(**kwargs)


def test_check_input_size():
    fcdensenet.check_input_size(32, 64)
    fcdensenet.check_input_size(np.int64(256), 1024)
    for height, width in [(0, 32), (-32, 32), (48, 32), (32, 33), (32.5, 32), (None, 32)]:
        with pytest.raises(ValueError, match="multiple of 32"):
            fcdensenet.check_input_size(height, width)
    assert fcdensenet.SIZE_FACTOR == SIZE_FACTOR == 32


def test_forward_is_a_per_pixel_softmax_and_dropout_only_trains(tiny_model, batch):
    out = tiny_model(batch, training=False).numpy()
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, tiny_model(batch, training=False).numpy())
    assert not np.allclose(out, tiny_model(batch, training=True).numpy())


def test_weight_decay_on_first_conv_and_transitions_only(tiny_model):
    regularized = sorted(layer.name for layer in tiny_model.layers
                         if getattr(layer, "kernel_regularizer", None) is not None)
    assert regularized == sorted(["first_conv"] + [f"down{i}_td_conv" for i in range(5)]
                                 + [f"up{i}_tu_conv" for i in range(5)])
    assert len(tiny_model.losses) == 11
    plain = fcdensenet.build_model(**TINY, weight_decay=0)
    assert not plain.losses


def test_mixed_precision_output_stays_float32(batch):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = fcdensenet.build_model(**TINY)
        out = model(batch, training=False)
        assert model.get_layer("logits").compute_dtype == "float16"
        assert out.dtype == "float32"
        assert fcdensenet.make_predict_function(model)(batch).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert fcdensenet.build_model(**TINY).get_layer("logits").compute_dtype == "float32"


def test_make_predict_function_matches_the_model(tiny_model, batch):
    predict = fcdensenet.make_predict_function(tiny_model)
    np.testing.assert_allclose(predict(batch).numpy(), tiny_model(batch, training=False).numpy(), atol=1e-6)
    # one trace serves other sizes too
    assert predict(batch[:1, :32, :64]).shape == (1, 32, 64, 3)


def test_effective_radius_is_rounded_and_capped():
    model = fcdensenet.build_model(**TINY)
    cap = fcdensenet.theoretical_radius(model)
    assert cap == 96
    radius = fcdensenet.measure_effective_radius(model)
    assert radius % SIZE_FACTOR == 0 and SIZE_FACTOR <= radius <= cap
    # every pixel of the field has some gradient: a zero threshold finds the whole field, capped
    assert fcdensenet.measure_effective_radius(model, relative_threshold=0.0) == cap
    # a threshold near the peak keeps only the centre
    assert fcdensenet.measure_effective_radius(model, relative_threshold=0.5) == SIZE_FACTOR
    assert fcdensenet.measure_effective_radius(model, relative_threshold=1e-3) <= radius


def test_export_load_round_trip(tiny_model, exported, batch):
    path, metadata = exported
    predict, loaded = fcdensenet.load_saved_model(path)
    assert loaded == metadata
    with open(os.path.join(path, fcdensenet.METADATA_FILENAME)) as handle:
        assert json.load(handle) == metadata
    assert loaded["variant"] == "FCDenseNet-custom"
    assert loaded["number_classes"] == 3 and loaded["number_channels"] == 2
    assert loaded["radius"] == fcdensenet.measure_effective_radius(tiny_model)
    assert loaded["theoretical_radius"] == 96
    assert loaded["size_factor"] == 32 and loaded["normalization"] == "zscore_per_channel"
    assert loaded["epoch"] == 3 and loaded["note"] == "tiny"
    out = predict(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, tiny_model(batch, training=False).numpy(), atol=1e-5)
    square = batch[:1, :32, :32]
    np.testing.assert_allclose(predict(square), tiny_model(square, training=False).numpy(), atol=1e-5)


def test_predict_rejects_bad_batches(exported, batch):
    predict, _ = fcdensenet.load_saved_model(exported[0])
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
    fcdensenet.export_saved_model(first, path, radius=64)
    fcdensenet.export_saved_model(second, path, radius=96)
    assert os.listdir(tmp_path) == ["model"]
    predict, metadata = fcdensenet.load_saved_model(path)
    assert metadata["radius"] == 96
    np.testing.assert_allclose(predict(batch), second(batch, training=False).numpy(), atol=1e-5)
    assert not np.allclose(predict(batch), first(batch, training=False).numpy(), atol=1e-5)


def test_export_refuses_to_clobber_foreign_directories_and_bad_metadata(tmp_path, tiny_model):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "test_loss.csv").write_text("0.5\n")
    with pytest.raises(ValueError, match="not an FC-DenseNet SavedModel"):
        fcdensenet.export_saved_model(tiny_model, foreign, radius=64)
    assert (foreign / "test_loss.csv").read_text() == "0.5\n"
    with pytest.raises(ValueError, match="redefine"):
        fcdensenet.export_saved_model(tiny_model, tmp_path / "m", extra_metadata={"radius": 1}, radius=64)
    with pytest.raises(ValueError, match="JSON"):
        fcdensenet.export_saved_model(tiny_model, tmp_path / "m", extra_metadata={"x": object()}, radius=64)
    assert sorted(os.listdir(tmp_path)) == ["results"]


def test_load_rejects_missing_and_foreign_paths(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(ValueError, match="no such SavedModel") as error:
        fcdensenet.load_saved_model(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="not an FC-DenseNet SavedModel") as error:
        fcdensenet.load_saved_model(foreign)
    assert str(foreign) in str(error.value) and "\n" not in str(error.value)
    (foreign / fcdensenet.METADATA_FILENAME).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable metadata"):
        fcdensenet.load_saved_model(foreign)
    (foreign / fcdensenet.METADATA_FILENAME).write_text(json.dumps(
        {"variant": "FCDenseNet56", "number_classes": 2, "number_channels": 1, "radius": 384, "size_factor": 32,
         "normalization": "zscore_per_channel"}))
    with pytest.raises(ValueError, match="cannot load the SavedModel") as error:
        fcdensenet.load_saved_model(foreign)
    assert str(foreign) in str(error.value) and "\n" not in str(error.value)
