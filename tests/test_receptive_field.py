"""receptive_field.py: theoretical radii of the paper's variants and the gradient probe."""

import pytest

import fcdensenet
from fcdn.data.records import SIZE_FACTOR
from fcdn.model import receptive_field

pytestmark = pytest.mark.slow  # real models / worker processes / scripts

PAPER_RADIUS = {"FCDenseNet56": 384, "FCDenseNet67": 480, "FCDenseNet103": 1120}
TINY = {"variant": None, "number_channels": 2, "number_classes": 3, "layers_per_block": 1, "growth_rate": 4,
        "first_filters": 8}


@pytest.fixture(scope="module")
def paper_models():
    return {name: fcdensenet.build_model(name, number_channels=3, number_classes=11) for name in PAPER_RADIUS}


@pytest.mark.parametrize("name", sorted(PAPER_RADIUS))
def test_theoretical_radius_of_paper_variants(paper_models, name):
    assert receptive_field.theoretical_radius(name) == PAPER_RADIUS[name]
    # the graph walk over the built model must agree with the block arithmetic
    assert receptive_field.theoretical_radius(paper_models[name]) == PAPER_RADIUS[name]


def test_effective_radius_is_rounded_and_capped():
    model = fcdensenet.build_model(**TINY)
    cap = receptive_field.theoretical_radius(model)
    assert cap == 96
    radius = receptive_field.measure_effective_radius(model)
    assert radius % SIZE_FACTOR == 0 and SIZE_FACTOR <= radius <= cap
    # every pixel of the field has some gradient: a zero threshold finds the whole field, capped
    assert receptive_field.measure_effective_radius(model, relative_threshold=0.0) == cap
    # a threshold near the peak keeps only the centre
    assert receptive_field.measure_effective_radius(model, relative_threshold=0.5) == SIZE_FACTOR
    assert receptive_field.measure_effective_radius(model, relative_threshold=1e-3) <= radius
