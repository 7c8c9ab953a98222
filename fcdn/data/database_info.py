"""What a training reader checks once about its LMDB database before any worker starts.

A database that cannot serve (missing, empty, a key listing a class outside the model's range, a
corrupt first record, records not a multiple of 32) is one ValueError naming it, instead of a
worker failing on it later.
"""

import dataclasses
import os

import lmdb
import numpy as np

from fcdn.data import reader_worker, records


@dataclasses.dataclass(frozen=True)
class DatabaseInfo:
    count: int
    record_shape: tuple  # (H, W, C) of the first record
    image_dtype: np.dtype


def _check_keys(path, txn, number_classes, balance):
    """The first key; ValueError if a key lists a class outside the range (or none, when balancing)."""
    classes, first_key = set(), None
    for key in txn.cursor().iternext(keys=True, values=False):
        key = bytes(key)
        first_key = first_key or key
        try:
            key_classes = records.key_classes(key)
        except records.RecordError as error:
            raise ValueError(f"{path}: {error}") from None
        bad = [c for c in key_classes if c < 0 or c >= number_classes]
        if bad:
            raise ValueError(
                f"{path}: record {key.decode('ascii', 'replace')!r} lists class {bad[0]}, "
                f"outside [0, {number_classes}) (number_classes={number_classes})")
        classes.update(key_classes)
    if balance and not classes:
        raise ValueError(f"{path}: no key lists a class, cannot balance classes")
    return first_key


def inspect_database(path, number_classes, balance=False):
    """Count, first-record shape and image type of a database; ValueError naming it when unusable."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: database does not exist")
    try:
        env = reader_worker.open_env(path)
    except lmdb.Error as error:
        raise ValueError(f"{path}: cannot open as an LMDB database ({error})") from None
    try:
        with env.begin() as txn:
            count = txn.stat()["entries"]
            if count == 0:
                raise ValueError(f"{path}: database is empty")
            first_key = _check_keys(path, txn, number_classes, balance)
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
    return DatabaseInfo(count, (height, width, channels), first.image.dtype)


def check_crop_size(path, crop_size, record_shape):
    """`crop_size` as an int: 0 (whole records) or a multiple of 32 that fits in the records."""
    crop_size = int(crop_size)
    height, width, _ = record_shape
    if crop_size < 0 or crop_size % records.SIZE_FACTOR:
        raise ValueError(f"crop_size must be 0 or a positive multiple of {records.SIZE_FACTOR}, got {crop_size}")
    if crop_size > min(height, width):
        raise ValueError(f"{path}: crop size {crop_size} is larger than its {height}x{width} records")
    return crop_size
