"""Checkpoint folders: layout, atomic completion, discovery and rotation. Pure file operations.

    <output_dir>/sft_train/checkpoint-<step>/            renamed into place only when complete
        COMPLETE                                         marker, written before the rename
        run_state.json                                   the run state (sft/runstate.py), checked on resume
        <cluster_name>/                                  HF model (safetensors, config) or, with LoRA, the PEFT
                                                         adapter (adapter_config.json, adapter_model.safetensors);
                                                         the tokenizer, and template.json naming the run's template
        training_state/                                  optimizer, RNG states per rank (accelerate save_state);
                                                         weights only under DeepSpeed (else resumed from the HF model)

A checkpoint is written under ``.tmp-checkpoint-<step>`` and renamed, so a folder named
``checkpoint-<step>`` with ``COMPLETE`` is whole; anything else is ignored by resume and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from sft.config import ConfigError
from sft.errors import UserError

COMPLETE = "COMPLETE"
STATE_FILE = "run_state.json"
TRAINING_STATE = "training_state"
TEMPLATE_FILE = "template.json"
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(UserError):
    """A checkpoint folder is incomplete, from another model or from an older version of this toolkit."""


_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "sft_train")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"checkpoint-{step}")


def staging_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f".tmp-checkpoint-{step}")


def model_dir(checkpoint: str, cluster_name: str) -> str:
    """Where the HF model of a checkpoint lives: <checkpoint>/<cluster_name>/."""
    return os.path.join(checkpoint, cluster_name)


def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, COMPLETE))


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append((int(match[1]), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(value: str, output_dir: str) -> Optional[str]:
    """resume_from_checkpoint -> a complete checkpoint folder, or None to start fresh.

    ``true`` takes the newest complete checkpoint under output_dir (None when there is none yet, so the
    same command starts a run and resumes it); a path must be a complete checkpoint.
    """
    if value == "false":
        return None
    if value == "true":
        return latest_checkpoint(output_dir)
    path = value.rstrip(os.sep)
    if not is_complete(path) and is_complete(os.path.dirname(path)):
        path = os.path.dirname(path)  # the <cluster_name> model folder was given
    if not os.path.isdir(path):
        raise ConfigError(f"resume_from_checkpoint: {value} does not exist")
    if not is_complete(path):
        raise ConfigError(f"resume_from_checkpoint: {value} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def finish(output_dir: str, step: int, state: dict) -> str:
    """Write the state and the marker into the staging folder, then rename it into place."""
    staging = staging_dir(output_dir, step)
    with open(os.path.join(staging, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
    with open(os.path.join(staging, COMPLETE), "w", encoding="utf-8") as handle:
        handle.write("ok\n")
    final = checkpoint_dir(output_dir, step)
    if os.path.exists(final):  # an older save of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def read_state(checkpoint: str) -> dict:
    """The run state a checkpoint was saved with (as written by ``finish``)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_FILE} (written by an older version): its layout "
                              "and data cannot be checked; start a new run from its model (pretrain: the folder in it)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def rotate(output_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0 keeps all) and stale staging folders."""
    removed = []
    root = checkpoints_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    if keep > 0:
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
    return removed


def write_template(model_folder: str, name: str) -> None:
    """Record the chat template a model was trained with (a name for sft.templates.get_template)."""
    with open(os.path.join(model_folder, TEMPLATE_FILE), "w", encoding="utf-8") as handle:
        json.dump({"template": name}, handle)


def saved_template(model_folder: str) -> Optional[str]:
    """The template name a checkpoint's model folder was trained with; None when it records none."""
    path = os.path.join(model_folder, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("template")


def is_adapter(model_folder: str) -> bool:
    """Does this model folder hold a PEFT adapter (to load onto its base model) rather than a whole model?"""
    return os.path.isfile(os.path.join(model_folder, ADAPTER_CONFIG))
