"""The run config: typed dataclasses with the seed's field names, read from YAML plus dotted CLI overrides.

    python scripts/encode.py --config_path configs/demo.yaml --sft_train.data_args.template chatml

Every field has exactly one default (here) and one docstring (shown by ``--help``). ``load_config``
parses, normalises and validates; an invalid value fails at start with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from sft.errors import ConfigError
from sft.specs import looks_like_hub_id, spec_problem
from sft.strategy_options import check_strategy_args

TEMPLATES = ("native", "qwen2_5", "qwen3", "chatml", "llama3", "base", "empty", "alpaca")
OVERLONG_POLICIES = ("truncate", "drop", "error")
BAD_SAMPLE_POLICIES = ("error", "skip")
LOSS_ON_TURNS = ("all", "last")
DTYPES = ("bf16", "fp16", "fp32")
# Values a user may write to mean "no value" for an optional string field on the command line, where
# simple-parsing cannot produce None.
_NONE_STRINGS = ("", "none", "null", "None", "~")


def _mapping(text: Any) -> dict:
    """A mapping field from the command line, written as YAML: --tracker_kwargs '{log_dir: runs/a}'."""
    import yaml

    value = yaml.safe_load(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping like '{{key: value}}', got {text!r}")
    return value


def _mapping_field():
    from simple_parsing.helpers import field as parsed_field

    return parsed_field(default_factory=dict, type=_mapping)


@dataclass
class DataArgs:
    """Where the training data is and how it becomes (input_ids, labels)."""

    file_name: list[str] = field(default_factory=list)
    """Training data: .json (array of rows), .jsonl, .parquet files, a save_to_disk folder, a dataset folder or a
    Hub dataset id (org/name; pick a config and split with org/name?config=C&split=S)."""
    template: str = "native"
    """Chat template: native (the tokenizer's own), qwen2_5, qwen3, chatml, llama3, base/empty, alpaca."""
    preprocessing_num_workers: int = 1
    """Processes used to encode the data (datasets.map num_proc)."""
    overlong: str = "truncate"
    """Samples longer than sequence_length: truncate (keep the start), drop, or error."""
    on_bad_sample: str = "error"
    """A malformed row: error (stop, naming file, row and reason) or skip (count it, write it to the rejects file)."""
    loss_on_turns: str = "all"
    """Which assistant turns of a multi-turn row are trained on: all, or last (earlier ones become context)."""
    train_on_reasoning: bool = True
    """Supervise the reasoning (reasoning_content, or a <think> block) of trained turns; false masks it and keeps
    the answer and tool calls supervised."""
    packing_strategy: str = "bfd"
    """With use_sequence_packing: bfd (fewest rows: best-fit decreasing, then its loose rows re-packed) or greedy
    (keeps the sample order)."""
    pad_to_multiple_of: int = 1
    """Pad every (packed) row to a multiple of this many tokens (tensor/context parallel alignment)."""
    encoded_path: Optional[str] = None
    """A folder written by scripts/encode.py (or pack.py) to train from instead of encoding file_name."""
    rejects_file: Optional[str] = None
    """Where skipped rows are written (JSONL with reasons). Default: rejects-<split>.jsonl beside the encoded data."""


@dataclass
class ValidationDataArgs:
    """Validation data; encoded with the same mapping and template as training."""

    file_name: list[str] = field(default_factory=list)
    """Validation data, in the forms sft_train.data_args.file_name takes. Empty: no validation."""


@dataclass
class ValidationConfig:
    data_args: ValidationDataArgs = field(default_factory=ValidationDataArgs)
    """Validation data."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts answered greedily before and after training, printed at the end of the run."""
    max_new_tokens: int = 48
    """Tokens generated per sample prompt."""


@dataclass
class TrainingArgs:
    """Optimisation settings."""

    num_train_epochs: float = 1.0
    """Epochs to train when max_steps is -1."""
    max_steps: int = -1
    """Optimizer steps to train; -1 derives them from num_train_epochs."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    per_device_train_batch_size: int = 1
    """Samples (or packed rows) per micro-batch per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    dataloader_num_workers: int = 0
    """DataLoader worker processes per training process (0: batches are built in the training process)."""
    lr_scheduler_type: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warmup steps; 0 uses warmup_ratio."""
    warmup_ratio: float = 0.0
    """Fraction of the run spent in linear warmup when warmup_steps is 0."""
    min_lr_ratio: float = 0.0
    """The decay ends at learning_rate * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    save_total_limit: int = 0
    """Keep only the newest this many checkpoints; 0 keeps all."""
    on_nan: str = "error"
    """A NaN/inf loss: error (stop, naming the step) or skip (drop that optimizer step; not with deepspeed_train)."""


@dataclass
class StrategyArgs:
    """How the model is distributed across processes."""

    strategy_name: str = "ddp_train"
    """ddp_train, deepspeed_train (ZeRO stage/offload in strategy_config) or fsdp2_train."""
    strategy_config: dict = _mapping_field()
    """Strategy options, e.g. {zero_stage: 3, offload_optimizer: false} for deepspeed_train."""


@dataclass
class ModelArgs:
    """How the model is loaded."""

    dtype: str = "bf16"
    """Compute precision: bf16, fp16 or fp32 (master weights and optimizer state stay fp32)."""
    attn_implementation: str = "auto"
    """auto (per-sample attention with the math the model runs with: varlen for sdpa models, varlen_eager for
    eager-only ones such as gpt-oss and Gemma 2), varlen, varlen_eager, sdpa, eager, flash_attention_2 or
    flex_attention. A packed run that names sdpa or eager gets that math per sample (varlen / varlen_eager)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    from_scratch: bool = False
    """Initialise the weights randomly from the model config instead of loading them."""
    model_config: Optional[str] = None
    """Folder (or file) with the config.json used by from_scratch; default: pretrain."""
    loss_chunk_size: int = 1024
    """Target tokens per chunk of the output layer + cross-entropy, so a step's logits never all exist at once
    (0: all at once)."""
    lora_rank: int = 0
    """LoRA adapter rank; 0 trains all weights."""
    lora_alpha: Optional[float] = None
    """LoRA scaling numerator (the update is scaled by alpha / rank); default 2 x lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: all-linear (every linear layer but the output layer), module names
    (q_proj, v_proj, ...), or one regex over full module names."""
    additional_target: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [embed_tokens, lm_head] for new tokens."""
    router_aux_loss_coef: Optional[float] = None
    """MoE models: weight of the router's load-balancing loss in the objective (per sample, sft/moe.py); default:
    the model config's router_aux_loss_coef (Qwen3-MoE 0.001, Mixtral 0.02); 0 turns it off."""
    quantization_bit: int = 0
    """4: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes (needs a GPU and lora_rank > 0); 0: off."""


@dataclass
class WorkerConfig:
    """The SFT worker: data, optimisation, strategy and model settings."""

    data_args: DataArgs = field(default_factory=DataArgs)
    """Training data and encoding."""
    training_args: TrainingArgs = field(default_factory=TrainingArgs)
    """Optimisation."""
    strategy_args: StrategyArgs = field(default_factory=StrategyArgs)
    """Distribution strategy."""
    model_args: ModelArgs = field(default_factory=ModelArgs)
    """Model loading."""
    device_mapping: Optional[str] = None
    """Devices this worker uses, e.g. "list(range(0,8))" or "[0,1]"; None: all visible ones."""
    infer_batch_size: int = 1
    """Micro-batch size for validation forward passes."""
    use_sequence_packing: bool = False
    """Pack several samples per row (position_ids restart per sample) instead of padding."""

    def device_ids(self) -> Optional[list[int]]:
        """device_mapping as a list of ints, parsed without eval."""
        return parse_device_mapping(self.device_mapping)


@dataclass
class SFTConfig:
    """A supervised fine-tuning run."""

    exp_name: str = "sft"
    """Experiment name, used in logs and tracker runs."""
    seed: int = 42
    """Seed for data order, initialisation and dropout."""
    logging_dir: Optional[str] = None
    """Text logs, metrics.jsonl and (under tensorboard/) TensorBoard events; None: <output_dir>/logs."""
    output_dir: str = "./output"
    """Checkpoints and encoded-data caches go here."""
    save_steps: int = 500
    """Save a checkpoint every this many optimizer steps."""
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    eval_steps: int = 100
    """Validate every this many optimizer steps (when validation data is set)."""
    resume_from_checkpoint: str = "false"
    """false, true (the newest complete checkpoint under output_dir) or a checkpoint path."""
    sequence_length: int = 2048
    """Longest sample (and packed row) in tokens."""
    pretrain: Optional[str] = None
    """Model and tokenizer: an HF folder (a tokenizer-only folder is enough to encode) or a hub id."""
    system_key: Optional[str] = None
    """Row key holding a system prompt; None: no system prompt from the data."""
    prompt_key: str = "instruction"
    """Row key holding the user prompt of single-turn rows."""
    query_key: Optional[str] = "input"
    """Row key appended to the prompt after a newline when non-empty; set null (or "none") if the data has none."""
    response_key: str = "output"
    """Row key holding the assistant response of single-turn rows."""
    messages_key: Optional[str] = None
    """Row key holding a multi-turn conversation (OpenAI role/content or ShareGPT from/value); set it to use multi-turn rows."""
    tools_key: Optional[str] = "tools"
    """Row key holding the tools offered to the model: a list of JSON-schema functions, or that list as a JSON string."""
    global_template: Optional[str] = None
    """When set, overrides sft_train.data_args.template."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    track_with: str = "tensorboard"
    """Metrics tracker: tensorboard or none."""
    tracker_kwargs: dict = _mapping_field()
    """Tracker options, e.g. {log_dir: ./output/tensorboard}."""
    resume_accept_changes: list[str] = field(default_factory=list)
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

    def __post_init__(self) -> None:
        _normalise_and_check(self, "")
        self._check_combinations()

    def logs_dir(self) -> str:
        """Where this run's logs go: logging_dir, or <output_dir>/logs."""
        return self.logging_dir or os.path.join(self.output_dir, "logs")

    def template_name(self) -> str:
        """The template in force: global_template when set, else sft_train.data_args.template."""
        return self.global_template or self.sft_train.data_args.template

    def _check_combinations(self) -> None:
        data = self.sft_train.data_args
        _check_choice("sft_train.data_args.template", data.template, TEMPLATES)
        if self.global_template is not None:
            _check_choice("global_template", self.global_template, TEMPLATES)
        _check_choice("sft_train.data_args.overlong", data.overlong, OVERLONG_POLICIES)
        _check_choice("sft_train.data_args.on_bad_sample", data.on_bad_sample, BAD_SAMPLE_POLICIES)
        _check_choice("sft_train.data_args.loss_on_turns", data.loss_on_turns, LOSS_ON_TURNS)
        _check_choice("sft_train.data_args.packing_strategy", data.packing_strategy, ("bfd", "greedy"))
        if data.pad_to_multiple_of < 1 or self.sequence_length % data.pad_to_multiple_of:
            raise ConfigError(f"sft_train.data_args.pad_to_multiple_of: must be >= 1 and divide sequence_length "
                              f"{self.sequence_length}, got {data.pad_to_multiple_of}")
        _check_choice("sft_train.model_args.dtype", self.sft_train.model_args.dtype, DTYPES)
        _check_choice("sft_train.model_args.attn_implementation", self.sft_train.model_args.attn_implementation,
                      ("auto", "varlen", "varlen_eager", "sdpa", "eager", "flash_attention_2", "flex_attention"))
        from sft.lora import check_lora_args

        check_lora_args(self.sft_train.model_args)
        if self.sft_train.model_args.loss_chunk_size < 0:
            raise ConfigError(f"sft_train.model_args.loss_chunk_size: must not be negative (0: no chunks), "
                              f"got {self.sft_train.model_args.loss_chunk_size}")
        if (self.sft_train.model_args.router_aux_loss_coef or 0.0) < 0:
            raise ConfigError("sft_train.model_args.router_aux_loss_coef: must not be negative (0: off), got "
                              f"{self.sft_train.model_args.router_aux_loss_coef}")
        args = self.sft_train.training_args
        # Choices owned by the modules that implement them (torch-free at import, and they import no config).
        from sft.runstate import ACCEPTABLE_CHANGES
        from sft.schedule import SCHEDULES

        _check_choice("sft_train.training_args.lr_scheduler_type", args.lr_scheduler_type, SCHEDULES)
        _check_choice("sft_train.training_args.on_nan", args.on_nan, ("error", "skip"))
        strategy = self.sft_train.strategy_args
        check_strategy_args(strategy.strategy_name, strategy.strategy_config, args.on_nan)
        for change in self.resume_accept_changes:
            _check_choice("resume_accept_changes", change, ACCEPTABLE_CHANGES)
        _check_choice("track_with", self.track_with, ("tensorboard", "none"))
        positive = {
            "sequence_length": self.sequence_length,
            "save_steps": self.save_steps,
            "logging_steps": self.logging_steps,
            "eval_steps": self.eval_steps,
            "sft_train.data_args.preprocessing_num_workers": data.preprocessing_num_workers,
            "sft_train.training_args.per_device_train_batch_size": self.sft_train.training_args.per_device_train_batch_size,
            "sft_train.training_args.gradient_accumulation_steps": self.sft_train.training_args.gradient_accumulation_steps,
            "sft_train.infer_batch_size": self.sft_train.infer_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        if args.max_steps < -1 or args.max_steps == 0:
            raise ConfigError(f"sft_train.training_args.max_steps: must be positive or -1 (derive from epochs), got {args.max_steps}")
        if args.max_steps == -1 and args.num_train_epochs <= 0:
            raise ConfigError(f"sft_train.training_args.num_train_epochs: must be positive when max_steps is -1, got {args.num_train_epochs}")
        if args.learning_rate < 0:
            raise ConfigError(f"sft_train.training_args.learning_rate: must not be negative, got {args.learning_rate}")
        if args.dataloader_num_workers < 0:
            raise ConfigError(f"sft_train.training_args.dataloader_num_workers: must not be negative, got {args.dataloader_num_workers}")
        if not 0 <= args.warmup_ratio < 1:
            raise ConfigError(f"sft_train.training_args.warmup_ratio: must be in [0, 1), got {args.warmup_ratio}")
        if args.warmup_steps < 0 or args.save_total_limit < 0:
            raise ConfigError("sft_train.training_args.warmup_steps and save_total_limit must not be negative")
        if self.validation.max_new_tokens < 1:
            raise ConfigError(f"validation.max_new_tokens: must be at least 1, got {self.validation.max_new_tokens}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm: must not be negative (0 disables clipping), got {self.max_grad_norm}")
        parse_device_mapping(self.sft_train.device_mapping)

    def check_paths(self) -> None:
        """Fail, naming the field, when a configured input file or folder does not exist."""
        if self.pretrain is None:
            raise ConfigError("pretrain: not set; give the model (or tokenizer) folder or hub id")
        if not os.path.exists(self.pretrain) and not looks_like_hub_id(self.pretrain):
            raise ConfigError(f"pretrain: folder not found: {self.pretrain}")
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


def parse_device_mapping(value: Optional[str]) -> Optional[list[int]]:
    """Parse the seed's device_mapping forms ("list(range(0,8))", "[0, 1]", "0,1") without eval."""
    if value is None:
        return None
    text = str(value).replace(" ", "")
    match = re.fullmatch(r"list\(range\((\d+),(\d+)(?:,(\d+))?\)\)", text)
    if match:
        start, stop, step = int(match[1]), int(match[2]), int(match[3] or 1)
        ids = list(range(start, stop, step))
    elif re.fullmatch(r"\[?\d+(,\d+)*\]?", text):
        ids = [int(part) for part in text.strip("[]").split(",")]
    else:
        raise ConfigError(f"sft_train.device_mapping: cannot read {value!r}; write e.g. 'list(range(0,8))' or '[0,1]'")
    if not ids:
        raise ConfigError(f"sft_train.device_mapping: {value!r} names no device")
    return ids


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _normalise_and_check(obj: Any, prefix: str) -> None:
    """Coerce YAML values to the annotated types (YAML leaves '1e-5' a string) and reject wrong ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            if isinstance(value, dict):  # a nested section given as a plain mapping
                try:
                    value = annotation(**value)
                except TypeError as error:
                    raise ConfigError(f"{path}: {error}") from None
                setattr(obj, f.name, value)
            _normalise_and_check(value, path + ".")
            continue
        setattr(obj, f.name, _coerce(path, value, annotation))
    if isinstance(obj, SFTConfig):
        obj.resume_from_checkpoint = _normalise_resume(obj.resume_from_checkpoint)


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, members[0]
        origin = typing.get_origin(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be null")
    if optional and annotation is str and isinstance(value, str) and value in _NONE_STRINGS:
        return None
    if path.endswith("resume_from_checkpoint"):
        return value  # bool or str, normalised by _normalise_resume
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]  # the command line gives a list of its words
        if isinstance(value, str) and value.strip().startswith("["):  # a YAML list given as one string: "[a, b]"
            value = _yaml_value(path, value)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{path}: expected a path or a list of paths, got {value!r}")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    return value


def _yaml_value(path: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: cannot read {text!r} as a list: {error}") from None


def _normalise_resume(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.lower()
    if text.lower() in _NONE_STRINGS:
        return "false"
    return text


def load_config(config_path: Optional[str] = None, args: Optional[list[str]] = None, check_paths: bool = True,
                extra: Optional[type] = None) -> SFTConfig:
    """Parse ``--config_path FILE.yaml`` plus dotted overrides into an SFTConfig and validate it.

    ``extra`` is an optional dataclass of script-specific options (e.g. encode.py's ``--out``),
    parsed from the same command line and returned as ``(config, extra)``.
    """
    import simple_parsing
    import yaml
    from simple_parsing import ArgumentGenerationMode, NestedMode

    argv = sys.argv[1:] if args is None else list(args)
    if config_path is not None:
        argv = ["--config_path", config_path, *argv]
    extra_values = None
    if extra is not None:
        # Script options are parsed apart: simple-parsing would otherwise look for them in the YAML too.
        extra_parser = simple_parsing.ArgumentParser(add_help=False)
        extra_parser.add_arguments(extra, dest="extra")
        known, argv = extra_parser.parse_known_args(argv)
        extra_values = known.extra
    class Parser(simple_parsing.ArgumentParser):
        def error(self, message):  # argparse would print usage and exit; name the field in a ConfigError
            raise ConfigError(message.replace("argument --", "").replace("/--sft_train.no", " / no"))

    parser = Parser(
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        add_config_path_arg=True,
        description="Supervised fine-tuning run config (YAML via --config_path, overridden by dotted flags).",
    )
    parser.add_arguments(SFTConfig, dest="config")
    path = _config_file(argv)
    if path is not None:  # simple-parsing would end in a bare FileNotFoundError or a YAML parser traceback
        if not os.path.isfile(path):
            raise ConfigError(f"config_path: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"config_path: {path} is not valid YAML: {error}") from None
    try:
        namespace = parser.parse_args(argv)
    except RuntimeError as error:  # simple-parsing reports unknown YAML keys this way
        match = re.search(r"\[(.*)\] are not fields of <class '[\w.]+\.(\w+)'> at path '([\w.]+)'", str(error))
        if match:
            section = match[3].removeprefix("config").lstrip(".")
            where = f"section '{section}'" if section else "the top level"
            raise ConfigError(
                f"unknown config key(s) {match[1]} at {where} of {path} ({match[2]} has no such field)"
            ) from None
        raise ConfigError(str(error)) from None
    config = namespace.config
    if check_paths:
        config.check_paths()
    if extra is not None:
        return config, extra_values
    return config


def _config_file(argv: list[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--config_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None
