"""Writing records into LMDB databases from several processes at once, and finishing them.

The workers write their records themselves, so no pixels travel back to the parent. LMDB
serialises the write transactions of several processes through its lock file. Commits are not
synced: the parent syncs each database once, when it is complete (finish_database).
"""

import os

import lmdb

from fcdn.common import atomic_files
from fcdn.data.record_encoding import encode_file

INITIAL_MAP_SIZE = 8 << 20
MAX_OPEN_ATTEMPTS = 100


class RecordStore:
    """The LMDB databases one process writes records into, each opened on first use.

    The map starts small and doubles whenever a transaction finds it full, so it is sized from the
    data; a process whose map another one grew adopts the new size.
    """

    def __init__(self):
        self.environments = {}

    def _environment(self, path):
        if path not in self.environments:
            self.environments[path] = self._open(path)
        return self.environments[path]

    @staticmethod
    def _open(path):
        for _ in range(MAX_OPEN_ATTEMPTS):
            try:
                return lmdb.open(path, map_size=INITIAL_MAP_SIZE, sync=False, metasync=False)
            except lmdb.MapResizedError:  # another writer grew the map while this one was opening it
                continue
        raise lmdb.Error(f"{path}: the map kept growing while this process opened it")

    def put(self, path, records):
        """Write (key, value) records in one transaction."""
        environment = self._environment(path)
        while True:
            try:
                with environment.begin(write=True) as transaction:
                    for key, value in records:
                        transaction.put(key, value)
                return
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                environment.set_mapsize(0)
            except lmdb.MapFullError:  # the aborted transaction is simply written again
                environment.set_mapsize(environment.info()["map_size"] * 2)

    def close(self):
        for environment in self.environments.values():
            environment.close()
        self.environments.clear()


def store_chunk(tasks, database, store):
    """Encode pairs and write their records into `database`; returns one summary per task (no pixels)."""
    encoded = [encode_file(task) for task in tasks]
    if any("error" in result for result in encoded):
        return encoded  # the build stops at the first error and discards the database
    try:
        store.put(database, [record for result in encoded for record in result["records"]])
    except lmdb.Error as error:  # a full disk, for instance
        return [{"error": database_write_error(database, error)}] * len(tasks)
    return [dict(result, records=len(result["records"])) for result in encoded]


def create_database(path):
    lmdb.open(path, map_size=INITIAL_MAP_SIZE).close()


def finish_database(path):
    """Make a complete database durable: one sync for all the unsynced commits of every writer."""
    descriptor = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def database_write_error(temporary, error):
    """One line for a failed database write, naming the database (not its hidden temporary name)."""
    note = disk_full_note(os.path.dirname(temporary) or ".")
    return (f"{atomic_files.target_path(temporary)}: writing the database failed ({error}{note}); "
            f"earlier databases are left as they were")


def disk_full_note(folder):
    """'; the disk is full ...' when it is: LMDB reports a full disk at commit as an I/O error."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return ""
    free = stats.f_bavail * stats.f_frsize
    if free >= max(1 << 20, stats.f_blocks * stats.f_frsize // 1000):
        return ""
    return f"; the disk is full: {free >> 10} KiB free"
