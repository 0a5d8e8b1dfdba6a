"""Sequence packing: samples into rows of at most `capacity` tokens, and the collator for packed rows. Pure.

A packed row concatenates whole samples. position_ids restart at 0 for each sample, which is how the
attention backends keep samples from attending to each other (with attention_mask=None and use_cache=False):
varlen (sft/train/attention.py) attends within each sample only; sdpa and eager get a block-diagonal mask over the
whole row from transformers; flash_attention_2 separates samples only in a batch of one row (see
check_packing_backend). The first label of each sample is masked,
so the last token of one sample never learns to predict the first token of the next::

    samples       A = a1 a2 a3 (labels -  a2 a3)     B = b1 b2 (labels - b2)
    row           a1 a2 a3 b1 b2 <pad> <pad>          capacity 7 (or padded to a multiple of 8)
    position_ids   0  1  2  0  1   0     1            padding is a sample of its own, never attended
    labels         -  a2 a3 -  b2  -     -            '-' = -100

Bin packing (``pack_bins``, strategy ``bfd``) is best-fit decreasing (a sample goes to the fullest row it
still fits in; open rows bucketed by free space, a bit set finds the best one), after which the rows it
left loose are re-packed by minimum bin slack (each row: the longest sample left, then the subset of the
rest that fills it most, by subset sum). It stops as soon as it reaches the Martello-Toth lower bound,
and keeps whichever packing has fewer rows. ``pack_greedy`` keeps the samples' order. All are
deterministic: equal lengths are taken in index order, and among equally full rows the oldest is filled
first.

Only ``packed_collate`` needs torch, and imports it when called: scripts/encode.py and scripts/pack.py
import this module (for PackingError and build_packed) and so never load torch, a second or more of
their start-up.
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import TYPE_CHECKING

from sft.errors import IGNORE_INDEX, UserError

if TYPE_CHECKING:
    import torch


class PackingError(UserError):
    """Samples or a model setup that cannot be packed (a sample longer than a row, a backend that mixes samples)."""


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


# Re-packing after best-fit decreasing: rows with at least this many free tokens are re-packed, one
# threshold after another until a packing reaches the lower bound. An attempt is skipped when it would
# re-pack more than REPACK_MAX_ROWS rows or more than REPACK_MAX_WORK rows x capacity (the subset sums
# cost about that), which bounds the extra time to seconds on adversarial inputs and very long rows.
REPACK_SLACK = (1, 16, 64)
REPACK_MAX_ROWS = 100_000
REPACK_MAX_WORK = 200_000_000


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices with the fewest rows we can find: best-fit decreasing, then its loose rows
    re-packed by minimum bin slack; never more rows than best-fit decreasing alone."""
    rows = pack_best_fit_decreasing(lengths, capacity)
    bound = lower_bound(lengths, capacity)
    if len(rows) <= bound:
        return rows
    free = [capacity - sum(lengths[i] for i in row) for row in rows]
    best = rows
    for slack in REPACK_SLACK:
        loose_rows = sum(1 for space in free if space >= slack)
        if loose_rows > REPACK_MAX_ROWS or loose_rows * capacity > REPACK_MAX_WORK:
            continue
        loose = [index for row, space in zip(rows, free) if space >= slack for index in row]
        candidate = [row for row, space in zip(rows, free) if space < slack] + pack_min_slack(lengths, loose, capacity)
        if len(candidate) < len(best):
            best = candidate
        if len(best) <= bound:
            break
    return best


def pack_min_slack(lengths: list[int], indices: list[int], capacity: int) -> list[list[int]]:
    """Minimum bin slack over the samples `indices`: each row takes the longest sample left, then the
    subset of the others that fills the row most (subset sum over a bit set of reachable totals, longer
    samples preferred). Samples of one length are taken in index order."""
    by_length: dict[int, list[int]] = {}
    for index in sorted(indices, key=lambda i: (lengths[i], -i)):
        by_length.setdefault(lengths[index], []).append(index)  # pop() takes the lowest index first
    distinct = sorted(by_length)
    rows = []
    while distinct:
        first = distinct[-1]
        row = [by_length[first].pop()]
        room = capacity - first
        if not by_length[first]:
            distinct.pop()
        # Reachable totals as bits; each length enters in binary chunks (1, 2, 4, ... copies), longest first.
        mask = (1 << (room + 1)) - 1
        reach, stages = 1, []
        for position in range(bisect.bisect_right(distinct, room) - 1, -1, -1):
            length = distinct[position]
            copies, chunk = min(len(by_length[length]), room // length), 1
            while copies:
                take = min(chunk, copies)
                stages.append((length, take, reach))
                reach = (reach | (reach << (take * length))) & mask
                copies -= take
                chunk *= 2
            if reach >> room & 1:
                break
        total = reach.bit_length() - 1
        for length, take, before in reversed(stages):  # walk back: a chunk is used when its total was new
            if not (before >> total) & 1:
                total -= take * length
                bucket = by_length[length]
                row += [bucket.pop() for _ in range(take)]
                if not bucket:
                    del distinct[bisect.bisect_left(distinct, length)]
        rows.append(row)
    return rows


def lower_bound(lengths: list[int], capacity: int) -> int:
    """The Martello-Toth bound L2: no packing has fewer rows. At least ceil(tokens / capacity), and more
    when long samples (over half a row) cannot share rows: for each a <= capacity / 2, samples longer
    than capacity - a take a row each, those in (capacity / 2, capacity - a] too, and samples in
    [a, capacity / 2] need rows for whatever does not fit the space those leave."""
    import numpy as np

    _check(lengths, capacity)
    if not lengths:
        return 0
    array = np.asarray(lengths, dtype=np.int64)
    counts = np.bincount(array, minlength=capacity + 1)
    count_upto = np.concatenate(([0], np.cumsum(counts)))  # count_upto[k]: samples shorter than k
    tokens_upto = np.concatenate(([0], np.cumsum(counts * np.arange(capacity + 1))))
    half = capacity // 2
    a = np.arange(1, half + 1)
    alone = len(lengths) - count_upto[capacity - a + 1]  # longer than capacity - a
    big = count_upto[capacity - a + 1] - count_upto[half + 1]  # in (capacity / 2, capacity - a]
    big_tokens = tokens_upto[capacity - a + 1] - tokens_upto[half + 1]
    small_tokens = tokens_upto[half + 1] - tokens_upto[a]  # in [a, capacity / 2]
    extra = np.maximum(0, -((big * capacity - big_tokens - small_tokens) // capacity))
    simple = -(-int(array.sum()) // capacity)
    return max(simple, int((alone + big + extra).max()) if half else simple)


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
        raise PackingError(f"a sample of {longest} tokens does not fit a row of {capacity}; encode with this sequence_length")
    if min(lengths, default=1) < 1:
        raise PackingError("packing needs samples of at least one token")


def packing_report(lengths: list[int], rows: list[list[int]], capacity: int) -> dict:
    """Rows, the lower bound ceil(tokens / capacity), the tighter bound no packing beats (`rows_at_least`,
    Martello-Toth L2) and the fill ratio tokens / (rows x capacity)."""
    tokens = sum(lengths)
    return {"samples": len(lengths), "rows": len(rows), "lower_bound": math.ceil(tokens / capacity) if tokens else 0,
            "rows_at_least": lower_bound(lengths, capacity), "fill_ratio": tokens / (len(rows) * capacity) if rows else 0.0,
            "tokens": tokens}


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
    """Stack packed rows, right-padded with a padding 'sample' (positions from 0, labels -100); no attention mask.
    ``row_tokens`` holds each row's real token count (the padding sample is not one: an MoE router loss skips it)."""
    import torch

    from sft.data.collate import pad_collate

    batch = pad_collate(rows, pad_id, pad_to_multiple_of)
    mask = batch.pop("attention_mask")
    longest = mask.shape[1]
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        position_ids[index, :length] = torch.as_tensor(row["position_ids"])
        position_ids[index, length:] = torch.arange(longest - length)
    batch["position_ids"] = position_ids
    batch["row_tokens"] = torch.tensor([len(row["input_ids"]) for row in rows], dtype=torch.long)
    return batch


PACKING_BACKENDS = ("varlen", "varlen_eager", "sdpa", "eager", "flash_attention_2")


def check_packing_backend(attn_implementation: str, use_cache: bool, rows_per_batch: int | None = None) -> None:
    """Refuse a model setup in which packed samples would attend to each other.

    transformers' flash_attention_2 finds the samples in position_ids only when a batch is one row
    (modeling_flash_attention_utils._is_packed_sequence); with more rows it attends causally across each whole
    row. So it is accepted only with rows_per_batch == 1 (the per-device batch size of packed rows); a caller that
    does not give it gets it refused."""
    if use_cache:
        raise PackingError("packing needs model.config.use_cache = False: with the cache on, transformers ignores "
                           "position_ids restarts and samples attend to each other")
    if attn_implementation not in PACKING_BACKENDS:
        raise PackingError(f"packing is not supported with attention {attn_implementation!r}; use varlen, sdpa, eager "
                           "or flash_attention_2 (flex_attention has no CPU backward and needs a block mask)")
    if attn_implementation == "flash_attention_2" and rows_per_batch != 1:
        raise PackingError("packing with flash_attention_2 needs per_device_train_batch_size 1: transformers' "
                           "flash_attention_2 separates packed samples only in a batch of one row, and with more rows "
                           "they attend to each other; use varlen (the same FlashAttention kernels through torch, "
                           "any batch size)")


def pack_dataset(lengths: list[int], capacity: int, strategy: str) -> tuple[list[list[int]], dict]:
    """Rows of sample indices for a dataset's sample lengths, and the packing report."""
    rows = pack_bins(lengths, capacity) if strategy == "bfd" else pack_greedy(lengths, capacity)
    placed = sorted(index for row in rows for index in row)
    if placed != list(range(len(lengths))):  # every sample in exactly one row: nothing lost, nothing twice
        raise AssertionError("packing lost or duplicated samples")
    return rows, packing_report(lengths, rows, capacity)


def format_packing_report(report: dict) -> str:
    tighter = ""
    if report.get("rows_at_least", 0) > report["lower_bound"]:
        tighter = f" (long samples that cannot share rows: no packing has fewer than {report['rows_at_least']:,})"
    return (f"packed {report['samples']:,} samples ({report['tokens']:,} tokens) into {report['rows']:,} rows; "
            f"lower bound {report['lower_bound']:,}{tighter}; fill ratio {report['fill_ratio']:.1%}")


def build_packed(dataset, capacity: int, strategy: str):
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
