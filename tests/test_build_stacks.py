"""build_lmdb on stacks and channel-first files written by tifffile: a record a plane keyed by the
plane, channels last, a mask stack or one 2-D mask for every plane, and splits that keep a file's
planes together."""

import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT

from fcdn.data import lmdb_builder
from fcdn.data.record_encoding import Reading
from fcdn.data.records import decode_record


def records(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(key).decode(): decode_record(value) for key, value in txn.cursor()}
    finally:
        env.close()


def build(tmp_path, reading=Reading(), train_fraction=0.5, seed=0):
    lmdb_builder.build(str(tmp_path / "images"), str(tmp_path / "masks"), str(tmp_path / "db"), "s",
                       train_fraction=train_fraction, seed=seed, workers=1, log=lambda line: None,
                       reading=reading)
    return {**records(tmp_path / "db" / "train-s.lmdb"), **records(tmp_path / "db" / "test-s.lmdb")}


def folders(tmp_path):
    for name in ("images", "masks"):
        (tmp_path / name).mkdir()
    return tmp_path / "images", tmp_path / "masks"


def values(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def test_a_z_stack_and_its_mask_stack_give_a_record_a_plane(tmp_path):
    images, masks = folders(tmp_path)
    image, mask = values((3, 32, 32)), (values((3, 32, 32), 1) % 3).astype(np.uint8)
    tifffile.imwrite(images / "cells.tif", image, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(masks / "cells.tif", mask, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(images / "flat.tif", image[0])
    tifffile.imwrite(masks / "flat.tif", mask[0])
    stored = build(tmp_path)
    assert sorted(key.split(":")[0] for key in stored) == ["cells_z0", "cells_z1", "cells_z2", "flat"]
    record = stored["cells_z2:0,1,2"]
    np.testing.assert_array_equal(record.image[:, :, 0], image[2])
    np.testing.assert_array_equal(record.mask, mask[2])


def test_a_tzcyx_ome_tiff_gives_multichannel_records_channels_last(tmp_path):
    images, masks = folders(tmp_path)
    image = values((2, 2, 3, 32, 32))  # T, Z, C
    tifffile.imwrite(images / "a.ome.tif", image, ome=True, metadata={"axes": "TZCYX"})
    tifffile.imwrite(masks / "a.ome.tif", np.ones((2, 2, 32, 32), np.uint8), ome=True, metadata={"axes": "TZYX"})
    tifffile.imwrite(images / "b.ome.tif", image[0, 0], ome=True, metadata={"axes": "CYX"})  # channel-first 2-D
    tifffile.imwrite(masks / "b.ome.tif", np.ones((32, 32), np.uint8))
    stored = build(tmp_path)
    assert sorted(stored) == ["a.ome_t0_z0:1", "a.ome_t0_z1:1", "a.ome_t1_z0:1", "a.ome_t1_z1:1", "b.ome:1"]
    np.testing.assert_array_equal(stored["a.ome_t1_z0:1"].image, np.moveaxis(image[1, 0], 0, -1))
    np.testing.assert_array_equal(stored["b.ome:1"].image, np.moveaxis(image[0, 0], 0, -1))


def test_one_2d_mask_for_every_plane_only_when_asked(tmp_path):
    images, masks = folders(tmp_path)
    tifffile.imwrite(images / "t.tif", values((3, 32, 32)), imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(masks / "t.tif", np.ones((32, 32), np.uint8))
    tifffile.imwrite(images / "u.tif", values((32, 32)))
    tifffile.imwrite(masks / "u.tif", np.ones((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"t.tif: a stack of 3 planes \(TYX 3x32x32\) but its mask .*t.tif is "
                                         r"YX 32x32: .* --same_mask_for_planes 1"):
        build(tmp_path)
    stored = build(tmp_path, Reading(same_mask=True))
    assert sorted(stored) == ["t_t0:1", "t_t1:1", "t_t2:1", "u:1"]


def test_channel_axis_and_masks_without_axes_metadata(tmp_path):
    images, masks = folders(tmp_path)
    image = values((4, 32, 32))
    tifffile.imwrite(images / "q.tif", image, photometric="minisblack")  # no axes: HWC by default
    tifffile.imwrite(masks / "q.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(images / "r.tif", image[:2], photometric="minisblack")
    tifffile.imwrite(masks / "r.tif", np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    stored = build(tmp_path, Reading(channel_axis="none"))
    assert sorted(stored) == ["q_q0:0", "q_q1:0", "q_q2:0", "q_q3:0", "r_q0:0", "r_q1:0"]
    np.testing.assert_array_equal(stored["q_q3:0"].image[:, :, 0], image[3])


def test_the_split_keeps_the_planes_of_a_file_together(tmp_path):
    images, masks = folders(tmp_path)
    for index in range(6):
        tifffile.imwrite(images / f"s{index}.tif", values((4, 32, 32), index), imagej=True, metadata={"axes": "ZYX"})
        tifffile.imwrite(masks / f"s{index}.tif", np.ones((4, 32, 32), np.uint8), imagej=True,
                         metadata={"axes": "ZYX"})
    build(tmp_path, seed=3)
    stems = {split: {key.split("_z")[0] for key in records(tmp_path / "db" / f"{split}-s.lmdb")}
             for split in ("train", "test")}
    assert len(stems["train"]) == len(stems["test"]) == 3 and not stems["train"] & stems["test"]
    assert len(records(tmp_path / "db" / "train-s.lmdb")) == 12


@pytest.mark.slow
def test_the_script_builds_stacks_with_its_flags(tmp_path):
    images, masks = folders(tmp_path)
    for index in range(2):
        tifffile.imwrite(images / f"q{index}.tif", values((3, 32, 32), index), photometric="minisblack")
        tifffile.imwrite(masks / f"q{index}.tif", np.ones((32, 32), np.uint8))
    command = [sys.executable, os.path.join(REPO_ROOT, "build_lmdb.py"), "--image_folder", str(images),
               "--mask_folder", str(masks), "--output_folder", str(tmp_path / "db"), "--dataset_name", "s",
               "--seed", "1", "--workers", "1", "--train_fraction", "0.5"]
    bad = subprocess.run(command + ["--channel_axis", "first"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(
        "--channel_axis 'first': expected auto, none or an axis index such as 0 or -1")
    done = subprocess.run(command + ["--channel_axis", "none", "--same_mask_for_planes", "1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "done: 3 train and 3 test records" in done.stdout
