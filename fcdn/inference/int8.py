"""8-bit OpenVINO models: NNCF's post-training quantization, calibrated on real tiles and gated.

    nncf = int8.import_nncf()                                        # ValueError naming the package
    tiles = int8.calibration_tiles(metadata, calibration_folder=None, count=300)
    model, record = int8.quantize(openvino, nncf, float_model, tiles)
    record["passed"], record["agreement"]                            # the gate, on held-out tiles

The tiles come from the training database recorded in the model's metadata (training.train_database),
or from a folder of images; each is z-scored as inference does. Every fifth tile is held out of the
calibration: the gate compares the int8 model's masks with float32's on those, and passes at 99.5%
of the pixels. The first and last convolutions stay float32 (the image's few channels in, the classes
out: the least to gain, the most to lose); where plain quantization fails the gate, NNCF's
accuracy-aware quantization reverts the layers that lose the most to float32 until the masks on the
calibration tiles agree, and the gate is checked again. A model that still fails is not used.
"""

import hashlib
import importlib
import logging
import os

import numpy as np

from fcdn.common import errors
from fcdn.data import image_files, reader_worker, records

GATE = 0.995  # share of held-out pixels whose class must be float32's
HELD_OUT_EVERY = 5
TILE = 256
FOLDER_FORMATS = ("tif", "tiff", "png", "jpg", "jpeg")


def import_nncf():
    """The nncf module; ValueError (one line naming the package) when it does not import."""
    try:
        return importlib.import_module("nncf")
    except Exception as error:  # an ImportError, or whatever a half-installed package raises
        raise ValueError(f"--precision int8 needs the nncf package (pip install nncf, or pip install -r "
                         f"requirements-int8.txt): {errors.gist(error)}") from None


def _crops(image, count, channels, source):
    """Up to `count` z-scored tiles of at most TILE x TILE pixels (multiples of 32) spread over an image."""
    image = image_files.zscore_normalize(image)
    if image.shape[-1] != channels:
        raise ValueError(f"{source}: {image.shape[-1]} channel(s), the model takes {channels}")
    height, width = (min(TILE, side - side % 32) for side in image.shape[:2])
    if height < 32 or width < 32:
        return []
    rows = np.linspace(0, image.shape[0] - height, max(1, int(np.sqrt(count))), dtype=int)
    columns = np.linspace(0, image.shape[1] - width, max(1, -(-count // len(rows))), dtype=int)
    corners = [(row, column) for row in rows for column in columns][:count]
    return [np.ascontiguousarray(image[row:row + height, column:column + width]) for row, column in corners]


def _database_tiles(database, count, channels):
    environment = reader_worker.open_env(database)
    try:
        with environment.begin() as transaction:
            keys = list(transaction.cursor().iternext(values=False))
            chosen = sorted({keys[index * len(keys) // count] for index in range(count)}) if keys else []
            tiles = []
            for key in chosen:
                tiles += _crops(records.decode_record(transaction.get(key)).image, 1, channels, database)
            return tiles
    finally:
        environment.close()


def _folder_tiles(folder, count, channels):
    names = sorted({name for extension in FOLDER_FORMATS for name in image_files.list_images(folder, extension)})
    if not names:
        raise ValueError(f"{folder}: no tif, png or jpg images to calibrate on")
    chosen = [names[index * len(names) // count] for index in range(min(count, len(names)))]
    per_image = -(-count // len(chosen))
    tiles = []
    for name in chosen:
        path = os.path.join(folder, name)
        try:
            tiles += _crops(image_files.read_image(path), per_image, channels, path)
        except image_files.ImageFileError as error:
            raise ValueError(f"{path}: {errors.gist(error)}") from None
    return tiles[:count]


def calibration_tiles(metadata, calibration_folder=None, count=300):
    """(tiles, source): `count` tiles and `count // 4` held-out ones, from `calibration_folder` or the
    training database the model's metadata names; ValueError (one line) when there is neither."""
    if count < 4:
        raise ValueError(f"--calibration_tiles {count} must be at least 4")
    total = count + count // (HELD_OUT_EVERY - 1)
    channels = metadata["number_channels"]
    if calibration_folder is not None:
        if not os.path.isdir(calibration_folder):
            raise ValueError(f"{calibration_folder}: calibration folder does not exist")
        source, tiles = calibration_folder, _folder_tiles(calibration_folder, total, channels)
    else:
        training = metadata.get("training") if isinstance(metadata.get("training"), dict) else {}
        source = training.get("train_database")
        if not source or not os.path.isdir(source):
            where = f"its training database {source} is not there" if source else "it records no training database"
            raise ValueError(f"--precision int8 calibrates on the model's training tiles, but {where}: give "
                             f"--calibration_folder (images like those to segment)")
        tiles = _database_tiles(source, total, channels)
    if len(tiles) < 2 * HELD_OUT_EVERY:
        raise ValueError(f"{source}: {len(tiles)} tile(s) of at least 32x32 pixels, too few to calibrate on "
                         f"(at least {2 * HELD_OUT_EVERY})")
    return tiles, os.path.abspath(source)


def tiles_digest(tiles):
    """A hash of the tiles' shapes and values: a new calibration makes a new int8 model."""
    digest = hashlib.sha256()
    for tile in tiles:
        digest.update(repr(tile.shape).encode())
        digest.update(np.ascontiguousarray(tile, dtype=np.float32).tobytes())
    return digest.hexdigest()


def split(tiles):
    """(calibration, held out): every HELD_OUT_EVERY-th tile is held out."""
    held = [tile for index, tile in enumerate(tiles) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [tile for index, tile in enumerate(tiles) if index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, held


def _masks(compiled, tiles):
    return [np.asarray(compiled(tile[np.newaxis])[0])[0].argmax(-1) for tile in tiles]


def agreement(compiled, tiles, reference):
    """The share of the tiles' pixels whose class is the reference masks'."""
    agreeing = sum(int(np.sum(mask == expected)) for mask, expected in zip(_masks(compiled, tiles), reference))
    return agreeing / max(1, sum(expected.size for expected in reference))


def _end_convolutions(model):
    names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return sorted({names[0], names[-1]}) if names else []


def quantize(openvino, nncf, model, tiles, accuracy_control=True, log=print):
    """(int8 ov.Model or None, record): the model quantized on `tiles` less the held-out ones (again
    with accuracy control where that fails the gate, unless `accuracy_control` is False), and the
    gate's figures on those (passed: agreement >= GATE; the model is None when it failed)."""
    calibration, held = split(tiles)
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every layer it leaves alone
    core = openvino.Core()
    float_compiled = core.compile_model(model, "CPU")
    reference = [_masks(float_compiled, calibration), _masks(float_compiled, held)]
    dataset = nncf.Dataset(calibration, lambda tile: tile[np.newaxis])
    ignored = nncf.IgnoredScope(names=_end_convolutions(model))
    quantized = post_training(nncf, model, calibration)
    method = "post-training quantization"
    share = agreement(core.compile_model(quantized, "CPU"), held, reference[1])
    if share < GATE and accuracy_control:
        log(f"int8: plain quantization agrees with float32 on {share:.2%} of the held-out pixels (under "
            f"{GATE:.1%}): quantizing again with accuracy control (slower)")
        quantized = _accuracy_controlled(nncf, model, dataset, calibration, reference[0], ignored)
        method = "accuracy-aware post-training quantization"
        share = agreement(core.compile_model(quantized, "CPU"), held, reference[1])
    record = {"precision": "int8", "method": method, "agreement": share, "gate": GATE, "passed": share >= GATE,
              "calibration_tiles": len(calibration), "held_out_tiles": len(held),
              "held_out_pixels": int(sum(mask.size for mask in reference[1])), "nncf_version": nncf.__version__}
    return (quantized if record["passed"] else None), record


def post_training(nncf, model, calibration):
    """nncf.quantize of the model on the calibration tiles, its first and last convolutions kept float32."""
    return nncf.quantize(model, nncf.Dataset(calibration, lambda tile: tile[np.newaxis]),
                         subset_size=len(calibration), ignored_scope=nncf.IgnoredScope(names=_end_convolutions(model)))


def _accuracy_controlled(nncf, model, dataset, calibration, reference, ignored):
    """nncf.quantize_with_accuracy_control, the metric being the masks' agreement with float32's on the
    calibration tiles (1.0 for the float32 model), allowed to drop by a little less than the gate."""
    def masks_agreement(compiled, items):
        shares = [float(np.mean(mask == expected)) for mask, (_, expected) in
                  zip(_masks(compiled, [tile for tile, _ in items]), items)]
        return float(np.mean(shares)), shares

    validation = nncf.Dataset(list(zip(calibration, reference)), lambda item: item[0][np.newaxis])
    return nncf.quantize_with_accuracy_control(
        model, dataset, validation, masks_agreement, max_drop=(1 - GATE) * 0.6,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration), ignored_scope=ignored)


def gate_line(record, source):
    """The start line of an int8 run: the gate's figures, or why float32 runs instead."""
    figures = (f"masks agree with float32's on {record['agreement']:.2%} of {record['held_out_pixels'] / 1e6:.2f} "
               f"Mpx in {record['held_out_tiles']} held-out tiles (gate {record['gate']:.1%}; calibrated on "
               f"{record['calibration_tiles']} tiles of {source}, {record['method']})")
    if record["passed"]:
        return f"int8: {figures}"
    return f"int8 refused: {figures}: float32 is used"
