"""Is the input pipeline ever the bottleneck of training? Images/s of the trainer's own step fed by
the reader, against the same model stepping on one constant in-memory batch, in the same run.

    python bench/bench_train.py
    python bench/bench_train.py --image_size 256 --steps 20 --model FCDenseNet56

Both measurements use the trainer's Trainer object (model, optimizer, distributed step function);
only the iterator differs. Short blocks of steps alternate between the two, and the figure is the
median of the ratios of adjacent blocks (this machine is shared: a load change moves one pair, not
the figure). The reader runs with augmentation on, one worker per replica (the
trainer's default), and any `Input Queue Starvation !!!!` line it prints after the warm-up is
counted. The last line: training images/s (reader-fed vs constant batch) ratio=<X> target=0.9.
The defaults (5 blocks of 2 steps per input after 3 warm-up steps) fit under 10 minutes on a shared
2-core machine, where 7 blocks of 3 after 6 ran past 20 minutes.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import lmdb
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fcdn.data import records  # noqa: E402

if __name__ != "__mp_main__":  # reader workers (spawn) re-import this script: keep TensorFlow out
    import tensorflow as tf  # noqa: E402

    from fcdn.common.stopping import StopRequest  # noqa: E402
    from fcdn.training.readers import load_augmentation, open_readers  # noqa: E402
    from fcdn.training.run_folder import RunFolder  # noqa: E402
    from fcdn.training.strategy import distribute, make_strategy, stop_vote  # noqa: E402
    from fcdn.training.trainer import Trainer  # noqa: E402
    from train_fcdensenet import parse_args as parse_train_args  # noqa: E402

STARVATION = "Input Queue Starvation !!!!"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image_size", type=int, default=128, help="record height and width")
    parser.add_argument("--records", type=int, default=64, help="training records")
    parser.add_argument("--batch_size", type=int, default=4, help="per replica")
    parser.add_argument("--model", default="FCDenseNet56", help="FC-DenseNet variant")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per input (alternating)")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps per input first")
    return parser.parse_args()


def write_database(path, count, size, seed=0):
    """uint16 images of smooth blobs with thresholded masks, like the example data in kind."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin(write=True) as transaction:
        for index in range(count):
            field = rng.standard_normal((size // 8, size // 8))
            field = np.kron(field, np.ones((8, 8)))
            image = (1000 + 300 * field + rng.normal(0, 30, field.shape)).clip(0, 65535).astype(np.uint16)
            mask = (field > 0.5).astype(np.uint8)
            transaction.put(*records.make_record(f"bench{index:04d}", image, mask))
    env.close()


class LineCounter(io.TextIOBase):
    """Passes writes through to a stream and counts a marker line once counting is on."""

    def __init__(self, stream, marker):
        self.stream, self.marker, self.counting, self.count = stream, marker, False, 0

    def write(self, text):
        if self.counting:
            self.count += text.count(self.marker)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def time_steps(trainer, iterator, steps, stop):
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(iterator, stop_vote(stop)).numpy()
    return time.perf_counter() - start


def main():
    options = parse_args()
    counter = LineCounter(sys.stdout, STARVATION)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root, contextlib.ExitStack() as stack:
        train_db, test_db = os.path.join(root, "train.lmdb"), os.path.join(root, "test.lmdb")
        write_database(train_db, options.records, options.image_size)
        write_database(test_db, 4, options.image_size, seed=1)
        args = parse_train_args(["--train_database", train_db, "--test_database", test_db, "--output_dir",
                                 os.path.join(root, "run"), "--model", options.model, "--batch_size",
                                 str(options.batch_size), "--seed", "0"])
        strategy = make_strategy()
        replicas = strategy.num_replicas_in_sync
        stop = StopRequest()
        augmentation = load_augmentation(args)
        train_reader, test_reader = open_readers(args, stack, replicas, 0, augmentation)
        trainer = Trainer(args, strategy, RunFolder(args.output_dir), replicas, train_reader, test_reader, {},
                          stop)
        global_batch = trainer.global_batch
        print(f"{options.model} {options.image_size}x{options.image_size}, batch {global_batch} on "
              f"{replicas} replica(s), {args.reader_count * replicas} reader worker(s) with augmentation; "
              f"{options.blocks} x {options.steps} timed steps per input", flush=True)

        reader_iterator = trainer.train_iterator
        batch = next(iter(train_reader.get_tf_dataset().batch(global_batch)))  # one real batch, kept
        constant = lambda: tf.data.Dataset.from_tensor_slices(batch).repeat()
        constant_iterator = iter(distribute(strategy, constant, global_batch))

        print(f"warming up: {options.warmup_steps} steps per input", flush=True)
        time_steps(trainer, constant_iterator, options.warmup_steps, stop)
        time_steps(trainer, reader_iterator, options.warmup_steps, stop)
        shown = sys.stdout  # progress lines bypass the starvation counter
        sys.stdout = counter
        counter.counting = True
        pairs = []  # (constant seconds, reader seconds) of adjacent blocks
        try:
            for index in range(options.blocks):
                pairs.append((time_steps(trainer, constant_iterator, options.steps, stop),
                              time_steps(trainer, reader_iterator, options.steps, stop)))
                print(f"timed block {index + 1} of {options.blocks}", file=shown, flush=True)
        finally:
            sys.stdout = counter.stream
        images = options.steps * global_batch
        for index, (constant_seconds, reader_seconds) in enumerate(pairs):
            print(f"block {index}: constant {images / constant_seconds:.2f} images/s, "
                  f"reader-fed {images / reader_seconds:.2f} images/s")
        constant_total, reader_total = (sum(column) for column in zip(*pairs))
        print(f"constant in-memory batch: {len(pairs) * images / constant_total:.2f} images/s")
        print(f"reader-fed (augmented):   {len(pairs) * images / reader_total:.2f} images/s")
        print(f"starvation lines after warm-up: {counter.count}")
        # the median of adjacent-block ratios: a load change on this shared machine moves one pair,
        # not the figure
        ratio = float(np.median([constant / reader for constant, reader in pairs]))
    print(f"training images/s (reader-fed vs constant batch) ratio={ratio:.3f} target=0.9")


if __name__ == "__main__":
    main()
