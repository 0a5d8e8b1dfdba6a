"""An MoE model through scripts/train.py with real processes: the router loss keeps the loss guarantee (bs 8 and
2 processes x bs 2 x accumulation 2 give the same losses, router loss and update) under ZeRO-3 and FSDP2."""

import json

import pytest
import torch

from tests.architectures import config as family_config
from tests.test_train import assert_close_weights, logged, losses, train, weights

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

    root = tmp_path_factory.mktemp("moe")
    model = root / "model"
    save_byte_tokenizer(str(model), chat_template=CHATML_JINJA)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(family_config("qwen3_moe", vocab_size=len(tokenizer), router_aux_loss_coef=0.5,
                                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                                   eos_token_id=tokenizer.eos_token_id)).save_pretrained(model)
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    run = root / "run.yaml"
    run.write_text(f"""
seed: 5
sequence_length: 96
pretrain: {model}
logging_steps: 1
save_steps: 2
eval_steps: 100
sft_train:
  model_args: {{dtype: fp32}}
  training_args: {{max_steps: 2, learning_rate: 0.05, adam_epsilon: 1.0, per_device_train_batch_size: 8}}
  data_args: {{file_name: {root / 'train.jsonl'}, template: chatml}}
""")
    return root, str(run)


LAYOUT = ["--sft_train.training_args.per_device_train_batch_size", "2",
          "--sft_train.training_args.gradient_accumulation_steps", "2"]
STRATEGIES = {
    "zero3": ["--sft_train.strategy_args.strategy_name", "deepspeed_train",
              "--sft_train.strategy_args.strategy_config", "{zero_stage: 3}"],
    "fsdp2": ["--sft_train.strategy_args.strategy_name", "fsdp2_train"],
}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("bs8")
    train(setup, out)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_router_loss_keeps_layouts_and_strategies_equal(setup, reference, tmp_path, strategy):
    train(setup, tmp_path, *STRATEGIES[strategy], *LAYOUT, processes=2)
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
    for tag in ("train/aux_loss", "train/grad_norm", "moe/expert_load_max"):
        assert dict(logged(tmp_path, tag)) == pytest.approx(dict(logged(reference, tag)), rel=1e-5), tag
    assert_close_weights(weights(reference, 2), weights(tmp_path, 2), strategy)
