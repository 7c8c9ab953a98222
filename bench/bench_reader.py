"""Examples/s through ImageReader.get_tf_dataset() vs what one process can prepare on its own.

Builds a temporary LMDB of 512x512 uint16 records. The limit is one process running the worker's
own per-example work in a loop (read, decode, augment, z-score: reader_worker.prepare_example) with
no queue at all, in a spawned process like a worker (the main process waits meanwhile, like the
consumer); the reader's rate with one worker over that limit is the share left after queue
and transfer overhead. The reader is measured in steady state: its initial buffer is drained
before the clock starts. The limit and the 1-worker reader are measured in alternating rounds
(medians kept) because other programs on a shared machine change the CPU share over time; the CPU
seconds a worker spends per example against the in-process CPU seconds per example is printed as
a load-independent check. Two workers and the bare augmentation rate are printed too, and so is
the transport the reader does not use: one spawned process preparing the same examples and
pickling them through a multiprocessing.Queue.

    python bench/bench_reader.py
    python bench/bench_reader.py --examples 300 --size 256
"""

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time

import lmdb
import numpy as np
import scipy.ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402
import imagereader  # noqa: E402
from fcdn.data import (
    reader_worker,  # noqa: E402
    records,  # noqa: E402
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="record height and width")
    parser.add_argument("--records", type=int, default=8, help="records in the temporary database")
    parser.add_argument("--examples", type=int, default=150, help="examples timed per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of limit and reader")
    parser.add_argument("--queue_size_per_worker", type=int, default=100, help="reader queue per worker")
    return parser.parse_args()


def build_database(path, size, count):
    env = lmdb.open(path, map_size=(size * size * 3 + 4096) * count * 2)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for index in range(count):
            field = scipy.ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 8)
            image = ((field - field.min()) / np.ptp(field) * 60000).astype(np.uint16)
            mask = (field > np.percentile(field, 70)).astype(np.uint8)
            txn.put(*records.make_record(f"img_{index:04d}", image, mask))
    env.close()


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def example_settings(first_value):
    """The settings a reader worker passes to reader_worker.prepare_example: whole records, default augmentation."""
    shape = records.decode_record(first_value).image.shape
    return {"record_shape": shape, "image_shape": shape, "crop_size": 0, "number_classes": 2,
            "mask_dtype": np.dtype(np.uint8), "augmentation": augment.AugmentationConfig()}


def in_process_rate(path, count, prepare):
    """(examples/s, CPU s per example) of one process doing the worker's work or only augment()."""
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        pairs = [(bytes(key), bytes(value)) for key, value in txn.cursor()]
    env.close()
    settings = example_settings(pairs[0][1])
    decoded = [records.decode_record(value) for _, value in pairs]
    rng = np.random.default_rng(0)
    for key, value in pairs[:2]:  # warm-up: lazy imports and first-call costs stay out of the timing
        reader_worker.prepare_example(key, value, settings, rng)
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(count):
        if prepare:
            key, value = pairs[index % len(pairs)]
            reader_worker.prepare_example(key, value, settings, rng)
        else:
            record = decoded[index % len(decoded)]
            augment.augment(record.image, record.mask, settings["augmentation"], rng)
    return count / (time.perf_counter() - start), (time.process_time() - cpu_start) / count


def pickling_producer(path, stop, channel):
    """Prepare examples like a worker and send the arrays pickled through a queue."""
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        pairs = [(bytes(key), bytes(value)) for key, value in txn.cursor()]
    settings = example_settings(pairs[0][1])
    rng = np.random.default_rng(0)
    index = 0
    while not stop.is_set():
        key, value = pairs[index % len(pairs)]
        channel.put(reader_worker.prepare_example(key, value, settings, rng))
        index += 1
    # send every message whole before exiting: a half-sent one would block the reader for ever
    channel.close()
    channel.join_thread()


def pickled_queue_rate(path, count, capacity):
    """(examples/s, producer CPU s per example) of the pickled-queue transport, in steady state."""
    context = multiprocessing.get_context("spawn")
    stop, channel = context.Event(), context.Queue(maxsize=capacity)
    producer = context.Process(target=pickling_producer, args=(path, stop, channel), daemon=True)
    producer.start()
    for _ in range(capacity + 10):
        channel.get()
    cpu_before, start = cpu_seconds(producer.pid), time.perf_counter()
    for _ in range(count):
        channel.get()
    rate = count / (time.perf_counter() - start)
    cpu = (cpu_seconds(producer.pid) - cpu_before) / count
    stop.set()
    while producer.is_alive():  # drain so that the producer can finish its last messages
        try:
            channel.get(timeout=0.1)
        except queue.Empty:
            pass
    producer.join()
    return rate, cpu


def reader_rate(path, count, num_workers, queue_size_per_worker):
    """(examples/s, worker CPU s per example) through get_tf_dataset() in steady state."""
    reader = imagereader.ImageReader(path, num_workers=num_workers, seed=0,
                                     queue_size_per_worker=queue_size_per_worker)
    with reader:
        iterator = iter(reader.get_tf_dataset().prefetch(4))
        for _ in range(reader.capacity + 10):  # startup, then the buffer filled meanwhile
            next(iterator)
        worker_cpu = [cpu_seconds(pid) for pid in reader.worker_pids]
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        rate = count / (time.perf_counter() - start)
        worker_cpu = sum(cpu_seconds(pid) - before for pid, before in zip(reader.worker_pids, worker_cpu))
    return rate, worker_cpu / count


def main():
    args = parse_args()
    import tensorflow as tf

    tf.constant(0)  # TensorFlow is running before the workers start, as in training
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.lmdb")
        build_database(path, args.size, args.records)
        print(f"{args.records} records {args.size}x{args.size} uint16, augmentation on, "
              f"backend {augment.DEFAULT_BACKEND}, {os.cpu_count()} CPUs")
        limits, readers = [], []
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            for _ in range(args.rounds):
                limits.append(pool.apply(in_process_rate, (path, args.examples // 2, True)))
                readers.append(reader_rate(path, args.examples, 1, args.queue_size_per_worker))
            augment_only, _ = pool.apply(in_process_rate, (path, args.examples // 2, False))
        queue_transport, queue_cpu = pickled_queue_rate(path, args.examples, args.queue_size_per_worker)
        two_workers, _ = reader_rate(path, args.examples, 2, args.queue_size_per_worker)
    limit = statistics.median(rate for rate, _ in limits)
    limit_cpu = statistics.median(cpu for _, cpu in limits)
    one_worker = statistics.median(rate for rate, _ in readers)
    worker_cpu = statistics.median(cpu for _, cpu in readers)
    print(f"one process, augment() only: {augment_only:.1f} examples/s")
    print(f"one process, read + decode + augment + z-score (the limit): {limit:.1f} examples/s, "
          f"{limit_cpu * 1e3:.1f} ms CPU per example (rounds: "
          f"{', '.join(f'{rate:.1f}' for rate, _ in limits)})")
    print(f"reader, 1 worker, shared-memory slots: {one_worker:.1f} examples/s, worker "
          f"{worker_cpu * 1e3:.1f} ms CPU per example (rounds: {', '.join(f'{rate:.1f}' for rate, _ in readers)})")
    print(f"not used: 1 process pickling arrays through a queue (no tf.data): {queue_transport:.1f} "
          f"examples/s, {queue_cpu * 1e3:.1f} ms CPU per example")
    print(f"reader, 2 workers, shared-memory slots: {two_workers:.1f} examples/s "
          f"(ratio to the limit {two_workers / limit:.2f})")
    print(f"load-independent check: in-process CPU / worker CPU per example = {limit_cpu / worker_cpu:.2f} "
          f"(shared memory), {limit_cpu / queue_cpu:.2f} (pickled queue)")
    print(f"reader examples/s through get_tf_dataset (1 worker) vs augmentation-only "
          f"ratio={one_worker / limit:.2f} target=0.85")


if __name__ == "__main__":
    main()
