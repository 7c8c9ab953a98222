"""fcdensenet.py: the paper's variants, custom builds, the forward pass, bad arguments."""

import keras
import numpy as np
import pytest

import fcdensenet
from fcdn.data.records import SIZE_FACTOR
from fcdn.model import receptive_field

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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_variant_size_and_depth(paper_models, name):
    model = paper_models[name]
    expected = PAPER[name]
    assert model.name == name
    assert abs(model.count_params() - expected["parameters"]) <= 0.02 * expected["parameters"]
    assert count_convolutions(model) == expected["convolutions"]
    assert model.input_shape == (None, None, None, 3)
    assert model.output_shape == (None, None, None, 11)


@pytest.mark.slow
def test_custom_variants_are_named_and_get_a_radius(tiny_model):
    assert tiny_model.name == "FCDenseNet-custom"
    # 1 + (1+2+4+8+16 + 32 + 16+8+4+2+1) = 95 -> 96
    assert receptive_field.theoretical_radius(tiny_model) == 96
    wider = fcdensenet.build_model(None, layers_per_block=[2, 1, 1, 1, 1, 1], growth_rate=4)
    # one 3x3 convolution more at full resolution in the first and in the last block: 97 -> 128
    assert receptive_field.theoretical_radius(wider) == 128
    # one more in the bottleneck, at 1/32 resolution: 95 + 32 -> 128
    assert receptive_field.theoretical_radius(fcdensenet.build_model(
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
    {"batch_norm_momentum": 1.0},
    {"batch_norm_momentum": 0.0},
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


@pytest.mark.slow
def test_forward_is_a_per_pixel_softmax_and_dropout_only_trains(tiny_model, batch):
    out = tiny_model(batch, training=False).numpy()
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, tiny_model(batch, training=False).numpy())
    assert not np.allclose(out, tiny_model(batch, training=True).numpy())


@pytest.mark.slow
def test_weight_decay_on_first_conv_and_transitions_only(tiny_model):
    regularized = sorted(layer.name for layer in tiny_model.layers
                         if getattr(layer, "kernel_regularizer", None) is not None)
    assert regularized == sorted(["first_conv"] + [f"down{i}_td_conv" for i in range(5)]
                                 + [f"up{i}_tu_conv" for i in range(5)])
    assert len(tiny_model.losses) == 11
    plain = fcdensenet.build_model(**TINY, weight_decay=0)
    assert not plain.losses


@pytest.mark.parametrize("momentum", [None, 0.99])
def test_batch_norm_momentum_sets_how_fast_the_moving_statistics_follow(batch, momentum):
    model = fcdensenet.build_model(**TINY, **({} if momentum is None else {"batch_norm_momentum": momentum}))
    momentum = 0.9 if momentum is None else momentum  # the reference's
    normalisations = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(normalisations) == 16 and all(layer.momentum == momentum for layer in normalisations)
    first_features = keras.Model(model.inputs, model.get_layer("first_conv").output)(batch).numpy()
    model(batch, training=True)  # one training call: moving mean = momentum * 0 + (1 - momentum) * batch mean
    np.testing.assert_allclose(model.get_layer("down0_layer0_bn").moving_mean.numpy(),
                               (1 - momentum) * first_features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
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


@pytest.mark.slow
def test_make_predict_function_matches_the_model(tiny_model, batch):
    predict = fcdensenet.make_predict_function(tiny_model)
    np.testing.assert_allclose(predict(batch).numpy(), tiny_model(batch, training=False).numpy(), atol=1e-6)
    # one trace serves other sizes too
    assert predict(batch[:1, :32, :64]).shape == (1, 32, 64, 3)
