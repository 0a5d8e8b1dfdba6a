"""The router's auxiliary (load-balancing) loss of MoE models, and the experts' load.

The model's own forward adds ``router_aux_loss_coef x load_balancing_loss_func(router logits of the batch)`` to
its loss when it is given labels and ``output_router_logits``. Our loss is computed outside the model (at target
positions only, sft/train/modeling.py), so the router loss is added here, with the model's own function (the
``load_balancing_loss_func`` of its modeling file), and defined per sample::

    aux(step) = sum over the step's samples s of  n_s x balance(router logits of s's n_s tokens)  /  sum of n_s
    objective = (summed cross-entropy of the step's targets) / (its target count)  +  coef x aux(step)

so for one sample it is exactly what the model's forward adds. The model's forward over a batch of several
samples balances over the batch's tokens together, a value that changes with how samples are grouped into
micro-batches, rows and processes; per sample it does not: packed or padded, ``bs 8`` or ``2 processes x bs 2 x
GA 2``, the step's objective and gradient are the same (the packing and loss guarantees). Each micro-batch backpropagates
its share ``coef x sum_s n_s aux_s x processes x accumulation / N``, N the step's token count over all
processes, as the cross-entropy does (sft/train/worker.py).

The experts' load is logged beside it: per MoE layer, the tokens each expert received (top-k choices) over the
step, as the busiest expert's count over the mean count (1.0 = perfectly even); the max and mean over layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from sft.errors import UserError


@dataclass(frozen=True)
class Router:
    """How a run adds the router loss: the model's balance function, its expert counts and the coefficient."""

    balance: Callable  # load_balancing_loss_func(gate_logits tuple, num_experts, top_k) -> tensor
    experts: int
    top_k: int
    coefficient: float

    @classmethod
    def of(cls, model: torch.nn.Module, experts: int, top_k: int, coefficient: float) -> "Router":
        balance = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
        if balance is None:
            raise UserError(f"{type(model).__name__} has output_router_logits but its modeling file has no "
                            "load_balancing_loss_func; set sft_train.model_args.router_aux_loss_coef: 0")
        return cls(balance, experts, top_k, coefficient)


@dataclass
class RouterTerms:
    """One micro-batch's router loss terms."""

    weighted_sum: torch.Tensor  # sum over samples of n_s x aux_s (differentiable)
    tokens: int  # sum of n_s
    expert_counts: torch.Tensor  # (moe layers, experts) top-k choices over the real tokens, float64 on CPU


def sample_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) of each sample's real tokens in the batch's rows laid end to end (batch x T), padding left
    out: a padded batch's rows (attention_mask), or a packed batch's samples (position_ids restarts) within each
    row's ``row_tokens`` (sft/packing.packed_collate)."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    spans = []
    if "attention_mask" in batch:
        for row, real in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            spans.append((row * length, row * length + int(real)))
        return spans
    positions = batch["position_ids"].expand(rows, length)
    real_tokens = batch["row_tokens"].tolist() if "row_tokens" in batch else [length] * rows
    for row in range(rows):
        starts = [0] + (torch.nonzero(positions[row, 1:] - positions[row, :-1] != 1).flatten() + 1).tolist()
        ends = starts[1:] + [length]
        for start, end in zip(starts, ends):
            end = min(end, real_tokens[row])
            if start < end:
                spans.append((row * length + start, row * length + end))
    return spans


def router_terms(router: Router, router_logits: tuple[torch.Tensor, ...], spans: list[tuple[int, int]],
                 flat_tokens: int) -> RouterTerms:
    """The per-sample balance terms of one forward's router logits (one (batch x T, experts) tensor per MoE layer)."""
    layers = tuple(logits.reshape(-1, logits.shape[-1]) for logits in router_logits)
    if not layers or any(logits.shape[0] != flat_tokens for logits in layers):
        raise UserError(f"the model returned router logits of shapes {[tuple(l.shape) for l in layers]}, not one row per "
                        f"token ({flat_tokens}); set sft_train.model_args.router_aux_loss_coef: 0")
    total, tokens = None, 0
    for start, end in spans:
        aux = router.balance(tuple(logits[start:end] for logits in layers), router.experts, router.top_k)
        term = aux * (end - start)
        total = term if total is None else total + term
        tokens += end - start
    real = torch.cat([torch.arange(start, end) for start, end in spans]) if spans else torch.zeros(0, dtype=torch.long)
    counts = torch.zeros(len(layers), router.experts, dtype=torch.float64)
    with torch.no_grad():
        for index, logits in enumerate(layers):
            chosen = logits[real.to(logits.device)].topk(router.top_k, dim=-1).indices.flatten().cpu()
            counts[index] = torch.bincount(chosen, minlength=router.experts).to(torch.float64)[:router.experts]
    if total is None:
        total = layers[0].sum() * 0.0
    return RouterTerms(total, tokens, counts)


def expert_load(counts: torch.Tensor) -> dict[str, float]:
    """The busiest expert's tokens over the mean, per layer: the max and the mean over layers."""
    per_layer = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)
    return {"moe/expert_load_max": float(per_layer.max()), "moe/expert_load_mean": float(per_layer.mean())}


def active_parameters(model: torch.nn.Module, experts: int, top_k: int) -> int:
    """Parameters a token passes through: all, less the experts it is not routed to (fused expert weights are 3D,
    one slice per expert); for MFU, which counts 6 x active parameters per token. A dense model: all."""
    total = sum(parameter.numel() for parameter in model.parameters())
    if not experts or not top_k:
        return total
    fused = sum(parameter.numel() for parameter in model.parameters()
                if parameter.dim() == 3 and parameter.shape[0] == experts)
    return total - round(fused * (1 - top_k / experts))
