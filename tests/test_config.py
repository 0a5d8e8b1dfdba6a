import glob
import os

import pytest

from sft.errors import ConfigError
from sft.config import SFTConfig, load_config, parse_device_mapping
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    config = load_config(path, [])
    assert isinstance(config, SFTConfig)
    assert config.template_name() in ("native", "qwen2_5", "qwen3", "chatml", "llama3", "base", "empty", "alpaca")


def test_configs_exist():
    names = {os.path.basename(path) for path in CONFIGS}
    assert "qwen2.5-7B-sft_zero3.yaml" in names


def test_seed_port_keeps_seed_values():
    config = load_config(os.path.join(ROOT, "configs", "qwen2.5-7B-sft_zero3.yaml"), [])
    assert config.sft_train.strategy_args.strategy_name == "deepspeed_train"
    assert config.sft_train.strategy_args.strategy_config["zero_stage"] == 3
    assert config.sft_train.device_ids() == list(range(8))
    assert (config.prompt_key, config.query_key, config.response_key) == ("instruction", "input", "output")
    assert config.sft_train.training_args.learning_rate == pytest.approx(1e-5)


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_cli_overrides_yaml_and_types_are_coerced(tmp_path):
    path = write(tmp_path, "sequence_length: 512\nsft_train:\n  training_args:\n    learning_rate: 1e-5\n"
                           "  data_args:\n    file_name: a.json\n")
    config = load_config(path, ["--sft_train.training_args.learning_rate", "2e-5", "--sequence_length", "256",
                                "--global_template", "chatml"])
    assert config.sft_train.training_args.learning_rate == pytest.approx(2e-5)
    assert isinstance(load_config(path, []).sft_train.training_args.learning_rate, float)
    assert config.sequence_length == 256
    assert config.sft_train.data_args.file_name == ["a.json"]  # a single path becomes a list
    assert config.template_name() == "chatml"  # global_template wins over data_args.template
    # A list on the command line: words, or one YAML list.
    for words in (["q_proj", "v_proj"], ["[q_proj, v_proj]"]):
        listed = load_config(path, ["--sft_train.model_args.lora_target", *words])
        assert listed.sft_train.model_args.lora_target == ["q_proj", "v_proj"]


def test_resume_values_normalise(tmp_path):
    assert load_config(write(tmp_path, "resume_from_checkpoint: false\n"), []).resume_from_checkpoint == "false"
    assert load_config(write(tmp_path, "resume_from_checkpoint: true\n"), []).resume_from_checkpoint == "true"
    config = load_config(write(tmp_path, "seed: 1\n"), ["--resume_from_checkpoint", "out/ckpt"])
    assert config.resume_from_checkpoint == "out/ckpt"


def test_optional_key_can_be_unset_from_cli(tmp_path):
    config = load_config(write(tmp_path, "seed: 1\n"), ["--query_key", "none"])
    assert config.query_key is None
    assert load_config(write(tmp_path, "query_key: null\n"), []).query_key is None
    lora = load_config(write(tmp_path, "sft_train: {model_args: {lora_alpha: 8}}\n"),
                       ["--sft_train.model_args.lora_alpha", "none"])
    assert lora.sft_train.model_args.lora_alpha is None


def test_yaml_types_are_read_leniently_and_flags_take_yaml(tmp_path):
    config = load_config(write(tmp_path, "exp_name: 7\nsft_train: {use_sequence_packing: yes, training_args: "
                                         "{max_steps: 4.0}}\n"),
                         ["--tracker_kwargs", "{log_dir: runs/a}", "--sft_train.use_sequence_packing"])
    assert config.exp_name == "7" and config.sft_train.training_args.max_steps == 4
    assert config.tracker_kwargs == {"log_dir": "runs/a"} and config.sft_train.use_sequence_packing is True
    off = load_config(write(tmp_path, "seed: 1\n"), ["--sft_train.use_sequence_packing", "false"])
    assert off.sft_train.use_sequence_packing is False


@pytest.mark.parametrize("yaml_text, args, field", [
    ("bogus_key: 1\n", [], "bogus_key"),
    ("sft_train:\n  data_args:\n    nope: 1\n", [], "sft_train.data_args"),
    ("sft_train:\n  strategy_args:\n    strategy_name: megatron_train\n", [], "sft_train.strategy_args.strategy_name"),
    ("seed: 1\n", ["--sft_train.training_args.max_steps", "-3"], "sft_train.training_args.max_steps"),
    ("seed: 1\n", ["--sft_train.training_args.max_steps", "0"], "sft_train.training_args.max_steps"),
    ("sequence_length: 0\n", [], "sequence_length"),
    ("sft_train:\n  training_args:\n    learning_rate: fast\n", [], "sft_train.training_args.learning_rate"),
    ("sft_train:\n  data_args:\n    template: vicuna\n", [], "sft_train.data_args.template"),
    ("sft_train:\n  data_args:\n    overlong: chop\n", [], "sft_train.data_args.overlong"),
    ("sft_train:\n  data_args:\n    on_bad_sample: ignore\n", [], "sft_train.data_args.on_bad_sample"),
    ("sft_train:\n  device_mapping: 'gpu0,gpu1'\n", [], "sft_train.device_mapping"),
    ("sft_train:\n  use_sequence_packing: maybe\n", [], "sft_train.use_sequence_packing"),
    ("sft_train:\n  data_args: 3\n", [], "sft_train.data_args: expected a mapping"),
    ("sft_train:\n  data_args:\n    templat: chatml\n", [], "sft_train.data_args.templat: .*did you mean template"),
    ("seed: 1\n", ["--sft_train.training_args.max_step", "3"], "--sft_train.training_args.max_step: .*did you mean "
                                                              "--sft_train.training_args.max_steps"),
    ("seed: 1\n", ["--tracker_kwargs", "[a]"], "tracker_kwargs: expected a mapping"),
    ("seed: 1\n", ["--sft_train.training_args.max_steps", "2.5"], "sft_train.training_args.max_steps: .*integer"),
    ("- a\n- b\n", [], "must hold a mapping"),
])
def test_bad_values_fail_naming_the_field(tmp_path, yaml_text, args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace(r"\.*", ".*")):
        load_config(write(tmp_path, yaml_text), args)


def test_missing_files_fail_naming_the_field(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    data = tmp_path / "train.json"
    data.write_text("[]")
    path = write(tmp_path, f"pretrain: {tokenizer_dir}\nsft_train:\n  data_args:\n    file_name: {data}\n")
    load_config(path, []).check_paths()  # all present
    with pytest.raises(ConfigError, match=r"sft_train\.data_args\.file_name: file not found: .*missing\.json"):
        load_config(path, ["--sft_train.data_args.file_name", str(tmp_path / "missing.json")]).check_paths()
    with pytest.raises(ConfigError, match=r"validation\.data_args\.file_name: file not found"):
        load_config(path, ["--validation.data_args.file_name", str(tmp_path / "val.jsonl")]).check_paths()
    with pytest.raises(ConfigError, match=r"pretrain: folder not found"):
        load_config(path, ["--pretrain", str(tmp_path / "no_model")]).check_paths()
    with pytest.raises(ConfigError, match=r"pretrain: not set"):
        load_config(write(tmp_path, f"sft_train:\n  data_args:\n    file_name: {data}\n"), []).check_paths()


def test_device_mapping_forms():
    assert parse_device_mapping("list(range(0,8))") == list(range(8))
    assert parse_device_mapping("list(range(0, 8, 2))") == [0, 2, 4, 6]
    assert parse_device_mapping("[0, 1]") == [0, 1]
    assert parse_device_mapping(None) is None


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config_path: file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 1\nsft_train: {data_args: [oops\n")
    with pytest.raises(ConfigError, match="config_path: .*broken.yaml is not valid YAML"):
        load_config(str(broken), [])
