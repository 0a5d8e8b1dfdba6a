"""The micro-batches of each optimizer step, built off the training loop by DataLoader workers.

What a step trains on is a pure function of the step (sft/train/sampler.py: the order from (seed, epoch), the
slice of each process and micro-batch), so the loader has no state: a resumed run starts it at its step,
and ``dataloader_num_workers`` changes only speed. With 0 workers the training process builds each step's
batches when it needs them; with W > 0, W worker processes build the next steps (``prefetch_factor`` each)
while the current one trains, and ``time/data`` shrinks to the wait for a ready step and its copy to the
device.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch

from sft.data.collate import pad_collate, supervised_count
from sft.data.packing import packed_collate
from sft.train.sampler import Layout, epoch_order, step_micro_batches


@dataclass
class StepBatch:
    """This process's micro-batches of optimizer step ``step`` (CPU tensors), and what they hold."""

    step: int
    micro_batches: list[dict[str, torch.Tensor]]
    tokens: int
    """Non-pad tokens."""
    padded_tokens: int
    samples: int
    """Samples (a packed row counts the samples in it)."""
    target_tokens: int

    def pin_memory(self) -> "StepBatch":  # DataLoader(pin_memory=True) calls this on a GPU machine
        self.micro_batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in self.micro_batches]
        return self


def collate_rows(columns: dict, pad_id: int, pad_to_multiple_of: int) -> dict[str, torch.Tensor]:
    """A batch from a dataset slice: packed rows (position_ids restart per sample, no mask) or padded samples."""
    if "position_ids" in columns:
        rows = [{"input_ids": i, "labels": l, "position_ids": p}
                for i, l, p in zip(columns["input_ids"], columns["labels"], columns["position_ids"])]
        return packed_collate(rows, pad_id, pad_to_multiple_of)
    samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return pad_collate(samples, pad_id, pad_to_multiple_of)


class StepDataset(torch.utils.data.Dataset):
    """Item ``s`` is process ``rank``'s StepBatch of optimizer step ``s``."""

    def __init__(self, data, layout: Layout, rank: int, seed: int, steps_per_epoch: int, pad_id: int,
                 pad_to_multiple_of: int = 1):
        self.data, self.layout, self.rank, self.seed = data, layout, rank, seed
        self.steps_per_epoch, self.pad_id, self.pad_to_multiple_of = steps_per_epoch, pad_id, pad_to_multiple_of
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __getitem__(self, step: int) -> StepBatch:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # one permutation per epoch, not per step
            self._order = (epoch, epoch_order(len(self.data), self.seed, epoch))
        batches, tokens, samples = [], 0, 0
        for indices in step_micro_batches(self._order[1], in_epoch, self.rank, self.layout):
            columns = self.data[indices]
            batches.append(collate_rows(columns, self.pad_id, self.pad_to_multiple_of))
            tokens += sum(len(ids) for ids in columns["input_ids"])
            samples += sum(columns["num_samples"]) if "num_samples" in columns else len(indices)
        return StepBatch(step, batches, tokens, sum(b["input_ids"].numel() for b in batches), samples,
                         sum(supervised_count(b["labels"]) for b in batches))


def _ignore_stop_signals(_worker_id: int) -> None:
    # SIGTERM/SIGINT sent to the whole process group (Slurm, Ctrl-C) are for the training process, which
    # finishes its step and saves; a worker that died of them would end the run with an error instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_loader(dataset: StepDataset, first_step: int, end_step: int, num_workers: int) -> torch.utils.data.DataLoader:
    """StepBatches of steps first_step .. end_step - 1, in order, built by ``num_workers`` processes (0: inline)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(first_step, end_step), num_workers=num_workers,
        prefetch_factor=2 if num_workers else None, worker_init_fn=_ignore_stop_signals if num_workers else None,
        pin_memory=torch.cuda.is_available(), collate_fn=_as_is)


def _as_is(item: StepBatch) -> StepBatch:  # the batches are built in __getitem__; nothing to collate
    return item
