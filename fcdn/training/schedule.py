"""The recipe's choices and the learning rate of every step: plain Python, so that the trainer checks
its flags before TensorFlow loads (fcdn.training.recipe holds the parts that need it).

    plan = rate_plan(args, warmup_steps)              # from the trainer's arguments
    rate = learning_rate_at(step, plan)               # a pure function of (global step, settings)

The learning rate depends only on the global step and the run's settings, so a resumed run gives the
step after the resume point the rate an uninterrupted run would have given it.
"""

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "cosine", "poly")
WARMUPS = ("constant", "linear")
LOSSES = ("cross_entropy", "dice_cross_entropy")
POLY_EXPONENT = 0.9  # nnU-Net's
DEFAULT_AVERAGE_DECAY = 0.999
MAX_WARMUP_STEPS = 1000
WARMUP_LR_DIVISOR = 10.0


@dataclass(frozen=True)
class RatePlan:
    """What the rate of a step depends on: the warm-up (steps, starting rate, shape), the rate after
    it, the schedule, and the steps of the run (warm-up included; needed by the decaying schedules)."""
    warmup_steps: int
    warmup_rate: float
    rate: float
    schedule: str = "constant"
    total_steps: int | None = None
    warmup: str = "constant"


def rate_plan(args, warmup_steps):
    """The learning-rate plan of a run: the warm-up epoch at learning_rate / 10, then the schedule,
    which (decaying) reaches zero at the end of epoch max_epochs - 1, the warm-up counted."""
    total_steps = None
    if args.max_epochs is not None:
        total_steps = warmup_steps + (args.max_epochs - 1) * args.test_every_n_steps
    return RatePlan(warmup_steps=warmup_steps, warmup_rate=args.learning_rate / WARMUP_LR_DIVISOR,
                    rate=args.learning_rate, schedule=args.lr_schedule, total_steps=total_steps,
                    warmup=args.warmup)


def learning_rate_at(step, plan):
    """The learning rate of global step `step` (0 is the first step of the run).

    The warm-up runs at its own rate ("constant", the reference's) or rises from it in a straight line
    towards plan.rate, which the first step after it reaches ("linear"). After it, "constant" keeps
    plan.rate and the decaying schedules go from plan.rate at the first step after the warm-up to zero at plan.total_steps
    (the step after the last): cosine 0.5 (1 + cos(pi t)), poly (1 - t) ** 0.9, t the fraction done.
    """
    if step < plan.warmup_steps:
        if plan.warmup == "linear":
            return plan.warmup_rate + (plan.rate - plan.warmup_rate) * step / plan.warmup_steps
        if plan.warmup != "constant":
            raise ValueError(f"unknown warm-up {plan.warmup!r}; choose from {', '.join(WARMUPS)}")
        return plan.warmup_rate
    if plan.schedule == "constant":
        return plan.rate
    span = plan.total_steps - plan.warmup_steps
    done = min(1.0, (step - plan.warmup_steps) / span) if span > 0 else 1.0
    if plan.schedule == "cosine":
        return plan.rate * 0.5 * (1.0 + math.cos(math.pi * done))
    if plan.schedule == "poly":
        return plan.rate * (1.0 - done) ** POLY_EXPONENT
    raise ValueError(f"unknown learning-rate schedule {plan.schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
