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
Each mask is written under a temporary name and renamed when complete. TIFF and OME-Zarr images
are read by their axes: a z-stack or time series is segmented plane by plane (each plane with its
own statistics) into one mask of the image's axes less C; --channel_axis settles a file without
axes metadata (docs/inference.md, Stacks).

--precision int8 runs an 8-bit OpenVINO model quantized with NNCF on tiles of the training database
(or --calibration_folder), used only where its masks agree with float32's on 99.5% of held-out
pixels; --openvino_output writes the OpenVINO model to ship (docs/inference.md).

From Python, fcdn.inference.segmenter.Segmenter does the same with keywords. The parts, each in its
own module of fcdn/inference: segmenter.py (the options, the image list, the report), runner.py (images
prepared ahead and batched), tiling.py (the tile grid), segmentation.py (the tile loop: probabilities,
reduced to masks), mask_writers.py (writing masks); fcdn/data/image_sources.py reads the images.
"""

import functools
import sys

from fcdn.common import errors, startup
from fcdn.data import ome_zarr_io
from fcdn.inference import engines
from fcdn.inference.segmenter import Segmenter, image_paths


def add_input_flags(parser):
    group = parser.add_argument_group("the model, the images and their reading")
    group.add_argument("--saved_model_filepath", required=True,
                        help="SavedModel folder exported by train_fcdensenet.py")
    group.add_argument("--image_folder", default=None,
                        help="folder of images to segment (required unless --openvino_output alone is wanted)")
    group.add_argument("--output_folder", default=None,
                        help="folder for the masks (created if missing; must differ from --image_folder); "
                             "required but for zarr images, whose labels go inside each image when unset")
    group.add_argument("--image_format", default="tif",
                        help="extension of the images to segment (tif, png, jpg; a leading '.' is accepted), "
                             "or zarr: every OME-Zarr image (NGFF 0.4 or 0.5) in the folder")
    group.add_argument("--label_name", default=ome_zarr_io.DEFAULT_LABEL_NAME,
                        help="zarr images: the name of the NGFF label image written (labels/<name> inside "
                             "the image, replaced once the new one is complete)")
    group.add_argument("--channel_axis", default="auto",
                        help="TIFF images: which axis holds the channels. auto = the file's axes (ImageJ, "
                             "OME-TIFF, tifffile metadata; HW or HWC without them), none = no channel axis, or "
                             "an index into the stored array's axes (0, -1, ...); height and width are then "
                             "its last two other axes and any further axis is a stack of planes")
    group.add_argument("--series", type=int, default=0,
                        help="TIFF images: the series to segment (a multi-series file; its full-resolution "
                             "level when it is a pyramid)")
    group.add_argument("--mask_folder", default=None,
                        help="optional folder of ground-truth masks under the images' file names: the "
                             "masks written are scored against them (pixel accuracy, IoU per class, "
                             "mean IoU)")


def add_computation_flags(parser):
    group = parser.add_argument_group("how the model runs")
    group.add_argument("--tile_size", type=int, default=0,
                        help="tiles hold at most tile_size x tile_size pixels (squares or, where that "
                             "computes fewer pixels, rectangles of no larger area): a multiple of 32 and at "
                             "least 3x the model's radius (rounded up to 32); 0 = 2048, or 4x the radius "
                             "when that is larger")
    group.add_argument("--batch_size", type=int, default=0,
                        help="tiles per forward pass; 0 = as many as fit in tile_size x tile_size pixels "
                             "(2048x2048 by default, which fits a 16 GB GPU)")
    group.add_argument("--streaming_megapixels", type=float, default=64.0,
                        help="TIFF images with at least this many megapixels (height x width x channels) "
                             "are read and written tile by tile instead of whole")
    group.add_argument("--tta", type=int, default=0, choices=(0, 1),
                        help="1: test-time augmentation: average the softmax over the 8 flips and quarter "
                             "turns of every tile before the argmax (about 8x the time)")
    group.add_argument("--engine", choices=engines.ENGINES, default="auto",
                        help="runtime of the model: auto = OpenVINO where TensorFlow sees one device, a CPU, "
                             "and the openvino package is installed, else TensorFlow (on every device)")


def add_output_flags(parser):
    group = parser.add_argument_group("outputs beside the masks")
    group.add_argument("--save_probabilities", type=int, default=0, choices=(0, 1),
                        help="1: also write <stem>_probabilities.tif beside each mask: one uint8 channel per "
                             "class, 255 = probability 1 (TIFF images only)")
    group.add_argument("--overlay_folder", default=None,
                        help="optional folder for quality-control pictures: <stem>.png per image, the image "
                             "contrast-stretched with each class's outline in its own colour, at most 2048 "
                             "pixels on the long side")
    group.add_argument("--measure_objects", type=int, default=0, choices=(0, 1),
                        help="1: also write <stem>_objects.csv beside each mask (the objects of each class: "
                             "area, centroid, bounding box, perimeter, shape, intensity of each channel; as "
                             "measure_objects.py) and objects_summary.csv, measured from the mask as it is written")


def add_part_flags(parser):
    group = parser.add_argument_group("job arrays and requeued jobs")
    group.add_argument("--num_parts", type=int, default=None,
                        help="split the sorted image list (with --split_image 1: each image's chunk rows) into "
                             "this many parts and segment one (a job array task each); unset: "
                             "SLURM_ARRAY_TASK_COUNT under a SLURM job array, else 1")
    group.add_argument("--part_id", type=int, default=None,
                        help="the part to segment, in [0, num_parts): every num_parts-th image from this one "
                             "(with --split_image 1: its block of every image's chunk rows); unset: the task's "
                             "index within a SLURM job array, else 0")
    group.add_argument("--split_image", type=int, default=0, choices=(0, 1),
                        help="1: split every OME-Zarr image itself over the parts instead of the image list: "
                             "each part writes its block of chunk rows into the shared label, and the part "
                             "that completes the label writes its pyramid and metadata")
    group.add_argument("--skip_existing", type=int, default=0, choices=(0, 1),
                        help="1: leave images whose outputs all exist (outputs appear only when complete, so a "
                             "requeued task goes on where it stopped); with --split_image 1, also the chunk "
                             "rows already written")


def add_precision_flags(parser):
    group = parser.add_argument_group("8-bit inference (OpenVINO and NNCF)")
    group.add_argument("--precision", choices=engines.PRECISIONS, default="float32",
                        help="int8: run an 8-bit OpenVINO model quantized with NNCF (pip install nncf), made "
                             "once and cached, used only where its masks agree with float32's on at least "
                             "99.5%% of the pixels of held-out tiles (else float32 runs, and a line says so)")
    group.add_argument("--calibration_folder", default=None,
                        help="--precision int8: images (tif, png, jpg) to calibrate on; unset: the tiles of "
                             "the training database recorded in the model")
    group.add_argument("--calibration_tiles", type=int, default=300,
                        help="--precision int8: tiles (of at most 256x256 pixels) to calibrate on; a quarter "
                             "as many more are held out for the agreement check")
    group.add_argument("--accuracy_control", type=int, default=1, choices=(0, 1),
                        help="--precision int8: 1 = where plain quantization fails the agreement check, "
                             "quantize again keeping the layers that lose the most in float32 (slower: "
                             "minutes to hours for large models); 0 = use float32 at once")
    group.add_argument("--openvino_output", default=None,
                        help="also write the OpenVINO model of --precision to this folder (model.xml, "
                             "model.bin, the model's metadata and record.json with the int8 agreement), to "
                             "run with OpenVINO elsewhere; without --image_folder, only that")


def parse_args(argv=None):
    parser = errors.OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    for add_flags in (add_input_flags, add_computation_flags, add_output_flags, add_part_flags,
                      add_precision_flags):
        add_flags(parser)
    return parser.parse_args(argv)


def main(argv=None):
    startup.quiet_tensorflow()
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    calibration = dict(calibration_folder=args.calibration_folder, calibration_tiles=args.calibration_tiles,
                       accuracy_control=bool(args.accuracy_control))
    try:
        if args.image_folder is None and args.openvino_output is None:
            raise ValueError("--image_folder is required (unless --openvino_output alone is wanted)")
        if args.openvino_output is not None:
            engines.check_engine(args.engine, args.precision)
            engines.write_conversion(args.saved_model_filepath, args.openvino_output, args.precision, log=log,
                                     **calibration)
            log(f"wrote the OpenVINO model ({args.precision}) to {args.openvino_output}")
        if args.image_folder is None:
            return
        paths = image_paths(args.image_folder, args.image_format)
        segmenter = Segmenter(args.saved_model_filepath, engine=args.engine, tile_size=args.tile_size,
                              batch_size=args.batch_size, tta=args.tta, streaming_megapixels=args.streaming_megapixels,
                              precision=args.precision, log=log, **calibration)
        results = segmenter.segment_files(
            paths, args.output_folder, overlay_folder=args.overlay_folder, save_probabilities=args.save_probabilities,
            measure_objects=args.measure_objects,
            label_name=args.label_name, mask_folder=args.mask_folder, skip_existing=args.skip_existing,
            num_parts=args.num_parts, part_id=args.part_id, split_image=args.split_image, progress=True,
            channel_axis=args.channel_axis, series=args.series)
    except ValueError as error:  # a flag, the image folder or the model: one line, before any mask is written
        errors.fail(error)
    failures = [result.failure for result in results if result.error is not None]
    if failures:
        print("failed images:\n" + "\n".join(f"  {message}" for message in failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
