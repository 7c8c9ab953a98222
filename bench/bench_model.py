"""Throughput of the FC-DenseNet variants on this machine: forward and training-step images/s.

    python bench/bench_model.py                                   # FCDenseNet56, under 10 minutes on 2 cores
    python bench/bench_model.py --variants FCDenseNet56,FCDenseNet67,FCDenseNet103 --jit_train_variants FCDenseNet56

For each variant (1 channel, 2 classes, 256x256, batch 4): a plain eager `model(batch)` call, the
compiled predict of `fcdensenet.make_predict_function` with and without jit_compile, and a
tf.function training step (Adam, cross-entropy + weight decay) with and without jit_compile. Times
are medians over the timed iterations after one untimed warm-up (which pays for tracing and XLA
compilation); the configurations of one kind run in turn, round after round, so that the load of a
shared machine falls on all of them alike: compare entries of one run, not absolute figures. The
last line is the forward throughput of the path the scripts use (compiled predict, no jit) over the
eager call, for the default variant. By default only FCDenseNet56 is measured and its jit-compiled
training step is skipped: with every variant and that step, a run on a shared 2-core machine took
over 20 minutes (XLA takes minutes to compile and run a training step on this CPU).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import fcdensenet  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default="FCDenseNet56",
                        help="comma-separated variants to measure")
    parser.add_argument("--jit_train_variants", default="",
                        help="variants whose jit-compiled training step is measured (XLA on the CPU is "
                             "slow to compile and to run; the others print 'skipped')")
    parser.add_argument("--image_size", type=int, default=256, help="height and width of the batch")
    parser.add_argument("--batch_size", type=int, default=4, help="images per batch")
    parser.add_argument("--iterations", type=int, default=3, help="timed forward passes per configuration")
    parser.add_argument("--train_iterations", type=int, default=1, help="timed training steps per configuration")
    return parser.parse_args()


def seconds_per_call(fns, iterations):
    """Median seconds per call of each function, called in turn round after round.

    Interleaving spreads the load of a shared machine evenly over the configurations compared.
    """
    for name, fn in fns.items():
        print(f"  warming up {name}", flush=True)
        fn()  # warm-up: tracing, compilation, allocation
    print(f"  timing {', '.join(fns)}: {iterations} round(s)", flush=True)
    times = {name: [] for name in fns}
    for _ in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def make_train_step(model, jit_compile):
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    def step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probabilities))
            loss += tf.add_n(model.losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return tf.function(step, jit_compile=jit_compile)


def bench_variant(variant, args, jit_train):
    """Return {configuration: images/s or None when skipped} for one variant."""
    model = fcdensenet.build_model(variant, number_channels=1, number_classes=2)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 1)
    images = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    labels = tf.constant(rng.integers(0, 2, shape[:3]), tf.int32)
    forward = {"forward eager": lambda: model(images).numpy()}
    for jit in (False, True):
        predict = fcdensenet.make_predict_function(model, jit_compile=jit)
        forward["forward predict" + ("+jit" if jit else "")] = lambda predict=predict: predict(images).numpy()
    train = {}
    for jit in (False, True) if jit_train else (False,):
        step = make_train_step(model, jit)
        train["train step" + ("+jit" if jit else "")] = lambda step=step: step(images, labels).numpy()
    seconds = seconds_per_call(forward, args.iterations)
    seconds.update(seconds_per_call(train, args.train_iterations))
    rates = {name: args.batch_size / value for name, value in seconds.items()}
    rates.setdefault("train step+jit", None)
    return rates


def print_table(results):
    columns = list(next(iter(results.values())))
    print(f"{'images/s':<15}" + "".join(f"{column:>20}" for column in columns))
    for variant, rates in results.items():
        cells = "".join(f"{'skipped' if value is None else f'{value:.2f}':>20}" for value in rates.values())
        print(f"{variant:<15}{cells}")


def main():
    args = parse_args()
    fcdensenet.check_input_size(args.image_size, args.image_size)
    variants = [name for name in args.variants.split(",") if name]
    jit_train = set(args.jit_train_variants.split(","))
    print(f"{args.image_size}x{args.image_size}, batch {args.batch_size}, 1 channel, 2 classes, "
          f"TF {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[device.device_type for device in tf.config.list_logical_devices()]}", flush=True)
    results = {}
    for variant in variants:
        start = time.perf_counter()
        results[variant] = bench_variant(variant, args, variant in jit_train)
        print(f"{variant} measured in {time.perf_counter() - start:.0f} s", flush=True)
        keras.backend.clear_session()
    print_table(results)
    baseline = results.get(fcdensenet.DEFAULT_VARIANT, next(iter(results.values())))
    ratio = baseline["forward predict"] / baseline["forward eager"]
    print(f"forward images/s (compiled predict vs eager call) ratio={ratio:.2f} target=1.0")


if __name__ == "__main__":
    main()
