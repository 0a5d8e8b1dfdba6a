"""Learning-rate schedules as pure functions of the optimizer step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")


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
