"""Which runtime executes an exported model at inference: OpenVINO on CPUs, TensorFlow elsewhere.

    predict, metadata, engine = load_predictor("runs/x/saved_model")              # "auto"
    predict, metadata, engine = load_predictor("runs/x/saved_model", "tensorflow")
    softmax = predict(batch)   # as saved_model.load_saved_model's predict: float32 NHWC in, softmax out
    predict, metadata, device_names, engine = load_model("runs/x/saved_model")   # every visible device

"auto" picks OpenVINO when TensorFlow sees no GPU and the openvino package imports, else TensorFlow.
OpenVINO reads the SavedModel itself (openvino.convert_model); the converted model (IR: model.xml and
model.bin) is cached in an `openvino/` folder inside the SavedModel when that folder is writable, keyed
by a hash of the SavedModel's files and the OpenVINO version, so a re-exported model or another
OpenVINO is converted again; in a read-only folder the conversion is done once per load, in memory.
The model is compiled once for dynamic batch, height and width, in float32. load_model spreads a
TensorFlow model over every visible device (or the devices named) instead, when there are several.
"""

import hashlib
import importlib
import json
import os

import numpy as np

from fcdn.common import atomic_files, errors

ENGINES = ("auto", "openvino", "tensorflow")
CACHE_FOLDER = "openvino"
CACHE_KEY_FILE = "source.json"
IR_NAME = "model.xml"


def check_engine(engine):
    """ValueError unless `engine` is one of ENGINES."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


def load_model(path, engine="auto", device_names=None):
    """(predict, metadata, device names, engine name): OpenVINO on the CPU (see load_predictor), or a
    TensorFlow copy of the model on every device of `device_names` (TensorFlow device names; None:
    every visible device). ValueError (one line) for a missing or bad model or engine."""
    path = os.fspath(path)
    check_engine(engine)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: SavedModel folder does not exist")
    from fcdn.common import devices
    from fcdn.model import saved_model

    if device_names is not None and engine == "openvino":
        raise ValueError("OpenVINO runs on the CPU: name TensorFlow devices with the tensorflow engine")
    names = list(device_names) if device_names is not None else devices.inference_devices()
    if engine == "openvino" or (engine == "auto" and device_names is None and len(names) == 1):
        predict, metadata, chosen = load_predictor(path, engine)
        return predict, metadata, (["CPU"] if chosen == "openvino" else names), chosen
    # named devices get their copy placed there; the one visible device needs no placement
    placed = device_names is not None or len(names) > 1
    loaded = [saved_model.load_saved_model(path, device if placed else None) for device in names]
    predict = devices.DevicePool([function for function, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
    return predict, loaded[0][1], names, "tensorflow"


def load_predictor(saved_model_path, engine="auto"):
    """Return (predict, metadata, engine_name) for an export, engine_name "openvino" or "tensorflow".

    predict has saved_model.load_saved_model's contract. Raises ValueError (one line, naming the path or
    the package) for a bad model, an unknown engine, "openvino" without the package, or a model that
    OpenVINO cannot convert.
    """
    path = os.fspath(saved_model_path)
    check_engine(engine)
    from fcdn.model import saved_model  # here, not at the top: the scripts' --help and flag errors start no TensorFlow

    metadata = saved_model.read_metadata(path)
    openvino, import_error = _import_openvino() if engine != "tensorflow" else (None, None)
    if engine == "openvino" and openvino is None:
        raise ValueError(f"--engine openvino needs the openvino package (pip install openvino): {import_error}")
    if engine == "auto":
        engine = "openvino" if openvino is not None and not _tensorflow_sees_a_gpu() else "tensorflow"
    if engine == "tensorflow":
        predict, metadata = saved_model.load_saved_model(path)
        return predict, metadata, "tensorflow"
    model = _openvino_model(openvino, path, metadata)
    return OpenVinoPredictor(openvino, model, metadata["number_channels"]), metadata, "openvino"


def _import_openvino():
    """(module, None) or (None, the reason in one line): a broken install counts as missing."""
    try:
        return importlib.import_module("openvino"), None
    except Exception as error:  # an ImportError, or whatever a half-installed package raises
        return None, errors.gist(error)


def _tensorflow_sees_a_gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _openvino_model(openvino, path, metadata):
    """The converted ov.Model: from the cache when it is current, else converted (and cached if we may)."""
    cache = os.path.join(path, CACHE_FOLDER)
    key = cache_key(path, openvino.__version__)
    core = openvino.Core()
    if _read_key(cache) == key:
        try:
            return core.read_model(os.path.join(cache, IR_NAME))
        except Exception:  # a damaged cache is rebuilt below rather than trusted
            pass
    model = _convert(openvino, path, metadata)
    try:
        with atomic_files.replacing_directory(cache) as staging:
            # float32 weights: save_model would otherwise halve them to float16
            openvino.save_model(model, os.path.join(staging, IR_NAME), compress_to_fp16=False)
            with open(os.path.join(staging, CACHE_KEY_FILE), "w") as handle:
                json.dump({"key": key, "openvino_version": openvino.__version__}, handle)
    except OSError:
        pass  # a read-only model folder: keep the conversion in memory for this run
    return model


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


def cache_key(path, openvino_version):
    """A hash of every file of the SavedModel (its graph, variables and metadata; not the cache) and the
    OpenVINO version: a re-exported model, or another OpenVINO, is converted again."""
    digest = hashlib.sha256(openvino_version.encode())
    for parent, folders, files in os.walk(path):
        # the cache and its writers' staging and parked folders are not the model
        folders[:] = sorted(name for name in folders
                            if parent != path or atomic_files.target_path(name) != CACHE_FOLDER)
        for name in sorted(files):
            file_path = os.path.join(parent, name)
            digest.update(os.path.relpath(file_path, path).encode() + b"\0")
            with open(file_path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _read_key(cache):
    try:
        with open(os.path.join(cache, CACHE_KEY_FILE)) as handle:
            return json.load(handle).get("key")
    except (OSError, ValueError, AttributeError):
        return None


class OpenVinoPredictor:
    """predict(batch) on an OpenVINO model compiled once for the CPU, for any N, H and W."""

    def __init__(self, openvino, model, channels):
        import fcdensenet

        self.check_input_size = fcdensenet.check_input_size
        hints = openvino.properties.hint
        self.channels = channels
        self.compiled = openvino.Core().compile_model(model, "CPU", {
            # CPUs with bfloat16 units (AVX512_BF16, AMX) would otherwise run in bfloat16: masks must
            # match TensorFlow's float32 ones
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
        self.check_input_size(batch.shape[1], batch.shape[2])
        self.request.infer({0: np.ascontiguousarray(batch)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)
