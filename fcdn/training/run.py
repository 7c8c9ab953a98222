"""A training run's stages, in order, once train_fcdensenet.py has checked its flags: the strategy,
the run folder, the readers, the Trainer's epochs, and the exports. Loads TensorFlow.

    status = run_training(args, stop)   # args: train_fcdensenet.parse_args(); stop: a StopRequest
"""

import contextlib
import sys

import keras
import tensorflow as tf

from fcdn.common.errors import fail
from fcdn.common.stopping import Interrupted
from fcdn.training import fine_tuning
from fcdn.training.failures import end_after_failure, op_error_message, save_and_exit
from fcdn.training.readers import derived_seed, load_augmentation, open_readers
from fcdn.training.run_files import SAVED_MODEL_DIR
from fcdn.training.run_folder import RunFolder, export_bioimageio_package, run_settings
from fcdn.training.schedule import WARMUP_LR_DIVISOR
from fcdn.training.strategy import make_strategy, worker_info
from fcdn.training.trainer import Trainer
from imagereader import ReaderError


def run_training(args, stop):
    """Train; return the exit status. A failure ends the process with one line: a reader's failure
    or a lost worker at once (the resume point is saved and the readers are stopped by then, and
    TensorFlow's teardown would only hold the exit back, seconds to a minute)."""
    try:
        check_devices(args)
        return train(args, stop)
    except ValueError as error:
        fail(error)
    except ReaderError as error:
        fail(error, at_once=True)
    except tf.errors.OpError as error:  # a reader failure surfacing through tf.data, or a lost worker
        fail(op_error_message(error), at_once=True)
    except KeyboardInterrupt:
        sys.exit("aborted by a second Ctrl-C; the last saved resume point is kept")


def check_devices(args):
    """Raise ValueError for settings this machine's devices cannot run."""
    if args.mixed_precision and not tf.config.list_physical_devices("GPU"):
        raise ValueError("--mixed_precision 1 needs a GPU (float16 compute is slower than float32 on "
                         "the CPU, and this machine shows no GPU to TensorFlow)")


def resume_point(args, folder, settings):
    """(state, resume directory) to continue from, (None, None) for a fresh run. A finished run is
    continued only when a larger --max_epochs extends it; else its state keeps saying it finished."""
    state, resume_dir = folder.check(settings)
    if state is not None and state.get("finished"):
        extended = (args.max_epochs is not None and state["finished"].startswith("max_epochs")
                    and len(state["history"]) < args.max_epochs)
        if extended:
            state["finished"] = None
    return state, resume_dir


def print_setup(args, trainer, workers, augmentation):
    height, width, channels = trainer.train_reader.record_shape
    local = trainer.replicas // workers
    crops = f" (training on {args.crop_size}x{args.crop_size} crops)" if args.crop_size else ""
    print(f"train records: {trainer.train_reader.get_image_count()}  test records: {trainer.test_pass.examples}  "
          f"image size: {height}x{width}{crops}  channels: {channels}  classes: {args.number_classes}")
    print(f"workers: {workers}  replicas: {trainer.replicas} ({local} per worker)  "
          f"global batch: {trainer.global_batch}  readers: {args.reader_count * local} per worker  "
          f"test steps per pass: {trainer.test_pass.steps}")
    print(f"model: {trainer.model.name}  parameters: {trainer.model.count_params():,}  "
          f"dropout: {args.dropout_rate:g}  batch-norm momentum: {args.batch_norm_momentum:g}  "
          f"mixed precision: {bool(args.mixed_precision)}")
    schedule = (f"at {args.learning_rate:g}" if args.lr_schedule == "constant" else
                f"from {args.learning_rate:g} ({args.lr_schedule}) to 0 at step {trainer.rate_plan.total_steps}")
    start = args.learning_rate / WARMUP_LR_DIVISOR
    warmup = (f"rising from {start:g} to {args.learning_rate:g}" if args.warmup == "linear" else f"at {start:g}")
    print(f"epochs: warm-up {trainer.warmup_steps} steps {warmup}, "
          f"then {args.test_every_n_steps} steps {schedule}; early stopping "
          f"{args.early_stopping}; max epochs {args.max_epochs or 'no limit'}")
    average = (f"weight average (decay {args.weight_averaging_decay:g}) tested and exported"
               if args.weight_averaging else "no weight average")
    print(f"loss: {args.loss}; {average}")
    if args.use_augmentation:
        print("augmentation: " + ", ".join(f"{k}={v}" for k, v in augmentation.to_dict().items()))
    else:
        print("augmentation: off")
    sys.stdout.flush()


def start_from(trainer, source, is_chief):
    """A fresh fine-tuning run's first weights (and its weight average) are the source model's."""
    fine_tuning.load_initial_weights(trainer.model, source)
    if trainer.average is not None:
        trainer.average.restart()
    if is_chief:
        print(fine_tuning.source_line(source, trainer.args.number_classes), flush=True)


def train(args, stop):
    """The run's stages, in order; returns the exit status."""
    augmentation = load_augmentation(args)
    strategy = make_strategy(args.worker_port)
    is_chief, worker_index, workers = worker_info(strategy)
    settings = run_settings(args, augmentation)
    source = fine_tuning.describe_source(args.init_from) if args.init_from else None
    settings["init_from"] = source
    folder = RunFolder(args.output_dir, is_chief)
    state, resume_dir = resume_point(args, folder, settings)
    if state is not None and state.get("finished"):
        print(f"{args.output_dir}: this run already finished ({state['finished']}; best epoch "
              f"{state['best_epoch']}); nothing to do")
        return 0
    global_step = 0 if state is None else state["global_step"]
    if args.seed is not None:  # initial weights (multi-worker: the chief's are broadcast) and dropout
        keras.utils.set_random_seed(derived_seed(args.seed, global_step))
    folder.write_settings(settings)

    local_replicas = max(1, strategy.num_replicas_in_sync // workers)
    with contextlib.ExitStack() as cleanup, contextlib.ExitStack() as stack:
        train_reader, test_reader = open_readers(args, stack, local_replicas, worker_index, augmentation,
                                                 global_step)
        trainer = Trainer(args, strategy, folder, local_replicas, train_reader, test_reader, settings, stop)
        # the readers (on `stack`) shut down first, then their datasets can end at once
        cleanup.callback(trainer.release_input)
        if source is not None:
            fine_tuning.check_source(source, args, train_reader.get_image_size()[2])
        if is_chief:
            print_setup(args, trainer, workers, augmentation)
        if state is None:
            trainer.state = trainer.fresh_state()
            if source is not None:
                start_from(trainer, source, is_chief)
        else:
            trainer.restore(state, resume_dir)
            trainer.print(f"resuming at epoch {state['epoch']} step {state['step_in_epoch']} "
                          f"(global step {state['global_step']}, {len(state['history'])} epochs tested)")
            # drop any epoch written after the resume point
            folder.write_history(state["history"], args.number_classes)
        try:
            state = trainer.run()
        except Interrupted as interrupted:
            return save_and_exit(trainer, interrupted)
        except (ReaderError, tf.errors.OpError) as error:
            try:
                return end_after_failure(trainer, stop, error)
            except (ReaderError, tf.errors.OpError):
                # main() ends the process right after the line, without the teardown that running
                # the input dry shortens: skip it (it took seconds under load)
                cleanup.pop_all()
                raise
    best = state["history"][state["best_epoch"]]
    print(f"finished: {state['finished']}; best epoch {state['best_epoch']} test loss "
          f"{best['test_loss']:.6f} mean IoU {best['mean_iou']:.4f}; model in "
          f"{folder.file(SAVED_MODEL_DIR)}")
    if args.export_bioimageio and is_chief:
        export_bioimageio_package(args.output_dir)
    return 0
