"""The training recipe's TensorFlow parts: the loss, and a moving average of the weights (the learning
rate of every step is fcdn.training.schedule's).

    loss = per_example_loss(labels, probabilities, "dice_cross_entropy")   # shape (N,)
    average = WeightAverage(model.trainable_variables, decay=0.999)        # inside strategy.scope()
    average.update()                                  # after each optimizer step
    with average.swapped_in(): ...                    # test and export the averaged weights
"""

import contextlib

import keras
import tensorflow as tf

from fcdn.training.schedule import DEFAULT_AVERAGE_DECAY, LOSSES

DICE_SMOOTH = 1e-5  # nnU-Net's: an example without foreground adds ~nothing to the Dice gradient


def per_example_loss(labels, probabilities, loss="cross_entropy"):
    """The loss of each example, shape (N,), so that callers can weight and sum examples.

    cross_entropy: the categorical cross-entropy of the softmax, averaged over the example's pixels.
    dice_cross_entropy: that plus 1 - the soft Dice of the example averaged over the foreground
    classes 1..K-1 (nnU-Net's default loss, without its batch Dice: each example on its own).
    """
    pixel_loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    examples = tf.shape(pixel_loss)[0]
    cross_entropy = tf.reduce_mean(tf.reshape(pixel_loss, [examples, -1]), axis=1)
    if loss == "cross_entropy":
        return cross_entropy
    if loss != "dice_cross_entropy":
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    return cross_entropy + (1.0 - soft_dice(labels, probabilities))


def soft_dice(labels, probabilities):
    """Soft Dice of each example, averaged over the foreground classes: shape (N,)."""
    classes = probabilities.shape[-1]
    probabilities = tf.cast(probabilities, tf.float32)
    examples = tf.shape(probabilities)[0]
    flat_probabilities = tf.reshape(probabilities, [examples, -1, classes])[..., 1:]
    flat_truth = tf.one_hot(tf.reshape(labels, [examples, -1]), classes, dtype=tf.float32)[..., 1:]
    overlap = tf.reduce_sum(flat_probabilities * flat_truth, axis=1)
    total = tf.reduce_sum(flat_probabilities, axis=1) + tf.reduce_sum(flat_truth, axis=1)
    return tf.reduce_mean((2.0 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH), axis=1)


def average_decay(decay, updates):
    """The decay of update number `updates` (0 for the first): min(decay, (1 + n) / (10 + n)).

    The second term (tf.train.ExponentialMovingAverage's num_updates form) makes the average span
    about the last 10% of the steps so far until that is 1 / (1 - decay) steps, so a short run
    averages its own last steps instead of being dragged back towards the initial weights.
    """
    updates = tf.cast(updates, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + updates) / (10.0 + updates))


class WeightAverage(tf.Module):
    """An exponential moving average of a model's trainable weights, kept in shadow variables.

    Create it inside the strategy scope (the shadows are then mirrored like the weights) and call
    update() in cross-replica context after each optimizer step, where the weights are the same on
    every replica. Track it in the checkpoint so that a resumed run keeps its average and count.
    """

    def __init__(self, variables, decay=DEFAULT_AVERAGE_DECAY):
        super().__init__(name="weight_average")
        self.decay = float(decay)
        self.variables_averaged = list(variables)
        self.shadows = [tf.Variable(tf.identity(variable.value), trainable=False,
                                    name=variable.path.replace("/", "_") + "_average")
                        for variable in self.variables_averaged]
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")

    def update(self):
        decay = average_decay(self.decay, self.updates)
        for variable, shadow in zip(self.variables_averaged, self.shadows):
            shadow.assign(decay * shadow + (1.0 - decay) * tf.cast(variable.value, shadow.dtype))
        self.updates.assign_add(1)

    def restart(self):
        """The average starts again from the weights as they are (a fine-tuned run's loaded ones)."""
        for variable, shadow in zip(self.variables_averaged, self.shadows):
            shadow.assign(tf.cast(variable.value, shadow.dtype))

    @tf.function
    def swap(self):
        """Exchange the weights and the averages (twice restores both bit for bit)."""
        for variable, shadow in zip(self.variables_averaged, self.shadows):
            live = tf.identity(variable.value)
            variable.assign(shadow)
            shadow.assign(live)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the model for the block, the trained ones back after it (also on
        an exception, so that a resume point never holds the average as the weights)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()
