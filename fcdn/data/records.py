"""The LMDB record format shared by build_lmdb.py and imagereader.py.

Each LMDB value is the reference's protobuf (proto2) message `isg_ai.ImageMaskPair`:

    int32 channels = 1; int32 img_height = 2; int32 img_width = 3;
    string img_type = 4; string mask_type = 5;
    bytes image = 6; bytes mask = 7; bytes labels = 8;

The wire format of such a flat message is small enough to read and write here, which keeps the
databases byte-compatible with the reference without its generated module (that module no longer
imports under protobuf 7) and without a protobuf dependency.

Keys are ASCII: `{stem}:{c1},{c2},...` untiled, `{stem}_i{y0}_j{x0}:{c1},...` tiled; the part
after the last ':' lists the classes present in the record (used for class balancing).
"""

import dataclasses

import numpy as np

SIZE_FACTOR = 32
FILENAMES_CSV = "img_filenames.csv"

_VARINT = 0
_LENGTH_DELIMITED = 2
# field number -> (name, wire type), in field-number order as protobuf serialises them
_FIELDS = {
    1: ("channels", _VARINT),
    2: ("img_height", _VARINT),
    3: ("img_width", _VARINT),
    4: ("img_type", _LENGTH_DELIMITED),
    5: ("mask_type", _LENGTH_DELIMITED),
    6: ("image", _LENGTH_DELIMITED),
    7: ("mask", _LENGTH_DELIMITED),
    8: ("labels", _LENGTH_DELIMITED),
}


class RecordError(ValueError):
    """A record or key that cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One decoded image/mask pair: image is HWC, mask is HW, labels the sorted unique mask values."""

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def _encode_varint(value):
    if value < 0:
        value += 1 << 64  # proto2 int32 encodes negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(buffer, position):
    result = 0
    shift = 0
    while True:
        if position >= len(buffer):
            raise RecordError("truncated varint")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 64:
            raise RecordError("varint too long")


def encode_record(image, mask, labels=None):
    """Serialise an image (HW or HWC) and its mask (HW) as an ImageMaskPair message.

    labels: the sorted unique mask values when the caller already has them (see make_record).
    """
    image = np.ascontiguousarray(image)
    mask = np.ascontiguousarray(mask)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or mask.ndim != 2 or image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not pair up")
    height, width, channels = image.shape
    values = {
        "channels": channels,
        "img_height": height,
        "img_width": width,
        "img_type": image.dtype.str.encode("ascii"),
        "mask_type": mask.dtype.str.encode("ascii"),
        "image": image.tobytes(),
        "mask": mask.tobytes(),
        "labels": np.asarray(mask_labels(mask) if labels is None else labels, dtype=mask.dtype).tobytes(),
    }
    parts = []
    for number, (name, wire_type) in _FIELDS.items():
        parts.append(_encode_varint((number << 3) | wire_type))
        if wire_type == _VARINT:
            parts.append(_encode_varint(values[name]))
        else:
            parts.append(_encode_varint(len(values[name])))
            parts.append(values[name])
    return b"".join(parts)


def _parse_fields(buffer):
    fields = {}
    position = 0
    view = memoryview(buffer)
    while position < len(buffer):
        tag, position = _decode_varint(buffer, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, position = _decode_varint(buffer, position)
            if value >= 1 << 63:
                value -= 1 << 64
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _decode_varint(buffer, position)
            if position + length > len(buffer):
                raise RecordError("truncated field")
            value = view[position:position + length]
            position += length
        elif wire_type == 5:  # fixed32: not in this message, skipped as protobuf would
            value, position = None, position + 4
        elif wire_type == 1:  # fixed64
            value, position = None, position + 8
        else:
            raise RecordError(f"unsupported wire type {wire_type}")
        if number in _FIELDS and _FIELDS[number][1] == wire_type:
            fields[_FIELDS[number][0]] = value
    return fields


def decode_record(buffer):
    """Decode an ImageMaskPair message into a Record; raises RecordError when it is malformed."""
    fields = _parse_fields(bytes(buffer))
    missing = [name for name, _ in _FIELDS.values() if name not in fields]
    if missing:
        raise RecordError(f"missing fields {', '.join(missing)}")
    height, width, channels = fields["img_height"], fields["img_width"], fields["channels"]
    if min(height, width, channels) <= 0:
        raise RecordError(f"bad shape {height}x{width}x{channels}")
    try:
        image_dtype = np.dtype(bytes(fields["img_type"]).decode("ascii"))
        mask_dtype = np.dtype(bytes(fields["mask_type"]).decode("ascii"))
        image = np.frombuffer(fields["image"], dtype=image_dtype).reshape(height, width, channels)
        mask = np.frombuffer(fields["mask"], dtype=mask_dtype).reshape(height, width)
        labels = np.frombuffer(fields["labels"], dtype=mask_dtype)
    except (TypeError, ValueError, UnicodeDecodeError) as error:
        raise RecordError(f"inconsistent record: {error}") from None
    return Record(image=image, mask=mask, labels=labels)


def make_key(stem, classes, tile_origin=None):
    """The reference's key: `stem[_i{y0}_j{x0}]:{c1},{c2},...`, as ASCII bytes."""
    name = stem if tile_origin is None else f"{stem}_i{tile_origin[0]}_j{tile_origin[1]}"
    return f"{name}:{','.join(str(int(c)) for c in classes)}".encode("ascii")


def mask_labels(mask):
    """The sorted distinct values of an integer mask (np.unique, faster for 8- and 16-bit masks)."""
    mask = np.asarray(mask)
    if mask.dtype in (np.uint8, np.uint16) and mask.size:
        # counting is linear; np.unique sorts (or hashes) every pixel
        return np.flatnonzero(np.bincount(mask.ravel())).astype(mask.dtype)
    return np.unique(mask)


def make_record(stem, image, mask, tile_origin=None):
    """(key, value) of one pair: the key lists exactly the labels stored in the record."""
    labels = mask_labels(mask)
    return make_key(stem, labels, tile_origin), encode_record(image, mask, labels)


def key_classes(key):
    """The classes a key lists after its last ':'."""
    text = key.decode("ascii") if isinstance(key, bytes) else key
    name, separator, classes = text.rpartition(":")
    if not separator:
        raise RecordError(f"key {text!r} has no ':' before its class list")
    try:
        return [int(c) for c in classes.split(",") if c != ""]
    except ValueError:
        raise RecordError(f"key {text!r} has a class list that is not integers") from None
