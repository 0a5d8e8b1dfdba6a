"""Model loading and the token-summed loss. No processes here: devices and wrapping belong to sft/worker.py.

The loss is computed at supervised positions only: the hidden states of positions whose next token is a
target go through the output layer, nothing else (``logits_to_keep`` with a boolean mask). With a
151k-token vocabulary the output layer is most of a small model's cost, and the logits of prompt and
padding positions are never needed; the loss is the same sum as over full logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sft.errors import IGNORE_INDEX

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_implementation(requested: str, on_gpu: bool) -> str:
    """flash_attention_2 when asked for (or 'auto') on a GPU that has it installed, else sdpa (or what was asked)."""
    if requested != "auto":
        return requested
    if on_gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(pretrain: str, dtype: str, attn: str, from_scratch: bool = False, model_config: Optional[str] = None,
               seed: int = 0):
    """An AutoModelForCausalLM from ``pretrain`` (weights), or initialised from a config alone when from_scratch.

    use_cache is switched off: in training it only costs memory, and with position_ids-packed rows it
    would make samples attend to each other.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if from_scratch:
        config = AutoConfig.from_pretrained(model_config or pretrain)
        config.use_cache = False
        torch.manual_seed(seed)  # initialisation depends on the seed only, identically on every rank
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(pretrain, attn_implementation=attn, dtype=torch_dtype)
    model.config.use_cache = False
    return model


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the loss; float64 stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target: mask[b, t] = labels[b, t + 1] != -100 (last column False)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and their count (float32 accumulation)."""
    labels = batch["labels"]
    keep = target_mask(labels)
    count = int(keep.sum())
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    targets = labels[:, 1:][keep[:, :-1]]
    loss = F.cross_entropy(_upcast(logits), targets, reduction="sum")
    return loss, count


def full_logits_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The same sum from full logits (the textbook way); used by tests to check loss_sum."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    loss = F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def train_flops_per_token(config, parameter_count: int, mean_sample_length: float, target_fraction: float) -> float:
    """Model FLOPs per trained token: 6 x non-embedding parameters, plus attention (PaLM's 12 L d T), plus the
    output layer (6 V d) at the fraction of positions where it runs (only targets, see loss_sum)."""
    embedding = config.vocab_size * config.hidden_size
    non_embedding = parameter_count - embedding * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_sample_length
    return 6.0 * non_embedding + attention + 6.0 * embedding * target_fraction
