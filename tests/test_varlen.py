"""Per-sample attention (sft/train/attention.py, attn_implementation "varlen"): the packing guarantee through real transformers
models, the exact sdpa fallback for unpacked batches, and what it refuses."""

import random

import pytest
import torch
import torch.nn.functional as F

import sft.train.attention as attention
from sft.data.collate import pad_collate
from sft.train.modeling import loss_sum
from sft.data.packing import PackingError, check_packing_backend, pack_bins, packed_collate, packed_row


def build_model(family: str, attn: str, **overrides):
    """A float64 model from a config alone: Qwen2 (q/k/v biases) or Llama (explicit head_dim), both with GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if family == "qwen2":
        config = Qwen2Config(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, use_cache=False, attn_implementation=attn,
                             **overrides)
        return Qwen2ForCausalLM(config).double()
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=1, use_cache=False, attn_implementation=attn,
                         **overrides)
    return LlamaForCausalLM(config).double()


def random_samples(seed: int, count: int, longest: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        length = rng.randint(2, longest)
        ids = [rng.randint(1, 100) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def packed_batch(samples: list[dict], capacity: int) -> dict:
    rows = pack_bins([len(s["input_ids"]) for s in samples], capacity)
    return packed_collate([packed_row([samples[i] for i in row]) for row in rows], pad_id=0, pad_to_multiple_of=8)


def loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    summed, count = loss_sum(model, batch)
    summed.backward()
    return float(summed.detach()), count, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def calls(monkeypatch):
    """Counts which path each attention call took: per-sample (segment_attention) or the sdpa fallback."""
    import transformers.integrations.sdpa_attention as sdpa_module

    counts = {"segments": 0, "sdpa": 0, "offsets": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention, "segment_attention", counting("segments", attention.segment_attention))
    monkeypatch.setattr(attention, "packed_segments", counting("offsets", attention.packed_segments))
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counting("sdpa", sdpa_module.sdpa_attention_forward))
    return counts


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("seed", [1, 2])
def test_packed_varlen_equals_unpacked(family, seed, calls):
    samples = random_samples(seed, count=11, longest=70)
    unpacked = loss_and_gradients(build_model(family, "sdpa"), pad_collate(samples, pad_id=0))
    batch = packed_batch(samples, capacity=96)
    assert batch["input_ids"].shape[0] >= 3  # several rows, each with several samples
    packed = loss_and_gradients(build_model(family, "varlen"), batch)
    assert packed[1] == unpacked[1]
    assert abs(packed[0] - unpacked[0]) <= 1e-10 * abs(unpacked[0])
    for name, gradient in unpacked[2].items():
        assert torch.allclose(packed[2][name], gradient, rtol=1e-10, atol=1e-12), name
    # Every layer took the per-sample path; the offsets were read once for the forward, not per layer.
    assert calls == {"segments": 2, "sdpa": 0, "offsets": 1}


def test_gradient_checkpointing_reuses_the_offsets(calls):
    samples = random_samples(5, count=8, longest=50)
    unpacked = loss_and_gradients(build_model("llama", "sdpa"), pad_collate(samples, pad_id=0))
    model = build_model("llama", "varlen")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    packed = loss_and_gradients(model, packed_batch(samples, capacity=64))
    assert abs(packed[0] - unpacked[0]) <= 1e-10 * abs(unpacked[0])
    for name, gradient in unpacked[2].items():
        assert torch.allclose(packed[2][name], gradient, rtol=1e-10, atol=1e-12), name
    assert calls == {"segments": 4, "sdpa": 0, "offsets": 1}  # 2 layers, each recomputed in backward


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_unpacked_batches_are_exactly_sdpa(family, calls):
    samples = random_samples(3, count=5, longest=40)
    padded = pad_collate(samples, pad_id=0)
    same_length = pad_collate([{"input_ids": s["input_ids"][:2], "labels": s["labels"][:2]} for s in samples], 0)
    for batch in (padded, same_length, {k: v for k, v in padded.items() if k != "attention_mask"}):
        reference = loss_and_gradients(build_model(family, "sdpa"), batch)
        ours = loss_and_gradients(build_model(family, "varlen"), batch)
        assert ours[0] == reference[0]  # bitwise: the same sdpa call with the same mask
        for name, gradient in reference[2].items():
            assert torch.equal(ours[2][name], gradient), name
    assert calls["segments"] == 0


def test_offsets_follow_transformers_rule():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    segments = attention.packed_segments(positions, batch_size=2, row_length=8)
    assert segments.lengths == (3, 2, 3, 8)
    assert segments.row_lengths == ((3, 2, 3), (8,))
    assert segments.cu_seqlens.tolist() == [0, 3, 5, 8, 16]
    assert segments.max_length == 8
    # A jump other than +1 starts a sample too (transformers' block mask does the same); one row is broadcast.
    assert attention.packed_segments(torch.tensor([[5, 6, 2, 3]]), 2, 4).row_lengths == ((2, 2), (2, 2))
    assert attention.packed_segments(torch.arange(8)[None], 2, 8) is None  # nothing to separate


def segment_reference(query, key, value, segments, scaling, window=None):
    """Causal attention sample by sample (key j seen from query i when i - window < j <= i), in the flat layout,
    the slow obvious way."""
    batch, heads, row_length, dim = query.shape
    flat = [attention._flat(x) for x in (query, key, value)]
    outputs, start = [], 0
    for length in segments.lengths:
        q, k, v = (x[start:start + length].transpose(0, 1) for x in flat)
        k, v = (x.repeat_interleave(heads // k.shape[0], dim=0) for x in (k, v))
        hidden = torch.ones(length, length, dtype=torch.bool).triu(1)
        if window is not None:
            hidden |= torch.ones(length, length, dtype=torch.bool).tril(-window)
        weights = (q @ k.transpose(1, 2) * scaling).masked_fill(hidden, float("-inf")).softmax(-1)
        outputs.append((weights @ v).transpose(0, 1))
        start += length
    return torch.cat(outputs).view(batch, row_length, heads, dim)


def random_qkv(heads=4, kv_heads=2, batch=3, row_length=40, dim=8):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, row_length, dim, dtype=torch.float64),
            torch.randn(batch, kv_heads, row_length, dim, dtype=torch.float64),
            torch.randn(batch, kv_heads, row_length, dim, dtype=torch.float64))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("longest", [1, 4, 15])
def test_segment_attention_matches_the_reference(longest, window):
    query, key, value = random_qkv()
    rng = random.Random(longest)
    positions = torch.tensor([sum((list(range(n)) for n in split_row(rng, 40, longest)), []) for _ in range(3)])
    segments = attention.packed_segments(positions, 3, 40)
    expected = segment_reference(query, key, value, segments, 0.3, window)
    assert torch.allclose(attention.segment_attention(query, key, value, segments, 0.3, window=window), expected,
                          atol=1e-12)


def split_row(rng, total, longest):
    lengths = []
    while total:
        lengths.append(min(total, rng.randint(1, longest)))
        total -= lengths[-1]
    return lengths


@pytest.mark.parametrize("parameters", [
    {"window_size", "enable_gqa", "scale"},  # torch >= 2.12
    {"is_causal"},  # torch 2.10: causal by flag, no GQA (key/value heads repeated), no scale
])
def test_flash_varlen_call_on_a_stand_in_kernel(parameters):
    """The CUDA path's layout, offsets, GQA and causality, with a float64 stand-in for torch's varlen_attn."""
    query, key, value = random_qkv()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1] * 5 + list(range(10))] * 3)
    segments = attention.packed_segments(positions, 3, 40)
    seen = {}

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= parameters
        left, right = kwargs.get("window_size", (-1, 0))
        assert right == 0 and kwargs.get("is_causal", True)
        seen.update(kwargs, kv_heads=k.shape[1], cu=cu_q.tolist(), max_q=max_q)
        out = []
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
            mask = attention.causal_mask(end - start, end - start, None if left < 0 else left + 1, qs.device)
            out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=kwargs.get("scale"),
                                                      enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(out)

    head_scale = query.shape[-1] ** -0.5
    output = attention.flash_varlen(query, key, value, segments, head_scale, (stand_in, parameters), torch.float64)
    assert torch.allclose(output, segment_reference(query, key, value, segments, head_scale), atol=1e-12)
    assert seen["cu"] == segments.cu_seqlens.tolist() and seen["max_q"] == 10
    assert seen["kv_heads"] == (2 if "enable_gqa" in parameters else 4)
    other_scale = attention.flash_varlen(query, key, value, segments, 0.3, (stand_in, parameters), torch.float64)
    if "scale" in parameters:
        assert torch.allclose(other_scale, segment_reference(query, key, value, segments, 0.3), atol=1e-12)
    else:
        assert other_scale is None  # falls back to per-sample SDPA
    windowed = attention.flash_varlen(query, key, value, segments, head_scale, (stand_in, parameters), torch.float64,
                                      window=3)
    if "window_size" in parameters:  # FlashAttention's (left, right) = (window - 1, 0): i - window < j <= i
        assert seen["window_size"] == (2, 0)
        assert torch.allclose(windowed, segment_reference(query, key, value, segments, head_scale, 3), atol=1e-12)
    else:
        assert windowed is None  # a kernel without window_size: per-sample SDPA with the window mask


def test_sliding_window_packed_equals_each_sample_alone():
    """Samples longer than the window: varlen's per-sample window mask gives sdpa's loss and gradients."""
    samples = [s for s in random_samples(4, count=12, longest=40) if len(s["input_ids"]) > 8][:6]
    overrides = {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}
    alone = build_model("qwen2", "sdpa", **overrides)
    alone.zero_grad(set_to_none=True)
    reference = 0.0
    for sample in samples:
        summed, _ = loss_sum(alone, pad_collate([sample], pad_id=0))
        summed.backward()
        reference += float(summed.detach())
    packed = loss_and_gradients(build_model("qwen2", "varlen", **overrides), packed_batch(samples, capacity=96))
    assert abs(packed[0] - reference) <= 1e-10 * abs(reference)
    for name, parameter in alone.named_parameters():
        assert torch.allclose(packed[2][name], parameter.grad, rtol=1e-10, atol=1e-12), name


def test_attention_dropout_runs_per_sample(calls):
    model = build_model("llama", "varlen", attention_dropout=0.5)
    batch = packed_batch(random_samples(5, count=6, longest=30), capacity=64)
    model.eval()
    evaluated = float(loss_sum(model, batch)[0].detach())
    model.train()
    torch.manual_seed(1)
    trained = float(loss_sum(model, batch)[0].detach())
    assert calls["segments"] == 4 and calls["sdpa"] == 0
    assert trained != evaluated  # dropout acted


def test_packing_accepts_varlen_and_refuses_multi_row_flash_attention_2():
    check_packing_backend("varlen", use_cache=False)
    check_packing_backend("flash_attention_2", use_cache=False, rows_per_batch=1)
    with pytest.raises(PackingError, match="per_device_train_batch_size 1"):
        check_packing_backend("flash_attention_2", use_cache=False, rows_per_batch=2)
