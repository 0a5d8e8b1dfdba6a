"""Sequence packing: samples into rows of at most `capacity` tokens, and the collator for packed rows. Pure.

A packed row concatenates whole samples. position_ids restart at 0 for each sample, which is how
transformers' attention kernels (flash_attention_2, sdpa, eager; with attention_mask=None and
use_cache=False) keep samples from attending to each other. The first label of each sample is masked,
so the last token of one sample never learns to predict the first token of the next::

    samples       A = a1 a2 a3 (labels -  a2 a3)     B = b1 b2 (labels - b2)
    row           a1 a2 a3 b1 b2 <pad> <pad>          capacity 7 (or padded to a multiple of 8)
    position_ids   0  1  2  0  1   0     1            padding is a sample of its own, never attended
    labels         -  a2 a3 -  b2  -     -            '-' = -100

Bin packing is best-fit decreasing (a sample goes to the fullest row it still fits in), with open rows
bucketed by free space and a bit set to find the best one; ``pack_greedy`` keeps the samples' order.
Both are deterministic: equal lengths are taken in index order, and among equally full rows the
oldest is filled first.
"""

from __future__ import annotations

import heapq
import math

import torch

from sft.collate import pad_collate

IGNORE_INDEX = -100


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's total length <= capacity, by best-fit decreasing.

    Open rows are kept in buckets by free space; a bit set over free-space values (a Python int) finds
    the smallest free space >= a sample's length with one shift and a lowest-set-bit. When no open row
    fits, all remaining samples of that length fill new rows capacity // length at a time, which is
    exactly what best fit would do one by one. Among equally full rows the oldest is filled first.
    """
    import numpy as np

    _check(lengths, capacity)
    if not lengths:
        return []
    array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-array, kind="stable").tolist()  # longest first, ties in index order
    buckets: list[list[int] | None] = [None] * (capacity + 1)  # free space -> heap of row ids
    nonempty = 0  # bit f set when some open row has exactly f tokens free
    rows: list[list[int]] = []
    position = 0
    total = len(order)
    while position < total:
        length = lengths[order[position]]
        end = position
        while end < total and lengths[order[end]] == length:
            end += 1
        while position < end:
            candidates = nonempty >> length
            if candidates:
                free = length + (candidates & -candidates).bit_length() - 1
                heap = buckets[free]
                row = heapq.heappop(heap)
                if not heap:
                    nonempty &= ~(1 << free)
                rows[row].append(order[position])
                position += 1
                left = free - length
                if left:
                    if not buckets[left]:
                        buckets[left] = []
                        nonempty |= 1 << left
                    heapq.heappush(buckets[left], row)
                continue
            # No open row fits: the rest of this length fill new rows, capacity // length each.
            per_row = capacity // length
            while position < end:
                take = order[position:min(end, position + per_row)]
                rows.append(take)
                position += len(take)
                free = capacity - len(take) * length
                if free:
                    if not buckets[free]:
                        buckets[free] = []
                        nonempty |= 1 << free
                    heapq.heappush(buckets[free], len(rows) - 1)
    return rows


def pack_greedy(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of consecutive samples in their original order: a new row starts when the next sample does not fit."""
    _check(lengths, capacity)
    rows: list[list[int]] = []
    used = capacity
    for index, length in enumerate(lengths):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def _check(lengths: list[int], capacity: int) -> None:
    longest = max(lengths, default=0)
    if longest > capacity:
        raise ValueError(f"a sample of {longest} tokens does not fit a row of {capacity}; encode with this sequence_length")
    if min(lengths, default=1) < 1:
        raise ValueError("packing needs samples of at least one token")


def packing_report(lengths: list[int], rows: list[list[int]], capacity: int) -> dict:
    """Rows, the lower bound ceil(tokens / capacity), and the fill ratio tokens / (rows x capacity)."""
    tokens = sum(lengths)
    return {"samples": len(lengths), "rows": len(rows), "lower_bound": math.ceil(tokens / capacity) if tokens else 0,
            "fill_ratio": tokens / (len(rows) * capacity) if rows else 0.0, "tokens": tokens}


def packed_row(samples: list[dict]) -> dict[str, list[int]]:
    """Concatenate samples: input_ids, labels (first label of each sample masked), position_ids (restart at 0)."""
    input_ids, labels, positions = [], [], []
    for sample in samples:
        ids = list(sample["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(sample["labels"][1:])
        positions += list(range(len(ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def packed_collate(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stack packed rows, right-padded with a padding 'sample' (positions from 0, labels -100); no attention mask."""
    batch = pad_collate(rows, pad_id, pad_to_multiple_of)
    mask = batch.pop("attention_mask")
    longest = mask.shape[1]
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        position_ids[index, :length] = torch.as_tensor(row["position_ids"])
        position_ids[index, length:] = torch.arange(longest - length)
    batch["position_ids"] = position_ids
    return batch


def check_packing_backend(attn_implementation: str, use_cache: bool) -> None:
    """Refuse a model setup in which packed samples would attend to each other."""
    if use_cache:
        raise ValueError("packing needs model.config.use_cache = False: with the cache on, transformers ignores "
                         "position_ids restarts and samples attend to each other")
    if attn_implementation not in ("flash_attention_2", "sdpa", "eager"):
        raise ValueError(f"packing is not supported with attention {attn_implementation!r}; use sdpa, eager or "
                         "flash_attention_2 (flex_attention has no CPU backward and needs a block mask)")


def pack_dataset(lengths: list[int], capacity: int, strategy: str = "bfd") -> tuple[list[list[int]], dict]:
    """Rows of sample indices for a dataset's sample lengths, and the packing report."""
    rows = pack_best_fit_decreasing(lengths, capacity) if strategy == "bfd" else pack_greedy(lengths, capacity)
    placed = sorted(index for row in rows for index in row)
    if placed != list(range(len(lengths))):  # every sample in exactly one row: nothing lost, nothing twice
        raise AssertionError("packing lost or duplicated samples")
    return rows, packing_report(lengths, rows, capacity)


def format_packing_report(report: dict) -> str:
    return (f"packed {report['samples']:,} samples ({report['tokens']:,} tokens) into {report['rows']:,} rows; "
            f"lower bound {report['lower_bound']:,}; fill ratio {report['fill_ratio']:.1%}")


def build_packed(dataset, capacity: int, strategy: str = "bfd"):
    """An encoded datasets.Dataset (input_ids, labels) -> a packed one (input_ids, labels, position_ids,
    num_samples, length) and the packing report."""
    import datasets

    lengths = [int(n) for n in dataset.data.table.column("input_ids").combine_chunks().value_lengths().to_numpy()] \
        if len(dataset) else []
    rows, report = pack_dataset(lengths, capacity, strategy)
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    columns = {"input_ids": [], "labels": [], "position_ids": [], "num_samples": [], "length": []}
    for row in rows:
        packed = packed_row([{"input_ids": input_ids[i], "labels": labels[i]} for i in row])
        for key in ("input_ids", "labels", "position_ids"):
            columns[key].append(packed[key])
        columns["num_samples"].append(len(row))
        columns["length"].append(len(packed["input_ids"]))
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "position_ids": datasets.Sequence(datasets.Value("int32")), "num_samples": datasets.Value("int32"),
        "length": datasets.Value("int32")})
    return datasets.Dataset.from_dict(columns, features=features), report
