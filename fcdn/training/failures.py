"""How a training run ends when something stops it: a stop signal, a reader worker's failure, or the
loss of another worker. Each ends in one line, and the resume point is saved whenever it can be.

    except Interrupted as interrupted:
        return save_and_exit(trainer, interrupted)
    except (ReaderError, tf.errors.OpError) as error:
        return end_after_failure(trainer, stop, error)
"""

import re
import time

import tensorflow as tf

from fcdn.common.errors import gist
from fcdn.common.stopping import Interrupted
from imagereader import ReaderError

RESUME_ON_EVERY_NODE = "the last resume point is kept, run the same command on every node to continue"


def op_error_message(error):
    """The one-line gist of a TensorFlow error: a reader's failure surfacing through tf.data (the
    reader's own message), or the loss of another worker of a multi-worker run."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if "ReaderError" in line:
            return line.split("ReaderError:", 1)[-1].strip()
    if "stopped sending heartbeats" in text:
        lost = sorted(set(re.findall(r"/job:worker/replica:\d+/task:(\d+)", text)), key=int)
        who = f"worker {', '.join(lost)}" if lost else "another worker"
        return f"{who} of this run stopped (its log says why); {RESUME_ON_EVERY_NODE}"
    if "Collective" in text:  # a worker that left mid-step, or one already in another all-reduce
        return (f"an all-reduce with the other workers failed: one of them stopped (its log says why); "
                f"{RESUME_ON_EVERY_NODE}")
    return gist(error)


def save_and_exit(trainer, interrupted, note=""):
    """Save the resume point after a stop signal; return the exit status, 128 + the signal number."""
    trainer.save_resume()
    state = trainer.state
    print(f"received {interrupted}: saved a resume point at epoch {state['epoch']} step "
          f"{state['step_in_epoch']}{note}; run the same command to continue", flush=True)
    return interrupted.exit_status


def end_after_failure(trainer, stop, error):
    """The run failed with a ReaderError or a TensorFlow error: return the exit status if a stop
    signal caused it, else raise it as one line (after saving the resume point if a reader failed)."""
    time.sleep(0.5)  # a signal that also ended the reader workers may not be handled yet
    if stop.requested:
        # the signal also reached the reader processes and ended them mid-step: the step was
        # not applied, so the last completed step is a consistent resume point
        return save_and_exit(trainer, Interrupted(stop.signal_number),
                             f" (the readers stopped: {op_error_message(error)})")
    if trainer.reader_failure() is None:
        raise error
    save_after_reader_failure(trainer)


def save_after_reader_failure(trainer):
    """A reader worker died or failed: save the last completed step (alone: with other workers the
    save would be collective, so the last resume point stands), raise its error as one line."""
    failure = trainer.reader_failure()
    if trainer.workers > 1:
        # saving is collective, and the other workers are already in the next step: it could only
        # fail, after a wait; they stop when this worker leaves
        raise ReaderError(f"{failure}; the other workers stop with this one; {RESUME_ON_EVERY_NODE}") from None
    try:
        trainer.save_resume()
    except (OSError, tf.errors.OpError) as error:
        raise ReaderError(f"{failure}; could not save a resume point ({op_error_message(error)}), "
                          f"the previous one is kept") from None
    state = trainer.state
    advice = ", run the same command to continue" if failure.died else ""
    raise ReaderError(f"{failure}; saved a resume point at epoch {state['epoch']} step "
                      f"{state['step_in_epoch']}{advice}") from None
