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
  a long time: tf.data buffers examples ahead (a test pipeline held 16 examples, almost three test
  passes of 6), and a reader only read between test passes would report a death at the next pass
  but two, an epoch later. check() raises the watchdog's error at once; the training loop calls it
  between steps.
- Workers ignore SIGINT (the parent handles Ctrl-C and stops them) and exit by themselves when
  their parent is gone, so no worker outlives the program.
- Parts: inspect_database() checks a database once; SlotRing owns the shared memory; WorkerSet
  starts, watches and stops the processes (their code is in reader_worker.py); ImageReader is the
  consumer and the tf.data side.
- Starvation lines: `Input Queue Starvation !!!!` when the ready examples drop below 10% of the
  queue capacity, `Input Queue Starvation Over` when they are back above 50%. The warning is armed
  only once the queue has first filled to 50% or a full capacity of examples has been served, so
  the initial fill does not print it, but a reader that never keeps up still does.
"""

import atexit
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from multiprocessing import shared_memory

import lmdb
import numpy as np

import augment
from fcdn.data import image_files, reader_worker, records

STARVATION_LOW = 0.1
STARVATION_HIGH = 0.5
_START_METHOD = "spawn"
_SHM_FOLDER = "/dev/shm"
_SHM_SHARE = 0.4  # at most this share of the free space of /dev/shm for one reader's ring
_MIN_SLOTS_PER_WORKER = 2


class ReaderError(RuntimeError):
    """A worker failed or died; the message carries its error and the record key when known.

    died: the worker ended without reporting an error (killed, crashed, exited): the data is not
    to blame, and running again may succeed.
    """

    def __init__(self, message, died=False):
        super().__init__(message)
        self.died = died


def describe_exit(exitcode):
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


# ----------------------------------------------------------------------------------------------
# the database


@dataclasses.dataclass(frozen=True)
class DatabaseInfo:
    count: int
    record_shape: tuple  # (H, W, C) of the first record
    image_dtype: np.dtype


def _check_keys(path, txn, number_classes, balance):
    """The first key; ValueError if a key lists a class outside the range (or none, when balancing)."""
    classes, first_key = set(), None
    for key in txn.cursor().iternext(keys=True, values=False):
        key = bytes(key)
        first_key = first_key or key
        try:
            key_classes = records.key_classes(key)
        except records.RecordError as error:
            raise ValueError(f"{path}: {error}") from None
        bad = [c for c in key_classes if c < 0 or c >= number_classes]
        if bad:
            raise ValueError(
                f"{path}: record {key.decode('ascii', 'replace')!r} lists class {bad[0]}, "
                f"outside [0, {number_classes}) (number_classes={number_classes})")
        classes.update(key_classes)
    if balance and not classes:
        raise ValueError(f"{path}: no key lists a class, cannot balance classes")
    return first_key


def inspect_database(path, number_classes, balance=False):
    """Count, first-record shape and image type of a database; ValueError naming it when unusable."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: database does not exist")
    try:
        env = reader_worker.open_env(path)
    except lmdb.Error as error:
        raise ValueError(f"{path}: cannot open as an LMDB database ({error})") from None
    try:
        with env.begin() as txn:
            count = txn.stat()["entries"]
            if count == 0:
                raise ValueError(f"{path}: database is empty")
            first_key = _check_keys(path, txn, number_classes, balance)
            try:
                first = records.decode_record(txn.get(first_key))
            except records.RecordError as error:
                raise ValueError(f"{path}: first record {first_key!r} is corrupt ({error})") from None
    except lmdb.Error as error:
        raise ValueError(f"{path}: cannot read the database ({error})") from None
    finally:
        env.close()
    height, width, channels = first.image.shape
    if height % records.SIZE_FACTOR or width % records.SIZE_FACTOR:
        raise ValueError(f"{path}: record {first_key.decode('ascii', 'replace')!r} is {height}x{width}, "
                         f"not a multiple of {records.SIZE_FACTOR} in height and width")
    return DatabaseInfo(count, (height, width, channels), first.image.dtype)


# ----------------------------------------------------------------------------------------------
# shared memory


class SlotRing:
    """The shared-memory slots examples travel in: one (float32 image, mask) pair each."""

    def __init__(self, image_shape, mask_dtype):
        self.image_shape = image_shape
        self.mask_dtype = mask_dtype
        self.capacity = 0
        self.shm = None
        self.views = None

    def slot_bytes(self):
        height, width, channels = self.image_shape
        return height * width * (channels * 4 + self.mask_dtype.itemsize)

    def fit_capacity(self, wanted, num_workers, db_path):
        """`wanted` slots, or as many as fit in part of the free space of /dev/shm.

        Writing past the space of a full tmpfs kills the writer with SIGBUS, so check first.
        """
        try:
            stats = os.statvfs(_SHM_FOLDER)
        except OSError:  # no /dev/shm (not Linux): shared memory is not limited that way
            return wanted
        fitting = int(stats.f_bavail * stats.f_frsize * _SHM_SHARE) // self.slot_bytes()
        if fitting >= wanted:
            return wanted
        if fitting < _MIN_SLOTS_PER_WORKER * num_workers:
            raise ValueError(
                f"{db_path}: {_SHM_FOLDER} has {stats.f_bavail * stats.f_frsize >> 20} MiB free, too "
                f"little for {_MIN_SLOTS_PER_WORKER * num_workers} examples of "
                f"{self.slot_bytes() >> 10} KiB (in Docker, raise --shm-size)")
        print(f"ImageReader: {_SHM_FOLDER} holds {fitting} examples of {self.slot_bytes() >> 10} KiB, "
              f"not {wanted}: queue capacity {fitting}", flush=True)
        return fitting

    def create(self, capacity, settings):
        self.capacity = capacity
        self.shm = shared_memory.SharedMemory(create=True, size=self.slot_bytes() * capacity)
        self.views = reader_worker.slot_views(self.shm.buf, dict(settings, shm_name=self.shm.name))
        return self.shm.name

    def copy_out(self, slot):
        image_view, mask_view = self.views[slot]
        return image_view.copy(), mask_view.copy()

    def free(self):
        self.views = None  # no view may outlive the mapping
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


# ----------------------------------------------------------------------------------------------
# worker processes


class WorkerSet:
    """The worker processes of one reader: started with spawn, watched, stopped without leftovers."""

    def __init__(self, context):
        self.context = context
        self.processes = []

    def start(self, count, settings, ready_queue, free_queue, stop_event):
        for index in range(count):
            process = self.context.Process(
                target=reader_worker.worker_main, name=f"ImageReader-worker-{index}", daemon=True,
                args=(index, settings, ready_queue, free_queue, stop_event, os.getpid()))
            process.start()
            self.processes.append(process)

    def ended(self):
        """(index, process) of every worker that has ended, without waiting."""
        # the sentinels say "ended" even if something else in this process reaped the child
        sentinels = multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=0)
        return [(index, process) for index, process in enumerate(self.processes)
                if process.sentinel in sentinels]

    def stop(self, grace=2.0):
        """Join the workers (they were told to stop), then terminate, then kill what is left."""
        deadline = time.monotonic() + grace
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for process in self.processes:
            if not process.is_alive():
                process.close()
        self.processes = []

    @property
    def pids(self):
        return [process.pid for process in self.processes]


# ----------------------------------------------------------------------------------------------
# the consumer

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
        self.crop_size = self._check_crop_size(crop_size)
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
        self._workers = WorkerSet(self._context)
        self._lock = threading.Lock()
        self._started = False
        self._stop_event = None
        self._error = None
        self._error_lock = threading.Lock()
        self._watchdog = None
        self._watching = threading.Event()
        self._served = 0
        self._starving = False
        self._starvation_armed = False

    def _check_crop_size(self, crop_size):
        crop_size = int(crop_size)
        height, width, _ = self.record_shape
        if crop_size < 0 or crop_size % records.SIZE_FACTOR:
            raise ValueError(f"crop_size must be 0 or a positive multiple of {records.SIZE_FACTOR}, got {crop_size}")
        if crop_size > min(height, width):
            raise ValueError(f"{self.db_path}: crop size {crop_size} is larger than its {height}x{width} records")
        return crop_size

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
        context = self._context
        self._stop_event = context.Event()
        self._free_queue = context.Queue()
        self._ready_queue = context.Queue()
        settings = self._settings()
        settings["shm_name"] = self._ring.create(self.capacity, settings)
        for slot in range(self.capacity):
            self._free_queue.put(slot)
        self._started = True
        self._workers.start(self.num_workers, settings, self._ready_queue, self._free_queue, self._stop_event)
        self._watching.set()
        self._watchdog = threading.Thread(target=self._watch, name=f"ImageReader-watchdog-{self.db_path}",
                                          daemon=True)
        self._watchdog.start()
        atexit.register(self.shutdown)  # an uncaught exception or Ctrl-C still frees the shared memory

    def shutdown(self):
        """Stop every worker and free the shared memory; returns within a few seconds."""
        if not self._started:
            return
        atexit.unregister(self.shutdown)
        # before the workers are told to stop: their ends are no failure, and stop() closes the
        # sentinels the watchdog waits on
        self._watching.clear()
        if self._watchdog is not None:  # None when starting the workers failed
            self._watchdog.join()
        self._stop_event.set()
        self._workers.stop()
        with self._lock:  # a consumer thread may be copying out of a slot right now
            self._started = False
            self._ring.free()
        for channel in (self._ready_queue, self._free_queue):
            channel.cancel_join_thread()
            channel.close()

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
        if not self._started:
            return 0
        try:
            return self._ready_queue.qsize()
        except NotImplementedError:  # macOS has no sem_getvalue
            return None

    @property
    def worker_pids(self):
        return self._workers.pids

    @property
    def failure(self):
        """The ReaderError of a failed or dead worker, None while all is well."""
        return self._error

    def check(self):
        """Raise ReaderError if a worker has failed or died; cheap enough to call between steps."""
        if self._error is not None:
            raise self._error

    def _watch(self):
        """Watchdog thread: record the failure of the first worker that ends before shutdown()."""
        sentinels = {process.sentinel: (index, process) for index, process in enumerate(self._workers.processes)}
        while self._watching.is_set() and self._error is None:
            ended = multiprocessing.connection.wait(list(sentinels), timeout=reader_worker.POLL_SECONDS)
            if ended and self._watching.is_set():
                self._record_failure(self._ended_error(*sentinels[ended[0]]))

    def _check_workers(self):
        """ReaderError when a worker has ended: its own message if it sent one, else how it died."""
        self.check()
        ended = self._workers.ended()
        if ended:
            # the watchdog saw it too: let it alone reap the process and read the queue for the message
            self._watchdog.join(5.0)
            self.check()
            self._fail(self._death_error(*ended[0]))

    def _ended_error(self, index, process):
        process.join(0.5)
        if process.exitcode is not None and process.exitcode < 0:  # killed: it sent nothing
            return self._death_error(index, process)
        # a worker that failed sent its error before exiting: it is behind the queued examples
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self._error is None:
            try:
                item = self._ready_queue.get(timeout=reader_worker.POLL_SECONDS)
            except queue.Empty:
                continue
            except (OSError, ValueError, EOFError):  # closed by shutdown()
                break
            if item[0] == "error":
                return self._error_item(item)
        return self._death_error(index, process)

    def _death_error(self, index, process):
        return ReaderError(f"{self.db_path}: {self.label} worker {index} {describe_exit(process.exitcode)}",
                           died=True)

    def _error_item(self, item):
        return ReaderError(f"{self.db_path}: {self.label} worker {item[1]} failed on {item[2]}")

    def _record_failure(self, error):
        """Keep the first failure (the consumer and the watchdog may both see it) and stop the rest."""
        with self._error_lock:
            if self._error is None:
                self._error = error
        self._stop_event.set()
        return self._error

    def _fail(self, error):
        raise self._record_failure(error)

    def get_example(self, timeout=None):
        """Next (float32 HWC image, HW mask); None once shutdown() was called.

        Raises ReaderError when a worker failed or died, TimeoutError after `timeout` seconds.
        """
        if self._error is not None:
            raise self._error
        if not self._started:
            if self._stop_event is not None:
                return None
            raise RuntimeError("reader not started: call startup() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stop_event.is_set():
                self.check()  # stopped by a failure (the watchdog's): say so, do not just end
                return None
            self._check_workers()  # a few waitpid calls: dead workers are noticed at once
            try:
                item = self._ready_queue.get(timeout=reader_worker.POLL_SECONDS)
                break
            except queue.Empty:
                pass
            except (OSError, ValueError, EOFError):  # queue closed by shutdown() in another thread
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.db_path}: no example within {timeout} s")
        if item[0] == "error":
            self._fail(self._error_item(item))
        with self._lock:  # shutdown() unmaps the ring under the same lock
            if self._ring.views is None:
                return None
            image, mask = self._ring.copy_out(item[1])
        try:
            self._free_queue.put(item[1])
        except (OSError, ValueError):  # closed by shutdown() in another thread
            return None
        self._served += 1
        self._report_starvation()
        return image, mask

    def _report_starvation(self):
        ready = self.queue_depth()
        if ready is None:
            return
        if ready >= STARVATION_HIGH * self.capacity or self._served >= self.capacity:
            self._starvation_armed = True
        if not self._starvation_armed:
            return
        if not self._starving and ready < STARVATION_LOW * self.capacity:
            self._starving = True
            print("Input Queue Starvation !!!!", flush=True)
        elif self._starving and ready > STARVATION_HIGH * self.capacity:
            self._starving = False
            print("Input Queue Starvation Over", flush=True)

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
