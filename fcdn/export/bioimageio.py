"""An FC-DenseNet SavedModel as a BioImage Model Zoo package (model spec 0.5), for Fiji (deepImageJ),
ilastik, napari and bioimageio.core.

    from fcdn.export.bioimageio import export_package

    export_package("runs/hes/saved_model", "runs/hes/model.bioimageio.zip")
    export_package("runs/hes/saved_model", "runs/hes/model.bioimageio.zip", test_image="data/images/a.tif",
                   name="HES cell segmentation", authors=["Ada Lovelace", "Alan Turing"], license="MIT")

The package (a zip, described by bioimageio.spec's Python API) holds:
- the model's rdf.yaml: input `input` (batch, y, x, channel; y and x of size minimum + n * 32 with the
  minimum 2 * radius + 32) normalised with zero_mean_unit_variance over y and x (the whole image, per
  channel, as in training); output `probabilities` (batch, y, x, one named channel per class) with a
  halo of the model's measured radius, which tools crop from every tile;
- weights `tensorflow_saved_model_bundle` (the SavedModel re-wrapped so that its "serve" endpoint
  returns {"probabilities": softmax}, the form bioimageio.core's keras.layers.TFSMLayer call wants)
  and `onnx` (tf2onnx, opset 17, converted from the former: its `parent`);
- test input and output tensors from a real image (`test_image`, or the first record of the training
  run's test database), a cover (that image with the predicted outlines), README.md and citations.

Unless run_tests is false, bioimageio.core's test_model runs on the finished package for every weight
format; the package is written under a temporary name beside the output and renamed only when it is
complete (and has passed). Needs the optional dependencies of requirements-bioimageio.txt.
export_bioimageio.py is export_package behind flags; the messages of its errors name those flags.
"""

import contextlib
import getpass
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
import zipfile

import numpy as np

from fcdn.common import atomic_files, errors, qc_pictures
from fcdn.data import image_files

OUTPUT_ID = "probabilities"
INPUT_ID = "input"
WEIGHT_FORMATS = ("tensorflow_saved_model_bundle", "onnx")
OPTIONAL_MODULES = ("bioimageio.core", "bioimageio.spec", "tf2onnx", "onnxruntime", "onnx")
ONNX_OPSET = 17  # deepImageJ's ONNX runtime reads opsets up to 17
# bioimageio.core's ZeroMeanUnitVariance always divides by std + 1e-6 (it ignores the described eps)
ZMUV_EPS = 1e-6
MAX_TEST_SIZE = 512  # a larger test image is cropped to keep the package small
ONNX_TOLERANCE = 1e-4  # largest probability difference accepted between onnx and TensorFlow
PAPER_DOI = "10.1109/CVPRW.2017.156"
NIST_URL = "https://github.com/usnistgov/semantic-segmentation-fc-densenet"
DEFAULT_DESCRIPTION = ("FC-DenseNet (Jegou et al. 2017) semantic segmentation of 2-D microscopy images: "
                       "per-pixel class probabilities")


class ExportError(ValueError):
    """A user mistake; the message is one line naming the path and the problem."""


# ---------------------------------------------------------------------------------------------
# Checks

def check_dependencies():
    """ExportError unless the optional dependencies of requirements-bioimageio.txt are installed."""
    missing = []
    for name in OPTIONAL_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package (bioimageio) is missing
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ExportError(f"the bioimage.io export needs {', '.join(missing)}: "
                          f"pip install -r requirements-bioimageio.txt")


def names_of(value, separator):
    """The names of a flag's `separator`-separated text, or of a sequence of names, stripped."""
    return [name.strip() for name in (value.split(separator) if isinstance(value, str) else value)]


def check_options(output_path, weight_formats, test_image, license):
    """Check the cheap things first, before any model is loaded; returns the weight formats to write
    (the TensorFlow bundle always, in WEIGHT_FORMATS' order). ExportError if unusable."""
    check_dependencies()
    formats = [name for name in names_of(weight_formats, ",") if name]
    unknown = sorted(set(formats) - set(WEIGHT_FORMATS))
    if unknown:
        raise ExportError(f"--weight_formats: unknown {unknown}; choose from {', '.join(WEIGHT_FORMATS)}")
    check_output_path(output_path)
    if test_image is not None and not os.path.isfile(test_image):
        raise ExportError(f"{test_image}: test image does not exist")
    from bioimageio.spec.model.v0_5 import LicenseId

    try:
        LicenseId(license)
    except ValueError:
        raise ExportError(f"--license {license}: not an SPDX license identifier") from None
    return [name for name in WEIGHT_FORMATS if name in formats or name == WEIGHT_FORMATS[0]]


def is_package(path):
    """Whether path is a bioimage.io package zip (it holds an rdf.yaml or bioimageio.yaml)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool({"rdf.yaml", "bioimageio.yaml"} & set(archive.namelist()))
    except (zipfile.BadZipFile, OSError):
        return False


def check_output_path(path):
    if not path.lower().endswith(".zip"):
        raise ExportError(f"{path}: the package name must end in .zip")
    if os.path.isdir(path) or (os.path.exists(path) and not is_package(path)):
        raise ExportError(f"{path}: exists and is not a bioimage.io package; refusing to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ExportError(f"{path}: the folder {parent} does not exist")


# ---------------------------------------------------------------------------------------------
# The test image

def first_test_record_image(metadata, saved_model_path):
    """The image of the first record of the training run's test database (the trainer's metadata)."""
    database = (metadata.get("training") or {}).get("test_database")
    if not database:
        raise ExportError(f"{saved_model_path}: no training test database in the metadata; give --test_image")
    if not os.path.isdir(database):
        raise ExportError(f"{database}: the training run's test database is gone; give --test_image")
    import lmdb

    from fcdn.data import records

    environment = lmdb.open(database, readonly=True, lock=False, readahead=False, subdir=True)
    try:
        with environment.begin() as transaction:
            for _, value in transaction.cursor():
                try:
                    return np.array(records.decode_record(value).image)
                except records.RecordError:
                    continue
    finally:
        environment.close()
    raise ExportError(f"{database}: no readable record in the test database; give --test_image")


def load_test_image(test_image, metadata, saved_model_path):
    """The test image (a file, or with None the first test record of the training run) as HWC, checked
    against the model's channel count; returns (image, where it came from)."""
    if test_image is not None:
        image = image_files.as_supported_image(image_files.read_image(test_image), test_image)
        source = test_image
    else:
        image = first_test_record_image(metadata, saved_model_path)
        source = f"{metadata['training']['test_database']} (first record)"
    image = image if image.ndim == 3 else image[:, :, np.newaxis]
    if image.shape[2] != metadata["number_channels"]:
        raise ExportError(f"{source}: image has {image.shape[2]} channel(s), "
                          f"the model expects {metadata['number_channels']}")
    return image, source


def minimum_size(metadata):
    """The smallest valid input side: a tile that keeps at least one size-factor block after the halo."""
    return 2 * int(metadata["radius"]) + int(metadata["size_factor"])


def fit_to_valid_size(image, minimum, step, largest=MAX_TEST_SIZE):
    """Crop (centred) or reflect-pad each spatial axis to a size minimum + n * step.

    The longest kept side is at most max(largest, minimum), to keep the package small.
    """
    for axis in (0, 1):
        length = image.shape[axis]
        if length < minimum:
            pad = [(0, 0)] * image.ndim
            pad[axis] = (0, minimum - length)
            image = np.pad(image, pad, mode="reflect" if length > 1 else "edge")
            continue
        target = minimum + (min(length, max(largest, minimum)) - minimum) // step * step
        start = (length - target) // 2
        image = np.take(image, np.arange(start, start + target), axis=axis)
    return image


def tool_normalize(image):
    """The tools' zero_mean_unit_variance over y and x: (x - mean) / (std + 1e-6), per channel.

    The project's own rule (image_files.zscore_normalize) divides by std only where std > 1; for
    channels with std > 1 the two differ by the 1e-6 alone (a relative 1e-6 / std, at float32
    resolution); see warn_normalization for the others.
    """
    image = np.asarray(image, dtype=np.float32)
    image = image if image.ndim == 3 else image[:, :, np.newaxis]
    mean = image.mean(axis=(0, 1), dtype=np.float64)
    std = image.std(axis=(0, 1), dtype=np.float64)
    return ((image - mean.astype(np.float32)) / (std + ZMUV_EPS).astype(np.float32)).astype(np.float32)


def warn_normalization(image, source):
    std = np.asarray(image, dtype=np.float32).std(axis=(0, 1), dtype=np.float64)
    low = [int(c) for c in np.flatnonzero(std <= 1.0)]
    if low:
        print(f"warning: {source}: channel(s) {low} have a standard deviation <= 1, where the package's "
              f"normalisation (divide by std) differs from this project's (subtract the mean only); "
              f"images like it will not segment the same way in the tools", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Weights

def write_serving_bundle(saved_model_path, metadata, folder):
    """Re-wrap the SavedModel so that its "serve" endpoint returns {OUTPUT_ID: softmax}.

    bioimageio.core calls a TensorFlow 2 bundle through keras.layers.TFSMLayer(call_endpoint="serve")
    and requires a dict keyed by the output id; our export returns the bare tensor. The wrapper
    tracks the restored model, so the new SavedModel holds the same variables. Returns the bundle
    directory and the module (its `serve` function is what the onnx conversion converts; the module
    keeps the restored variables alive, which the function alone does not).
    """
    import tensorflow as tf

    module = tf.Module()
    module.restored = tf.saved_model.load(saved_model_path)
    endpoint = metadata.get("serving_endpoint", "serve")
    spec = tf.TensorSpec([None, None, None, metadata["number_channels"]], tf.float32, name=INPUT_ID)

    @tf.function(input_signature=[spec])
    def serve(images):
        return {OUTPUT_ID: tf.identity(getattr(module.restored, endpoint)(images), name=OUTPUT_ID)}

    module.serve = serve
    bundle = os.path.join(folder, "tf_saved_model")
    tf.saved_model.save(module, bundle, signatures={"serving_default": serve})
    metadata_name = "fcdensenet_metadata.json"  # travels with the weights, for our own tools
    shutil.copyfile(os.path.join(saved_model_path, metadata_name), os.path.join(bundle, metadata_name))
    return bundle, module


def zip_directory(directory, path):
    """Zip a directory's content with its files at the archive root (saved_model.pb at the top)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                full = os.path.join(root, name)
                archive.write(full, os.path.relpath(full, directory))
    return path


def write_onnx(serve, metadata, path):
    """Convert the serving function with tf2onnx; the ONNX input and output keep the tensor ids."""
    import tensorflow as tf
    import tf2onnx

    spec = tf.TensorSpec([None, None, None, metadata["number_channels"]], tf.float32, name=INPUT_ID)
    tf2onnx.convert.from_function(serve, input_signature=[spec], opset=ONNX_OPSET, output_path=path)
    return path


def onnx_difference(path, batch, reference):
    """Largest absolute probability difference of the ONNX weights against TensorFlow on batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run([OUTPUT_ID], {session.get_inputs()[0].name: batch})
    return float(np.abs(output - reference).max())


# ---------------------------------------------------------------------------------------------
# Cover and documentation

def write_cover(image, mask, path):
    """The test image with the outline of every predicted non-background region, a centred square."""
    side = min(mask.shape)
    top, left = (mask.shape[0] - side) // 2, (mask.shape[1] - side) // 2
    image, mask = image[top:top + side, left:left + side], mask[top:top + side, left:left + side]
    qc_pictures.write_png(path, qc_pictures.draw_outlines(qc_pictures.stretch(image.astype(np.float32)), mask))
    return path


def training_lines(metadata):
    training = metadata.get("training") or {}
    if not training:
        return ["The SavedModel carries no record of its training run."]
    lines = [f"- {key}: {training[key]}" for key in ("train_database", "test_database", "epoch", "global_step",
                                                      "batch_size", "learning_rate", "crop_size")
             if key in training]
    scores = [f"{key} {training[key]:.4f}" for key in ("test_loss", "pixel_accuracy", "mean_iou")
              if isinstance(training.get(key), (int, float))]
    if scores:
        lines.append(f"- scores of the saved epoch on the training run's test set: {', '.join(scores)} "
                     "(that set also chose the epoch, so these are not scores on unseen data)")
    return lines


def write_documentation(path, context):
    """README.md of the package, with the '# Validation' section the spec asks for."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(model_sections(context) + validation_sections(context))
    return path


def model_sections(context):
    """The README's title, description, tensors, weights and training run."""
    metadata, names, minimum = context["metadata"], context["class_names"], context["minimum"]
    radius = metadata["radius"]
    return f"""# {context['name']}

{context['description']}

An FC-DenseNet ({metadata['variant']}) for {metadata['number_channels']}-channel images and
{metadata['number_classes']} classes, written by `export_bioimageio.py` of an FC-DenseNet suite for
TensorFlow 2 (a re-implementation of NIST's FC-DenseNet suite).

## Input and output

- `{INPUT_ID}`: float32, axes batch, y, x, channel ({metadata['number_channels']}); y and x are each
  {minimum} + n * {metadata['size_factor']} pixels. The package normalises it: per channel, zero mean
  and unit variance over the whole image (`zero_mean_unit_variance` over y and x), as in training.
- `{OUTPUT_ID}`: float32 softmax, axes batch, y, x, channel, one channel per class
  ({', '.join(names)}); the predicted class of a pixel is the channel with the largest probability.
  Halo: {radius} pixels (the measured receptive-field radius) on every side of a tile are to be
  cropped, so a tiled prediction equals a whole-image one away from the image border.

## Weights

- `tensorflow_saved_model_bundle` (TensorFlow {context['tensorflow_version']}): the SavedModel, whose
  `serve` endpoint returns {{"{OUTPUT_ID}": probabilities}}.
{context['onnx_line']}

## Training

{chr(10).join(training_lines(metadata))}

"""


def validation_sections(context):
    """The README's '# Validation' section (the spec asks for it), limits and citations."""
    radius = context["metadata"]["radius"]
    return f"""# Validation

The test tensors hold {context['test_source']} ({context['test_shape']}) and this model's output for
it. To validate the model quantitatively on unseen data, segment held-out images that have
ground-truth masks and compare: `python inference_fcdensenet.py --saved_model_filepath <SavedModel>
--image_folder <images> --output_folder <masks out> --mask_folder <ground truth>` prints the pixel
accuracy and the per-class intersection over union; masks predicted by a tool from this package can
be scored the same way.

## Limits

- The normalisation statistics must come from the whole image. A tool that normalises tile by tile
  computes other statistics and other probabilities.
- Within the image, tiles overlapping by the halo give the whole-image result; at the image border
  the tools pad the image (mirroring) where the project's own inference lets the network pad, so
  the outermost {radius} pixels may differ.
- Channels with a standard deviation of at most 1 (for example images scaled to [0, 1]) are
  normalised differently: the project only subtracts their mean, the tools also divide by the
  standard deviation.

## Citations

- S. Jegou, M. Drozdzal, D. Vazquez, A. Romero, Y. Bengio: The One Hundred Layers Tiramisu: Fully
  Convolutional DenseNets for Semantic Segmentation. CVPR Workshops 2017, doi:{PAPER_DOI}
- NIST FC-DenseNet semantic segmentation suite: {NIST_URL}
{context['project_line']}
"""


# ---------------------------------------------------------------------------------------------
# The model description

def tensor_axes(metadata, minimum, output, class_names):
    from bioimageio.spec.model import v0_5

    step = int(metadata["size_factor"])
    radius = int(metadata["radius"])
    axes = [v0_5.BatchAxis()]
    for axis in ("y", "x"):
        if not output:
            size = v0_5.ParameterizedSize(min=minimum, step=step)
            axes.append(v0_5.SpaceInputAxis(id=v0_5.AxisId(axis), size=size))
            continue
        size = v0_5.SizeReference(tensor_id=v0_5.TensorId(INPUT_ID), axis_id=v0_5.AxisId(axis))
        axes.append(v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(axis), size=size, halo=radius) if radius
                    else v0_5.SpaceOutputAxis(id=v0_5.AxisId(axis), size=size))
    channels = class_names if output else [f"channel_{c}" for c in range(metadata["number_channels"])]
    axes.append(v0_5.ChannelAxis(channel_names=[v0_5.Identifier(name) for name in channels]))
    return axes


def tensor_descriptions(metadata, minimum, files, class_names):
    from bioimageio.spec.model import v0_5

    normalization = v0_5.ZeroMeanUnitVarianceDescr(
        kwargs=v0_5.ZeroMeanUnitVarianceKwargs(axes=[v0_5.AxisId("y"), v0_5.AxisId("x")], eps=ZMUV_EPS))
    inputs = [v0_5.InputTensorDescr(
        id=v0_5.TensorId(INPUT_ID), axes=tensor_axes(metadata, minimum, False, class_names),
        description="image, normalised per channel over the whole image by the package",
        test_tensor=v0_5.FileDescr(source=files["test_input"]),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"), preprocessing=[normalization])]
    outputs = [v0_5.OutputTensorDescr(
        id=v0_5.TensorId(OUTPUT_ID), axes=tensor_axes(metadata, minimum, True, class_names),
        description="softmax: the probability of each class",
        test_tensor=v0_5.FileDescr(source=files["test_output"]),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))]
    return inputs, outputs


def weights_description(files, context):
    import tensorflow as tf
    from bioimageio.spec.model import v0_5

    bundle = v0_5.TensorflowSavedModelBundleWeightsDescr(
        source=files["tensorflow_saved_model_bundle"], tensorflow_version=v0_5.Version(tf.__version__),
        comment="SavedModel whose 'serve' endpoint returns {'probabilities': softmax}")
    onnx = None
    if "onnx" in files:
        onnx = v0_5.OnnxWeightsDescr(
            source=files["onnx"], opset_version=ONNX_OPSET, parent="tensorflow_saved_model_bundle",
            comment=f"tf2onnx conversion; largest probability difference against TensorFlow on the "
                    f"test image {context['onnx_difference']:.2g}")
    return v0_5.WeightsDescr(tensorflow_saved_model_bundle=bundle, onnx=onnx)


def citations(project_url):
    from bioimageio.spec.model import v0_5

    cite = [v0_5.CiteEntry(text="Jegou et al. 2017: The One Hundred Layers Tiramisu: Fully Convolutional "
                                "DenseNets for Semantic Segmentation", doi=v0_5.Doi(PAPER_DOI)),
            v0_5.CiteEntry(text="NIST FC-DenseNet semantic segmentation suite", url=v0_5.HttpUrl(NIST_URL))]
    if project_url:
        cite.append(v0_5.CiteEntry(text="FC-DenseNet suite for TensorFlow 2 (this export's project)",
                                   url=v0_5.HttpUrl(project_url)))
    return cite


def build_description(files, context):
    """The ModelDescr (validated by bioimageio.spec as it is built; file paths are local)."""
    import pydantic

    try:
        return _model_description(files, context)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        detail = f"{location}: {first['msg']}" if location else first["msg"]
        raise ExportError(f"{context['output']}: not written: the package description is invalid: "
                          f"{detail}") from None


def _model_description(files, context):
    from bioimageio.spec.model import v0_5

    metadata = context["metadata"]
    inputs, outputs = tensor_descriptions(metadata, context["minimum"], files, context["class_names"])
    return v0_5.ModelDescr(
        name=context["name"], description=context["description"],
        authors=[v0_5.Author(name=name) for name in context["authors"]],
        cite=citations(context["project_url"]), license=v0_5.LicenseId(context["license"]),
        git_repo=v0_5.HttpUrl(context["project_url"]) if context["project_url"] else None,
        documentation=v0_5.FileDescr(source=files["documentation"]),
        covers=[v0_5.FileDescr(source=files["cover"])],
        tags=["fc-densenet", "semantic-segmentation", "2d", "microscopy", "tensorflow"]
        + (["onnx"] if "onnx" in files else []),
        inputs=inputs, outputs=outputs, weights=weights_description(files, context),
        config=v0_5.Config(fcdensenet={key: value for key, value in metadata.items() if key != "training"}))


# ---------------------------------------------------------------------------------------------
# Stages of the script

def git_remote_url():
    """The https URL of this checkout's git remote 'origin', or None."""
    import subprocess

    try:
        checkout = os.path.dirname(os.path.abspath(__file__))
        url = subprocess.run(["git", "-C", checkout, "remote", "get-url", "origin"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if url.startswith("git@") and ":" in url:
        host, _, repository = url[len("git@"):].partition(":")
        url = f"https://{host}/{repository}"
    if url.endswith(".git"):
        url = url[:-len(".git")]
    return url if url.startswith(("https://", "http://")) else None


def describe_run(metadata, output_path, name, description, authors, license, class_names, project_url):
    """The names and texts of the package (see export_package), from the options and the model's metadata."""
    classes = metadata["number_classes"]
    names = names_of(class_names, ",") if class_names else [f"class_{c}" for c in range(classes)]
    if len(names) != classes or len(set(names)) != classes:
        raise ExportError(f"--class_names: give {classes} distinct names, got {names}")
    authors = [author for author in names_of(authors or getpass.getuser(), ";") if author]
    if not authors:
        raise ExportError("--authors: give at least one name")
    return {
        "metadata": metadata, "class_names": names, "minimum": minimum_size(metadata), "authors": authors,
        "name": name or f"FC-DenseNet {metadata['variant']} {classes}-class segmentation",
        "description": description, "license": license, "output": output_path,
        "project_url": project_url if project_url is not None else git_remote_url(),
    }


def write_test_files(image, predict, context, folder):
    """Test tensors (the fitted image and its probabilities) and the cover; returns the normalised
    batch and the probabilities, against which the onnx weights are checked."""
    metadata = context["metadata"]
    real = image.shape[:2]
    image = fit_to_valid_size(image, context["minimum"], int(metadata["size_factor"]))
    batch = tool_normalize(image)[np.newaxis]
    probabilities = np.asarray(predict(batch), dtype=np.float32)
    np.save(os.path.join(folder, "test_input.npy"), image.astype(np.float32)[np.newaxis])
    np.save(os.path.join(folder, "test_output.npy"), probabilities)
    # the cover leaves out the reflected padding (at the end of an axis) a small image got
    height, width = min(real[0], image.shape[0]), min(real[1], image.shape[1])
    write_cover(image[:height, :width], np.argmax(probabilities[0, :height, :width], axis=-1),
                os.path.join(folder, "cover.png"))
    context["test_shape"] = f"{image.shape[0]}x{image.shape[1]} pixels, {image.shape[2]} channel(s)"
    return batch, probabilities


def write_weights(saved_model_path, weight_formats, metadata, batch, probabilities, context, folder):
    """The zipped TensorFlow bundle and, if asked, the ONNX weights checked against it."""
    import tensorflow as tf

    bundle, module = write_serving_bundle(saved_model_path, metadata, folder)
    files = {"tensorflow_saved_model_bundle": zip_directory(bundle, os.path.join(folder, "tf_saved_model.zip"))}
    context["tensorflow_version"] = tf.__version__
    context["onnx_line"] = ""
    if "onnx" in weight_formats:
        files["onnx"] = write_onnx(module.serve, metadata, os.path.join(folder, "model.onnx"))
        difference = onnx_difference(files["onnx"], batch, probabilities)
        if not difference <= ONNX_TOLERANCE:
            raise RuntimeError(f"the ONNX conversion differs from TensorFlow by {difference:.3g} "
                               "on the test image")
        context["onnx_difference"] = difference
        context["onnx_line"] = (f"- `onnx` (opset {ONNX_OPSET}, converted from the TensorFlow weights with "
                                f"tf2onnx): largest probability difference against TensorFlow on the test "
                                f"image {difference:.2g}.")
    shutil.rmtree(bundle)
    return files


@contextlib.contextmanager
def quiet_validation():
    """bioimageio.spec validation (with file checks) without its warnings about package files.

    Validation downloads nothing: every file is in the package. It does send one HEAD request to
    each cited URL; offline that fails at once and leaves a warning (BIOIMAGEIO_HTTP_TIMEOUT, in
    seconds, bounds the wait where a network drops packets).
    """
    with warnings.catch_warnings():
        # bioimageio.spec 0.5.12 warns about every package file while it looks for remote files to
        # pre-fetch; the files are in the package, nothing is lost
        warnings.filterwarnings("ignore", message="Found mapping with 'source'")
        yield


def run_model_tests(package, weight_formats, folder):
    """bioimageio.core's test_model for every weight format; RuntimeError naming the first failure."""
    from bioimageio.core import test_model

    # the TensorFlow backend unzips the bundle into the working directory
    with contextlib.chdir(folder):
        for weight_format in weight_formats:
            summary = test_model(package, weight_format=weight_format)
            if summary.status != "passed":
                failed = [detail for detail in summary.details if detail.status == "failed"]
                reason = "; ".join(f"{detail.name}: {error.msg}".splitlines()[0]
                                   for detail in failed for error in detail.errors) or summary.status
                raise RuntimeError(f"bioimageio.core test_model failed for {weight_format}: {reason}")


def export_package(saved_model_path, output_path, *, name=None, description=DEFAULT_DESCRIPTION, authors=None,
                   license="CC-BY-4.0", test_image=None, class_names=None, project_url=None,
                   weight_formats=WEIGHT_FORMATS, run_tests=True, log=print):
    """Write the package of the SavedModel at `output_path` (a .zip; an earlier package there is
    replaced); returns its absolute path.

    name: shown by the tools (None: "FC-DenseNet <variant> <classes>-class segmentation"). authors: names,
    or one ';'-separated text (None: the current user's login name). license: an SPDX identifier.
    test_image: the image (tif/png/jpg) of the test tensors and the cover (None: the first record of
    the training run's test database). class_names: one per class, or one ','-separated text (None:
    class_0, class_1, ...). project_url: cited and linked as git_repo (None: this checkout's git
    remote 'origin', if any; "": none). weight_formats: names, or one ','-separated text; the
    TensorFlow bundle is always written. run_tests: run bioimageio.core's test_model on the package
    before it is renamed into place. log: where the closing line goes.

    ExportError (a ValueError, one line) for bad options, a bad model or test image, and for a
    conversion or a test of the package that failed (then nothing is written); OSError for a folder
    that cannot be written.
    """
    weight_formats = check_options(output_path, weight_formats, test_image, license)
    from fcdn.model import saved_model  # here, not at the top: the script's --help and flag errors start no TensorFlow

    target = os.path.abspath(output_path)
    try:
        metadata = saved_model.read_metadata(saved_model_path)
        context = describe_run(metadata, output_path, name, description, authors, license, class_names,
                               project_url)
        image, context["test_source"] = load_test_image(test_image, metadata, saved_model_path)
        warn_normalization(image, context["test_source"])
        predict, metadata = saved_model.load_saved_model(saved_model_path)
        write_package(saved_model_path, target, weight_formats, run_tests, image, predict, context)
    except RuntimeError as error:  # a conversion or a test of the finished package failed
        raise ExportError(f"{output_path}: not written: {errors.gist(error)}") from error
    log(f"wrote {target}: {', '.join(weight_formats)}; input {context['minimum']} + n * "
        f"{metadata['size_factor']} pixels, halo {metadata['radius']}"
        + (f"; onnx differs by at most {context['onnx_difference']:.2g}" if "onnx_difference" in context else "")
        + ("; bioimageio.core test_model passed" if run_tests else ""))
    return target


def write_package(saved_model_path, target, weight_formats, run_tests, image, predict, context):
    """Build the package's files in a staging folder beside `target`, describe, save and (if asked)
    test the package, and rename it into place."""
    metadata = context["metadata"]
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(target)}.files-",
                                     dir=os.path.dirname(target)) as staging, \
            atomic_files.replacing_file(target) as package:
        files_folder = os.path.join(staging, "files")
        os.makedirs(files_folder)
        batch, probabilities = write_test_files(image, predict, context, files_folder)
        files = write_weights(saved_model_path, weight_formats, metadata, batch, probabilities, context,
                              files_folder)
        project = context["project_url"]
        context["project_line"] = f"- This project: {project}" if project else ""
        files.update(test_input=os.path.join(files_folder, "test_input.npy"),
                     test_output=os.path.join(files_folder, "test_output.npy"),
                     cover=os.path.join(files_folder, "cover.png"),
                     documentation=write_documentation(os.path.join(files_folder, "README.md"), context))
        from bioimageio.spec import save_bioimageio_package

        with quiet_validation():
            description = build_description(files, context)
            save_bioimageio_package(description, output_path=package)
            if run_tests:  # the package is renamed into place only once its tests pass
                run_model_tests(package, weight_formats, staging)
