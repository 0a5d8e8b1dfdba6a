"""The run state checked on resume, the schedule rule for training further, and the typed metrics. Pure: no
processes. (Resumes end to end, with other process counts, data and max_steps, are in test_train.py.)"""

import dataclasses
import json

import pytest

from sft.train.metrics import MetricsWindow, StepResult, _entries_up_to
from sft.train.runstate import DataIdentity, ResumeError, RunState, check_resume
from sft.train.schedule import Schedule, lr_at

IDENTITY = DataIdentity("key-a", "data-a", "tok-a", "chatml", 96, "none")
SCHEDULE = Schedule("cosine", 1e-3, 2, 8, 0.0)


def state(processes=2, micro=4, accumulation=1, strategy="ddp_train", step=4, data=IDENTITY, schedule=SCHEDULE):
    return RunState(processes * micro * accumulation, processes, micro, accumulation, strategy, data, schedule, step=step,
                    samples=step * 8, tokens=step * 300, epoch=step / 5)


def check(saved, now, reshards=True, accept=()):
    return check_resume(saved, now, reshards, list(accept), "out/sft_train/checkpoint-4", "sft_train")


def test_the_run_state_survives_json():
    saved = state()
    assert RunState.from_json(json.loads(json.dumps(saved.to_json()))) == saved


def test_an_unchanged_resume_has_nothing_to_say():
    assert check(state(), state(step=0)) == []


def test_the_same_global_batch_on_another_process_count_continues():
    notes = check(state(processes=2, micro=4), state(processes=1, micro=8, step=0))
    assert notes and "the same samples per step" in notes[0]
    with pytest.raises(ResumeError, match=r"written by 2 processes under deepspeed_train.*--num_processes 2"):
        check(state(strategy="deepspeed_train"), state(processes=1, micro=8, strategy="deepspeed_train"), reshards=False)


def test_another_global_batch_is_refused_naming_a_layout_that_keeps_it():
    with pytest.raises(ResumeError, match=r"global batch of 8 \(2 processes.*must stay 8: with 1 process\(es\) set "
                                          r"per_device_train_batch_size x gradient_accumulation_steps = 8 "
                                          r"\(e\.g\. gradient_accumulation_steps 2\)"):
        check(state(), state(processes=1, micro=4, step=0))
    with pytest.raises(ResumeError, match="a process count that divides 8"):
        check(state(), state(processes=3, micro=4, step=0))


def test_other_data_template_tokenizer_or_length_is_refused_by_name_unless_accepted():
    changed = dataclasses.replace(IDENTITY, data="data-b", fingerprint="key-b", sequence_length=128, template="qwen2_5")
    with pytest.raises(ResumeError) as error:
        check(state(), state(data=changed, step=0))
    message = str(error.value)
    assert "other data (data-a..., now data-b...)" in message
    assert "sequence_length (96, now 128)" in message and "template ('chatml', now 'qwen2_5')" in message
    assert "--resume_accept_changes data template sequence_length" in message and "tokenizer" not in message
    with pytest.raises(ResumeError, match=r"tokenizer \(tok-a"):
        check(state(), state(data=dataclasses.replace(IDENTITY, tokenizer="tok-b"), step=0))
    with pytest.raises(ResumeError, match=r"packing \('none', now 'bfd'\)"):
        check(state(), state(data=dataclasses.replace(IDENTITY, packing="bfd"), step=0))
    notes = check(state(), state(data=changed, step=0), accept=["data", "template", "sequence_length"])
    assert [note.split(" (")[0] for note in notes] == ["accepted a changed data", "accepted a changed template",
                                                      "accepted a changed sequence_length"]


def test_data_without_an_encode_record_is_not_compared():
    unknown = dataclasses.replace(IDENTITY, data="", fingerprint="")
    assert check(state(data=unknown), state(step=0)) == []


def test_another_strategy_is_refused():
    with pytest.raises(ResumeError, match=r"written by ddp_train, this run is fsdp2_train.*strategy_name ddp_train"):
        check(state(), state(strategy="fsdp2_train", step=0))


def test_identity_from_encode_meta_separates_the_data_from_the_run_settings():
    meta = {"cache_key": "abc", "inputs": {"sources": {"train": ["f1"]}, "tokenizer": "t", "template": "chatml",
                                           "sequence_length": 96, "mapping": {"prompt_key": "instruction"}}}
    one = DataIdentity.of(meta, "t", "chatml", 96, "none")
    other_length = {**meta, "inputs": {**meta["inputs"], "sequence_length": 128}}
    assert DataIdentity.of(other_length, "t", "chatml", 128, "none").data == one.data  # the same rows of data
    other_file = {**meta, "inputs": {**meta["inputs"], "sources": {"train": ["f2"]}}}
    assert DataIdentity.of(other_file, "t", "chatml", 96, "none").data != one.data
    assert DataIdentity.of(None, "t", "chatml", 96, "none").data == ""


def test_training_further_restretches_the_decay_and_keeps_the_warmup():
    # Started with warmup_ratio 0.1 of 400 steps (40); resumed at 400 with max_steps 500, whose ratio would give 50.
    saved = Schedule("cosine", 3e-3, 40, 400, 0.0)
    resumed = Schedule("cosine", 3e-3, 50, 500, 0.0).resumed_from(saved)
    assert resumed == Schedule("cosine", 3e-3, 40, 500, 0.0)
    assert resumed.lr(400) == lr_at(400, 500, 3e-3, 40, "cosine", 0.0) > 100 * saved.lr(399)
    assert [resumed.lr(s) for s in range(40)] == [saved.lr(s) for s in range(40)]  # the same warmup
    assert resumed.lr(499) < resumed.lr(450) < resumed.lr(400)  # decays to the floor at the new end
    notes = resumed.changes_since(saved, 400)
    assert len(notes) == 1 and "total steps 400 -> 500: the cosine decay is re-stretched to 500 steps" in notes[0]
    assert "learning-rate schedule changed" in Schedule("linear", 1e-3, 40, 500, 0.0).changes_since(saved, 400)[-1]


def result(loss_sum, targets, tokens=100, **changes):
    values = dict(loss_sum=loss_sum, target_tokens=targets, tokens=tokens, padded_tokens=120, samples=4, grad_norm=1.0,
                  lr=1e-3, skipped=False, data_seconds=0.01, forward_backward_seconds=0.1, optimizer_seconds=0.02)
    return StepResult(**{**values, **changes})


def test_the_metrics_window_is_token_weighted():
    window = MetricsWindow()
    window.add(result(30.0, 10), seconds=0.5, wait_seconds=0.1)
    window.add(result(10.0, 30, grad_norm=2.0), seconds=0.5, wait_seconds=0.0)
    assert result(30.0, 10).loss == 3.0
    values = window.scalars(result(10.0, 30, grad_norm=2.0), epoch=0.4, tokens_seen=200, samples_seen=8, mfu=None)
    assert values["train/loss"] == pytest.approx(40.0 / 40)  # not the mean of the step means (2.17)
    assert values["train/grad_norm"] == 2.0 and values["perf/tokens_per_second"] == pytest.approx(200.0)
    assert values["time/data"] == pytest.approx(0.12) and values["time/step"] == pytest.approx(0.5)
    assert values["perf/padding_ratio"] == pytest.approx(1 - 200 / 240) and "perf/mfu" not in values
    assert values["train/tokens_seen"] == 200 and values["train/samples_seen"] == 8


def test_a_resumed_metrics_file_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5, 6)) + '{"step": 7, "tr')
    assert [json.loads(line)["step"] for line in _entries_up_to(str(path), 4)] == [1, 2, 3, 4]
    assert _entries_up_to(str(tmp_path / "none.jsonl"), 4) == []


def test_packing_is_read_from_a_packed_folder_or_the_run(tmp_path):
    from types import SimpleNamespace

    from sft.train.runstate import packing_of

    def config(online):
        return SimpleNamespace(sft_train=SimpleNamespace(use_sequence_packing=online,
                                                         data_args=SimpleNamespace(packing_strategy="greedy")))

    assert packing_of(str(tmp_path), config(False)) == "none" and packing_of(str(tmp_path), config(True)) == "greedy"
    (tmp_path / "pack_meta.json").write_text(json.dumps({"strategy": "bfd", "source": "elsewhere"}))
    assert packing_of(str(tmp_path), config(True)) == "bfd"
