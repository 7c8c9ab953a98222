"""Which runtime executes an exported model at inference: OpenVINO on CPUs, TensorFlow elsewhere.

    predict, metadata, engine = load_predictor("runs/x/saved_model")              # "auto"
    predict, metadata, engine = load_predictor("runs/x/saved_model", "tensorflow")
    predict, metadata, engine = load_predictor("runs/x/saved_model", precision="int8")   # OpenVINO, 8-bit
    softmax = predict(batch)   # as saved_model.load_saved_model's predict: float32 NHWC in, softmax out
    predict, metadata, device_names, engine = load_model("runs/x/saved_model")   # every visible device

"auto" picks OpenVINO when TensorFlow sees no GPU and the openvino package imports, else TensorFlow;
where the installed packages rule a GPU out (devices.no_gpu_without_loading_tensorflow), TensorFlow
is not loaded to ask, nor at all when the OpenVINO conversion is cached.
OpenVINO reads the SavedModel itself (openvino.convert_model); the converted model is kept in this
user's cache, outside the model folder, keyed by a hash of the SavedModel's files and the OpenVINO
version (fcdn/inference/openvino_cache.py), so a re-exported model or another OpenVINO is converted
again and a conversion found in a model folder is never run. precision "int8" runs the model
quantized by NNCF (fcdn/inference/int8.py), cached the same way and keyed by its calibration too.
The model is compiled once for dynamic batch, height and width, in float32 (int8 where quantized).
load_model spreads a TensorFlow model over every visible device (or the devices named) instead, when
there are several.
"""

import hashlib
import importlib
import json
import os
import shutil

import numpy as np

from fcdn.common import atomic_files, devices, errors
from fcdn.inference import int8, openvino_cache
from fcdn.model.input_size import check_input_size
from fcdn.model.metadata import METADATA_FILENAME, read_metadata

ENGINES = ("auto", "openvino", "tensorflow")
PRECISIONS = ("float32", "int8")


def check_engine(engine, precision="float32"):
    """ValueError unless `engine` is one of ENGINES and `precision` one of PRECISIONS that it runs."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and engine == "tensorflow":
        raise ValueError("--precision int8 runs on OpenVINO: use --engine openvino or auto, not tensorflow")


def load_model(path, engine="auto", device_names=None, **precision):
    """(predict, metadata, device names, engine name): OpenVINO on the CPU (see load_predictor), or a
    TensorFlow copy of the model on every device of `device_names` (TensorFlow device names; None:
    every visible device). `precision` holds load_predictor's keywords of that name. ValueError (one
    line) for a missing or bad model or engine."""
    path = os.fspath(path)
    check_engine(engine, precision.get("precision", "float32"))
    if not os.path.isdir(path):
        raise ValueError(f"{path}: SavedModel folder does not exist")
    if precision.get("precision", "float32") != "float32":
        engine = "openvino"  # int8 models run on OpenVINO only
    if device_names is not None and engine == "openvino":
        raise ValueError("OpenVINO runs on the CPU: name TensorFlow devices with the tensorflow engine")
    # one CPU and no GPU possible: TensorFlow is not loaded to count devices (nor at all on OpenVINO)
    one_cpu = engine != "tensorflow" and device_names is None and devices.no_gpu_without_loading_tensorflow()
    names = None if one_cpu else list(device_names) if device_names is not None else devices.inference_devices()
    if one_cpu or engine == "openvino" or (engine == "auto" and device_names is None and len(names) == 1):
        predict, metadata, chosen = load_predictor(path, engine, **precision)
        return predict, metadata, (["CPU"] if chosen == "openvino" else names or devices.inference_devices()), chosen
    from fcdn.model import saved_model

    openvino_cache.model_files(path)  # links out and devices refused for every engine
    # named devices get their copy placed there; the one visible device needs no placement
    placed = device_names is not None or len(names) > 1
    loaded = [saved_model.load_saved_model(path, device if placed else None) for device in names]
    predict = devices.DevicePool([function for function, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
    return predict, loaded[0][1], names, "tensorflow"


def load_predictor(saved_model_path, engine="auto", precision="float32", calibration_folder=None,
                   calibration_tiles=300, accuracy_control=True, log=print):
    """Return (predict, metadata, engine_name) for an export, engine_name "openvino" or "tensorflow".

    predict has saved_model.load_saved_model's contract; an OpenVINO one says the precision it runs
    (`predict.precision`). precision "int8" (OpenVINO only): the model quantized on
    `calibration_tiles` tiles of `calibration_folder` (None: the training database the model
    records), quantized again with accuracy control (unless `accuracy_control` is False) where plain
    quantization fails, used when its masks agree with float32's (the gate); `log` gets its figures or why
    float32 runs instead. Raises ValueError (one line, naming the path or the package) for a bad
    model, an unknown engine or precision, a missing package, a link out of the model folder, or a
    model that OpenVINO cannot convert.
    """
    path = os.fspath(saved_model_path)
    check_engine(engine, precision)
    metadata = read_metadata(path)
    openvino_cache.model_files(path)  # links out and devices refused for every engine
    openvino = _openvino_for(precision, engine)
    if engine == "auto":
        engine = "openvino" if openvino is not None and not _tensorflow_sees_a_gpu() else "tensorflow"
    if engine == "tensorflow":
        from fcdn.model import saved_model  # here, not at the top: OpenVINO runs without TensorFlow

        predict, metadata = saved_model.load_saved_model(path)
        return predict, metadata, "tensorflow"
    model, record, line = openvino_model(openvino, path, metadata, precision, calibration_folder,
                                         calibration_tiles, accuracy_control, log)
    if line is not None:
        log(line)
    predictor = OpenVinoPredictor(openvino, model, metadata["number_channels"], record["precision"])
    return predictor, metadata, "openvino"


def _openvino_for(precision, engine):
    """The openvino module (None where "auto" may fall back on TensorFlow); ValueError naming the
    package where OpenVINO is required (engine "openvino", precision "int8") and missing."""
    if engine == "tensorflow":
        return None
    openvino, import_error = _import_openvino()
    if openvino is None and precision == "int8":
        raise ValueError(f"--precision int8 needs the openvino package (pip install openvino): {import_error}")
    if openvino is None and engine == "openvino":
        raise ValueError(f"--engine openvino needs the openvino package (pip install openvino): {import_error}")
    if precision == "int8":
        int8.import_nncf()  # refused before any conversion
    return openvino


def _import_openvino():
    """(module, None) or (None, the reason in one line): a broken install counts as missing."""
    try:
        return importlib.import_module("openvino"), None
    except Exception as error:  # an ImportError, or whatever a half-installed package raises
        return None, errors.gist(error)


def _tensorflow_sees_a_gpu():
    if devices.no_gpu_without_loading_tensorflow():
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def openvino_model(openvino, path, metadata, precision="float32", calibration_folder=None,
                   calibration_tiles=300, accuracy_control=True, log=print):
    """(ov.Model, record, start line or None) of the SavedModel at `precision`: from this user's cache
    (fcdn/inference/openvino_cache.py) when there, else converted (and quantized) and cached. An int8
    model that fails its gate gives the float32 one, and a line saying so."""
    if precision == "int8":  # what can be refused is, before any conversion
        nncf = int8.import_nncf()
        tiles, source = int8.calibration_tiles(metadata, calibration_folder, calibration_tiles)
    key = openvino_cache.model_key(path, openvino.__version__)
    model, record = openvino_cache.read(openvino, key)
    if model is None:
        model = _convert(openvino, path, metadata)
        record = {"precision": "float32", "openvino_version": openvino.__version__, "source": os.path.abspath(path)}
        openvino_cache.write(openvino, key, model, record)
    if precision == "float32":
        return model, record, None
    int8_key = hashlib.sha256("\0".join([key, nncf.__version__, int8.tiles_digest(tiles), str(int8.GATE)])
                              .encode()).hexdigest()
    quantized, int8_record = openvino_cache.read(openvino, int8_key)
    if int8_record is None:
        log(f"int8: quantizing with NNCF on {len(tiles)} tiles of {source} (once: kept in "
            f"{openvino_cache.cache_root()})")
        quantized, int8_record = int8.quantize(openvino, nncf, model, tiles, accuracy_control, log)
        int8_record.update(source=os.path.abspath(path), calibration=source, openvino_version=openvino.__version__)
        openvino_cache.write(openvino, int8_key, quantized, int8_record)
    line = int8.gate_line(int8_record, int8_record["calibration"])
    return (quantized, int8_record, line) if quantized is not None else (model, record, line)


def write_conversion(path, folder, precision="float32", calibration_folder=None, calibration_tiles=300,
                     accuracy_control=True, log=print):
    """Write the OpenVINO model that `precision` runs (model.xml, model.bin), the model's metadata and
    the conversion's record (record.json: precision, versions, the int8 gate) to `folder`, swapped in
    whole, for use with OpenVINO elsewhere; returns the record. ValueError (one line) as load_predictor."""
    openvino = _openvino_for(precision, "openvino")
    metadata = read_metadata(path)
    model, record, line = openvino_model(openvino, path, metadata, precision, calibration_folder,
                                         calibration_tiles, accuracy_control, log)
    if line is not None:
        log(line)
    try:
        with atomic_files.replacing_directory(folder) as staging:
            openvino_cache.save(openvino, model, staging)
            shutil.copy2(os.path.join(path, METADATA_FILENAME), staging)
            with open(os.path.join(staging, openvino_cache.RECORD_NAME), "w") as handle:
                json.dump(record, handle, indent=1, sort_keys=True)
    except OSError as error:
        raise ValueError(f"{folder}: cannot write the OpenVINO model ({errors.gist(error)})") from None
    return record

def _convert(openvino, path, metadata):
    """openvino.convert_model of the SavedModel, checked to be images [?, ?, ?, C] -> one softmax."""
    advice = "use --engine tensorflow"
    try:
        model = openvino.convert_model(path)
    except Exception as error:  # the converter raises its own types; the user needs the model and the way out
        raise ValueError(f"{path}: OpenVINO cannot convert this SavedModel ({errors.gist(error)}); "
                         f"{advice}") from None
    channels = metadata["number_channels"]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{path}: OpenVINO found {len(model.inputs)} input(s) and {len(model.outputs)} "
                         f"output(s), expected one of each; {advice}")
    try:
        model.reshape([-1, -1, -1, channels])  # batch, height and width dynamic: every tile grid runs
    except Exception as error:
        raise ValueError(f"{path}: OpenVINO cannot take [N, H, W, {channels}] images ({error}); {advice}") from None
    return model




class OpenVinoPredictor:
    """predict(batch) on an OpenVINO model compiled once for the CPU, for any N, H and W."""

    def __init__(self, openvino, model, channels, precision="float32"):
        hints = openvino.properties.hint
        self.channels = channels
        self.precision = precision
        self.compiled = openvino.Core().compile_model(model, "CPU", {
            # CPUs with bfloat16 units (AVX512_BF16, AMX) would otherwise run in bfloat16: masks must
            # match TensorFlow's float32 ones (an int8 model's quantized layers stay int8)
            hints.inference_precision: openvino.Type.f32,
            # one stream using every core: our requests are single large tiles, run one after another
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            # unpinned threads move off cores that other processes hold (measured: pinning was 1.5x
            # slower on a shared 2-core machine)
            hints.enable_cpu_pinning: False,
        })
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch):
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[-1] != self.channels:
            raise ValueError(f"predict wants an NHWC batch with {self.channels} channel(s), got shape {batch.shape}")
        check_input_size(batch.shape[1], batch.shape[2])
        self.request.infer({0: np.ascontiguousarray(batch)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)
