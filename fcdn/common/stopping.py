"""Stopping on SIGINT and SIGTERM, the same way in every script.

A handler only records the signal; the work notices it at a safe point (between steps, chunks or
images), cleans up and raises `Interrupted`, and the script exits with 128 + the signal's number
(130 for Ctrl-C, 143 for SIGTERM: what SLURM sends before it kills a job). A second Ctrl-C aborts
at once.
"""

import signal
import threading


class Interrupted(Exception):
    """The work stopped at a safe point because SIGINT or SIGTERM arrived."""

    def __init__(self, signal_number=signal.SIGINT):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = int(signal_number)

    @property
    def exit_status(self):
        return 128 + self.signal_number


class StopRequest:
    """Records the first SIGINT/SIGTERM; `requested` says whether to stop. Use as a context manager
    (or install()/restore()) so the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number = None
        self.event = threading.Event()  # for threads and loops that wait rather than poll
        self._previous = {}

    def install(self):
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc_info):
        self.restore()

    def _handle(self, signal_number, frame):
        # no printing here: the handler may interrupt a print of the main thread
        if self.signal_number is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_number is None:
            self.signal_number = signal_number
            self.event.set()

    @property
    def requested(self):
        return self.signal_number is not None

    @property
    def name(self):
        return signal.Signals(self.signal_number).name if self.requested else None

    def check(self):
        """Raises Interrupted if a stop was requested: call it at each safe point."""
        if self.requested:
            raise Interrupted(self.signal_number)
