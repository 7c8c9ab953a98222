"""How a training reader learns that one of its workers failed or died, and says so once.

A worker that fails sends its error (with the record key) and exits; a worker that dies without a
word (killed, crashed) is noticed through its sentinel. A watchdog thread waits on the sentinels as
well as the consumer, because the consumer may not read for a long time: tf.data buffers examples
ahead (a test pipeline held 16 examples, almost three test passes of 6), and a reader only read
between test passes would report a death at the next pass but two, an epoch later. The first
failure is kept, stops the other workers, and is raised by check() and by every later read.
"""

import queue
import threading
import time

from fcdn.common import processes


class ReaderError(RuntimeError):
    """A worker failed or died; the message carries its error and the record key when known.

    died: the worker ended without reporting an error (killed, crashed, exited): the data is not
    to blame, and running again may succeed.
    """

    def __init__(self, message, died=False):
        super().__init__(message)
        self.died = died


class WorkerWatchdog:
    """The failures of one reader's workers: `who` names them ("data/train.lmdb: train reader")."""

    def __init__(self, workers, ring, who):
        self.workers = workers
        self.ring = ring
        self.who = who
        self.failure = None  # the ReaderError of the first failed or dead worker
        self._failure_lock = threading.Lock()
        self._stop_event = None
        self._thread = None
        self._watching = threading.Event()

    def start(self, stop_event):
        """Watch the started workers; a failure sets `stop_event`, which tells the others to stop."""
        self._stop_event = stop_event
        self._watching.set()
        self._thread = threading.Thread(target=self._watch, name="ImageReader-watchdog", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop watching: call it before the workers are told to stop, whose ends are no failure."""
        self._watching.clear()
        if self._thread is not None:  # None when starting the workers failed
            self._thread.join()

    def check(self):
        """Raise the ReaderError of a failed or dead worker, if there is one."""
        if self.failure is not None:
            raise self.failure

    def check_workers(self):
        """For the consumer: ReaderError once a worker has ended, its own message if it sent one."""
        self.check()
        ended = self.workers.ended()
        if ended:
            # the watchdog saw it too: let it alone reap the process and read the queue for the message
            self._thread.join(5.0)
            self.check()
            raise self.record(self._death_error(*ended[0]))

    def reported(self, message):
        """The ReaderError of a worker's ("error", index, text) message, recorded as the failure."""
        return self.record(ReaderError(f"{self.who} worker {message[1]} failed on {message[2]}"))

    def record(self, error):
        """Keep the first failure (the consumer and the watchdog may both see it) and stop the rest."""
        with self._failure_lock:
            if self.failure is None:
                self.failure = error
        self._stop_event.set()
        return self.failure

    def _watch(self):
        """Thread: record the failure of the first worker that ends before stop()."""
        while self._watching.is_set() and self.failure is None:
            ended, _ = self.workers.wait()
            if ended and self._watching.is_set():
                self._record_end(*ended[0])

    def _record_end(self, index, process):
        process.join(0.5)
        if processes.was_killed(process.exitcode):  # it had no chance to send anything
            self.record(self._death_error(index, process))
            return
        # a worker that failed sent its error before exiting: it is behind the queued examples
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.failure is None:
            try:
                message = self.ring.next_message()
            except queue.Empty:
                continue
            if message is None:  # closed by shutdown()
                break
            if message[0] == "error":
                self.reported(message)
                return
        self.record(self._death_error(index, process))

    def _death_error(self, index, process):
        cause = processes.exit_cause(process.exitcode)
        ended = f"was {cause}" if processes.was_killed(process.exitcode) else f"ended ({cause})"
        return ReaderError(f"{self.who} worker {index} {ended}", died=True)
