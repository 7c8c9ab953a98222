"""build_lmdb.py: reference-compatible records, tiling, formats, atomic replacement, and bad input."""

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import lmdb
import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT, fill_disk, mounted_tmpfs

from fcdn.data import lmdb_builder, record_encoding, record_store
from fcdn.data.records import FILENAMES_CSV, decode_record, key_classes

SCRIPT = os.path.join(REPO_ROOT, "build_lmdb.py")
DATA = os.path.join(REPO_ROOT, "data")
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "nist-built-lmdb")
FIXTURE_FILES = ["img_000580.tif", "img_002726.tif", "img_004422.tif", "img_004828.tif", "img_007841.tif"]


def run_build(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def read_db(path):
    """{key: raw value} of a database, opened as the fixtures must be (read-only, no lock file)."""
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(key): bytes(value) for key, value in txn.cursor()}
    finally:
        env.close()


def read_names(path):
    with open(os.path.join(path, FILENAMES_CSV)) as csv_file:
        return csv_file.read().splitlines()


def link_pairs(folder, names, copies=1):
    """Symlink example pairs into folder/images and folder/masks, `copies` times under new names."""
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for copy in range(copies):
            for name in names:
                replica = name if copies == 1 else f"{os.path.splitext(name)[0]}_c{copy}.tif"
                os.symlink(os.path.join(DATA, sub, name), os.path.join(folder, sub, replica))
    return os.path.join(folder, "images"), os.path.join(folder, "masks")


def make_dataset(folder, count=5, shape=(40, 70), seed=0):
    """Tiny uint16 images with two-class uint8 masks as zlib TIFFs; returns (images, masks, {name: pair})."""
    rng = np.random.default_rng(seed)
    images, masks = os.path.join(folder, "images"), os.path.join(folder, "masks")
    os.makedirs(images)
    os.makedirs(masks)
    pairs = {}
    for index in range(count):
        name = f"pair_{index}.tif"
        image = rng.integers(0, 60000, size=shape, dtype=np.uint16)
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        tifffile.imwrite(os.path.join(images, name), image, compression="zlib")
        tifffile.imwrite(os.path.join(masks, name), mask, compression="zlib")
        pairs[name] = (image, mask)
    return images, masks, pairs


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_no_database(folder):
    leftovers = glob.glob(os.path.join(folder, "*.lmdb*")) + glob.glob(os.path.join(folder, ".*.lmdb*"))
    assert leftovers == [], leftovers


# ---------------------------------------------------------------- geometry


def test_crop_to_multiple_drops_half_the_excess_at_the_start():
    array = np.arange(70 * 100).reshape(70, 100)
    cropped = record_encoding.crop_to_multiple(array)
    assert cropped.shape == (64, 96)
    np.testing.assert_array_equal(cropped, array[3:67, 2:98])


def test_tile_origins_follow_the_reference_stride_and_stay_inside():
    # tile 128: delta 128 - 384 < 64, so int(0.8 * 128) = 102; 204 slides back to 256 - 128
    origins = record_encoding.tile_origins(256, 256, 128)
    assert origins[:3] == [(0, 0), (102, 0), (128, 0)]  # x outer, y inner, as the reference
    assert sorted(origins) == [(y, x) for y in (0, 102, 128) for x in (0, 102, 128)]
    # tile 512: delta 128; several origins slide back onto x0 = 488 and must not repeat
    origins = record_encoding.tile_origins(600, 1000, 512)
    assert len(origins) == len(set(origins))
    assert {x for _, x in origins} == {0, 128, 256, 384, 488}
    assert {y for y, _ in origins} == {0, 88}
    assert all(y + 512 <= 600 and x + 512 <= 1000 for y, x in origins)


# ---------------------------------------------------------------- the reference's own databases


@pytest.mark.slow
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled128"])
def test_records_are_byte_identical_to_the_reference_fixtures(tmp_path, tiled):
    images, masks = link_pairs(tmp_path / "src", FIXTURE_FILES)
    output = tmp_path / "out"
    args = ["--image_folder", images, "--mask_folder", masks, "--output_folder", str(output),
            "--dataset_name", "nist", "--train_fraction", "0.6", "--seed", "3"]
    args += ["--use_tiling", "1", "--tile_size", "128", "--workers", "2"] if tiled else ["--workers", "1"]
    result = run_build(*args)
    assert result.returncode == 0, result.stderr
    reference_folder = os.path.join(FIXTURES, "tiled128" if tiled else "")
    # the reference shuffled with its own RNG: compare the union of both splits, key by key
    ours, reference = {}, {}
    for split in ("train", "test"):
        ours.update(read_db(str(output / f"{split}-nist.lmdb")))
        reference.update(read_db(os.path.join(reference_folder, f"{split}-nist.lmdb")))
    assert sorted(ours) == sorted(reference)
    assert len(ours) == (45 if tiled else 5)
    for key, value in reference.items():
        assert ours[key] == value, key
        record = decode_record(ours[key])
        assert key_classes(key) == record.labels.tolist()
    assert len(read_db(str(output / "train-nist.lmdb"))) == (27 if tiled else 3)
    assert sorted(read_names(str(output / "train-nist.lmdb")) + read_names(str(output / "test-nist.lmdb"))) \
        == FIXTURE_FILES


def test_fixture_tiles_hold_the_source_pixels():
    reference = read_db(os.path.join(FIXTURES, "tiled128", "test-nist.lmdb"))
    reference.update(read_db(os.path.join(FIXTURES, "tiled128", "train-nist.lmdb")))
    for name in FIXTURE_FILES:
        image = tifffile.imread(os.path.join(DATA, "images", name))
        for y0, x0 in record_encoding.tile_origins(*image.shape, 128):
            prefix = f"{name[:-4]}_i{y0}_j{x0}:".encode()
            (key,) = [key for key in reference if key.startswith(prefix)]
            np.testing.assert_array_equal(decode_record(reference[key]).image[:, :, 0],
                                          image[y0:y0 + 128, x0:x0 + 128])


@pytest.mark.slow
def test_workers_writing_together_store_what_one_process_stores(tmp_path):
    # 1000 pairs of 256x256 uint16: the train database doubles its map five times while the writers
    # take turns; three writers on this 2-core machine interleave at random points, so some of them
    # find the map grown by another one, also while they open the database
    images, masks = link_pairs(tmp_path / "pairs", sorted(os.listdir(os.path.join(DATA, "masks"))), copies=10)
    databases = {}
    for workers in (1, 3, 3):
        output = tmp_path / "out"
        stats = lmdb_builder.build(images, masks, str(output), seed=4, workers=workers, log=lambda line: None)
        assert stats["records"] == {"train": 800, "test": 200}
        env = lmdb.open(str(output / "train-HES.lmdb"), readonly=True, lock=False)
        assert record_store.INITIAL_MAP_SIZE < env.info()["map_size"] < 4 * stats["pixel_bytes"]
        env.close()
        records = {split: read_db(str(output / f"{split}-HES.lmdb")) for split in ("train", "test")}
        assert databases.setdefault("expected", records) == records
        shutil.rmtree(output)
    assert len(databases["expected"]["train"]) == 800


# ---------------------------------------------------------------- the example data with no flags


@pytest.mark.slow
def test_no_flags_builds_the_example_databases(tmp_path):
    os.makedirs(tmp_path / "data")
    os.symlink(os.path.join(DATA, "images"), tmp_path / "data" / "images")
    os.symlink(os.path.join(DATA, "masks"), tmp_path / "data" / "masks")
    result = run_build(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "seed: " in result.stdout and "MB/s" in result.stdout
    train, test = (str(tmp_path / "data" / f"{split}-HES.lmdb") for split in ("train", "test"))
    train_records, test_records = read_db(train), read_db(test)
    assert (len(train_records), len(test_records)) == (80, 20)
    assert sorted(read_names(train) + read_names(test)) == sorted(os.listdir(os.path.join(DATA, "masks")))
    record = decode_record(next(iter(test_records.values())))
    assert record.image.shape == (256, 256, 1) and record.image.dtype == np.uint16
    assert record.mask.dtype == np.uint8
    assert sorted(os.listdir(tmp_path / "data")) == ["images", "masks", "test-HES.lmdb", "train-HES.lmdb"]
    # the map is sized from the data (the reference reserved 5 TB)
    env = lmdb.open(train, readonly=True, lock=False)
    assert env.info()["map_size"] < 3 * sum(len(value) for value in train_records.values())
    env.close()


@pytest.mark.slow
def test_seed_repeats_the_split_and_a_drawn_seed_is_printed(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src", count=8)
    first = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "a"),
                      "--workers", "1")
    assert first.returncode == 0, first.stderr
    seed = first.stdout.split("seed: ")[1].split()[0]
    again = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "b"),
                      "--workers", "1", "--seed", seed)
    assert again.returncode == 0, again.stderr
    assert "seed: " not in again.stdout
    for split in ("train", "test"):
        path_a, path_b = (str(tmp_path / out / f"{split}-HES.lmdb") for out in ("a", "b"))
        assert read_names(path_a) == read_names(path_b)
        assert read_db(path_a) == read_db(path_b)
    splits = {tuple(lmdb_builder.split_names([f"{i}.tif" for i in range(20)], 0.5, seed)[0]) for seed in range(5)}
    assert len(splits) > 1


# ---------------------------------------------------------------- formats and pixel types


def write_tiff(path, array, **options):
    tifffile.imwrite(path, array, **options)


TIFF_OPTIONS = {
    "zlib": {"compression": "zlib"},
    "lzw": {"compression": "lzw"},
    "packbits": {"compression": "packbits"},
    "tiled": {"tile": (32, 32), "compression": "zlib"},
    "bigtiff": {"bigtiff": True},
}


@pytest.mark.slow
def test_tiff_variants_and_pixel_types_decode_to_the_cropped_source(tmp_path):
    rng = np.random.default_rng(1)
    images, masks = tmp_path / "images", tmp_path / "masks"
    os.makedirs(images)
    os.makedirs(masks)
    expected = {}
    sources = {
        "zlib": rng.integers(0, 65535, (70, 100), dtype=np.uint16),
        "lzw": rng.integers(0, 255, (70, 100, 3), dtype=np.uint8),  # HWC stays HWC
        "packbits": rng.integers(-3000, 3000, (70, 100), dtype=np.int16),  # widened to int32
        "tiled": rng.random((70, 100)).astype(np.float32),
        "bigtiff": rng.random((70, 100, 2)),  # float64 -> float32
    }
    for name, image in sources.items():
        mask = rng.integers(0, 3, (70, 100)).astype(np.uint16)  # small classes: stored as uint8
        if name == "tiled":
            mask[0, 0] = 300  # needs uint16
        write_tiff(images / f"{name}.tif", image, **TIFF_OPTIONS[name])
        write_tiff(masks / f"{name}.tif", mask, **TIFF_OPTIONS[name])
        expected[name] = (record_encoding.crop_to_multiple(image), record_encoding.crop_to_multiple(mask))
    stats = lmdb_builder.build(str(images), str(masks), str(tmp_path / "out"), train_fraction=0.4, seed=0,
                             workers=2, log=lambda line: None)
    assert stats["records"] == {"train": 2, "test": 3}
    records = {}
    for split in ("train", "test"):
        records.update(read_db(str(tmp_path / "out" / f"{split}-HES.lmdb")))
    assert len(records) == 5
    for key, value in records.items():
        name = key.decode().split(":")[0]
        image, mask = expected[name]
        record = decode_record(value)
        want = image if image.ndim == 3 else image[:, :, np.newaxis]
        want_dtype = {np.dtype(np.int16): np.int32, np.dtype(np.float64): np.float32}.get(want.dtype, want.dtype)
        assert record.image.dtype == want_dtype and record.image.shape == (64, 96, want.shape[2])
        np.testing.assert_array_equal(record.image, want.astype(want_dtype))
        np.testing.assert_array_equal(record.mask, mask)
        assert record.mask.dtype == (np.uint16 if name == "tiled" else np.uint8)
        assert key_classes(key) == np.unique(mask).tolist()


@pytest.mark.slow
def test_png_pairs(tmp_path):
    rng = np.random.default_rng(2)
    images, masks = tmp_path / "images", tmp_path / "masks"
    os.makedirs(images)
    os.makedirs(masks)
    pairs = {}
    for index in range(3):
        image = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
        mask = rng.integers(0, 2, (64, 48), dtype=np.uint8)
        iio.imwrite(images / f"p{index}.png", image)
        iio.imwrite(masks / f"p{index}.png", mask)
        pairs[f"p{index}"] = (image, mask)
    result = run_build("--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                       str(tmp_path / "out"), "--image_format", ".png", "--train_fraction", "0.5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    records = read_db(str(tmp_path / "out" / "train-HES.lmdb"))
    records.update(read_db(str(tmp_path / "out" / "test-HES.lmdb")))
    for key, value in records.items():
        image, mask = pairs[key.decode().split(":")[0]]
        record = decode_record(value)
        np.testing.assert_array_equal(record.image, image[:, 8:40])
        np.testing.assert_array_equal(record.mask, mask[:, 8:40])


@pytest.mark.slow
def test_images_smaller_than_the_tile_are_reflect_padded(tmp_path):
    images, masks, pairs = make_dataset(tmp_path / "src", count=3, shape=(40, 90))
    stats = lmdb_builder.build(images, masks, str(tmp_path / "out"), train_fraction=0.5, use_tiling=True,
                             tile_size=64, seed=0, workers=1, log=lambda line: None)
    assert stats["padded"] == sorted(pairs)  # 40 rows < 64
    records = read_db(str(tmp_path / "out" / "train-HES.lmdb"))
    records.update(read_db(str(tmp_path / "out" / "test-HES.lmdb")))
    # width 90: delta int(0.8 * 64) = 51, x0 in (0, 51 -> 26); height padded to 64: one row of tiles
    assert len(records) == 6
    for key, value in records.items():
        stem = key.decode().split("_i")[0]
        x0 = int(key.decode().split("_j")[1].split(":")[0])
        assert f"{stem}_i0_j" in key.decode() and x0 in (0, 26)
        image, mask = pairs[f"{stem}.tif"]
        record = decode_record(value)
        assert record.image.shape == (64, 64, 1) and record.mask.shape == (64, 64)
        padded = np.pad(image, ((0, 24), (0, 0)), mode="reflect")[:, x0:x0 + 64]
        np.testing.assert_array_equal(record.image[:, :, 0], padded)
        np.testing.assert_array_equal(record.mask, np.pad(mask, ((0, 24), (0, 0)), mode="reflect")[:, x0:x0 + 64])
    # without tiling, a side under 32 is padded up to 32 rather than cropped to nothing
    small = tmp_path / "small"
    images, masks, _ = make_dataset(small, count=2, shape=(20, 70))
    lmdb_builder.build(images, masks, str(small / "out"), train_fraction=0.5, seed=0, workers=1,
                     log=lambda line: None)
    record = decode_record(next(iter(read_db(str(small / "out" / "train-HES.lmdb")).values())))
    assert record.image.shape == (32, 64, 1)


# ---------------------------------------------------------------- atomic replacement and interruption


@pytest.mark.slow
def test_rebuild_replaces_the_database_and_leaves_no_temporary(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src", count=6)
    output = tmp_path / "out"
    common = ["--image_folder", images, "--mask_folder", masks, "--output_folder", str(output), "--workers", "1"]
    assert run_build(*common, "--seed", "1").returncode == 0
    first = read_names(str(output / "train-HES.lmdb"))
    result = run_build(*common, "--seed", "2", "--train_fraction", "0.5")
    assert result.returncode == 0, result.stderr
    assert len(read_db(str(output / "train-HES.lmdb"))) == 3
    assert read_names(str(output / "train-HES.lmdb")) != first
    assert sorted(os.listdir(output)) == ["test-HES.lmdb", "train-HES.lmdb"]


def children(pid):
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as listing:
            found += [int(child) for child in listing.read().split()]
    return found


def descendants(pid):
    """Process ids below `pid` (forkserver workers are grandchildren), from /proc."""
    found, pending = [], children(pid)
    while pending:
        found.append(pending.pop())
        pending += children(found[-1])
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in ("data.mdb", FILENAMES_CSV)}


def staging_folder(output, pid):
    """The staging folder of train-HES.lmdb that process `pid` writes, None before it exists."""
    found = list(output.glob(f".train-HES.lmdb.tmp-{pid}-*")) if output.is_dir() else []
    return found[0] if found else None


def start_slow_build(folder, output):
    """A build of thousands of small tiles, slow enough to be caught in the middle, in its own group."""
    images, masks = link_pairs(folder, sorted(os.listdir(os.path.join(DATA, "masks"))), copies=3)
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--image_folder", images, "--mask_folder", masks, "--output_folder", str(output),
         "--use_tiling", "1", "--tile_size", "32", "--seed", "0", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    # allocated blocks, not the length, so that a file extended ahead of its data never counts
    while not ((temporary := staging_folder(output, process.pid)) and (temporary / "data.mdb").exists()
               and (temporary / "data.mdb").stat().st_blocks * 512 > 1 << 20):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            pytest.fail(f"the build ended or stalled before its first commit: {process.communicate()}")
        time.sleep(0.05)
    return process, temporary


def stop_group(process):
    """Never leave a build (or its forkserver and workers) behind when a test fails."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_interrupted_build_leaves_the_earlier_database_intact(tmp_path, signum):
    small_images, small_masks = link_pairs(tmp_path / "small", FIXTURE_FILES)
    output = tmp_path / "out"
    earlier = run_build("--image_folder", small_images, "--mask_folder", small_masks, "--output_folder",
                        str(output), "--seed", "0", "--workers", "1")
    assert earlier.returncode == 0, earlier.stderr
    before = {split: digest(str(output / f"{split}-HES.lmdb")) for split in ("train", "test")}
    process, temporary = start_slow_build(tmp_path / "big", output)
    workers = descendants(process.pid)
    assert workers  # the pool is running
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # Ctrl-C in a terminal reaches the whole process group
    else:
        process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    assert process.returncode != 0
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "worker processes outlived the build"
    after = {split: digest(str(output / f"{split}-HES.lmdb")) for split in ("train", "test")}
    assert after == before
    if signum != signal.SIGKILL:
        assert "interrupted" in stderr
        assert sorted(os.listdir(output)) == ["test-HES.lmdb", "train-HES.lmdb"]
    else:  # nothing can clean up after SIGKILL; the next build removes what it left
        assert temporary.exists()
        assert run_build("--image_folder", small_images, "--mask_folder", small_masks, "--output_folder",
                         str(output), "--seed", "0", "--workers", "1").returncode == 0
        assert sorted(os.listdir(output)) == ["test-HES.lmdb", "train-HES.lmdb"]


# ---------------------------------------------------------------- bad input


@pytest.mark.slow
def test_missing_image_folder(tmp_path):
    _, masks, _ = make_dataset(tmp_path / "src")
    missing = str(tmp_path / "nowhere")
    result = run_build("--image_folder", missing, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"))
    assert_one_error_line(result, missing, "does not exist")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("empty", ["images", "masks"])
def test_empty_folder(tmp_path, empty):
    images, masks, _ = make_dataset(tmp_path / "src")
    folder = images if empty == "images" else masks
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"))
    assert_one_error_line(result, folder, "no .tif files")


@pytest.mark.slow
def test_mask_without_image_is_an_error(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src")
    os.remove(os.path.join(images, "pair_3.tif"))
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"))
    assert_one_error_line(result, os.path.join(images, "pair_3.tif"), "no image")
    assert_no_database(tmp_path / "out")


@pytest.mark.slow
def test_image_without_mask_is_skipped_with_a_warning(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src", count=6)
    os.remove(os.path.join(masks, "pair_2.tif"))
    os.remove(os.path.join(masks, "pair_4.tif"))
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"),
                       "--workers", "1", "--train_fraction", "0.5")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("warning: 2 images") and "pair_2.tif" in line and "pair_4.tif" in line
    names = read_names(str(tmp_path / "out" / "train-HES.lmdb")) + read_names(str(tmp_path / "out" / "test-HES.lmdb"))
    assert sorted(names) == ["pair_0.tif", "pair_1.tif", "pair_3.tif", "pair_5.tif"]


def corrupt_size(images, masks):
    tifffile.imwrite(os.path.join(masks, "pair_1.tif"), np.zeros((40, 64), np.uint8))
    return os.path.join(images, "pair_1.tif"), "40x70"


def corrupt_float_mask(images, masks):
    tifffile.imwrite(os.path.join(masks, "pair_2.tif"), np.zeros((40, 70), np.float32))
    return os.path.join(masks, "pair_2.tif"), "not an integer type"


def corrupt_negative_mask(images, masks):
    mask = np.zeros((40, 70), np.int16)
    mask[5, 5] = -1
    tifffile.imwrite(os.path.join(masks, "pair_0.tif"), mask)
    return os.path.join(masks, "pair_0.tif"), "negative"


def corrupt_multichannel_mask(images, masks):
    tifffile.imwrite(os.path.join(masks, "pair_0.tif"), np.zeros((40, 70, 3), np.uint8))
    return os.path.join(masks, "pair_0.tif"), "single-channel"


def corrupt_pixel_type(images, masks):
    tifffile.imwrite(os.path.join(images, "pair_4.tif"), np.full((40, 70), 1 << 40, np.int64))
    return os.path.join(images, "pair_4.tif"), "cannot be converted safely"


def corrupt_undecodable(images, masks):
    with open(os.path.join(images, "pair_3.tif"), "wb") as broken:
        broken.write(b"this is not a TIFF file at all")
    return os.path.join(images, "pair_3.tif"), "cannot decode"


BAD_FILES = [corrupt_size, corrupt_float_mask, corrupt_negative_mask, corrupt_multichannel_mask,
             corrupt_pixel_type, corrupt_undecodable]


# the checks run inside the workers: with two, the error must still come back as one line, pool gone
@pytest.mark.slow
@pytest.mark.parametrize("corrupt, workers", [(corrupt, "1") for corrupt in BAD_FILES]
                         + [(corrupt_undecodable, "2"), (corrupt_negative_mask, "2")],
                         ids=lambda value: value if isinstance(value, str) else value.__name__[8:])
def test_bad_file_names_the_file(tmp_path, corrupt, workers):
    images, masks, _ = make_dataset(tmp_path / "src")
    path, problem = corrupt(images, masks)
    output = tmp_path / "out"
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(output),
                       "--workers", workers, "--seed", "0")
    assert_one_error_line(result, path, problem)
    assert_no_database(output)


def test_a_file_name_with_a_line_break_is_refused(tmp_path):
    images, masks, pairs = make_dataset(tmp_path / "src")
    for folder in (images, masks):
        os.rename(os.path.join(folder, "pair_1.tif"), os.path.join(folder, "pair\n1.tif"))
    output = tmp_path / "out"
    common = ["--image_folder", images, "--mask_folder", masks, "--output_folder", str(output), "--workers", "1",
              "--seed", "0"]
    result = run_build(*common)
    assert_one_error_line(result)
    assert result.stderr.strip() == (f"error: {os.path.join(masks, 'pair')}\\n1.tif: file name holds a line break "
                                     f"({FILENAMES_CSV} lists one name a line)")
    assert_no_database(output)
    # an image without a mask is only named in the warning: escaped, on one line
    os.remove(os.path.join(masks, "pair\n1.tif"))
    result = run_build(*common)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"warning: 1 images in {images} have no mask and are skipped: pair\\n1.tif"
    assert len(read_names(output / "train-HES.lmdb")) + len(read_names(output / "test-HES.lmdb")) == 4


def test_an_image_with_nan_or_inf_pixels_is_refused(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src")
    image = np.ones((40, 70, 2), np.float32)
    image[3, 4] = [np.nan, np.nan]
    image[5, 6, 1] = np.inf
    image[7, 8, 0] = -np.inf
    tifffile.imwrite(os.path.join(images, "pair_3.tif"), image, photometric="minisblack", planarconfig="contig")
    output = tmp_path / "out"
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(output),
                       "--workers", "1", "--seed", "0")
    assert_one_error_line(result)
    assert result.stderr.strip() == f"error: {os.path.join(images, 'pair_3.tif')}: 3 pixel(s) hold NaN or Inf values"
    assert_no_database(output)


@pytest.mark.slow
@pytest.mark.parametrize("fraction, problem", [("0", "strictly between"), ("1", "strictly between"),
                                               ("1.5", "strictly between"), ("0.1", "train database empty")])
def test_bad_train_fraction(tmp_path, fraction, problem):
    images, masks, _ = make_dataset(tmp_path / "src")
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"),
                       "--train_fraction", fraction)
    assert_one_error_line(result, "--train_fraction", problem)
    assert_no_database(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("tile_size", ["100", "0", "-64"])
def test_bad_tile_size(tmp_path, tile_size):
    images, masks, _ = make_dataset(tmp_path / "src")
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", str(tmp_path / "out"),
                       "--use_tiling", "1", "--tile_size", tile_size)
    assert_one_error_line(result, f"--tile_size {tile_size}", "positive multiple of 32")


@pytest.mark.slow
def test_output_folder_that_cannot_be_written(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src")
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder should be")
    output = str(blocker / "out")
    result = run_build("--image_folder", images, "--mask_folder", masks, "--output_folder", output)
    assert_one_error_line(result, output, "cannot write")


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_not_waited_for(tmp_path):
    output = tmp_path / "out"
    process, _ = start_slow_build(tmp_path / "big", output)
    # the workers are the grandchildren, under the forkserver
    workers = [pid for child in children(process.pid) for pid in children(child)]
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert_one_error_line(result, f"worker process {workers[0]} died (killed by signal SIGKILL)")
    assert_no_database(output)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_databases_and_the_same_command_works_once_freed(tmp_path):
    images, masks, _ = make_dataset(tmp_path / "src", count=6, shape=(256, 256))
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        output = disk / "out"
        command = ["--image_folder", images, "--mask_folder", masks, "--output_folder", str(output),
                   "--seed", "1", "--workers", "2"]
        assert run_build(*command).returncode == 0
        before = {name: read_db(str(output / name)) for name in ("train-HES.lmdb", "test-HES.lmdb")}
        filler = fill_disk(disk, leave=100_000)  # less room than one database needs
        full = run_build(*command[:-4], "--seed", "2", "--workers", "2")
        assert_one_error_line(full, f"{output}/", "-HES.lmdb: writing the database failed", "the disk is full",
                              "earlier databases are left as they were")
        assert sorted(os.listdir(output)) == sorted(before)  # nothing half-written beside them
        assert {name: read_db(str(output / name)) for name in before} == before

        os.remove(filler)
        assert run_build(*command[:-4], "--seed", "2", "--workers", "2").returncode == 0
        assert {name: read_db(str(output / name)) for name in before} != before
