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
- Workers ignore SIGINT (the parent handles Ctrl-C and stops them) and exit by themselves when
  their parent is gone, so no worker outlives the program.
- Starvation lines: `Input Queue Starvation !!!!` when the ready examples drop below 10% of the
  queue capacity, `Input Queue Starvation Over` when they are back above 50%. The warning is armed
  only once the queue has first filled to 50% or a full capacity of examples has been served, so
  the initial fill does not print it, but a reader that never keeps up still does.
"""

import atexit
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing import shared_memory

import lmdb
import numpy as np

import augment
import image_files
import records

STARVATION_LOW = 0.1
STARVATION_HIGH = 0.5
_POLL_SECONDS = 0.25  # how long a blocking call waits before it checks for stop / dead processes
_START_METHOD = "spawn"
_SHM_FOLDER = "/dev/shm"
_SHM_SHARE = 0.4  # at most this share of the free space of /dev/shm for one reader's ring
_MIN_SLOTS_PER_WORKER = 2


class ReaderError(RuntimeError):
    """A worker failed or died; the message carries its error and the record key when known."""


def _open_env(db_path):
    return lmdb.open(db_path, readonly=True, lock=False, readahead=False, max_readers=512,
                     subdir=os.path.isdir(db_path))


def _mask_dtype(number_classes):
    return np.dtype(np.uint8) if number_classes <= 256 else np.dtype(np.int32)


def _describe_exit(exitcode):
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class _KeySampler:
    """Chooses the next key for one worker: random, class-balanced, or its share in order."""

    def __init__(self, keys, mode, worker_index, num_workers, rng):
        self.keys = keys
        self.mode = mode
        self.rng = rng
        if mode == "balance":
            by_class = {}
            for index, key in enumerate(keys):
                for cls in records.key_classes(key):
                    by_class.setdefault(cls, []).append(index)
            self.classes = sorted(by_class)
            self.by_class = [np.asarray(by_class[cls]) for cls in self.classes]
        self.ordered = list(range(worker_index, len(keys), num_workers))
        self.position = 0

    def next_key(self):
        if self.mode == "shuffle":
            return self.keys[self.rng.integers(len(self.keys))]
        if self.mode == "balance":
            members = self.by_class[self.rng.integers(len(self.classes))]
            return self.keys[members[self.rng.integers(len(members))]]
        key = self.keys[self.ordered[self.position]]
        self.position = (self.position + 1) % len(self.ordered)
        return key


class _WorkerStopped(Exception):
    pass


def _prepare_example(key, buffer, settings, rng):
    """Decode, check, augment and normalise one record into (float32 HWC image, mask)."""
    try:
        record = records.decode_record(buffer)
    except records.RecordError as error:
        raise ValueError(f"corrupt record: {error}") from None
    height, width, channels = record.image.shape
    if height % records.SIZE_FACTOR or width % records.SIZE_FACTOR:
        raise ValueError(f"size {height}x{width} is not a multiple of {records.SIZE_FACTOR}")
    if record.image.shape != settings["record_shape"]:
        expected = "x".join(str(v) for v in settings["record_shape"])
        raise ValueError(f"size {height}x{width}x{channels} differs from the first record's {expected}")
    mask = record.mask
    if mask.size:
        low, high = mask.min(), mask.max()
        if low < 0 or high >= settings["number_classes"]:
            bad = int(high) if high >= settings["number_classes"] else int(low)
            raise ValueError(f"class {bad} is outside [0, {settings['number_classes']}) "
                             f"(number_classes={settings['number_classes']})")
    mask = mask.astype(settings["mask_dtype"], copy=False)
    image = record.image
    if settings["augmentation"] is not None:
        image, mask = augment.augment(image, mask, settings["augmentation"], rng)
    image = image_files.zscore_normalize(image)
    crop = settings["crop_size"]
    if crop:
        # after normalising: a crop carries the whole record's statistics, as inference uses the whole image's
        top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        image, mask = image[top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop]
    return image, mask


def _worker_main(worker_index, settings, ready_queue, free_queue, stop_event, parent_pid):
    """Entry point of one worker process (module level so that 'spawn' can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if augment.cv2 is not None:
        augment.cv2.setNumThreads(1)  # one core per worker; more workers use more cores

    def should_stop():
        return stop_event.is_set() or os.getppid() != parent_pid

    progress = {"key": None}  # the record being prepared, for the error message
    try:
        _serve_examples(worker_index, settings, ready_queue, free_queue, should_stop, progress)
    except _WorkerStopped:
        pass
    except Exception as error:  # every failure goes to the consumer, with the record key
        key = progress["key"]
        where = f"record {key.decode('ascii', 'replace')!r}: " if key is not None else ""
        ready_queue.put(("error", worker_index, f"{where}{type(error).__name__}: {error}"))
        ready_queue.close()
        ready_queue.join_thread()  # the error must reach the pipe before this process ends
        sys.exit(1)
    # a consumer that stopped reading must not keep this process alive on queued data
    ready_queue.cancel_join_thread()
    free_queue.cancel_join_thread()


def _serve_examples(worker_index, settings, ready_queue, free_queue, should_stop, progress):
    """Prepare examples and hand them over until told to stop."""
    seed = settings["seed"]
    rng = np.random.default_rng(None if seed is None else [seed, worker_index])
    env = _open_env(settings["db_path"])
    with env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    sampler = _KeySampler(keys, settings["mode"], worker_index, settings["num_workers"], rng)
    shm = shared_memory.SharedMemory(name=settings["shm_name"])
    slots = _slot_views(shm.buf, settings)
    try:
        while not should_stop():
            key = progress["key"] = sampler.next_key()
            with env.begin() as txn:
                buffer = txn.get(key)
            if buffer is None:
                raise ValueError("record vanished from the database")
            image, mask = _prepare_example(key, buffer, settings, rng)
            progress["key"] = None
            slot = _blocking_get(free_queue, should_stop)
            slots[slot][0][...] = image
            slots[slot][1][...] = mask
            ready_queue.put(("ok", slot))
    finally:
        env.close()
        slots = None  # the views must go before the mapping can close
        shm.close()


def _blocking_get(source, should_stop):
    while True:
        try:
            return source.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if should_stop():
                raise _WorkerStopped() from None


def _slot_views(buffer, settings):
    """(image, mask) numpy views of every slot of the shared ring."""
    height, width, channels = settings["image_shape"]
    image_bytes = height * width * channels * 4
    mask_dtype = settings["mask_dtype"]
    slot_bytes = image_bytes + height * width * mask_dtype.itemsize
    views = []
    for slot in range(settings["capacity"]):
        start = slot * slot_bytes
        image = np.ndarray((height, width, channels), np.float32, buffer, start)
        mask = np.ndarray((height, width), mask_dtype, buffer, start + image_bytes)
        views.append((image, mask))
    return views


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
    """

    def __init__(self, img_db, use_augmentation=True, balance_classes=False, shuffle=True,
                 num_workers=1, number_classes=2, augmentation_config=None, seed=None,
                 queue_size_per_worker=100, crop_size=0):
        self.db_path = os.fspath(img_db)
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
        self.image_count, self.record_shape, self.image_dtype = self._inspect_database()
        self.crop_size = self._check_crop_size(crop_size)
        # the shape of the examples served
        self.image_shape = (self.crop_size, self.crop_size, self.record_shape[2]) if self.crop_size \
            else self.record_shape
        if self.mode == "ordered":
            num_workers = min(int(num_workers), self.image_count)
        self.num_workers = int(num_workers)
        self.mask_dtype = _mask_dtype(self.number_classes)
        self.capacity = self._fit_capacity(self.num_workers * int(queue_size_per_worker))
        self._context = multiprocessing.get_context(_START_METHOD)
        self._lock = threading.Lock()
        self._processes = []
        self._shm = None
        self._slots = None
        self._started = False
        self._stop_event = None
        self._error = None
        self._served = 0
        self._starving = False
        self._starvation_armed = False

    def _inspect_database(self):
        """(record count, (H, W, C) of the first record, image dtype); ValueError naming the db."""
        path = self.db_path
        if not os.path.exists(path):
            raise ValueError(f"{path}: database does not exist")
        try:
            env = _open_env(path)
        except lmdb.Error as error:
            raise ValueError(f"{path}: cannot open as an LMDB database ({error})") from None
        try:
            with env.begin() as txn:
                count = txn.stat()["entries"]
                if count == 0:
                    raise ValueError(f"{path}: database is empty")
                classes = set()
                first_key = None
                for key in txn.cursor().iternext(keys=True, values=False):
                    key = bytes(key)
                    first_key = first_key or key
                    try:
                        key_classes = records.key_classes(key)
                    except records.RecordError as error:
                        raise ValueError(f"{path}: {error}") from None
                    bad = [c for c in key_classes if c < 0 or c >= self.number_classes]
                    if bad:
                        raise ValueError(
                            f"{path}: record {key.decode('ascii', 'replace')!r} lists class {bad[0]}, "
                            f"outside [0, {self.number_classes}) (number_classes={self.number_classes})")
                    classes.update(key_classes)
                if self.mode == "balance" and not classes:
                    raise ValueError(f"{path}: no key lists a class, cannot balance classes")
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
        return count, (height, width, channels), first.image.dtype

    def _check_crop_size(self, crop_size):
        crop_size = int(crop_size)
        height, width, _ = self.record_shape
        if crop_size < 0 or crop_size % records.SIZE_FACTOR:
            raise ValueError(f"crop_size must be 0 or a positive multiple of {records.SIZE_FACTOR}, got {crop_size}")
        if crop_size > min(height, width):
            raise ValueError(f"{self.db_path}: crop size {crop_size} is larger than its {height}x{width} records")
        return crop_size

    def _slot_bytes(self):
        height, width, channels = self.image_shape
        return height * width * (channels * 4 + self.mask_dtype.itemsize)

    def _fit_capacity(self, wanted):
        """Slots for `wanted` examples, or as many as fit in part of the free space of /dev/shm.

        Writing past the space of a full tmpfs kills the writer with SIGBUS, so check first.
        """
        try:
            stats = os.statvfs(_SHM_FOLDER)
        except OSError:  # no /dev/shm (not Linux): shared memory is not limited that way
            return wanted
        fitting = int(stats.f_bavail * stats.f_frsize * _SHM_SHARE) // self._slot_bytes()
        if fitting >= wanted:
            return wanted
        if fitting < _MIN_SLOTS_PER_WORKER * self.num_workers:
            raise ValueError(
                f"{self.db_path}: {_SHM_FOLDER} has {stats.f_bavail * stats.f_frsize >> 20} MiB free, too "
                f"little for {_MIN_SLOTS_PER_WORKER * self.num_workers} examples of "
                f"{self._slot_bytes() >> 10} KiB (in Docker, raise --shm-size)")
        print(f"ImageReader: {_SHM_FOLDER} holds {fitting} examples of {self._slot_bytes() >> 10} KiB, "
              f"not {wanted}: queue capacity {fitting}", flush=True)
        return fitting

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
            "shm_name": self._shm.name,
        }

    def startup(self):
        """Start the workers; examples are available once they have read their first records."""
        if self._started:
            raise RuntimeError("reader already started")
        context = self._context
        self._stop_event = context.Event()
        self._free_queue = context.Queue()
        self._ready_queue = context.Queue()
        self._shm = shared_memory.SharedMemory(create=True, size=self._slot_bytes() * self.capacity)
        for slot in range(self.capacity):
            self._free_queue.put(slot)
        settings = self._settings()
        self._slots = _slot_views(self._shm.buf, settings)
        self._started = True
        for index in range(self.num_workers):
            process = context.Process(
                target=_worker_main, name=f"ImageReader-worker-{index}", daemon=True,
                args=(index, settings, self._ready_queue, self._free_queue, self._stop_event,
                      os.getpid()))
            process.start()
            self._processes.append(process)
        atexit.register(self.shutdown)  # an uncaught exception or Ctrl-C still frees the shared memory

    def shutdown(self):
        """Stop every worker and free the shared memory; returns within a few seconds."""
        if not self._started:
            return
        atexit.unregister(self.shutdown)
        self._stop_event.set()
        deadline = time.monotonic() + 2.0
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for process in self._processes:
            if not process.is_alive():
                process.close()
        self._processes = []
        with self._lock:  # a consumer thread may be copying out of a slot right now
            self._started = False
            self._slots = None
            if self._shm is not None:
                self._shm.close()
                self._shm.unlink()
                self._shm = None
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
        return [process.pid for process in self._processes]

    def _check_workers(self):
        """ReaderError when a worker has ended: its own message if it sent one, else how it died."""
        # the sentinels say "ended" even if something else in this process reaped the child
        ended = multiprocessing.connection.wait([p.sentinel for p in self._processes], timeout=0)
        for index, process in enumerate(self._processes):
            if process.sentinel not in ended:
                continue
            process.join(0.5)
            # a worker that failed sent its error before exiting: it is behind the queued examples
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    item = self._ready_queue.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
                if item[0] == "error":
                    self._fail(f"{self.db_path}: reader worker {item[1]} failed on {item[2]}")
            self._fail(f"{self.db_path}: reader worker {index} {_describe_exit(process.exitcode)}")

    def _fail(self, message):
        self._error = ReaderError(message)
        self._stop_event.set()
        raise self._error

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
                return None
            self._check_workers()  # a few waitpid calls: dead workers are noticed at once
            try:
                item = self._ready_queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                pass
            except (OSError, ValueError, EOFError):  # queue closed by shutdown() in another thread
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.db_path}: no example within {timeout} s")
        if item[0] == "error":
            self._fail(f"{self.db_path}: reader worker {item[1]} failed on {item[2]}")
        with self._lock:
            if self._slots is None:
                return None
            image_view, mask_view = self._slots[item[1]]
            image, mask = image_view.copy(), mask_view.copy()
            del image_view, mask_view  # no view may outlive the lock: shutdown() unmaps the ring
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
