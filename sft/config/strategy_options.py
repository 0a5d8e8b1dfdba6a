"""What each ``strategy_name`` accepts, checked when the config is parsed: its ``strategy_config`` keys and
their values, and whether it can drop a step (``on_nan: skip``).

The config checks itself with this table and sft.train.strategies builds its classes from it, so the table sits
below both and imports no torch: parsing a config (scripts/encode.py) stays free of it.
"""

from __future__ import annotations

import difflib

from sft.errors import ConfigError

FIELD = "sft_train.strategy_args.strategy_config"

OPTIONS: dict[str, dict[str, str]] = {  # strategy_name -> {strategy_config key: what it means}
    "ddp_train": {},
    "deepspeed_train": {
        "zero_stage": "ZeRO stage 0-3 (default 2)",
        "offload_optimizer": "keep the optimizer state in CPU memory (true/false)",
        "offload_param": "keep the parameters in CPU memory (ZeRO-3 only)",
        "deepspeed_config": "a DeepSpeed JSON file to use instead of the keys above",
    },
    "fsdp2_train": {},
}
SKIPS_A_STEP = ("ddp_train",)  # on_nan: skip needs a step that can be dropped after backward started

REFUSED = {
    "megatron_train": "megatron_train is not supported by this toolkit (it runs on Accelerate); use deepspeed_train "
                      "with strategy_config {zero_stage: 3} for a model that does not fit with ddp_train.",
}


def check_strategy_args(name: str, options: dict, on_nan: str) -> None:
    """Refuse an unknown strategy_name, strategy_config keys it does not read (naming the allowed ones), values
    it cannot take, and on_nan: skip where a step cannot be dropped."""
    if name in REFUSED:
        raise ConfigError(f"sft_train.strategy_args.strategy_name: {REFUSED[name]}")
    if name not in OPTIONS:
        raise ConfigError(f"sft_train.strategy_args.strategy_name: {name!r} is not one of {', '.join(OPTIONS)}")
    known = OPTIONS[name]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{FIELD}: unknown key {key!r} for {name}{hint}; allowed keys: {', '.join(known) or 'none'}")
    if name == "deepspeed_train":
        _check_deepspeed(options)
    if on_nan == "skip" and name not in SKIPS_A_STEP:
        raise ConfigError(f"sft_train.training_args.on_nan: skip is not supported with {name}; use error, "
                          f"or a strategy that can drop a step ({', '.join(SKIPS_A_STEP)})")


def _check_deepspeed(options: dict) -> None:
    if "deepspeed_config" in options and len(options) > 1:
        raise ConfigError(f"{FIELD}: give either deepspeed_config (a JSON file) or the keys "
                          f"{', '.join(key for key in options if key != 'deepspeed_config')}, not both")
    stage = options.get("zero_stage", 2)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{FIELD}.zero_stage: must be 0-3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(f"{FIELD}.{key}: expected true or false, got {options[key]!r}")
    if options.get("offload_param") and stage != 3:
        raise ConfigError(f"{FIELD}.offload_param: needs zero_stage 3 (parameters are partitioned only there), "
                          f"got zero_stage {stage}")
