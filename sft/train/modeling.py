"""Model loading and the token-summed loss. No processes here: devices and wrapping belong to sft/train/worker.py.

The loss is computed at supervised positions only: the hidden states of positions whose next token is a
target go through the output layer, nothing else (``logits_to_keep`` with a boolean mask, which hands the
head the target rows flattened to (targets, hidden) in row-major order, the order of
``labels[:, 1:][mask[:, :-1]]``). With a 151k-token vocabulary the output layer is most of a small model's
cost, and the logits of prompt and padding positions are never needed; the loss is the same sum as over
full logits.

Even so, 16k targets x 151k vocabulary are 10 GB of float32 logits. With ``chunk_size`` (the config's
``loss_chunk_size``) and more targets than that, the output layer returns the summed loss itself, computed
chunk_size targets at a time in forward and in backward (sft/train/loss.py), so at most chunk_size x vocabulary
logits exist at once. It does so inside its own forward, inside the model's forward, so DDP, DeepSpeed
ZeRO-3, FSDP2 and PEFT wrappers see the same calls as without chunks; the sum is the same to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sft.errors import IGNORE_INDEX
from sft.train.loss import correct_count, head_returns_loss, output_layer, returned_loss, upcast
from sft.train.moe import Router, RouterTerms, router_terms, sample_spans

# Batch keys that are not the model's inputs: the targets, and the real tokens of each packed row.
NOT_MODEL_INPUTS = ("labels", "row_tokens")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_implementation(chosen: str) -> str:
    """Register sft/train/attention.py's per-sample attention with transformers when ``chosen`` (from
    sft.train.architectures.Architecture.attention) is one of its names; returns ``chosen``."""
    if chosen in ("varlen", "varlen_eager"):
        from sft.train.attention import register

        register()
    return chosen


def load_model_config(pretrain: str, model_config: Optional[str] = None, from_scratch: bool = False):
    """The model's transformers config (config.json only, no weights): from model_config when from_scratch."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_config or pretrain if from_scratch else pretrain)


def load_model(pretrain: str, dtype: str, attn: str, from_scratch: bool = False, model_config: Optional[str] = None,
               seed: int = 0, quantization=None):
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
        if quantization is not None:  # QLoRA: the frozen base in 4 bits, computing in bf16 (a GPU; sft/train/lora.py)
            torch_dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(pretrain, attn_implementation=attn, dtype=torch_dtype,
                                                     quantization_config=quantization)
    model.config.use_cache = False
    return model


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target: mask[b, t] = labels[b, t + 1] != -100 (last column False)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


@dataclass
class ForwardLoss:
    """One forward's summed cross-entropy over its target tokens, their count, how many of them are the argmax of
    their logits (token accuracy; None under Liger's fused loss, which does not count them), and the router loss
    terms of an MoE model (sft/train/moe.py; None without a router)."""

    loss_sum: torch.Tensor
    targets: int
    correct: Optional[int] = None
    router: Optional[RouterTerms] = None


def forward_loss(model, batch: dict[str, torch.Tensor], chunk_size: int = 0, router: Optional[Router] = None) -> ForwardLoss:
    """Summed cross-entropy over the batch's target tokens (float32 accumulation), their count and, with a
    ``router``, the per-sample router loss terms.

    With chunk_size > 0 and more targets than that, the output layer and the cross-entropy run chunk_size
    targets at a time (see the module docstring); 0 computes all targets' logits at once."""
    labels = batch["labels"]
    keep = target_mask(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
    if router is not None:
        inputs["output_router_logits"] = True
    if chunk_size <= 0 or targets.numel() <= chunk_size:
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        summed = F.cross_entropy(upcast(logits), targets, reduction="sum")
        correct = correct_count(logits.detach(), targets)
    else:
        with head_returns_loss(output_layer(model), targets, chunk_size) as calls:
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        summed = returned_loss(outputs.logits, [call.loss for call in calls])
        correct = calls[0].correct
    terms = None
    if router is not None:
        terms = router_terms(router, outputs.router_logits, sample_spans(batch), labels.numel())
    return ForwardLoss(summed, targets.numel(), None if correct is None else int(correct), terms)


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and their count (forward_loss without a router)."""
    result = forward_loss(model, batch, chunk_size)
    return result.loss_sum, result.targets


def train_flops_per_token(config, parameter_count: int, mean_sample_length: float, target_fraction: float) -> float:
    """Model FLOPs per trained token: 6 x non-embedding parameters, plus attention (PaLM's 12 L d T), plus the
    output layer (6 V d) at the fraction of positions where it runs (only targets, see loss_sum)."""
    embedding = config.vocab_size * config.hidden_size
    non_embedding = parameter_count - embedding * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_sample_length
    return 6.0 * non_embedding + attention + 6.0 * embedding * target_fraction
