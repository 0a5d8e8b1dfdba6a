"""A run's config: the top-level fields, the sections under them, and the checks that read across sections.

    python scripts/encode.py --config_path configs/demo.yaml --sft_train.data_args.template chatml

Every field has exactly one default (here or in sft/config/sections.py) and one docstring (shown by ``--help``).
load_config (sft/config/loading.py) types the YAML and the overrides through pydantic and runs ``check``: an invalid
value fails at start with a message naming the field. ``check_paths`` (input files exist) runs at a script's start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pydantic import with_config

from sft.config.fields import SECTION, Names, OptionalText, Resume
from sft.config.sections import (TEMPLATES, ValidationConfig, WorkerConfig, check_at_least_one, check_choice,
                                 check_template, is_jinja_file)
from sft.config.specs import looks_like_hub_id, spec_problem
from sft.errors import ConfigError

ACCEPTABLE_CHANGES = ("data", "tokenizer", "template", "sequence_length", "packing")
# Metrics trackers through Accelerate, and the package each needs (optional installs: requirements-trackers.txt).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}
# Keys of tracker_kwargs that are not a tracker's own options.
TRACKER_SETTINGS = ("log_dir",)


@with_config(SECTION)
@dataclass
class SFTConfig:
    """A supervised fine-tuning run."""

    exp_name: str = "sft"
    """Experiment name, used in logs and tracker runs."""
    seed: int = 42
    """Seed for data order, initialisation and dropout."""
    logging_dir: OptionalText = None
    """Text logs, metrics.jsonl and (under tensorboard/) TensorBoard events; None: <output_dir>/logs."""
    output_dir: str = "./output"
    """Checkpoints and encoded-data caches go here."""
    save_steps: int = 500
    """Save a checkpoint every this many optimizer steps."""
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    eval_steps: int = 100
    """Validate every this many optimizer steps (when validation data is set)."""
    resume_from_checkpoint: Resume = "false"
    """false, true (the newest complete checkpoint under output_dir) or a checkpoint path."""
    sequence_length: int = 2048
    """Longest sample (and packed row) in tokens."""
    pretrain: OptionalText = None
    """Model and tokenizer: an HF folder (a tokenizer-only folder is enough to encode) or a hub id."""
    system_key: OptionalText = None
    """Row key holding a system prompt; None: no system prompt from the data."""
    prompt_key: str = "instruction"
    """Row key holding the user prompt of single-turn rows."""
    query_key: OptionalText = "input"
    """Row key appended to the prompt after a newline when non-empty; set null (or "none") if the data has none."""
    response_key: str = "output"
    """Row key holding the assistant response of single-turn rows."""
    messages_key: OptionalText = None
    """Row key holding a multi-turn conversation (OpenAI role/content or ShareGPT from/value); set it to use multi-turn rows."""
    text_key: OptionalText = None
    """Row key holding plain text trained on every token, with the tokenizer's eos after it (continued pretraining
    before SFT; packed like any sample); a row without it is read as a conversation by the other keys."""
    tools_key: OptionalText = "tools"
    """Row key holding the tools offered to the model: a list of JSON-schema functions, or that list as a JSON string."""
    global_template: OptionalText = None
    """When set, overrides sft_train.data_args.template."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    track_with: Names = field(default_factory=lambda: ["tensorboard"])
    """Metrics trackers, any of tensorboard, wandb, mlflow, trackio (e.g. [tensorboard, wandb]); none (or []) for
    none. The project (wandb, trackio) or experiment (mlflow) is exp_name; the run's config is logged once."""
    tracker_kwargs: dict = field(default_factory=dict)
    """Each tracker's options under its name, e.g. {wandb: {name: run-7, tags: [sft]}, mlflow: {run_name: run-7,
    tracking_uri: file:./mlruns}, trackio: {name: run-7}}; log_dir: TensorBoard's folder (default
    <logging_dir>/tensorboard). mlflow's tracking_uri defaults to $MLFLOW_TRACKING_URI, else <logging_dir>/mlruns."""
    resume_accept_changes: Names = field(default_factory=list)
    """What a resume may find changed since its checkpoint, of: data, tokenizer, template, sequence_length, packing
    (otherwise such a resume is refused, naming what changed)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (e.g. 790 for bf16 on an H100 here); 0: known GPUs only."""
    cluster_name: str = "sft_train"
    """Last path component of a checkpoint: <output_dir>/sft_train/checkpoint-<step>/<cluster_name>/."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Validation settings."""
    sft_train: WorkerConfig = field(default_factory=WorkerConfig)
    """The SFT worker."""

    def logs_dir(self) -> str:
        """Where this run's logs go: logging_dir, or <output_dir>/logs."""
        return self.logging_dir or os.path.join(self.output_dir, "logs")

    def template_name(self) -> str:
        """The template in force: global_template when set, else sft_train.data_args.template."""
        return self.global_template or self.sft_train.data_args.template

    def check(self) -> None:
        """Each section's own checks, then those that read across sections (a bad value fails naming its field)."""
        self.sft_train.check()
        self.validation.check()
        data = self.sft_train.data_args
        if self.global_template is not None:
            check_template("global_template", self.global_template)
            if data.chat_template_kwargs and self.global_template in TEMPLATES and self.global_template != "native":
                raise ConfigError(f"sft_train.data_args.chat_template_kwargs: template {self.global_template} "
                                  "(global_template) is written in Python and takes no switches")
        if data.pad_to_multiple_of < 1 or self.sequence_length % data.pad_to_multiple_of:
            raise ConfigError(f"sft_train.data_args.pad_to_multiple_of: must be >= 1 and divide sequence_length "
                              f"{self.sequence_length}, got {data.pad_to_multiple_of}")
        for change in self.resume_accept_changes:
            check_choice("resume_accept_changes", change, ACCEPTABLE_CHANGES)
        self.check_trackers()
        args = self.sft_train.training_args
        for name in ("keep_best", "early_stopping_patience"):
            if getattr(args, name) and not self.validation.data_args.file_name:
                raise ConfigError(f"sft_train.training_args.{name}: ranks checkpoints by val/loss, but there is no "
                                  "validation data; set validation.data_args.file_name")
        for name in ("sequence_length", "save_steps", "logging_steps", "eval_steps"):
            check_at_least_one(name, getattr(self, name))
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm: must not be negative (0 disables clipping), got {self.max_grad_norm}")

    def trackers(self) -> list[str]:
        """The trackers in force (track_with without "none")."""
        return [name for name in self.track_with if name != "none"]

    def check_trackers(self) -> None:
        for name in self.track_with:
            check_choice("track_with", name, tuple(TRACKERS) + ("none",))
        if "none" in self.track_with and len(self.track_with) > 1:
            raise ConfigError(f"track_with: none cannot be listed with trackers, got {self.track_with}")
        for key, options in self.tracker_kwargs.items():
            if key in TRACKER_SETTINGS:
                continue
            if key not in TRACKERS:
                raise ConfigError(f"tracker_kwargs.{key}: not a tracker; give options under tensorboard, wandb, mlflow "
                                  f"or trackio (or {', '.join(TRACKER_SETTINGS)})")
            if key not in self.trackers():
                raise ConfigError(f"tracker_kwargs.{key}: {key} is not in track_with {self.track_with}")
            if not isinstance(options, dict):
                raise ConfigError(f"tracker_kwargs.{key}: expected a mapping of {key}'s options, got {options!r}")
            if "project" in options or "experiment_name" in options:
                raise ConfigError(f"tracker_kwargs.{key}: the project (or experiment) is exp_name; set exp_name")

    def check_paths(self) -> None:
        """Fail, naming the field, when a configured input file or folder does not exist."""
        if self.pretrain is None:
            raise ConfigError("pretrain: not set; give the model (or tokenizer) folder or hub id")
        if not os.path.exists(self.pretrain) and not looks_like_hub_id(self.pretrain):
            raise ConfigError(f"pretrain: folder not found: {self.pretrain}")
        template = self.template_name()
        if is_jinja_file(template) and not os.path.isfile(template):
            raise ConfigError(f"sft_train.data_args.template: Jinja file not found: {template}")
        encoded = self.sft_train.data_args.encoded_path
        if encoded is not None and not os.path.isdir(os.path.join(encoded, "train")):
            raise ConfigError(f"sft_train.data_args.encoded_path: {encoded} has no train/ folder (write it with scripts/encode.py --out)")
        if not self.sft_train.data_args.file_name and encoded is None:
            raise ConfigError("sft_train.data_args.file_name: not set; give .json/.jsonl/.parquet files, dataset folders or Hub ids")
        for name, files in (
            ("sft_train.data_args.file_name", self.sft_train.data_args.file_name),
            ("validation.data_args.file_name", self.validation.data_args.file_name),
        ):
            for path in files:
                problem = spec_problem(path)
                if problem is not None:
                    raise ConfigError(f"{name}: {problem}")
