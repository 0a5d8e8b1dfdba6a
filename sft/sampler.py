"""Data order as a pure function of (seed, epoch), and which samples each rank takes at each step.

Resuming needs only (epoch, step within the epoch): the order is recomputed, never replayed.
For optimizer step s, the global batch is order[s*G : (s+1)*G] with G = world * micro_batch * accumulation;
micro-batch m of rank r is its slice [(m*world + r)*micro_batch : +micro_batch]::

    order   a b c d e f g h | i j k l ...     G = 8 (world 2, micro 2, accumulation 2)
    step 0  m0: r0 a b  r1 c d   m1: r0 e f  r1 g h
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """A permutation of range(num_samples) that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, world: int, micro_batch: int, accumulation: int) -> int:
    """Whole optimizer steps in an epoch; the remainder (< one global batch) waits for the next epoch's order."""
    return num_samples // (world * micro_batch * accumulation)


def step_micro_batches(order: np.ndarray, step: int, rank: int, world: int, micro_batch: int,
                       accumulation: int) -> list[list[int]]:
    """Sample indices of each micro-batch that ``rank`` runs in optimizer step ``step`` of this epoch."""
    global_batch = world * micro_batch * accumulation
    window = order[step * global_batch:(step + 1) * global_batch]
    batches = []
    for micro in range(accumulation):
        start = (micro * world + rank) * micro_batch
        batches.append([int(i) for i in window[start:start + micro_batch]])
    return batches


def eval_shard(num_samples: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's validation batches: every sample exactly once across ranks, nothing dropped or repeated."""
    mine = list(range(rank, num_samples, world))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
