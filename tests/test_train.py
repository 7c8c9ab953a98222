"""Tests of train_fcdensenet.py: the script is run as a user runs it (a subprocess), on tiny LMDBs
(32x32 records) and a tiny FC-DenseNet (--layers_per_block 1 --growth_rate 4)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest
from conftest import REPO_ROOT, fill_disk, mounted_tmpfs

from fcdn.common import atomic_files
from fcdn.data import records
from fcdn.model import saved_model
from fcdn.training.evaluation import early_stopping_status
from fcdn.training.failures import CHIEF_SAVES, lost_worker

SCRIPT = os.path.join(REPO_ROOT, "train_fcdensenet.py")
TINY_MODEL = ["--layers_per_block", "1", "--growth_rate", "4"]
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def make_database(path, count, size=32, channels=1, seed=0, bad_record=None, honest_keys=True):
    """An LMDB of `count` records: uint16 noise images, masks thresholded from them (classes 0/1);
    record `bad_record` gets class 7 in one pixel, listed in its key unless honest_keys is False."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as transaction:
        for index in range(count):
            image = rng.integers(0, 1000, (size, size, channels)).astype(np.uint16)
            mask = (image[..., 0] > 500).astype(np.uint8)
            if index == bad_record:
                mask[0, 0] = 7
            key = records.make_key(f"image{index:03d}", np.unique(mask) if honest_keys else [0, 1])
            transaction.put(key, records.encode_record(image, mask))
    env.close()
    with open(os.path.join(path, records.FILENAMES_CSV), "w") as handle:
        handle.write("".join(f"image{index:03d}.tif\n" for index in range(count)))
    return str(path)


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    root = tmp_path_factory.mktemp("databases")
    return {
        "train": make_database(root / "train.lmdb", 16, seed=1),
        "test": make_database(root / "test.lmdb", 5, seed=2),
        "rgb": make_database(root / "rgb.lmdb", 4, channels=3, seed=3),
        "bad": make_database(root / "bad.lmdb", 6, seed=4, bad_record=3),
        "bad_hidden": make_database(root / "bad_hidden.lmdb", 6, seed=4, bad_record=3, honest_keys=False),
    }


def train_command(databases, output_dir, *extra, train="train", test="test"):
    return [sys.executable, SCRIPT, "--train_database", databases[train], "--test_database",
            databases[test], "--output_dir", str(output_dir), *TINY_MODEL, *extra]


def run(command, timeout=240, env=None):
    """Run a command in its own process group; return (result, processes left in that group)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, **QUIET_TF, **(env or {})), start_new_session=True)
    stdout, stderr = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    return result, group_members(process.pid)


def group_members(group, grace=5.0):
    """Command lines of live processes in process group `group` (orphaned reader workers would be),
    after waiting up to `grace` seconds for them to go (multiprocessing's resource tracker ends
    shortly after the trainer)."""
    deadline = time.monotonic() + grace
    while True:
        members = _group_members(group)
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.2)


def _group_members(group):
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    members.append(handle.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return members


def scalar_tags(event_file):
    """Tags of the scalar summaries (as TensorBoard's scalars dashboard finds them) in an event file."""
    import tensorflow as tf

    tags = set()
    for record in tf.data.TFRecordDataset(str(event_file)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                tags.add(value.tag)
    return tags


def read_csv_rows(path):
    with open(path) as handle:
        return [line.rstrip("\n").split(",") for line in handle]


# ----------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("losses, patience, expected", [
    ([], 10, (None, False)),
    ([1.0], 0, (0, True)),  # 1 epoch run - best 0 > 0
    ([1.0, 0.9, 0.8], 1, (2, False)),
    ([1.0, 0.9, 0.95], 2, (1, False)),  # 3 run - best 1 = 2, not > 2
    ([1.0, 0.9, 0.95, 0.97], 2, (1, True)),  # 4 - 1 = 3 > 2
    ([1.0, 0.9, 0.90005, 0.89995], 2, (1, True)),  # within 1e-4 of the minimum: the first one is best
    ([1.0, 0.9, 0.8998, 0.95], 2, (2, False)),  # 0.0002 better: a real improvement
])
def test_early_stopping_rule(losses, patience, expected):
    best_epoch, stop = early_stopping_status(losses, patience)
    assert (best_epoch, stop) == expected


# ----------------------------------------------------------------------------------------------
# the loss is divided by the global batch: one step is the same on 1 and 2 replicas

REPLICA_STEP = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    replicas, output, loss_name, averaging = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras
    import fcdensenet
    import fcdn.training.strategy as T
    from fcdn.training.recipe import WeightAverage, per_example_loss

    strategy = T.make_strategy()
    assert strategy.num_replicas_in_sync == replicas
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = fcdensenet.build_model("FCDenseNet56", number_channels=2, number_classes=3, dropout_rate=0.0,
                                       layers_per_block=1, growth_rate=4)
    optimizer = T.build_optimizer(strategy, model, learning_rate=1e-3)
    average = None
    if averaging:
        with strategy.scope():
            average = WeightAverage(model.trainable_variables)
    initial = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(5)
    half_images = rng.standard_normal((2, 32, 32, 2)).astype(np.float32)
    half_masks = rng.integers(0, 3, (2, 32, 32)).astype(np.uint8)
    # the global batch is one half twice: each replica's BatchNormalization statistics then equal
    # the global batch's, so any difference left comes from how the loss is divided and reduced
    images, masks = np.concatenate([half_images] * 2), np.concatenate([half_masks] * 2)
    dataset = lambda: tf.data.Dataset.from_tensor_slices((images, masks)).repeat()
    iterator = iter(T.distribute(strategy, dataset, 4))
    expected = np.nan
    if replicas == 1:  # the mean over the batch of each example's mean pixel loss, computed directly
        probabilities = model(images, training=True).numpy()
        picked = np.take_along_axis(probabilities, masks[..., None].astype(np.int64), axis=-1)
        expected = float(np.mean(-np.log(np.clip(picked, 1e-7, 1.0))))
        if loss_name != "cross_entropy":  # per_example_loss itself is checked against numpy
            expected = float(np.mean(per_example_loss(masks, probabilities, loss_name).numpy()))
        model.set_weights(initial)  # undo the BatchNormalization statistics update of that call
    step = T.make_train_step(strategy, model, optimizer, global_batch_size=4, loss_name=loss_name,
                             average=average)
    loss, correct, pixels, votes = step(iterator, tf.constant(1.0)).numpy()
    averages = {f"average_{i}": v.numpy() for i, v in enumerate(average.shadows)} if average else {}
    if average:  # what the test pass and the export see: the average, on every replica
        with average.swapped_in():
            averages.update({f"swapped_{i}": np.stack([t.numpy() for t in strategy.experimental_local_results(
                v.value)]) for i, v in enumerate(model.trainable_variables)})
    trainable = {f"trainable_{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
    np.savez(output, loss=loss, expected=expected, pixels=pixels, votes=votes, *initial,
             **{f"after_{i}": w for i, w in enumerate(model.get_weights())}, **averages, **trainable)
""")


def replica_steps(tmp_path, loss_name="cross_entropy", averaging=False):
    """One training step on 1 and on 2 logical CPU devices: the two .npz results."""
    script = tmp_path / "replica_step.py"
    script.write_text(REPLICA_STEP)
    env = dict(os.environ, **QUIET_TF, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes = {  # side by side: each is mostly TensorFlow start-up
        replicas: subprocess.Popen(
            [sys.executable, str(script), str(replicas), str(tmp_path / f"step{replicas}.npz"), loss_name,
             str(int(averaging))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for replicas in (1, 2)}
    for process in processes.values():
        log = process.communicate(timeout=240)[0]
        assert process.returncode == 0, log[-3000:]
    return tuple(dict(np.load(tmp_path / f"step{replicas}.npz")) for replicas in (1, 2))


def test_training_curves_plot_the_rate_and_stay_readable_without_it(tmp_path):
    import imageio.v3 as iio

    from fcdn.common import qc_pictures

    history = [{"epoch": epoch, "test_loss": 0.5 / (epoch + 1), "pixel_accuracy": 0.8, "mean_iou": 0.7,
                "iou": [0.9, None if epoch == 0 else 0.5], "train_loss": 0.6, "learning_rate": rate}
               for epoch, rate in enumerate([1e-4, 1e-3, 5e-4])]
    older = [{key: value for key, value in entry.items() if key not in ("train_loss", "learning_rate")}
             for entry in history]  # a run from before these were recorded
    qc_pictures.write_training_curves(tmp_path / "new.png", history, best_epoch=2)
    qc_pictures.write_training_curves(tmp_path / "old.png", older, best_epoch=2)
    new, old = iio.imread(tmp_path / "new.png"), iio.imread(tmp_path / "old.png")
    assert new.shape == old.shape and new.shape[1] >= 1600
    # the fourth panel: the rate's line (grey 0.3) in the one, a lighter grey note alone in the other
    fourth = 3 * new.shape[1] // 4
    line_new, line_old = ((np.abs(picture[:, fourth:, :3].astype(int) - 77) <= 3).all(axis=-1).sum()
                          for picture in (new, old))
    assert line_new > 500 and line_old < 50, (line_new, line_old)


@pytest.mark.slow
def test_one_step_is_the_same_on_one_and_two_replicas(tmp_path):
    one, two = replica_steps(tmp_path)
    assert one["pixels"] == two["pixels"] == 4 * 32 * 32
    assert one["votes"] == 1 and two["votes"] == 2  # every replica reports the stop request
    assert one["loss"] == pytest.approx(float(one["expected"]), rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    initial = [key for key in one if key.startswith("arr_")]
    after = [key for key in one if key.startswith("after_")]
    assert initial and len(initial) == len(after)
    for key in initial:
        np.testing.assert_array_equal(one[key], two[key])  # same start
    moved = 0
    for key in after:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5, err_msg=key)
        moved += not np.allclose(one[key], one[key.replace("after_", "arr_")])
    assert moved > len(after) // 2  # the step did update the weights


@pytest.mark.slow
def test_dice_loss_and_weight_average_are_the_same_on_one_and_two_replicas(tmp_path):
    one, two = replica_steps(tmp_path, "dice_cross_entropy", averaging=True)
    assert one["loss"] == pytest.approx(float(one["expected"]), rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    averages = [key for key in one if key.startswith("average_")]
    assert averages and len(averages) == len([key for key in one if key.startswith("swapped_")])
    assert len(averages) == len([key for key in one if key.startswith("trainable_")])
    differ = 0
    for key in averages:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5, err_msg=key)
        differ += not np.allclose(one[key], one[key.replace("average_", "trainable_")], rtol=0, atol=1e-7)
    assert differ > len(averages) // 2  # the average is not the weights (its first decay is 0.1)
    for result in (one, two):
        for key in averages:
            swapped = result[key.replace("average_", "swapped_")]
            assert len(swapped) == (1 if result is one else 2)
            for copy in swapped:
                np.testing.assert_array_equal(copy, result[key], err_msg=key)


MIXED_STEP = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import keras
    import fcdensenet
    import fcdn.training.strategy as T

    keras.mixed_precision.set_global_policy("mixed_float16")  # as --mixed_precision 1 does on a GPU
    strategy = T.make_strategy()
    with strategy.scope():
        model = fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2,
                                       layers_per_block=1, growth_rate=4)
    optimizer = T.build_optimizer(strategy, model, learning_rate=1e-3, mixed_precision=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    before = [w.copy() for w in model.get_weights()]
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 1)).astype(np.float32)
    masks = (images[..., 0] > 0).astype(np.uint8)
    dataset = lambda: tf.data.Dataset.from_tensor_slices((images, masks)).repeat()
    iterator = iter(T.distribute(strategy, dataset, 4))
    step = T.make_train_step(strategy, model, optimizer, global_batch_size=4)
    losses = [float(step(iterator, tf.constant(0.0)).numpy()[0]) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    moved = sum(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    assert moved > 0, "no weight changed: every step was skipped as non-finite"
    print("ok", losses)
""")


@pytest.mark.slow
def test_mixed_precision_step_scales_the_loss_and_trains(tmp_path):
    """The loss-scaling path of --mixed_precision, exercised on the CPU (the flag itself refuses it)."""
    script = tmp_path / "mixed_step.py"
    script.write_text(MIXED_STEP)
    result, _ = run([sys.executable, str(script)],
                    env={"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_tiny_run_writes_every_output(databases, tmp_path):
    from fcdn.data import image_files
    from fcdn.training import fine_tuning

    config = tmp_path / "augment.json"
    config.write_text(json.dumps({"rotation": False, "noise_severity": 0.0}))
    output = tmp_path / "run"
    command = train_command(databases, output, "--batch_size", "2", "--test_every_n_steps", "3",
                            "--max_epochs", "2", "--seed", "3", "--augmentation_config", str(config),
                            "--log_every_n_steps", "2")
    result, left = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left
    out = result.stdout
    assert "train records: 16  test records: 5  image size: 32x32  channels: 1" in out
    assert "global batch: 2" in out and "parameters:" in out
    assert "rotation=False" in out and "noise_severity=0.0" in out and "reflection=True" in out
    assert "epoch 0 step 2/3 (global 2) loss " in out and "lr 1.00e-05 images/s " in out
    assert "epoch 1 step 3/3 (global 6) loss " in out and "lr 1.00e-04 images/s " in out

    losses = [float(line) for line in (output / "test_loss.csv").read_text().split()]
    assert len(losses) == 2
    rows = read_csv_rows(output / "test_metrics.csv")
    assert rows[0] == ["epoch", "global_step", "test_loss", "pixel_accuracy", "mean_iou",
                       "iou_class_0", "iou_class_1"]
    assert [row[:2] for row in rows[1:]] == [["0", "3"], ["1", "6"]]
    assert [float(row[2]) for row in rows[1:]] == losses
    for row in rows[1:]:
        assert 0 <= float(row[3]) <= 1 and 0 <= float(row[4]) <= 1
    assert (output / "checkpoint" / "ckpt.index").is_file()
    # the pictures: curves of both epochs, and the best model on the 5 test records (32x32 each)
    import imageio.v3 as iio

    curves = iio.imread(output / "training_curves.png")
    assert curves.shape[0] >= 300 and curves.shape[1] >= 1000 and curves.std() > 0
    predictions = iio.imread(output / "test_predictions.png")
    assert predictions.shape[1] >= 1000 and predictions.std() > 0
    state = json.loads((output / "resume" / "state.json").read_text())
    assert all(entry["train_loss"] > 0 for entry in state["history"])
    # the mean rate of each epoch, plotted in training_curves.png: the warm-up's, then the constant one
    assert [entry["learning_rate"] for entry in state["history"]] == pytest.approx([1e-5, 1e-4])
    boards = [name for name in os.listdir(output) if name.startswith("tensorboard-")]
    assert len(boards) == 1
    tags = {}
    for part in ("train", "test"):
        events = os.listdir(output / boards[0] / part)
        assert len(events) == 1 and events[0].startswith("events.out.tfevents")
        tags[part] = scalar_tags(output / boards[0] / part / events[0])
    assert {"loss", "accuracy", "learning_rate", "images_per_second"} <= tags["train"]
    assert {"loss", "pixel_accuracy", "mean_iou", "iou/class_0", "iou/class_1"} <= tags["test"]

    # the SavedModel is the best epoch's model: its loss over the test records is the logged one
    best_epoch, _ = early_stopping_status(losses, 10)
    predict, metadata = saved_model.load_saved_model(str(output / "saved_model"))
    assert metadata["number_classes"] == 2 and metadata["number_channels"] == 1
    assert metadata["training"]["batch_size"] == 2 and metadata["training"]["epoch"] == best_epoch
    # what --init_from reports of a source model (test_fine_tuning exports one as this)
    source = fine_tuning.describe_source(str(output / "saved_model"))
    assert {key: source[key] for key in fine_tuning.SOURCE_TRAINING_KEYS} == {
        "train_database": databases["train"], "epoch": best_epoch, "global_step": 3 * (best_epoch + 1),
        "mean_iou": pytest.approx(float(rows[best_epoch + 1][4]), abs=1e-6), "layers_per_block": 1,
        "growth_rate": 4}
    env = lmdb.open(databases["test"], readonly=True, lock=False)
    with env.begin() as transaction:
        pairs = [records.decode_record(value) for _, value in transaction.cursor()]
    env.close()
    images = np.stack([image_files.zscore_normalize(pair.image) for pair in pairs])
    masks = np.stack([pair.mask for pair in pairs]).astype(np.int64)
    probabilities = predict(images)
    picked = np.take_along_axis(probabilities, masks[..., None], axis=-1)
    assert float(np.mean(-np.log(np.clip(picked, 1e-7, 1)))) == pytest.approx(losses[best_epoch], rel=1e-4)

    again, _ = run(command)  # a finished run says so and does nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout
    assert len((output / "test_loss.csv").read_text().split()) == 2

    changed, _ = run(command + ["--learning_rate", "0.01"])
    assert changed.returncode != 0
    assert changed.stderr.strip().splitlines()[-1].startswith(f"error: {output}: holds a run with different")


# ----------------------------------------------------------------------------------------------
# interrupt and resume


def interrupt_after(command, marker, send, timeout=240):
    """Run the trainer until a stdout line contains `marker`, then call send(process); return
    (return code, stdout)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, **QUIET_TF), start_new_session=True)
    lines, sent, deadline = [], False, time.monotonic() + timeout
    try:
        for line in process.stdout:
            lines.append(line)
            if not sent and marker in line:
                send(process)
                sent = True
            assert time.monotonic() < deadline, "".join(lines)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert sent, "".join(lines)
    assert not group_members(process.pid)
    return process.returncode, "".join(lines)


# ----------------------------------------------------------------------------------------------
# a reader worker killed by a signal (the kernel's OOM killer, a crash) ends the run at once


def reader_workers(trainer_pid):
    """The trainer's reader workers, oldest first: the train reader's, then the test reader's."""
    workers = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                spawned = b"spawn_main" in handle.read()
        except OSError:
            continue
        if int(fields[1]) == trainer_pid and spawned:
            workers.append((int(fields[19]), int(entry)))  # (start time, pid)
    return [pid for _, pid in sorted(workers)]


def kill_worker_after(command, marker, worker, sig, timeout=240, temporary_folder=None):
    """Run the trainer until a stdout line holds `marker`, then send `sig` to reader worker number
    `worker` (train reader's first, the test reader's last); return (return code, stdout, stderr,
    seconds from the kill to the exit). `temporary_folder`: the trainer's TMPDIR."""
    env = dict(os.environ, **QUIET_TF, **({"TMPDIR": str(temporary_folder)} if temporary_folder else {}))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    lines, killed_at = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                os.kill(reader_workers(process.pid)[worker], sig)
                killed_at = time.monotonic()
                break
        assert killed_at is not None, "".join(lines)
        rest, stderr = process.communicate(timeout=timeout)
        elapsed = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not group_members(process.pid)  # no reader worker or tracker left behind
    return process.returncode, "".join(lines) + rest, stderr, elapsed


@pytest.mark.parametrize("reader, reader_count, worker, sig, marker", [
    ("train", 1, 0, signal.SIGKILL, "epoch 1 step 1/"),  # the ring full
    ("test", 1, -1, signal.SIGKILL, "epoch 0 step 20/20"),  # the test pass starts
])
@pytest.mark.slow
def test_a_killed_reader_worker_ends_the_run_with_one_line(databases, tmp_path, reader, reader_count, worker,
                                                           sig, marker):
    output = tmp_path / "run"
    command = train_command(databases, output, "--batch_size", "2", "--test_every_n_steps", "20",
                            "--max_epochs", "2", "--seed", "0", "--log_every_n_steps", "1",
                            "--reader_count", str(reader_count))
    temporary_folder = tmp_path / "tmp"
    temporary_folder.mkdir()
    code, out, stderr, elapsed = kill_worker_after(command, marker, worker, sig, temporary_folder=temporary_folder)
    assert code == 1, stderr[-3000:]
    # the quick exit still runs Python's exit handlers: TensorFlow's autograph files go with them
    assert not os.listdir(temporary_folder), os.listdir(temporary_folder)
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    index = worker % (reader_count if reader == "train" else 1)
    assert last.startswith(f"error: {databases[reader]}: {reader} reader worker {index} was killed by "
                           f"signal {sig.name}; saved a resume point at epoch "), last
    assert last.endswith(", run the same command to continue"), last
    assert elapsed < 60, elapsed  # about 2 s here: bench/bench_dead_reader.py measures it
    state = json.loads((output / "resume" / "state.json").read_text())
    # stopped where it was: a test reader's death is not left to the next test pass, an epoch later
    assert f"at epoch {state['epoch']} step {state['step_in_epoch']}," in last
    assert state["global_step"] < 30 and state["finished"] is None, state
    if reader != "train" or reader_count != 1:
        return
    result, left = run(command)  # the same command continues the run
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left
    assert f"resuming at epoch {state['epoch']} step {state['step_in_epoch']} " in result.stdout
    assert "finished: max_epochs 2 reached" in result.stdout
    assert [row[:2] for row in read_csv_rows(output / "test_metrics.csv")[1:]] == [["0", "20"], ["1", "40"]]


# ----------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs."""
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        yield disk


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_outputs(databases, small_disk):
    output = small_disk / "run"
    command = train_command(databases, output, "--batch_size", "2", "--test_every_n_steps", "2",
                            "--seed", "0", "--log_every_n_steps", "2")
    first, _ = run(command + ["--max_epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    model_files = sorted(os.listdir(output / "saved_model"))
    # room for the CSVs, not for a resume point (~0.6 MB) or a SavedModel (~1.1 MB)
    filler = fill_disk(small_disk, leave=300_000)
    full, left = run(command + ["--max_epochs", "2"])
    assert full.returncode == 1 and not left
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: {output}/(saved_model|checkpoint|resume): cannot write .*\(No space left on "
                    r"device\); the previous version is kept", last), last
    assert not [name for name in os.listdir(output) if name.startswith(".")]  # nothing half-written
    state = json.loads((output / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert sorted(os.listdir(output / "saved_model")) == model_files
    assert saved_model.read_metadata(str(output / "saved_model"))["training"]["epoch"] == 0

    os.remove(filler)  # the same command once space is freed
    again, left = run(command + ["--max_epochs", "2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at epoch 1 step 0 " in again.stdout and "finished: max_epochs 2 reached" in again.stdout
    assert [row[:2] for row in read_csv_rows(output / "test_metrics.csv")[1:]] == [["0", "2"], ["1", "4"]]


@pytest.mark.slow
def test_a_full_disk_under_tensorboard_is_one_line(small_disk):
    import tensorflow as tf

    from fcdn.training import summaries

    writer = tf.summary.create_file_writer(str(small_disk / "tensorboard" / "train"))
    summaries.write_scalars(writer, 0, {"loss": 1.0})
    fill_disk(small_disk, leave=0)
    with pytest.raises(ValueError) as error:
        for step in range(1, 100):
            summaries.write_scalars(writer, step, {"loss": 1.0, "accuracy": 0.5})
    message = str(error.value)
    assert re.match(rf"{small_disk}/tensorboard/train/events\.out\.tfevents\S+: cannot write the TensorBoard "
                    r"summaries \(No space left on device\)", message) and "\n" not in message, message


@pytest.mark.slow
def test_crops_train_and_whole_records_test(databases, tmp_path):
    large = make_database(tmp_path / "large.lmdb", 6, size=96, seed=5)
    output = tmp_path / "run"
    command = train_command({**databases, "large": large}, output, "--batch_size", "2", "--crop_size", "32",
                            "--test_every_n_steps", "2", "--max_epochs", "1", "--seed", "1", train="large")
    result, left = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left
    assert "train records: 6  test records: 5  image size: 96x96 (training on 32x32 crops)" in result.stdout
    assert len(read_csv_rows(output / "test_metrics.csv")) == 2
    assert json.loads((output / "run_settings.json").read_text())["crop_size"] == 32


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("case, expected", [
    ("missing_database", "error: /nonexistent/train.lmdb: "),
    ("channel_mismatch", "channel"),
    ("class_in_key", "image003"),
    ("class_in_record", "image003"),
    ("batch_size", "error: --batch_size must be >= 1"),
    ("test_every_n_steps", "error: --test_every_n_steps must be >= 1"),
    ("foreign_output", "holds another run's files"),
    ("mixed_precision_on_cpu", "needs a GPU"),
    ("crop_not_multiple", "error: --crop_size must be 0 or a positive multiple of 32"),
    ("crop_too_large", "crop size 64 is larger than its 32x32 records"),
])
@pytest.mark.slow
def test_bad_input_fails_with_one_line(databases, tmp_path, case, expected):
    output = tmp_path / "run"
    extra = ["--test_every_n_steps", "2", "--max_epochs", "1", "--batch_size", "2"]
    command = train_command(databases, output, *extra)
    if case == "missing_database":
        command = [sys.executable, SCRIPT, "--train_database", "/nonexistent/train.lmdb", "--test_database",
                   databases["test"], "--output_dir", str(output)]
    elif case == "channel_mismatch":
        command = train_command(databases, output, *extra, test="rgb")
    elif case == "class_in_key":
        command = train_command(databases, output, *extra, train="bad")
    elif case == "class_in_record":  # the key hides it: a reader worker finds it
        command = train_command(databases, output, *extra, train="bad_hidden")
    elif case in ("batch_size", "test_every_n_steps"):
        command += [f"--{case}", "0"]
    elif case == "foreign_output":
        output.mkdir()
        (output / "test_loss.csv").write_text("0.5\n")
    elif case == "mixed_precision_on_cpu":
        command += ["--mixed_precision", "1"]
    elif case == "crop_not_multiple":
        command += ["--crop_size", "48"]
    elif case == "crop_too_large":
        command += ["--crop_size", "64"]
    result, left = run(command)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr[-3000:]
    assert not left  # no reader worker outlives the trainer


@pytest.mark.slow
def test_flags_and_databases_are_checked_before_tensorflow_loads(databases, tmp_path):
    # a mistyped flag or database answers at once, not after TensorFlow's seconds of start-up
    probe = textwrap.dedent("""
        import sys
        import train_fcdensenet
        try:
            train_fcdensenet.main(sys.argv[1:])
        except SystemExit as end:
            print(end.code)
        print("tensorflow loaded:", "tensorflow" in sys.modules)
    """)
    for extra in (["--batch_size", "0"], ["--crop_size", "48"]):
        command = [sys.executable, "-c", probe, *train_command(databases, tmp_path / "run", *extra)[2:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert result.stdout.splitlines()[0].startswith("error: --"), result.stdout + result.stderr
        assert result.stdout.splitlines()[-1] == "tensorflow loaded: False"
    missing = [sys.executable, "-c", probe, "--train_database", str(tmp_path / "typo.lmdb"), "--test_database",
               databases["test"], "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(missing, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.stdout.splitlines() == [f"error: {tmp_path / 'typo.lmdb'}: no such database (an LMDB directory "
                                          "written by build_lmdb.py)", "tensorflow loaded: False"]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# multi-worker: two processes on this machine, as two nodes would run

WORKER_STEPS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    import fcdensenet
    import fcdn.training.strategy as T
    from fcdn.training.run_folder import RunFolder

    output_dir, result = sys.argv[1], sys.argv[2]
    strategy = T.make_strategy()
    is_chief, index, workers = T.worker_info(strategy)
    with strategy.scope():  # no seed: the workers agree on the initial weights through the strategy
        model = fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2, dropout_rate=0.0,
                                       layers_per_block=1, growth_rate=4)
    optimizer = T.build_optimizer(strategy, model, learning_rate=1e-3)
    rng = np.random.default_rng(index)  # each worker its own examples, as each has its own readers
    images = rng.standard_normal((8, 32, 32, 1)).astype(np.float32)
    masks = (images[..., 0] > 0).astype(np.uint8)
    dataset = lambda: tf.data.Dataset.from_tensor_slices((images, masks)).repeat()
    iterator = iter(T.distribute(strategy, dataset, 4))
    step = T.make_train_step(strategy, model, optimizer, global_batch_size=4)
    for number in range(3):  # worker 1 is signalled before the last step
        totals = step(iterator, tf.constant(1.0 if index == 1 and number == 2 else 0.0)).numpy()
    T.make_statistics_sync(strategy, model)()  # as the trainer does before testing and saving
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    RunFolder(output_dir, is_chief).save_resume(checkpoint, {"written_by": index})
    np.savez(result, is_chief=is_chief, index=index, workers=workers, votes=totals[3], *model.get_weights())
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_workers_end_with_identical_weights_and_only_the_chief_writes(tmp_path):
    script = tmp_path / "worker_steps.py"
    script.write_text(WORKER_STEPS)
    output = tmp_path / "run"
    output.mkdir()
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, **QUIET_TF, TF_CONFIG=json.dumps(config),
                   PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(output), str(tmp_path / f"worker{index}.npz")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True))
    try:
        logs = [process.communicate(timeout=180)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    chief, other = (dict(np.load(tmp_path / f"worker{index}.npz")) for index in range(2))
    assert (bool(chief["is_chief"]), int(chief["index"]), int(chief["workers"])) == (True, 0, 2)
    assert (bool(other["is_chief"]), int(other["index"]), int(other["workers"])) == (False, 1, 2)
    assert chief["votes"] == other["votes"] == 1  # worker 1's stop request reached worker 0 in the same step
    weights = [key for key in chief if key.startswith("arr_")]
    assert weights
    for key in weights:
        np.testing.assert_allclose(other[key], chief[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert sorted(os.listdir(output)) == ["resume"]
    state = json.loads((output / "resume" / "state.json").read_text())
    assert state == {"written_by": 0}


def start_workers(databases, output, count, *extra, folder):
    """`count` trainer processes of one multi-worker run on this machine (TF_CONFIG), each in its own
    process group; stdout and stderr of worker i go to folder/worker{i}.out and .err."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(count)]
    processes = []
    for index in range(count):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        with open(folder / f"worker{index}.out", "w") as out, open(folder / f"worker{index}.err", "w") as err:
            processes.append(subprocess.Popen(
                train_command(databases, output, *extra), stdout=out, stderr=err, text=True,
                env=dict(os.environ, **QUIET_TF, TF_CONFIG=json.dumps(config)), start_new_session=True))
    return processes


def wait_for_line(path, text, process, timeout=240):
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, path.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_a_reader_dying_on_one_worker_stops_every_worker_with_one_line(databases, tmp_path):
    output = tmp_path / "run"
    processes = start_workers(databases, output, 2, "--batch_size", "2", "--test_every_n_steps", "20",
                              "--max_epochs", "2", "--seed", "0", "--log_every_n_steps", "1", folder=tmp_path)
    try:
        wait_for_line(tmp_path / "worker0.out", "epoch 1 step 3/20", processes[0])
        os.kill(reader_workers(processes[1].pid)[0], signal.SIGKILL)
        killed = time.monotonic()
        codes = [process.wait(timeout=120) for process in processes]
        elapsed = time.monotonic() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    errors = [(tmp_path / f"worker{index}.err").read_text() for index in range(2)]
    assert codes == [1, 1], errors
    for text in errors:
        assert "Traceback" not in text, text[-3000:]
    assert errors[1].strip().splitlines()[-1] == (
        f"error: {databases['train']}: train reader worker 0 was killed by signal SIGKILL; the other workers "
        f"stop with this one; {CHIEF_SAVES}, run the same command on every node to continue")
    # the chief learns it from its next all-reduce, or from the heartbeats worker 1 no longer sends,
    # and saves the last step it completed on its own
    logged = re.findall(r"^epoch 1 step (\d+)/20 ", (tmp_path / "worker0.out").read_text(), re.M)
    state = json.loads((output / "resume" / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, int(logged[-1]),
                                                                           20 + int(logged[-1]))
    assert state["step_in_epoch"] >= 3 and len(state["history"]) == 1
    last = errors[0].strip().splitlines()[-1]
    assert re.fullmatch(r"error: (an all-reduce with the other workers failed: one of them|worker 1 of this run) "
                        rf"stopped \(its log says why\); saved a resume point at epoch 1 step {logged[-1]}, run "
                        r"the same command on every node to continue", last), last
    assert elapsed < 60, elapsed
    for process in processes:
        assert not group_members(process.pid)  # no reader worker outlives its trainer
    # the weights saved are those of that step: Adam counted as many updates
    import tensorflow as tf

    iterations = [name for name, _ in tf.train.list_variables(str(output / "resume" / "ckpt"))
                  if name.startswith("optimizer/") and "iteration" in name]
    assert len(iterations) == 1, tf.train.list_variables(str(output / "resume" / "ckpt"))
    assert tf.train.load_checkpoint(str(output / "resume" / "ckpt")).get_tensor(iterations[0]) == state["global_step"]


def test_a_lost_worker_is_named_without_the_worker_that_noticed():
    import tensorflow as tf

    text = ("Task /job:worker/replica:0/task:1 stopped sending heartbeats for a while; noticed by "
            "/job:worker/replica:0/task:0")
    error = tf.errors.UnavailableError(None, None, text)
    assert lost_worker(error, own_task=0) == "worker 1 of this run stopped (its log says why)"
    assert lost_worker(error, own_task=None) == "worker 0, 1 of this run stopped (its log says why)"
    assert lost_worker(tf.errors.InternalError(None, None, "Collective ops is aborted by: ...")).startswith(
        "an all-reduce with the other workers failed")
    assert lost_worker(tf.errors.InternalError(None, None, "something else")) is None


# ----------------------------------------------------------------------------------------------
# the training recipe: decaying rate, weight average, Dice + cross-entropy

RECIPE = ["--lr_schedule", "cosine", "--weight_averaging", "1", "--loss", "dice_cross_entropy"]


def learning_rates(output):
    """{global step: learning rate} from the run's TensorBoard train summaries (every event file)."""
    import tensorflow as tf

    boards = [name for name in os.listdir(output) if name.startswith("tensorboard-")]
    assert len(boards) == 1
    rates = {}
    for name in sorted(os.listdir(output / boards[0] / "train")):
        for record in tf.data.TFRecordDataset(str(output / boards[0] / "train" / name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "learning_rate":
                    assert event.step not in rates, f"step {event.step} logged twice"
                    rates[event.step] = float(tf.make_ndarray(value.tensor))
    return rates


def logged_rates(stdout):
    """{global step: the 'lr' text} of the progress lines."""
    rates = {}
    for line in stdout.splitlines():
        if "(global " in line and " lr " in line:
            rates[int(line.split("(global ")[1].split(")")[0])] = line.split(" lr ")[1].split()[0]
    return rates


@pytest.mark.slow
def test_interrupted_twice_the_run_resumes_exactly(databases, tmp_path):
    """Ctrl-C, then a SLURM-style SIGTERM to the whole process group, then a run to the end: the
    history has every epoch once, and the decaying rate and the weight average continue as in an
    uninterrupted run: the rate of every step is the schedule's (a pure function of the global step,
    which an uninterrupted run follows: test_tiny_run_writes_every_output and test_training_recipe)."""
    import argparse

    import tensorflow as tf

    from fcdn.training.schedule import learning_rate_at, rate_plan

    recipe = ["--batch_size", "2", "--test_every_n_steps", "4", "--max_epochs", "3", "--seed", "0",
              "--log_every_n_steps", "1", "--learning_rate", "1e-2", *RECIPE]
    output = tmp_path / "run"
    command = train_command(databases, output, *recipe)
    plan = rate_plan(argparse.Namespace(max_epochs=3, test_every_n_steps=4, learning_rate=1e-2,
                                        lr_schedule="cosine", warmup="constant"), warmup_steps=4)
    # TensorBoard and the progress lines give the rate of a step under the global step after it
    expected = {step: learning_rate_at(step - 1, plan) for step in range(1, 13)}

    # Ctrl-C to the trainer alone, in the middle of epoch 1
    code, out = interrupt_after(command, "epoch 1 step 1/4", lambda p: p.send_signal(signal.SIGINT))
    assert code == 130, out
    assert "received SIGINT: saved a resume point at epoch 1 step " in out
    state = json.loads((output / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1 and 1 <= state["step_in_epoch"] <= 4

    # as if the next save had been killed between its two renames: the resume point parked aside,
    # a half-written new one staged
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    os.rename(output / "resume", atomic_files.parked_path(output / "resume", ended.pid))
    staged = atomic_files.staging_path(output / "resume", ended.pid)
    os.mkdir(staged)
    with open(os.path.join(staged, "state.json"), "w") as handle:
        handle.write('{"epoch": 9, ')

    # SIGTERM to the whole process group, as SLURM preempts (the reader workers ignore it)
    code, out = interrupt_after(command, "(global ", lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == 143, out
    assert f"resuming at epoch 1 step {state['step_in_epoch']} " in out
    assert "saved a resume point" in out
    resumed_at = json.loads((output / "resume" / "state.json").read_text())["global_step"]

    rest, left = run(command)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert not left and f"(global step {resumed_at}, " in rest.stdout, rest.stdout
    assert "finished: max_epochs 3 reached" in rest.stdout
    rows = read_csv_rows(output / "test_metrics.csv")
    assert [row[:2] for row in rows[1:]] == [["0", "4"], ["1", "8"], ["2", "12"]]  # none lost or repeated
    assert len((output / "test_loss.csv").read_text().split()) == 3
    assert len([name for name in os.listdir(output) if name.startswith("tensorboard-")]) == 1
    assert not [name for name in os.listdir(output) if name.startswith(".")]  # nothing parked or staged

    # the rate of every step, the resumed ones included, is the schedule's
    assert learning_rates(output) == {step: float(np.float32(rate)) for step, rate in expected.items()}  # float32
    assert logged_rates(rest.stdout) == {step: f"{expected[step]:.2e}" for step in range(resumed_at + 1, 13)}
    assert expected[4] == pytest.approx(1e-3) and expected[5] == pytest.approx(1e-2)  # warm-up, then decay
    assert expected[9] == pytest.approx(5e-3) and 0 < expected[12] < expected[11] < expected[5]

    # the average kept counting through the resumes: one update per step of the whole run
    reader = tf.train.load_checkpoint(str(output / "resume" / "ckpt"))
    updates = [key for key in reader.get_variable_to_shape_map() if key.startswith("weight_average/updates")]
    assert len(updates) == 1 and reader.get_tensor(updates[0]) == 12


@pytest.mark.slow
def test_weight_average_is_what_the_test_pass_scores_and_the_best_model_exports(databases, tmp_path):
    import tensorflow as tf

    import fcdensenet
    from fcdn.data import image_files
    from fcdn.training.recipe import WeightAverage, per_example_loss

    output = tmp_path / "run"
    result, _ = run(train_command(databases, output, "--batch_size", "2", "--test_every_n_steps", "3",
                                  "--max_epochs", "1", "--seed", "2", "--learning_rate", "0.1", *RECIPE))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss: dice_cross_entropy; weight average (decay 0.999) tested and exported" in result.stdout

    def tiny_model():
        return fcdensenet.build_model("FCDenseNet56", number_channels=1, number_classes=2, layers_per_block=1,
                                      growth_rate=4)
    trained = tiny_model()
    average = WeightAverage(trained.trainable_variables)
    tf.train.Checkpoint(model=trained, weight_average=average).read(
        str(output / "resume" / "ckpt")).expect_partial()
    exported = tiny_model()
    tf.train.Checkpoint(model=exported).read(str(output / "checkpoint" / "ckpt")).expect_partial()
    differ = 0
    for weights, shadow, kept in zip(trained.trainable_variables, average.shadows, exported.trainable_variables):
        np.testing.assert_array_equal(kept.numpy(), shadow.numpy())  # the export is the average...
        differ += not np.allclose(weights.numpy(), shadow.numpy(), rtol=0, atol=1e-6)
    assert differ > len(average.shadows) // 2  # ...not the trained weights

    # and the test loss the run logged (early stopping's) is the exported model's Dice + cross-entropy
    env = lmdb.open(databases["test"], readonly=True, lock=False)
    with env.begin() as transaction:
        pairs = [records.decode_record(value) for _, value in transaction.cursor()]
    env.close()
    images = np.stack([image_files.zscore_normalize(pair.image) for pair in pairs])
    masks = np.stack([pair.mask for pair in pairs]).astype(np.int64)
    predict, _ = saved_model.load_saved_model(str(output / "saved_model"))
    loss = float(np.mean(per_example_loss(masks, predict(images), "dice_cross_entropy").numpy()))
    logged = float((output / "test_loss.csv").read_text().split()[0])
    assert loss == pytest.approx(logged, rel=1e-4)


def test_test_predictions_show_record_names_with_dollars_as_plain_text(tmp_path):
    import imageio.v3 as iio
    import tifffile

    from fcdn.data import lmdb_builder
    from fcdn.training.run_folder import PREDICTIONS_FILE, RunFolder

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a$^$b.tif", "c$_$.tif"):  # `$^$` and `$_$` are not even valid mathematics
        tifffile.imwrite(images / name, rng.integers(0, 60000, (64, 64), np.uint16))
        tifffile.imwrite(masks / name, (rng.random((64, 64)) < 0.3).astype(np.uint8))
    lmdb_builder.build(str(images), str(masks), str(tmp_path), "dollars", train_fraction=0.5, seed=0, workers=1,
                       log=lambda line: None)

    def predict(batch):  # a model that finds class 1 where the image is bright
        bright = (batch[..., :1] > 0).astype(np.float32)
        return np.concatenate([1 - bright, bright], axis=-1)

    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    run.write_test_predictions(predict, str(tmp_path / "test-dollars.lmdb"), epoch=3)
    assert iio.imread(run.file(PREDICTIONS_FILE)).ndim == 3
