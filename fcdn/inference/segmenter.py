"""Segmenting images from Python: the script's options as keywords, the results as objects.

    from fcdn.inference.segmenter import Segmenter, image_paths

    segmenter = Segmenter("runs/hes/saved_model", tile_size=1024, tta=True)
    results = segmenter.segment_files(image_paths("data/images"), "out/masks", overlay_folder="out/qc")
    failures = [result.failure for result in results if result.error is not None]

inference_fcdensenet.py is this class behind flags: each flag is a keyword of the constructor (the
model and how it runs) or of segment_files (the images and what is written for them), with the same
defaults. The model is loaded by the first segment_files (or load()) and kept for the next calls.
A mistake in the options is a ValueError with the script's one-line message (which names its flag);
an image that fails does not stop the others: its ImageResult carries the error. What the script
prints (the set-up line, parts, skipped images, the summary, scores) goes through `log`.
"""

import dataclasses
import os
import sys
import time

import numpy as np

from fcdn.common import errors, qc_pictures, segmentation_metrics
from fcdn.data import image_axes, image_files, ome_zarr_io
from fcdn.inference import engines, mask_writers, runner, segmentation, split_image, tiling
from fcdn.inference.progress import Progress
from fcdn.inference.runner import ImageResult, RunnerOptions
from fcdn.measure import tables

__all__ = ["Segmenter", "ImageResult", "image_paths", "job_array_part"]


def image_paths(image_folder, image_format="tif"):
    """The sorted paths of a folder's images of one format (tif, png, jpg; a leading '.' is accepted),
    or with "zarr" of its OME-Zarr images; ValueError if it has none."""
    if image_format.lstrip(".").lower() == "zarr":
        image_format, names = "zarr", ome_zarr_io.list_zarr_images(image_folder)
    else:
        image_format = image_files.normalize_extension(image_format)
        names = image_files.list_images(image_folder, image_format)
    if not names:
        raise ValueError(f"{image_folder}: no .{image_format} images")
    return [os.path.join(image_folder, name) for name in names]


def job_array_part(num_parts=None, part_id=None, environment=None):
    """(num_parts, part_id): those given, the others from a SLURM job array (`environment`, by default
    os.environ), else (1, 0); ValueError for a part outside [0, num_parts)."""
    environment = os.environ if environment is None else environment
    count = int(environment.get("SLURM_ARRAY_TASK_COUNT", 1))
    if "SLURM_ARRAY_TASK_ID" in environment:
        step = int(environment.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        index = (int(environment["SLURM_ARRAY_TASK_ID"]) - int(environment.get("SLURM_ARRAY_TASK_MIN", 0))) // step
    else:
        index = 0
    num_parts = count if num_parts is None else num_parts
    part_id = index if part_id is None else part_id
    if num_parts < 1:
        raise ValueError(f"--num_parts {num_parts} must be at least 1")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part_id {part_id} must be in [0, {num_parts}) (--num_parts {num_parts})")
    return num_parts, part_id


def check_outputs(paths, options, mask_folder=None):
    """The output options against each other and the images; ValueError (one line) on a problem."""
    zarr_paths = [path for path in paths if runner.is_zarr_image(path)]
    file_paths = [path for path in paths if not runner.is_zarr_image(path)]
    if zarr_paths:
        ome_zarr_io.check_label_name(options.label_name)
    if options.output_folder is None and file_paths:
        raise ValueError("--output_folder is required (only zarr images can keep their labels inside)")
    if mask_folder is not None and zarr_paths:
        raise ValueError("--mask_folder scores mask files: it does not apply to zarr images")
    if mask_folder is not None and not os.path.isdir(mask_folder):
        raise ValueError(f"{mask_folder}: mask folder does not exist")
    folders = {os.path.realpath(os.path.dirname(os.path.abspath(path))) for path in paths}
    if options.output_folder is not None:
        if os.path.realpath(options.output_folder) in folders:
            raise ValueError(f"{options.output_folder}: the output folder must differ from the image folder")
        folders.add(os.path.realpath(options.output_folder))
    if options.overlay_folder is not None and os.path.realpath(options.overlay_folder) in folders:
        raise ValueError(f"{options.overlay_folder}: the overlay folder must differ from the output and image "
                         f"folders")
    lossy = [path for path in file_paths if os.path.splitext(path)[1].lower() in (".png", ".jpg", ".jpeg")]
    if options.save_probabilities and lossy:
        raise ValueError(f"--save_probabilities 1 needs tif images (probability maps are TIFFs with one channel "
                         f"per class), not {os.path.splitext(lossy[0])[1].lower()}")
    if options.measure_objects and zarr_paths and options.output_folder is None:
        raise ValueError("--measure_objects 1 with zarr images needs --output_folder (the object tables are "
                         "written there)")
    if options.save_probabilities and zarr_paths and options.output_folder is None:
        raise ValueError("--save_probabilities 1 with zarr images needs --output_folder (the probability maps "
                         "are TIFFs written there)")
    check_outputs_apart(paths, options, mask_folder)


def check_split(paths, options):
    """--split_image 1 splits OME-Zarr images only, into outputs that parts can write a share of;
    ValueError (one line) otherwise."""
    files = [path for path in paths if not runner.is_zarr_image(path)]
    if files:
        raise ValueError(f"{files[0]}: --split_image 1 splits OME-Zarr images (--image_format zarr) only")
    for flag, value in (("--overlay_folder", options.overlay_folder), ("--save_probabilities 1",
                        options.save_probabilities), ("--measure_objects 1", options.measure_objects)):
        if value:
            raise ValueError(f"{flag} needs the whole image in one process: it does not go with --split_image 1")


def _path_key(path, folders):
    """A path as compared with others: its folder resolved (links, `..`), lower case, since two names
    that differ only in case are one file where the file system ignores case."""
    folder, name = os.path.split(os.path.abspath(path))
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name).lower()


def check_outputs_apart(paths, options, mask_folder=None):
    """No output replaces an input (an image listed, a ground-truth mask to be read), and no two images
    write one file; ValueError (one line) naming the files, before any work."""
    if mask_folder is not None:
        for folder, flag in ((options.output_folder, "--output_folder"), (options.overlay_folder, "--overlay_folder")):
            if folder is not None and os.path.realpath(folder) == os.path.realpath(mask_folder):
                raise ValueError(f"{folder}: {flag} is the --mask_folder: what is written would replace the "
                                 f"ground-truth masks")
    folders = {}
    inputs = {_path_key(path, folders): (path, "the image") for path in paths}
    if mask_folder is not None:
        for path in paths:
            truth = os.path.join(mask_folder, os.path.basename(
                mask_writers.output_path(options.output_folder, os.path.basename(os.path.normpath(path)))))
            inputs.setdefault(_path_key(truth, folders), (truth, "the ground-truth mask"))
    written = {}
    for path in paths:
        for output in runner.output_paths(path, options):
            key = _path_key(output, folders)
            if key in inputs:
                other, what = inputs[key]
                raise ValueError(f"{output}: an output of {path} would replace {what} {other}")
            if written.setdefault(key, path) != path:
                raise ValueError(f"{output}: both {written[key]} and {path} would write it (file names are "
                                 f"compared ignoring case)")


def write_objects_summary(paths, options):
    """objects_summary.csv from the object tables of the listed images that exist: each job-array
    part rewrites it whole, and the last to finish leaves it complete."""
    table_paths = [path for path in (os.path.join(options.output_folder, tables.table_name(os.path.basename(
        os.path.normpath(image)))) for image in paths) if os.path.isfile(path)]
    tables.write_summary(os.path.join(options.output_folder, tables.SUMMARY_FILE), table_paths)


def make_folders(options):
    """The output and overlay folders, created if missing; ValueError (one line) if one cannot be."""
    for folder, what in ((options.output_folder, "output"), (options.overlay_folder, "overlay")):
        try:
            if folder is not None:
                os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{folder}: cannot create the {what} folder ({errors.gist(error)})") from None


def _read_mask_stack(path):
    """A stack's mask as stored (its axes, C left out), for scoring plane against plane."""
    with image_axes.TiffStack(path) as stack:
        return stack.read()


def score_mask(predicted_path, mask_folder, number_classes, planes=1):
    """Confusion matrix of a written mask (of `planes` planes) against the ground truth of the same file name."""
    truth_path = os.path.join(mask_folder, os.path.basename(predicted_path))
    read = image_files.read_image if planes == 1 else _read_mask_stack
    truth = read(truth_path)
    predicted = read(predicted_path)
    if truth.shape != predicted.shape:
        sizes = "x".join(str(size) for size in reversed(truth.shape))
        raise ValueError(f"{truth_path}: ground truth is {sizes}, "
                         f"the mask {'x'.join(str(size) for size in reversed(predicted.shape))}")
    try:
        return segmentation_metrics.confusion_matrix(truth, predicted, number_classes)
    except ValueError as error:
        raise ValueError(f"{truth_path}: {error}") from None


def scored(result, output_folder, mask_folder, number_classes):
    """The result with its mask's confusion matrix, or with the error that kept it from being scored."""
    try:
        written = mask_writers.output_path(output_folder, os.path.basename(result.path))
        return dataclasses.replace(result, confusion=score_mask(written, mask_folder, number_classes, result.planes))
    except Exception as error:  # a bad ground truth fails its image, not the others
        return dataclasses.replace(result, error=error)


def scores_line(confusion):
    accuracy, iou, mean_iou = segmentation_metrics.segmentation_metrics(confusion)
    iou_text = " ".join(f"{value:.4f}" for value in iou)
    return (f"scores against the ground truth: pixel accuracy {accuracy:.4f} mean IoU {mean_iou:.4f} "
            f"IoU per class [{iou_text}]")


class Segmenter:
    """An FC-DenseNet SavedModel set up for inference: its runtime, devices, tiles and batches.

    engine: "auto" (OpenVINO where TensorFlow sees one device, a CPU, and openvino is installed),
    "openvino" or "tensorflow". tile_size: tiles hold at most tile_size x tile_size pixels (0: 2048,
    or 4x the model's radius when that is larger). batch_size: tiles per forward pass (0: as many as
    fit in tile_size x tile_size pixels on a GPU, in 256x256 pixels on the CPU: tiling.CPU_BATCH_PIXELS).
    tta: average the softmax over the 8 flips and quarter turns.
    streaming_megapixels: TIFF images this large are read and written tile by tile. devices:
    TensorFlow device names to spread the model over (None: every visible one). precision: "float32",
    or "int8" (OpenVINO, quantized on calibration_tiles tiles of calibration_folder, None: of the
    training database the model records, with accuracy_control where plain quantization fails the
    gate; float32 runs where the gate fails). log: where the lines the script prints go.
    """

    def __init__(self, saved_model_path, *, engine="auto", tile_size=0, batch_size=0, tta=False,
                 streaming_megapixels=64.0, devices=None, precision="float32", calibration_folder=None,
                 calibration_tiles=300, accuracy_control=True, log=print):
        engines.check_engine(engine, precision)
        if batch_size < 0:
            raise ValueError(f"--batch_size {batch_size} must be at least 1 (or 0: automatic)")
        self.saved_model_path = os.fspath(saved_model_path)
        self.engine = engine  # the engine chosen, once loaded
        self.tile_size = tile_size  # checked against the model's radius, once loaded
        self.batch_size = batch_size
        self.tta = bool(tta)
        self.streaming_megapixels = streaming_megapixels
        self.devices = devices
        self.precision = precision  # the precision run, once loaded
        self.calibration = dict(calibration_folder=calibration_folder, calibration_tiles=calibration_tiles,
                                accuracy_control=accuracy_control)
        self.log = log
        self.predict = self.metadata = None
        self.device_names = []

    def load(self):
        """Load the model unless it is loaded, and check the tile size against its radius; returns self."""
        if self.predict is None:
            predict, metadata, device_names, engine = engines.load_model(
                self.saved_model_path, self.engine, self.devices, precision=self.precision, log=self.log,
                **self.calibration)
            self.precision = getattr(predict, "precision", "float32")
            self.tile_size = tiling.check_tile_size(self.tile_size, metadata["radius"], metadata["size_factor"])
            self.predict = segmentation.dihedral_averaged(predict) if self.tta else predict
            self.metadata, self.device_names, self.engine = metadata, device_names, engine
        return self

    def segment_files(self, image_paths, output_folder=None, *, overlay_folder=None, save_probabilities=False,
                      measure_objects=False, label_name=ome_zarr_io.DEFAULT_LABEL_NAME, mask_folder=None, skip_existing=False,
                      num_parts=1, part_id=0, split_image=False, progress=False, channel_axis="auto", series=0):
        """Segment image files (tif, png, jpg) and OME-Zarr images (.zarr folders); returns an ImageResult
        per image segmented, in order.

        output_folder: masks under the images' file names (jpg images get png masks); zarr images
        without one get their NGFF label image `labels/<label_name>` inside. overlay_folder: a QC
        picture <stem>.png per image. save_probabilities: <stem>_probabilities.tif beside each mask.
        measure_objects: <stem>_objects.csv beside each mask and objects_summary.csv over every table
        of the images listed (those of other job-array parts included).
        mask_folder: ground-truth masks to score the masks against (each result's confusion matrix,
        and a scores line). skip_existing: leave the images whose outputs all exist. num_parts,
        part_id: segment every num_parts-th image from part_id (None: from a SLURM job array).
        split_image: every part takes its share of the chunk rows of every image instead (OME-Zarr
        images only); the part that completes an image's label writes its pyramid and metadata.
        progress: a bar on a terminal, else a line per image. channel_axis, series: how TIFF files are
        read (image_axes): "auto" (the file's axes), "none" or the index of the channel axis; the
        series segmented. A stack is segmented plane by plane into one mask of its axes less C.
        """
        options = RunnerOptions(tile_size=self.tile_size, output_folder=output_folder, batch_size=self.batch_size,
                                streaming_megapixels=self.streaming_megapixels, label_name=label_name,
                                save_probabilities=bool(save_probabilities), overlay_folder=overlay_folder,
                                measure_objects=bool(measure_objects),
                                channel_axis=image_axes.parse_channel_axis(channel_axis), series=int(series))
        if options.series < 0:
            raise ValueError(f"--series {series} must be at least 0")
        if isinstance(image_paths, (str, os.PathLike)):
            raise ValueError(f"{os.fspath(image_paths)}: give a list of image paths (image_paths(folder, format) "
                             f"lists a folder's)")
        paths = [os.fspath(path) for path in image_paths]
        check_outputs(paths, options, mask_folder)
        if split_image:
            check_split(paths, options)
        num_parts, part_id = job_array_part(num_parts, part_id)
        mine = self._share(paths, num_parts, part_id, skip_existing, options, split_image)
        self.load()
        options = dataclasses.replace(options, tile_size=self.tile_size,
                                      batch_pixels=tiling.automatic_batch_pixels(self.engine, self.device_names))
        make_folders(options)
        self._log_setup(options)
        started = time.perf_counter()
        split = (num_parts, part_id, skip_existing) if split_image else None
        results = self._run(mine, options, mask_folder, progress, split)
        self._log_summary(results, time.perf_counter() - started, mask_folder)
        if options.measure_objects:
            write_objects_summary(paths, options)
        return results

    def _share(self, paths, num_parts, part_id, skip_existing, options, split_image=False):
        """This part's share of the paths (all of them when each image is split), less those whose
        outputs exist when they are to be skipped."""
        mine = paths if split_image else paths[part_id::num_parts]
        if split_image:
            self.log(f"part {part_id} of {num_parts}: its share of the chunk rows of {len(paths)} image(s)")
        elif num_parts > 1:
            self.log(f"part {part_id} of {num_parts}: {len(mine)} of {len(paths)} image(s)")
        if not skip_existing:
            return mine
        todo = [path for path in mine
                if not all(os.path.exists(output) for output in runner.output_paths(path, options))]
        if len(todo) < len(mine):
            self.log(f"skipping {len(mine) - len(todo)} image(s) whose outputs exist")
        return todo

    def _log_setup(self, options):
        """The start line (and a note when outline colours repeat)."""
        metadata, names = self.metadata, self.device_names
        extras = "; test-time augmentation: 8 flips and turns" if self.tta else ""
        devices = f"; {len(names)} devices ({', '.join(names)})" if len(names) > 1 else ""
        self.log(f"{metadata['variant']}: {metadata['number_channels']} channel(s), {metadata['number_classes']} "
                 f"classes, radius {metadata['radius']}; tiles of at most {self.tile_size}x{self.tile_size} "
                 f"pixels, {self.batch_size or 'automatic'} per batch{devices}{extras}; engine {self.engine}"
                 f"{' int8' if self.precision == 'int8' else ''}")
        if options.overlay_folder is not None and qc_pictures.colours_cycle(metadata["number_classes"]):
            self.log(f"note: {metadata['number_classes'] - 1} classes but {len(qc_pictures.PALETTE)} outline "
                     f"colours: the colours repeat")

    def _results(self, paths, options, split):
        """The runner's results, or with `split` (num_parts, part_id, skip_existing) each part's."""
        if split is None:
            return runner.segment_images(paths, self.predict, self.metadata, options, len(self.device_names))
        settings = split_image.run_settings(self.saved_model_path, self.engine, self.tile_size, self.batch_size,
                                            self.tta)
        return split_image.segment_parts(paths, self.predict, self.metadata, options, settings, *split, log=self.log)

    def _run(self, paths, options, mask_folder, progress, split=None):
        """The result for every path, scored against the ground truth when there is one."""
        number_classes = self.metadata["number_classes"]
        shown = Progress(len(paths), sys.stdout.isatty()) if progress else None
        results = []
        try:
            for result in self._results(paths, options, split):
                if result.error is None and mask_folder is not None:
                    result = scored(result, options.output_folder, mask_folder, number_classes)
                results.append(result)
                if shown is not None and result.error is not None:
                    shown.image_failed(result.failure)
                elif shown is not None:
                    shown.image_done(result)
        finally:
            if shown is not None:
                shown.close()
        return results

    def _log_summary(self, results, seconds, mask_folder):
        done = [result for result in results if result.error is None]
        megapixels = sum(result.megapixels for result in done)
        self.log(f"done: {len(done)} image(s) segmented, {len(results) - len(done)} failed, "
                 f"{megapixels:.1f} Mpx in {seconds:.1f} s ({megapixels / max(seconds, 1e-9):.2f} Mpx/s)")
        if mask_folder is not None:
            number_classes = self.metadata["number_classes"]
            confusion = sum((result.confusion for result in done),
                            np.zeros((number_classes, number_classes), dtype=np.int64))
            self.log(scores_line(confusion))
