"""Guarantee 7 through the encoder: bad input gets a clear error naming file, row and reason, or is counted and
written out. (Mapping single rows: test_conversation.py; reading files and datasets: test_sources.py.)"""

import json

import pytest

from sft.data.conversation import FieldMapping
from sft.data.encoding import EncodeError, EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import TemplateError, get_template
from tests.conftest import rejected_rows, shared_path

MULTI = FieldMapping(messages_key="messages")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def encode(paths, tokenizer, template="chatml", mapping=FieldMapping(), **settings):
    return encode_split(paths, get_template(template, tokenizer), tokenizer,
                        EncodeSettings(mapping, sequence_length=settings.pop("sequence_length", 4096), **settings))


# ----- policies through the encoder ----------------------------------------------------------------

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi"},
    {"instruction": "Say bye", "input": None, "output": "Bye"},
    {"instruction": "Count", "input": "to three", "output": ""},
    {"instruction": "Long", "input": "", "output": "word " * 200},
    {"instruction": "prompt " * 200, "input": "", "output": "short"},
]


def test_bad_row_stops_the_run_naming_file_row_and_reason(tmp_path, byte_tokenizer):
    path = write(tmp_path, "rows.json", json.dumps(ROWS, indent=1))
    with pytest.raises(EncodeError, match=r"rows\.json row 2 \(line 7\): field 'input' \(query_key\) is null .*on_bad_sample: skip"):
        encode([path], byte_tokenizer)


def test_skip_counts_and_keeps_every_rejected_row(tmp_path, byte_tokenizer):
    path = write(tmp_path, "rows.json", json.dumps(ROWS))
    result = encode([path], byte_tokenizer, on_bad_sample="skip", sequence_length=256)
    report = result.report
    assert report["rows_read"] == 5
    assert report["rejected"] == {"empty response": 1, "field 'input' (query_key) is null": 1}
    assert report["dropped"] == {"no supervised token left after truncation": 1}
    assert report["kept"] == 2 and report["truncated"] == 1
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rejected_rows(result)) == ["2", "3"]
    assert json.loads(rejected_rows(result)[0]["row"]) == ROWS[1]
    assert all(length <= 256 for length in result.dataset["length"])


@pytest.mark.parametrize("policy", ["drop", "error", "truncate"])
def test_overlong_policies(tmp_path, byte_tokenizer, policy):
    path = write(tmp_path, "rows.json", json.dumps([ROWS[0], ROWS[3]]))
    if policy == "error":
        with pytest.raises(EncodeError, match=r"rows\.json row 2 .*tokens, longer than sequence_length 256"):
            encode([path], byte_tokenizer, overlong=policy, sequence_length=256)
        return
    result = encode([path], byte_tokenizer, overlong=policy, sequence_length=256)
    if policy == "drop":
        assert result.report["dropped"] == {"longer than sequence_length": 1} and result.report["kept"] == 1
    else:
        assert result.report["truncated"] == 1 and result.report["kept"] == 2
        row = result.dataset[1]
        assert len(row["input_ids"]) == 256  # the start is kept
        full = encode([path], byte_tokenizer, sequence_length=4096).dataset[1]
        assert row["input_ids"] == full["input_ids"][:256] and row["labels"] == full["labels"][:256]


def test_openai_toy_file_flaws_are_reported(tmp_path, byte_tokenizer):
    path = shared_path("datasets", "toy_chat_fine_tuning.jsonl")
    with pytest.raises(EncodeError, match=r"toy_chat_fine_tuning\.jsonl line 4: no assistant turn follows a user turn"):
        encode([path], byte_tokenizer, mapping=MULTI, sequence_length=2048)
    result = encode([path], byte_tokenizer, mapping=MULTI, sequence_length=2048, on_bad_sample="skip")
    assert result.report["rows_read"] == 5 and result.report["kept"] == 4
    assert result.report["truncated"] == 1  # the 26,000-character reply
    assert [r["source"].rsplit(":", 1)[1] for r in rejected_rows(result)] == ["4"]


def test_a_template_that_breaks_the_prefix_rule_is_an_error(tmp_path, byte_tokenizer):
    import copy

    tokenizer = copy.deepcopy(byte_tokenizer)
    # Renders the final message differently, so a turn's prompt is not a prefix of the whole conversation.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>last{% else %}<|im_start|>{{ m['role'] }}{% endif %}"
        "\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write(tmp_path, "rows.json", json.dumps([ROWS[0]]))
    with pytest.raises(EncodeError, match=r"rows\.json row 1 \(line 1\): template native: the prompt render before "
                                          r"assistant message 1 is not a prefix of the render through it"):
        encode([path], tokenizer, template="native", on_bad_sample="skip")


def test_a_template_that_refuses_a_conversation_is_a_bad_sample(tmp_path, byte_tokenizer):
    import copy

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write(tmp_path, "rows.jsonl", "\n".join(json.dumps(r) for r in rows))
    result = encode([path], tokenizer, template="native", mapping=MULTI, on_bad_sample="skip")
    assert result.report["kept"] == 1
    assert "System role not supported" in rejected_rows(result)[0]["reason"]


def test_a_response_merged_across_the_prompt_edge_is_retokenized_exactly(tmp_path):
    from tests.conftest import real_tokenizer
    from tests.labelcheck import check_encoded

    tokenizer = real_tokenizer("qwen2.5-instruct")
    rows = [{"instruction": "Hi", "input": "", "output": "\n\nHello there"}, {"instruction": "Hi", "input": "", "output": "Plain"}]
    path = write(tmp_path, "rows.json", json.dumps(rows))
    result = encode([path], tokenizer, template="chatml")
    assert result.report["retokenized_at_boundary"] == 1
    assert check_encoded(result.dataset, [path], FieldMapping(), "chatml", tokenizer).rows == 2


def test_a_template_needing_eos_refuses_a_tokenizer_without_one(byte_tokenizer):
    import copy

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(TemplateError, match="no eos token"):
        get_template("alpaca", tokenizer)
