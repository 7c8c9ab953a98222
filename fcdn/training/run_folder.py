"""A training run's output folder: its settings, test history, best model and resume point.

    folder = RunFolder("runs/hes", is_chief=True)
    state, resume_dir = folder.check(settings)     # None for a fresh run; ValueError for a foreign one
    folder.write_settings(settings)
    folder.write_history(history, number_classes)  # test_loss.csv, test_metrics.csv
    folder.save_best(export_model, weights, metadata)
    folder.save_resume(checkpoint, state)

Files (only the chief writes; every file and directory is swapped in whole by atomic_files):
    run_settings.json        the settings that define the run (a resumed run must match them)
    test_loss.csv            the test loss after every epoch, one value a line (as the reference)
    test_metrics.csv         epoch, step, test loss, pixel accuracy, mean IoU and per-class IoU
    checkpoint/ckpt*         the best model's weights (tf.train.Checkpoint, as the reference)
    saved_model/             the best model as a SavedModel (saved_model.load_saved_model loads it)
    training_curves.png      losses and test scores against the epoch, the best epoch marked
    test_predictions.png     the best model on up to 16 test records: true and predicted outlines
    tensorboard-<time>/      TensorBoard summaries under train/ and test/
    resume/                  model + optimizer checkpoint and state.json, to continue the run
    model.bioimageio.zip     with --export_bioimageio 1: a BioImage Model Zoo package of the best model
"""

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from fcdn.common import atomic_files, errors, qc_pictures
from fcdn.data import image_files, reader_worker, records
from fcdn.model import saved_model
from fcdn.training.run_files import (  # noqa: F401 (part of this module's API)
    BEST_CHECKPOINT_DIR,
    BIOIMAGEIO_PACKAGE,
    CKPT_PREFIX,
    CURVES_FILE,
    PREDICTIONS_FILE,
    RESUME_DIR,
    SAVED_MODEL_DIR,
    SETTINGS_FILE,
    STATE_FILE,
    TEST_LOSS_FILE,
    TEST_METRICS_FILE,
)

PREDICTION_RECORDS = 16
PREDICTION_BATCH = 4  # the records of one database share a shape
# outputs that mark a folder as holding a training run (ours or the reference's)
RUN_MARKERS = (SETTINGS_FILE, TEST_LOSS_FILE, TEST_METRICS_FILE, BEST_CHECKPOINT_DIR, SAVED_MODEL_DIR,
               RESUME_DIR)
# settings that must match for a run to continue in the same output folder
RUN_DEFINING = ("train_database", "test_database", "batch_size", "number_classes", "learning_rate",
                "test_every_n_steps", "balance_classes", "use_augmentation", "early_stopping",
                "model", "layers_per_block", "growth_rate", "dropout_rate", "seed", "mixed_precision",
                "augmentation", "crop_size", "lr_schedule", "decay_epochs", "weight_averaging",
                "weight_averaging_decay", "loss", "batch_norm_momentum", "warmup", "init_from")
# the values that settings written before a flag existed stand for
SETTINGS_DEFAULTS = {"crop_size": 0, "lr_schedule": "constant", "decay_epochs": None, "weight_averaging": 0,
                     "weight_averaging_decay": None, "loss": "cross_entropy",
                     "batch_norm_momentum": 0.9, "warmup": "constant", "init_from": None}


def write_failure_reason(error):
    """The gist of why a write failed: the OS's words, or the last words of TensorFlow's message
    without the `{{function_node ...}}` that an eager op's error starts with."""
    return errors.gist(error, last=True).split("}}")[-1].strip()


@contextlib.contextmanager
def writing(path, what):
    """A failed write (a full disk, say) as one ValueError line naming `path`. Every write of the run
    folder is swapped in whole by atomic_files, so the previous version is still in place."""
    try:
        yield
    except (OSError, tf.errors.OpError) as error:
        raise ValueError(f"{path}: cannot write {what} ({write_failure_reason(error)}); the previous "
                         f"version is kept, free the space and run the same command to continue") from None


def run_settings(args, augmentation):
    """The settings that define a run, from the trainer's arguments."""
    settings = {name: getattr(args, name) for name in RUN_DEFINING if hasattr(args, name)}
    settings["train_database"] = os.path.abspath(args.train_database)
    settings["test_database"] = os.path.abspath(args.test_database)
    settings["augmentation"] = augmentation.to_dict() if args.use_augmentation else None
    # a decaying schedule spans max_epochs, so they define the run; a constant rate leaves
    # max_epochs free (a finished run can be extended)
    decaying = getattr(args, "lr_schedule", "constant") != "constant"
    settings["decay_epochs"] = args.max_epochs if decaying else None
    if not getattr(args, "weight_averaging", 0):
        settings["weight_averaging_decay"] = None
    return settings


class RunFolder:
    """The output folder of one run; only the chief process writes into it."""

    def __init__(self, path, is_chief=True):
        self.path = path
        self.is_chief = is_chief

    def file(self, name):
        return os.path.join(self.path, name)

    def read_state(self):
        """The resume state: (state dict, resume directory) or (None, None).

        A resume point whose writer was killed between the two renames of its replacement is put
        back first. Only one run writes a folder, so no writer of an earlier attempt can still be
        alive, whatever node it ran on: the chief also clears the rest of what they left (before any
        worker of this run writes there; the others touch nothing but the resume point).
        """
        resume_dir = self.file(RESUME_DIR)
        if os.path.isdir(self.path):
            if self.is_chief:
                atomic_files.remove_leftovers(self.path, writer_may_live=False)
            atomic_files.recover_directory(resume_dir, writer_may_live=False)
        path = os.path.join(resume_dir, STATE_FILE)
        if not os.path.isfile(path):
            return None, None
        try:
            with open(path) as handle:
                return json.load(handle), resume_dir
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: unreadable resume state ({error})") from None

    def check(self, settings):
        """Return the resume state to continue from, (None, None) for a fresh run; ValueError if the
        folder holds another run's files."""
        if not os.path.isdir(self.path):
            if os.path.exists(self.path):
                raise ValueError(f"{self.path}: exists and is not a directory")
            return None, None
        results = sorted(name for name in os.listdir(self.path)
                         if name in RUN_MARKERS and name != SETTINGS_FILE)
        settings_path = self.file(SETTINGS_FILE)
        if not os.path.isfile(settings_path):
            if results:
                raise ValueError(f"{self.path}: holds another run's files ({', '.join(results)}) but no "
                                 f"{SETTINGS_FILE}; choose a new --output_dir")
            return None, None
        try:
            with open(settings_path) as handle:
                previous = dict(SETTINGS_DEFAULTS, **json.load(handle))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{settings_path}: unreadable ({error})") from None
        state, resume_dir = self.read_state()
        differences = [f"{name} {previous.get(name)!r} -> {settings.get(name)!r}" for name in RUN_DEFINING
                       if previous.get(name) != settings.get(name)]
        if differences and (state is not None or results):
            raise ValueError(f"{self.path}: holds a run with different settings ({'; '.join(differences)}); "
                             f"choose a new --output_dir or repeat that run's settings to resume it")
        # same settings: continue; different settings but the old run left no results: start afresh
        return (state, resume_dir) if not differences else (None, None)

    def write_settings(self, settings):
        if self.is_chief:
            with writing(self.file(SETTINGS_FILE), "the run settings"):
                os.makedirs(self.path, exist_ok=True)
                atomic_files.write_text(self.file(SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")

    def write_history(self, history, number_classes):
        """test_loss.csv (the reference's) and test_metrics.csv from the test passes so far."""
        if not self.is_chief:
            return
        with writing(self.file(TEST_LOSS_FILE), "the test history"):
            atomic_files.write_text(self.file(TEST_LOSS_FILE),
                                    "".join(f"{entry['test_loss']}\n" for entry in history))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["epoch", "global_step", "test_loss", "pixel_accuracy", "mean_iou"]
                        + [f"iou_class_{c}" for c in range(number_classes)])
        for entry in history:
            writer.writerow([entry["epoch"], entry["global_step"], entry["test_loss"], entry["pixel_accuracy"],
                             entry["mean_iou"]] + entry["iou"])
        with writing(self.file(TEST_METRICS_FILE), "the test history"):
            atomic_files.write_text(self.file(TEST_METRICS_FILE), text.getvalue())

    def save_resume(self, checkpoint, state):
        """Model + optimizer + state into resume/, swapped in whole. Every worker takes part (the
        save may all-reduce); workers other than the chief write to a scratch folder they delete."""
        if not self.is_chief:
            scratch = tempfile.mkdtemp(prefix="train-fcdensenet-worker-")
            try:
                checkpoint.write(os.path.join(scratch, CKPT_PREFIX))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        with writing(self.file(RESUME_DIR), "the resume point"), \
                atomic_files.replacing_directory(self.file(RESUME_DIR)) as staging:
            checkpoint.write(os.path.join(staging, CKPT_PREFIX))
            with open(os.path.join(staging, STATE_FILE), "w") as handle:
                json.dump(state, handle, indent=1)

    def save_best(self, export_model, weights, metadata):
        """The best weights as checkpoint/ckpt and as a SavedModel, each swapped in whole (chief only)."""
        if not self.is_chief:
            return
        export_model.set_weights(weights)
        with writing(self.file(BEST_CHECKPOINT_DIR), "the best model's checkpoint"), \
                atomic_files.replacing_directory(self.file(BEST_CHECKPOINT_DIR)) as staging:
            tf.train.Checkpoint(model=export_model).write(os.path.join(staging, CKPT_PREFIX))
        with writing(self.file(SAVED_MODEL_DIR), "the best model"):
            saved_model.export_saved_model(export_model, self.file(SAVED_MODEL_DIR),
                                           extra_metadata={"training": metadata})

    def write_curves(self, history, best_epoch):
        if self.is_chief and history:
            with writing(self.file(CURVES_FILE), "the training curves"):
                qc_pictures.write_training_curves(self.file(CURVES_FILE), history, best_epoch)

    def write_test_predictions(self, predict, test_database, epoch):
        """The best model on the first PREDICTION_RECORDS test records, with true and predicted outlines.

        `predict` maps a float32 NHWC batch to the softmax: a tf.function, since the model called
        eagerly spends much of its time outside the convolutions."""
        if not self.is_chief:
            return
        found = first_records(test_database, PREDICTION_RECORDS)
        examples = []
        for start in range(0, len(found), PREDICTION_BATCH):
            batch = found[start:start + PREDICTION_BATCH]
            images = np.stack([image_files.zscore_normalize(record.image) for _, record in batch])
            predicted = np.argmax(np.asarray(predict(images)), axis=-1)
            examples += [(key.split(":")[0], record.image, record.mask, mask)
                         for (key, record), mask in zip(batch, predicted)]
        if examples:
            with writing(self.file(PREDICTIONS_FILE), "the test predictions"):
                qc_pictures.write_test_predictions(self.file(PREDICTIONS_FILE), examples,
                                                   f"best model, epoch {epoch}")


def first_records(database, count):
    """(key text, Record) of the first `count` records of a database, in key order."""
    env = reader_worker.open_env(database)
    try:
        with env.begin() as transaction:
            found = []
            for key, value in transaction.cursor():
                found.append((bytes(key).decode("ascii", "replace"), records.decode_record(value)))
                if len(found) == count:
                    break
            return found
    finally:
        env.close()


def export_bioimageio_package(output_dir):
    """--export_bioimageio 1: the finished run's best model as output_dir/model.bioimageio.zip, its test
    image the first record of the test database; ValueError (one line) if the export fails."""
    from fcdn.export import bioimageio

    bioimageio.export_package(os.path.join(output_dir, SAVED_MODEL_DIR), os.path.join(output_dir, BIOIMAGEIO_PACKAGE))
