"""The sections of a run config: one dataclass per section, one default and one docstring per field, and each
section's own checks beside it (cross-section checks sit in sft/config/run.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from pydantic import with_config

from sft.config.fields import SECTION, Names, OptionalNumber, OptionalText
from sft.config.strategy_options import check_strategy_args
from sft.errors import ConfigError

TEMPLATES = ("native", "qwen2_5", "qwen3", "chatml", "llama3", "base", "empty", "alpaca")
JINJA_SUFFIXES = (".jinja", ".j2")  # a template setting ending so is a Jinja file
OVERLONG_POLICIES = ("truncate", "drop", "error")
BAD_SAMPLE_POLICIES = ("error", "skip")
LOSS_ON_TURNS = ("all", "last")
DTYPES = ("bf16", "fp16", "fp32")
ATTENTION = ("auto", "varlen", "varlen_eager", "sdpa", "eager", "flash_attention_2", "flex_attention")
SCHEDULES = ("linear", "cosine", "constant")
NAN_POLICIES = ("error", "skip")
PACKING_STRATEGIES = ("bfd", "greedy")
REGEX_CHARS = re.compile(r"[\\^$.*+?()\[\]{}|]")  # a lora_target entry with one of these is a regex


@with_config(SECTION)
@dataclass
class DataArgs:
    """Where the training data is and how it becomes (input_ids, labels)."""

    file_name: Names = field(default_factory=list)
    """Training data: .json (array of rows), .jsonl, .parquet files, a save_to_disk folder, a dataset folder or a
    Hub dataset id (org/name; pick a config and split with org/name?config=C&split=S)."""
    template: str = "native"
    """Chat template: native (the tokenizer's own), a Jinja file (a path ending .jinja or .j2, rendered like native),
    or one written in Python: qwen2_5, qwen3, chatml, llama3, base/empty, alpaca."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Switches given to every render of a native or Jinja-file template (the labels, its load-time probes, the
    generation prompts of sample prompts and scripts/chat.py), e.g. {enable_thinking: false} for Qwen3 or
    {reasoning_effort: low} for gpt-oss; recorded in the encode cache key, the run state and the checkpoint."""
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
    encoded_path: OptionalText = None
    """A folder written by scripts/encode.py (or pack.py) to train from instead of encoding file_name."""
    rejects_file: OptionalText = None
    """Where skipped rows are written (JSONL with reasons). Default: rejects-<split>.jsonl beside the encoded data."""

    def check(self) -> None:
        prefix = "sft_train.data_args"
        check_template(f"{prefix}.template", self.template)
        if self.chat_template_kwargs and self.template in TEMPLATES and self.template != "native":
            raise ConfigError(f"{prefix}.chat_template_kwargs: template {self.template} is written in Python and takes "
                              "no switches; use template native (the tokenizer's own) or a Jinja file")
        check_choice(f"{prefix}.overlong", self.overlong, OVERLONG_POLICIES)
        check_choice(f"{prefix}.on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)
        check_choice(f"{prefix}.loss_on_turns", self.loss_on_turns, LOSS_ON_TURNS)
        check_choice(f"{prefix}.packing_strategy", self.packing_strategy, PACKING_STRATEGIES)
        check_at_least_one(f"{prefix}.preprocessing_num_workers", self.preprocessing_num_workers)


@with_config(SECTION)
@dataclass
class ValidationDataArgs:
    """Validation data; encoded with the same mapping and template as training."""

    file_name: Names = field(default_factory=list)
    """Validation data, in the forms sft_train.data_args.file_name takes. Empty: no validation."""


@with_config(SECTION)
@dataclass
class ValidationConfig:
    data_args: ValidationDataArgs = field(default_factory=ValidationDataArgs)
    """Validation data."""
    sample_prompts: Names = field(default_factory=list)
    """Prompts answered greedily before and after training, printed at the end of the run."""
    max_new_tokens: int = 48
    """Tokens generated per sample prompt and per generate_samples answer."""
    generate_samples: int = 0
    """At each evaluation, answer the first this many validation samples greedily (their prompt: the sample up to
    its last supervised turn) and log val/exact_match against that turn, with the answers (0: off)."""

    def check(self) -> None:
        check_at_least_one("validation.max_new_tokens", self.max_new_tokens)
        if self.generate_samples < 0:
            raise ConfigError(f"validation.generate_samples: must not be negative (0: off), got {self.generate_samples}")
        if self.generate_samples and not self.data_args.file_name:
            raise ConfigError("validation.generate_samples: answers validation samples, but there is no validation "
                              "data; set validation.data_args.file_name")


@with_config(SECTION)
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
    """Keep only the newest this many checkpoints (and the keep_best best); 0 keeps all."""
    keep_best: int = 0
    """Also keep the this many checkpoints with the lowest val/loss, beside the save_total_limit newest; a new best
    validation loss is saved at once (needs validation data; the best is named in <output_dir>/sft_train/best.json)."""
    early_stopping_patience: int = 0
    """Stop, with a checkpoint, after this many evaluations without a lower val/loss (0: never; needs validation
    data)."""
    on_nan: str = "error"
    """A NaN/inf loss: error (stop, naming the step) or skip (drop that optimizer step; not with deepspeed_train)."""

    def check(self) -> None:
        prefix = "sft_train.training_args"
        check_choice(f"{prefix}.lr_scheduler_type", self.lr_scheduler_type, SCHEDULES)
        check_choice(f"{prefix}.on_nan", self.on_nan, NAN_POLICIES)
        check_at_least_one(f"{prefix}.per_device_train_batch_size", self.per_device_train_batch_size)
        check_at_least_one(f"{prefix}.gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError(f"{prefix}.max_steps: must be positive or -1 (derive from epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"{prefix}.num_train_epochs: must be positive when max_steps is -1, got {self.num_train_epochs}")
        if self.learning_rate < 0:
            raise ConfigError(f"{prefix}.learning_rate: must not be negative, got {self.learning_rate}")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"{prefix}.dataloader_num_workers: must not be negative, got {self.dataloader_num_workers}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{prefix}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("warmup_steps", "save_total_limit", "keep_best", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must not be negative, got {getattr(self, name)}")


@with_config(SECTION)
@dataclass
class StrategyArgs:
    """How the model is distributed across processes."""

    strategy_name: str = "ddp_train"
    """ddp_train, deepspeed_train (ZeRO stage/offload in strategy_config) or fsdp2_train."""
    strategy_config: dict = field(default_factory=dict)
    """Strategy options, e.g. {zero_stage: 3, offload_optimizer: false} for deepspeed_train."""


@with_config(SECTION)
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
    model_config: OptionalText = None
    """Folder (or file) with the config.json used by from_scratch; default: pretrain."""
    loss_chunk_size: int = 1024
    """Target tokens per chunk of the output layer + cross-entropy, so a step's logits never all exist at once
    (0: all at once)."""
    lora_rank: int = 0
    """LoRA adapter rank; 0 trains all weights."""
    lora_alpha: OptionalNumber = None
    """LoRA scaling numerator (the update is scaled by alpha / rank); default 2 x lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target: Names = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: all-linear (every linear layer but the output layer), module names
    (q_proj, v_proj, ...), or one regex over full module names."""
    additional_target: Names = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [embed_tokens, lm_head] for new tokens."""
    router_aux_loss_coef: OptionalNumber = None
    """MoE models: weight of the router's load-balancing loss in the objective (per sample, sft/train/moe.py); default:
    the model config's router_aux_loss_coef (Qwen3-MoE 0.001, Mixtral 0.02); 0 turns it off."""
    quantization_bit: int = 0
    """4: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes (needs a GPU and lora_rank > 0); 0: off."""

    def check(self) -> None:
        prefix = "sft_train.model_args"
        check_choice(f"{prefix}.dtype", self.dtype, DTYPES)
        check_choice(f"{prefix}.attn_implementation", self.attn_implementation, ATTENTION)
        if self.loss_chunk_size < 0:
            raise ConfigError(f"{prefix}.loss_chunk_size: must not be negative (0: no chunks), got {self.loss_chunk_size}")
        if (self.router_aux_loss_coef or 0.0) < 0:
            raise ConfigError(f"{prefix}.router_aux_loss_coef: must not be negative (0: off), got {self.router_aux_loss_coef}")
        self.check_lora()

    def check_lora(self) -> None:
        """Refuse LoRA settings that cannot work, naming the field."""
        prefix = "sft_train.model_args"
        if self.lora_rank < 0:
            raise ConfigError(f"{prefix}.lora_rank: must not be negative (0 trains all weights), got {self.lora_rank}")
        if self.quantization_bit not in (0, 4):
            raise ConfigError(f"{prefix}.quantization_bit: 4 (QLoRA, NF4) or 0 (off), got {self.quantization_bit}")
        if self.lora_rank == 0:
            if self.quantization_bit:
                raise ConfigError(f"{prefix}.quantization_bit: a 4-bit base cannot be trained in full; set lora_rank "
                                  "(e.g. 16) to train adapters on it")
            return
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"{prefix}.lora_alpha: must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{prefix}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target:
            raise ConfigError(f"{prefix}.lora_target: empty; give all-linear, module names or a regex")
        if len(self.lora_target) > 1 and any(REGEX_CHARS.search(name) for name in self.lora_target):
            raise ConfigError(f"{prefix}.lora_target: a regex must be given alone, got {self.lora_target}")
        if self.from_scratch:
            raise ConfigError(f"{prefix}.from_scratch: adapters train on top of loaded weights; a randomly initialised "
                              "base cannot be reloaded with them. Set from_scratch: false (pretrain: the model folder), "
                              "or lora_rank: 0 to train all weights")


@with_config(SECTION)
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
    device_mapping: OptionalText = None
    """Devices this worker uses, e.g. "list(range(0,8))" or "[0,1]"; None: all visible ones."""
    infer_batch_size: int = 1
    """Micro-batch size for validation forward passes."""
    use_sequence_packing: bool = False
    """Pack several samples per row (position_ids restart per sample) instead of padding."""

    def device_ids(self) -> Optional[list[int]]:
        """device_mapping as a list of ints, parsed without eval."""
        return parse_device_mapping(self.device_mapping)

    def check(self) -> None:
        self.data_args.check()
        self.training_args.check()
        self.model_args.check()
        check_strategy_args(self.strategy_args.strategy_name, self.strategy_args.strategy_config,
                            self.training_args.on_nan)
        check_at_least_one("sft_train.infer_batch_size", self.infer_batch_size)
        parse_device_mapping(self.device_mapping)


def parse_device_mapping(value: Optional[str]) -> Optional[list[int]]:
    """Parse ROLL's device_mapping forms ("list(range(0,8))", "[0, 1]", "0,1") without eval."""
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


def is_jinja_file(template: str) -> bool:
    """Does a template setting name a Jinja file (rather than a template by name)?"""
    return template.endswith(JINJA_SUFFIXES)


def check_template(name: str, value: str) -> None:
    if not is_jinja_file(value):
        check_choice(name, value, TEMPLATES + ("a Jinja file (.jinja, .j2)",))


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def check_at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, got {value}")
