"""Checkpoint folders: layout, atomic completion, discovery and rotation. Pure file operations.

    <output_dir>/sft_train/checkpoint-<step>/            renamed into place only when complete
        COMPLETE                                         marker, written before the rename
        MANIFEST.json                                    every file's size (and SHA-256 up to 16 MiB), checked on resume
        run_state.json                                   the run state (sft/train/runstate.py), checked on resume
        <cluster_name>/                                  HF model (safetensors, config) or, with LoRA, the PEFT
                                                         adapter (adapter_config.json, adapter_model.safetensors);
                                                         the tokenizer, and template.json naming the run's template
        training_state/                                  optimizer, RNG states per rank (accelerate save_state);
                                                         weights only under DeepSpeed (else resumed from the HF model)
    <output_dir>/sft_train/best.json                     the checkpoint with the lowest validation loss (run_state's
                                                         val_loss), rewritten at each save; <output_dir>/best names it

A checkpoint is written under ``.tmp-checkpoint-<step>`` and renamed, so a folder named
``checkpoint-<step>`` with ``COMPLETE`` was whole when written; its manifest tells whether it still is (a file
truncated, deleted or torn since, a safetensors file whose header does not match its size). Resume takes the
newest checkpoint that verifies; one that does not is moved aside to ``damaged-checkpoint-<step>`` (kept for
inspection, never resumed or rotated) and named in the run's log. Only the process holding the run lock
(sft/runlock.py) writes here, so any staging folder found at start belongs to a dead run and is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Optional

from sft.staging import move_into_place
from sft.errors import ConfigError, UserError
from sft.files import file_digest

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
HASHED_UP_TO = 16 << 20  # files up to this size get a SHA-256 in the manifest (configs, run state, RNG states)
STATE_FILE = "run_state.json"
BEST_FILE = "best.json"  # in <output_dir>/sft_train/: the checkpoint with the lowest validation loss
TRAINING_STATE = "training_state"
TEMPLATE_FILE = "template.json"
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(UserError):
    """A checkpoint folder is incomplete, damaged, from another model or from an older version of this toolkit."""


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


def resolve_resume(value: str, output_dir: str) -> tuple[Optional[str], list[str]]:
    """resume_from_checkpoint -> (a complete checkpoint folder that verifies, or None to start fresh; notes).

    ``true`` takes the newest complete checkpoint under output_dir that verifies (None when there is none yet, so
    the same command starts a run and resumes it); newer ones that do not verify are moved aside and named in
    the notes, and if none verifies the resume is refused. A path must be a complete checkpoint that verifies.
    """
    if value == "false":
        return None, []
    if value == "true":
        notes, found = [], complete_checkpoints(output_dir)
        for step, path in reversed(found):
            problem = verify(path)
            if problem is None:
                return path, notes
            aside = os.path.join(os.path.dirname(path), f"damaged-checkpoint-{step}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
            notes.append(f"skipped checkpoint-{step}: {problem}; moved to {aside}")
        if found:
            raise CheckpointError(f"no checkpoint in {checkpoints_root(output_dir)} can be resumed: " + "; ".join(notes)
                                  + ". Start a new run in another --output_dir, or with --resume_from_checkpoint false")
        return None, []
    path = value.rstrip(os.sep)
    if not is_complete(path) and is_complete(os.path.dirname(path)):
        path = os.path.dirname(path)  # the <cluster_name> model folder was given
    if not os.path.isdir(path):
        raise ConfigError(f"resume_from_checkpoint: {value} does not exist")
    if not is_complete(path):
        raise ConfigError(f"resume_from_checkpoint: {value} is not a complete checkpoint (no {COMPLETE} marker)")
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint: {value} is damaged: {problem}; resume from an earlier checkpoint")
    return path, []


def write_manifest(folder: str) -> dict:
    """Record every file under ``folder``: {relative path: {"size": bytes, "sha256": hex for files up to
    HASHED_UP_TO}}. Large files (weights, optimizer states) get their size only, and safetensors files are
    checked against their own header on resume: hashing tens of GiB would cost every save and every resume."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(parent, name)
            entry = {"size": os.path.getsize(path)}
            if entry["size"] <= HASHED_UP_TO:
                entry["sha256"] = file_digest(path)
            files[os.path.relpath(path, folder)] = entry
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1, sort_keys=True)
    return files


def _safetensors_problem(path: str) -> Optional[str]:
    """Does a safetensors file end where its header says its last tensor does?"""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return "its header runs past the end of the file"
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        return f"its header cannot be read ({error})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return f"{size:,} bytes where its header needs {8 + length + max(ends, default=0):,}"
    return None


def verify(checkpoint: str) -> Optional[str]:
    """Why a complete checkpoint cannot be resumed (a file missing, cut short, changed or unreadable), or None.
    Checkpoints from before manifests are checked for what they always held: a readable run state and whole
    safetensors files."""
    manifest_path = os.path.join(checkpoint, MANIFEST)
    files: Optional[dict] = None
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as handle:
                files = json.load(handle)["files"]
        except (ValueError, KeyError, TypeError) as error:
            return f"{MANIFEST} cannot be read ({error})"
        for relative, entry in files.items():
            path = os.path.join(checkpoint, relative)
            if not os.path.isfile(path):
                return f"{relative} is missing"
            if os.path.getsize(path) != entry["size"]:
                return f"{relative} has {os.path.getsize(path):,} bytes, {entry['size']:,} were saved"
            if "sha256" in entry and file_digest(path) != entry["sha256"]:
                return f"{relative} changed since it was saved (SHA-256 differs)"
    elif not os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        return f"no {STATE_FILE} (and no {MANIFEST}: a checkpoint of an older version of this toolkit, or damaged)"
    for parent, _, names in os.walk(checkpoint):
        for name in names:
            if name.endswith(".safetensors"):
                problem = _safetensors_problem(os.path.join(parent, name))
                if problem:
                    return f"{os.path.relpath(os.path.join(parent, name), checkpoint)}: {problem}"
    try:
        read_state(checkpoint)
    except CheckpointError as error:
        return str(error)
    return None


def finish(output_dir: str, step: int, state: dict) -> str:
    """Write the state and the marker into the staging folder, then rename it into place."""
    staging = staging_dir(output_dir, step)
    with open(os.path.join(staging, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
    write_manifest(staging)
    with open(os.path.join(staging, COMPLETE), "w", encoding="utf-8") as handle:
        handle.write("ok\n")
    final = checkpoint_dir(output_dir, step)
    move_into_place(staging, final)  # replaces an older save of the same step (e.g. after a resume)
    return final


def read_state(checkpoint: str) -> dict:
    """The run state a checkpoint was saved with (as written by ``finish``)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(checkpoint, MANIFEST)):
            raise CheckpointError(f"checkpoint {checkpoint}: its {STATE_FILE} was deleted after the save")
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_FILE} (written by an older version): its layout "
                              "and data cannot be checked; start a new run from its model (pretrain: the folder in it)")
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_FILE} is not valid JSON ({error}): cut short or "
                              "overwritten after the save") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_FILE} holds no run state")
    return state


def rotate(output_dir: str, keep: int, keep_best: int = 0) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints and the ``keep_best`` best by validation loss (keep
    <= 0 keeps all), then record the best one. Staging folders are left alone: a save in progress is never touched
    (stale ones are removed at start, ``remove_staging``)."""
    removed = []
    if keep > 0:
        best = {path for _, _, path in ranked_by_validation(output_dir)[:keep_best]}
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            if path not in best:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(os.path.basename(path))
    record_best(output_dir)
    return removed


def ranked_by_validation(output_dir: str) -> list[tuple[float, int, str]]:
    """(validation loss, step, path) of every complete checkpoint saved at an evaluation, lowest loss first (the
    earlier step first among equal losses)."""
    ranked = []
    for step, path in complete_checkpoints(output_dir):
        try:
            loss = read_state(path).get("val_loss")
        except CheckpointError:
            continue
        if loss is not None:
            ranked.append((loss, step, path))
    return sorted(ranked)


def record_best(output_dir: str) -> None:
    """Write <output_dir>/sft_train/best.json naming the checkpoint with the lowest validation loss (none: remove
    it). Written beside and renamed, so a reader never sees half of it."""
    target = os.path.join(checkpoints_root(output_dir), BEST_FILE)
    ranked = ranked_by_validation(output_dir)
    if not ranked:
        if os.path.exists(target):
            os.remove(target)
        return
    loss, step, path = ranked[0]
    staging = f"{target}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump({"checkpoint": os.path.basename(path), "step": step, "val_loss": loss}, handle, indent=2)
    os.replace(staging, target)


def best_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint that best.json names; None when none is recorded (or it is gone)."""
    target = os.path.join(checkpoints_root(output_dir), BEST_FILE)
    try:
        with open(target, encoding="utf-8") as handle:
            name = json.load(handle)["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = os.path.join(checkpoints_root(output_dir), str(name))
    return path if is_complete(path) else None


def remove_staging(output_dir: str) -> list[str]:
    """Remove every checkpoint staging folder under output_dir: called at start by the process holding the run
    lock, when any such folder is a dead run's unfinished save."""
    root, removed = checkpoints_root(output_dir), []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def write_template(model_folder: str, name: str, switches: Optional[dict] = None, jinja: Optional[str] = None) -> None:
    """Record the chat template a model was trained with: a name for sft.data.templates.get_template, its switches
    (chat_template_kwargs) and, for a Jinja-file template, the file's text (the path may be gone where the model
    is used)."""
    record = {"template": name}
    if switches:
        record["chat_template_kwargs"] = switches
    if jinja is not None:
        record["chat_template"] = jinja
    with open(os.path.join(model_folder, TEMPLATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def _template_record(model_folder: str) -> dict:
    path = os.path.join(model_folder, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def saved_template(model_folder: str) -> Optional[str]:
    """The template name a checkpoint's model folder was trained with; None when it records none."""
    return _template_record(model_folder).get("template")


def saved_template_settings(model_folder: str) -> tuple[dict, Optional[str]]:
    """The recorded template's switches and, for a Jinja-file template, its text."""
    record = _template_record(model_folder)
    return dict(record.get("chat_template_kwargs") or {}), record.get("chat_template")


def is_adapter(model_folder: str) -> bool:
    """Does this model folder hold a PEFT adapter (to load onto its base model) rather than a whole model?"""
    return os.path.isfile(os.path.join(model_folder, ADAPTER_CONFIG))
