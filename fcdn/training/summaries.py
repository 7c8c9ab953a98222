"""TensorBoard summaries of a run: tensorboard-<time>/train and /test under the run folder.

    writers = open_writers(folder, state["tensorboard_dir"])     # no-op writers on other workers
    write_scalars(writers["train"], global_step, {"loss": 0.31, "accuracy": 0.93})
"""

import os
import re

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from fcdn.training.run_folder import write_failure_reason


def open_writers(folder, directory):
    """{"train": writer, "test": writer} under folder/directory; only the chief writes summaries."""
    if not folder.is_chief:
        return {"train": tf.summary.create_noop_writer(), "test": tf.summary.create_noop_writer()}
    root = folder.file(directory)
    return {name: tf.summary.create_file_writer(os.path.join(root, name)) for name in ("train", "test")}


def write_scalars(writer, step, values):
    """Scalar summaries TensorBoard's scalars dashboard reads. tf.summary.scalar needs the
    tensorboard package, which tensorflow no longer installs; tf.summary.write with the scalars
    plugin's metadata writes the same event records without it."""
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="scalars"))
    try:
        with writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)
        writer.flush()
    except tf.errors.OpError as error:  # a full disk: the writes fail at the flush
        events = re.search(r"(\S*events\.out\.tfevents\S*?);", str(error))
        raise ValueError(f"{events.group(1) + ': ' if events else ''}cannot write the TensorBoard summaries "
                         f"({write_failure_reason(error)}); the summaries written so far are kept, free the "
                         f"space and run the same command to continue") from None
