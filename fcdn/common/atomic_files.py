"""Writing outputs safely: build under a temporary name beside the target, rename when complete.

Every writer of the project goes through here (databases, settings, CSVs, checkpoints, the resume
point, SavedModels, masks), so a reader never sees a half-written output and a writer that is
interrupted, killed or runs out of disk leaves the previous version in place.

    with atomic_files.replacing_file("out/mask.tif") as temporary:
        tifffile.imwrite(temporary, mask)          # out/.mask.tmp-<pid>-<random>-<host>.tif, renamed when done
    with atomic_files.replacing_directory("runs/x/resume") as staging:
        checkpoint.write(os.path.join(staging, "ckpt"))

Temporary names are hidden and say who writes them: `.{stem}.tmp-{pid}-{random}-{host}{extension}`
for a file (the extension stays last, for libraries that pick the format by it), `.{name}.tmp-{pid}-
{random}-{host}` for a directory. The random part keeps two writers apart that share a process id (two
containers on one file system); the host name tells whether the process id can be checked here. A
directory cannot be renamed over another, so replacing one takes two renames: the previous directory
is parked at `.{name}.old-{pid}-{random}-{host}`, the new one renamed into place, the parked one removed.

A writer killed outright (SIGKILL, the kernel's OOM killer, a power cut) leaves its temporary
behind. The first write of a process into a folder clears what dead writers left there
(`remove_leftovers`): a temporary of this host whose process is gone is removed, and a parked directory
whose target is missing (the writer died between the two renames) is put back. Temporaries of another
host, of a live process, and anything that is not named exactly like a temporary are left alone. Names of
earlier versions (`.{stem}.tmp-{pid}{extension}`, no random part or host) count as this host's.
"""

import contextlib
import os
import re
import secrets
import shutil
import socket

# the host name as it can stand in a file name: dots (which would look like an extension) and
# anything unusual become "_"
HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:64] or "_"

# `.{name}.{tmp|old}-{pid}[-{random}-{host}][{extension}]`; without the random part and the host, a
# name of an earlier version
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)"
                       r"(?:-(?P<random>[0-9a-f]{8})-(?P<host>[A-Za-z0-9_-]+))?(?P<extension>\.[A-Za-z0-9_-]{1,16})?")

# folders this process has cleared of dead writers' leftovers (once per process is enough: a writer
# that dies later leaves its temporary to the next run)
_cleared = set()


def _split(path):
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return folder, name


def _tag(pid):
    return f"{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}-{HOST}"


def temporary_path(path, pid=None):
    """A new hidden temporary name beside a file `path`, keeping its extension."""
    folder, name = _split(path)
    stem, extension = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{_tag(pid)}{extension}")


def staging_path(path, pid=None):
    """A new hidden temporary name beside a directory `path`."""
    folder, name = _split(path)
    return os.path.join(folder, f".{name}.tmp-{_tag(pid)}")


def parked_path(path, pid=None):
    """A new name for replace_directory to keep the previous directory under between its two renames."""
    folder, name = _split(path)
    return os.path.join(folder, f".{name}.old-{_tag(pid)}")


def target_path(path):
    """The output a temporary (or parked) name stands for; `path` itself when it is no such name."""
    folder, name = os.path.split(os.fspath(path))
    match = _LEFTOVER.fullmatch(name)
    if match is None:
        return os.fspath(path)
    return os.path.join(folder, match["name"] + (match["extension"] or ""))


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _first_write(folder):
    if folder not in _cleared:
        remove_leftovers(folder)


@contextlib.contextmanager
def replacing_file(path):
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

    On any error (a full disk included) the temporary is removed and `path` is left as it was.
    """
    temporary = temporary_path(path)
    _first_write(os.path.dirname(temporary))
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
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    _first_write(os.path.dirname(staging))
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


def _dead_writers_entries(folder, writer_may_live, name):
    """(kind, path, target path) of the leftovers in `folder` (of the output `name` alone, unless None)
    whose writers are gone."""
    found = []
    for entry in os.listdir(folder):
        match = _LEFTOVER.fullmatch(entry)
        if match is None or (name is not None and match["name"] + (match["extension"] or "") != name):
            continue
        pid, host = int(match["pid"]), match["host"] or HOST
        if host == HOST and pid == os.getpid():
            continue  # this process's own
        if writer_may_live and (host != HOST or _pid_alive(pid)):
            continue
        found.append((match["kind"], os.path.join(folder, entry), target_path(os.path.join(folder, entry))))
    return found


def remove_leftovers(folder, writer_may_live=True, name=None):
    """Clear what dead writers left in `folder` (of the output `name` alone, unless None); return the
    targets whose parked directory was put back.

    A parked previous directory is renamed back when its target is missing (the writer died between
    the two renames of replace_directory: the most recently parked is the last complete one), else
    removed; temporaries are removed. With writer_may_live (the default) only this host's entries
    whose process has ended count as dead. A caller that owns the folder exclusively (a training run,
    which a requeued job may continue on another node) passes False: then every entry but this
    process's own is a dead writer's.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        return []
    if name is None:
        _cleared.add(folder)
    entries = _dead_writers_entries(folder, writer_may_live, name)
    restored = []
    for kind, path, target in sorted(entries, key=lambda entry: _mtime(entry[1]), reverse=True):
        if kind == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):  # another run restored or cleared it first
                os.rename(path, target)
                restored.append(target)
                continue
        with contextlib.suppress(OSError):
            _remove(path)
    return restored


def _mtime(path):
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def recover_directory(target, writer_may_live=True):
    """remove_leftovers for the directory `target` alone; True if a parked `target` was put back."""
    folder, name = _split(target)
    return os.path.join(folder, name) in remove_leftovers(folder, writer_may_live, name)
