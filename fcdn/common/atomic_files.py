"""Writing outputs safely: build under a temporary name beside the target, rename when complete.

Every writer of the project goes through here (databases, settings, CSVs, checkpoints, the resume
point, SavedModels, masks), so a reader never sees a half-written output and a writer that is
interrupted, killed or runs out of disk leaves the previous version in place.

    with atomic_files.replacing_file("out/mask.tif") as temporary:
        tifffile.imwrite(temporary, mask)          # out/.mask.tmp-<pid>.tif, renamed when done
    with atomic_files.replacing_directory("runs/x/resume") as staging:
        checkpoint.write(os.path.join(staging, "ckpt"))

Temporary names are hidden and carry the writer's process id: `.{stem}.tmp-{pid}{extension}` for a
file (the extension stays last, for libraries that pick the format by it), `.{name}.tmp-{pid}` for
a directory. A directory cannot be renamed over another, so replacing one takes two renames: the
previous directory is parked at `.{name}.old-{pid}`, the new one renamed into place, the parked one
removed. `recover_directory` puts a parked directory back when its writer died between the two
renames, and removes what dead writers left behind.
"""

import contextlib
import os
import re
import shutil


def _split(path):
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return folder, name


def temporary_path(path, pid=None):
    """The hidden temporary name beside a file `path`, keeping its extension."""
    folder, name = _split(path)
    stem, extension = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid() if pid is None else pid}{extension}")


def staging_path(path, pid=None):
    """The hidden temporary name beside a directory `path`."""
    folder, name = _split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid() if pid is None else pid}")


def parked_path(path, pid=None):
    """Where replace_directory keeps the previous directory between its two renames."""
    folder, name = _split(path)
    return os.path.join(folder, f".{name}.old-{os.getpid() if pid is None else pid}")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def replacing_file(path):
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

    On any error (a full disk included) the temporary is removed and `path` is left as it was.
    """
    temporary = temporary_path(path)
    _remove(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)


def write_text(path, text):
    """Write a text file atomically."""
    with replacing_file(path) as temporary:
        with open(temporary, "w") as stream:
            stream.write(text)


@contextlib.contextmanager
def replacing_directory(path):
    """Yield a new empty directory beside `path`; swap it in for `path` when the block succeeds."""
    staging = staging_path(path)
    _remove(staging)
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    os.mkdir(staging)
    try:
        yield staging
        replace_directory(staging, path)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


def replace_directory(source, target):
    """Rename the complete directory `source` onto `target`; a previous `target` goes only once replaced."""
    if not os.path.lexists(target):
        os.rename(source, target)
        return
    parked = parked_path(target)
    _remove(parked)
    os.rename(target, parked)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(parked, target)
        raise
    _remove(parked)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_directory(target, writer_may_live=True):
    """Undo what writers of `target` that died left beside it; returns True if a parked one was restored.

    A parked previous directory is renamed back when `target` is missing (the writer died between
    the two renames of replace_directory), else removed; staging directories are removed. With
    writer_may_live (the default) entries whose process is still running are left alone; a caller
    that owns the folder exclusively (a training run: its process ids may be reused on another node)
    passes False. This process's own entries are always left alone.
    """
    folder, name = _split(target)
    pattern = re.compile(r"\." + re.escape(name) + r"\.(tmp|old)-(\d+)$")
    entries = []
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.match(entry)
        if match:
            pid = int(match.group(2))
            if pid != os.getpid() and not (writer_may_live and _pid_alive(pid)):
                entries.append((match.group(1), os.path.join(folder, entry)))
    restored = False
    # the most recently parked directory is the last complete one
    parked = sorted((path for kind, path in entries if kind == "old"), key=os.path.getmtime, reverse=True)
    if parked and not os.path.lexists(target):
        os.rename(parked.pop(0), target)
        restored = True
    for path in parked + [path for kind, path in entries if kind == "tmp"]:
        _remove(path)
    return restored
