"""Distribution: the strategy, the datasets it feeds every replica, and the compiled steps.

    strategy = make_strategy()
    is_chief, worker_index, workers = worker_info(strategy)
    iterator = iter(distribute(strategy, make_dataset, global_batch_size))
    step = make_train_step(strategy, model, optimizer, global_batch_size)
    loss, correct, pixels, votes = step(iterator, stop_vote(stop)).numpy()

One process drives every visible GPU through MirroredStrategy (all logical CPUs when there is no GPU);
with TF_CONFIG set, or as a task of an srun step of 2+ tasks, MultiWorkerMirroredStrategy spans nodes
(fcdn.training.slurm reads the step's layout; the node's GPUs are shared among its tasks).
"""

import os
import signal

import keras
import numpy as np
import tensorflow as tf

from fcdn.training.recipe import per_example_loss
from fcdn.training.slurm import SlurmStep, check_port_free, port_base


def make_strategy(worker_port=0):
    """MultiWorkerMirroredStrategy for a multi-node job, else MirroredStrategy over local devices.
    `worker_port`: the first port of a SLURM step's workers on each node (0: from the job ID)."""
    if os.environ.get("TF_CONFIG"):
        return multi_worker_strategy()
    step = SlurmStep.from_environment(os.environ)
    if step is not None:
        return slurm_strategy(step, worker_port)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def multi_worker_strategy(resolver=None):
    """MultiWorkerMirroredStrategy over the cluster of `resolver` (None: TF_CONFIG's)."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    # The coordination service's preemption notifier takes SIGTERM over in C++: SLURM's SIGTERM then
    # never reached the Python handler that stops every worker at a step's end with a resume point.
    # Python still holds its handlers: set them again.
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is not None:
            signal.signal(number, signal.getsignal(number))
    return strategy


def slurm_strategy(step, worker_port):
    """The strategy of one task of an srun step: this task's share of the node's GPUs (or the CPU),
    its port checked free, and one line naming the workers, their hosts and this one's devices."""
    physical = tf.config.list_physical_devices("GPU")
    share = step.gpu_share(len(physical))
    if len(share) != len(physical):  # before TensorFlow initialises the devices
        tf.config.set_visible_devices([physical[index] for index in share], "GPU")
    base = port_base(worker_port, step.job_id)
    addresses = step.addresses(base)
    check_port_free(step.host, int(addresses[step.rank].rsplit(":", 1)[1]))
    print(step.describe(base, share), flush=True)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=step.rank,
        num_accelerators={"GPU": len(share)} if share else None, rpc_layer="grpc")
    return multi_worker_strategy(resolver)


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


def drain(iterator):
    """Run a distributed iterator dry (its readers have shut down, so it ends at once)."""
    try:
        for _ in iterator:
            pass
    except tf.errors.OpError:  # a failed reader: its error has been reported already
        pass


def stop_vote(stop):
    """This worker's vote in the next step's all-reduce: 1 once a stop signal has arrived here."""
    return tf.constant(1.0 if stop.requested else 0.0)


def build_optimizer(strategy, model, learning_rate, mixed_precision=False):
    """Adam, built inside the strategy scope before the first distributed step: Keras 3 builds it
    lazily otherwise, inside the first replicated tf.function, where a step over 2 replicas fails
    with "You must feed a value for placeholder tensor '.../cond/Placeholder'"."""
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
