"""atomic_files.py: outputs appear whole or not at all, and what a killed writer left is undone."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from fcdn.common import atomic_files


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "mask.tif"
    target.write_bytes(b"old")

    with pytest.raises(OSError):
        with atomic_files.replacing_file(str(target)) as temporary:
            assert temporary.endswith(".tif") and os.path.dirname(temporary) == str(tmp_path)
            with open(temporary, "wb") as handle:
                handle.write(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["mask.tif"]


def test_a_finished_file_replaces_the_old_one(tmp_path):
    target = tmp_path / "settings.json"
    target.write_text("old")
    atomic_files.write_text(str(target), "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["settings.json"]


def test_a_directory_is_swapped_in_only_when_complete(tmp_path):
    target = tmp_path / "resume"
    target.mkdir()
    (target / "state.json").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_files.replacing_directory(str(target)) as staging:
            with open(os.path.join(staging, "state.json"), "w") as handle:
                handle.write("2")
            raise RuntimeError("killed mid-way")
    assert (target / "state.json").read_text() == "1"
    assert os.listdir(tmp_path) == ["resume"]
    with atomic_files.replacing_directory(str(target)) as staging:
        with open(os.path.join(staging, "state.json"), "w") as handle:
            handle.write("3")
        assert (target / "state.json").read_text() == "1"  # not yet
    assert (target / "state.json").read_text() == "3"
    assert os.listdir(tmp_path) == ["resume"]


def dead_pid():
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_recover_puts_back_a_directory_parked_by_a_writer_killed_between_the_renames(tmp_path):
    target = str(tmp_path / "train.lmdb")
    pid = dead_pid()
    # the state between the two renames of replace_directory: previous parked, new one staged
    parked = atomic_files.parked_path(target, pid)
    os.mkdir(parked)
    open(os.path.join(parked, "data.mdb"), "w").write("previous")
    os.mkdir(atomic_files.staging_path(target, pid))
    other = os.path.basename(atomic_files.staging_path(tmp_path / "test.lmdb", pid))
    os.mkdir(tmp_path / other)  # another output's: left to the folder's first write
    assert atomic_files.recover_directory(target) is True
    assert open(os.path.join(target, "data.mdb")).read() == "previous"
    assert sorted(os.listdir(tmp_path)) == sorted(["train.lmdb", other])
    assert atomic_files.recover_directory(target) is False  # nothing left to do


def test_recover_removes_leftovers_but_not_those_of_a_live_writer(tmp_path):
    target = str(tmp_path / "saved_model")
    os.mkdir(target)
    dead = dead_pid()
    os.mkdir(atomic_files.parked_path(target, dead))  # killed after the second rename
    os.mkdir(atomic_files.staging_path(target, dead))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_staging = atomic_files.staging_path(target, live.pid)
        os.mkdir(live_staging)
        assert atomic_files.recover_directory(target) is False
        assert sorted(os.listdir(tmp_path)) == sorted(["saved_model", os.path.basename(live_staging)])
        # a folder its caller owns alone: pid numbers may belong to other programs on another node
        atomic_files.recover_directory(target, writer_may_live=False)
        assert os.listdir(tmp_path) == ["saved_model"]
    finally:
        live.kill()
        live.wait()


def test_temporary_names_carry_the_process_a_random_part_and_the_host(tmp_path):
    first, second = (atomic_files.temporary_path(tmp_path / "mask.tif") for _ in range(2))
    assert first != second  # two writers with one process id (two containers) never share a name
    name = os.path.basename(first)
    assert re.fullmatch(rf"\.mask\.tmp-{os.getpid()}-[0-9a-f]{{8}}-{re.escape(atomic_files.HOST)}\.tif", name)
    assert "." not in atomic_files.HOST  # a host name never looks like an extension
    staging = atomic_files.staging_path(tmp_path / "train.lmdb", 12)
    assert os.path.basename(staging).startswith(".train.lmdb.tmp-12-")
    for temporary in (first, staging, atomic_files.parked_path(tmp_path / "train.lmdb"),
                      str(tmp_path / ".mask.tmp-12.tif"), str(tmp_path / ".train.lmdb.old-12")):
        assert atomic_files.target_path(temporary) in (str(tmp_path / "mask.tif"), str(tmp_path / "train.lmdb"))
    assert atomic_files.target_path(tmp_path / "mask.tif") == str(tmp_path / "mask.tif")


def touch(path):
    open(path, "w").close()
    return os.path.basename(path)


def test_a_folder_first_written_loses_only_the_temporaries_of_dead_writers_of_this_host(tmp_path):
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = [touch(atomic_files.temporary_path(tmp_path / "a.tif", dead)),
                touch(tmp_path / f".b.tmp-{dead}.csv"),  # an earlier version's name
                touch(tmp_path / f".settings.tmp-{dead}-0123abcd-{atomic_files.HOST}.json")]
        os.mkdir(atomic_files.staging_path(tmp_path / "labels", dead))
        gone.append(os.path.basename(atomic_files.staging_path(tmp_path / "labels", dead)))
        kept = [touch(atomic_files.temporary_path(tmp_path / "c.tif", live.pid)),
                touch(tmp_path / f".d.tmp-{dead}-0123abcd-another-node.tif"),  # cannot be checked here
                touch(tmp_path / f".e.tmp-{dead}-0123ABCD-{atomic_files.HOST}.tif"),  # not quite the pattern
                touch(tmp_path / f"f.tmp-{dead}.tif"), touch(tmp_path / f".g.tmp-x{dead}"),
                touch(tmp_path / "mask.tif")]
        parked = atomic_files.parked_path(tmp_path / "resume", dead)
        os.mkdir(parked)
        touch(os.path.join(parked, "state.json"))
        atomic_files.write_text(tmp_path / "out.csv", "1\n")  # the first write into the folder clears it
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out.csv", "resume"])
        assert os.listdir(tmp_path / "resume") == ["state.json"]  # put back: its writer died between renames
        assert not set(gone) & set(os.listdir(tmp_path))
    finally:
        live.kill()
        live.wait()


KILLED_WRITER = """
import sys, time
from fcdn.common import atomic_files
with atomic_files.replacing_file(sys.argv[1]) as temporary:
    open(temporary, "wb").write(b"half a mask")
    print(temporary, flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_by_sigkill_leaves_a_temporary_that_the_next_write_there_removes(tmp_path):
    target = tmp_path / "masks" / "image1.tif"
    target.parent.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    temporary = writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    assert os.listdir(target.parent) == [os.path.basename(temporary)]
    with atomic_files.replacing_file(target.parent / "image2.tif") as second:
        open(second, "wb").write(b"a whole mask")
    assert os.listdir(target.parent) == ["image2.tif"]
