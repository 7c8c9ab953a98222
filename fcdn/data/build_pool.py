"""The worker processes of a database build: they encode pairs and write the records themselves.

Each worker has one pipe, over which it receives chunks of file names and sends back one summary
per file (no pixels). Unlike multiprocessing.Pool, no lock is shared between processes, so
terminating the workers can never leave the parent waiting on a lock that a killed worker held
(Pool.terminate() hung that way in about one interrupt in fifteen), and a worker that dies (out of
memory, say) is reported instead of waited for forever.
"""

import multiprocessing
import os
import queue
import signal
import threading

from fcdn.common.processes import POLL_SECONDS, WorkerProcesses
from fcdn.common.stopping import Interrupted
from fcdn.data.record_store import RecordStore, store_chunk


def default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pool_context():
    """forkserver imports this module once and forks the workers from it; spawn where it is missing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Named explicitly: with only the default ('__main__') every worker imported numpy, lmdb and
    # tifffile again, about 0.1 s each before its first pair; preloaded, a worker starts in ~10 ms.
    # This module, not the script: the script may be a console command's wrapper.
    context.set_forkserver_preload([__name__])
    return context


def worker_loop(connection):
    """Worker: encode and store chunks of tasks until the parent closes the pipe (or dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    store = RecordStore()
    try:
        while True:
            index, (database, tasks) = connection.recv()
            connection.send((index, store_chunk(tasks, database, store)))
    except (EOFError, OSError):  # the parent is gone: nothing left to do
        pass
    finally:
        store.close()


class BuildPool:
    """Worker processes with one pipe each, drained by a receiver thread."""

    IN_FLIGHT = 2  # chunks queued per worker, so it never waits for the parent between chunks

    def __init__(self, count):
        self.workers = WorkerProcesses(pool_context(), "build_lmdb-worker")
        self.connections = []
        for _ in range(count):
            parent_end, child_end = self.workers.context.Pipe()
            self.workers.start(worker_loop, [(child_end,)])
            child_end.close()
            self.connections.append(parent_end)
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.receiver = threading.Thread(target=self._receive, daemon=True)
        self.receiver.start()

    def _receive(self):
        # results are drained at once, so a worker never blocks on a full pipe while the parent writes
        numbers = {connection: number for number, connection in enumerate(self.connections)}
        while not self.stopping.is_set():
            ended, ready = self.workers.wait(connections=self.connections)
            for connection in ready:
                try:
                    index, results = connection.recv()
                except (EOFError, OSError):  # the worker's end closed: it died (or we are closing)
                    self.inbox.put(("died", self.workers.processes[numbers[connection]]))
                    return
                self.inbox.put((numbers[connection], index, results))
            if ended:
                self.inbox.put(("died", ended[0][1]))
                return

    def results(self, chunks, cancel):
        """Each chunk's results, in chunk order; only a few chunks are ever done ahead of the consumer."""
        outstanding, finished, sent = [0] * len(self.connections), {}, 0
        for next_index in range(len(chunks)):
            while True:
                while sent < len(chunks) and min(outstanding) < self.IN_FLIGHT:
                    worker = outstanding.index(min(outstanding))
                    try:
                        self.connections[worker].send((sent, chunks[sent]))
                    except OSError:  # its end of the pipe is closed: the process is gone
                        if cancel.is_set():
                            raise Interrupted() from None
                        raise ValueError(self._died(self.workers.processes[worker])) from None
                    outstanding[worker] += 1
                    sent += 1
                if next_index in finished:
                    break
                if cancel.is_set():
                    raise Interrupted()
                try:
                    message = self.inbox.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if message[0] == "died":
                    if cancel.is_set():  # Ctrl-C reached a worker still starting up, before it ignored SIGINT
                        raise Interrupted()
                    raise ValueError(self._died(message[1]))
                worker, index, results = message
                outstanding[worker] -= 1
                finished[index] = results
            yield finished.pop(next_index)

    def _died(self, process):
        return (f"worker process {process.pid} died ({self.workers.cause_of_end(process)}); "
                f"out of memory? try fewer --workers")

    def close(self):
        self.stopping.set()
        # at once: what a worker is still doing will not be read
        self.workers.stop(grace=0.0)
        self.receiver.join()  # before close(), which closes the sentinels the receiver waits on
        self.workers.close()
        for connection in self.connections:
            connection.close()


def chunk_results(pool, chunks, cancel):
    """Summaries of each (database, tasks) chunk, in order, stored by the workers or by this process."""
    if pool is not None:
        yield from pool.results(chunks, cancel)
        return
    store = RecordStore()
    try:
        for database, tasks in chunks:
            if cancel.is_set():
                raise Interrupted()
            yield store_chunk(tasks, database, store)
    finally:
        store.close()
