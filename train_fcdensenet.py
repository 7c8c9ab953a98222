"""Train an FC-DenseNet on the LMDB databases written by build_lmdb.py.

    python train_fcdensenet.py --train_database data/train-HES.lmdb --test_database data/test-HES.lmdb \
        --output_dir runs/hes
    python train_fcdensenet.py --train_database data/train-HES.lmdb --test_database data/test-HES.lmdb \
        --output_dir runs/hes67 --model FCDenseNet67 --batch_size 8 --augmentation_config augment.json
    srun python train_fcdensenet.py ...     # SLURM, one task per node: MultiWorkerMirroredStrategy

One process drives every visible GPU through MirroredStrategy (all logical CPUs when there is no GPU);
with TF_CONFIG set, or under srun with more than one task, MultiWorkerMirroredStrategy spans nodes
(examples/slurm/train_multinode.sbatch is a job script).
The first epoch is a warm-up of min(1000, test_every_n_steps) steps at learning_rate / 10 (or rising
from it to learning_rate, with --warmup linear); every later
epoch is test_every_n_steps steps at learning_rate (or on a schedule decaying to zero at max_epochs),
followed by a pass over the whole test set (of the weight average, with --weight_averaging 1).

Files in output_dir (written by the chief worker only):
    run_settings.json        the settings that define this run (a resumed run must match them)
    test_loss.csv            the test loss after every epoch, one value a line (as the reference)
    test_metrics.csv         epoch, step, test loss, pixel accuracy, mean IoU and per-class IoU
    checkpoint/ckpt*         the best model's weights (tf.train.Checkpoint, as the reference)
    saved_model/             the best model as a SavedModel (fcdn.model.saved_model.load_saved_model loads it)
    tensorboard-<time>/      TensorBoard summaries under train/ and test/
    resume/                  model + optimizer checkpoint and state.json, to continue an interrupted run

Ctrl-C or SIGTERM (SLURM preemption) ends the current step, saves resume/ and exits with status 128 +
the signal number (130 for SIGINT, 143 for SIGTERM); running the same command again continues the
run. A second Ctrl-C aborts at once (the last epoch's resume point stays valid).
"""

import os
import sys

from fcdn.common.errors import OneLineArgumentParser, fail
from fcdn.common.startup import keep_freed_memory, quiet_tensorflow
from fcdn.common.stopping import StopRequest
from fcdn.data.records import SIZE_FACTOR
from fcdn.model.variants import BN_MOMENTUM, DEFAULT_VARIANT, VARIANTS
from fcdn.training.run_files import BIOIMAGEIO_PACKAGE
from fcdn.training.schedule import DEFAULT_AVERAGE_DECAY, LOSSES, LR_SCHEDULES, WARMUPS


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        description="Train an FC-DenseNet segmentation model on LMDB databases (see build_lmdb.py).")
    add_data_flags(parser)
    add_model_flags(parser)
    add_run_flags(parser)
    add_recipe_flags(parser)
    return parser.parse_args(argv)


def add_data_flags(parser):
    """The databases, the output folder, and the reference's training settings."""
    parser.add_argument("--train_database", required=True, help="training LMDB directory")
    parser.add_argument("--test_database", required=True, help="test LMDB directory")
    parser.add_argument("--output_dir", required=True,
                        help="where checkpoints, CSVs, TensorBoard logs and the SavedModel go")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per replica and step")
    parser.add_argument("--number_classes", type=int, default=2, help="classes in the masks (0 = background)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate after warm-up")
    parser.add_argument("--test_every_n_steps", type=int, default=1000,
                        help="training steps per epoch; the test set is evaluated after each epoch")
    parser.add_argument("--balance_classes", type=int, default=0, choices=(0, 1),
                        help="1: draw training records class-balanced (pick a class, then a record with it)")
    parser.add_argument("--use_augmentation", type=int, default=1, choices=(0, 1),
                        help="1: augment training examples (see --augmentation_config)")
    parser.add_argument("--early_stopping", type=int, default=10,
                        help="stop after this many epochs without a test loss improvement > 1e-4")
    parser.add_argument("--reader_count", type=int, default=1, help="reader processes per replica")


def add_model_flags(parser):
    parser.add_argument("--model", default=DEFAULT_VARIANT, choices=sorted(VARIANTS),
                        help="FC-DenseNet variant")
    parser.add_argument("--layers_per_block", type=int, default=None,
                        help="override the variant's layers per dense block (every block); "
                             "unset: the variant's")
    parser.add_argument("--growth_rate", type=int, default=None,
                        help="override the variant's growth rate; unset: the variant's")
    parser.add_argument("--dropout_rate", type=float, default=0.2,
                        help="dropout rate of the dense layers and transitions down")
    parser.add_argument("--batch_norm_momentum", type=float, default=BN_MOMENTUM,
                        help="momentum of the BatchNormalization moving statistics, which the test passes "
                             "and the exported model normalise with: an average over about the last "
                             "1 / (1 - momentum) steps (the reference's 0.9: 10 steps)")


def add_run_flags(parser):
    parser.add_argument("--init_from", default=None,
                        help="SavedModel of a trained model to start from (fine-tuning): its weights, its "
                             "architecture (which the flags must match); a different --number_classes gets a "
                             "new classifier. Unset: random weights")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for weight initialisation, dropout and the readers; unset: random")
    parser.add_argument("--augmentation_config", default=None,
                        help="JSON file of augmentation settings (augment.AugmentationConfig fields); "
                             "unset: the reference's settings")
    parser.add_argument("--crop_size", type=int, default=0,
                        help="train on a random crop_size x crop_size window (a multiple of 32) of each "
                             "record, normalised with the whole record's statistics as at inference; "
                             "0: whole records. The test pass always uses whole records")
    parser.add_argument("--max_epochs", type=int, default=None,
                        help="stop after this many epochs (the warm-up counts); unset: no limit")
    parser.add_argument("--mixed_precision", type=int, default=0, choices=(0, 1),
                        help="1: mixed_float16 compute with loss scaling (needs a GPU)")
    parser.add_argument("--log_every_n_steps", type=int, default=100, help="steps between progress lines")
    parser.add_argument("--worker_port", type=int, default=0,
                        help="under srun with 2+ tasks: the port of each node's first worker (the next "
                             "tasks of a node take the next ports); 0: 10000 + 8 x (job ID mod 2800), so "
                             "jobs that share a node differ")
    parser.add_argument("--export_bioimageio", type=int, default=0, choices=(0, 1),
                        help=f"1: when the run finishes, also write output_dir/{BIOIMAGEIO_PACKAGE}, a BioImage "
                             "Model Zoo package of the best model (as export_bioimageio.py; needs "
                             "requirements-bioimageio.txt)")


def add_recipe_flags(parser):
    """The learning-rate schedule, the weight average and the loss (the defaults: the reference's)."""
    parser.add_argument("--lr_schedule", default="constant", choices=LR_SCHEDULES,
                        help="learning rate after the warm-up: constant (the reference's), or decaying to "
                             "zero at the end of --max_epochs (required) by a half cosine or nnU-Net's "
                             "poly (1 - t)^0.9")
    parser.add_argument("--warmup", default="constant", choices=WARMUPS,
                        help="the warm-up epoch: at learning_rate / 10 (constant, the reference's), or rising "
                             "from it in a straight line to learning_rate (linear)")
    parser.add_argument("--weight_averaging", type=int, default=0, choices=(0, 1),
                        help="1: keep an exponential moving average of the weights; the test passes score "
                             "it and the best model exported is it")
    parser.add_argument("--weight_averaging_decay", type=float, default=DEFAULT_AVERAGE_DECAY,
                        help="decay of the average, in (0, 1); the decay of update n is min(decay, "
                             "(1 + n) / (10 + n)), so a short run averages its own last ~10%% of steps")
    parser.add_argument("--loss", default="cross_entropy", choices=LOSSES,
                        help="training and test loss: cross-entropy (the reference's), or plus the soft "
                             "Dice of the foreground classes (nnU-Net's); early stopping follows it")


def check_args(args):
    """Raise ValueError for settings no run can use (before anything is started)."""
    if not 0 <= args.worker_port <= 65000:
        raise ValueError(f"--worker_port must be 0 or a port up to 65000 (a node's later tasks take the next "
                         f"ports), got {args.worker_port}")
    for name in ("batch_size", "test_every_n_steps", "reader_count", "log_every_n_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.number_classes < 2:
        raise ValueError(f"--number_classes must be >= 2, got {args.number_classes}")
    if args.early_stopping < 0:
        raise ValueError(f"--early_stopping must be >= 0, got {args.early_stopping}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max_epochs must be >= 1, got {args.max_epochs}")
    if not 0 <= args.dropout_rate < 1:
        raise ValueError(f"--dropout_rate must be in [0, 1), got {args.dropout_rate}")
    if not 0 < args.batch_norm_momentum < 1:
        raise ValueError(f"--batch_norm_momentum must be in (0, 1), got {args.batch_norm_momentum}")
    if args.crop_size < 0 or args.crop_size % SIZE_FACTOR:
        raise ValueError(f"--crop_size must be 0 or a positive multiple of {SIZE_FACTOR}, "
                         f"got {args.crop_size}")
    if args.lr_schedule != "constant" and args.max_epochs is None:
        raise ValueError(f"--lr_schedule {args.lr_schedule} needs --max_epochs (the rate decays to zero there)")
    if args.weight_averaging and not 0 < args.weight_averaging_decay < 1:
        raise ValueError(f"--weight_averaging_decay must be in (0, 1), got {args.weight_averaging_decay}")
    for name in ("layers_per_block", "growth_rate"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("train_database", "test_database"):
        path = getattr(args, name)
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such database (an LMDB directory written by build_lmdb.py)")
    if args.export_bioimageio:  # fail now rather than after the training
        from fcdn.export import bioimageio

        bioimageio.check_dependencies()


def main(argv=None):
    args = parse_args(argv)
    with StopRequest() as stop:
        try:
            check_args(args)
        except ValueError as error:
            fail(error)
        # TensorFlow's start-up takes seconds: a mistyped flag or database is answered before it
        quiet_tensorflow()
        keep_freed_memory()
        from fcdn.training.run import run_training

        sys.exit(run_training(args, stop))


if __name__ == "__main__":
    main()
