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
from fcdn.training.evaluation import early_stopping_status
from imagereader import ReaderError

RESUME_ON_EVERY_NODE = "the last resume point is kept, run the same command on every node to continue"
CHIEF_SAVES = "the chief saves a resume point of the last completed step unless it stopped too"


def op_error_message(error):
    """The one-line gist of a TensorFlow error: a reader's failure surfacing through tf.data (the
    reader's own message), or the loss of another worker of a multi-worker run."""
    lost = lost_worker(error)
    if lost is not None:
        return f"{lost}; {RESUME_ON_EVERY_NODE}"
    for line in reversed(str(error).splitlines()):
        if "ReaderError" in line:
            return line.split("ReaderError:", 1)[-1].strip()
    return gist(error)


def own_worker_task(strategy):
    """This process's task number among the cluster's `worker` tasks; None outside them."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver.task_id if resolver is not None and resolver.task_type == "worker" else None


def lost_worker(error, own_task=None):
    """Which worker of a multi-worker run stopped, in words, when `error` says one did; else None.
    The message can name the task that noticed (`own_task`, this one) beside the one lost."""
    text = str(error)
    if "stopped sending heartbeats" in text:
        named = set(re.findall(r"/job:worker/replica:\d+/task:(\d+)", text)) - {str(own_task)}
        lost = sorted(named, key=int)
        who = f"worker {', '.join(lost)}" if lost else "another worker"
        return f"{who} of this run stopped (its log says why)"
    if "Collective" in text:  # a worker that left mid-step, or one already in another all-reduce
        return "an all-reduce with the other workers failed: one of them stopped (its log says why)"
    return None


def save_and_exit(trainer, interrupted, note=""):
    """Save the resume point after a stop signal; return the exit status, 128 + the signal number."""
    trainer.save_resume()
    state = trainer.state
    print(f"received {interrupted}: saved a resume point at epoch {state['epoch']} step "
          f"{state['step_in_epoch']}{note}; run the same command to continue", flush=True)
    return interrupted.exit_status


def end_after_failure(trainer, stop, error):
    """The run failed with a ReaderError or a TensorFlow error: return the exit status if a stop
    signal caused it, else raise it as one line (after saving the resume point if a reader failed,
    or, in a multi-worker run, if any worker failed)."""
    time.sleep(0.5)  # a signal that also ended the reader workers may not be handled yet
    for writer in (trainer.writers or {}).values():  # the process ends without a teardown
        writer.flush()
    if stop.requested:
        # the signal also reached the reader processes and ended them mid-step: the step was
        # not applied, so the last completed step is a consistent resume point
        return save_and_exit(trainer, Interrupted(stop.signal_number),
                             f" (the readers stopped: {op_error_message(error)})")
    failure = trainer.reader_failure()
    if trainer.workers > 1:
        reason = failure if failure is not None else lost_worker(error, trainer.worker_task)
        if reason is None:
            raise error
        save_alone_after_failure(trainer, reason)
    if failure is None:
        raise error
    save_after_reader_failure(trainer)


def save_alone_after_failure(trainer, reason):
    """A worker of a multi-worker run failed (a reader here, or another worker): the chief saves the
    last completed step on its own, without the collective save the others can no longer join (the
    weights are the same on every worker); every worker raises `reason` as one line."""
    own = isinstance(reason, ReaderError)
    stopped = "; the other workers stop with this one" if own else ""
    # bad data (a reader's error, not its death) would stop the same command again
    advice = "" if own and not reason.died else ", run the same command on every node to continue"
    if not trainer.is_chief:
        raise ReaderError(f"{reason}{stopped}; {CHIEF_SAVES}{advice}") from None
    try:
        state = save_resume_alone(trainer)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise ReaderError(f"{reason}{stopped}; could not save a resume point ({op_error_message(error)}), "
                          f"{RESUME_ON_EVERY_NODE}") from None
    raise ReaderError(f"{reason}{stopped}; saved a resume point at epoch {state['epoch']} step "
                      f"{state['step_in_epoch']}{advice}") from None


def save_resume_alone(trainer):
    """The chief's resume point without the other workers: its own weights (every worker's), and its
    own BatchNormalization statistics, not averaged over the workers (the next test pass averages
    them again). A test pass whose epoch end the failure cut short is dropped, so that the resumed
    run repeats it. Returns the state saved."""
    state = trainer.state
    if len(state["history"]) > state["epoch"]:
        history = state["history"][:state["epoch"]]
        best_epoch, _ = early_stopping_status([entry["test_loss"] for entry in history],
                                              trainer.args.early_stopping)
        state = dict(state, history=history, best_epoch=best_epoch)
    trainer.counters.restore()
    trainer.folder.save_resume(trainer.checkpoint, state)
    return state


class StepCounters:
    """The integer counters of a multi-worker run (Adam's step count, the weight average's updates) as
    they were after the last completed training step.

    A step cut short by another worker's loss can still have advanced them here, since they do not
    wait for the gradients' all-reduce, while the weights, which do, stayed as they were: the chief's
    lone resume point puts them back to match its weights."""

    def __init__(self, modules, workers):
        variables = [variable for module in modules if module is not None for variable in module.variables]
        self.counters = [variable for variable in variables if tf.as_dtype(variable.dtype).is_integer]
        self.enabled = workers > 1
        self.values = None

    def record(self):
        if self.enabled:
            self.values = [variable.numpy() for variable in self.counters]

    def restore(self):
        for variable, value in zip(self.counters, self.values or []):
            variable.assign(value)


def save_after_reader_failure(trainer):
    """A reader worker of a single-worker run died or failed: save the last completed step, raise its
    error as one line."""
    failure = trainer.reader_failure()
    try:
        trainer.save_resume()
    except (OSError, tf.errors.OpError) as error:
        raise ReaderError(f"{failure}; could not save a resume point ({op_error_message(error)}), "
                          f"the previous one is kept") from None
    state = trainer.state
    advice = ", run the same command to continue" if failure.died else ""
    raise ReaderError(f"{failure}; saved a resume point at epoch {state['epoch']} step "
                      f"{state['step_in_epoch']}{advice}") from None
