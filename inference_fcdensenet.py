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
import sys
import time

import numpy as np

import image_files
import image_sources
import mask_writers
import ome_zarr_io
import pipeline
import qc_pictures
import segmentation
import segmentation_metrics
import tiling


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
    parser.add_argument("--mask_folder", default=None,
                        help="optional folder of ground-truth masks under the images' file names: the "
                             "masks written are scored against them (pixel accuracy, IoU per class, "
                             "mean IoU)")
    return parser.parse_args(argv)


def load_model(path):
    if not os.path.isdir(path):
        raise ValueError(f"{path}: SavedModel folder does not exist")
    import saved_model

    return saved_model.load_saved_model(path)


def open_image(path, args):
    """The image source of a file (or of an OME-Zarr folder)."""
    if args.image_format == "zarr":
        return ome_zarr_io.ZarrSource.open(path)
    return image_sources.open_source(path, args.streaming_megapixels)


def mask_consumer(source, name, dtype, number_classes, args):
    """The consumer of the mask's bands: a mask file, or an NGFF label image (checked here, before any work)."""
    height, width, _ = source.shape
    if args.image_format != "zarr":
        mask = mask_writers.mask_writer(args.output_folder, name)
        return lambda bands: mask.write(bands, (height, width), dtype, source.streamed, source.pixel_size)
    target = ome_zarr_io.label_target(source, args.label_name, args.output_folder)

    def write_labels(bands):
        written = ome_zarr_io.write_labels(source, bands, dtype, number_classes, args.label_name,
                                           args.output_folder)
        if written.replaced:
            print(f"note: {target}: replaced the earlier label image of that name", flush=True)

    return write_labels


def output_consumers(source, name, metadata, args):
    """What is made of one image's probabilities: (segmentation.Output, consumer of its bands) pairs."""
    height, width, _ = source.shape
    number_classes = metadata["number_classes"]
    dtype = image_files.mask_dtype(number_classes - 1)
    pairs = [(segmentation.Output(segmentation.argmax_labels, dtype),
              mask_consumer(source, name, dtype, number_classes, args))]
    if args.save_probabilities:
        probabilities = mask_writers.probabilities_writer(args.output_folder, name)
        pairs.append((segmentation.Output(segmentation.quantised_probabilities, np.uint8),
                      lambda bands: probabilities.write(bands, (height, width, number_classes), np.uint8,
                                                        source.streamed, source.pixel_size)))
    return pairs


def overlay_consumer(source, name, overlay_folder):
    """A consumer of (first row, image rows, mask rows) that writes the image's QC picture."""
    path = os.path.join(overlay_folder, os.path.splitext(name)[0] + ".png")

    def build(items):
        overlay = qc_pictures.Overlay(*source.shape)
        for start, image_rows, mask_rows in items:
            overlay.add(start, image_rows, mask_rows)
        qc_pictures.write_png(path, overlay.render())

    return build


def with_image_rows(bands, source):
    """Add (first row, the image's rows, the mask's rows) to every band, for the overlay."""
    for start, arrays in bands:
        yield arrays + [(start, source.rows(start, start + len(arrays[0])), arrays[0])]


def segment_file(path, predict, metadata, args):
    """Segment one image and write its mask (and what the flags ask for); returns (height, width, tiles)."""
    name = os.path.basename(os.path.normpath(path))
    with open_image(path, args) as source:
        height, width, channels = source.shape
        if channels != metadata["number_channels"]:
            raise image_files.ImageFileError(
                f"{path}: image has {channels} channel(s), the model expects {metadata['number_channels']}")
        grid = tiling.tile_grid(height, width, args.tile_size, metadata["radius"], metadata["size_factor"])
        outputs, consumers = zip(*output_consumers(source, name, metadata, args))
        mean, std = source.statistics()
        batch_size = tiling.tiles_per_batch(args.batch_size, grid.tile_shape, args.tile_size)
        tiles = segmentation.tile_probabilities(source, grid, predict, mean, std, batch_size)
        bands = segmentation.assemble_bands(tiles, grid, width, outputs)
        if args.overlay_folder is None:
            items = (arrays for _, arrays in bands)
        else:
            items = with_image_rows(bands, source)
            consumers += (overlay_consumer(source, name, args.overlay_folder),)
        pipeline.fan_out(items, consumers)
        return height, width, grid.tile_count


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


def print_setup(metadata, args):
    """The start line (and a note when outline colours repeat)."""
    extras = "; test-time augmentation: 8 flips and turns" if args.tta else ""
    print(f"{metadata['variant']}: {metadata['number_channels']} channel(s), {metadata['number_classes']} "
          f"classes, radius {metadata['radius']}; tiles of at most {args.tile_size}x{args.tile_size} pixels, "
          f"{args.batch_size or 'automatic'} per batch{extras}", flush=True)
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


def main(argv=None):
    args = parse_args(argv)
    names = prepare(args)
    try:
        predict, metadata = load_model(args.saved_model_filepath)
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
    print_setup(metadata, args)

    number_classes = metadata["number_classes"]
    confusion = np.zeros((number_classes, number_classes), dtype=np.int64)
    failures, megapixels, started = [], 0.0, time.perf_counter()
    for name in names:
        path = os.path.join(args.image_folder, name)
        image_started = time.perf_counter()
        try:
            height, width, tiles = segment_file(path, predict, metadata, args)
            if args.mask_folder is not None:
                written = mask_writers.output_path(args.output_folder, name)
                confusion += score_mask(written, args.mask_folder, number_classes)
        except Exception as error:  # one bad image must not stop the others
            message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            message = message if message.startswith(path) else f"{path}: {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)
            failures.append(message)
            continue
        megapixels += height * width / 1e6
        print(f"{name}: {height}x{width}, {tiles} tile(s), {time.perf_counter() - image_started:.2f} s",
              flush=True)

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