"""Export an FC-DenseNet SavedModel as a BioImage Model Zoo package (model spec 0.5), for Fiji
(deepImageJ), ilastik, napari and bioimageio.core.

    python export_bioimageio.py --saved_model_filepath runs/hes/saved_model \
        --output runs/hes/model.bioimageio.zip
    python export_bioimageio.py --saved_model_filepath runs/hes/saved_model \
        --output runs/hes/model.bioimageio.zip --test_image data/images/000001.tif \
        --name "HES cell segmentation" --authors "Ada Lovelace;Alan Turing" --license MIT
    python export_bioimageio.py --saved_model_filepath runs/hes/saved_model \
        --output runs/hes/model.bioimageio.zip --weight_formats tensorflow_saved_model_bundle --run_tests 0

The package holds the model's description (rdf.yaml), TensorFlow and ONNX weights, test tensors from a
real image (--test_image, or the first record of the training run's test database), a cover, README.md
and citations; unless --run_tests 0, bioimageio.core's test_model passes on it before it is renamed
into place. fcdn/export/bioimageio.py does the work (export_package, the same from Python with
keywords) and says what each part holds. Needs the optional dependencies of requirements-bioimageio.txt.
"""


from fcdn.common import errors, startup
from fcdn.export import bioimageio
from fcdn.export.bioimageio import check_dependencies

# check_dependencies: train_fcdensenet.py checks them before a run with --export_bioimageio 1
__all__ = ["parse_args", "export_package", "main", "check_dependencies"]


def parse_args(argv=None):
    parser = errors.OneLineArgumentParser(
        description="Write a BioImage Model Zoo package (model spec 0.5) of an FC-DenseNet SavedModel.")
    parser.add_argument("--saved_model_filepath", required=True,
                        help="SavedModel directory written by train_fcdensenet.py or "
                             "fcdensenet.export_saved_model")
    parser.add_argument("--output", required=True,
                        help="package to write (a .zip; an existing package there is replaced)")
    parser.add_argument("--name", default=None,
                        help="model name shown by the tools; unset: "
                             "'FC-DenseNet <variant> <classes>-class segmentation'")
    parser.add_argument("--description", default=bioimageio.DEFAULT_DESCRIPTION, help="one-paragraph model description")
    parser.add_argument("--authors", default=None,
                        help="';'-separated author names; unset: the current user's login name")
    parser.add_argument("--license", default="CC-BY-4.0", help="SPDX license identifier of the model")
    parser.add_argument("--test_image", default=None,
                        help="image (tif/png/jpg) for the test tensors and the cover; unset: the first "
                             "record of the training run's test database")
    parser.add_argument("--class_names", default=None,
                        help="','-separated names of the output channels, one per class; "
                             "unset: class_0, class_1, ...")
    parser.add_argument("--project_url", default=None,
                        help="URL of this project, cited and linked as git_repo; unset: the git remote "
                             "'origin' of this checkout, if any; '': none")
    parser.add_argument("--weight_formats", default=",".join(bioimageio.WEIGHT_FORMATS),
                        help="','-separated weight formats to include (the TensorFlow bundle is always included)")
    parser.add_argument("--run_tests", type=int, default=1, choices=(0, 1),
                        help="1: run bioimageio.core's test_model on the package before it is renamed into place")
    return parser.parse_args(argv)


def export_package(args, log=print):
    """Write the package at args.output from this script's parsed flags; returns its path (see
    fcdn.export.bioimageio.export_package, which Python code calls with keywords)."""
    return bioimageio.export_package(
        args.saved_model_filepath, args.output, name=args.name, description=args.description, authors=args.authors,
        license=args.license, test_image=args.test_image, class_names=args.class_names,
        project_url=args.project_url, weight_formats=args.weight_formats, run_tests=bool(args.run_tests), log=log)


def main(argv=None):
    startup.quiet_tensorflow()
    args = parse_args(argv)
    try:
        export_package(args)
    except ValueError as error:  # a bad flag, model or test image, or a failed conversion or test: nothing written
        errors.fail(errors.gist(error))
    except OSError as error:  # a folder that cannot be written, a full disk
        errors.fail(f"{error.filename or args.output}: {errors.gist(error)}")


if __name__ == "__main__":
    main()
