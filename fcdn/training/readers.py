"""The training run's readers: its augmentation, the train and test readers, and their seeds.

    augmentation = load_augmentation(args)
    train_reader, test_reader = open_readers(args, stack, local_replicas, worker_index, augmentation,
                                             global_step)
"""

import numpy as np

from augment import AugmentationConfig
from imagereader import ImageReader


def load_augmentation(args):
    if args.augmentation_config is None:
        return AugmentationConfig()
    return AugmentationConfig.from_json(args.augmentation_config)


def derived_seed(seed, *streams):
    """An independent seed for each (worker, resume step): a resumed run draws new examples and
    dropout masks instead of replaying those of the run's start."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])


def open_readers(args, stack, local_replicas, worker_index, augmentation, global_step=0):
    """Start the train and test readers (shut down by `stack` on every exit path)."""
    seed = derived_seed(args.seed, worker_index, global_step)
    train_reader = ImageReader(args.train_database, use_augmentation=bool(args.use_augmentation),
                               balance_classes=bool(args.balance_classes), shuffle=True,
                               num_workers=args.reader_count * local_replicas,
                               number_classes=args.number_classes, augmentation_config=augmentation,
                               seed=seed, crop_size=args.crop_size, name="train")
    # one ordered worker for the test set, so that a pass sees every record exactly once
    test_reader = ImageReader(args.test_database, use_augmentation=False, balance_classes=False,
                              shuffle=False, num_workers=1, number_classes=args.number_classes, seed=seed,
                              name="test")
    train_channels, test_channels = train_reader.get_image_size()[2], test_reader.get_image_size()[2]
    if train_channels != test_channels:
        raise ValueError(f"{args.test_database}: {test_channels} channel(s) but the train database "
                         f"{args.train_database} has {train_channels}")
    for reader in (train_reader, test_reader):
        stack.enter_context(reader)
    return train_reader, test_reader


def queue_text(reader):
    """' queue <ready>/<capacity>': examples waiting in the reader's output queue, when it can tell."""
    try:
        depth = reader.queue_depth()
    except (AttributeError, OSError, ValueError):  # an older reader, or one shutting down
        return ""
    if depth is None:
        return ""
    capacity = getattr(reader, "capacity", None)
    return f" queue {depth}/{capacity}" if capacity else f" queue {depth}"
