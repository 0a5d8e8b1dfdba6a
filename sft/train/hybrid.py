"""Recurrent and convolution layers in packed rows: each sample starts from an empty state.

Gated DeltaNet (Qwen3-Next, Qwen3.5), short convolutions (LFM2) and Mamba2 mixers (Granite 4, Falcon-H1,
Nemotron-H) carry a state along the sequence: a causal convolution over the last few tokens and, for the
recurrent ones, a running state. Over a packed row that state would run from one sample into the next::

    row        a1 a2 a3 b1 b2 <pad>     position_ids 0 1 2 0 1 0
    attention  per sample (sft/train/attention.py)
    mixer      a1 a2 a3 | b1 b2 | <pad>  one call per sample, each from a zero state, outputs laid back in place

``separate_samples`` finds the mixers (a module that owns a ``torch.nn.Conv1d``: every such layer in
transformers convolves along the sequence) and gives each an instance-level forward that, when the model's
forward got packed position_ids (and no cache), calls the layer's own forward once per sample on views of the
row. A forward pre-hook on the model reads the position_ids once per forward (sft/attention.watch_packed_rows) for
all mixers; gradient checkpointing's recomputation runs before the next forward and sees the same samples. The
math is the layer's own (torch fallbacks on CPU, the fla / causal-conv1d / mamba kernels where installed), only
on shorter inputs, so packed equals unpacked to rounding.

A module whose class name says it mixes along the sequence (Mamba, DeltaNet, linear or lightning attention,
recurrent, RWKV, SSM) but that owns no convolution is refused by name: its state cannot be found here.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from sft.train.architectures import ArchitectureError
from sft.train.attention import CACHE_KEYS, forward_segments

_SEQUENCE_MIXER_NAME = re.compile(r"Mamba|DeltaNet|LinearAttention|Lightning|Recurrent|RWKV|Rwkv|SSM|Ssm|ShortConv")


def separate_samples(model: torch.nn.Module, expect_stateful: bool) -> list[str]:
    """Make every sequence mixer of ``model`` run per sample on packed rows; returns their module names. The model
    must have sft/attention.watch_packed_rows' hook.

    ``expect_stateful`` (the config names recurrent or convolution layers, sft/train/architectures.py) with no mixer
    found, or a mixer-named module without a convolution, is refused: packed samples would share its state."""
    wrapped, unknown = [], []
    for name, module in model.named_modules():
        owns_conv = any(isinstance(child, torch.nn.Conv1d) for child in module.children())
        if owns_conv and not isinstance(module, torch.nn.Conv1d):
            module.forward = _per_sample(module.forward)
            wrapped.append(name)
        elif _SEQUENCE_MIXER_NAME.search(type(module).__name__) and not any(name.startswith(w + ".") for w in wrapped):
            unknown.append(f"{name} ({type(module).__name__})")
    unknown = [entry for entry in unknown if not any(entry.startswith(w + ".") for w in wrapped)]
    if unknown or (expect_stateful and not wrapped):
        where = ", ".join(unknown[:3]) or "its config's recurrent or convolution layers"
        raise ArchitectureError(
            f"{type(model).__name__}: packed samples would share the state of {where}, which cannot be reset per "
            "sample here; set sft_train.use_sequence_packing: false")
    return wrapped


def _per_sample(forward: Callable) -> Callable:
    def per_sample_forward(hidden_states: torch.Tensor, *args, **kwargs):
        segments = forward_segments(*hidden_states.shape[:2]) if hidden_states.dim() == 3 else None
        if segments is None or any(kwargs.get(key) is not None for key in CACHE_KEYS):
            return forward(hidden_states, *args, **kwargs)
        batch_size, row_length = hidden_states.shape[:2]
        per_token = {key: value for key, value in kwargs.items()  # e.g. position_ids: cut like the hidden states
                     if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == row_length}
        outputs = []
        for index, (row, lengths) in enumerate(zip(hidden_states.unbind(0), segments.row_lengths)):
            pieces, start = [], 0
            for sample in row.split(lengths, 0):
                row_of = {key: index if value.shape[0] == batch_size else 0 for key, value in per_token.items()}
                cut = {key: value[row_of[key]:row_of[key] + 1, start:start + sample.shape[0]]
                       for key, value in per_token.items()}
                start += sample.shape[0]
                output = forward(sample[None], *args, **{**kwargs, **cut})
                if not isinstance(output, torch.Tensor):
                    raise ArchitectureError(f"a sequence mixer returned {type(output).__name__}, not a tensor; "
                                            "set sft_train.use_sequence_packing: false")
                pieces.append(output[0])
            outputs.append(torch.cat(pieces, dim=0))
        return torch.stack(outputs)
    return per_sample_forward
