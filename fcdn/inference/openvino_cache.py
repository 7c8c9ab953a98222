"""The OpenVINO conversions a user made, kept in a per-user cache outside every model folder.

    key = model_key("runs/x/saved_model", openvino.__version__)      # a hash of the model's files
    model = read(openvino, key)                                      # None unless this user made it
    write(openvino, key, model, {"precision": "float32"})            # best effort, atomic

A conversion is stored under `<root>/openvino/<key>/` (model.xml, model.bin, record.json), where
root is $FCDENSENET_CACHE_DIR if set, else $XDG_CACHE_HOME/fcdensenet, else ~/.cache/fcdensenet (as
pip and Hugging Face keep theirs). The root is created readable by its owner only, and a root that
another user owns or may write to is not used: a conversion is read only from where this user alone
could have put it, never from the model folder (a shared or downloaded model may carry a conversion
of another network). The key hashes every file of the SavedModel, so a changed model is converted
again; a link that leaves the SavedModel, or anything but a regular file or folder in it, is refused
with one line before any byte is read (a link to /dev/zero would otherwise never end).
"""

import hashlib
import json
import os
import stat

from fcdn.common import atomic_files

CACHE_ENV = "FCDENSENET_CACHE_DIR"
CACHE_FOLDER = "openvino"
IR_NAME = "model.xml"
RECORD_NAME = "record.json"


def cache_root(environment=None):
    """Where this user's conversions go: $FCDENSENET_CACHE_DIR, else $XDG_CACHE_HOME/fcdensenet, else
    ~/.cache/fcdensenet."""
    environment = os.environ if environment is None else environment
    if environment.get(CACHE_ENV):
        return os.path.abspath(environment[CACHE_ENV])
    home = environment.get("HOME") or os.path.expanduser("~")
    base = environment.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(os.path.abspath(base), "fcdensenet")


def conversion_folder(key):
    return os.path.join(cache_root(), CACHE_FOLDER, key)


def model_files(path):
    """(relative name, path) of every file of a SavedModel, sorted; ValueError (one line naming the
    entry) for a link that points outside it or an entry that is neither a regular file nor a folder."""
    root = os.path.realpath(path)
    found = []
    for parent, folders, files in os.walk(root):
        folders.sort()
        for name in folders + sorted(files):
            entry = os.path.join(parent, name)
            if os.path.islink(entry):
                target = os.path.realpath(entry)
                if os.path.commonpath([root, target]) != root:
                    raise ValueError(f"{entry}: a link out of the SavedModel (to {target}): refusing to "
                                     f"read it; copy the file into the model folder instead")
            mode = os.stat(entry).st_mode if os.path.exists(entry) else 0
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ValueError(f"{entry}: not a regular file or folder (a device, pipe, socket or broken "
                                 f"link) in the SavedModel: refusing to read it")
            if name in files:
                found.append((os.path.relpath(entry, root), entry))
    return found


def model_key(path, *versions):
    """A hash of every file of the SavedModel (names and contents) and of `versions` (the OpenVINO
    version, and what else the conversion depends on): a changed model or tool converts again."""
    digest = hashlib.sha256("\0".join(versions).encode() + b"\1")
    for relative, file_path in model_files(path):
        digest.update(relative.encode() + b"\0")
        with open(file_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _private_root():
    """The cache root, created owner-only; None when it cannot be, or when another user owns it or may
    write to it (what is in it then is not known to be this user's)."""
    root = cache_root()
    try:
        os.makedirs(os.path.dirname(root), exist_ok=True)
        if not os.path.isdir(root):
            os.mkdir(root, 0o700)
        details = os.stat(root)
    except OSError:
        return None
    if details.st_uid != os.getuid() or details.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return root


def read(openvino, key):
    """(ov.Model, record) of the conversion stored under `key`, or (None, None)."""
    if _private_root() is None:
        return None, None
    folder = conversion_folder(key)
    try:
        with open(os.path.join(folder, RECORD_NAME)) as handle:
            record = json.load(handle)
        if record.get("key") != key:
            return None, None
        if not record.get("ir", True):  # a record without a model: e.g. an int8 gate that failed
            return None, record
        return openvino.Core().read_model(os.path.join(folder, IR_NAME)), record
    except Exception:  # missing or damaged: converted again, never trusted half-read
        return None, None


def write(openvino, key, model, record):
    """Store `model` (None: the record alone) under `key`, atomically; False when the cache cannot be
    written (a read-only home: the conversion then lives for this run only)."""
    if _private_root() is None:
        return False
    folder = conversion_folder(key)
    try:
        os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
        with atomic_files.replacing_directory(folder) as staging:
            save(openvino, model, staging)
            with open(os.path.join(staging, RECORD_NAME), "w") as handle:
                json.dump(dict(record, key=key, ir=model is not None), handle, indent=1, sort_keys=True)
        return True
    except OSError:
        return False


def save(openvino, model, folder):
    """model.xml and model.bin in `folder` (nothing for None), float32 weights kept as they are."""
    if model is not None:
        # compress_to_fp16 would otherwise halve float32 weights to float16
        openvino.save_model(model, os.path.join(folder, IR_NAME), compress_to_fp16=False)
