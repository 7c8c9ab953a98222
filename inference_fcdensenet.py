"""Segment every image in a folder with an FC-DenseNet SavedModel written by train_fcdensenet.py.

    python inference_fcdensenet.py --saved_model_filepath runs/hes/saved_model \
        --image_folder data/images --output_folder out/masks
    python inference_fcdensenet.py --saved_model_filepath runs/hes/saved_model \
        --image_folder slides --output_folder out/slides --tile_size 2048 --batch_size 1
    python inference_fcdensenet.py --saved_model_filepath runs/rgb/saved_model \
        --image_folder photos --output_folder out/photos --image_format .png

Every mask keeps its image's file name, height and width and holds one class index per pixel
(uint8, uint16 or int32: the smallest type that holds number_classes - 1). The class, channel count
and receptive-field radius come from the SavedModel's metadata.

Images are z-score normalised with whole-image statistics (as in training), reflect-padded to a
multiple of 32 and cut into tiles that each keep only their central "zone of responsibility": the
tile minus the model's radius on every side, plus the outer margin at the image border. Every kept
pixel thus saw the context it would have in one pass over the whole image. Of the tilings whose
tiles hold at most --tile_size squared pixels, the one that computes the fewest pixels is used, so
tiles may be rectangles. An image no larger than a tile runs in one pass; tiles of one image run in
batches; the radius was measured once, at export.

TIFF masks are zlib-compressed, tiled (1024x1024) when larger than one tile. TIFF images at or above
--streaming_megapixels are never loaded whole: the statistics come from a streaming pass, tiles are
read from the file (uncompressed data directly, tiled/striped data segment by segment) and the mask is
written tile by tile as a tiled BigTIFF, so images larger than memory work. png images give png
masks; jpg images give png masks of the same name stem, because a mask must be stored losslessly.
Each mask is written under a temporary name and renamed when complete.

The parts, each in its own module: tiling.py (the tile grid), image_sources.py (reading images),
segmentation.py (the tile loop: probabilities, reduced to masks), mask_writers.py (writing masks).
"""

import argparse
import os
import shutil
import sys
import time

import numpy as np

from fcdn.common import qc_pictures, segmentation_metrics
from fcdn.data import image_files, ome_zarr_io
from fcdn.inference import engines as inference_engines
from fcdn.inference import mask_writers, segmentation, tiling
from fcdn.inference import runner as inference_runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--saved_model_filepath", required=True,
                        help="SavedModel folder exported by train_fcdensenet.py")
    parser.add_argument("--image_folder", required=True, help="folder of images to segment")
    parser.add_argument("--output_folder", default=None,
                        help="folder for the masks (created if missing; must differ from --image_folder); "
                             "required but for zarr images, whose labels go inside each image when unset")
    parser.add_argument("--image_format", default="tif",
                        help="extension of the images to segment (tif, png, jpg; a leading '.' is accepted), "
                             "or zarr: every OME-Zarr image (NGFF 0.4 or 0.5) in the folder")
    parser.add_argument("--label_name", default=ome_zarr_io.DEFAULT_LABEL_NAME,
                        help="zarr images: the name of the NGFF label image written (labels/<name> inside "
                             "the image, replaced once the new one is complete)")
    parser.add_argument("--tile_size", type=int, default=0,
                        help="tiles hold at most tile_size x tile_size pixels (squares or, where that "
                             "computes fewer pixels, rectangles of no larger area): a multiple of 32 and at "
                             "least 3x the model's radius (rounded up to 32); 0 = 2048, or 4x the radius "
                             "when that is larger")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="tiles per forward pass; 0 = as many as fit in tile_size x tile_size pixels "
                             "(2048x2048 by default, which fits a 16 GB GPU)")
    parser.add_argument("--streaming_megapixels", type=float, default=64.0,
                        help="TIFF images with at least this many megapixels (height x width x channels) "
                             "are read and written tile by tile instead of whole")
    parser.add_argument("--tta", type=int, default=0, choices=(0, 1),
                        help="1: test-time augmentation: average the softmax over the 8 flips and quarter "
                             "turns of every tile before the argmax (about 8x the time)")
    parser.add_argument("--save_probabilities", type=int, default=0, choices=(0, 1),
                        help="1: also write <stem>_probabilities.tif beside each mask: one uint8 channel per "
                             "class, 255 = probability 1 (TIFF images only)")
    parser.add_argument("--overlay_folder", default=None,
                        help="optional folder for quality-control pictures: <stem>.png per image, the image "
                             "contrast-stretched with each class's outline in its own colour, at most 2048 "
                             "pixels on the long side")
    parser.add_argument("--num_parts", type=int, default=None,
                        help="split the sorted image list into this many parts and segment one (a job array "
                             "task each); unset: SLURM_ARRAY_TASK_COUNT under a SLURM job array, else 1")
    parser.add_argument("--part_id", type=int, default=None,
                        help="the part to segment, in [0, num_parts): every num_parts-th image from this one; "
                             "unset: the task's index within a SLURM job array, else 0")
    parser.add_argument("--skip_existing", type=int, default=0, choices=(0, 1),
                        help="1: leave images whose outputs all exist (outputs appear only when complete, so a "
                             "requeued task goes on where it stopped)")
    parser.add_argument("--engine", choices=inference_engines.ENGINES, default="auto",
                        help="runtime of the model: auto = OpenVINO where TensorFlow sees one device, a CPU, "
                             "and the openvino package is installed, else TensorFlow (on every device)")
    parser.add_argument("--mask_folder", default=None,
                        help="optional folder of ground-truth masks under the images' file names: the "
                             "masks written are scored against them (pixel accuracy, IoU per class, "
                             "mean IoU)")
    return parser.parse_args(argv)


def load_model(path, engine="auto"):
    """(predict, metadata, device names, engine name): OpenVINO on the CPU (see inference_engines), or a
    TensorFlow copy of the model on every visible device."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: SavedModel folder does not exist")
    from fcdn.common import devices
    from fcdn.model import saved_model

    names = devices.inference_devices()
    if engine == "openvino" or (engine == "auto" and len(names) == 1):
        predict, metadata, chosen = inference_engines.load_predictor(path, engine)
        return predict, metadata, (["CPU"] if chosen == "openvino" else names), chosen
    loaded = [saved_model.load_saved_model(path, device if len(names) > 1 else None) for device in names]
    predict = devices.DevicePool([function for function, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
    return predict, loaded[0][1], names, "tensorflow"


def score_mask(predicted_path, mask_folder, number_classes):
    """Confusion matrix of a written mask against the ground truth of the same file name."""
    truth_path = os.path.join(mask_folder, os.path.basename(predicted_path))
    truth = image_files.read_image(truth_path)
    predicted = image_files.read_image(predicted_path)
    if truth.shape != predicted.shape:
        raise ValueError(f"{truth_path}: ground truth is {truth.shape[1]}x{truth.shape[0]}, "
                         f"the image {predicted.shape[1]}x{predicted.shape[0]}")
    try:
        return segmentation_metrics.confusion_matrix(truth, predicted, number_classes)
    except ValueError as error:
        raise ValueError(f"{truth_path}: {error}") from None


def print_scores(confusion):
    accuracy, iou, mean_iou = segmentation_metrics.segmentation_metrics(confusion)
    iou_text = " ".join(f"{value:.4f}" for value in iou)
    print(f"scores against the ground truth: pixel accuracy {accuracy:.4f} mean IoU {mean_iou:.4f} "
          f"IoU per class [{iou_text}]")


def print_setup(metadata, args, device_names):
    """The start line (and a note when outline colours repeat)."""
    extras = "; test-time augmentation: 8 flips and turns" if args.tta else ""
    devices = f"; {len(device_names)} devices ({', '.join(device_names)})" if len(device_names) > 1 else ""
    print(f"{metadata['variant']}: {metadata['number_channels']} channel(s), {metadata['number_classes']} "
          f"classes, radius {metadata['radius']}; tiles of at most {args.tile_size}x{args.tile_size} pixels, "
          f"{args.batch_size or 'automatic'} per batch{devices}{extras}; engine {args.engine}", flush=True)
    if args.overlay_folder is not None and qc_pictures.colours_cycle(metadata["number_classes"]):
        print(f"note: {metadata['number_classes'] - 1} classes but {len(qc_pictures.PALETTE)} outline colours: "
              f"the colours repeat", flush=True)


def prepare(args):
    """Check the flags and list the images; exits with one line on any problem."""
    try:
        if args.image_format.lstrip(".").lower() == "zarr":
            args.image_format = "zarr"
            names = ome_zarr_io.list_zarr_images(args.image_folder)
            ome_zarr_io.check_label_name(args.label_name)
        else:
            args.image_format = image_files.normalize_extension(args.image_format)
            names = image_files.list_images(args.image_folder, args.image_format)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not names:
        sys.exit(f"error: {args.image_folder}: no .{args.image_format} images")
    check_outputs(args)
    return names


def check_outputs(args):
    """The output flags against each other and the image format; exits with one line on a problem."""
    zarr_images = args.image_format == "zarr"
    if args.output_folder is None and not zarr_images:
        sys.exit("error: --output_folder is required (only zarr images can keep their labels inside)")
    if args.mask_folder is not None and zarr_images:
        sys.exit("error: --mask_folder scores mask files: it does not apply to zarr images")
    if args.batch_size < 0:
        sys.exit(f"error: --batch_size {args.batch_size} must be at least 1 (or 0: automatic)")
    if args.mask_folder is not None and not os.path.isdir(args.mask_folder):
        sys.exit(f"error: {args.mask_folder}: mask folder does not exist")
    folders = [os.path.realpath(args.image_folder)]
    if args.output_folder is not None:
        if os.path.realpath(args.output_folder) in folders:
            sys.exit(f"error: {args.output_folder}: the output folder must differ from the image folder")
        folders.append(os.path.realpath(args.output_folder))
    if args.overlay_folder is not None and os.path.realpath(args.overlay_folder) in folders:
        sys.exit(f"error: {args.overlay_folder}: the overlay folder must differ from the output and image folders")
    if args.save_probabilities and args.image_format in ("png", "jpg", "jpeg"):
        sys.exit(f"error: --save_probabilities 1 needs tif images (probability maps are TIFFs with one channel "
                 f"per class), not .{args.image_format}")
    if args.save_probabilities and zarr_images and args.output_folder is None:
        sys.exit("error: --save_probabilities 1 with zarr images needs --output_folder (the probability maps "
                 "are TIFFs written there)")


def job_array_part(args, environment):
    """(num_parts, part_id) from the flags, else from a SLURM job array, else (1, 0)."""
    count = int(environment.get("SLURM_ARRAY_TASK_COUNT", 1))
    if "SLURM_ARRAY_TASK_ID" in environment:
        step = int(environment.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
        index = (int(environment["SLURM_ARRAY_TASK_ID"]) - int(environment.get("SLURM_ARRAY_TASK_MIN", 0))) // step
    else:
        index = 0
    num_parts = count if args.num_parts is None else args.num_parts
    part_id = index if args.part_id is None else args.part_id
    if num_parts < 1:
        raise ValueError(f"--num_parts {num_parts} must be at least 1")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part_id {part_id} must be in [0, {num_parts}) (--num_parts {num_parts})")
    return num_parts, part_id


def select_images(names, args):
    """This part's share of the sorted names, less those whose outputs exist under --skip_existing."""
    try:
        num_parts, part_id = job_array_part(args, os.environ)
    except ValueError as error:
        sys.exit(f"error: {error}")
    mine = names[part_id::num_parts]
    if num_parts > 1:
        print(f"part {part_id} of {num_parts}: {len(mine)} of {len(names)} image(s)", flush=True)
    if not args.skip_existing:
        return mine
    todo = [name for name in mine if not all(os.path.exists(path) for path in
                                             inference_runner.output_paths(name, args))]
    if len(todo) < len(mine):
        print(f"skipping {len(mine) - len(todo)} image(s) whose outputs exist", flush=True)
    return todo


class Progress:
    """A progress bar over the images on a terminal (tqdm); a line per image in a log."""

    def __init__(self, total, terminal):
        self.bar = None
        if terminal:
            from tqdm import tqdm

            # a terminal that reports no size (a pseudo-terminal of a batch system) gets 80x24
            size = shutil.get_terminal_size()
            self.bar = tqdm(total=total, unit="image", ncols=size.columns, nrows=size.lines, file=sys.stdout)

    def image_done(self, result):
        if self.bar is None:
            print(f"{os.path.basename(result.path)}: {result.height}x{result.width}, {result.tiles} tile(s), "
                  f"{result.seconds:.2f} s", flush=True)
        else:
            self.bar.update(1)

    def image_failed(self, message):
        if self.bar is None:
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            self.bar.write(f"error: {message}", file=sys.stderr)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def error_message(path, error):
    message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    return message if message.startswith(path) else f"{path}: {message}"


def segment_folder(paths, predict, metadata, args, device_count):
    """Segment the images, report each, score them; returns (failure messages, megapixels, confusion)."""
    number_classes = metadata["number_classes"]
    confusion = np.zeros((number_classes, number_classes), dtype=np.int64)
    failures, megapixels = [], 0.0
    progress = Progress(len(paths), sys.stdout.isatty())
    try:
        for result in inference_runner.segment_images(paths, predict, metadata, args, device_count):
            try:
                if result.error is not None:
                    raise result.error
                if args.mask_folder is not None:
                    written = mask_writers.output_path(args.output_folder, os.path.basename(result.path))
                    confusion += score_mask(written, args.mask_folder, number_classes)
            except Exception as error:  # one bad image must not stop the others
                failures.append(error_message(result.path, error))
                progress.image_failed(failures[-1])
                continue
            megapixels += result.height * result.width / 1e6
            progress.image_done(result)
    finally:
        progress.close()
    return failures, megapixels, confusion


def main(argv=None):
    args = parse_args(argv)
    names = select_images(prepare(args), args)
    try:
        predict, metadata, device_names, args.engine = load_model(args.saved_model_filepath, args.engine)
        args.tile_size = tiling.check_tile_size(args.tile_size, metadata["radius"], metadata["size_factor"])
    except ValueError as error:
        sys.exit(f"error: {error}")
    for folder, what in ((args.output_folder, "output"), (args.overlay_folder, "overlay")):
        try:
            if folder is not None:
                os.makedirs(folder, exist_ok=True)
        except OSError as error:
            sys.exit(f"error: {folder}: cannot create the {what} folder ({error.strerror})")
    if args.tta:
        predict = segmentation.dihedral_averaged(predict)
    print_setup(metadata, args, device_names)

    started = time.perf_counter()
    paths = [os.path.join(args.image_folder, name) for name in names]
    failures, megapixels, confusion = segment_folder(paths, predict, metadata, args, len(device_names))
    seconds = time.perf_counter() - started
    print(f"done: {len(names) - len(failures)} image(s) segmented, {len(failures)} failed, "
          f"{megapixels:.1f} Mpx in {seconds:.1f} s ({megapixels / max(seconds, 1e-9):.2f} Mpx/s)")
    if args.mask_folder is not None:
        print_scores(confusion)
    if failures:
        print("failed images:\n" + "\n".join(f"  {message}" for message in failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()