"""Worker processes watched for deaths, the same way wherever a script runs some.

The LMDB builder's pool and the training reader's workers both start a few processes from one
multiprocessing context, must notice at once when one dies (the out-of-memory killer, a crash)
instead of waiting for it forever, and must leave none behind when they stop.
"""

import atexit
import multiprocessing.connection
import os
import signal
import sys
import time

# how long a wait on workers, queues or pipes lasts before the waiter looks again whether to stop
POLL_SECONDS = 0.25


def was_killed(exitcode):
    """Whether a process with this exit code was ended by a signal (it had no chance to say why)."""
    return exitcode is not None and exitcode < 0


def exit_cause(exitcode):
    """How a process ended, in words for a message: 'killed by signal SIGKILL', 'exit code 1'."""
    if exitcode is None:
        return "exit code unknown"
    if was_killed(exitcode):
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def exit_at_once(status):
    """End this process now with `status`, skipping the interpreter's teardown and that of the libraries
    it loaded (TensorFlow's takes tens of seconds on a loaded machine). Child
    processes still running are killed and reaped first, so that none is left behind; the caller has
    saved what must be kept."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(1.0)
    # what the interpreter's exit runs in Python, without the C++ teardown that follows: multiprocessing's
    # finalizers unlink the queues' named semaphores (which the resource tracker would otherwise report
    # as leaked, after our last line), and TensorFlow removes the autograph files it wrote to the
    # temporary folder (which would otherwise stay there for good)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class WorkerProcesses:
    """Daemon processes started from one context, watched through their sentinels, stopped without leftovers.

    A thread blocked in wait() must be done before close(), which closes the sentinels it waits on.
    """

    def __init__(self, context, name):
        self.context = context
        self.name = name  # the processes are called name-0, name-1, ...
        self.processes = []

    def start(self, target, arguments):
        """One process per tuple in `arguments`, running target(*that tuple)."""
        for args in arguments:
            process = self.context.Process(target=target, args=args, daemon=True,
                                           name=f"{self.name}-{len(self.processes)}")
            process.start()
            self.processes.append(process)

    @property
    def pids(self):
        return [process.pid for process in self.processes]

    def wait(self, timeout=POLL_SECONDS, connections=()):
        """(ended, ready) once a worker has ended or one of `connections` can be read, or after `timeout`
        seconds: the (index, process) of every worker that has ended, and the readable connections."""
        # a sentinel says "ended" even when something else in this process has reaped the child
        sentinels = {process.sentinel: (index, process) for index, process in enumerate(self.processes)}
        ready = multiprocessing.connection.wait([*connections, *sentinels], timeout)
        ended = [sentinels[item] for item in ready if isinstance(item, int) and item in sentinels]
        return ended, [item for item in ready if not isinstance(item, int)]

    def ended(self):
        """(index, process) of every worker that has ended, without waiting."""
        return self.wait(timeout=0)[0]

    @staticmethod
    def cause_of_end(process, timeout=1.0):
        """How an ended worker ended, once it is reaped (waiting at most `timeout` seconds for that)."""
        process.join(timeout)
        return exit_cause(process.exitcode)

    def stop(self, grace=0.0):
        """Give the workers `grace` seconds to end (they were told to), then terminate, then kill them."""
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

    def close(self):
        """Release the stopped workers' resources (their sentinels among them)."""
        for process in self.processes:
            if not process.is_alive():
                process.close()
        self.processes = []
