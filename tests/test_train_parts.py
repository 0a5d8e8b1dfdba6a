"""The pure pieces of training: schedule, data order, collation, checkpoint folders, the supervised-only loss."""

import os

import numpy as np
import pytest
import torch

from sft.train import checkpoint as ckpt
from sft.errors import ConfigError
from sft.data.collate import pad_collate, supervised_count
from sft.train.sampler import Layout, epoch_order, eval_shard, step_micro_batches, steps_per_epoch
from sft.train.schedule import lr_at, warmup_steps_for


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
    assert ckpt.resolve_resume("true", out) == (ckpt.checkpoint_dir(out, 6), [])
    assert ckpt.resolve_resume("false", out) == (None, [])
    model_folder = ckpt.model_dir(ckpt.checkpoint_dir(out, 4), "sft_train")
    assert ckpt.resolve_resume(model_folder, out) == (ckpt.checkpoint_dir(out, 4), [])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(ckpt.checkpoint_dir(out, 9), out)
    ckpt.rotate(out, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4, 6]
    assert os.path.exists(ckpt.staging_dir(out, 8))  # rotation never touches a staging folder (a save in progress)
    assert ckpt.remove_staging(out) == [".tmp-checkpoint-8"] and not os.path.exists(ckpt.staging_dir(out, 8))
    assert ckpt.read_state(ckpt.checkpoint_dir(out, 6)) == {"step": 6}
    assert ckpt.resolve_resume("true", str(tmp_path / "fresh")) == (None, [])


def _saved(out: str, step: int) -> str:
    """A checkpoint with a real safetensors file, saved as the trainer saves one."""
    from safetensors.torch import save_file

    model = os.path.join(ckpt.staging_dir(out, step), "sft_train")
    os.makedirs(model)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, os.path.join(model, "model.safetensors"))
    return ckpt.finish(out, step, {"step": step})


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "model.safetensors has 200 bytes"),
    ("delete_state", "run_state.json is missing"),
    ("tear_state", "run_state.json has 9 bytes, 15 were saved"),
    ("flip_state", "run_state.json changed since it was saved"),
    ("no_manifest_truncated", "model.safetensors: its header runs past the end|bytes where its header needs"),
    ("no_manifest_no_state", "no run_state.json"),
    ("no_manifest_torn_state", "run_state.json is not valid JSON"),
])
def test_resume_skips_a_damaged_newest_checkpoint_and_names_it(tmp_path, damage, reason):
    out = str(tmp_path)
    _saved(out, 2)
    newest = _saved(out, 4)
    if damage.startswith("no_manifest"):  # a checkpoint without a manifest (older version): what can be checked is
        os.remove(os.path.join(newest, ckpt.MANIFEST))
    weights, state = os.path.join(newest, "sft_train", "model.safetensors"), os.path.join(newest, ckpt.STATE_FILE)
    if damage.endswith("truncate") or damage.endswith("truncated"):
        with open(weights, "r+b") as handle:
            handle.truncate(200)
    elif damage.endswith("no_state") or damage == "delete_state":
        os.remove(state)
    elif damage == "flip_state":
        with open(state, "r+b") as handle:
            handle.seek(-3, os.SEEK_END)
            handle.write(b"5\n}")
    else:
        with open(state, "w") as handle:
            handle.write('{"step": ')
    assert ckpt.verify(ckpt.checkpoint_dir(out, 2)) is None
    with pytest.raises(ckpt.CheckpointError, match=reason):
        ckpt.resolve_resume(newest, out)  # named explicitly: refused with the reason
    path, notes = ckpt.resolve_resume("true", out)
    assert path == ckpt.checkpoint_dir(out, 2)
    assert len(notes) == 1 and "skipped checkpoint-4" in notes[0] and "damaged-checkpoint-4" in notes[0]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]  # moved aside: never resumed or rotated again
    with open(os.path.join(ckpt.checkpoint_dir(out, 2), "sft_train", "model.safetensors"), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint .* can be resumed: skipped checkpoint-2"):
        ckpt.resolve_resume("true", out)


def test_run_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from sft.runlock import OutputDirError, RunLock

    with RunLock(str(tmp_path)):
        with pytest.raises(OutputDirError, match=rf"in use by the run of host .*, pid {os.getpid()}, started"):
            RunLock(str(tmp_path)).acquire()
    RunLock(str(tmp_path)).acquire().release()  # released: free again
    # A holder killed with SIGKILL leaves the lock file behind, but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sft.runlock import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirError, match=f"pid {holder.pid},"):
        RunLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    RunLock(str(tmp_path)).acquire().release()


def test_stale_staging_of_dead_processes_is_removed_and_a_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from sft.staging import remove_stale_staging, staging_path

    final = str(tmp_path / "encoded" / "abc")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for pid in (int(dead.stdout), os.getpid()):
        os.makedirs(f"{final}.tmp-{host}-{pid}")
    os.makedirs(f"{final}.tmp-elsewhere-{int(dead.stdout)}")  # another host's: its processes are not visible here
    assert remove_stale_staging(os.path.dirname(final)) == [f"abc.tmp-{host}-{int(dead.stdout)}"]
    assert os.path.isdir(staging_path(final)) and os.path.isdir(f"{final}.tmp-elsewhere-{int(dead.stdout)}")


def test_unwritable_output_is_one_error_at_start(tmp_path):
    from sft.runlock import OutputDirError, check_writable

    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputDirError, match=r"output_dir: cannot write to .*a-file/out \(Not a directory\)"):
        check_writable([str(tmp_path / "a-file" / "out")])
    if os.geteuid() != 0:  # root writes to read-only folders
        locked = tmp_path / "readonly"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(OutputDirError, match=r"cannot write to .*readonly/sft_train \(Permission denied\)"):
                check_writable([str(locked), str(locked / "sft_train")])
        finally:
            locked.chmod(0o755)


def tiny_model(vocab=64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return Qwen2ForCausalLM(config).double()


def test_loss_at_supervised_positions_equals_the_full_logits_loss():
    from sft.train.modeling import loss_sum
    from tests.conftest import full_logits_loss_sum

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
    os.remove(os.path.join(ckpt.checkpoint_dir(out, 2), ckpt.STATE_FILE))
    with pytest.raises(ckpt.CheckpointError, match="its run_state.json was deleted after the save"):
        ckpt.read_state(ckpt.checkpoint_dir(out, 2))
    os.remove(os.path.join(ckpt.checkpoint_dir(out, 2), ckpt.MANIFEST))  # as an older version wrote it
    with pytest.raises(ckpt.CheckpointError, match="has no run_state.json .written by an older version"):
        ckpt.read_state(ckpt.checkpoint_dir(out, 2))


@pytest.mark.parametrize("packed", [False, True])
def test_a_step_is_the_same_whatever_builds_it(packed):
    """The loader's steps are a pure function of the step: inline or in worker processes, from any first step."""
    import datasets

    from sft.train.loader import StepDataset, step_loader

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
