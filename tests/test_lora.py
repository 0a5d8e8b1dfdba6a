"""LoRA through PEFT, end to end on CPU: every strategy, packing, the saved adapter, kill and resume, refusals.

The runs reuse tests/test_train.py's tiny saved Qwen2 model and data; LoRA trains adapters on its weights.
"""

import json
import os

import pytest
import torch

from tests.test_train import (STRATEGIES, fresh_process_val_loss, kill_after_checkpoint, losses, setup,  # noqa: F401
                              train)

LORA = ["--sft_train.model_args.lora_rank", "4", "--sft_train.training_args.learning_rate", "0.05",
        "--sft_train.training_args.adam_epsilon", "1.0"]


def adapter(out, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(str(out), "sft_train", f"checkpoint-{step}", "sft_train", "adapter_model.safetensors"))


LOAD_ADAPTER = """
from peft import PeftModel
base = json.load(open({folder!r} + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), {folder!r}).eval()
"""


def lora_run(setup, out, strategy, processes, *extra):
    """4 steps of global batch 8: 1 x 8, or 2 processes x 2 x accumulation 2."""
    per_device, accumulation = (8, 1) if processes == 1 else (2, 2)
    train(setup, out, *LORA, *STRATEGIES[strategy], "--sft_train.training_args.max_steps", "4", "--save_steps", "2",
          "--eval_steps", "4", "--sft_train.training_args.per_device_train_batch_size", str(per_device),
          "--sft_train.training_args.gradient_accumulation_steps", str(accumulation), *extra, processes=processes)
    return losses(out)


@pytest.fixture(scope="module")
def ddp_lora(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_lora")
    return out, lora_run(setup, out, "ddp", 1)


def test_a_lora_run_trains_only_the_adapter_and_saves_it_loadable(setup, ddp_lora):
    out, got = ddp_lora
    folder = os.path.join(str(out), "sft_train", "checkpoint-4", "sft_train")
    kept = sorted(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "template.json", "tokenizer.json"} <= set(kept), kept
    assert "model.safetensors" not in kept
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 8  # alpha defaults to 2 x rank
    names = adapter(out, 4)
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert any(float(tensor.abs().max()) > 0 for name, tensor in names.items() if "lora_B" in name)  # it trained
    # The optimizer holds state for the adapter's parameters only.
    optimizer = torch.load(os.path.join(str(out), "sft_train", "checkpoint-4", "training_state", "optimizer.bin"),
                           weights_only=False)
    assert len(optimizer["state"]) == len(names)
    log = open(os.path.join(str(out), "logs", "train.log")).read()
    assert "(LoRA r=4 alpha=8 target=all-linear:" in log and "M trainable)" in log
    fresh, live = fresh_process_val_loss(out, 4, LOAD_ADAPTER)  # PEFT onto the base, in a fresh process
    assert fresh == pytest.approx(live, rel=1e-5)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp2"])
def test_lora_on_every_strategy_gives_the_same_losses_and_adapter(setup, tmp_path, ddp_lora, strategy):
    """2 processes x batch 2 x accumulation 2 against 1 x 8: the same losses and adapter; under ZeRO-3 the adapter
    is gathered before it is saved (never the empty partition of one process) and reloads with PEFT."""
    reference_out, reference = ddp_lora
    out = tmp_path / strategy
    got = lora_run(setup, out, strategy, 2)
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (strategy, step)
    expected, saved = adapter(reference_out, 4), adapter(out, 4)
    assert expected.keys() == saved.keys()
    for name in expected:
        assert saved[name].numel() == expected[name].numel() > 0, name
        assert torch.allclose(expected[name], saved[name], rtol=1e-4, atol=1e-6), (strategy, name)
    if strategy == "zero3":
        fresh, live = fresh_process_val_loss(out, 4, LOAD_ADAPTER)  # PEFT onto the base, in a fresh process
        assert fresh == pytest.approx(live, rel=1e-5)


def test_lora_with_packing_changes_nothing_but_speed(setup, tmp_path):
    one_step = [*LORA, "--sft_train.training_args.max_steps", "1", "--save_steps", "1", "--eval_steps", "100"]
    train(setup, tmp_path / "unpacked", *one_step, "--sft_train.training_args.per_device_train_batch_size", "40")
    # The 40 samples pack into 20 rows (as test_train.py's packing test measures with scripts/pack.py).
    packed = train(setup, tmp_path / "packed", *one_step, "--sft_train.training_args.per_device_train_batch_size", "20",
                   "--sft_train.use_sequence_packing", "true")
    assert "40 samples (1,881 tokens) into 20 rows" in packed.stdout + packed.stderr
    assert losses(tmp_path / "packed")[1] == pytest.approx(losses(tmp_path / "unpacked")[1], rel=1e-5)
    reference, candidate = adapter(tmp_path / "unpacked", 1), adapter(tmp_path / "packed", 1)
    for name in reference:
        assert torch.allclose(reference[name], candidate[name], rtol=1e-5, atol=1e-6), name


def test_lora_resume_after_sigkill_is_bitwise_exact_and_other_settings_are_refused(setup, tmp_path):
    steps = [*LORA, "--sft_train.training_args.max_steps", "24", "--save_steps", "4", "--eval_steps", "100"]
    train(setup, tmp_path / "straight", *steps)
    killed = tmp_path / "killed"
    kill_after_checkpoint(setup, killed, 4, 24, *steps)
    # Another rank is other trainable parameters: refused, naming both.
    other = train(setup, killed, *steps, "--sft_train.model_args.lora_rank", "8", "--resume_from_checkpoint", "true",
                  check=False)
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "trained LoRA r=4 alpha=8" in other.stderr and "this run trains LoRA r=8 alpha=16" in other.stderr
    resumed = train(setup, killed, *steps, "--resume_from_checkpoint", "true")
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight, again = adapter(tmp_path / "straight", 24), adapter(killed, 24)
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


@pytest.mark.parametrize("fields, message", [
    ({"lora_rank": -1}, "lora_rank: must not be negative"),
    ({"lora_rank": 4, "from_scratch": True}, "from_scratch: adapters train on top of loaded weights"),
    ({"quantization_bit": 4}, "a 4-bit base cannot be trained in full"),
    ({"quantization_bit": 8, "lora_rank": 4}, "quantization_bit: 4 (QLoRA, NF4) or 0"),
    ({"lora_rank": 4, "lora_target": ["q_proj", ".*v_proj"]}, "a regex must be given alone"),
    ({"lora_rank": 4, "lora_dropout": 1.5}, "lora_dropout: must be in [0, 1)"),
])
def test_lora_settings_are_checked_when_the_config_is_parsed(tmp_path, fields, message):
    from sft.errors import ConfigError
    from sft.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("sft_train:\n  model_args: " + json.dumps(fields) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [])
    assert message in str(caught.value)


def test_lora_targets_are_passed_to_peft_as_given():
    from sft.config import ModelArgs
    from sft.train.lora import describe, target_modules

    assert target_modules(ModelArgs(lora_rank=4)) == "all-linear"
    assert target_modules(ModelArgs(lora_rank=4, lora_target=["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    assert target_modules(ModelArgs(lora_rank=4, lora_target=[r".*\.(q|v)_proj"])) == r".*\.(q|v)_proj"
    assert describe(ModelArgs(lora_rank=8, lora_alpha=4, additional_target=["lm_head"])) == \
        "LoRA r=8 alpha=4 target=all-linear + full lm_head"
    assert describe(ModelArgs()) == ""


def test_qlora_without_a_gpu_is_refused_with_one_line(setup, tmp_path):
    result = train(setup, tmp_path / "q", *LORA, "--sft_train.model_args.quantization_bit", "4", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: sft_train.model_args.quantization_bit: 4-bit QLoRA needs a CUDA GPU" in result.stderr


@pytest.mark.parametrize("fields, message", [
    ({"additional_target": ["lm_head", "embed"]}, "additional_target: no module of the model is named embed;"),
    ({"lora_target": ["q_proj", "vproj"]}, "lora_target: no module of the model is named vproj;"),
    ({"lora_target": [r".*\.nothing_proj"]}, "lora_target: "),
])
def test_a_target_that_names_no_module_is_refused_with_the_models_names(fields, message):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.errors import ConfigError
    from sft.config import ModelArgs
    from sft.train.lora import apply_lora

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ConfigError) as caught:
        apply_lora(model, ModelArgs(lora_rank=2, **fields))
    assert message in str(caught.value) and "q_proj" in str(caught.value)
    wrapped = apply_lora(model, ModelArgs(lora_rank=2, lora_target=["q_proj"], additional_target=["model.embed_tokens"]))
    trained = [name for name, parameter in wrapped.named_parameters() if parameter.requires_grad]
    assert trained and all(".q_proj.lora_" in name or "embed_tokens.modules_to_save" in name for name in trained)
    assert any("embed_tokens.modules_to_save" in name for name in trained)
