"""The chunked loss (sft/train/loss.py through sft.train.modeling.loss_sum) and gradient checkpointing, in float64.

Every comparison is of the loss and of every parameter's gradient: chunked against unchunked against full
logits, through plain, tied, PEFT-wrapped and checkpointed models; and a structural check that no tensor of
more than chunk x vocabulary logits is ever created.
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sft.data.collate import pad_collate
from sft.errors import UserError
from sft.train.loss import linear_cross_entropy, returned_loss
from sft.train.modeling import loss_sum
from tests.conftest import full_logits_loss_sum
from sft.data.packing import packed_collate, packed_row

VOCAB, HIDDEN = 300, 32


def tiny_model(tied: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64)


def samples(seed=0, count=5):
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        length = rng.randint(5, 16)
        ids = [rng.randint(1, VOCAB - 1) for _ in range(length)]
        prompt = rng.randint(1, length - 3)
        result.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return result


def batch(packed: bool):
    """Right-padded rows with -100 labels, or two packed rows whose position_ids restart per sample."""
    rows = samples()
    if packed:
        return packed_collate([packed_row(rows[:3]), packed_row(rows[3:])], pad_id=0)
    return pad_collate(rows, pad_id=0)


def loss_and_grads(model, compute, *args):
    model.zero_grad(set_to_none=True)
    loss, count = compute(model, *args)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), count, grads


def assert_same(ours, reference, rel=1e-12):
    """Losses and gradients equal to `rel` of their size (each gradient against its largest element)."""
    loss, count, grads = ours
    reference_loss, reference_count, reference_grads = reference
    assert count == reference_count
    assert abs(loss - reference_loss) <= rel * abs(reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        scale = reference_grads[name].abs().max()
        assert scale > 0, name  # a zero gradient would compare nothing
        assert (grad - reference_grads[name]).abs().max() <= rel * scale, name


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_loss_equals_unchunked_and_full_logits(tied, packed):
    model, inputs = tiny_model(tied), batch(packed)
    unchunked = loss_and_grads(model, loss_sum, inputs)
    assert_same(unchunked, loss_and_grads(model, full_logits_loss_sum, inputs))
    keys = set(model.state_dict())
    for chunk_size in (1, 7, unchunked[1] - 1, 10 * unchunked[1]):
        assert_same(loss_and_grads(model, loss_sum, inputs, chunk_size), unchunked)
        with torch.no_grad():  # validation: the loss alone, the same sum
            assert abs(float(loss_sum(model, inputs, chunk_size)[0]) - unchunked[0]) <= 1e-12 * unchunked[0]
    assert "forward" not in vars(model.lm_head) and set(model.state_dict()) == keys


@pytest.mark.parametrize("wrapped_head", [False, True], ids=["linear_head", "peft_saved_head"])
def test_a_plain_linear_head_takes_the_fused_path_and_a_wrapped_one_is_checkpointed(monkeypatch, wrapped_head):
    import sft.train.loss

    calls = {"fused": 0, "checkpointed": 0}
    for name, key in (("linear_cross_entropy", "fused"), ("checkpointed_cross_entropy", "checkpointed")):
        original = getattr(sft.train.loss, name)
        monkeypatch.setattr(sft.train.loss, name, lambda *a, _f=original, _k=key, **k: calls.__setitem__(_k, calls[_k] + 1)
                            or _f(*a, **k))
    model = peft_model("all-linear", ["lm_head"]) if wrapped_head else tiny_model(tied=True)
    loss_sum(model, batch(packed=False), 4)[0].backward()
    assert calls == ({"fused": 0, "checkpointed": 1} if wrapped_head else {"fused": 1, "checkpointed": 0})


def test_linear_cross_entropy_with_bias_frozen_weight_and_half_precision():
    torch.manual_seed(0)
    hidden = torch.randn(23, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(VOCAB, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    parameters = (hidden, weight, bias)

    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    reference_grads = torch.autograd.grad(3.0 * reference, parameters)
    fused = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=5)
    ours = fused.loss
    assert abs(float(ours) - float(reference)) <= 1e-12 * float(reference)
    assert int(fused.correct) == int((F.linear(hidden, weight, bias).argmax(-1) == targets).sum())
    for grad, reference_grad in zip(torch.autograd.grad(3.0 * ours, parameters), reference_grads):
        assert (grad - reference_grad).abs().max() <= 1e-12 * reference_grad.abs().max()

    frozen = weight.detach()  # a LoRA base: no gradient is computed or kept for the weight
    (grad_hidden,) = torch.autograd.grad(linear_cross_entropy(hidden, frozen, None, targets, 5).loss, (hidden,))
    (reference_hidden,) = torch.autograd.grad(F.cross_entropy(hidden @ frozen.T, targets, reduction="sum"), (hidden,))
    assert (grad_hidden - reference_hidden).abs().max() <= 1e-12 * reference_hidden.abs().max()

    half = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    loss = linear_cross_entropy(*half[:1], half[1], None, targets, chunk_size=5).loss
    assert loss.dtype == torch.float32  # half-precision logits are upcast, as in the unchunked loss
    grads = torch.autograd.grad(loss, half)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    unchunked = F.cross_entropy(F.linear(*half).float(), targets, reduction="sum")
    assert abs(float(loss) - float(unchunked)) <= 1e-3 * float(unchunked)
    for grad, reference_grad in zip(grads, torch.autograd.grad(unchunked, half)):
        assert (grad.double() - reference_grad.double()).abs().max() <= 2e-2 * reference_grad.double().abs().max()


def peft_model(target_modules, modules_to_save=None, gradient_checkpointing=False):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(tied=False)
    if gradient_checkpointing:  # before wrapping, as the worker does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=modules_to_save,
                        init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B: every gradient non-zero
    return get_peft_model(model, config)


@pytest.mark.parametrize("lora", [
    dict(target_modules="all-linear"),  # a frozen plain head: the fused path
    dict(target_modules="all-linear", modules_to_save=["lm_head"]),  # ModulesToSaveWrapper: checkpointed chunks
    dict(target_modules=["q_proj", "v_proj", "lm_head"]),  # a LoRA layer as the head: checkpointed chunks
], ids=["lora", "lm_head_saved", "lm_head_lora"])
def test_chunked_loss_through_peft_equals_unchunked(lora):
    model = peft_model(**lora)
    inputs = batch(packed=False)
    keys = set(model.state_dict())
    unchunked = loss_and_grads(model, loss_sum, inputs)
    assert_same(unchunked, loss_and_grads(model, full_logits_loss_sum, inputs))
    for chunk_size in (1, 7):
        assert_same(loss_and_grads(model, loss_sum, inputs, chunk_size), unchunked)
    assert set(model.state_dict()) == keys


class LargestLogits(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized dimension that any operation creates (forward and
    backward), leaving out the (vocab, hidden) weight, its transpose and its gradient."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and VOCAB in tensor.shape and sorted(tensor.shape) != [HIDDEN, VOCAB]:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("wrapped_head", [False, True], ids=["linear_head", "peft_saved_head"])
def test_no_more_than_a_chunk_of_logits_ever_exists(wrapped_head):
    model = peft_model("all-linear", ["lm_head"]) if wrapped_head else tiny_model(tied=True)
    inputs = batch(packed=False)
    sizes = {}
    for chunk_size in (0, 4):
        with LargestLogits() as probe:
            loss, count = loss_sum(model, inputs, chunk_size)
            loss.backward()
        sizes[chunk_size] = probe.largest
    assert sizes[0] >= count * VOCAB  # the probe sees the unchunked logits
    assert sizes[4] <= 4 * VOCAB < count * VOCAB


def test_gradient_checkpointing_changes_nothing():
    model = tiny_model(tied=True)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), checkpointed.train()
    inputs = batch(packed=True)
    calls = []
    checkpointed.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    reference = loss_and_grads(model, loss_sum, inputs, 7)
    assert_same(loss_and_grads(checkpointed, loss_sum, inputs, 7), reference)
    assert len(calls) == 2  # attention ran again in backward: checkpointing is on
    assert_same(loss_and_grads(checkpointed, loss_sum, inputs), reference)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["lora", "lm_head_saved"])
def test_gradient_checkpointing_with_lora_changes_nothing(modules_to_save):
    model = peft_model("all-linear", modules_to_save)
    checkpointed = peft_model("all-linear", modules_to_save, gradient_checkpointing=True)
    model.train(), checkpointed.train()
    inputs = batch(packed=False)
    calls = []
    checkpointed.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    reference = loss_and_grads(model, loss_sum, inputs)
    assert_same(loss_and_grads(checkpointed, loss_sum, inputs, 7), reference)
    assert len(calls) == 2


def test_a_model_that_changes_the_heads_output_is_refused():
    loss = torch.tensor(3.0, dtype=torch.float64)
    assert returned_loss(loss, [loss]) is loss
    passed_on = loss.clone()  # a wrapper (DDP's sink) may hand back another tensor of the same value
    assert returned_loss(passed_on, [loss]) is passed_on
    with pytest.raises(UserError, match="soft-capping"):
        returned_loss(30.0 * torch.tanh(loss / 30.0), [loss])
    with pytest.raises(UserError, match="2 times"):
        returned_loss(loss, [loss, loss])


def full_logits_correct_count(model, batch) -> int:
    """The reference for token accuracy: targets that are the argmax of the full logits before them."""
    from sft.train.modeling import NOT_MODEL_INPUTS

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    return int(((logits[:, :-1].argmax(-1) == targets) & (targets != -100)).sum())


def half_right(model, inputs):
    """``inputs`` with every other target set to the model's own argmax, so that about half are counted correct."""
    from sft.train.modeling import NOT_MODEL_INPUTS

    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}, use_cache=False).logits
    labels = inputs["labels"].clone()
    rows, columns = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    for row, column in list(zip(rows.tolist(), columns.tolist()))[::2]:
        labels[row, column + 1] = logits[row, column].argmax()
    return {**inputs, "labels": labels}


@pytest.mark.parametrize("wrapped_head", [False, True], ids=["linear_head", "peft_saved_head"])
def test_token_accuracy_counts_what_full_logits_count_in_every_path(wrapped_head):
    from sft.train.modeling import forward_loss

    model = peft_model("all-linear", ["lm_head"]) if wrapped_head else tiny_model(tied=True)
    inputs = half_right(model, batch(packed=False))
    expected = full_logits_correct_count(model, inputs)
    targets = int((inputs["labels"][:, 1:] != -100).sum())
    assert targets // 2 <= expected < targets  # the check is not of an all-right or all-wrong count
    for chunk_size in (0, 1, 7, targets - 1, 10 * targets):
        trained = forward_loss(model, inputs, chunk_size)  # with gradients: the fused or checkpointed path
        trained.loss_sum.backward()
        assert trained.correct == expected, chunk_size
        with torch.no_grad():  # validation's path
            assert forward_loss(model, inputs, chunk_size).correct == expected, chunk_size
