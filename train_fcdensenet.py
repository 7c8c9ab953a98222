"""Train an FC-DenseNet on the LMDB databases written by build_lmdb.py.

    python train_fcdensenet.py --train_database data/train-HES.lmdb --test_database data/test-HES.lmdb \
        --output_dir runs/hes
    python train_fcdensenet.py --train_database data/train-HES.lmdb --test_database data/test-HES.lmdb \
        --output_dir runs/hes67 --model FCDenseNet67 --batch_size 8 --augmentation_config augment.json
    srun python train_fcdensenet.py ...     # SLURM, one task per node: MultiWorkerMirroredStrategy

One process drives every visible GPU through MirroredStrategy (all logical CPUs when there is no GPU);
with TF_CONFIG set, or under SLURM with more than one task, MultiWorkerMirroredStrategy spans nodes.
The first epoch is a warm-up of min(1000, test_every_n_steps) steps at learning_rate / 10 (or rising
from it to learning_rate, with --warmup linear); every later
epoch is test_every_n_steps steps at learning_rate (or on a schedule decaying to zero at max_epochs),
followed by a pass over the whole test set (of the weight average, with --weight_averaging 1).

Files in output_dir (written by the chief worker only):
    run_settings.json        the settings that define this run (a resumed run must match them)
    test_loss.csv            the test loss after every epoch, one value a line (as the reference)
    test_metrics.csv         epoch, step, test loss, pixel accuracy, mean IoU and per-class IoU
    checkpoint/ckpt*         the best model's weights (tf.train.Checkpoint, as the reference)
    saved_model/             the best model as a SavedModel (fcdensenet.load_saved_model loads it)
    tensorboard-<time>/      TensorBoard summaries under train/ and test/
    resume/                  model + optimizer checkpoint and state.json, to continue an interrupted run

Ctrl-C or SIGTERM (SLURM preemption) ends the current step, saves resume/ and exits with status 128 +
the signal number (130 for SIGINT, 143 for SIGTERM); running the same command again continues the
run. A second Ctrl-C aborts at once (the last epoch's resume point stays valid).
"""

import argparse
import contextlib
import gc
import math
import os
import re
import signal
import sys
import time

import numpy as np

from augment import AugmentationConfig
from fcdn.common.segmentation_metrics import segmentation_metrics
from fcdn.data.records import SIZE_FACTOR
from imagereader import ImageReader, ReaderError

if __name__ != "__mp_main__":
    # The reader starts its workers with 'spawn', which re-imports this script (as __mp_main__) in
    # every worker. They need no TensorFlow: skipping it saves each one seconds and ~0.5 GB.
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    import fcdensenet
    from fcdn.training.recipe import (
        DEFAULT_AVERAGE_DECAY,
        LOSSES,
        LR_SCHEDULES,
        WARMUPS,
        RatePlan,
        WeightAverage,
        learning_rate_at,
        per_example_loss,
    )
    from fcdn.training.run_folder import (
        BIOIMAGEIO_PACKAGE,
        CKPT_PREFIX,
        SAVED_MODEL_DIR,
        RunFolder,
        run_settings,
        write_failure_reason,
    )

CONVERGENCE_TOLERANCE = 1e-4  # the reference's: test losses this close count as equal
MAX_WARMUP_STEPS = 1000
WARMUP_LR_DIVISOR = 10.0



class OneLineErrorParser(argparse.ArgumentParser):
    """A flag mistake is one line, `error: ...`, like every other mistake the trainer reports (the
    usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None):
    parser = OneLineErrorParser(
        description="Train an FC-DenseNet segmentation model on LMDB databases (see build_lmdb.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_database", required=True, help="training LMDB directory")
    parser.add_argument("--test_database", required=True, help="test LMDB directory")
    parser.add_argument("--output_dir", required=True,
                        help="where checkpoints, CSVs, TensorBoard logs and the SavedModel go")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per replica and step")
    parser.add_argument("--number_classes", type=int, default=2, help="classes in the masks (0 = background)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate after warm-up")
    parser.add_argument("--test_every_n_steps", type=int, default=1000,
                        help="training steps per epoch; the test set is evaluated after each epoch")
    parser.add_argument("--balance_classes", type=int, default=0, choices=(0, 1),
                        help="1: draw training records class-balanced (pick a class, then a record with it)")
    parser.add_argument("--use_augmentation", type=int, default=1, choices=(0, 1),
                        help="1: augment training examples (see --augmentation_config)")
    parser.add_argument("--early_stopping", type=int, default=10,
                        help="stop after this many epochs without a test loss improvement > 1e-4")
    parser.add_argument("--reader_count", type=int, default=1, help="reader processes per replica")
    parser.add_argument("--model", default=fcdensenet.DEFAULT_VARIANT, choices=sorted(fcdensenet.VARIANTS),
                        help="FC-DenseNet variant")
    parser.add_argument("--layers_per_block", type=int, default=None,
                        help="override the variant's layers per dense block (every block); "
                             "unset: the variant's")
    parser.add_argument("--growth_rate", type=int, default=None,
                        help="override the variant's growth rate; unset: the variant's")
    parser.add_argument("--dropout_rate", type=float, default=0.2,
                        help="dropout rate of the dense layers and transitions down")
    parser.add_argument("--batch_norm_momentum", type=float, default=fcdensenet.BN_MOMENTUM,
                        help="momentum of the BatchNormalization moving statistics, which the test passes "
                             "and the exported model normalise with: an average over about the last "
                             "1 / (1 - momentum) steps (the reference's 0.9: 10 steps)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for weight initialisation, dropout and the readers; unset: random")
    parser.add_argument("--augmentation_config", default=None,
                        help="JSON file of augmentation settings (augment.AugmentationConfig fields); "
                             "unset: the reference's settings")
    parser.add_argument("--crop_size", type=int, default=0,
                        help="train on a random crop_size x crop_size window (a multiple of 32) of each "
                             "record, normalised with the whole record's statistics as at inference; "
                             "0: whole records. The test pass always uses whole records")
    parser.add_argument("--max_epochs", type=int, default=None,
                        help="stop after this many epochs (the warm-up counts); unset: no limit")
    parser.add_argument("--mixed_precision", type=int, default=0, choices=(0, 1),
                        help="1: mixed_float16 compute with loss scaling (needs a GPU)")
    parser.add_argument("--log_every_n_steps", type=int, default=100, help="steps between progress lines")
    parser.add_argument("--export_bioimageio", type=int, default=0, choices=(0, 1),
                        help=f"1: when the run finishes, also write output_dir/{BIOIMAGEIO_PACKAGE}, a BioImage "
                             "Model Zoo package of the best model (export_bioimageio.py; needs "
                             "requirements-bioimageio.txt)")
    parser.add_argument("--lr_schedule", default="constant", choices=LR_SCHEDULES,
                        help="learning rate after the warm-up: constant (the reference's), or decaying to "
                             "zero at the end of --max_epochs (required) by a half cosine or nnU-Net's "
                             "poly (1 - t)^0.9")
    parser.add_argument("--warmup", default="constant", choices=WARMUPS,
                        help="the warm-up epoch: at learning_rate / 10 (constant, the reference's), or rising "
                             "from it in a straight line to learning_rate (linear)")
    parser.add_argument("--weight_averaging", type=int, default=0, choices=(0, 1),
                        help="1: keep an exponential moving average of the weights; the test passes score "
                             "it and the best model exported is it")
    parser.add_argument("--weight_averaging_decay", type=float, default=DEFAULT_AVERAGE_DECAY,
                        help="decay of the average, in (0, 1); the decay of update n is min(decay, "
                             "(1 + n) / (10 + n)), so a short run averages its own last ~10%% of steps")
    parser.add_argument("--loss", default="cross_entropy", choices=LOSSES,
                        help="training and test loss: cross-entropy (the reference's), or plus the soft "
                             "Dice of the foreground classes (nnU-Net's); early stopping follows it")
    return parser.parse_args(argv)


def check_args(args):
    """Raise ValueError for settings no run can use (before anything is started)."""
    for name in ("batch_size", "test_every_n_steps", "reader_count", "log_every_n_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.number_classes < 2:
        raise ValueError(f"--number_classes must be >= 2, got {args.number_classes}")
    if args.early_stopping < 0:
        raise ValueError(f"--early_stopping must be >= 0, got {args.early_stopping}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max_epochs must be >= 1, got {args.max_epochs}")
    if not 0 <= args.dropout_rate < 1:
        raise ValueError(f"--dropout_rate must be in [0, 1), got {args.dropout_rate}")
    if not 0 < args.batch_norm_momentum < 1:
        raise ValueError(f"--batch_norm_momentum must be in (0, 1), got {args.batch_norm_momentum}")
    if args.crop_size < 0 or args.crop_size % SIZE_FACTOR:
        raise ValueError(f"--crop_size must be 0 or a positive multiple of {SIZE_FACTOR}, "
                         f"got {args.crop_size}")
    if args.lr_schedule != "constant" and args.max_epochs is None:
        raise ValueError(f"--lr_schedule {args.lr_schedule} needs --max_epochs (the rate decays to zero there)")
    if args.weight_averaging and not 0 < args.weight_averaging_decay < 1:
        raise ValueError(f"--weight_averaging_decay must be in (0, 1), got {args.weight_averaging_decay}")
    for name in ("layers_per_block", "growth_rate"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("train_database", "test_database"):
        path = getattr(args, name)
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such database (an LMDB directory written by build_lmdb.py)")
    if args.export_bioimageio:  # fail now rather than after the training
        import export_bioimageio

        export_bioimageio.check_dependencies()
    if args.mixed_precision and not tf.config.list_physical_devices("GPU"):
        raise ValueError("--mixed_precision 1 needs a GPU (float16 compute is slower than float32 on "
                         "the CPU, and this machine shows no GPU to TensorFlow)")


# ----------------------------------------------------------------------------------------------
# early stopping


def early_stopping_status(test_losses, patience, tolerance=CONVERGENCE_TOLERANCE):
    """Return (best_epoch, stop) for a test loss history, with the reference's rule.

    The best epoch is the first whose loss is within `tolerance` of the minimum; training stops once
    the number of epochs run minus the best epoch exceeds `patience`.
    """
    if not test_losses:
        return None, False
    losses = np.asarray(test_losses, dtype=np.float64)
    best_epoch = int(np.flatnonzero(np.abs(losses - losses.min()) < tolerance)[0])
    return best_epoch, len(losses) - best_epoch > patience


# ----------------------------------------------------------------------------------------------
# distribution


def make_strategy():
    """MultiWorkerMirroredStrategy for a multi-node job, else MirroredStrategy over local devices."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def worker_info(strategy):
    """(is_chief, worker index, number of workers) of this process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0, 1
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(tasks) for name, tasks in spec.items() if name in ("chief", "worker"))
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    if task_type == "chief":
        return True, 0, workers
    offset = 1 if "chief" in spec else 0
    return task_type == "worker" and task_id == 0 and offset == 0, task_id + offset, workers


def distribute(strategy, make_dataset, global_batch_size):
    """A distributed dataset: each worker batches its own stream per replica (no sharding needed,
    every worker has its own readers), and replicas take consecutive batches in turn."""
    def dataset_fn(context):
        batch = context.get_per_replica_batch_size(global_batch_size)
        return make_dataset().batch(batch, drop_remainder=True).prefetch(1)
    return strategy.distribute_datasets_from_function(dataset_fn)


# ----------------------------------------------------------------------------------------------
# model, loss and steps


def build_model(args, number_channels):
    return fcdensenet.build_model(args.model, number_channels=number_channels,
                                  number_classes=args.number_classes, dropout_rate=args.dropout_rate,
                                  layers_per_block=args.layers_per_block, growth_rate=args.growth_rate,
                                  batch_norm_momentum=args.batch_norm_momentum)


def rate_plan(args, warmup_steps):
    """The learning-rate plan of a run: the warm-up epoch at learning_rate / 10, then the schedule,
    which (decaying) reaches zero at the end of epoch max_epochs - 1, the warm-up counted."""
    total_steps = None
    if args.max_epochs is not None:
        total_steps = warmup_steps + (args.max_epochs - 1) * args.test_every_n_steps
    return RatePlan(warmup_steps=warmup_steps, warmup_rate=args.learning_rate / WARMUP_LR_DIVISOR,
                    rate=args.learning_rate, schedule=args.lr_schedule, total_steps=total_steps,
                    warmup=args.warmup)


def build_optimizer(strategy, model, learning_rate, mixed_precision=False):
    """Adam, built inside the strategy scope before the first distributed step (see STACK-NOTES)."""
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        if mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return optimizer


def make_train_step(strategy, model, optimizer, global_batch_size, loss_name="cross_entropy", average=None):
    """step(iterator, stop) -> [loss, correct pixels, pixels, stop votes], summed over all replicas.

    Each replica divides its summed loss by the GLOBAL batch size, so that the all-reduced gradient
    is the gradient of the mean over the global batch whatever the replica count. `stop` (0 or 1 per
    worker) is summed with the rest so every worker learns in the same step that one was signalled.
    `average` (a WeightAverage) is updated after the optimizer step, in cross-replica context.
    """
    replicas = strategy.num_replicas_in_sync
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(images, masks, stop):
        labels = tf.cast(masks, tf.int32)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = tf.reduce_sum(per_example_loss(labels, probabilities, loss_name)) / global_batch_size
            objective = loss
            if model.losses:  # L2 terms: counted once over the sum of the replicas
                objective += tf.add_n(model.losses) / replicas
            if scaled:
                objective = optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
        pixels = tf.cast(tf.size(labels), tf.float32)
        return tf.stack([loss, correct, pixels, stop])

    @tf.function
    def apply(images, masks, stop):
        per_replica = strategy.run(replica_step, args=(images, masks, stop))
        if average is not None:
            average.update()
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def step(iterator, stop):
        # the batch is fetched before the compiled step, not inside it: there, a reader's failure at
        # the fetch still let the counters that do not wait for the data (Adam's iterations, the
        # average's updates) advance while the weights did not, so the resume point was off by one
        images, masks = next(iterator)
        return apply(images, masks, stop)

    return step


def make_test_step(strategy, model, number_classes, loss_name="cross_entropy"):
    """step(iterator, stop) -> ([loss sum, examples, stop votes], confusion matrix), summed over replicas.

    Examples carry a weight (0 for the padding of the last batch of a pass) so a pass counts every
    test record exactly once.
    """
    def replica_step(images, masks, weights, stop):
        labels = tf.cast(masks, tf.int32)
        probabilities = model(images, training=False)
        loss_sum = tf.reduce_sum(per_example_loss(labels, probabilities, loss_name) * weights)
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        pixel_weights = tf.broadcast_to(weights[:, None, None], tf.shape(labels))
        confusion = tf.math.confusion_matrix(tf.reshape(labels, [-1]), tf.reshape(predicted, [-1]),
                                             num_classes=number_classes,
                                             weights=tf.reshape(pixel_weights, [-1]), dtype=tf.float32)
        return tf.stack([loss_sum, tf.reduce_sum(weights), stop]), confusion

    @tf.function
    def step(iterator, stop):
        images, masks, weights = next(iterator)
        totals, confusion = strategy.run(replica_step, args=(images, masks, weights, stop))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, totals, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, confusion, axis=None))

    return step


def make_statistics_sync(strategy, model):
    """sync() sets every replica's BatchNormalization moving statistics to their mean over all
    replicas (on every worker). Keras 3 keeps one copy per replica, each updated from that replica's
    batches only, so without this the replicas would test with different statistics and the saved
    model would hold replica 0's alone."""
    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    statistics = [layer.moving_mean for layer in layers] + [layer.moving_variance for layer in layers]

    @tf.function
    def sync():
        if not statistics:
            return
        # one flat vector: a single all-reduce instead of one per variable
        local = strategy.run(lambda: tf.concat([tf.reshape(v.value, [-1]) for v in statistics], axis=0))
        means = strategy.reduce(tf.distribute.ReduceOp.MEAN, local, axis=None)
        for variable, mean in zip(statistics, tf.split(means, [int(np.prod(v.shape)) for v in statistics])):
            variable.assign(tf.reshape(mean, variable.shape))

    return sync


def weighted_test_stream(dataset, examples, pass_length):
    """Tag each example of an endless ordered stream with weight 1 for the first `examples` of every
    `pass_length` (a test pass), 0 for the rest (padding to whole batches)."""
    def tag(index, example):
        image, mask = example
        return image, mask, tf.cast(index % pass_length < examples, tf.float32)
    return dataset.enumerate().map(tag)


# ----------------------------------------------------------------------------------------------
# TensorBoard


def write_scalars(writer, step, values):
    """Scalar summaries TensorBoard's scalars dashboard reads. tf.summary.scalar needs the
    tensorboard package, which tensorflow no longer installs; tf.summary.write with the scalars
    plugin's metadata writes the same event records without it."""
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="scalars"))
    try:
        with writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)
        writer.flush()
    except tf.errors.OpError as error:  # a full disk: the writes fail at the flush
        events = re.search(r"(\S*events\.out\.tfevents\S*?);", str(error))
        raise ValueError(f"{events.group(1) + ': ' if events else ''}cannot write the TensorBoard summaries "
                         f"({write_failure_reason(error)}); the summaries written so far are kept, free the "
                         f"space and run the same command to continue") from None


# ----------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """Records SIGINT/SIGTERM so the loop can end the current step cleanly; a second SIGINT aborts."""

    def __init__(self):
        self.signal_number = None

    def install(self):
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signal_number, frame):
        # no printing here: the handler may interrupt a print of the main thread
        if self.signal_number is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_number is None:
            self.signal_number = signal_number

    @property
    def name(self):
        return signal.Signals(self.signal_number).name if self.requested else None

    @property
    def requested(self):
        return self.signal_number is not None

    def vote(self):
        return tf.constant(1.0 if self.requested else 0.0)


class Interrupted(Exception):
    """A step returned with a stop vote: save the resume point and exit."""


RESUME_ON_EVERY_NODE = "the last resume point is kept, run the same command on every node to continue"


def op_error_message(error):
    """The one-line gist of a TensorFlow error: a reader's failure surfacing through tf.data (the
    reader's own message), or the loss of another worker of a multi-worker run."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if "ReaderError" in line:
            return line.split("ReaderError:", 1)[-1].strip()
    if "stopped sending heartbeats" in text:
        lost = sorted(set(re.findall(r"/job:worker/replica:\d+/task:(\d+)", text)), key=int)
        who = f"worker {', '.join(lost)}" if lost else "another worker"
        return f"{who} of this run stopped (its log says why); {RESUME_ON_EVERY_NODE}"
    if "Collective" in text:  # a worker that left mid-step, or one already in another all-reduce
        return (f"an all-reduce with the other workers failed: one of them stopped (its log says why); "
                f"{RESUME_ON_EVERY_NODE}")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and line.strip() != "Graph execution error:"]
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# training


class Trainer:
    """The training loop's state: one instance per run, driven by run()."""

    def __init__(self, args, strategy, folder, local_replicas, train_reader, test_reader, settings, stop):
        self.args = args
        self.folder = folder
        is_chief = self.is_chief = folder.is_chief
        self.workers = strategy.num_replicas_in_sync // local_replicas
        self.strategy = strategy
        self.stop = stop
        self.settings = settings
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = args.batch_size * self.replicas
        self.train_reader = train_reader
        self.test_reader = test_reader
        channels = train_reader.get_image_size()[2]
        self.warmup_steps = min(MAX_WARMUP_STEPS, args.test_every_n_steps)

        if is_chief:  # a plain float32 copy for the checkpoint and the SavedModel, outside the strategy
            self.export_model = build_model(args, channels)
            self.export_predict = tf.function(
                lambda images: self.export_model(images, training=False),
                input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32)])
        if args.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():
            self.model = build_model(args, channels)
        self.optimizer = build_optimizer(strategy, self.model, args.learning_rate, args.mixed_precision)
        self.rate_plan = rate_plan(args, self.warmup_steps)
        self.average = None
        tracked = {"model": self.model, "optimizer": self.optimizer}
        if args.weight_averaging:
            with strategy.scope():
                self.average = tracked["weight_average"] = WeightAverage(
                    self.model.trainable_variables, args.weight_averaging_decay)
        self.checkpoint = tf.train.Checkpoint(**tracked)
        self.train_step = make_train_step(strategy, self.model, self.optimizer, self.global_batch, args.loss,
                                          self.average)
        self.test_step = make_test_step(strategy, self.model, args.number_classes, args.loss)
        self.sync_statistics = make_statistics_sync(strategy, self.model)

        self.train_iterator = iter(distribute(strategy, train_reader.get_tf_dataset, self.global_batch))
        self.test_examples = test_reader.get_image_count()
        per_worker_batch = args.batch_size * local_replicas  # each worker passes over the whole test set
        self.test_steps = math.ceil(self.test_examples / per_worker_batch)
        pass_length = self.test_steps * per_worker_batch
        self.test_iterator = iter(distribute(strategy, lambda: weighted_test_stream(
            test_reader.get_tf_dataset(), self.test_examples, pass_length), self.global_batch))
        self.state = None
        self.writers = None
        self.traced = False

    def fresh_state(self):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best_epoch": None,
                "finished": None, "tensorboard_dir": f"tensorboard-{stamp}", "replicas": self.replicas}

    def restore(self, state, resume_dir):
        self.checkpoint.read(os.path.join(resume_dir, CKPT_PREFIX)).assert_existing_objects_matched()
        if state.get("replicas") != self.replicas:
            self.print(f"note: the run used {state.get('replicas')} replicas, now {self.replicas}: the "
                       f"global batch is now {self.global_batch}")
            state["replicas"] = self.replicas
        self.state = state

    def open_writers(self):
        if not self.is_chief:
            return {"train": tf.summary.create_noop_writer(), "test": tf.summary.create_noop_writer()}
        root = self.folder.file(self.state["tensorboard_dir"])
        return {name: tf.summary.create_file_writer(os.path.join(root, name)) for name in ("train", "test")}

    def epoch_steps(self, epoch):
        """Training steps of an epoch: the first is the warm-up."""
        return self.warmup_steps if epoch == 0 else self.args.test_every_n_steps

    def run(self):
        self.writers = self.open_writers()
        while self.state["finished"] is None:
            self.train_epoch()
            self.test_epoch()
        return self.state

    def train_epoch(self):
        state = self.state
        steps = self.epoch_steps(state["epoch"])
        interval_sums = np.zeros(3)
        interval_steps, timed_steps, interval_start = 0, 0, time.perf_counter()
        while state["step_in_epoch"] < steps:
            # from the global step alone, so that a resumed run continues the schedule exactly
            learning_rate = learning_rate_at(state["global_step"], self.rate_plan)
            self.optimizer.learning_rate = learning_rate
            loss_sum, correct, pixels, votes = self.train_step(self.train_iterator, self.stop.vote()).numpy()
            # the epoch's mean train loss, for training_curves.png (kept in the state across a resume)
            state["epoch_loss"] = state.get("epoch_loss", 0.0) + float(loss_sum)
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            interval_sums += (loss_sum, correct, pixels)
            interval_steps += 1
            timed_steps += 1
            if not self.traced:  # the first step traces the function: keep it out of images/s
                self.traced, timed_steps, interval_start = True, 0, time.perf_counter()
            if interval_steps == self.args.log_every_n_steps or state["step_in_epoch"] == steps:
                elapsed = time.perf_counter() - interval_start
                self.log_train(interval_sums, interval_steps, timed_steps, elapsed, steps, learning_rate)
                interval_sums[:] = 0
                interval_steps, timed_steps, interval_start = 0, 0, time.perf_counter()
            if self.stop_agreed(votes):
                raise Interrupted
            self.check_readers()

    def check_readers(self):
        """ReaderError if a worker of either reader has died: the test reader is read only between
        epochs (and tf.data reads ahead), so its worker's death would go unnoticed for an epoch."""
        self.train_reader.check()
        self.test_reader.check()

    def reader_failure(self):
        return self.train_reader.failure or self.test_reader.failure

    def stop_agreed(self, votes):
        """Stop now? One worker acts on its own signal at once; several stop together, in the step
        after any of them was signalled (the votes of that step say so on every worker)."""
        return votes > 0 or (self.workers == 1 and self.stop.requested)

    def log_train(self, sums, steps, timed_steps, elapsed, epoch_steps, learning_rate):
        state = self.state
        loss = sums[0] / steps
        accuracy = sums[1] / sums[2]
        # the first step of a process traces the step function: it has no meaningful rate
        images_per_second = timed_steps * self.global_batch / elapsed if timed_steps else float("nan")
        queue = queue_text(self.train_reader)
        if self.is_chief:
            print(f"epoch {state['epoch']} step {state['step_in_epoch']}/{epoch_steps} "
                  f"(global {state['global_step']}) loss {loss:.6f} accuracy {accuracy:.4f} "
                  f"lr {learning_rate:.2e} images/s {images_per_second:.1f}{queue}", flush=True)
        write_scalars(self.writers["train"], state["global_step"],
                      {"loss": loss, "accuracy": accuracy, "learning_rate": learning_rate,
                       "images_per_second": images_per_second})

    def test_epoch(self):
        state = self.state
        self.sync_statistics()
        with self.scored_weights():  # the test pass and the export see the same weights
            entry, iou = self.test_pass()
            state["history"].append(entry)
            best_epoch, stop = early_stopping_status([e["test_loss"] for e in state["history"]],
                                                     self.args.early_stopping)
            state["best_epoch"] = best_epoch
            iou_text = " ".join(f"{value:.4f}" for value in iou)
            self.print(f"test epoch {state['epoch']}: loss {entry['test_loss']:.6f} pixel accuracy "
                       f"{entry['pixel_accuracy']:.4f} mean IoU {entry['mean_iou']:.4f} IoU per class "
                       f"[{iou_text}] (best epoch {best_epoch})")
            scalars = {"loss": entry["test_loss"], "pixel_accuracy": entry["pixel_accuracy"],
                       "mean_iou": entry["mean_iou"]}
            scalars.update({f"iou/class_{index}": value for index, value in enumerate(iou)})
            write_scalars(self.writers["test"], state["global_step"], scalars)
            self.folder.write_history(state["history"], self.args.number_classes)
            self.folder.write_curves(state["history"], best_epoch)
            if best_epoch == state["epoch"]:
                self.save_best(entry)

        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if stop:
            state["finished"] = (f"early stopping: {len(state['history']) - best_epoch - 1} epochs without "
                                 f"improvement since epoch {best_epoch}")
        elif self.args.max_epochs is not None and len(state["history"]) >= self.args.max_epochs:
            state["finished"] = f"max_epochs {self.args.max_epochs} reached"
        self.save_resume()  # the trained weights: the average lives in its own checkpoint slot

    def scored_weights(self):
        """The weights the test pass scores and the best model exports: the average, if kept."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def test_pass(self):
        """One pass over the test set: (its history entry, the per-class IoU with NaN for absent classes)."""
        totals = np.zeros(3)
        confusion = np.zeros((self.args.number_classes,) * 2)
        for _ in range(self.test_steps):
            step_totals, step_confusion = self.test_step(self.test_iterator, self.stop.vote())
            totals += step_totals.numpy()
            confusion += step_confusion.numpy()
            if self.stop_agreed(totals[2]):
                raise Interrupted  # the epoch's training is done: a resumed run starts with this test
            self.check_readers()
        accuracy, iou, mean_iou = segmentation_metrics(confusion)
        train_loss = self.state.pop("epoch_loss", None)  # the pass is complete: the epoch's mean goes in its entry
        entry = {"epoch": self.state["epoch"], "global_step": self.state["global_step"],
                 "test_loss": float(totals[0] / totals[1]), "pixel_accuracy": accuracy, "mean_iou": mean_iou,
                 "train_loss": None if train_loss is None else train_loss / max(1, self.state["step_in_epoch"]),
                 "learning_rate": self.epoch_rate(),
                 "iou": [None if math.isnan(value) else float(value) for value in iou]}
        return entry, iou

    def epoch_rate(self):
        """The mean learning rate of the epoch's steps, for training_curves.png."""
        end = self.state["global_step"]
        steps = range(end - self.epoch_steps(self.state["epoch"]), end)
        return float(np.mean([learning_rate_at(step, self.rate_plan) for step in steps]))

    def save_best(self, entry):
        weights = self.model.get_weights()  # on every worker: reading may all-reduce
        if not self.is_chief:
            return
        metadata = dict(self.settings, epoch=entry["epoch"], global_step=entry["global_step"],
                        test_loss=entry["test_loss"], pixel_accuracy=entry["pixel_accuracy"],
                        mean_iou=entry["mean_iou"])
        self.folder.save_best(self.export_model, weights, metadata)
        self.folder.write_test_predictions(self.export_predict, self.args.test_database, entry["epoch"])
        self.print(f"saved the best model (epoch {entry['epoch']}) to {self.folder.file(SAVED_MODEL_DIR)}")

    def save_resume(self):
        self.sync_statistics()
        self.folder.save_resume(self.checkpoint, self.state)

    def release_input(self):
        """Run the input iterators dry, then free them and the steps that traced them.

        Called once the readers have shut down, so the datasets end at once. Left to the
        interpreter's exit, tearing the iterators down took 7-16 s a run here, and two minutes after
        the 10-minute quick start, all of it after the last line of output (a Ctrl-C or a SLURM
        preemption waited as long); drained first, it takes under a second.
        """
        for iterator in (self.train_iterator, self.test_iterator):
            try:
                for _ in iterator:
                    pass
            except tf.errors.OpError:  # a failed reader: its error has been reported already
                pass
        # the traced steps before the iterators they captured; both sit in reference cycles
        self.train_step = self.test_step = None
        gc.collect()
        self.train_iterator = self.test_iterator = None
        gc.collect()

    def print(self, text):
        if self.is_chief:
            print(text, flush=True)


def queue_text(reader):
    """' queue <ready>/<capacity>': examples waiting in the reader's output queue, when it can tell."""
    try:
        depth = reader.queue_depth()
    except (AttributeError, OSError, ValueError):  # an older reader, or one shutting down
        return ""
    if depth is None:
        return ""
    capacity = getattr(reader, "capacity", None)
    return f" queue {depth}/{capacity}" if capacity else f" queue {depth}"


# ----------------------------------------------------------------------------------------------
# stages


def load_augmentation(args):
    if args.augmentation_config is None:
        return AugmentationConfig()
    return AugmentationConfig.from_json(args.augmentation_config)


def derived_seed(seed, *streams):
    """An independent seed for each (worker, resume step): a resumed run draws new examples and
    dropout masks instead of replaying those of the run's start."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])


def open_readers(args, stack, local_replicas, worker_index, augmentation, global_step=0):
    """Start the train and test readers (shut down by `stack` on every exit path)."""
    seed = derived_seed(args.seed, worker_index, global_step)
    train_reader = ImageReader(args.train_database, use_augmentation=bool(args.use_augmentation),
                               balance_classes=bool(args.balance_classes), shuffle=True,
                               num_workers=args.reader_count * local_replicas,
                               number_classes=args.number_classes, augmentation_config=augmentation,
                               seed=seed, crop_size=args.crop_size, name="train")
    # one ordered worker for the test set, so that a pass sees every record exactly once
    test_reader = ImageReader(args.test_database, use_augmentation=False, balance_classes=False,
                              shuffle=False, num_workers=1, number_classes=args.number_classes, seed=seed,
                              name="test")
    train_channels, test_channels = train_reader.get_image_size()[2], test_reader.get_image_size()[2]
    if train_channels != test_channels:
        raise ValueError(f"{args.test_database}: {test_channels} channel(s) but the train database "
                         f"{args.train_database} has {train_channels}")
    for reader in (train_reader, test_reader):
        stack.enter_context(reader)
    return train_reader, test_reader


def print_setup(args, trainer, workers, augmentation):
    height, width, channels = trainer.train_reader.record_shape
    local = trainer.replicas // workers
    crops = f" (training on {args.crop_size}x{args.crop_size} crops)" if args.crop_size else ""
    print(f"train records: {trainer.train_reader.get_image_count()}  test records: {trainer.test_examples}  "
          f"image size: {height}x{width}{crops}  channels: {channels}  classes: {args.number_classes}")
    print(f"workers: {workers}  replicas: {trainer.replicas} ({local} per worker)  "
          f"global batch: {trainer.global_batch}  readers: {args.reader_count * local} per worker  "
          f"test steps per pass: {trainer.test_steps}")
    print(f"model: {trainer.model.name}  parameters: {trainer.model.count_params():,}  "
          f"dropout: {args.dropout_rate:g}  batch-norm momentum: {args.batch_norm_momentum:g}  "
          f"mixed precision: {bool(args.mixed_precision)}")
    schedule = (f"at {args.learning_rate:g}" if args.lr_schedule == "constant" else
                f"from {args.learning_rate:g} ({args.lr_schedule}) to 0 at step {trainer.rate_plan.total_steps}")
    start = args.learning_rate / WARMUP_LR_DIVISOR
    warmup = (f"rising from {start:g} to {args.learning_rate:g}" if args.warmup == "linear" else f"at {start:g}")
    print(f"epochs: warm-up {trainer.warmup_steps} steps {warmup}, "
          f"then {args.test_every_n_steps} steps {schedule}; early stopping "
          f"{args.early_stopping}; max epochs {args.max_epochs or 'no limit'}")
    average = (f"weight average (decay {args.weight_averaging_decay:g}) tested and exported"
               if args.weight_averaging else "no weight average")
    print(f"loss: {args.loss}; {average}")
    if args.use_augmentation:
        print("augmentation: " + ", ".join(f"{k}={v}" for k, v in augmentation.to_dict().items()))
    else:
        print("augmentation: off")
    sys.stdout.flush()


def save_and_exit(trainer, stop, note):
    """Save the resume point after a stop signal; return the exit status, 128 + the signal number."""
    trainer.save_resume()
    state = trainer.state
    print(f"received {stop.name}: saved a resume point at epoch {state['epoch']} step "
          f"{state['step_in_epoch']}{note}; run the same command to continue", flush=True)
    return 128 + stop.signal_number


def save_after_reader_failure(trainer):
    """A reader worker died or failed: save the last completed step (alone: with other workers the
    save would be collective, so the last resume point stands), raise its error as one line."""
    failure = trainer.reader_failure()
    if trainer.workers > 1:
        # saving is collective, and the other workers are already in the next step: it could only
        # fail, after a wait; they stop when this worker leaves
        raise ReaderError(f"{failure}; the other workers stop with this one; {RESUME_ON_EVERY_NODE}") from None
    try:
        trainer.save_resume()
    except (OSError, tf.errors.OpError) as error:
        raise ReaderError(f"{failure}; could not save a resume point ({op_error_message(error)}), "
                          f"the previous one is kept") from None
    state = trainer.state
    advice = ", run the same command to continue" if failure.died else ""
    raise ReaderError(f"{failure}; saved a resume point at epoch {state['epoch']} step "
                      f"{state['step_in_epoch']}{advice}") from None


def train(args, stop):
    augmentation = load_augmentation(args)
    strategy = make_strategy()
    is_chief, worker_index, workers = worker_info(strategy)
    settings = run_settings(args, augmentation)
    folder = RunFolder(args.output_dir, is_chief)
    state, resume_dir = folder.check(settings)
    if state is not None and state.get("finished"):
        extended = (args.max_epochs is not None and state["finished"].startswith("max_epochs")
                    and len(state["history"]) < args.max_epochs)
        if not extended:
            print(f"{args.output_dir}: this run already finished ({state['finished']}; best epoch "
                  f"{state['best_epoch']}); nothing to do")
            return 0
        state["finished"] = None
    global_step = 0 if state is None else state["global_step"]
    if args.seed is not None:  # initial weights (multi-worker: the chief's are broadcast) and dropout
        keras.utils.set_random_seed(derived_seed(args.seed, global_step))
    folder.write_settings(settings)

    local_replicas = max(1, strategy.num_replicas_in_sync // workers)
    with contextlib.ExitStack() as cleanup, contextlib.ExitStack() as stack:
        train_reader, test_reader = open_readers(args, stack, local_replicas, worker_index, augmentation,
                                                 global_step)
        trainer = Trainer(args, strategy, folder, local_replicas, train_reader, test_reader, settings, stop)
        # the readers (on `stack`) shut down first, then their datasets can end at once
        cleanup.callback(trainer.release_input)
        if is_chief:
            print_setup(args, trainer, workers, augmentation)
        if state is None:
            trainer.state = trainer.fresh_state()
        else:
            trainer.restore(state, resume_dir)
            trainer.print(f"resuming at epoch {state['epoch']} step {state['step_in_epoch']} "
                          f"(global step {state['global_step']}, {len(state['history'])} epochs tested)")
            # drop any epoch written after the resume point
            folder.write_history(state["history"], args.number_classes)
        try:
            state = trainer.run()
        except Interrupted:
            return save_and_exit(trainer, stop, "")
        except (ReaderError, tf.errors.OpError) as error:
            time.sleep(0.5)  # a signal that also ended the reader workers may not be handled yet
            if stop.requested:
                # the signal also reached the reader processes and ended them mid-step: the step was
                # not applied, so the last completed step is a consistent resume point
                return save_and_exit(trainer, stop, f" (the readers stopped: {op_error_message(error)})")
            if trainer.reader_failure() is None:
                raise
            save_after_reader_failure(trainer)
    best = state["history"][state["best_epoch"]]
    print(f"finished: {state['finished']}; best epoch {state['best_epoch']} test loss "
          f"{best['test_loss']:.6f} mean IoU {best['mean_iou']:.4f}; model in "
          f"{folder.file(SAVED_MODEL_DIR)}")
    if args.export_bioimageio and is_chief:
        export_bioimageio_package(args.output_dir)
    return 0


def export_bioimageio_package(output_dir):
    """--export_bioimageio 1: the finished run's best model as output_dir/model.bioimageio.zip, its test
    image the first record of the test database; ValueError (one line) if the export fails."""
    import export_bioimageio

    target = os.path.join(output_dir, BIOIMAGEIO_PACKAGE)
    export_args = export_bioimageio.parse_args(
        ["--saved_model_filepath", os.path.join(output_dir, SAVED_MODEL_DIR), "--output", target])
    try:
        export_bioimageio.export_package(export_args)
    except RuntimeError as error:  # a conversion or a test of the package failed
        raise ValueError(f"{target}: not written: {str(error).splitlines()[0]}") from None


def main(argv=None):
    args = parse_args(argv)
    stop = StopRequest()
    stop.install()
    try:
        check_args(args)
        status = train(args, stop)
    except (ValueError, ReaderError) as error:
        sys.exit(f"error: {error}")
    except tf.errors.OpError as error:  # a reader failure surfacing through tf.data, or a lost worker
        sys.exit(f"error: {op_error_message(error)}")
    except KeyboardInterrupt:
        sys.exit("aborted by a second Ctrl-C; the last saved resume point is kept")
    sys.exit(status)


if __name__ == "__main__":
    main()
