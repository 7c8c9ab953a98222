"""The worker side of imagereader.py: one process that reads, augments and normalises examples.

Each worker opens its own read-only LMDB environment, draws keys (at random, class-balanced, or
its share in order), prepares examples and writes them into free slots of the shared-memory ring,
sending only slot numbers back. It imports no TensorFlow (spawn starts it from scratch), ignores
SIGINT (the parent handles Ctrl-C) and stops when told to or when its parent is gone.
"""

import os
import queue
import signal
import sys
from multiprocessing import shared_memory

import lmdb
import numpy as np

import augment
from fcdn.common.processes import POLL_SECONDS
from fcdn.data import image_files, records


def open_env(db_path):
    """A read-only environment without locking, so read-only storage works."""
    return lmdb.open(db_path, readonly=True, lock=False, readahead=False, max_readers=512,
                     subdir=os.path.isdir(db_path))


class KeySampler:
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


def prepare_example(key, buffer, settings, rng):
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


def worker_main(worker_index, settings, ready_queue, free_queue, stop_event, parent_pid):
    """Entry point of one worker process (module level so that 'spawn' can import it)."""
    # Ctrl-C is the parent's to handle, and so is SIGTERM, which SLURM sends every process of a job:
    # the trainers stop together at a step's end and then stop their readers. A reader ended by it
    # mid-step would leave the other workers of a multi-worker run in an all-reduce its trainer never
    # joins, past the job's KillWait, with no resume point saved.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    env = open_env(settings["db_path"])
    with env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    sampler = KeySampler(keys, settings["mode"], worker_index, settings["num_workers"], rng)
    shm = shared_memory.SharedMemory(name=settings["shm_name"])
    slots = slot_views(shm.buf, settings)
    try:
        while not should_stop():
            key = progress["key"] = sampler.next_key()
            with env.begin() as txn:
                buffer = txn.get(key)
            if buffer is None:
                raise ValueError("record vanished from the database")
            image, mask = prepare_example(key, buffer, settings, rng)
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
            return source.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if should_stop():
                raise _WorkerStopped() from None


def slot_views(buffer, settings):
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
