"""Data order as a pure function of (seed, epoch), and which samples each rank takes at each step.

Resuming needs only (epoch, step within the epoch): the order is recomputed, never replayed.
For optimizer step s, the global batch is order[s*G : (s+1)*G] with G = world * micro_batch * accumulation;
micro-batch m of rank r is its slice [(m*world + r)*micro_batch : +micro_batch]::

    order   a b c d e f g h | i j k l ...     G = 8 (world 2, micro 2, accumulation 2)
    step 0  m0: r0 a b  r1 c d   m1: r0 e f  r1 g h

A step takes the same G samples whatever the layout, so a run resumed with another process count and the
same G continues at the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sft.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """How a global batch is split: processes x micro-batch x accumulation steps."""

    processes: int
    micro_batch: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.micro_batch * self.accumulation

    def steps_per_epoch(self, num_samples: int) -> int:
        """Whole optimizer steps in an epoch of ``num_samples``; at least one, or a ConfigError."""
        if num_samples < self.global_batch:
            raise ConfigError(f"sft_train.training_args.per_device_train_batch_size: {num_samples} training samples are "
                              f"fewer than one global batch of {self.global_batch} ({self.processes} processes x "
                              "per_device_train_batch_size x gradient_accumulation_steps)")
        return steps_per_epoch(num_samples, self.global_batch)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """A permutation of range(num_samples) that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Whole optimizer steps in an epoch; the remainder (< one global batch) waits for the next epoch's order."""
    return num_samples // global_batch


def step_micro_batches(order: np.ndarray, step: int, rank: int, layout: Layout) -> list[list[int]]:
    """Sample indices of each micro-batch that ``rank`` runs in optimizer step ``step`` of this epoch."""
    window = order[step * layout.global_batch:(step + 1) * layout.global_batch]
    batches = []
    for micro in range(layout.accumulation):
        start = (micro * layout.processes + rank) * layout.micro_batch
        batches.append([int(i) for i in window[start:start + layout.micro_batch]])
    return batches


def eval_shard(num_samples: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's validation batches: every sample exactly once across ranks, nothing dropped or repeated."""
    mine = list(range(rank, num_samples, world))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
