"""Learning-rate schedules as pure functions of the optimizer step, so a resumed run needs no scheduler state.

Training further (resuming with a raised max_steps or num_train_epochs): the warmup stays what the run
started with, and the decay is re-stretched from the end of warmup to the new total, as if the run had been
planned that long. So the learning rate rises at the resumed step from the old curve's end to the new
curve's value there (the run prints both). The demo (cosine, warmup 30, peak 3e-3, floor 0), trained to 400
steps and resumed with max_steps 500::

    step    1 .. 30     31 .. 400                  401                 450       500
    lr      warmup      the 400-step decay,        3.2e-4: the 500-    8.3e-5    3e-8
                        down to 5e-8 at 400        step curve from here
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sft.config.sections import SCHEDULES


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """warmup_steps when set (> 0), else warmup_ratio of the run, rounded up."""
    if warmup_steps > 0:
        return min(warmup_steps, total_steps)
    return min(total_steps, math.ceil(warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup: int, kind: str, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup to peak, then linear/cosine decay or constant.

    >>> [lr_at(step, 10, 1.0, 2, "cosine", 0.0) for step in (0, 1, 2)]
    [0.5, 1.0, 1.0]
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    if kind == "constant" or total_steps <= warmup:
        return peak_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = peak_lr * min_lr_ratio
    if kind == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run (saved in its run state)."""

    kind: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    @classmethod
    def from_config(cls, args, total_steps: int) -> "Schedule":
        """From sft_train.training_args, for a run of ``total_steps`` optimizer steps."""
        return cls(args.lr_scheduler_type, args.learning_rate, warmup_steps_for(total_steps, args.warmup_steps,
                   args.warmup_ratio), total_steps, args.min_lr_ratio)

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps, self.kind, self.min_lr_ratio)

    def resumed_from(self, saved: "Schedule") -> "Schedule":
        """The schedule of a run resumed from one that used ``saved``: this one, with the warmup it started with."""
        return dataclasses.replace(self, warmup_steps=saved.warmup_steps)

    def changes_since(self, saved: "Schedule", step: int) -> list[str]:
        """Lines that say how this (resumed) schedule differs from ``saved`` at ``step``."""
        notes = []
        if saved.total_steps != self.total_steps:
            notes.append(f"total steps {saved.total_steps} -> {self.total_steps}: the {self.kind} decay is re-stretched "
                         f"to {self.total_steps} steps (warmup stays {self.warmup_steps}); the learning rate at step "
                         f"{step + 1} is {self.lr(step):.2e} (it was to be {saved.lr(step):.2e})")
        changed = [f"{name} {getattr(saved, name)} -> {getattr(self, name)}" for name in ("kind", "peak_lr", "min_lr_ratio")
                   if getattr(saved, name) != getattr(self, name)]
        if changed:
            notes.append("learning-rate schedule changed since the checkpoint: " + ", ".join(changed))
        return notes
