"""Turn a folder of images and a folder of masks into the train and test LMDB databases.

    # the example data: data/train-HES.lmdb (80 records) and data/test-HES.lmdb (20 records)
    python build_lmdb.py
    # your own data, a repeatable split, 512x512 tiles
    python build_lmdb.py --image_folder my/images --mask_folder my/masks --output_folder my/ \
        --dataset_name cells --seed 7 --use_tiling 1 --tile_size 512
    # png files, 70% train, four worker processes
    python build_lmdb.py --image_format .png --train_fraction 0.7 --workers 4

The records and keys are the reference's (records.py), so databases built here load in the NIST
reference tool and the other way round. Worker processes decode, crop and write their records
straight into the database (LMDB serialises their transactions), in a temporary directory beside each
target; the parent renames both databases into place only once both are complete, so an interrupted or
failed build leaves earlier databases untouched.
"""

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import re
import secrets
import signal
import sys
import threading
import time

import lmdb
import numpy as np

from fcdn.common import atomic_files
from fcdn.data.image_files import (
    ImageFileError,
    as_mask,
    as_supported_image,
    list_images,
    normalize_extension,
    read_image,
)
from fcdn.data.records import FILENAMES_CSV, SIZE_FACTOR, make_record

# FCDenseNet56's receptive-field radius: the reference strides tiles by tile_size - RADIUS
RADIUS = 384
INITIAL_MAP_SIZE = 8 << 20
MAX_OPEN_ATTEMPTS = 100
PROGRESS_SECONDS = 1.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, noticed at a safe point of the build (never inside the pool's own locks)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="build_lmdb",
        description="Convert a folder of images and a folder of masks (same file names) into "
        "train-{dataset_name}.lmdb and test-{dataset_name}.lmdb for training. Images smaller than "
        "the tile (or, without tiling, than 32 pixels) are reflect-padded at the bottom/right up to "
        "that size, and listed in a note.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image_folder", default="data/images", help="folder holding the images")
    parser.add_argument("--mask_folder", default="data/masks",
                        help="folder holding the masks; its file names decide which images are used")
    parser.add_argument("--output_folder", default="data/", help="folder to write the two databases into")
    parser.add_argument("--dataset_name", default="HES", help="databases are named train-NAME.lmdb, test-NAME.lmdb")
    parser.add_argument("--train_fraction", type=float, default=0.8,
                        help="fraction of the files that go to the train database, in (0, 1)")
    parser.add_argument("--image_format", default="tif",
                        help="file extension of images and masks: tif, png or jpg (a leading '.' is accepted)")
    parser.add_argument("--use_tiling", type=int, choices=(0, 1), default=0,
                        help="1: cut every image into overlapping tile_size x tile_size tiles; "
                        "0: one record per image, centre-cropped to a multiple of 32")
    parser.add_argument("--tile_size", type=int, default=512,
                        help="tile height and width with --use_tiling 1 (a positive multiple of 32); "
                        "smaller images are reflect-padded at the bottom/right to one tile")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the train/test shuffle; without it one is drawn and printed")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes; None means one per core available to this process")
    return parser.parse_args(argv)


def check_options(train_fraction, tile_size, dataset_name, workers):
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"--train_fraction {train_fraction}: must be strictly between 0 and 1")
    if tile_size <= 0 or tile_size % SIZE_FACTOR:
        raise ValueError(f"--tile_size {tile_size}: must be a positive multiple of {SIZE_FACTOR}")
    if not dataset_name or os.sep in dataset_name or dataset_name in (".", ".."):
        raise ValueError(f"--dataset_name {dataset_name!r}: must be a plain file-name part")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")


def find_pairs(image_folder, mask_folder, extension):
    """File names listed in the mask folder (all with an image), and the images that have no mask."""
    images = list_images(image_folder, extension)
    masks = list_images(mask_folder, extension)
    for folder, names in ((mask_folder, masks), (image_folder, images)):
        if not names:
            raise ValueError(f"{folder}: no .{extension} files in this folder")
    image_set = set(images)
    orphans = [name for name in masks if name not in image_set]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise ValueError(f"{os.path.join(image_folder, orphans[0])}: no image for the mask "
                         f"{os.path.join(mask_folder, orphans[0])}{more}")
    stems = {}
    for name in masks:
        if not name.isascii():
            raise ValueError(f"{os.path.join(mask_folder, name)}: file name is not ASCII (LMDB keys are ASCII)")
        other = stems.setdefault(file_stem(name), name)
        if other != name:
            raise ValueError(f"{os.path.join(mask_folder, name)}: same key as {other}")
    mask_set = set(masks)
    return masks, [name for name in images if name not in mask_set]


def name_list(names, limit=20):
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def file_stem(name):
    return os.path.splitext(name)[0]


def split_names(names, train_fraction, seed):
    """Shuffle the sorted names with `seed`; the first int(train_fraction * n) go to train."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    count = int(train_fraction * len(shuffled))
    if count == 0 or count == len(shuffled):
        empty = "train" if count == 0 else "test"
        raise ValueError(f"--train_fraction {train_fraction}: leaves the {empty} database empty "
                         f"with {len(shuffled)} files")
    return shuffled[:count], shuffled[count:]


def crop_to_multiple(array, factor=SIZE_FACTOR):
    """Centre-crop height and width down to multiples of `factor`, dropping d//2 at the start."""
    height, width = array.shape[:2]
    top, left = (height % factor) // 2, (width % factor) // 2
    return array[top:top + height - height % factor, left:left + width - width % factor]


def pad_to_size(array, height, width):
    """Reflect-pad at the bottom/right up to height x width, so pixel (0, 0) keeps its place."""
    pad_rows, pad_cols = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if not pad_rows and not pad_cols:
        return array
    padding = [(0, pad_rows), (0, pad_cols)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding, mode="reflect")


def tile_origins(height, width, tile_size):
    """The reference's tile origins (y0, x0), x outer, with tiles past an edge slid back inside."""
    delta = tile_size - RADIUS
    if delta < 64:
        delta = int(0.8 * tile_size)
    origins = []
    for x0 in range(0, width, delta):
        for y0 in range(0, height, delta):
            origins.append((min(y0, height - tile_size), min(x0, width - tile_size)))
    # several origins can slide back onto the same tile; the reference wrote it twice under one key
    return list(dict.fromkeys(origins))


def load_pair(image_path, mask_path):
    image = as_supported_image(read_image(image_path), image_path)
    mask = as_mask(read_image(mask_path), mask_path)
    if image.shape[:2] != mask.shape:
        raise ImageFileError(f"{image_path}: image is {image.shape[0]}x{image.shape[1]} but its mask "
                             f"{mask_path} is {mask.shape[0]}x{mask.shape[1]} (height x width)")
    return image, mask


def pair_records(image, mask, stem, tile_size):
    """(key, value) records of one pair, the cropped pair or its tiles, and their bytes of pixels."""
    if tile_size:
        image, mask = pad_to_size(image, tile_size, tile_size), pad_to_size(mask, tile_size, tile_size)
        origins = tile_origins(image.shape[0], image.shape[1], tile_size)
        pieces = [(image[y0:y0 + tile_size, x0:x0 + tile_size], mask[y0:y0 + tile_size, x0:x0 + tile_size],
                   (y0, x0)) for y0, x0 in origins]
    else:
        image = crop_to_multiple(pad_to_size(image, SIZE_FACTOR, SIZE_FACTOR))
        mask = crop_to_multiple(pad_to_size(mask, SIZE_FACTOR, SIZE_FACTOR))
        pieces = [(image, mask, None)]
    records = [make_record(stem, piece_image, piece_mask, origin) for piece_image, piece_mask, origin in pieces]
    return records, sum(piece_image.nbytes + piece_mask.nbytes for piece_image, piece_mask, _ in pieces)


def encode_file(task):
    """Worker: one file name -> its records and pixel bytes, or an error message naming the file."""
    name, image_folder, mask_folder, tile_size = task
    image_path, mask_path = os.path.join(image_folder, name), os.path.join(mask_folder, name)
    try:
        image, mask = load_pair(image_path, mask_path)
        records, pixel_bytes = pair_records(image, mask, file_stem(name), tile_size)
    except ImageFileError as error:
        return {"error": str(error)}
    except Exception as error:  # an unexpected failure still names the file, not a worker traceback
        return {"error": f"{image_path}: {type(error).__name__}: {error}"}
    minimum = tile_size or SIZE_FACTOR
    padded = image.shape[0] < minimum or image.shape[1] < minimum
    return {"records": records, "pixel_bytes": pixel_bytes, "padded": padded}


class RecordStore:
    """The LMDB databases one process writes records into, each opened on first use.

    The workers write their records themselves, so no pixels travel back to the parent. Several
    processes may write into one database at once: LMDB serialises their write transactions through
    its lock file. The map starts small and doubles whenever a transaction finds it full, so it is
    sized from the data; a process whose map another one grew adopts the new size. Commits are not
    synced: the parent syncs each database once, when it is complete (finish_database).
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


def collect_results(results, file_count, label, log):
    """Count the stored records in task order, with progress lines; returns (records, pixel bytes, padded)."""
    records, pixel_bytes, padded = 0, 0, []
    start = last_report = time.perf_counter()
    for done, (name, result) in enumerate(results, 1):
        if "error" in result:
            raise ValueError(result["error"])
        records += result["records"]
        pixel_bytes += result["pixel_bytes"]
        if result["padded"]:
            padded.append(name)
        now = time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS or done == file_count:
            last_report = now
            rate = pixel_bytes / 1e6 / max(now - start, 1e-9)
            log(f"{label}: {done}/{file_count} files, {records} records, "
                f"{pixel_bytes / 1e6:.1f} MB of pixels, {rate:.1f} MB/s")
    return records, pixel_bytes, padded


def create_database(path):
    lmdb.open(path, map_size=INITIAL_MAP_SIZE).close()


def finish_database(path):
    """Make a complete database durable: one sync for all the unsynced commits of every writer."""
    descriptor = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def open_output(output_folder, targets, stack):
    """Temporary directories for the databases, renamed onto `targets` when `stack` closes cleanly.

    What a killed build left beside them goes first (atomic_files.recover_directory).
    """
    try:
        os.makedirs(output_folder, exist_ok=True)
        for target in targets.values():
            atomic_files.recover_directory(target)
        return {split: stack.enter_context(atomic_files.replacing_directory(target))
                for split, target in targets.items()}
    except OSError as error:
        raise ValueError(f"{output_folder}: cannot write the databases there ({error.strerror or error})") from None


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
    context.set_forkserver_preload(["build_lmdb"])
    return context


def _worker_loop(connection):
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


class WorkerPool:
    """Worker processes with one pipe each, drained by a receiver thread.

    Unlike multiprocessing.Pool, no lock is shared between processes, so terminating the workers can
    never leave the parent waiting on a lock that a killed worker held (Pool.terminate() hung that
    way in about one interrupt in fifteen here), and a worker that dies (out of memory, say) is
    reported instead of waited for forever.
    """

    IN_FLIGHT = 2  # chunks queued per worker, so it never waits for the parent between chunks

    def __init__(self, count):
        context = pool_context()
        self.connections, self.processes = [], []
        for _ in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_loop, args=(child_end,), daemon=True)
            process.start()
            child_end.close()
            self.connections.append(parent_end)
            self.processes.append(process)
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.receiver = threading.Thread(target=self._receive, daemon=True)
        self.receiver.start()

    def _receive(self):
        # results are drained at once, so a worker never blocks on a full pipe while the parent writes
        sentinels = {process.sentinel: process for process in self.processes}
        workers = {connection: number for number, connection in enumerate(self.connections)}
        while not self.stopping.is_set():
            for ready in multiprocessing.connection.wait(list(workers) + list(sentinels), timeout=0.2):
                if ready in sentinels:
                    self.inbox.put(("died", sentinels[ready]))
                    return
                try:
                    index, results = ready.recv()
                except (EOFError, OSError):  # the worker's end closed: it died (or we are closing)
                    self.inbox.put(("died", self.processes[workers[ready]]))
                    return
                self.inbox.put((workers[ready], index, results))

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
                        raise ValueError(self._died(self.processes[worker])) from None
                    outstanding[worker] += 1
                    sent += 1
                if next_index in finished:
                    break
                if cancel.is_set():
                    raise Interrupted()
                try:
                    message = self.inbox.get(timeout=0.2)
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

    @staticmethod
    def _died(process):
        process.join(timeout=1)
        code = process.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        return f"worker process {process.pid} died ({how}); out of memory? try fewer --workers"

    def close(self):
        self.stopping.set()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join()
        self.receiver.join()
        for connection in self.connections:
            connection.close()


def _chunk_results(pool, chunks, cancel):
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


def output_folder_of(temporaries):
    return os.path.dirname(next(iter(temporaries.values()))) or "."


def database_write_error(temporary, error):
    """One line for a failed database write, naming the database (not its hidden temporary name)."""
    folder, name = os.path.split(temporary)
    name = re.sub(r"^\.(.*)\.tmp-\d+$", r"\1", name)
    return (f"{os.path.join(folder, name)}: writing the database failed ({error}{disk_full_note(folder or '.')}); "
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


def write_splits(splits, temporaries, targets, image_folder, mask_folder, tile, workers, log, cancel):
    """Write every split into its temporary directory; returns {split: (records, pixel bytes, padded)}."""
    pool = None
    try:
        if workers > 1:
            pool = WorkerPool(workers)
        chunks = {}
        for split, files in splits.items():
            create_database(temporaries[split])
            tasks = [(name, image_folder, mask_folder, tile) for name in files]
            chunksize = max(1, min(16, len(tasks) // (4 * workers)))
            chunks[split] = [tasks[start:start + chunksize] for start in range(0, len(tasks), chunksize)]
        # one stream over both splits, so the workers go on with the test images while the train
        # database is being finished
        stream = _chunk_results(pool, [(temporaries[split], chunk) for split in splits for chunk in chunks[split]],
                                cancel)
        written = {}
        for split, files in splits.items():
            results = ((task[0], summary) for chunk, summaries in zip(chunks[split], stream)
                       for task, summary in zip(chunk, summaries))
            written[split] = collect_results(results, len(files), os.path.basename(targets[split]), log)
            finish_database(temporaries[split])
            atomic_files.write_text(os.path.join(temporaries[split], FILENAMES_CSV),
                                    "".join(f"{name}\n" for name in files))
        return written
    except lmdb.Error as error:  # a full disk, for instance
        raise ValueError(database_write_error(next(iter(temporaries.values())), error)) from None
    finally:
        if pool is not None:
            pool.close()


def build(image_folder="data/images", mask_folder="data/masks", output_folder="data/", dataset_name="HES",
          train_fraction=0.8, image_format="tif", use_tiling=False, tile_size=512, seed=None, workers=None,
          log=print, warn=None, cancel=None):
    """Build train-/test-{dataset_name}.lmdb; returns a dict of counts, pixel bytes, seconds and the seed.

    Raises ValueError (ImageFileError included) with a one-line message naming the file and the problem.
    Both databases replace earlier ones only once both are complete. Setting the `cancel` event (from a
    signal handler, say) stops the build with Interrupted and removes what it had written.
    """
    cancel = cancel or threading.Event()
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    start = time.perf_counter()
    extension = normalize_extension(image_format)
    check_options(train_fraction, tile_size, dataset_name, workers)
    names, unpaired = find_pairs(image_folder, mask_folder, extension)
    if unpaired:
        warn(f"warning: {len(unpaired)} images in {image_folder} have no mask and are skipped: {name_list(unpaired)}")
    if seed is None:
        seed = secrets.randbelow(2**31)
        log(f"seed: {seed} (pass --seed {seed} to repeat this split)")
    splits = dict(zip(("train", "test"), split_names(names, train_fraction, seed)))
    targets = {split: os.path.join(output_folder, f"{split}-{dataset_name}.lmdb") for split in splits}
    workers = min(workers or default_workers(), len(names))
    try:
        # both databases are renamed into place only once both are complete
        with contextlib.ExitStack() as stack:
            temporaries = open_output(output_folder, targets, stack)
            log(f"building {targets['train']} ({len(splits['train'])} files) and {targets['test']} "
                f"({len(splits['test'])} files) with {workers} worker process{'es' if workers > 1 else ''}")
            written = write_splits(splits, temporaries, targets, image_folder, mask_folder,
                                   tile_size if use_tiling else 0, workers, log, cancel)
    except OSError as error:  # reading errors are ImageFileErrors already: this is the output side
        raise ValueError(f"{error.filename or output_folder}: cannot write ({error.strerror or error})") from None
    padded = sorted(name for _, _, names_padded in written.values() for name in names_padded)
    if padded:
        side = f"{tile_size}x{tile_size} tile" if use_tiling else f"{SIZE_FACTOR} pixels"
        log(f"note: {len(padded)} images smaller than the {side} were reflect-padded at the "
            f"bottom/right: {name_list(padded)}")
    return {"seed": seed, "workers": workers, "seconds": time.perf_counter() - start,
            "records": {split: records for split, (records, _, _) in written.items()},
            "pixel_bytes": sum(pixel_bytes for _, pixel_bytes, _ in written.values()), "padded": padded}


def main(argv=None):
    args = parse_args(argv)
    cancel, received = threading.Event(), []

    def on_signal(signum, frame):
        received.append(signum)
        cancel.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = build(args.image_folder, args.mask_folder, args.output_folder, args.dataset_name,
                      args.train_fraction, args.image_format, bool(args.use_tiling), args.tile_size,
                      args.seed, args.workers, log=lambda line: print(line, flush=True), cancel=cancel)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except (Interrupted, KeyboardInterrupt):
        print("interrupted: partial databases removed, earlier databases left as they were", file=sys.stderr)
        sys.exit(128 + (received[0] if received else signal.SIGINT))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    megabytes = stats["pixel_bytes"] / 1e6
    print(f"done: {stats['records']['train']} train and {stats['records']['test']} test records, "
          f"{megabytes:.1f} MB of pixels in {stats['seconds']:.1f} s ({megabytes / stats['seconds']:.1f} MB/s)")


if __name__ == "__main__":
    main()
