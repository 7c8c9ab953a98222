"""Multiprocess reader: LMDB records -> augmented, z-scored examples -> tf.data.

Worker processes read records from the database, augment and normalise them, and hand finished
examples to the consumer through a ring of shared-memory slots (only slot numbers travel through
the queues). The consumer side is `get_example()` or the `tf.data.Dataset` of `get_tf_dataset()`.

    with ImageReader("data/train-HES.lmdb", num_workers=2, seed=0) as reader:
        dataset = reader.get_tf_dataset().batch(4, drop_remainder=True).prefetch(2)

Design decisions:
- Workers are started with the 'spawn' method: forking a process whose TensorFlow threads are
  running is unsafe, and spawn behaves the same on every platform. The script that creates a reader
  needs the usual `if __name__ == "__main__":` guard.
- Every worker opens its own read-only LMDB environment (lock=False) after it starts.
- Transport: finished examples are written into shared-memory slots and only slot numbers travel
  through the queues (messages of a few bytes, written atomically); masks travel as uint8 class
  maps when the classes fit. Pickling whole arrays through a queue cost the workers more CPU per
  512x512 example (bench/bench_reader.py), and a worker that dies in the middle of a large message
  leaves the consumer blocked in a read that never completes, so there is no such mode. When
  /dev/shm cannot hold `queue_size_per_worker` examples per worker (a container's default is
  64 MiB), the ring is made smaller to fit and a line says so.
- A worker that fails sends its error (with the record key) and exits; a worker that dies without a
  word is noticed by polling the processes between queue reads. Either way the consumer raises
  ReaderError within about a second and the remaining workers are stopped.
- A watchdog thread waits on the workers' sentinels as well, because the consumer may not read for
  a long time (reader_watchdog.py says how long); check() raises its error at once, and the
  training loop calls it between steps.
- Workers ignore SIGINT (the parent handles Ctrl-C and stops them) and exit by themselves when
  their parent is gone, so no worker outlives the program.
- Parts, in fcdn/data: database_info checks a database once; slot_ring owns the shared memory and
  its queues; reader_worker is the workers' code, started and stopped by fcdn.common.processes;
  reader_watchdog notices their failures; starvation prints the starvation lines. ImageReader is
  the consumer and the tf.data side.
- Starvation lines: `Input Queue Starvation !!!!` when the ready examples run low, `Input Queue
  Starvation Over` when they are back (fcdn/data/starvation.py says when).
"""

import atexit
import multiprocessing
import os
import queue
import time

import augment
from fcdn.common.processes import WorkerProcesses
from fcdn.data import image_files, reader_worker
from fcdn.data.database_info import DatabaseInfo, check_crop_size, inspect_database
from fcdn.data.reader_watchdog import ReaderError, WorkerWatchdog
from fcdn.data.slot_ring import SlotRing
from fcdn.data.starvation import STARVATION_HIGH, STARVATION_LOW, StarvationReport

__all__ = ["ImageReader", "ReaderError", "DatabaseInfo", "inspect_database", "STARVATION_LOW", "STARVATION_HIGH"]

_START_METHOD = "spawn"


class ImageReader:
    """Worker processes that serve augmented, normalised examples from an LMDB of records.

    img_db: LMDB directory written by build_lmdb.py (or the reference).
    use_augmentation: augment every example with `augmentation_config` (default: the reference's).
    balance_classes: pick a class uniformly among those present, then a record that has it.
    shuffle: pick records at random; with neither, worker i reads keys i, i+W, i+2W, ... forever.
    num_workers: worker processes (in ordered mode at most one per record).
    number_classes: masks must hold classes in [0, number_classes).
    crop_size: 0 serves whole records; otherwise a random crop_size x crop_size window of each record
        (a multiple of 32, at most the record size), cut after augmentation and normalisation.
    seed: None for fresh randomness; an int gives worker i the stream default_rng([seed, i]).
    queue_size_per_worker: finished examples buffered per worker (fewer when /dev/shm is small).
    name: what the reader is for ("train", "test"), named in its error messages.
    """

    def __init__(self, img_db, use_augmentation=True, balance_classes=False, shuffle=True,
                 num_workers=1, number_classes=2, augmentation_config=None, seed=None,
                 queue_size_per_worker=100, crop_size=0, name=None):
        self.db_path = os.fspath(img_db)
        self.label = f"{name} reader" if name else "reader"  # names the reader in error messages
        if int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if int(number_classes) < 1:
            raise ValueError(f"number_classes must be >= 1, got {number_classes}")
        if int(queue_size_per_worker) < 1:
            raise ValueError(f"queue_size_per_worker must be >= 1, got {queue_size_per_worker}")
        if augmentation_config is None:
            augmentation_config = augment.AugmentationConfig()
        if not isinstance(augmentation_config, augment.AugmentationConfig):
            raise ValueError("augmentation_config must be an augment.AugmentationConfig")
        self.number_classes = int(number_classes)
        self.use_augmentation = bool(use_augmentation)
        self.augmentation_config = augmentation_config
        self.seed = seed
        self.mode = "balance" if balance_classes else ("shuffle" if shuffle else "ordered")
        info = inspect_database(self.db_path, self.number_classes, balance=self.mode == "balance")
        self.image_count, self.record_shape, self.image_dtype = info.count, info.record_shape, info.image_dtype
        self.crop_size = check_crop_size(self.db_path, crop_size, self.record_shape)
        # the shape of the examples served
        self.image_shape = (self.crop_size, self.crop_size, self.record_shape[2]) if self.crop_size \
            else self.record_shape
        if self.mode == "ordered":
            num_workers = min(int(num_workers), self.image_count)
        self.num_workers = int(num_workers)
        self.mask_dtype = image_files.mask_dtype(self.number_classes - 1)
        self._ring = SlotRing(self.image_shape, self.mask_dtype)
        self.capacity = self._ring.fit_capacity(self.num_workers * int(queue_size_per_worker), self.num_workers,
                                                self.db_path)
        self._context = multiprocessing.get_context(_START_METHOD)
        self._workers = WorkerProcesses(self._context, "ImageReader-worker")
        self._watchdog = WorkerWatchdog(self._workers, self._ring, f"{self.db_path}: {self.label}")
        self._starvation = StarvationReport(self.capacity)
        self._started = False
        self._stop_event = None

    def get_image_count(self):
        return self.image_count

    def get_image_size(self):
        """(height, width, channels) of the examples: the records', or the crop's when cropping."""
        return self.image_shape

    def _settings(self):
        return {
            "db_path": self.db_path,
            "mode": self.mode,
            "num_workers": self.num_workers,
            "number_classes": self.number_classes,
            "record_shape": self.record_shape,
            "image_shape": self.image_shape,
            "crop_size": self.crop_size,
            "mask_dtype": self.mask_dtype,
            "augmentation": self.augmentation_config if self.use_augmentation else None,
            "seed": self.seed,
            "capacity": self.capacity,
        }

    def startup(self):
        """Start the workers; examples are available once they have read their first records."""
        if self._started:
            raise RuntimeError("reader already started")
        self._stop_event = self._context.Event()
        settings = self._settings()
        settings["shm_name"] = self._ring.open(self._context, self.capacity, settings)
        self._started = True
        self._workers.start(reader_worker.worker_main, [
            (index, settings, self._ring.ready_queue, self._ring.free_queue, self._stop_event, os.getpid())
            for index in range(self.num_workers)])
        self._watchdog.start(self._stop_event)
        atexit.register(self.shutdown)  # an uncaught exception or Ctrl-C still frees the shared memory

    def shutdown(self):
        """Stop every worker and free the shared memory; returns within a few seconds."""
        if not self._started:
            return
        atexit.unregister(self.shutdown)
        # before the workers are told to stop: their ends are no failure, and closing the workers
        # closes the sentinels the watchdog waits on
        self._watchdog.stop()
        self._stop_event.set()
        self._workers.stop(grace=2.0)
        self._workers.close()
        self._started = False
        self._ring.close()

    def __enter__(self):
        self.startup()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        return False

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass

    def queue_depth(self):
        """Finished examples waiting for the consumer (None where the platform cannot tell)."""
        return self._ring.depth() if self._started else 0

    @property
    def worker_pids(self):
        return self._workers.pids

    @property
    def failure(self):
        """The ReaderError of a failed or dead worker, None while all is well."""
        return self._watchdog.failure

    def check(self):
        """Raise ReaderError if a worker has failed or died; cheap enough to call between steps."""
        self._watchdog.check()

    def get_example(self, timeout=None):
        """Next (float32 HWC image, HW mask); None once shutdown() was called.

        Raises ReaderError when a worker failed or died, TimeoutError after `timeout` seconds.
        """
        self.check()
        if not self._started:
            if self._stop_event is not None:
                return None
            raise RuntimeError("reader not started: call startup() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stop_event.is_set():
                self.check()  # stopped by a failure (the watchdog's): say so, do not just end
                return None
            self._watchdog.check_workers()  # a few waitpid calls: dead workers are noticed at once
            try:
                message = self._ring.next_message()
                break
            except queue.Empty:
                pass
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.db_path}: no example within {timeout} s")
        if message is None:  # closed by shutdown() in another thread
            return None
        if message[0] == "error":
            raise self._watchdog.reported(message)
        example = self._ring.take(message[1])
        if example is not None:
            self._starvation.example_served(self.queue_depth())
        return example

    def generator(self):
        """Examples until shutdown(); raises ReaderError when a worker fails."""
        while True:
            example = self.get_example()
            if example is None:
                return
            yield example

    def get_tf_dataset(self):
        """Unbatched tf.data.Dataset of (float32 (H,W,C) image, (H,W) mask) with fixed shapes.

        It ends when shutdown() is called, so a pipeline still pulling from it never hangs.
        """
        import tensorflow as tf  # only the consumer needs TensorFlow; workers never import it

        height, width, channels = self.image_shape
        signature = (
            tf.TensorSpec((height, width, channels), tf.float32),
            tf.TensorSpec((height, width), tf.as_dtype(self.mask_dtype)),
        )
        return tf.data.Dataset.from_generator(self.generator, output_signature=signature)
