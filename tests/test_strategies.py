"""Strategies as objects: the registry, per-strategy strategy_config and on_nan checks at parse time, DeepSpeed's
config. (Each strategy training end to end, with one process and with two, is in test_train.py.)"""

import json
import os
import subprocess
import sys

import pytest

from sft.errors import ConfigError
from sft.config import load_config
from sft.train.strategies import STRATEGIES, DeepSpeedStrategy, FSDP2Strategy, Strategy
from tests.conftest import ROOT


def parse(tmp_path, strategy, options=None, *args):
    path = tmp_path / "run.yaml"
    path.write_text(f"sft_train:\n  strategy_args:\n    strategy_name: {strategy}\n"
                    + (f"    strategy_config: {json.dumps(options)}\n" if options is not None else ""))
    return load_config(str(path), list(args))


def test_the_registry_names_every_strategy_and_each_implements_the_interface():
    from sft.config.strategy_options import OPTIONS

    assert list(STRATEGIES) == ["ddp_train", "deepspeed_train", "fsdp2_train"] == list(OPTIONS)
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name


@pytest.mark.parametrize("strategy, options, key, allowed", [
    ("deepspeed_train", {"offload_optimiser": True}, "offload_optimiser",
     "allowed keys: zero_stage, offload_optimizer, offload_param, deepspeed_config"),
    ("fsdp2_train", {"zero_stage": 3}, "zero_stage", "allowed keys: none"),
    ("ddp_train", {"bucket_mb": 25}, "bucket_mb", "allowed keys: none"),
])
def test_an_unknown_strategy_config_key_is_named_with_the_allowed_ones(tmp_path, strategy, options, key, allowed):
    with pytest.raises(ConfigError, match=r"sft_train\.strategy_args\.strategy_config: unknown key") as error:
        parse(tmp_path, strategy, options)
    assert repr(key) in str(error.value) and allowed in str(error.value) and strategy in str(error.value)
    if key == "offload_optimiser":
        assert "did you mean offload_optimizer?" in str(error.value)


@pytest.mark.parametrize("options, message", [
    ({"zero_stage": 4}, r"zero_stage: must be 0-3"),
    ({"zero_stage": 2, "offload_param": True}, r"offload_param: needs zero_stage 3"),
    ({"offload_optimizer": "yes"}, r"offload_optimizer: expected true or false"),
    ({"zero_stage": 3, "deepspeed_config": "ds.json"}, r"either deepspeed_config .* or the keys zero_stage, not both"),
])
def test_deepspeed_values_are_checked(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        parse(tmp_path, "deepspeed_train", options)


def test_valid_strategy_configs_parse(tmp_path):
    parse(tmp_path, "deepspeed_train", {"zero_stage": 3, "offload_optimizer": True, "offload_param": True})
    parse(tmp_path, "fsdp2_train")
    parse(tmp_path, "ddp_train", None, "--sft_train.training_args.on_nan", "skip")


@pytest.mark.parametrize("strategy", ["deepspeed_train", "fsdp2_train"])
def test_on_nan_skip_is_refused_where_a_step_cannot_be_dropped(tmp_path, strategy):
    with pytest.raises(ConfigError, match=rf"sft_train\.training_args\.on_nan: skip is not supported with {strategy}.*"
                                          r"\(ddp_train\)"):
        parse(tmp_path, strategy, None, "--sft_train.training_args.on_nan", "skip")


def test_strategy_names_come_from_the_registry(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy_name: 'zero_train' is not one of ddp_train, deepspeed_train, fsdp2_train"):
        parse(tmp_path, "zero_train")
    with pytest.raises(ConfigError, match=r"strategy_name: megatron_train is not supported"):
        parse(tmp_path, "megatron_train")


def test_strategy_properties():
    assert not DeepSpeedStrategy.reshards_on_load and FSDP2Strategy.reshards_on_load
    assert STRATEGIES["ddp_train"].supports_nan_skip and not DeepSpeedStrategy.supports_nan_skip


def test_parsing_a_config_imports_no_torch(tmp_path):
    # The option tables are read at parse time; scripts/encode.py parses configs and must not pay for torch.
    path = tmp_path / "run.yaml"
    path.write_text("sft_train:\n  strategy_args:\n    strategy_name: deepspeed_train\n"
                    "    strategy_config: {zero_stage: 3}\n")
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from sft.config import load_config; "
            f"load_config({str(path)!r}, []); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_deepspeed_config_from_keys_and_from_a_file(tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text("max_grad_norm: 0.5\nsft_train:\n  strategy_args:\n    strategy_name: deepspeed_train\n"
                           "    strategy_config: {zero_stage: 3, offload_optimizer: true}\n"
                           "  training_args: {per_device_train_batch_size: 2, gradient_accumulation_steps: 4}\n")
    config = load_config(str(config_path), [])
    strategy = DeepSpeedStrategy(config)
    ds = strategy.deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (2, 4, 0.5)
    assert ds["bf16"]["enabled"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    assert strategy.params_sharded
    for name in ("zero2", "zero3", "zero3_offload"):
        path = os.path.join(ROOT, "configs", "deepspeed", f"{name}.json")
        config = load_config(str(config_path), ["--sft_train.strategy_args.strategy_config", f"{{deepspeed_config: {path}}}"])
        ds = DeepSpeedStrategy(config).deepspeed_config()
        assert ds["zero_optimization"]["stage"] in (2, 3) and ds["train_micro_batch_size_per_gpu"] == 2
        assert DeepSpeedStrategy(config).params_sharded == (ds["zero_optimization"]["stage"] == 3)
