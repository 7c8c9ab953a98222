import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import lmdb
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO_ROOT

from fcdn.data import image_files, records
from imagereader import ImageReader, ReaderError

pytestmark = pytest.mark.slow  # real models / worker processes / scripts

FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "nist-built-lmdb")


def write_db(path, entries):
    """An LMDB directory holding (key, value) byte pairs."""
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in entries:
            txn.put(key, value)
    env.close()
    return str(path)


def make_pair(index, size=(32, 32), classes=(0, 1), channels=1):
    rng = np.random.default_rng(index)
    image = rng.integers(0, 4000, size=(*size, channels)).astype(np.uint16)
    mask = np.zeros(size, dtype=np.uint8)
    for position, cls in enumerate(classes):
        mask[position * size[0] // len(classes):, :] = cls
    return image, mask


def record_entry(index, size=(32, 32), classes=(0, 1), key_classes=None):
    image, mask = make_pair(index, size, classes)
    key = records.make_key(f"img_{index:03d}", classes if key_classes is None else key_classes)
    return key, records.encode_record(image, mask)


@pytest.fixture
def small_db(tmp_path):
    return write_db(tmp_path / "small.lmdb", [record_entry(i) for i in range(6)])


def process_gone(pid):
    """True when pid no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pids, seconds=15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(process_gone(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if not process_gone(pid)]


def take(reader, count):
    return [reader.get_example(timeout=60) for _ in range(count)]


def test_reads_the_reference_built_fixtures_in_key_order():
    path = os.path.join(FIXTURES, "train-nist.lmdb")
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        expected = [records.decode_record(value) for _, value in txn.cursor()]
    env.close()
    reader = ImageReader(path, use_augmentation=False, shuffle=False, num_workers=1)
    assert reader.get_image_count() == 3 and reader.get_image_size() == (256, 256, 1)
    with reader:
        examples = take(reader, 6)
    for (image, mask), record in zip(examples, expected + expected):
        np.testing.assert_array_equal(image, image_files.zscore_normalize(record.image))
        np.testing.assert_array_equal(mask, record.mask)
        assert image.dtype == np.float32 and mask.dtype == np.uint8


def test_tiled_fixture_with_augmentation_and_balancing():
    path = os.path.join(FIXTURES, "tiled128", "train-nist.lmdb")
    with ImageReader(path, balance_classes=True, num_workers=2, seed=3) as reader:
        assert reader.get_image_count() == 27 and reader.get_image_size() == (128, 128, 1)
        for image, mask in take(reader, 8):
            assert image.shape == (128, 128, 1) and image.dtype == np.float32
            assert abs(float(image.mean())) < 1e-3  # z-scored after augmentation
            assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 1}


def test_crops_are_windows_of_the_whole_record_normalised_as_a_whole(tmp_path):
    path = write_db(tmp_path / "big.lmdb", [record_entry(i, size=(96, 128), classes=(0, 1, 2)) for i in range(3)])
    wholes = [(image_files.zscore_normalize(make_pair(i, (96, 128), (0, 1, 2))[0]), make_pair(i, (96, 128), (0, 1, 2))[1])
              for i in range(3)]
    reader = ImageReader(path, use_augmentation=False, shuffle=False, number_classes=3, crop_size=64, seed=0)
    assert reader.get_image_size() == (64, 64, 1)
    origins = set()
    with reader:
        for image, mask in take(reader, 30):
            assert image.shape == (64, 64, 1) and mask.shape == (64, 64)
            found = [(index, top, left) for index, (whole, whole_mask) in enumerate(wholes)
                     for top in range(96 - 64 + 1) for left in range(128 - 64 + 1)
                     if np.array_equal(whole[top:top + 64, left:left + 64], image)]
            assert len(found) == 1  # a window of one record, scaled by that record's statistics
            index, top, left = found[0]
            np.testing.assert_array_equal(mask, wholes[index][1][top:top + 64, left:left + 64])
            origins.add((top, left))
    assert len(origins) > 10  # the windows move


@pytest.mark.parametrize("crop_size, match", [(48, "multiple of 32"), (128, "larger than its 96x128")])
def test_bad_crop_sizes_are_refused(tmp_path, crop_size, match):
    path = write_db(tmp_path / "big.lmdb", [record_entry(0, size=(96, 128))])
    with pytest.raises(ValueError, match=match):
        ImageReader(path, crop_size=crop_size)


def test_same_seed_same_sequence(small_db):
    sequences = []
    for seed in (5, 5, 6):
        with ImageReader(small_db, seed=seed, queue_size_per_worker=4) as reader:
            sequences.append(take(reader, 8))
    for (image, mask), (first_image, first_mask) in zip(sequences[1], sequences[0]):
        np.testing.assert_array_equal(image, first_image)
        np.testing.assert_array_equal(mask, first_mask)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(sequences[2], sequences[0]))


def test_balance_classes_picks_a_class_first(tmp_path):
    entries = [record_entry(i, classes=(0,)) for i in range(9)] + [record_entry(9, classes=(0, 1))]
    path = write_db(tmp_path / "rare.lmdb", entries)

    def fraction_with_class_one(balance):
        with ImageReader(path, use_augmentation=False, balance_classes=balance, seed=0) as reader:
            return np.mean([1 in mask for _, mask in take(reader, 200)])

    assert fraction_with_class_one(True) > 0.4  # expected 0.5 + 0.5 / 10
    assert fraction_with_class_one(False) < 0.25  # expected 0.1


def test_ordered_workers_share_the_keys(small_db):
    expected = [image_files.zscore_normalize(make_pair(i)[0]) for i in range(6)]
    with ImageReader(small_db, use_augmentation=False, shuffle=False, num_workers=2,
                     queue_size_per_worker=3) as reader:
        served = [next(i for i, e in enumerate(expected) if np.array_equal(image, e))
                  for image, _ in take(reader, 24)]
    # worker 0 reads records 0, 2, 4, 0, ... and worker 1 records 1, 3, 5, 1, ..., interleaved
    for parity in (0, 1):
        own = [index for index in served if index % 2 == parity]
        assert own == [(parity + 2 * k) % 6 for k in range(len(own))]
    assert set(served) == set(range(6)) or len(set(served)) >= 3


@pytest.mark.parametrize("number_classes, dtype", [(300, np.uint16), (70000, np.int32)])
def test_mask_type_follows_the_mask_rule_when_classes_do_not_fit_uint8(tmp_path, number_classes, dtype):
    path = write_db(tmp_path / "many.lmdb", [record_entry(0, classes=(0, 1))])
    with ImageReader(path, number_classes=number_classes, seed=0) as reader:
        _, mask = reader.get_example(timeout=60)
    assert mask.dtype == dtype and set(np.unique(mask)) <= {0, 1}


def test_ring_shrinks_to_fit_dev_shm(small_db, capsys):
    reader = ImageReader(small_db, queue_size_per_worker=10 ** 12)  # petabytes of examples
    assert 2 <= reader.capacity < 10 ** 12 and "queue capacity" in capsys.readouterr().out
    assert ImageReader(small_db, num_workers=3).capacity == 300


def test_tf_dataset_in_a_process_that_already_ran_tensorflow(small_db):
    assert float(tf.reduce_sum(tf.ones((2, 2)))) == 4.0  # TensorFlow's threads are running
    reader = ImageReader(small_db, num_workers=2, seed=1, queue_size_per_worker=4)
    reader.startup()
    pids = reader.worker_pids
    dataset = reader.get_tf_dataset()
    assert dataset.element_spec[0].shape == (32, 32, 1) and dataset.element_spec[1].dtype == tf.uint8
    iterator = iter(dataset.batch(4, drop_remainder=True).prefetch(3))
    for _ in range(5):
        images, masks = next(iterator)
        assert images.shape == (4, 32, 32, 1) and masks.shape == (4, 32, 32)
    # the prefetch thread is still pulling: shutdown must not wait for it
    stopper = threading.Thread(target=reader.shutdown)
    stopper.start()
    stopper.join(60)
    assert not stopper.is_alive()
    with pytest.raises(StopIteration):
        for _ in range(100):
            next(iterator)
    assert multiprocessing.active_children() == []
    assert wait_until_gone(pids) == []


@pytest.mark.parametrize("db,match", [
    ("absent.lmdb", "does not exist"),
    ("empty.lmdb", "empty"),
    ("odd.lmdb", "not a multiple of 32"),
    ("classes.lmdb", "lists class 2"),
    ("plain_file", "cannot open"),
])
def test_constructor_rejects_bad_databases(tmp_path, db, match):
    write_db(tmp_path / "empty.lmdb", [])
    write_db(tmp_path / "odd.lmdb", [record_entry(0, size=(48, 32))])
    write_db(tmp_path / "classes.lmdb", [record_entry(0, classes=(0, 2))])
    (tmp_path / "plain_file").write_text("not a database")
    path = str(tmp_path / db)
    with pytest.raises(ValueError) as error:
        ImageReader(path)
    message = str(error.value)
    assert message.startswith(path) and match in message and "\n" not in message


@pytest.mark.parametrize("bad_entry,match", [
    ((b"img_002:0,1", b"\x08\x01\x10garbage"), "img_002:0,1.*corrupt"),
    (record_entry(2, size=(64, 32)), "img_002:0,1.*64x32"),
    (record_entry(2, classes=(0, 3), key_classes=(0, 1)), "img_002:0,1.*class 3"),
])
def test_worker_failure_raises_in_the_consumer(tmp_path, bad_entry, match):
    entries = [record_entry(0), record_entry(1), bad_entry]
    path = write_db(tmp_path / "bad.lmdb", entries)
    with ImageReader(path, shuffle=False, num_workers=1, queue_size_per_worker=2) as reader:
        pids = reader.worker_pids
        with pytest.raises(ReaderError, match=match):
            for _ in range(10):
                reader.get_example(timeout=60)
        with pytest.raises(ReaderError):  # stays failed
            reader.get_example()
        assert wait_until_gone(pids) == []  # the failure stopped the workers without shutdown()


def damage_pages(db_path, which):
    """Overwrite pages of data.mdb with noise: "values" the body of one record's first
    overflow page, not the first record's (the keys stay readable), "tree" every page past the meta pages."""
    path = os.path.join(db_path, "data.mdb")
    with open(path, "r+b") as handle:
        data = handle.read()
        page_size = 4096
        pages = [page for page in range(2, len(data) // page_size)
                 if which == "tree" or int.from_bytes(data[page * page_size + 10:page * page_size + 12],
                                                      "little") & 0x04]  # P_OVERFLOW
        noise = np.random.default_rng(0).integers(0, 256, page_size, dtype=np.uint8).tobytes()
        for page in pages[2:3] if which == "values" else pages:
            handle.seek(page * page_size + 16)
            handle.write(noise[16:])


@pytest.mark.parametrize("which", ["values", "tree"])
def test_damaged_database_pages_are_one_line_naming_it(tmp_path, which):
    path = write_db(tmp_path / "damaged.lmdb", [record_entry(i, size=(64, 64)) for i in range(6)])
    damage_pages(path, which)
    if which == "tree":  # found by the inspection, before any worker starts
        with pytest.raises(ValueError, match=f"^{path}: cannot read the database .*MDB_CORRUPTED"):
            ImageReader(path)
        return
    with ImageReader(path, shuffle=False, use_augmentation=False, name="train") as reader:
        with pytest.raises(ReaderError, match=f"^{path}: train reader worker 0 failed on record 'img_00[1-5]:0,1': "
                                              "ValueError: corrupt record") as error:
            for _ in range(10):
                reader.get_example(timeout=60)
    assert not error.value.died and "\n" not in str(error.value)


def test_failure_reaches_a_tf_pipeline(tmp_path):
    path = write_db(tmp_path / "bad.lmdb", [record_entry(0), record_entry(1, classes=(0, 5), key_classes=(0,))])
    with ImageReader(path, shuffle=False) as reader:
        with pytest.raises(Exception, match="img_001:0.*class 5"):
            for _ in reader.get_tf_dataset().batch(2):
                pass


def test_killed_worker_is_detected(small_db):
    with ImageReader(small_db, num_workers=2, seed=0, queue_size_per_worker=2) as reader:
        reader.get_example(timeout=60)
        os.kill(reader.worker_pids[1], signal.SIGKILL)
        # a killed process takes a moment to end (its threads go one by one); examples of the
        # live worker may arrive meanwhile
        deadline = time.monotonic() + 30
        with pytest.raises(ReaderError, match="worker 1 was killed by signal SIGKILL"):
            while time.monotonic() < deadline:
                reader.get_example(timeout=60)
        pids = reader.worker_pids
    assert multiprocessing.active_children() == []
    assert wait_until_gone(pids) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_death_is_known_without_reading(small_db, sig):
    """Nothing reads (the ring is full, as a test reader's between test passes): check() raises."""
    with ImageReader(small_db, num_workers=2, seed=0, queue_size_per_worker=2, name="train") as reader:
        while reader.queue_depth() < reader.capacity:
            time.sleep(0.05)
        pids = reader.worker_pids
        os.kill(pids[0], sig)
        deadline = time.monotonic() + 10
        while reader.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ReaderError, match=f"train reader worker 0 was killed by signal {sig.name}$") as error:
            reader.check()
        assert error.value.died
        assert wait_until_gone(pids) == []  # the failure stopped the other worker without shutdown()
    assert multiprocessing.active_children() == []


def test_a_death_ends_a_wait_on_an_empty_ring(tmp_path):
    # 256x256 examples take the worker longer than the consumer: it waits on an empty ring
    path = write_db(tmp_path / "large.lmdb", [record_entry(i, size=(256, 256)) for i in range(3)])
    with ImageReader(path, queue_size_per_worker=2, seed=0, name="test") as reader:
        take(reader, 6)
        waited = []
        consumer = threading.Thread(target=lambda: waited.append(_expect_error(reader)))
        consumer.start()
        os.kill(reader.worker_pids[0], signal.SIGKILL)
        consumer.join(20)
        assert not consumer.is_alive()
    assert "test reader worker 0 was killed by signal SIGKILL" in waited[0]


def _expect_error(reader):
    try:
        while True:
            reader.get_example()
    except ReaderError as error:
        return str(error)


SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import imagereader

    if __name__ == "__main__":
        # Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored
        # (a background job of a script), which its children would inherit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        mode = sys.argv[1]
        reader = imagereader.ImageReader({db!r}, num_workers=2, seed=0, queue_size_per_worker=2)
        reader.startup()
        reader.get_example(timeout=60)
        children = [entry for entry in os.listdir("/proc") if entry.isdigit()
                    and open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
        print(" ".join(children), flush=True)
        if mode == "crash":
            raise RuntimeError("the training script crashed")
        if mode == "parent_killed":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # Ctrl-C arrives while the consumer waits on the queue
            reader.get_example()
""")


@pytest.mark.parametrize("mode", ["interrupt", "crash", "parent_killed"])
def test_no_worker_outlives_its_program(tmp_path, small_db, mode):
    script = tmp_path / "run_reader.py"
    script.write_text(SCRIPT.format(root=REPO_ROOT, db=small_db))
    process = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    children = [int(pid) for pid in process.stdout.readline().split()]
    assert len(children) >= 2  # the workers (and the resource tracker of the shared memory)
    if mode == "interrupt":
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    if mode == "interrupt":
        assert "KeyboardInterrupt" in stderr
    assert wait_until_gone(children) == []
    if mode != "parent_killed":  # there the resource tracker has to unlink it
        assert "leaked" not in stderr  # the shared memory was unlinked


def test_starvation_lines(tmp_path, capsys):
    # 256x256 examples take the worker longer than the consumer, so a drained queue stays empty
    path = write_db(tmp_path / "large.lmdb", [record_entry(i, size=(256, 256)) for i in range(3)])
    reader = ImageReader(path, queue_size_per_worker=10, seed=0)
    with reader:
        while reader.queue_depth() < reader.capacity:  # let the queue fill
            time.sleep(0.05)
        take(reader, 30)  # drain it: the consumer now waits for every example
        assert capsys.readouterr().out.splitlines() == ["Input Queue Starvation !!!!"]
        while reader.queue_depth() < reader.capacity:
            time.sleep(0.05)
        take(reader, 1)
        assert capsys.readouterr().out.splitlines() == ["Input Queue Starvation Over"]
