"""Tests of training_recipe.py: learning-rate schedules, the Dice + cross-entropy loss, the weight
average; and of the trainer's checks of the new flags and of resuming runs from before them."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from fcdn.training import recipe as R
from fcdn.training import schedule as S
from fcdn.training.run_folder import RunFolder, run_settings
from train_fcdensenet import check_args, parse_args

PLAN = dict(warmup_steps=10, warmup_rate=1e-4, rate=1e-3, total_steps=110)


# ----------------------------------------------------------------------------------------------
# learning rate


def test_constant_schedule_is_the_reference_warm_up_then_one_rate():
    plan = S.RatePlan(**PLAN)
    assert [S.learning_rate_at(step, plan) for step in (0, 9, 10, 109, 5000)] == [1e-4, 1e-4, 1e-3, 1e-3, 1e-3]


@pytest.mark.parametrize("schedule, middle", [("cosine", 0.5), ("poly", 0.5 ** 0.9)])
def test_decaying_schedules_start_at_the_rate_and_reach_zero_at_the_last_epoch_end(schedule, middle):
    plan = S.RatePlan(**PLAN, schedule=schedule)
    rates = [S.learning_rate_at(step, plan) for step in range(120)]
    assert rates[:10] == [1e-4] * 10  # the warm-up is not touched
    assert rates[10] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(1e-3 * middle)  # half of the 100 steps after the warm-up
    assert all(a > b for a, b in zip(rates[10:110], rates[11:110]))  # decreasing
    assert 0 < rates[109] < 2e-5  # the last step still moves
    assert rates[110:] == [0.0] * 10
    if schedule == "cosine":
        assert rates[35] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    else:
        assert rates[35] == pytest.approx(1e-3 * 0.75 ** 0.9)


def test_linear_warm_up_rises_from_the_warm_up_rate_to_the_rate_and_leaves_the_rest():
    linear = S.RatePlan(**PLAN, schedule="poly", warmup="linear")
    rates = [S.learning_rate_at(step, linear) for step in range(120)]
    assert rates[:10] == pytest.approx([1e-4 + 9e-5 * step for step in range(10)])  # 1e-4 .. 9.1e-4
    assert rates[10] == pytest.approx(1e-3)  # where the ramp would arrive: no jump
    constant = S.RatePlan(**PLAN, schedule="poly")
    assert rates[10:] == [S.learning_rate_at(step, constant) for step in range(10, 120)]
    args = parse_args(["--train_database", "t", "--test_database", "s", "--output_dir", "o",
                       "--warmup", "linear", "--learning_rate", "2e-3"])
    from fcdn.training.schedule import rate_plan

    plan = rate_plan(args, warmup_steps=50)
    assert (plan.warmup, plan.warmup_rate) == ("linear", pytest.approx(2e-4))
    assert S.learning_rate_at(25, plan) == pytest.approx(1.1e-3)
    with pytest.raises(ValueError, match="unknown warm-up 'cubic'"):
        S.learning_rate_at(0, S.RatePlan(**PLAN, warmup="cubic"))


def test_decaying_schedule_spans_the_epochs_max_epochs_counts_the_warm_up_in():
    args = parse_args(["--train_database", "t", "--test_database", "s", "--output_dir", "o",
                       "--lr_schedule", "cosine", "--max_epochs", "9", "--test_every_n_steps", "50"])
    from fcdn.training.schedule import rate_plan

    plan = rate_plan(args, warmup_steps=50)
    assert plan.total_steps == 450  # 50 warm-up steps + 8 epochs of 50
    assert S.learning_rate_at(449, plan) > 0 == S.learning_rate_at(450, plan)


# ----------------------------------------------------------------------------------------------
# loss


def numpy_losses(labels, probabilities):
    """(cross-entropy, 1 - soft Dice over the foreground classes), per example, in float64."""
    classes = probabilities.shape[-1]
    picked = np.take_along_axis(probabilities, labels[..., None], axis=-1)[..., 0]
    cross_entropy = -np.log(np.clip(picked, 1e-7, 1)).reshape(len(labels), -1).mean(axis=1)
    truth = np.eye(classes)[labels]
    axes = (1, 2)
    overlap = (probabilities * truth).sum(axis=axes)[:, 1:]
    total = probabilities.sum(axis=axes)[:, 1:] + truth.sum(axis=axes)[:, 1:]
    dice = ((2 * overlap + R.DICE_SMOOTH) / (total + R.DICE_SMOOTH)).mean(axis=1)
    return cross_entropy, 1 - dice


def random_batch(classes=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, 8, 8, classes)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    labels = rng.integers(0, classes, (3, 8, 8))
    labels[2] = 0  # an example without foreground
    return labels, probabilities.astype(np.float32)


def test_dice_cross_entropy_matches_numpy_per_example():
    labels, probabilities = random_batch()
    cross_entropy, dice_loss = numpy_losses(labels, probabilities.astype(np.float64))
    got = R.per_example_loss(tf.constant(labels), tf.constant(probabilities), "dice_cross_entropy").numpy()
    assert got.shape == (3,)  # one value an example: the global batch scaling sums and divides them
    np.testing.assert_allclose(got, cross_entropy + dice_loss, rtol=1e-5)
    assert np.all(dice_loss > 0.2)  # the Dice term is not negligible next to the cross-entropy
    assert dice_loss[2] == pytest.approx(1.0, abs=1e-6)  # no foreground at all: no overlap to score


def test_cross_entropy_stays_the_default_and_unchanged():
    labels, probabilities = random_batch(classes=2, seed=1)
    cross_entropy, _ = numpy_losses(labels, probabilities.astype(np.float64))
    got = R.per_example_loss(tf.constant(labels), tf.constant(probabilities)).numpy()
    np.testing.assert_allclose(got, cross_entropy, rtol=1e-5)


def test_perfect_prediction_has_no_dice_loss():
    labels = np.array([[[0, 1], [1, 1]]])
    probabilities = np.eye(2, dtype=np.float32)[labels]
    got = R.per_example_loss(tf.constant(labels), tf.constant(probabilities), "dice_cross_entropy").numpy()
    assert got[0] == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# weight average


def test_average_decay_warms_up_then_holds():
    decays = [float(R.average_decay(0.999, n)) for n in (0, 1, 90, 10**6)]
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 91 / 100])
    assert decays[3] == pytest.approx(0.999)


def test_weight_average_follows_the_weights_and_swaps_bit_for_bit():
    variable = tf.Variable([1.0, 2.0])
    average = R.WeightAverage([FakeKerasVariable(variable)], decay=0.5)
    expected = np.array([1.0, 2.0])
    for n, value in enumerate(([3.0, 4.0], [5.0, 0.0], [-1.0, 1.0])):
        variable.assign(value)
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * np.array(value)
    np.testing.assert_allclose(average.shadows[0].numpy(), expected, rtol=1e-6)
    assert int(average.updates.numpy()) == 3
    live = variable.numpy().copy()
    with pytest.raises(RuntimeError), average.swapped_in():
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)  # the average is in the model
        raise RuntimeError  # e.g. a stop signal in the test pass
    np.testing.assert_array_equal(variable.numpy(), live)  # put back, even after an exception
    np.testing.assert_allclose(average.shadows[0].numpy(), expected, rtol=1e-6)


class FakeKerasVariable:
    """What WeightAverage uses of a Keras variable: .value, .path, .assign."""

    def __init__(self, variable):
        self.variable = variable
        self.path = "dense/kernel"

    @property
    def value(self):
        return self.variable.read_value()

    def assign(self, value):
        self.variable.assign(value)


# ----------------------------------------------------------------------------------------------
# flags and settings


def args_of(*extra):
    return parse_args(["--train_database", "/nonexistent/t", "--test_database", "/nonexistent/s",
                       "--output_dir", "o", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--lr_schedule", "cosine"], "--lr_schedule cosine needs --max_epochs"),
    (["--lr_schedule", "poly"], "--lr_schedule poly needs --max_epochs"),
    (["--weight_averaging", "1", "--weight_averaging_decay", "1.0"], "--weight_averaging_decay must be in (0, 1)"),
    (["--weight_averaging", "1", "--weight_averaging_decay", "0"], "--weight_averaging_decay must be in (0, 1)"),
    (["--batch_norm_momentum", "1"], "--batch_norm_momentum must be in (0, 1), got 1.0"),
    (["--batch_norm_momentum", "0"], "--batch_norm_momentum must be in (0, 1), got 0.0"),
])
def test_bad_recipe_flags_are_refused_before_anything_starts(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_args(args_of(*extra))  # before the databases are even looked at


@pytest.mark.parametrize("flag, value, choices", [
    ("--loss", "dice", "'cross_entropy', 'dice_cross_entropy'"),
    ("--warmup", "cubic", "'constant', 'linear'"),
])
def test_unknown_recipe_choice_is_one_line(capsys, flag, value, choices):
    with pytest.raises(SystemExit) as stopped:
        args_of(flag, value)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: argument {flag}: invalid choice: '{value}' (choose from {choices})"]


def write_run(folder, settings):
    (folder / "resume").mkdir(parents=True)
    (folder / "run_settings.json").write_text(json.dumps(settings))
    (folder / "resume" / "state.json").write_text(json.dumps({"epoch": 2, "finished": None}))
    (folder / "test_loss.csv").write_text("0.5\n")


def test_runs_from_before_the_flags_resume_with_todays_behaviour_and_new_runs_must_repeat_them(tmp_path):
    class Augmentation:
        def to_dict(self):
            return {}

    today = run_settings(args_of("--max_epochs", "9"), Augmentation())
    old = {name: value for name, value in today.items()
           if name not in ("lr_schedule", "decay_epochs", "weight_averaging", "weight_averaging_decay", "loss",
                           "batch_norm_momentum", "warmup")}
    write_run(tmp_path / "old", old)
    state, _ = RunFolder(str(tmp_path / "old")).check(today)
    assert state == {"epoch": 2, "finished": None}
    with pytest.raises(ValueError, match="lr_schedule 'constant' -> 'cosine'"):
        RunFolder(str(tmp_path / "old")).check(run_settings(args_of("--max_epochs", "9", "--lr_schedule", "cosine"),
                                                            Augmentation()))
    with pytest.raises(ValueError, match="batch_norm_momentum 0.9 -> 0.99"):
        RunFolder(str(tmp_path / "old")).check(run_settings(args_of("--batch_norm_momentum", "0.99"), Augmentation()))
    with pytest.raises(ValueError, match="warmup 'constant' -> 'linear'"):
        RunFolder(str(tmp_path / "old")).check(run_settings(args_of("--warmup", "linear"), Augmentation()))

    cosine = run_settings(args_of("--max_epochs", "9", "--lr_schedule", "cosine", "--weight_averaging", "1",
                                  "--loss", "dice_cross_entropy"), Augmentation())
    assert (cosine["decay_epochs"], cosine["weight_averaging_decay"]) == (9, S.DEFAULT_AVERAGE_DECAY)
    write_run(tmp_path / "new", cosine)
    assert RunFolder(str(tmp_path / "new")).check(cosine)[0] is not None
    for changed in (["--max_epochs", "12"], ["--loss", "cross_entropy"], ["--weight_averaging", "0"],
                    ["--weight_averaging_decay", "0.99"], ["--batch_norm_momentum", "0.99"],
                    ["--warmup", "linear"]):
        args = args_of("--max_epochs", "9", "--lr_schedule", "cosine", "--weight_averaging", "1",
                       "--loss", "dice_cross_entropy", *changed)
        with pytest.raises(ValueError, match="holds a run with different settings"):
            RunFolder(str(tmp_path / "new")).check(run_settings(args, Augmentation()))
    # with a constant rate max_epochs stays free: a finished run can still be extended
    constant = run_settings(args_of("--max_epochs", "9"), Augmentation())
    assert run_settings(args_of("--max_epochs", "12"), Augmentation()) == constant
