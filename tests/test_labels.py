"""Exact labels on real data: every label of every row, for each real tokenizer and each template that fits it."""

import pytest

from sft.data.conversation import FieldMapping
from sft.data.encoding import EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import get_template
from tests.conftest import real_tokenizer, shared_path
from tests.labelcheck import check_encoded

DATASETS = {
    "alpaca_en_demo.json": FieldMapping(),
    "code_alpaca_2k.json": FieldMapping(),
    "sharegpt_v3_sample_1000.json": FieldMapping(messages_key="conversations"),
}
COMBOS = [
    ("qwen2.5-instruct", "native"), ("qwen2.5-instruct", "qwen2_5"), ("qwen2.5-instruct", "chatml"),
    ("qwen3", "native"), ("qwen3", "qwen3"), ("qwen3", "chatml"),
    ("llama3", "native"), ("llama3", "llama3"),
    ("qwen2.5-instruct", "alpaca"), ("llama3", "base"),
]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("tokenizer_name, template", COMBOS)
def test_every_label_of_every_row_is_exact(tokenizer_name, template, dataset):
    tokenizer = real_tokenizer(tokenizer_name)
    path = shared_path("datasets", dataset)
    mapping = DATASETS[dataset]
    settings = EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip")
    result = encode_split([path], get_template(template, tokenizer), tokenizer, settings)
    assert result.report["truncated"] == 0
    checked = check_encoded(result.dataset, [path], mapping, template, tokenizer)
    assert (checked.rows, checked.samples, checked.split_samples) == (
        result.report["kept"], result.report["samples"], result.report["split_samples"])
    rows_read, kept = EXPECTED_COUNTS[dataset]
    assert (result.report["rows_read"], checked.rows) == (rows_read, kept)


# Rows read and kept. sharegpt: 7 empty conversations, 2 with no assistant turn, 10 whose only assistant
# turn has no prompt before it. code_alpaca: 2 rows with an empty output.
EXPECTED_COUNTS = {
    "alpaca_en_demo.json": (999, 999),
    "code_alpaca_2k.json": (2017, 2015),
    "sharegpt_v3_sample_1000.json": (1000, 981),
}


@pytest.mark.parametrize("template", ["alpaca", "base", "chatml", "native"])
@pytest.mark.parametrize("dataset", ["alpaca_en_demo.json", "sharegpt_v3_sample_1000.json"])
def test_exact_labels_on_local_byte_tokenizer(byte_tokenizer, template, dataset):
    path = shared_path("datasets", dataset)
    mapping = DATASETS[dataset]
    settings = EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip")
    result = encode_split([path], get_template(template, byte_tokenizer), byte_tokenizer, settings)
    name = "chatml" if template == "native" else template  # the byte tokenizer's own template is ChatML
    assert check_encoded(result.dataset, [path], mapping, name, byte_tokenizer).rows == result.report["kept"] > 900


@pytest.mark.parametrize("tokenizer_name, template", [("qwen3", "native"), ("llama3", "llama3")])
def test_last_turn_only(tokenizer_name, template):
    tokenizer = real_tokenizer(tokenizer_name)
    path = shared_path("datasets", "sharegpt_v3_sample_1000.json")
    mapping = DATASETS["sharegpt_v3_sample_1000.json"]
    settings = EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip", loss_on_turns="last")
    result = encode_split([path], get_template(template, tokenizer), tokenizer, settings)
    check_encoded(result.dataset, [path], mapping, template, tokenizer, loss_on_turns="last")
    all_turns = encode_split([path], get_template(template, tokenizer), tokenizer,
                             EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip"))
    assert result.report["supervised_tokens"] < all_turns.report["supervised_tokens"]


@pytest.mark.parametrize("tokenizer_name, template", [("qwen2.5-instruct", "native"), ("qwen3", "native"),
                                                      ("qwen3", "qwen3"), ("qwen2.5-instruct", "qwen2_5")])
def test_tool_call_conversations(tokenizer_name, template):
    """Glaive rows: function_call turns are assistant targets, observation turns are tool results (context)."""
    tokenizer = real_tokenizer(tokenizer_name)
    path = shared_path("datasets", "glaive_toolcall_en_demo.json")
    mapping = FieldMapping(messages_key="conversations")
    result = encode_split([path], get_template(template, tokenizer), tokenizer,
                          EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip"))
    assert result.report["rows_read"] == 300
    assert check_encoded(result.dataset, [path], mapping, template, tokenizer).rows == result.report["kept"]
    assert result.report["kept"] >= 290, result.report
