"""train_fcdensenet.py --init_from: a run starts from a trained model's weights (fine-tuning)."""

import json
import os

import numpy as np
import pytest
from test_train import TINY_MODEL, databases, run, train_command  # noqa: F401 (databases is a fixture)

TINY = dict(variant=None, layers_per_block=1, growth_rate=4)


def tiny_model(number_classes, seed, **overrides):
    import keras

    import fcdensenet

    keras.utils.set_random_seed(seed)
    return fcdensenet.build_model(number_channels=1, number_classes=number_classes, **dict(TINY, **overrides))


def weights_by_path(model):
    return {variable.path: variable.numpy() for variable in model.variables if "seed_generator" not in variable.path}


@pytest.mark.slow
def test_the_source_weights_are_loaded_and_a_new_class_count_gets_a_fresh_classifier(tmp_path):
    from fcdn.model import saved_model
    from fcdn.training import fine_tuning

    source_model = tiny_model(2, seed=1)
    saved_model.export_saved_model(source_model, tmp_path / "source", radius=96)
    source = fine_tuning.describe_source(tmp_path / "source")
    expected = weights_by_path(source_model)

    same_classes = tiny_model(2, seed=2)
    assert fine_tuning.load_initial_weights(same_classes, source) == [
        variable.path for variable in same_classes.variables if "seed_generator" in variable.path]
    for path, value in weights_by_path(same_classes).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)

    three_classes = tiny_model(3, seed=3)
    initial = weights_by_path(three_classes)
    fresh = fine_tuning.load_initial_weights(three_classes, source)
    assert {path for path in fresh if "seed_generator" not in path} == {"logits/kernel", "logits/bias"}
    for path, value in weights_by_path(three_classes).items():
        np.testing.assert_array_equal(value, initial[path] if path.startswith("logits/") else expected[path])

    with pytest.raises(ValueError, match=r"its down0_layer0_conv/kernel is of shape .* where this run's model has"
                                         r" .*: the architecture flags must match the source model's"):
        fine_tuning.load_initial_weights(tiny_model(2, seed=4, growth_rate=6), source)


@pytest.mark.slow
def test_fine_tuning_records_its_source_and_a_resume_does_not_start_again(databases, tmp_path):  # noqa: F811
    from fcdn.model import saved_model

    # the source as the trainer exports it (test_train's tiny run checks that its export holds these)
    source_path, tuned_dir = str(tmp_path / "source"), tmp_path / "tuned"
    training = {"train_database": databases["train"], "epoch": 0, "global_step": 2, "mean_iou": 0.5,
                "layers_per_block": 1, "growth_rate": 4}
    saved_model.export_saved_model(tiny_model(2, seed=0), source_path, radius=96,
                                   extra_metadata={"training": training})

    result, _ = run(train_command(databases, tuned_dir, "--test_every_n_steps", "2", "--max_epochs", "1",
                                  "--number_classes", "3", "--init_from", source_path))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("initial weights:"))
    assert line.startswith(f"initial weights: {source_path} (FCDenseNet-custom, trained on {databases['train']} "
                           "to epoch 0 (mean IoU 0.5000)")
    assert line.endswith("; a new classifier for 3 classes (the source has 2)")
    with open(tuned_dir / "run_settings.json") as handle:
        recorded = json.load(handle)["init_from"]
    assert (recorded["path"], recorded["variant"], recorded["number_classes"], recorded["epoch"]) == (
        source_path, "FCDenseNet-custom", 2, 0)
    with open(tuned_dir / "saved_model" / "fcdensenet_metadata.json") as handle:
        metadata = json.load(handle)
    assert metadata["number_classes"] == 3 and metadata["training"]["init_from"] == recorded

    # one more epoch continues the finished run from its resume point: no second initialisation
    result, _ = run(train_command(databases, tuned_dir, "--test_every_n_steps", "2", "--max_epochs", "2",
                                  "--number_classes", "3", "--init_from", source_path))
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch" in result.stdout and "initial weights:" not in result.stdout


@pytest.mark.slow
def test_a_source_that_does_not_fit_is_one_line(databases, tmp_path):  # noqa: F811
    import argparse

    from fcdn.model import saved_model
    from fcdn.training import fine_tuning

    source_path = tmp_path / "source"
    saved_model.export_saved_model(tiny_model(2, seed=1), source_path, radius=96)
    source = fine_tuning.describe_source(source_path)
    flags = argparse.Namespace(model="FCDenseNet56", layers_per_block=None, growth_rate=None,
                               train_database="t.lmdb")
    with pytest.raises(ValueError, match=f"^{source_path}: --init_from is an FCDenseNet-custom but the flags build "
                                         f"an FCDenseNet56: pass --model FCDenseNet-custom"):
        fine_tuning.check_source(source, flags, 1)
    flags = argparse.Namespace(model=None, layers_per_block=1, growth_rate=4, train_database="t.lmdb")
    fine_tuning.check_source(source, flags, 1)
    with pytest.raises(ValueError, match=f"^{tmp_path}: not an FC-DenseNet SavedModel"):
        fine_tuning.describe_source(tmp_path)

    # as the user meets it: one line, exit status 1, before any step
    result, _ = run(train_command(databases, tmp_path / "run", "--init_from", source_path, "--max_epochs", "1",
                                  train="rgb", test="rgb"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {source_path}: --init_from takes 1 channel(s) but the records of {databases['rgb']} have 3")
    assert not os.path.exists(tmp_path / "run" / "saved_model")
