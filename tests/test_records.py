import os

import lmdb
import numpy as np
import pytest

from fcdn.data import records

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nist-built-lmdb")


@pytest.mark.parametrize("image_dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_round_trip_keeps_pixels_types_and_labels(image_dtype):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(32, 64, 3)).astype(image_dtype)
    mask = rng.integers(0, 3, size=(32, 64)).astype(np.uint8)
    record = records.decode_record(records.encode_record(image, mask))
    assert record.image.dtype == image_dtype and np.array_equal(record.image, image)
    assert record.mask.dtype == np.uint8 and np.array_equal(record.mask, mask)
    assert record.labels.tolist() == [0, 1, 2]


def test_a_2d_image_is_stored_with_one_channel():
    record = records.decode_record(records.encode_record(np.zeros((32, 32), np.uint16),
                                                         np.ones((32, 32), np.int32)))
    assert record.image.shape == (32, 32, 1) and record.mask.dtype == np.int32


def test_reencoding_a_reference_record_gives_the_same_bytes():
    env = lmdb.open(os.path.join(FIXTURES, "train-nist.lmdb"), readonly=True, lock=False)
    with env.begin() as transaction:
        key, value = next(iter(transaction.cursor()))
    env.close()
    record = records.decode_record(value)
    assert records.encode_record(record.image, record.mask) == bytes(value)
    assert records.key_classes(key) == record.labels.tolist()


def test_negative_int32_varints_round_trip():
    encoded = records._encode_varint(-5)
    assert len(encoded) == 10
    value, position = records._decode_varint(encoded, 0)
    assert position == 10 and value - (1 << 64) == -5


@pytest.mark.parametrize("cut", [3, 20, -7])
def test_truncated_records_raise_record_error(cut):
    value = records.encode_record(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8))
    with pytest.raises(records.RecordError):
        records.decode_record(value[:cut])


def test_keys_match_the_reference_layout():
    assert records.make_key("img_1", [0, 2]) == b"img_1:0,2"
    assert records.make_key("img_1", [1], tile_origin=(102, 0)) == b"img_1_i102_j0:1"
    assert records.key_classes(b"a:b:0,3") == [0, 3]
    with pytest.raises(records.RecordError):
        records.key_classes(b"no-classes")


def test_make_record_keys_list_the_stored_labels():
    mask = np.array([[3, 0], [3, 3]] * 16, dtype=np.uint8).reshape(32, 2).repeat(16, axis=1)
    key, value = records.make_record("tile", np.zeros((32, 32), np.float32), mask, tile_origin=(0, 64))
    assert key == b"tile_i0_j64:0,3"
    assert records.decode_record(value).labels.tolist() == [0, 3]
    assert value == records.encode_record(np.zeros((32, 32), np.float32), mask)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_mask_labels_are_the_sorted_distinct_values_in_the_mask_type(dtype):
    rng = np.random.default_rng(5)
    mask = rng.choice(np.array([0, 3, 200, 17], dtype=dtype), size=(40, 30))
    mask[0, 0] = 255 if dtype == np.uint8 else 65535
    labels = records.mask_labels(mask)
    assert labels.dtype == dtype
    assert labels.tolist() == sorted({0, 3, 200, 17, int(mask[0, 0])})
    assert records.mask_labels(np.zeros((0, 5), dtype)).tolist() == []
