"""Building the train and test LMDB databases from a folder of images and a folder of masks.

build() runs the stages in order: check the options, pair the images with their masks, split
the pairs into train and test, encode and write both databases in temporary directories beside
their targets (in worker processes, build_pool.py), and rename both into place only once both are
complete, so an interrupted or failed build leaves earlier databases untouched.
"""

import contextlib
import os
import random
import secrets
import sys
import threading
import time

import lmdb

from fcdn.common import atomic_files
from fcdn.common.errors import gist, shown
from fcdn.data.build_pool import BuildPool, chunk_results, default_workers
from fcdn.data.image_files import list_images, normalize_extension
from fcdn.data.record_encoding import Reading, file_stem
from fcdn.data.record_store import create_database, database_write_error, finish_database
from fcdn.data.records import FILENAMES_CSV, SIZE_FACTOR

PROGRESS_SECONDS = 1.0


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
        if name.splitlines() != [name]:
            raise ValueError(f"{os.path.join(mask_folder, name)}: file name holds a line break ({FILENAMES_CSV} "
                             f"lists one name a line)")
        other = stems.setdefault(file_stem(name), name)
        if other != name:
            raise ValueError(f"{os.path.join(mask_folder, name)}: same key as {other}")
    mask_set = set(masks)
    return masks, [name for name in images if name not in mask_set]


def name_list(names, limit=20):
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return shown(", ".join(names[:limit]) + more)


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
        raise ValueError(f"{output_folder}: cannot write the databases there ({gist(error)})") from None


def write_splits(splits, temporaries, targets, image_folder, mask_folder, tile, workers, log, cancel,
                 reading=Reading()):
    """Write every split into its temporary directory; returns {split: (records, pixel bytes, padded)}."""
    pool = None
    try:
        if workers > 1:
            pool = BuildPool(workers)
        chunks = {}
        for split, files in splits.items():
            create_database(temporaries[split])
            tasks = [(name, image_folder, mask_folder, tile, reading) for name in files]
            chunksize = max(1, min(16, len(tasks) // (4 * workers)))
            chunks[split] = [tasks[start:start + chunksize] for start in range(0, len(tasks), chunksize)]
        # one stream over both splits, so the workers go on with the test images while the train
        # database is being finished
        stream = chunk_results(pool, [(temporaries[split], chunk) for split in splits for chunk in chunks[split]],
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
          log=print, warn=None, cancel=None, reading=None):
    """Build train-/test-{dataset_name}.lmdb; returns a dict of counts, pixel bytes, seconds and the seed.

    reading: a record_encoding.Reading (the channel axis, TIFF series, one mask for every plane); a
    stack gives a record a plane, and the split keeps the planes of a file together.

    Raises ValueError (ImageFileError included) with a one-line message naming the file and the problem.
    Both databases replace earlier ones only once both are complete. Setting the `cancel` event (a
    StopRequest's, say) stops the build with fcdn.common.stopping.Interrupted and removes what it had
    written.
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
                                   tile_size if use_tiling else 0, workers, log, cancel, reading or Reading())
    except OSError as error:  # reading errors are ImageFileErrors already: this is the output side
        raise ValueError(f"{error.filename or output_folder}: cannot write ({gist(error)})") from None
    padded = sorted(name for _, _, names_padded in written.values() for name in names_padded)
    if padded:
        side = f"{tile_size}x{tile_size} tile" if use_tiling else f"{SIZE_FACTOR} pixels"
        log(f"note: {len(padded)} images smaller than the {side} were reflect-padded at the "
            f"bottom/right: {name_list(padded)}")
    return {"seed": seed, "workers": workers, "seconds": time.perf_counter() - start,
            "records": {split: records for split, (records, _, _) in written.items()},
            "pixel_bytes": sum(pixel_bytes for _, pixel_bytes, _ in written.values()), "padded": padded}
