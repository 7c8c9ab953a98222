"""The shared memory finished examples travel in from a reader's workers to its consumer.

Examples are written into slots of one shared-memory block and only slot numbers travel through
the two queues (free slots to the workers, filled ones to the consumer): messages of a few bytes,
written atomically, so a worker that dies mid-message cannot leave the consumer blocked in a read
that never completes, and no example is pickled.
"""

import os
import threading
from multiprocessing import shared_memory

from fcdn.common.processes import POLL_SECONDS
from fcdn.data import reader_worker

_SHM_FOLDER = "/dev/shm"
_SHM_SHARE = 0.4  # at most this share of the free space of /dev/shm for one reader's ring
_MIN_SLOTS_PER_WORKER = 2
# what a queue raises when shutdown() closed it under a thread still using it
_CLOSED = (OSError, ValueError, EOFError)


class SlotRing:
    """The shared-memory slots, one (float32 image, mask) pair each, and the queues of slot numbers."""

    def __init__(self, image_shape, mask_dtype):
        self.image_shape = image_shape
        self.mask_dtype = mask_dtype
        self.capacity = 0
        self.shm = None
        self.views = None
        self.free_queue = None  # slots the workers may fill
        self.ready_queue = None  # ("ok", slot) of a finished example, or a worker's ("error", index, message)
        self._lock = threading.Lock()  # a consumer thread may be copying out of a slot while another closes

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

    def open(self, context, capacity, settings):
        """Create the shared memory and the queues, every slot free; returns the memory's name."""
        self.capacity = capacity
        self.shm = shared_memory.SharedMemory(create=True, size=self.slot_bytes() * capacity)
        self.views = reader_worker.slot_views(self.shm.buf, dict(settings, shm_name=self.shm.name))
        self.free_queue = context.Queue()
        self.ready_queue = context.Queue()
        for slot in range(capacity):
            self.free_queue.put(slot)
        return self.shm.name

    def depth(self):
        """Finished examples waiting for the consumer (None where the platform cannot tell)."""
        try:
            return self.ready_queue.qsize()
        except NotImplementedError:  # macOS has no sem_getvalue
            return None

    def next_message(self):
        """The next message of the workers; queue.Empty after a poll interval, None once closed."""
        try:
            return self.ready_queue.get(timeout=POLL_SECONDS)
        except _CLOSED:
            return None

    def take(self, slot):
        """A copy of the example in `slot`, which goes back to the workers; None once closed."""
        with self._lock:
            if self.views is None:
                return None
            image_view, mask_view = self.views[slot]
            example = image_view.copy(), mask_view.copy()
        try:
            self.free_queue.put(slot)
        except _CLOSED:
            return None
        return example

    def close(self):
        with self._lock:
            self.views = None  # no view may outlive the mapping
            if self.shm is not None:
                self.shm.close()
                self.shm.unlink()
                self.shm = None
        for channel in (self.ready_queue, self.free_queue):
            if channel is not None:
                channel.cancel_join_thread()
                channel.close()
