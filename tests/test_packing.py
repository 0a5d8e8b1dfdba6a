"""Packing (sft/data/packing.py): bins, layout, and the packing guarantee (packed == unpacked loss and gradients)."""

import math
import random

import pytest
import torch

from sft.data.collate import pad_collate
from sft.data.packing import (check_packing_backend, format_packing_report, lower_bound, pack_best_fit_decreasing, pack_bins,
                         pack_dataset, pack_greedy, pack_min_slack, packed_collate, packed_row, packing_report)


def naive_best_fit_decreasing(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []
    for index in order:
        candidates = [r for r in range(len(rows)) if free[r] >= lengths[index]]
        if not candidates:
            rows.append([index])
            free.append(capacity - lengths[index])
            continue
        best = min(free[r] for r in candidates)
        row = min(r for r in candidates if free[r] == best)  # the oldest of the fullest rows that fit
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def check_bins(rows, lengths, capacity):
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_is_valid_and_near_the_lower_bound(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 900) for _ in range(3000)]
    rows = pack_best_fit_decreasing(lengths, 1024)
    check_bins(rows, lengths, 1024)
    report = packing_report(lengths, rows, 1024)
    assert report["lower_bound"] == math.ceil(sum(lengths) / 1024)
    assert report["rows"] <= report["lower_bound"] * 1.03 + 1 and report["fill_ratio"] > 0.96
    assert rows == pack_best_fit_decreasing(lengths, 1024)  # deterministic


def test_best_fit_decreasing_matches_a_plain_implementation():
    rng = random.Random(1)
    for _ in range(50):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 80))]
        rows = pack_best_fit_decreasing(lengths, 64)
        reference = naive_best_fit_decreasing(lengths, 64)
        assert rows == reference


def optimal_rows(lengths, capacity):
    """Fewest rows by exhaustive search over subsets (small inputs only)."""
    n = len(lengths)
    fits = [sum(lengths[i] for i in range(n) if mask >> i & 1) <= capacity for mask in range(1 << n)]
    best = [0] + [n + 1] * ((1 << n) - 1)
    for mask in range(1, 1 << n):
        low = mask & -mask  # the row holding the lowest remaining sample
        sub = mask
        while sub:
            if sub & low and fits[sub]:
                best[mask] = min(best[mask], best[mask ^ sub] + 1)
            sub = (sub - 1) & mask
    return best[-1]


def test_lower_bound_and_packing_against_the_optimum():
    rng = random.Random(2)
    reached = best_fit_reached = 0
    for trial in range(200):
        # Half: any lengths; half: 20-45 tokens in rows of 100, where best-fit decreasing often misses.
        capacity = rng.choice([10, 16, 25]) if trial % 2 else 100
        low, high = (1, capacity) if trial % 2 else (20, 45)
        lengths = [rng.randint(low, high) for _ in range(rng.randint(1, 10))]
        best = optimal_rows(lengths, capacity)
        rows = pack_bins(lengths, capacity)
        check_bins(rows, lengths, capacity)
        assert math.ceil(sum(lengths) / capacity) <= lower_bound(lengths, capacity) <= best <= len(rows)
        reached += len(rows) == best
        best_fit_reached += len(pack_best_fit_decreasing(lengths, capacity)) == best
    assert reached >= 195 and best_fit_reached < reached  # the re-packing finds the optimum where best fit does not


def test_lower_bound_counts_samples_that_cannot_share_a_row():
    # Three samples over half a row need three rows although their tokens fit in two.
    assert math.ceil(18 / 10) == 2 and lower_bound([6, 6, 6], 10) == 3
    report = packing_report([6, 6, 6], [[0], [1], [2]], 10)
    assert report["lower_bound"] == 2 and report["rows_at_least"] == 3
    assert "no packing has fewer than 3" in format_packing_report(report)


@pytest.mark.parametrize("seed", range(3))
def test_repacking_reaches_the_lower_bound_where_best_fit_leaves_gaps(seed):
    # Many short samples of few distinct lengths (the shape of instruction data): best-fit decreasing
    # leaves rows a few tokens short that no remaining sample fits; re-packing closes them.
    rng = random.Random(seed)
    lengths = [rng.choice(range(40, 700, 7)) if rng.random() < 0.1 else rng.choice(range(40, 200, 3))
               for _ in range(5000)]
    bfd = pack_best_fit_decreasing(lengths, 1024)
    rows, report = pack_dataset(lengths, 1024, "bfd")
    check_bins(rows, lengths, 1024)
    assert len(rows) <= len(bfd) and report["rows"] == len(rows)
    assert len(rows) <= report["lower_bound"] * 1.001 + 1
    assert pack_dataset(lengths, 1024, "bfd")[0] == rows  # deterministic


def test_repacking_is_skipped_when_it_would_touch_too_many_rows(monkeypatch):
    import sft.data.packing

    rng = random.Random(0)
    lengths = [rng.choice(range(40, 200, 3)) for _ in range(2000)]
    assert len(pack_bins(lengths, 1024)) < len(pack_best_fit_decreasing(lengths, 1024))
    monkeypatch.setattr(sft.data.packing, "REPACK_MAX_ROWS", 0)
    assert pack_bins(lengths, 1024) == pack_best_fit_decreasing(lengths, 1024)


def test_min_slack_fills_rows_exactly_when_it_can():
    lengths = [5, 3, 2, 4, 6, 1, 9]
    rows = pack_min_slack(lengths, list(range(7)), 10)
    check_bins(rows, lengths, 10)
    assert [sum(lengths[i] for i in row) for row in rows] == [10, 10, 10]
    assert rows[0] == [6, 5]  # the longest first, then the subset that fills the rest
    assert pack_min_slack(lengths, [0, 2], 10) == [[0, 2]]  # only the samples it is given


def test_greedy_keeps_the_order():
    lengths = [5, 3, 4, 1, 6, 2]
    rows = pack_greedy(lengths, 8)
    assert rows == [[0, 1], [2, 3], [4, 5]]
    assert [i for row in rows for i in row] == list(range(6))


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        pack_best_fit_decreasing([3, 9], 8)


def test_layout_of_a_packed_row():
    a = {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}
    b = {"input_ids": [21, 22], "labels": [21, 22]}  # even a target first label is masked at a boundary
    row = packed_row([a, b])
    assert row == {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22], "position_ids": [0, 1, 2, 0, 1]}
    batch = packed_collate([row], pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, -100]]
    assert "attention_mask" not in batch


def test_backends_that_would_mix_samples_are_refused():
    check_packing_backend("sdpa", use_cache=False)
    with pytest.raises(ValueError, match="use_cache = False"):
        check_packing_backend("sdpa", use_cache=True)
    with pytest.raises(ValueError, match="flex_attention"):
        check_packing_backend("flex_attention", use_cache=False)


def tiny_model(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, use_cache=False, attn_implementation=attn)
    return Qwen2ForCausalLM(config).double()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(attn):
    from sft.train.modeling import loss_sum

    rng = random.Random(0)
    samples = []
    for _ in range(7):
        length = rng.randint(4, 30)
        ids = [rng.randint(1, 96) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    model = tiny_model(attn)
    unpacked, count = loss_sum(model, pad_collate(samples, pad_id=0))
    unpacked.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    rows = pack_best_fit_decreasing([len(s["input_ids"]) for s in samples], 64)
    packed, packed_count = loss_sum(model, packed_collate([packed_row([samples[i] for i in row]) for row in rows], 0))
    packed.backward()
    assert packed_count == count
    assert abs(float(packed) - float(unpacked)) < 1e-10 * max(1.0, abs(float(unpacked)))
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, reference[name], rtol=1e-9, atol=1e-12), name
