"""Guarantee 7: bad input gets a clear error naming file, row and reason, or is counted and written out."""

import json

import pytest

from sft.data import BadSample, DataError, FieldMapping, check_keys, conversation_from_row, read_rows
from sft.encoding import EncodeError, EncodeSettings, encode_split
from sft.templates import TemplateError, get_template
from tests.conftest import shared_path

MULTI = FieldMapping(messages_key="messages")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def encode(paths, tokenizer, template="chatml", mapping=FieldMapping(), **settings):
    return encode_split(paths, get_template(template, tokenizer), tokenizer,
                        EncodeSettings(mapping, sequence_length=settings.pop("sequence_length", 4096), **settings))


# ----- reading files -------------------------------------------------------------------------------

def test_json_array_and_jsonl_read_with_rows_and_lines(tmp_path):
    rows, _ = read_rows(write(tmp_path, "a.json", '[\n  {"a": 1},\n  {"a": [1,\n 2]}, {"a": 3}\n]\n'))
    assert [(r.row, r.line) for r in rows] == [(1, 2), (2, 3), (3, 4)]
    assert json.loads(rows[1].text) == {"a": [1, 2]}
    rows, _ = read_rows(write(tmp_path, "b.jsonl", '{"a": 1}\n\n{"a": 2}\n'))
    assert [(r.row, r.line) for r in rows] == [(1, 1), (2, 3)]


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"a": 1}\n{"a": 2,}\n', r"bad\.jsonl line 2: malformed JSON"),
    ("bad.jsonl", '{"a": 1}\n[1, 2]\n', r"bad\.jsonl line 2: the record is a JSON list"),
    ("bad.json", '[{"a": 1},\n {"a": }\n]', r"bad\.json line 2 column 8: malformed JSON in row 2"),
    ("bad.json", '[{"a": 1}\n {"a": 2}]', r"bad\.json line 2: malformed JSON after row 1: expected ',' or ']'"),
    ("bad.json", '{"a": 1}\n{"a": 2}\n', r"expected a JSON array of row objects \(one object per line\? name the file \.jsonl\)"),
    ("bad.json", '[1, 2]', r"bad\.json row 1 \(line 1\): the record is a JSON int"),
    ("bad.json", '', r"the file is empty"),
    ("bad.json", '[{"a": 1}] extra', r"unexpected text after the closing"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        read_rows(write(tmp_path, name, text))


def test_malformed_jsonl_lines_can_be_skipped(tmp_path):
    rows, rejected = read_rows(write(tmp_path, "x.jsonl", '{"a": 1}\nnot json\n{"a": 2}\n'), skip_malformed=True)
    assert len(rows) == 2 and len(rejected) == 1
    assert rejected[0][0].line == 2 and "malformed JSON" in rejected[0][1]


def test_a_key_no_row_has_lists_the_keys_and_the_field(tmp_path):
    path = write(tmp_path, "q.json", json.dumps([{"question": "a", "answer": "b"}]))
    rows, _ = read_rows(path)
    with pytest.raises(DataError, match=r"q\.json: no row has the key 'instruction' named by prompt_key; "
                                        r"the rows have keys: answer, question\. Set prompt_key"):
        check_keys(path, rows, FieldMapping())
    check_keys(path, rows, FieldMapping(prompt_key="question", response_key="answer", query_key=None))


# ----- mapping rows --------------------------------------------------------------------------------

def test_single_turn_mapping_follows_the_seed():
    mapping = FieldMapping(system_key="system")
    messages, trained = conversation_from_row({"system": "Be brief.", "instruction": "Add", "input": "1+1", "output": "2"}, mapping)
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n1+1"},
                        {"role": "assistant", "content": "2"}]
    assert trained == [False, False, True]
    messages, _ = conversation_from_row({"instruction": "Hi", "input": "", "output": "Hello"}, FieldMapping())
    assert messages[0] == {"role": "user", "content": "Hi"}  # an empty query adds no newline


def test_multi_turn_openai_and_sharegpt_rows():
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                           {"role": "assistant", "content": "A1", "weight": 1}, {"role": "user", "content": "U2"},
                           {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "2"}]}]}
    messages, trained = conversation_from_row(openai, MULTI)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[-1]["content"] == "A2" and trained == [False, False, True, False, True]
    _, trained = conversation_from_row(openai, MULTI, loss_on_turns="last")
    assert trained == [False, False, False, False, True]
    sharegpt = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}], "id": "x"}
    messages, trained = conversation_from_row(sharegpt, FieldMapping(messages_key="conversations"))
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]
    assert trained == [False, False, True]  # an assistant turn with no prompt before it is context


@pytest.mark.parametrize("row, mapping, reason", [
    ({"instruction": "a", "input": None, "output": "b"}, FieldMapping(), r"field 'input' \(query_key\) is null"),
    ({"instruction": 5, "input": "", "output": "b"}, FieldMapping(), r"field 'instruction' \(prompt_key\) is a int"),
    ({"instruction": "a", "input": "", "output": "  "}, FieldMapping(), r"empty response"),
    ({"instruction": "a", "output": "b"}, FieldMapping(), r"missing key 'input' \(query_key\); this row has keys: instruction, output"),
    ({"messages": []}, MULTI, r"empty conversation"),
    ({"messages": None}, MULTI, r"'messages' \(messages_key\) is null"),
    ({"messages": [{"role": "user", "content": "q"}]}, MULTI, r"no assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, MULTI, r"no assistant turn follows a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, MULTI, r"messages\[1\]\.role is 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, MULTI, r"messages\[1\]\.content is null"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, MULTI, r"empty response"),
    ({"messages": [{"speaker": "user", "text": "q"}]}, MULTI, r"neither 'role' \(OpenAI\) nor 'from' \(ShareGPT\)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "a"}]},
     MULTI, r"non-text part"),
])
def test_bad_rows_say_why(row, mapping, reason):
    with pytest.raises(BadSample, match=reason):
        conversation_from_row(row, mapping)


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
    assert sorted(r["source"].rsplit(":", 1)[1] for r in result.rejects) == ["2", "3"]
    assert json.loads(result.rejects[0]["row"]) == ROWS[1]
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
    assert [r["source"].rsplit(":", 1)[1] for r in result.rejects] == ["4"]


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
                                          r"assistant message 1 is not a prefix of the full render"):
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
    assert "System role not supported" in result.rejects[0]["reason"]


def test_a_response_merged_across_the_prompt_edge_is_retokenized_exactly(tmp_path):
    from tests.conftest import real_tokenizer
    from tests.labelcheck import check_encoded

    tokenizer = real_tokenizer("qwen2.5-instruct")
    rows = [{"instruction": "Hi", "input": "", "output": "\n\nHello there"}, {"instruction": "Hi", "input": "", "output": "Plain"}]
    path = write(tmp_path, "rows.json", json.dumps(rows))
    result = encode([path], tokenizer, template="chatml")
    assert result.report["retokenized_at_boundary"] == 1
    assert check_encoded(result.dataset, [path], FieldMapping(), "chatml", tokenizer) == 2


def test_a_template_needing_eos_refuses_a_tokenizer_without_one(byte_tokenizer):
    import copy

    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(TemplateError, match="no eos token"):
        get_template("alpaca", tokenizer)
