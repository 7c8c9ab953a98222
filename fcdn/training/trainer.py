"""The training loop: epochs of training steps, each followed by a pass over the test set.

    trainer = Trainer(args, strategy, folder, local_replicas, train_reader, test_reader, settings, stop)
    trainer.state = trainer.fresh_state()        # or trainer.restore(state, resume_dir)
    state = trainer.run()                        # Interrupted at a stop signal; the caller saves
"""

import contextlib
import gc
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf

import fcdensenet
from fcdn.common.stopping import Interrupted
from fcdn.training.evaluation import TestPass, early_stopping_status, finished_reason, history_entry
from fcdn.training.failures import StepCounters, own_worker_task
from fcdn.training.readers import queue_text
from fcdn.training.recipe import WeightAverage
from fcdn.training.run_files import CKPT_PREFIX, SAVED_MODEL_DIR
from fcdn.training.schedule import MAX_WARMUP_STEPS, learning_rate_at, rate_plan
from fcdn.training.strategy import (
    build_optimizer,
    distribute,
    drain,
    make_statistics_sync,
    make_train_step,
    stop_vote,
)
from fcdn.training.summaries import open_writers, write_scalars


def build_model(args, number_channels):
    return fcdensenet.build_model(args.model, number_channels=number_channels,
                                  number_classes=args.number_classes, dropout_rate=args.dropout_rate,
                                  layers_per_block=args.layers_per_block, growth_rate=args.growth_rate,
                                  batch_norm_momentum=args.batch_norm_momentum)


class BestModel:
    """The chief's plain float32 copy of the model, outside the strategy: the best epoch's weights go
    into it to be written as checkpoint/, saved_model/ and test_predictions.png."""

    def __init__(self, args, folder, settings, channels):
        self.folder = folder
        self.settings = settings
        self.test_database = args.test_database
        self.model = build_model(args, channels)
        # a tf.function: called eagerly, the model spends much of its time outside the convolutions
        self.predict = tf.function(lambda images: self.model(images, training=False),
                                   input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32)])

    def save(self, weights, entry):
        metadata = dict(self.settings, epoch=entry["epoch"], global_step=entry["global_step"],
                        test_loss=entry["test_loss"], pixel_accuracy=entry["pixel_accuracy"],
                        mean_iou=entry["mean_iou"])
        self.folder.save_best(self.model, weights, metadata)
        self.folder.write_test_predictions(self.predict, self.test_database, entry["epoch"])


class Trainer:
    """The training loop's state: one instance per run, driven by run()."""

    def __init__(self, args, strategy, folder, local_replicas, train_reader, test_reader, settings, stop):
        self.args = args
        self.folder = folder
        self.is_chief = folder.is_chief
        self.workers = strategy.num_replicas_in_sync // local_replicas
        self.worker_task = own_worker_task(strategy)
        self.stop = stop
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = args.batch_size * self.replicas
        self.train_reader = train_reader
        self.test_reader = test_reader
        channels = train_reader.get_image_size()[2]
        self.warmup_steps = min(MAX_WARMUP_STEPS, args.test_every_n_steps)
        # before the mixed precision policy, so that it stays float32; and before the trained model,
        # whose seeded initial weights depend on what the generator gave first
        self.best_model = BestModel(args, folder, settings, channels) if self.is_chief else None
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
        self.counters = StepCounters([self.optimizer, self.average], self.workers)
        self.train_step = make_train_step(strategy, self.model, self.optimizer, self.global_batch, args.loss,
                                          self.average)
        self.sync_statistics = make_statistics_sync(strategy, self.model)
        self.train_iterator = iter(distribute(strategy, train_reader.get_tf_dataset, self.global_batch))
        self.test_pass = TestPass(strategy, self.model, test_reader, args, local_replicas)
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

    def epoch_steps(self, epoch):
        """Training steps of an epoch: the first is the warm-up."""
        return self.warmup_steps if epoch == 0 else self.args.test_every_n_steps

    def run(self):
        self.writers = open_writers(self.folder, self.state["tensorboard_dir"])
        self.counters.record()
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
            loss_sum, correct, pixels, votes = self.train_step(self.train_iterator, stop_vote(self.stop)).numpy()
            # the epoch's mean train loss, for training_curves.png (kept in the state across a resume)
            state["epoch_loss"] = state.get("epoch_loss", 0.0) + float(loss_sum)
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            self.counters.record()
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
            self.after_step(votes)

    def after_step(self, votes):
        """Interrupted once the workers agree to stop: one worker acts on its own signal at once;
        several stop together, in the step after any of them was signalled (the votes of that step
        say so on every worker). Else a ReaderError if a worker of either reader has died: the test
        reader is read only between epochs (and tf.data reads ahead), so its worker's death would go
        unnoticed for an epoch."""
        if votes > 0 or (self.workers == 1 and self.stop.requested):
            # a worker stopped by another's vote before a signal of its own arrived ends as under
            # SLURM's SIGTERM, which reaches every task of a job
            raise Interrupted(self.stop.signal_number or signal.SIGTERM)
        self.train_reader.check()
        self.test_reader.check()

    def reader_failure(self):
        return self.train_reader.failure or self.test_reader.failure

    def log_train(self, sums, steps, timed_steps, elapsed, epoch_steps, learning_rate):
        state = self.state
        loss = sums[0] / steps
        accuracy = sums[1] / sums[2]
        # the first step of a process traces the step function: it has no meaningful rate
        images_per_second = timed_steps * self.global_batch / elapsed if timed_steps else float("nan")
        queue = queue_text(self.train_reader)
        self.print(f"epoch {state['epoch']} step {state['step_in_epoch']}/{epoch_steps} "
                   f"(global {state['global_step']}) loss {loss:.6f} accuracy {accuracy:.4f} "
                   f"lr {learning_rate:.2e} images/s {images_per_second:.1f}{queue}")
        write_scalars(self.writers["train"], state["global_step"],
                      {"loss": loss, "accuracy": accuracy, "learning_rate": learning_rate,
                       "images_per_second": images_per_second})

    def test_epoch(self):
        state = self.state
        self.sync_statistics()
        with self.scored_weights():  # the test pass and the export see the same weights
            # interrupted here, the epoch's training is done: a resumed run starts with this test
            scores, iou = self.test_pass.run(lambda: stop_vote(self.stop), self.after_step)
            entry = history_entry(state, scores, iou, self.epoch_rate())
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
        state["finished"] = finished_reason(state["history"], best_epoch, stop, self.args.max_epochs)
        self.save_resume()  # the trained weights: the average lives in its own checkpoint slot

    def scored_weights(self):
        """The weights the test pass scores and the best model exports: the average, if kept."""
        return self.average.swapped_in() if self.average is not None else contextlib.nullcontext()

    def epoch_rate(self):
        """The mean learning rate of the epoch's steps, for training_curves.png."""
        end = self.state["global_step"]
        steps = range(end - self.epoch_steps(self.state["epoch"]), end)
        return float(np.mean([learning_rate_at(step, self.rate_plan) for step in steps]))

    def save_best(self, entry):
        weights = self.model.get_weights()  # on every worker: reading may all-reduce
        if self.is_chief:
            self.best_model.save(weights, entry)
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
        drain(self.train_iterator)
        drain(self.test_pass.iterator)
        # the traced steps before the iterators they captured; both sit in reference cycles
        self.train_step = self.test_pass.step = None
        gc.collect()
        self.train_iterator = self.test_pass.iterator = None
        gc.collect()

    def print(self, text):
        if self.is_chief:
            print(text, flush=True)
