"""text_key: rows of plain text trained on every token, with the tokenizer's eos after them, beside conversations
in the same file; packed like any sample."""

import json

import pytest

from sft.config import load_config
from sft.data.build import build_encoded
from sft.data.pipeline import load_encoded
from tests.conftest import shared_path

ROWS = [{"text": "Kestrels hover over open ground."},
        {"instruction": "Name a falcon.", "output": "The peregrine."},
        {"text": "Falcons stoop at speed.\nThey nest on cliffs."},
        {"text": 42},
        {"text": "   "}]


def test_plain_text_rows_are_trained_on_every_token(tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(f"pretrain: {shared_path('tokenizers', 'qwen2.5-instruct')}\noutput_dir: {tmp_path / 'out'}\n"
                           f"text_key: text\nquery_key: null\nsft_train: {{data_args: {{file_name: {data}, template: qwen2_5, "
                           "on_bad_sample: skip}}\n")
    config = load_config(str(config_path), [])
    folder, meta, _ = build_encoded(config, log=lambda _: None)
    from sft.data.build import load_tokenizer

    tokenizer = load_tokenizer(config.pretrain)
    dataset = load_encoded(f"{folder}/train")
    by_source = {source.rsplit(":", 1)[1]: (ids, labels) for source, ids, labels in
                 zip(dataset["source"], dataset["input_ids"], dataset["labels"])}
    assert sorted(by_source) == ["1", "2", "3"]
    for line, row in (("1", ROWS[0]), ("3", ROWS[2])):
        ids, labels = by_source[line]
        assert labels == ids  # every token a target
        assert tokenizer.decode(ids) == row["text"] + tokenizer.eos_token
    ids, labels = by_source["2"]  # the conversation is encoded as before: its prompt is context
    assert labels[0] == -100 and tokenizer.decode([i for i, l in zip(ids, labels) if l != -100]) == "The peregrine.<|im_end|>"
    report = meta["reports"]["train"]
    assert report["plain_text_rows"] == 2 and report["kept"] == 3
    assert any("text_key" in reason and "string" in reason for reason in report["rejected"])
    assert any("text_key" in reason and "empty" in reason for reason in report["rejected"])


@pytest.mark.parametrize("key", [None, "body"])
def test_without_text_key_a_text_row_is_not_plain_text(tmp_path, key):
    """The default (null) changes nothing: a row with only `text` is a bad row naming the missing keys."""
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "just text"}) + "\n" + json.dumps({"instruction": "a", "output": "b"}) + "\n")
    config_path = tmp_path / "run.yaml"
    extra = f"text_key: {key}\n" if key else ""
    config_path.write_text(f"pretrain: {shared_path('tokenizers', 'qwen2.5-instruct')}\noutput_dir: {tmp_path / 'out'}\n"
                           f"{extra}query_key: null\nsft_train: {{data_args: {{file_name: {data}, template: qwen2_5, on_bad_sample: skip}}}}\n")
    _, meta, _ = build_encoded(load_config(str(config_path), []), log=lambda _: None)
    assert meta["reports"]["train"]["kept"] == 1 and meta["reports"]["train"]["plain_text_rows"] == 0


def test_a_source_of_plain_text_only_needs_no_conversation_keys(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Line {i} of a corpus."}) for i in range(3)) + "\n")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(f"pretrain: {shared_path('tokenizers', 'qwen2.5-instruct')}\noutput_dir: {tmp_path / 'out'}\n"
                           f"text_key: text\nsft_train: {{data_args: {{file_name: {data}, template: qwen2_5}}}}\n")
    _, meta, _ = build_encoded(load_config(str(config_path), []), log=lambda _: None)
    assert meta["reports"]["train"]["plain_text_rows"] == 3 and meta["reports"]["train"]["kept"] == 3
