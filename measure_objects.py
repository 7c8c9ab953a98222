"""Count and measure the objects of a folder of masks: one table per mask, one summary per folder.

    python measure_objects.py --mask_folder runs/quickstart/masks --output_folder runs/quickstart/objects
    python measure_objects.py --mask_folder data/masks --image_folder data/images --output_folder objects
    fcdensenet-measure-objects --mask_folder slides/ --output_folder tables/ --streaming_megapixels 16

Objects are the 8-connected components of each foreground class (every nonzero value). Each mask
gets `<stem>_objects.csv`: object_id, class, area_pixels, centroid, bounding box, perimeter,
equivalent diameter, eccentricity; with --image_folder the mean, min and max intensity of every
channel of the image of the same name; in micrometres too where the mask's file gives its pixel
size (TIFF resolution, ImageJ unit, OME PhysicalSize, NGFF scale). `objects_summary.csv` counts the
objects of each class in each mask with their total and mean area. A stack (z, t) is measured
plane by plane, its rows led by the plane's index. Masks of at least
--streaming_megapixels are measured band by band, never read whole, with the same results.
"""

import sys

from fcdn.common.errors import OneLineArgumentParser, fail, with_path
from fcdn.data.ome_zarr_io import DEFAULT_LABEL_NAME
from fcdn.measure import tables


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        description="Measure the objects (8-connected components of each class) of a folder of masks.")
    parser.add_argument("--mask_folder", required=True,
                        help="masks: .tif/.tiff/.png files written by inference or ground truth, or OME-Zarr "
                             "images (their labels/<label_name>) or NGFF label images (.zarr)")
    parser.add_argument("--output_folder", required=True,
                        help="where <stem>_objects.csv and objects_summary.csv are written")
    parser.add_argument("--image_folder", default=None,
                        help="images of the same names (any extension) for intensity columns; unset: none")
    parser.add_argument("--streaming_megapixels", type=float, default=64.0,
                        help="masks (or images) of at least this many megapixels are read band by band")
    parser.add_argument("--label_name", default=DEFAULT_LABEL_NAME,
                        help="the label image read from an OME-Zarr image's labels/ group")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.streaming_megapixels <= 0:
        fail(f"--streaming_megapixels must be positive, got {args.streaming_megapixels}", status=2)
    print(f"measuring the masks of {args.mask_folder} into {args.output_folder}"
          + (f", intensities from {args.image_folder}" if args.image_folder else ""), flush=True)
    try:
        failures = tables.measure_folder(args.mask_folder, args.output_folder, image_folder=args.image_folder,
                                         streaming_megapixels=args.streaming_megapixels,
                                         label_name=args.label_name, log=lambda line: print(line, flush=True))
    except ValueError as error:
        fail(str(error))
    except OSError as error:
        fail(with_path(error.filename or args.output_folder, error))
    if failures:
        print(f"failed masks: {len(failures)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
