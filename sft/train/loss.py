"""The output layer and cross-entropy, chunk by chunk over target positions (used by sft.train.modeling.loss_sum).

For one forward call of the (possibly wrapped) model, ``head_returns_loss`` gives the output layer an
instance-level ``forward`` that takes the targets-only hidden states and returns their summed loss; the
model's forward hands that scalar back as ``outputs.logits``. The head thus still runs inside its own
forward, inside the outer model's forward, where DDP, a DeepSpeed ZeRO-3 engine or FSDP2 expect it (ZeRO-3
and FSDP2 gather the weight only there), and the module tree and state dict do not change.

Inside, chunk_size target rows at a time:

    plain nn.Linear head, CUDA + liger-kernel   Liger's fused linear cross-entropy (Triton)
    plain nn.Linear head                        LinearCrossEntropy: per chunk logits -> logsumexp -> loss and,
                                                 in the same pass, (softmax - onehot) @ W for the hidden rows and
                                                 (softmax - onehot)^T @ h into the weight's gradient; backward
                                                 only scales them, so it recomputes nothing and keeps no weight
    any other head (PEFT wrapper, LoRA layer)   torch.utils.checkpoint per chunk around the head's own forward

so at most chunk_size x vocabulary logits exist at a time, in forward and in backward. Half-precision
logits are upcast to float32 for the loss, as in the unchunked path; float64 stays float64. Each chunk also
counts its targets whose logit is the row's largest (token accuracy), from the logits it has anyway; Liger's
kernel returns no such count here, so under it the count is None.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.errors import UserError


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 for the loss; float64 stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


@dataclass
class HeadLoss:
    """What the output layer computed for one forward: the summed cross-entropy of its targets, and how many
    targets have their logit as the row's largest (None where not counted: Liger's kernel)."""

    loss: torch.Tensor
    correct: Optional[torch.Tensor]


def correct_count(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose largest logit is at the target (a tie counts the first index, as argmax does)."""
    return (logits.argmax(dim=-1) == targets).sum()


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The model's output layer, found through DDP / DeepSpeed / FSDP1 (``.module``), torch.compile
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    module = model
    while True:
        if isinstance(getattr(module, "module", None), torch.nn.Module):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        elif callable(getattr(module, "get_base_model", None)) and module.get_base_model() is not module:
            module = module.get_base_model()
        else:
            break
    head = module.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(module).__name__} has no output layer (get_output_embeddings() is None); "
                        "set sft_train.model_args.loss_chunk_size: 0")
    return head


def _chunks(count: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of chunk_size rows out of count."""
    for start in range(0, count, chunk_size):
        yield start, min(start + chunk_size, count)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) over chunks of rows; the gradients are computed in the same pass (Liger's way)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Accumulating the weight's gradient over chunks in half precision would round it once per chunk.
        accumulate = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        total = correct = None
        for start, end in _chunks(targets.numel(), chunk_size):
            rows, chunk_targets = hidden[start:end], targets[start:end]
            logits = F.linear(rows, weight, bias)  # F.linear, so autocast applies as in the unchunked path
            compute_dtype = logits.dtype
            logits = upcast(logits)
            chunk_correct = correct_count(logits, chunk_targets)  # before the logits are overwritten below
            correct = chunk_correct if correct is None else correct + chunk_correct
            # logsumexp and softmax in the logits' own storage: one chunk x vocabulary tensor alive at a time.
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            chunk_loss = (sums.log() + row_max).squeeze(1).sub(target_logits).sum()
            total = chunk_loss if total is None else total + chunk_loss
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_logits = exps.div_(sums)  # softmax
            grad_logits[torch.arange(end - start, device=grad_logits.device), chunk_targets] -= 1
            grad_logits = grad_logits.to(compute_dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight.add_(grad_logits.t() @ rows)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_correct):
        grads = [None if grad is None else (grad * grad_total).to(dtype)
                 for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunk_size: int) -> HeadLoss:
    """Summed cross-entropy of the rows of ``hidden`` through a linear layer, chunk_size rows at a time, and the
    count of rows whose largest logit is the target."""
    fused = _liger_loss(hidden, weight, bias, targets)
    if fused is not None:
        return HeadLoss(fused, None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return HeadLoss(*LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size))
    return _summed_chunks(lambda rows: F.linear(rows, weight, bias), hidden, targets, chunk_size, recompute=False)


def _liger_loss(hidden, weight, bias, targets) -> Optional[torch.Tensor]:
    """Liger's fused linear cross-entropy on a CUDA device where liger-kernel is installed, else None.

    It picks its own chunk size (about hidden-size logits per row chunk, less than ours)."""
    if not hidden.is_cuda or hidden.dtype == torch.float64:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    options = {"accum_dtype": torch.float32}  # newer versions: accumulate the weight's gradient in float32
    options = {k: v for k, v in options.items() if k in inspect.signature(liger_fused_linear_cross_entropy).parameters}
    return upcast(liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum", **options))


def _head_chunk_loss(head_forward: Callable, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = upcast(head_forward(rows))
    return F.cross_entropy(logits, targets, reduction="sum"), correct_count(logits.detach(), targets)


def checkpointed_cross_entropy(head_forward: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int) -> HeadLoss:
    """Summed cross-entropy through any head, chunk by chunk, each chunk's logits recomputed in backward."""
    return _summed_chunks(head_forward, hidden, targets, chunk_size, recompute=torch.is_grad_enabled())


def _summed_chunks(head_forward: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                   recompute: bool) -> HeadLoss:
    """The loss and correct count summed over chunks; ``recompute``: checkpoint each chunk for backward."""
    total = correct = None
    for start, end in _chunks(targets.numel(), chunk_size):
        arguments = (head_forward, hidden[start:end], targets[start:end])
        if recompute:
            chunk_loss, chunk_correct = checkpoint(_head_chunk_loss, *arguments, use_reentrant=False)
        else:
            chunk_loss, chunk_correct = _head_chunk_loss(*arguments)
        total = chunk_loss if total is None else total + chunk_loss
        correct = chunk_correct if correct is None else correct + chunk_correct
    return HeadLoss(total, correct)


def _is_plain_linear(head: torch.nn.Module) -> bool:
    """An nn.Linear (FSDP2's FSDPLinear included) whose forward nothing has replaced: its weight is the layer."""
    return (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
            and "forward" not in vars(head))


def chunked_head_loss(head: torch.nn.Module, head_forward: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int, plain: bool) -> HeadLoss:
    """Summed cross-entropy of the head's logits for targets-only hidden states (rows in target order); ``plain``:
    the head is a bare linear layer (see _is_plain_linear), whose weight can be used directly."""
    if hidden.dim() != 2 or hidden.shape[0] != targets.numel():
        raise UserError(f"the output layer got hidden states of shape {tuple(hidden.shape)}, not one row per target "
                        f"({targets.numel()}): this model ignores logits_to_keep; set "
                        "sft_train.model_args.loss_chunk_size: 0")
    if plain:
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size)
    return checkpointed_cross_entropy(head_forward, hidden, targets, chunk_size)


@contextlib.contextmanager
def head_returns_loss(head: torch.nn.Module, targets: torch.Tensor, chunk_size: int) -> Iterator[list]:
    """Within the block, calling ``head`` returns the summed loss of ``targets`` (chunked) instead of logits.

    Yields a list that receives the HeadLoss of each call (one per model forward); the original forward is back
    afterwards, whatever happens."""
    own_forward = vars(head).get("forward")  # a forward set on the instance by a hook library, kept as is
    original = head.forward
    plain = _is_plain_linear(head)  # decided before this block replaces the instance's forward
    losses: list[HeadLoss] = []

    def forward(hidden_states, *args, **kwargs):
        if args or kwargs:
            raise UserError(f"the output layer {type(head).__name__} was called with extra arguments; set "
                            "sft_train.model_args.loss_chunk_size: 0")
        losses.append(chunked_head_loss(head, original, hidden_states, targets, chunk_size, plain))
        return losses[-1].loss

    head.forward = forward
    try:
        yield losses
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward


def returned_loss(logits: torch.Tensor, losses: list[torch.Tensor]) -> torch.Tensor:
    """The loss as the model's forward returned it in ``outputs.logits``, checked to be the head's own result
    (wrappers may hand back another tensor object of the same value; a model that transforms the head's output
    (logit soft-capping, scaling) is refused, since its loss would be wrong)."""
    if len(losses) != 1:
        raise UserError(f"the model's forward called its output layer {len(losses)} times, not once; set "
                        "sft_train.model_args.loss_chunk_size: 0")
    if logits is losses[0] or (logits.dim() == 0 and logits.dtype == losses[0].dtype
                               and torch.equal(logits.detach(), losses[0].detach())):
        return logits
    raise UserError("the model's forward transforms its output layer's logits (e.g. soft-capping or scaling), so "
                    "the chunked loss would be wrong for it: set sft_train.model_args.loss_chunk_size: 0")
