"""atomic_files.py: outputs appear whole or not at all, and what a killed writer left is undone."""

import os
import subprocess
import sys

import pytest

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
    assert atomic_files.recover_directory(target) is True
    assert open(os.path.join(target, "data.mdb")).read() == "previous"
    assert os.listdir(tmp_path) == ["train.lmdb"]
    assert atomic_files.recover_directory(target) is False  # nothing left to do


def test_recover_removes_leftovers_but_not_those_of_a_live_writer(tmp_path):
    target = str(tmp_path / "saved_model")
    os.mkdir(target)
    dead = dead_pid()
    os.mkdir(atomic_files.parked_path(target, dead))  # killed after the second rename
    os.mkdir(atomic_files.staging_path(target, dead))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.mkdir(atomic_files.staging_path(target, live.pid))
        assert atomic_files.recover_directory(target) is False
        assert sorted(os.listdir(tmp_path)) == sorted(["saved_model", f".saved_model.tmp-{live.pid}"])
        # a folder its caller owns alone: pid numbers may belong to other programs on another node
        atomic_files.recover_directory(target, writer_may_live=False)
        assert os.listdir(tmp_path) == ["saved_model"]
    finally:
        live.kill()
        live.wait()
