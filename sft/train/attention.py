"""Per-sample ("varlen") attention for packed rows: ``attn_implementation: varlen``.

A packed row holds whole samples whose position_ids restart at 0 (sft/data/packing.py). With sdpa or eager,
transformers turns the restarts into a block-diagonal mask over the whole row, so every layer scores and masks
row_length^2 pairs. Here each sample attends only to itself: the cost is the sum of the samples' squared
lengths, and no mask is built at all::

    row            a1 a2 a3 b1 b2 p1 p2        (p: the padding 'sample' that packed_collate appends)
    position_ids    0  1  2  0  1  0  1        a new sample wherever position_ids do not go up by one
    segments       [a1 a2 a3][b1 b2][p1 p2]    cu_seqlens 0 3 5 7 (the batch's rows laid end to end)
    sdpa, eager    one 7 x 7 masked product per row
    varlen         causal attention within 3 x 3, 2 x 2 and 2 x 2 blocks

``register()`` adds an attention function and a mask function under the name "varlen" (and "varlen_eager", the
same with the model's eager math in every layer: what a packed run that asks for eager gets) to transformers'
AttentionInterface and AttentionMaskInterface (importing this module registers them). The mask function builds
nothing when the batch has no 2D attention_mask and otherwise builds sdpa's mask, so each layer sees:

* a mask (a padded, unpacked batch) -> ``sdpa_attention_forward`` with that mask: the very call
  ``attn_implementation: sdpa`` makes, so the result is identical;
* no mask, position_ids without a restart (or none, or a KV cache) -> the same sdpa call, causal;
* no mask and restarting position_ids -> per-sample attention:
  - on CUDA in fp16/bf16 (also under autocast) without dropout, where torch has
    ``torch.nn.attention.varlen.varlen_attn`` (>= 2.10): one FlashAttention call over all samples;
  - elsewhere (CPU, float32/64, dropout): causal SDPA per sample, on views of the row.

position_ids reach the attention function as a keyword argument (model -> decoder layer -> attention ->
attention function), as for transformers' own flash_attention_2. The sample offsets are computed once per
forward, on the first layer, and reused by the others (and by gradient checkpointing's recomputation): they
are cached on the position_ids tensor object and its version counter. Grouped-query attention is handled
(enable_gqa), attention dropout too (per-sample SDPA). Model features, in both paths (packed or not):

* sliding-window layers (Mistral, Gemma 2/3, gpt-oss): key j is seen from query i when i - window < j <= i,
  transformers' rule (masking_utils.sliding_window_overlay), within each sample; the FlashAttention kernel
  takes it as window_size where this torch has it;
* attention sinks (gpt-oss) and logit soft-capping (Gemma 2): the model's own eager attention function (the
  ``eager_attention_forward`` of its modeling file, which adds the sink logit or caps the scores) runs on each
  sample with that sample's causal (and window) mask, so the math is the model's, only the mask is per sample.

Eager mode only: the offsets are Python integers read from the data.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sft.errors import UserError

VARLEN = "varlen"
VARLEN_EAGER = "varlen_eager"  # per sample, as varlen, with the model's eager math in every layer


class VarlenAttentionError(UserError):
    """A model feature that per-sample attention cannot run (an attention layer whose model has no eager function)."""


@dataclass(frozen=True)
class Segments:
    """The samples of a packed batch, over its rows laid end to end (batch x row_length tokens)."""

    lengths: tuple[int, ...]
    row_lengths: tuple[tuple[int, ...], ...]  # the same lengths, row by row (no sample crosses a row)
    cu_seqlens: torch.Tensor  # int32 offsets [0, l0, l0 + l1, ..., batch x row_length], on position_ids' device
    max_length: int


def packed_segments(position_ids: torch.Tensor, batch_size: int, row_length: int) -> Segments | None:
    """The samples marked by position_ids, or None when no row holds more than one (nothing to separate).

    A sample starts at each row's first token and wherever position_ids do not go up by one: transformers' rule
    for its block mask (masking_utils.find_packed_sequence_indices), so varlen separates exactly what sdpa does.
    """
    positions = position_ids[0] if position_ids.dim() == 3 else position_ids  # multimodal RoPE: (axes, batch, T)
    positions = positions.reshape(-1, positions.shape[-1])
    if positions.shape[-1] != row_length or positions.shape[0] not in (1, batch_size):
        return None
    starts = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    starts = starts.expand(batch_size, row_length).reshape(-1)
    offsets = starts.nonzero().squeeze(1).tolist() + [batch_size * row_length]  # the one device sync per forward
    if len(offsets) == batch_size + 1:
        return None
    lengths = tuple(end - start for start, end in zip(offsets[:-1], offsets[1:]))
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32).to(position_ids.device, non_blocking=True)
    row_lengths, first = [], 0
    for row in range(1, batch_size + 1):
        last = offsets.index(row * row_length, first)
        row_lengths.append(lengths[first:last])
        first = last
    return Segments(lengths, tuple(row_lengths), cu_seqlens, max(lengths))


# The last forward's position_ids and their segments: every layer of one forward gets the same tensor object.
_last: tuple | None = None


def _cached_segments(position_ids: torch.Tensor, batch_size: int, row_length: int) -> Segments | None:
    global _last
    try:
        version = position_ids._version
    except RuntimeError:  # an inference-mode tensor has no version counter: compute, do not cache
        return packed_segments(position_ids, batch_size, row_length)
    key = (batch_size, row_length, version)
    if _last is not None and _last[0] is position_ids and _last[1] == key:
        return _last[2]
    segments = packed_segments(position_ids, batch_size, row_length)
    _last = (position_ids, key, segments)  # holds the tensor, so its id cannot be reused while cached
    return segments


# The samples of the packed forward in progress, read by the model's pre-hook (watch_packed_rows): for models whose
# attention layers do not get position_ids (Granite 4) and for the per-sample mixers of sft/train/hybrid.py.
_forward: Segments | None = None
CACHE_KEYS = ("cache", "past_key_values", "cache_params", "past_key_value")


def watch_packed_rows(model: torch.nn.Module) -> None:
    """Read the samples of each forward of ``model`` once, from its position_ids (None when it is not packed: an
    attention_mask, a cache, or no restart). Gradient checkpointing recomputes before the next forward, so it sees
    the same samples."""
    def read(_module, _args, kwargs):
        global _forward
        position_ids = kwargs.get("position_ids")
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        _forward = None
        if (position_ids is not None and tokens is not None and kwargs.get("attention_mask") is None
                and not any(kwargs.get(key) is not None for key in CACHE_KEYS)):
            _forward = _cached_segments(position_ids, tokens.shape[0], tokens.shape[1])
    model.register_forward_pre_hook(read, with_kwargs=True)


def forward_segments(batch_size: int, row_length: int) -> Segments | None:
    """The packed samples of the forward in progress, when they cover ``batch_size`` rows of ``row_length``."""
    if _forward is None or sum(_forward.lengths) != batch_size * row_length or len(_forward.row_lengths) != batch_size:
        return None
    return _forward


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function for "varlen": no mask for a batch without a 2D attention_mask (the attention function reads
    position_ids instead), sdpa's mask otherwise (padding, or extra mask functions a model adds)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not kwargs.get("use_vmap", False):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             eager_math: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (batch, heads, T, head_dim), key and value
    (batch, kv_heads, T, head_dim) -> output (batch, T, heads, head_dim), no weights. ``eager_math`` (the
    "varlen_eager" registration) runs the model's own eager function within each sample, whatever the layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    own_math = model_eager_function(module) if eager_math or _needs_own_math(kwargs) else None
    batch_size, _, row_length, _ = query.shape
    position_ids = kwargs.get("position_ids")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    segments = None
    if (attention_mask is None and causal and row_length > 1 and key.shape[2] == row_length
            and kwargs.get("position_bias") is None):
        segments = (_cached_segments(position_ids, batch_size, row_length) if position_ids is not None
                    else forward_segments(batch_size, row_length))
    if segments is None:  # not packed: sdpa's call, or the model's own math, over the whole rows
        if attention_mask is None and causal and (own_math is not None or _window_bites(window, key.shape[2])):
            attention_mask = causal_mask(row_length, key.shape[2], window, query.device)
        if own_math is not None:
            return own_math(module, query, key, value, additive(attention_mask, query.dtype), scaling=scaling,
                            dropout=dropout, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if own_math is not None:
        return own_math_per_sample(own_math, module, query, key, value, segments, window, scaling, dropout, kwargs), None
    output = None
    kernel, dtype = _torch_varlen(), _half_dtype(query)
    if query.is_cuda and dropout == 0.0 and kernel is not None and dtype is not None:
        output = flash_varlen(query, key, value, segments, scaling, kernel, dtype, window)
    if output is None:
        output = segment_attention(query, key, value, segments, scaling, dropout, window)
    return output, None


def _needs_own_math(kwargs: dict) -> bool:
    """Attention sinks (gpt-oss's s_aux) or logit soft-capping (Gemma 2): math that SDPA does not do."""
    return kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None


def model_eager_function(module: torch.nn.Module):
    """The eager attention function of the module's own modeling file (it knows the model's sinks, soft-capping)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise VarlenAttentionError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has attention sinks or soft-capping "
            f"and its modeling file {type(module).__module__} has no eager_attention_forward to compute them per sample;"
            " set sft_train.model_args.attn_implementation: eager and turn packing off")
    return function


def _window_bites(window: int | None, key_length: int) -> bool:
    return window is not None and window < key_length


def causal_mask(query_length: int, key_length: int, window: int | None, device) -> torch.Tensor:
    """(1, 1, query_length, key_length) bool, True = attend: causal, the queries being the last query_length
    positions (a KV cache holds the earlier ones), and within ``window`` when given: i - window < j <= i."""
    queries = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    keys = torch.arange(key_length, device=device)[None, :]
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    return allowed[None, None]


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) as eager functions take it: 0 where attended, the dtype's minimum elsewhere."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    # float32's minimum for float64 too: eager functions that softmax in float32 turn float64's minimum into -inf,
    # and a row with nothing to attend (a padding query past a window) into NaN.
    lowest = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, lowest)


def own_math_per_sample(function, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        segments: Segments, window: int | None, scaling: float | None, dropout: float,
                        kwargs: dict) -> torch.Tensor:
    """The model's eager function on each sample alone, with the sample's causal (and window) mask."""
    rows = []
    masks: dict[int, torch.Tensor] = {}
    for lengths, row_query, row_key, row_value in zip(segments.row_lengths, query.unbind(0), key.unbind(0),
                                                      value.unbind(0)):
        outputs = []
        for q, k, v in zip(row_query.split(lengths, 1), row_key.split(lengths, 1), row_value.split(lengths, 1)):
            length = q.shape[1]
            if length not in masks:
                masks[length] = additive(causal_mask(length, length, window, query.device), query.dtype)
            output, _ = function(module, q[None], k[None], v[None], masks[length], scaling=scaling, dropout=dropout,
                                 **kwargs)
            outputs.append(output[0])  # (length, heads, dim)
        rows.append(torch.cat(outputs, dim=0))
    return torch.stack(rows)  # (batch, T, heads, dim)


def _flat(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, T, dim) -> (batch x T, heads, dim): the rows end to end, varlen_attn's layout."""
    batch_size, heads, row_length, dim = states.shape
    return states.transpose(1, 2).reshape(batch_size * row_length, heads, dim)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                      scaling: float | None, dropout: float = 0.0, window: int | None = None) -> torch.Tensor:
    """Causal SDPA within each sample, one call per sample on a view of its row: nothing is copied going in.

    unbind and split keep autograd cheap (their backwards are one stack and one concatenation, where indexing or
    slicing would give every sample a zero-filled gradient the size of the batch). Batching samples was not
    worth it on CPU (measured, one thread, forward and backward of a 4,096-token row): 812 samples of 2-8 tokens
    take 85 ms in 812 calls and 76 ms stacked by length into 8; padded to shared lengths, 210 ms; and for
    samples of 100-600 tokens any padding is slower. The row's block mask takes 1.7 s. A sample longer than a
    sliding window gets its causal window mask; a shorter one is plain causal."""
    extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}

    def attend(q, k, v):
        length = q.shape[1]
        if not _window_bites(window, length):
            return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True,
                                                  scale=scaling, **extra)[0]
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal_mask(length, length, window,
                                              q.device), dropout_p=dropout, scale=scaling, **extra)[0]

    rows = []
    for lengths, row_query, row_key, row_value in zip(segments.row_lengths, query.unbind(0), key.unbind(0),
                                                      value.unbind(0)):
        samples = zip(row_query.split(lengths, 1), row_key.split(lengths, 1), row_value.split(lengths, 1))
        rows.append(torch.cat([attend(q, k, v) for q, k, v in samples], dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous()  # (batch, T, heads, dim), as sdpa_attention_forward


@functools.cache
def _torch_varlen():
    """torch's varlen_attn and the keyword names this torch version takes, or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """fp16/bf16 for the FlashAttention kernel: the tensors' own, or autocast's (RoPE in float32 leaves q and k
    float32 under autocast); None for float32/64 without autocast."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                 scaling: float | None, kernel: tuple, dtype: torch.dtype, window: int | None = None) -> torch.Tensor | None:
    """One varlen_attn call over all samples in `dtype`, or None where this torch's kernel does not apply (head
    size, a scale or a sliding window it cannot take). `kernel`: (varlen_attn, the keyword names it takes)."""
    varlen_attn, parameters = kernel
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256 or value.shape[-1] != head_dim:
        return None
    extra = {}
    if scaling is not None and scaling != head_dim ** -0.5:
        if "scale" not in parameters:  # torch 2.10's varlen_attn has no scale
            return None
        extra["scale"] = scaling
    if _window_bites(window, segments.max_length) and "window_size" not in parameters:
        return None
    # FlashAttention's window (left, right) counts keys before the query: i - window < j <= i is (window - 1, 0).
    left = window - 1 if _window_bites(window, segments.max_length) else -1
    extra.update({"window_size": (left, 0)} if "window_size" in parameters else {"is_causal": True})
    batch_size, heads, row_length, _ = query.shape
    flat_query, flat_key, flat_value = (_flat(states).to(dtype) for states in (query, key, value))
    groups = heads // key.shape[1]
    if groups > 1:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:
            flat_key, flat_value = (states.repeat_interleave(groups, dim=1) for states in (flat_key, flat_value))
    offsets = segments.cu_seqlens.to(query.device)  # no copy when position_ids came on the model's device
    output = varlen_attn(flat_query, flat_key, flat_value, offsets, offsets, segments.max_length, segments.max_length,
                         **extra)
    return output.view(batch_size, row_length, heads, head_dim)


def register() -> None:
    """Register "varlen" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    AttentionInterface.register(VARLEN_EAGER, functools.partial(varlen_attention_forward, eager_math=True))
    AttentionMaskInterface.register(VARLEN_EAGER, varlen_mask)


register()
