"""The pure pieces of training: schedule, data order, collation, checkpoint folders, the supervised-only loss."""

import os

import numpy as np
import pytest
import torch

from sft import checkpoint as ckpt
from sft.config import ConfigError
from sft.collate import pad_collate, supervised_count
from sft.sampler import Layout, epoch_order, eval_shard, step_micro_batches, steps_per_epoch
from sft.schedule import lr_at, warmup_steps_for


def test_schedule_warmup_then_decay():
    lrs = [lr_at(s, 10, 1.0, 2, "cosine", 0.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05
    assert [lr_at(s, 4, 1.0, 0, "linear", 0.0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(7, 10, 2.0, 0, "constant", 0.0) == 2.0
    assert lr_at(9, 10, 1.0, 0, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.1)  # decays to the floor, not 0
    assert warmup_steps_for(100, 0, 0.1) == 10 and warmup_steps_for(100, 5, 0.1) == 5


def test_order_depends_only_on_seed_and_epoch():
    assert (epoch_order(50, 1, 0) == epoch_order(50, 1, 0)).all()
    assert not (epoch_order(50, 1, 0) == epoch_order(50, 1, 1)).all()
    assert sorted(epoch_order(50, 1, 3)) == list(range(50))


@pytest.mark.parametrize("world, micro, accumulation", [(1, 8, 1), (1, 1, 8), (2, 4, 1), (2, 2, 2)])
def test_a_step_takes_the_same_samples_whatever_the_layout(world, micro, accumulation):
    order = epoch_order(40, 0, 0)
    layout = Layout(world, micro, accumulation)
    assert steps_per_epoch(40, layout.global_batch) == 5
    for step in range(5):
        taken = sorted(i for rank in range(world) for batch in step_micro_batches(order, step, rank, layout) for i in batch)
        assert taken == sorted(order[step * 8:(step + 1) * 8].tolist())


def test_eval_shard_covers_every_sample_once():
    shards = [eval_shard(11, rank, 2, 4) for rank in range(2)]
    flat = sorted(i for shard in shards for batch in shard for i in batch)
    assert flat == list(range(11))


def test_pad_collate():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert supervised_count(batch["labels"]) == 2  # the first label of a row is never predicted
    assert pad_collate([{"input_ids": [1], "labels": [1]}], 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_checkpoint_is_complete_or_absent(tmp_path):
    out = str(tmp_path)
    for step in (2, 4, 6):
        os.makedirs(ckpt.staging_dir(out, step))
        ckpt.finish(out, step, {"step": step})
    os.makedirs(ckpt.staging_dir(out, 8))  # a save killed half-way
    os.makedirs(ckpt.checkpoint_dir(out, 9))  # a folder without the marker
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4, 6]
    assert ckpt.resolve_resume("true", out) == ckpt.checkpoint_dir(out, 6)
    assert ckpt.resolve_resume("false", out) is None
    assert ckpt.resolve_resume(ckpt.model_dir(ckpt.checkpoint_dir(out, 4), "sft_train"), out) == ckpt.checkpoint_dir(out, 4)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(ckpt.checkpoint_dir(out, 9), out)
    ckpt.rotate(out, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4, 6]
    assert not os.path.exists(ckpt.staging_dir(out, 8))
    assert ckpt.read_state(ckpt.checkpoint_dir(out, 6)) == {"step": 6}
    assert ckpt.resolve_resume("true", str(tmp_path / "fresh")) is None


def tiny_model(vocab=64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return Qwen2ForCausalLM(config).double()


def test_loss_at_supervised_positions_equals_the_full_logits_loss():
    from sft.modeling import full_logits_loss_sum, loss_sum

    model = tiny_model()
    rng = np.random.default_rng(0)
    samples = []
    for length in (9, 14, 5):
        ids = rng.integers(1, 64, length).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]
        samples.append({"input_ids": ids, "labels": labels})
    batch = pad_collate(samples, pad_id=0)
    ours, count = loss_sum(model, batch)
    reference, reference_count = full_logits_loss_sum(model, batch)
    assert count == reference_count == supervised_count(batch["labels"])
    assert abs(float(ours) - float(reference)) < 1e-10
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference.backward()
    for ours_grad, reference_grad in zip(grads, [p.grad for p in model.parameters()]):
        assert torch.allclose(ours_grad, reference_grad, atol=1e-12)


def test_missing_run_state_is_a_checkpoint_error(tmp_path):
    out = str(tmp_path)
    os.makedirs(ckpt.staging_dir(out, 2))
    ckpt.finish(out, 2, {"step": 2})
    os.remove(os.path.join(ckpt.checkpoint_dir(out, 2), ckpt.STATE_FILE))  # as an older version wrote it
    with pytest.raises(ckpt.CheckpointError, match="has no run_state.json"):
        ckpt.read_state(ckpt.checkpoint_dir(out, 2))


@pytest.mark.parametrize("packed", [False, True])
def test_a_step_is_the_same_whatever_builds_it(packed):
    """The loader's steps are a pure function of the step: inline or in worker processes, from any first step."""
    import datasets

    from sft.loader import StepDataset, step_loader

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, 24)
    columns = {"input_ids": [rng.integers(1, 50, n).tolist() for n in lengths]}
    columns["labels"] = [[-100] + ids[1:] for ids in columns["input_ids"]]
    if packed:
        columns["position_ids"] = [list(range(len(ids))) for ids in columns["input_ids"]]
        columns["num_samples"] = [2] * len(lengths)
    data = datasets.Dataset.from_dict(columns)
    dataset = StepDataset(data, Layout(2, 2, 2), rank=1, seed=3, steps_per_epoch=3, pad_id=0)
    inline = list(step_loader(dataset, 0, 7, num_workers=0))
    in_workers = list(step_loader(dataset, 2, 7, num_workers=2))
    assert [batch.step for batch in inline] == list(range(7)) and [batch.step for batch in in_workers] == list(range(2, 7))
    for ours, theirs in zip(inline[2:], in_workers):
        assert (ours.tokens, ours.samples, ours.target_tokens, ours.padded_tokens) == \
               (theirs.tokens, theirs.samples, theirs.target_tokens, theirs.padded_tokens)
        for a, b in zip(ours.micro_batches, theirs.micro_batches):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # Step 4 is step 1 of epoch 1: rank 1's slices of that epoch's order.
    order = epoch_order(24, 3, 1)
    expected = step_micro_batches(order, 1, 1, Layout(2, 2, 2))
    assert inline[4].samples == sum(len(ids) for ids in expected) * (2 if packed else 1)
    assert inline[4].tokens == sum(int(lengths[i]) for ids in expected for i in ids)
    assert inline[4].target_tokens == sum(int(lengths[i]) - 1 for ids in expected for i in ids)
