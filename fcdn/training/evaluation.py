"""The end of an epoch: a pass over the whole test set, and the reference's early stopping rule.

    test_pass = TestPass(strategy, model, test_reader, args, local_replicas)
    scores, iou = test_pass.run(vote, after_step)  # test loss, pixel accuracy and IoU of the pass
    entry = history_entry(state, scores, iou, learning_rate)
    best_epoch, stop = early_stopping_status(test_losses, patience)
"""

import math

import numpy as np
import tensorflow as tf

from fcdn.common.segmentation_metrics import segmentation_metrics
from fcdn.training.strategy import distribute, make_test_step

CONVERGENCE_TOLERANCE = 1e-4  # the reference's: test losses this close count as equal


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


def finished_reason(history, best_epoch, stop, max_epochs):
    """Why the run ends after the epoch just tested (state["finished"]), or None to go on."""
    if stop:
        return (f"early stopping: {len(history) - best_epoch - 1} epochs without improvement since "
                f"epoch {best_epoch}")
    if max_epochs is not None and len(history) >= max_epochs:
        return f"max_epochs {max_epochs} reached"
    return None


def history_entry(state, scores, iou, learning_rate):
    """The tested epoch's entry in state["history"]: its test pass's scores, the per-class IoU (None
    for a class absent from the test set), and the epoch's mean train loss and learning rate for
    training_curves.png. The train loss is taken out of the state: the pass is complete."""
    train_loss = state.pop("epoch_loss", None)
    return {"epoch": state["epoch"], "global_step": state["global_step"], **scores,
            "train_loss": None if train_loss is None else train_loss / max(1, state["step_in_epoch"]),
            "learning_rate": learning_rate,
            "iou": [None if math.isnan(value) else float(value) for value in iou]}


def weighted_test_stream(dataset, examples, pass_length):
    """Tag each example of an endless ordered stream with weight 1 for the first `examples` of every
    `pass_length` (a test pass), 0 for the rest (padding to whole batches)."""
    def tag(index, example):
        image, mask = example
        return image, mask, tf.cast(index % pass_length < examples, tf.float32)
    return dataset.enumerate().map(tag)


class TestPass:
    """The pass over the test set that ends every epoch. Each worker passes over the whole set with
    its own ordered reader, so the last batch of a pass is padded with examples of weight 0."""

    def __init__(self, strategy, model, test_reader, args, local_replicas):
        self.number_classes = args.number_classes
        self.step = make_test_step(strategy, model, args.number_classes, args.loss)
        self.examples = test_reader.get_image_count()
        per_worker_batch = args.batch_size * local_replicas
        self.steps = math.ceil(self.examples / per_worker_batch)
        pass_length = self.steps * per_worker_batch
        global_batch = args.batch_size * strategy.num_replicas_in_sync
        self.iterator = iter(distribute(strategy, lambda: weighted_test_stream(
            test_reader.get_tf_dataset(), self.examples, pass_length), global_batch))

    def run(self, vote, after_step):
        """One pass: ({test_loss, pixel_accuracy, mean_iou}, the per-class IoU with NaN for absent
        classes). vote() is this worker's stop vote for a step; after_step(votes) sees the votes of
        the pass so far and may raise to end it."""
        totals = np.zeros(3)
        confusion = np.zeros((self.number_classes,) * 2)
        for _ in range(self.steps):
            step_totals, step_confusion = self.step(self.iterator, vote())
            totals += step_totals.numpy()
            confusion += step_confusion.numpy()
            after_step(totals[2])
        accuracy, iou, mean_iou = segmentation_metrics(confusion)
        return {"test_loss": float(totals[0] / totals[1]), "pixel_accuracy": accuracy, "mean_iou": mean_iou}, iou
