"""Trackers through Accelerate: TensorBoard, Weights & Biases (offline), MLflow (a local file store) and trackio
(a local folder), from one real run, read back from the files each library wrote. No network."""

import glob
import json
import os
import subprocess
import sys

import pytest

from sft.config import load_config
from sft.errors import ConfigError
from tests.conftest import ROOT
from tests.test_train import environment, setup  # noqa: F401 (setup is a fixture)

TRACKER_MODULES = ("wandb", "mlflow", "trackio", "tensorboard")


def require_tracker_packages():
    """The tracker packages come from requirements-trackers.txt: CI installs them, so there they must be present."""
    import importlib.util

    missing = [name for name in TRACKER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} not installed: CI installs requirements-trackers.txt")
        pytest.skip(f"{missing} not installed (pip install -r requirements-trackers.txt)")


def test_four_trackers_get_the_metrics_and_the_config_of_one_run(setup, tmp_path, monkeypatch):  # noqa: F811
    require_tracker_packages()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the run's file store back
    root, config = setup
    out = tmp_path / "out"
    env = dict(environment(root), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"), WANDB_SILENT="true",
               TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "wandb").mkdir()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config_path", config, "--output_dir", str(out),
         "--sft_train.training_args.max_steps", "3", "--save_steps", "3", "--exp_name", "tracked",
         "--track_with", "tensorboard", "wandb", "mlflow", "trackio",
         "--tracker_kwargs", "{wandb: {name: run-7, tags: [sft]}, mlflow: {run_name: run-7}, trackio: {name: run-7}}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = {entry["step"]: entry["train/loss"] for entry in logged if "train/loss" in entry}
    assert sorted(losses) == [1, 2, 3]

    # TensorBoard: event files under <logging_dir>/tensorboard/<exp_name>.
    assert glob.glob(str(out / "logs" / "tensorboard" / "tracked" / "events.out.tfevents.*"))

    # MLflow: a file store under <logging_dir>/mlruns, the run's loss per step and its config as parameters.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri="file:" + str(out / "logs" / "mlruns"))
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-7"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    assert run.data.params["sft_train.training_args.max_steps"] == "3"

    # Weights & Biases, offline: one run whose transaction log holds its name, tags, config and loss per step.
    (log,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, list(run.tags), run.project) == ("run-7", ["sft"], "tracked")
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert "sft_train.training_args.max_steps" in config_keys
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            if "train/loss" in items:
                history[items["_step"]] = items["train/loss"]
    assert history == pytest.approx(losses, rel=1e-6)

    # trackio: the project's SQLite database under TRACKIO_DIR holds run-7's loss per step.
    import sqlite3

    with sqlite3.connect(tmp_path / "trackio" / "tracked.db") as db:
        rows = db.execute("select run_name, step, metrics from metrics").fetchall()
    history = {step: json.loads(values)["train/loss"] for name, step, values in rows
               if name == "run-7" and "train/loss" in json.loads(values)}
    assert history == pytest.approx(losses, rel=1e-6)


def wandb_records(path: str) -> list:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) join into one record each."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    position, block, records, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--track_with", "comet"], "track_with: 'comet' is not one of tensorboard, wandb, mlflow, trackio, none"),
    (["--track_with", "none", "wandb"], "track_with: none cannot be listed with trackers"),
    (["--tracker_kwargs", "{wandb: {name: a}}"], r"tracker_kwargs\.wandb: wandb is not in track_with"),
    (["--track_with", "wandb", "--tracker_kwargs", "{wandb: {project: a}}"], r"tracker_kwargs\.wandb: the project .* "
                                                                             "is exp_name"),
    (["--track_with", "mlflow", "--tracker_kwargs", "{mlflow: run-7}"], r"tracker_kwargs\.mlflow: expected a mapping"),
    (["--tracker_kwargs", "{neptune: {}}"], r"tracker_kwargs\.neptune: not a tracker"),
])
def test_tracker_settings_are_checked_naming_the_field(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "seed: 1\n"), args)


def test_track_with_reads_one_name_a_list_or_none(tmp_path):
    path = write(tmp_path, "track_with: wandb\n")
    assert load_config(path, []).trackers() == ["wandb"]
    assert load_config(path, ["--track_with", "[tensorboard, mlflow]"]).trackers() == ["tensorboard", "mlflow"]
    assert load_config(path, ["--track_with", "none"]).trackers() == []
    assert load_config(write(tmp_path, "track_with: []\n"), []).trackers() == []


def test_a_missing_tracker_package_is_one_error_naming_the_install(tmp_path, monkeypatch):
    import importlib.util

    from sft.train.metrics import require_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = load_config(write(tmp_path, "track_with: [tensorboard, wandb]\n"), [])
    with pytest.raises(ConfigError, match=r"track_with: wandb is not installed; pip install wandb"):
        require_trackers(config)
