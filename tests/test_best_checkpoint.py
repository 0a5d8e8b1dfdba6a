"""The best checkpoint and early stopping: checkpoints ranked by their validation loss, kept beside the newest,
recorded in best.json and reachable as <output_dir>/best; a run that stops improving stops with a checkpoint, and a
resume of it keeps all of it."""

import json
import os

import pytest

from sft.config import load_config
from sft.errors import ConfigError
from sft.train import checkpoint as ckpt
from tests.test_train import setup, train  # noqa: F401 (setup is a fixture)


def fake_checkpoint(output_dir, step, val_loss):
    folder = ckpt.checkpoint_dir(str(output_dir), step)
    os.makedirs(folder)
    with open(os.path.join(folder, ckpt.STATE_FILE), "w") as handle:
        json.dump({"step": step, "val_loss": val_loss}, handle)
    open(os.path.join(folder, ckpt.COMPLETE), "w").close()


def test_rotation_keeps_the_newest_and_the_best_and_records_the_best(tmp_path):
    for step, loss in ((2, 3.0), (4, 1.5), (6, 2.0), (8, None), (10, 2.5)):
        fake_checkpoint(tmp_path, step, loss)
    removed = ckpt.rotate(str(tmp_path), keep=1, keep_best=2)
    assert sorted(removed) == ["checkpoint-2", "checkpoint-8"]
    assert [step for step, _ in ckpt.complete_checkpoints(str(tmp_path))] == [4, 6, 10]
    record = json.load(open(tmp_path / "sft_train" / ckpt.BEST_FILE))
    assert record == {"checkpoint": "checkpoint-4", "step": 4, "val_loss": 1.5}
    assert ckpt.best_checkpoint(str(tmp_path)) == ckpt.checkpoint_dir(str(tmp_path), 4)
    # keep <= 0 keeps every checkpoint, and still names the best.
    assert ckpt.rotate(str(tmp_path), keep=0, keep_best=0) == []


@pytest.mark.parametrize("field", ["keep_best", "early_stopping_patience"])
def test_ranking_by_validation_needs_validation_data(tmp_path, field):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=rf"sft_train\.training_args\.{field}: .*no validation data"):
        load_config(str(path), [f"--sft_train.training_args.{field}", "1"])


def test_early_stopping_saves_the_best_and_a_resume_keeps_it(setup, tmp_path):  # noqa: F811
    """A learning rate far too high makes the validation loss rise after its first steps: with patience 2 the run
    stops two evaluations after its best, saving there; keep_best keeps the best beside the one newest checkpoint,
    <output_dir>/best names it, and a resume finds nothing left to train."""
    from sft.export import find_model_folder

    out = tmp_path / "out"
    overrides = ["--sft_train.training_args.max_steps", "30", "--sft_train.training_args.learning_rate", "0.3",
                 "--sft_train.training_args.warmup_steps", "0", "--eval_steps", "1", "--save_steps", "1000",
                 "--sft_train.training_args.early_stopping_patience", "2", "--sft_train.training_args.keep_best", "1",
                 "--sft_train.training_args.save_total_limit", "1"]
    log = train(setup, out, *overrides).stdout
    losses = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    val = {entry["step"]: entry["val/loss"] for entry in losses if "val/loss" in entry}
    best_step = min(val, key=lambda step: (val[step], step))
    stopped = max(val)
    assert stopped < 30 and "early stop: 2 evaluations without a lower val/loss" in log
    later = [val[step] for step in sorted(val) if step > best_step]
    assert len(later) == 2 and all(loss >= val[best_step] for loss in later)
    assert [step for step, _ in ckpt.complete_checkpoints(str(out))] == [best_step, stopped]
    record = json.load(open(out / "sft_train" / ckpt.BEST_FILE))
    assert record["step"] == best_step and record["val_loss"] == pytest.approx(val[best_step], rel=1e-12)
    assert find_model_folder(str(out / "best")) == ckpt.model_dir(ckpt.checkpoint_dir(str(out), best_step), "sft_train")
    state = ckpt.read_state(ckpt.checkpoint_dir(str(out), stopped))
    assert (state["best_step"], state["evaluations_since_best"]) == (best_step, 2)

    resumed = train(setup, out, *overrides, "--resume_from_checkpoint", "true").stdout
    assert f"nothing to train: the run stopped early at step {stopped}" in resumed
    assert [step for step, _ in ckpt.complete_checkpoints(str(out))] == [best_step, stopped]
