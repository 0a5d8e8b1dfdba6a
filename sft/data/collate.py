"""Batches from encoded samples. Pure: lists of ints in, tensors out; no devices, no processes."""

from __future__ import annotations

import torch

from sft.errors import IGNORE_INDEX


def pad_collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id), labels (-100) and attention_mask (0) to the longest sample."""
    longest = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens that are predicted: labels shifted left by one, not -100 (what the loss averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
