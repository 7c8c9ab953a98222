"""--split_image 1: one OME-Zarr image segmented by several parts (ome_zarr_parts.py, split_image.py).

The model tests use a 640x256 image: the tiny model's radius (96) needs tiles of at least 288 rows,
and 640 rows give 4 rows of tiles, so that parts run different tiles and batches (of 3 tiles) that
straddle the parts' rows; its 32-row chunks give 20 chunk rows, 6 or 7 per part.
"""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import REPO_ROOT
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image

from fcdn.data import image_sources, ome_zarr_io, ome_zarr_parts
from fcdn.inference import segmentation, split_image, tiling
from fcdn.inference.segmenter import Segmenter

FORMATS = {"0.4": FormatV04(), "0.5": FormatV05()}
SPLIT = dict(tile_size=288, batch_size=3, engine="tensorflow")  # also the killed part's flags below


def write_zarr(path, data, version, chunks, scale_factors=(2, 4)):
    fmt = FORMATS[version]
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(data, group, axes="yx", fmt=fmt, scale_factors=scale_factors, storage_options={"chunks": chunks})
    return str(path)


def tree(folder):
    """Every file under `folder`: relative path -> bytes."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


# ---------------------------------------------------------------------------------------------
# the pieces, without a model

def test_parts_take_every_chunk_row_once_in_blocks():
    for chunk_rows in (1, 5, 20):
        for num_parts in (1, 3, 7):
            parts = [split_image.part_chunk_rows(chunk_rows, num_parts, k) for k in range(num_parts)]
            assert [row for part in parts for row in part] == list(range(chunk_rows))
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_batches_holding_rows_of_tiles_are_those_of_the_whole_grid():
    grid = tiling.tile_grid(2000, 1500, 512, 96)  # several rows and columns of tiles
    per_row = len(grid.rows[0])
    assert len(grid.rows) > 3 and per_row > 1
    for batch_size in (1, 2, 5):
        for rows in (range(0, 1), range(1, 3), range(len(grid.rows) - 1, len(grid.rows))):
            firsts = list(segmentation.batches_holding(grid, batch_size, rows))
            assert all(first % batch_size == 0 for first in firsts)
            held = {tile for first in firsts for tile in range(first, first + batch_size)}
            needed = set(range(rows.start * per_row, rows.stop * per_row))
            assert needed <= held and len(held) - len(needed) < 2 * batch_size


@pytest.fixture
def float_zarr(tmp_path):
    data = np.random.default_rng(3).normal(100.0, 30.0, (64, 48)).astype(np.float32)
    return ome_zarr_io.ZarrSource.open(write_zarr(tmp_path / "image.zarr", data, "0.5", (8, 16), ()))


def test_shared_statistics_equal_one_pass_to_the_bit_and_are_read_once(float_zarr, monkeypatch):
    # one chunk row (8 rows of 48) per block: 8 blocks
    monkeypatch.setattr(image_sources, "STATISTICS_BLOCK_PIXELS", 8 * 48)
    source = float_zarr
    expected = source.statistics()
    target = ome_zarr_io.label_target(source)
    parts = [(0, 24), (24, 48), (48, 64)]
    alone = ome_zarr_parts.SharedLabel.join(source, np.uint8, target, {"model": "a"})
    (mean, std), read = alone.statistics(source, parts, 1)
    assert mean.tobytes() == expected[0].tobytes() and std.tobytes() == expected[1].tobytes()
    # alone, a part reads its own blocks first, then the others' from their last blocks up
    assert read[:3] == [(24, 32), (32, 40), (40, 48)] and read[3:5] == [(16, 24), (56, 64)] and len(read) == 8
    assert read[5:] == [(8, 16), (48, 56), (0, 8)]
    joined = ome_zarr_parts.SharedLabel.join(source, np.uint8, target, {"model": "a"})
    (mean, std), read = joined.statistics(source, parts, 0)
    assert read == [] and mean.tobytes() == expected[0].tobytes() and std.tobytes() == expected[1].tobytes()


def test_a_work_folder_is_joined_with_the_same_settings_and_replaced_for_others(float_zarr):
    source = float_zarr
    target = ome_zarr_io.label_target(source)
    work = ome_zarr_parts.SharedLabel.join(source, np.uint8, target, {"model": "a", "tile_size": 288})
    assert work.chunk_rows == 8 and work.pixel_rows(7) == (56, 64)
    work.write_chunk_row(2, np.full((8, 48), 5, np.uint8))
    same = ome_zarr_parts.SharedLabel.join(source, np.uint8, target, {"model": "a", "tile_size": 288})
    assert same.done_rows() == [2] and same.level0[16:24].min() == 5 and not same.complete()
    with pytest.raises(ValueError, match="chunk row 3 takes 8 rows of 48"):
        same.write_chunk_row(3, np.zeros((7, 48), np.uint8))
    other = ome_zarr_parts.SharedLabel.join(source, np.uint8, target, {"model": "a", "tile_size": 320})
    assert other.done_rows() == [] and other.level0[16:24].max() == 0
    assert sorted(os.listdir(os.path.dirname(target))) == [".fcdensenet.parts"]


def test_split_image_refuses_files_and_whole_image_outputs_before_loading_the_model(tmp_path, float_zarr):
    segmenter = Segmenter(tmp_path / "no_model")  # never loaded: the refusals come first
    tiff = tmp_path / "a.tif"
    tiff.write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.tif: --split_image 1 splits OME-Zarr images"):
        segmenter.segment_files([tiff], tmp_path / "out", split_image=True)
    for keywords, flag in (({"overlay_folder": tmp_path / "qc"}, "--overlay_folder"),
                           ({"measure_objects": True}, "--measure_objects 1"),
                           ({"save_probabilities": True}, "--save_probabilities 1")):
        with pytest.raises(ValueError, match=f"{flag} needs the whole image in one process"):
            segmenter.segment_files([float_zarr.path], tmp_path / "out", split_image=True, **keywords)


def test_the_sbatch_script_is_the_documented_one_and_its_flags_are_accepted():
    import inference_fcdensenet

    with open(os.path.join(REPO_ROOT, "examples", "slurm", "segment_giant_zarr.sbatch")) as handle:
        script = handle.read()
    for document in ("README.md", os.path.join("docs", "ome-zarr.md")):
        with open(os.path.join(REPO_ROOT, document)) as handle:
            assert script in handle.read(), f"{document} shows another script than examples/slurm"
    command = re.search(r"python inference_fcdensenet\.py (.*)", script.replace("\\\n", " ")).group(1).split()
    args = inference_fcdensenet.parse_args(command)
    assert args.split_image == 1 and args.skip_existing == 1 and args.image_format == "zarr"


# ---------------------------------------------------------------------------------------------
# parts with a model, one killed and rerun

@pytest.fixture(scope="module")
def giant():
    """The pixels of the 640x256 uint16 image (written with 3 levels and 32x64 chunks)."""
    return (np.random.default_rng(5).random((640, 256)) * 3000).astype(np.uint16)


@pytest.fixture(scope="module")
def segmenter(gray_model):
    """One Segmenter for the module's runs (the model loaded once); its log lines go to .lines."""
    lines = []
    segmenter = Segmenter(gray_model[0], **SPLIT, log=lines.append)
    segmenter.lines = lines
    return segmenter


def one_process_labels(tmp_path, segmenter, data, version, output_folder=None):
    image = write_zarr(tmp_path / "one" / "image.zarr", data, version, (32, 64))
    result, = segmenter.segment_files([image], None if output_folder is None else tmp_path / "one" / output_folder)
    assert result.error is None
    return tree(os.path.join(os.path.dirname(image), output_folder or "image.zarr/labels"))


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import inference_fcdensenet
from fcdn.data import ome_zarr_parts
write = ome_zarr_parts.SharedLabel.write_chunk_row
def write_then_die(self, row, block):  # a SIGKILL right after the part's first chunk row is marked
    write(self, row, block)
    os.kill(os.getpid(), signal.SIGKILL)
ome_zarr_parts.SharedLabel.write_chunk_row = write_then_die
inference_fcdensenet.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_three_parts_one_killed_and_rerun_write_the_label_of_one_process(tmp_path, gray_model, segmenter, giant):
    expected = one_process_labels(tmp_path, segmenter, giant, "0.5")
    image = write_zarr(tmp_path / "parts" / "image.zarr", giant, "0.5", (32, 64))
    lines = segmenter.lines
    for part in (0, 2):
        segmenter.segment_files([image], split_image=True, num_parts=3, part_id=part)
    assert lines[-2].endswith("13 of 20 chunk rows done; the part that completes them writes the label")
    killed = subprocess.run(
        [sys.executable, "-c", KILLER.format(root=REPO_ROOT), "--saved_model_filepath", gray_model[0],
         "--image_folder", os.path.dirname(image), "--image_format", "zarr", "--split_image", "1", "--num_parts", "3",
         "--part_id", "1", "--tile_size", "288", "--batch_size", "3", "--engine", "tensorflow"],
        capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    labels = os.path.join(image, "labels")
    work = ome_zarr_parts.work_folder(os.path.join(labels, "fcdensenet"))
    assert sorted(map(int, os.listdir(os.path.join(work, "done")))) == list(range(0, 7)) + list(range(13, 20))
    assert not os.path.exists(os.path.join(labels, "fcdensenet"))  # nothing listed or in place
    segmenter.segment_files([image], split_image=True, num_parts=3, part_id=1, skip_existing=True)
    assert f"{image}: 1 of this part's 7 chunk row(s) already done" in lines
    assert lines[-2].endswith(f"label image {labels}/fcdensenet written")
    assert tree(labels) == expected  # to the byte, metadata and every level
    assert sorted(os.listdir(labels)) == ["fcdensenet", "zarr.json"]  # the work folder is gone


@pytest.mark.slow
def test_parts_in_any_order_write_an_output_folder_label_of_ngff_04(tmp_path, segmenter, giant):
    expected = one_process_labels(tmp_path, segmenter, giant, "0.4", output_folder="out")
    image = write_zarr(tmp_path / "parts" / "image.zarr", giant, "0.4", (32, 64))
    output = tmp_path / "parts" / "out"
    for part in (2, 1, 0):
        result, = segmenter.segment_files([image], output, split_image=True, num_parts=3, part_id=part)
        assert result.error is None and result.height == {0: 192, 1: 224, 2: 224}[part]  # rows computed
    assert tree(output) == expected
