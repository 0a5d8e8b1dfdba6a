"""The run state: what a checkpoint records about the run that wrote it, checked when a run resumes from it.

Every checkpoint holds ``run_state.json`` (a ``RunState``): position and counters (step, samples, tokens,
epoch), layout (global batch, processes, batch, accumulation, strategy), the identity of the training data
and the learning-rate schedule. No torch, no processes.

What a resume does with a difference (``check_resume``):

    changed since the checkpoint               resume
    processes, same global batch               continues at the same sample (refused where the strategy's
                                               training state does not reshard: DeepSpeed)
    global batch                               refused, naming a layout that keeps it
    strategy                                   refused (the training states differ)
    LoRA settings (or LoRA on/off)             refused (other trainable parameters)
    data, tokenizer, template, sequence_length,
    packing                                    refused, naming what changed, unless resume_accept_changes lists it
    max_steps / epochs                         the decay is re-stretched to the new total; warmup kept
    learning rate, schedule kind, floor        used from now on, with a note
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from sft.config import ACCEPTABLE_CHANGES
from sft.errors import UserError
from sft.train.schedule import Schedule



class ResumeError(UserError):
    """A checkpoint does not fit the run that would resume from it; the message says what differs and the fix."""


@dataclass(frozen=True)
class DataIdentity:
    """What the training rows are: a different value means other samples at the same step."""

    fingerprint: str
    """The encode cache key (sft.data.build.cache_key); "" when the data folder records none."""
    data: str
    """The part of the key that is the data itself: file contents, field mapping, encoding policies."""
    tokenizer: str
    """sft.data.build.tokenizer_fingerprint of the run's tokenizer."""
    template: str
    sequence_length: int
    packing: str
    """none, or the packing strategy (bfd, greedy), online or of a scripts/pack.py folder: the same rows either way."""

    @classmethod
    def of(cls, encode_meta: Optional[dict], tokenizer: str, template: str, sequence_length: int,
           packing: str) -> "DataIdentity":
        """From an encoded folder's encode_meta.json (cache_key and inputs) and the run's own settings."""
        meta = encode_meta or {}
        inputs = {key: value for key, value in meta.get("inputs", {}).items()
                  if key not in ("tokenizer", "template", "sequence_length")}
        data = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest() if inputs else ""
        return cls(meta.get("cache_key", ""), data, tokenizer, template, sequence_length, packing)


def packing_of(folder: str, config) -> str:
    """How the training rows are packed: as pack_meta.json of a scripts/pack.py folder says, else as the run packs
    them online (sft_train.use_sequence_packing), else none."""
    try:
        with open(os.path.join(folder, "pack_meta.json"), encoding="utf-8") as handle:
            return json.load(handle)["strategy"]
    except (OSError, ValueError, KeyError):
        pass
    if config.sft_train.use_sequence_packing:
        return config.sft_train.data_args.packing_strategy
    return "none"


@dataclass
class RunState:
    """Saved with every checkpoint as run_state.json; ``step`` optimizer steps are done."""

    global_batch: int
    processes: int
    per_device_batch: int
    accumulation: int
    strategy: str
    data: DataIdentity
    schedule: Schedule
    adapter: str = ""
    """What is trained: "" for all weights, else the LoRA settings (sft.train.lora.describe)."""
    step: int = 0
    samples: int = 0
    """Samples trained on (a packed row counts the samples in it)."""
    tokens: int = 0
    """Non-pad tokens trained on."""
    epoch: float = 0.0
    """Epochs done: step / steps per epoch."""
    val_loss: Optional[float] = None
    """The validation loss evaluated at this step, if one was (a checkpoint's rank among the best)."""
    best_val_loss: Optional[float] = None
    """The lowest validation loss so far, at ``best_step``."""
    best_step: int = 0
    evaluations_since_best: int = 0
    """Evaluations since the validation loss last improved (early stopping counts them)."""

    def advance(self, samples: int, tokens: int, steps_per_epoch: int) -> None:
        self.step += 1
        self.samples += samples
        self.tokens += tokens
        self.epoch = self.step / steps_per_epoch
        self.val_loss = None

    def validated(self, loss: float) -> bool:
        """Record this step's validation loss; True when it is the lowest so far."""
        self.val_loss = loss
        if self.best_val_loss is None or loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.evaluations_since_best = loss, self.step, 0
            return True
        self.evaluations_since_best += 1
        return False

    def layout(self) -> str:
        return (f"{self.global_batch} ({self.processes} processes x per_device_train_batch_size {self.per_device_batch} "
                f"x gradient_accumulation_steps {self.accumulation})")

    @classmethod
    def start(cls, layout, strategy: str, data: DataIdentity, schedule: Schedule, adapter: str = "") -> "RunState":
        """A run at step 0 (``layout``: sft.train.sampler.Layout)."""
        return cls(layout.global_batch, layout.processes, layout.micro_batch, layout.accumulation, strategy, data, schedule,
                   adapter)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "RunState":
        values = dict(values)
        values["data"] = DataIdentity(**values["data"])
        values["schedule"] = Schedule(**values["schedule"])
        return cls(**values)

    def continued_from(self, saved: "RunState") -> "RunState":
        """This run's layout, data and schedule, with the saved position and counters (and the saved warmup)."""
        return dataclasses.replace(self, step=saved.step, samples=saved.samples, tokens=saved.tokens, epoch=saved.epoch,
                                   schedule=self.schedule.resumed_from(saved.schedule), val_loss=saved.val_loss,
                                   best_val_loss=saved.best_val_loss, best_step=saved.best_step,
                                   evaluations_since_best=saved.evaluations_since_best)


def _describe(name: str, saved, now) -> str:
    if name in ("data", "tokenizer"):  # digests: show their heads
        return f"{name} ({str(saved)[:12] or 'unknown'}..., now {str(now)[:12] or 'unknown'}...)"
    return f"{name} ({saved!r}, now {now!r})"


def check_resume(saved: RunState, now: RunState, reshards: bool, accept: list[str], checkpoint: str,
                 cluster_name: str) -> list[str]:
    """Refuse a resume that would not continue the saved run (ResumeError naming the fix); notes otherwise."""
    where = f"resume_from_checkpoint: {checkpoint} (step {saved.step})"
    fresh_start = f"or start a new run from its model (pretrain: {checkpoint}/{cluster_name})"
    changed = []
    for name in ACCEPTABLE_CHANGES:
        before, after = getattr(saved.data, name), getattr(now.data, name)
        if name == "data" and not (before and after):
            continue  # a folder without encode_meta.json: nothing to compare
        if before != after:
            changed.append(name)
    refused = [name for name in changed if name not in accept]
    if refused:
        details = ", ".join(_describe(name, getattr(saved.data, name), getattr(now.data, name)) for name in refused)
        raise ResumeError(f"{where} was trained with other {details}; the run would go on with other samples at the "
                          "same step. Resume with the original inputs, or accept the change with "
                          f"--resume_accept_changes {' '.join(refused)}")
    if saved.adapter != now.adapter:
        trained = {"": "all weights"}
        raise ResumeError(f"{where} trained {trained.get(saved.adapter, saved.adapter)}, this run trains "
                          f"{trained.get(now.adapter, now.adapter)}; its weights and optimizer state do not fit: resume "
                          f"with the checkpoint's sft_train.model_args LoRA settings, {fresh_start}")
    if saved.strategy != now.strategy:
        raise ResumeError(f"{where} was written by {saved.strategy}, this run is {now.strategy}; their training states "
                          f"differ: resume with sft_train.strategy_args.strategy_name {saved.strategy}, {fresh_start}")
    if saved.global_batch != now.global_batch:
        per_process, rest = divmod(saved.global_batch, now.processes)
        if rest:
            fix = f"launch a process count that divides {saved.global_batch}"
        else:
            fix = f"with {now.processes} process(es) set per_device_train_batch_size x gradient_accumulation_steps = {per_process}"
            if per_process % now.per_device_batch == 0:
                fix += f" (e.g. gradient_accumulation_steps {per_process // now.per_device_batch})"
        raise ResumeError(f"{where} has a global batch of {saved.layout()}, this run {now.layout()}; steps count "
                          f"samples and the schedule in global batches, so it must stay {saved.global_batch}: {fix}")
    notes = []
    if saved.processes != now.processes:
        if not reshards:
            raise ResumeError(f"{where} was written by {saved.processes} processes under {saved.strategy}, whose "
                              f"training state is partitioned per process and loads only into as many: launch "
                              f"--num_processes {saved.processes}, {fresh_start}")
        notes.append(f"resuming the layout {saved.layout()} as {now.layout()}: the same samples per step")
    notes += [f"accepted a changed {_describe(name, getattr(saved.data, name), getattr(now.data, name))}"
              for name in changed]
    notes += now.schedule.resumed_from(saved.schedule).changes_since(saved.schedule, saved.step)
    return notes
