"""Faults around a run, end to end: a second run in the same output_dir, a damaged newest checkpoint, an output
that cannot be written at start or at a save, and what killed runs left behind. Each ends in a completed run or
one `error:` line, and no saved step is lost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_train import command, environment, setup, train, weights  # noqa: F401 (setup is a fixture)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_second_run_in_the_same_output_dir_is_refused_with_the_holder(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    first = subprocess.Popen(command(config, out, "--sft_train.training_args.max_steps", "100000", "--save_steps", "100000",
                                     "--eval_steps", "100000"),
                             cwd=ROOT, env=environment(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:  # training: the first run holds the lock
        if (out / "logs" / "metrics.jsonl").exists() and (out / "logs" / "metrics.jsonl").read_text():
            break
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()
    second = train(setup, out, "--sft_train.training_args.max_steps", "2", check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert error_lines(second) == [f"error: output_dir {out} is in use by the run of host {socket.gethostname()}, pid "
                                   f"{first.pid}, started " + error_lines(second)[0].split(", started ")[1]]
    assert "wait for it to end, or give this run another --output_dir" in second.stderr
    first.send_signal(signal.SIGTERM)  # the first run saves and ends normally, its files its own
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] >= 1 for line in lines)
    log = (out / "logs" / "train.log").read_text()
    assert log.count("summary:") == 1 and "error:" not in log
    # The lock ended with its holder: the next run in the folder resumes it.
    from sft.train import checkpoint as ckpt

    saved = ckpt.complete_checkpoints(str(out))[-1][0]
    resumed = train(setup, out, "--resume_from_checkpoint", "true", "--sft_train.training_args.max_steps", str(saved + 1),
                    "--save_steps", "100000", "--eval_steps", "100000")
    assert f"checkpoint-{saved} at step {saved}" in resumed.stdout + resumed.stderr


def test_resume_skips_a_damaged_newest_checkpoint_cleans_dead_staging_and_ends_bitwise(setup, tmp_path):
    out = tmp_path / "out"
    train(setup, out)  # 8 steps, checkpoints 4 and 8
    straight = weights(out, 8)
    newest = out / "sft_train" / "checkpoint-8"
    damaged = newest / "sft_train" / "model.safetensors"
    head = damaged.read_bytes()[:1000]
    damaged.unlink()  # a new file: the tensors above still map the old one
    damaged.write_bytes(head)
    # What killed runs leave: a save in progress and an encoding in progress (a dead process on this host).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "sft_train" / ".tmp-checkpoint-6" / "training_state").mkdir(parents=True)
    stale_encoding = out / "encoded" / f"0123456789abcdef.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    stale_encoding.mkdir(parents=True)
    resumed = train(setup, out, "--resume_from_checkpoint", "true")
    said = resumed.stdout + resumed.stderr
    assert "note: skipped checkpoint-8: sft_train/model.safetensors has 1,000 bytes" in said
    assert f"moved to {out / 'sft_train' / 'damaged-checkpoint-8'}" in said
    assert "resumed from" in said and "checkpoint-4 at step 4" in said
    assert "removed .tmp-checkpoint-6" in said and f"removed {stale_encoding.name}" in said
    assert not stale_encoding.exists() and not (out / "sft_train" / ".tmp-checkpoint-6").exists()
    again = weights(out, 8)
    assert all(bool((straight[name] == again[name]).all()) for name in straight)


def test_an_output_dir_that_cannot_be_written_is_one_error_at_start(setup, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = train(setup, tmp_path / "a-file" / "out", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"error: output_dir: cannot write to {tmp_path / 'a-file' / 'out'} (Not a directory); "
                                   "make it writable or choose another --output_dir"]


def test_a_save_that_fails_ends_the_run_with_one_error_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    """The second save fails as on a full disk: one error naming it and the cause; checkpoint 4 is untouched."""
    import importlib.util

    from accelerate.state import AcceleratorState

    from sft.train import checkpoint as ckpt
    from sft.config import load_config

    saves = []
    real = ckpt.write_manifest

    def full_disk(folder):
        saves.append(folder)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real(folder)

    monkeypatch.setattr(ckpt, "write_manifest", full_disk)
    spec = importlib.util.spec_from_file_location("train_script", f"{ROOT}/scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, config = setup
    out = tmp_path / "out"
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(ckpt.CheckpointError) as raised:
            script.main(load_config(config, ["--output_dir", str(out), "--track_with", "none"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert str(raised.value) == (f"saving {out / 'sft_train' / '.tmp-checkpoint-8'} failed: [Errno 28] No space left on "
                                 f"device; the last good checkpoint is {out / 'sft_train' / 'checkpoint-4'}, kept as it was. "
                                 "Free space or fix the permissions, then resume with --resume_from_checkpoint true")
    assert [step for step, _ in ckpt.complete_checkpoints(str(out))] == [4]
    assert ckpt.verify(ckpt.checkpoint_dir(str(out), 4)) is None
    assert not (out / "sft_train" / ".tmp-checkpoint-8").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back: forked pools can end


def test_an_in_process_run_leaves_the_environment_as_it_found_it(setup, tmp_path, monkeypatch):
    """A one-process FSDP2 run sets torchrun's variables and Accelerate records its engine in os.environ; left
    there, they would steer the next run in this process, or a process it starts (a DDP run on GPU would get the
    earlier engine). After the run they are as before; the run's own FSDP2 engine was real."""
    import importlib.util

    from accelerate.state import AcceleratorState

    from sft.config import load_config

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    before = dict(os.environ)
    spec = importlib.util.spec_from_file_location("train_script", f"{ROOT}/scripts/train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, config = setup
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        script.main(load_config(config, ["--output_dir", str(tmp_path / "out"), "--track_with", "none",
                                         "--sft_train.training_args.max_steps", "1",
                                         "--sft_train.strategy_args.strategy_name", "fsdp2_train"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "strategy fsdp2_train" in (tmp_path / "out" / "logs" / "train.log").read_text()
    changed = {name for name in set(before) | set(os.environ) if before.get(name) != os.environ.get(name)}
    assert not changed & {"ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                          "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}, changed
