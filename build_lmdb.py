"""Turn a folder of images and a folder of masks into the train and test LMDB databases.

    # the example data: data/train-HES.lmdb (80 records) and data/test-HES.lmdb (20 records)
    python build_lmdb.py
    # your own data, a repeatable split, 512x512 tiles
    python build_lmdb.py --image_folder my/images --mask_folder my/masks --output_folder my/ \
        --dataset_name cells --seed 7 --use_tiling 1 --tile_size 512
    # png files, 70% train, four worker processes
    python build_lmdb.py --image_format .png --train_fraction 0.7 --workers 4

The records and keys are the reference's (fcdn/data/records.py), so databases built here load in
the NIST reference tool and the other way round. Both databases replace earlier ones only once both
are complete, so an interrupted or failed build leaves earlier databases untouched
(fcdn/data/lmdb_builder.py).
"""

import signal
import sys

from fcdn.common.errors import OneLineArgumentParser, fail
from fcdn.common.stopping import Interrupted, StopRequest
from fcdn.data import image_axes
from fcdn.data.lmdb_builder import build
from fcdn.data.record_encoding import Reading


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        description="Convert a folder of images and a folder of masks (same file names) into "
        "train-{dataset_name}.lmdb and test-{dataset_name}.lmdb for training. Images smaller than "
        "the tile (or, without tiling, than 32 pixels) are reflect-padded at the bottom/right up to "
        "that size, and listed in a note.",
    )
    parser.add_argument("--image_folder", default="data/images", help="folder holding the images")
    parser.add_argument("--mask_folder", default="data/masks",
                        help="folder holding the masks; its file names decide which images are used")
    parser.add_argument("--output_folder", default="data/", help="folder to write the two databases into")
    parser.add_argument("--dataset_name", default="HES", help="databases are named train-NAME.lmdb, test-NAME.lmdb")
    parser.add_argument("--train_fraction", type=float, default=0.8,
                        help="fraction of the files that go to the train database, in (0, 1)")
    parser.add_argument("--image_format", default="tif",
                        help="file extension of images and masks: tif, png or jpg (a leading '.' is accepted)")
    parser.add_argument("--use_tiling", type=int, choices=(0, 1), default=0,
                        help="1: cut every image into overlapping tile_size x tile_size tiles; "
                        "0: one record per image, centre-cropped to a multiple of 32")
    parser.add_argument("--tile_size", type=int, default=512,
                        help="tile height and width with --use_tiling 1 (a positive multiple of 32); "
                        "smaller images are reflect-padded at the bottom/right to one tile")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the train/test shuffle; without it one is drawn and printed")
    parser.add_argument("--channel_axis", default="auto",
                        help="TIFF images: which axis holds the channels. auto = the file's axes (ImageJ, "
                        "OME-TIFF, tifffile metadata; HW or HWC without them), none = no channel axis, or an "
                        "index into the stored array's axes; any axis beyond height, width and channels is a "
                        "stack of planes, one record a plane (keys <stem>_z3, ...)")
    parser.add_argument("--series", type=int, default=0, help="TIFF images: the series read from each file")
    parser.add_argument("--same_mask_for_planes", type=int, choices=(0, 1), default=0,
                        help="1: each mask is one 2-D mask for every plane of its image's stack; "
                        "0: a stack's mask is a stack of the same axes and sizes")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes; None means one per core available to this process")
    return parser.parse_args(argv)


def reading(args):
    """How the files are read; ValueError (one line) for a bad --channel_axis or --series."""
    if args.series < 0:
        raise ValueError(f"--series {args.series} must be at least 0")
    return Reading(image_axes.parse_channel_axis(args.channel_axis), args.series, bool(args.same_mask_for_planes))


def main(argv=None):
    args = parse_args(argv)
    with StopRequest() as stop:
        try:
            stats = build(args.image_folder, args.mask_folder, args.output_folder, args.dataset_name,
                          args.train_fraction, args.image_format, bool(args.use_tiling), args.tile_size,
                          args.seed, args.workers, log=lambda line: print(line, flush=True), cancel=stop.event,
                          reading=reading(args))
        except ValueError as error:
            fail(str(error))
        except (Interrupted, KeyboardInterrupt):
            print("interrupted: partial databases removed, earlier databases left as they were", file=sys.stderr)
            raise SystemExit(Interrupted(stop.signal_number or signal.SIGINT).exit_status) from None
    megabytes = stats["pixel_bytes"] / 1e6
    print(f"done: {stats['records']['train']} train and {stats['records']['test']} test records, "
          f"{megabytes:.1f} MB of pixels in {stats['seconds']:.1f} s ({megabytes / stats['seconds']:.1f} MB/s)")


if __name__ == "__main__":
    main()
