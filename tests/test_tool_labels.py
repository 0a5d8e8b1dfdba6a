"""Exact labels for tool calls and reasoning: every label of every row, checked by tests/labelcheck.py.

The data: LLaMA-Factory's glaive tool-call demo (ShareGPT function_call/observation turns), its reason_tool_use
demo (content parts text/reasoning/tool_call), and the fixtures in tests/data/ (OpenAI form):

    parallel_tool_calls.jsonl   several calls in one turn, arguments as JSON text and as objects, tool results
                                with tool_call_id/name, non-ASCII and unsorted argument keys, a second user turn
    multi_turn_reasoning.jsonl  reasoning_content (or reasoning) on several turns across several user turns
    think_in_content.jsonl      <think>...</think> at the start of the content instead of reasoning_content
    reasoning_tool_turns.jsonl  reasoning + tool calls + tool results + a second user turn; content parts
    system_tools_string.jsonl   a system message and tools as a JSON string (bare or wrapped schemas), the
                                legacy function_call / role function form, a tool name that the text also uses

Qwen3 drops the reasoning of turns before the last user message and gives the last turn an empty think block,
so on multi-turn rows some turns are trained in a sample of their own (source "<path>:<row>#<i>"): the counts
below pin how many. Templates that cannot render tools, tool calls or reasoning reject such rows by name.
"""

import functools
import json
import os
import re

import pytest

from sft.data.conversation import BadSample, FieldMapping, conversation_from_row
from sft.data.encoding import EncodeError, EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import get_template
from tests.conftest import real_tokenizer, shared_path
from tests.labelcheck import check_encoded, read_source_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = ["parallel_tool_calls.jsonl", "multi_turn_reasoning.jsonl", "think_in_content.jsonl",
            "reasoning_tool_turns.jsonl", "system_tools_string.jsonl"]
DATASETS = {
    "glaive": FieldMapping(messages_key="conversations"),
    "reason_tool_use": FieldMapping(messages_key="messages"),
    "fixtures": FieldMapping(messages_key="messages"),
}


def dataset_files(dataset: str) -> list[str]:
    if dataset == "glaive":
        return [shared_path("datasets", "glaive_toolcall_en_demo.json")]
    if dataset == "reason_tool_use":
        return [shared_path("datasets", "reason_tool_use_demo_50.jsonl")]
    return [os.path.join(HERE, "data", name) for name in FIXTURES]


@functools.lru_cache(maxsize=None)  # several tests look at the same encoding from different sides
def encode_and_check(tokenizer_name, template, dataset, loss_on_turns="all", train_on_reasoning=True):
    """Encode a dataset, check every label with the independent checker, return (result, checked)."""
    tokenizer = real_tokenizer(tokenizer_name)
    files, mapping = dataset_files(dataset), DATASETS[dataset]
    settings = EncodeSettings(mapping, sequence_length=10**7, on_bad_sample="skip", loss_on_turns=loss_on_turns,
                              train_on_reasoning=train_on_reasoning)
    result = encode_split(files, get_template(template, tokenizer), tokenizer, settings)
    report = result.report
    assert report["truncated"] == 0 and not report["dropped"]
    checked = check_encoded(result.dataset, files, mapping, template, tokenizer, loss_on_turns=loss_on_turns,
                            train_on_reasoning=train_on_reasoning)
    # The checker's own count of rows and samples agrees with the report's.
    assert (checked.rows, checked.samples, checked.split_samples) == (
        report["kept"], report["samples"], report["split_samples"])
    assert sum(report["rejected"].values()) == report["rows_read"] - report["kept"], report["rejected"]
    return result, checked


def features(conversation) -> set[str]:
    """The features of a conversation that some templates cannot render."""
    found = {"tools"} if conversation.tools else set()
    for message in conversation.messages:
        found |= {key for key in ("tool_calls", "reasoning_content") if message.get(key)}
    return found


# (rows read, rows kept, samples, of which one-turn samples) per tokenizer and dataset; native and the named
# template of a model give the same (the checker proves they give the same text and labels).
# qwen2.5 rejects the rows with reasoning_content (all 50 of reason_tool_use, 7 fixture rows); <think> in the
# content is plain text to it. llama3 keeps only rows with no tools, tool calls or reasoning_content (the 109
# glaive rows without tools, the 4 think_in_content rows), also where a tool's name appears in the text
# (system_tools_string rows 5 and 6). qwen3 trains alone every turn before the last user message and every
# tool-call turn without reasoning after it: glaive 657 of its 957 trained turns, reason_tool_use 40 of 112.
EXPECTED = {
    ("qwen2.5-instruct", "glaive"): (300, 300, 300, 0),
    ("qwen2.5-instruct", "reason_tool_use"): (50, 0, 0, 0),
    ("qwen2.5-instruct", "fixtures"): (21, 14, 14, 0),
    ("qwen3", "glaive"): (300, 300, 957, 657),
    ("qwen3", "reason_tool_use"): (50, 48, 88, 40),  # lines 6 and 7 give their reasoning twice (a </think> in the content)
    ("qwen3", "fixtures"): (21, 21, 40, 19),
    ("llama3", "glaive"): (300, 109, 109, 0),
    ("llama3", "reason_tool_use"): (50, 0, 0, 0),
    ("llama3", "fixtures"): (21, 4, 4, 0),
}
COMBOS = [("qwen2.5-instruct", "native"), ("qwen2.5-instruct", "qwen2_5"), ("qwen3", "native"), ("qwen3", "qwen3"),
          ("llama3", "native"), ("llama3", "llama3")]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("tokenizer_name, template", COMBOS)
def test_every_label_of_every_tool_and_reasoning_row(tokenizer_name, template, dataset):
    result, _ = encode_and_check(tokenizer_name, template, dataset)
    report = result.report
    counts = (report["rows_read"], report["kept"], report["samples"], report["split_samples"])
    assert counts == EXPECTED[tokenizer_name, dataset], report


ALL_FEATURES = {"tools", "tool_calls", "reasoning_content"}
REFUSED_FEATURES = {
    # what each template cannot render; a row carrying it must be rejected naming it
    ("qwen2.5-instruct", "native"): {"reasoning_content"},
    ("qwen2.5-instruct", "qwen2_5"): {"reasoning_content"},
    ("llama3", "native"): ALL_FEATURES,
    ("llama3", "llama3"): ALL_FEATURES,
    ("qwen3", "chatml"): ALL_FEATURES,
}
FEATURE_WORDS = {"tools": r"\btools\b", "tool_calls": r"tool[ _]calls?", "reasoning_content": r"reasoning"}


@pytest.mark.parametrize("dataset", ["glaive", "reason_tool_use", "fixtures"])
@pytest.mark.parametrize("tokenizer_name, template", REFUSED_FEATURES)
def test_rows_a_template_cannot_render_are_rejected_by_name(tokenizer_name, template, dataset):
    result, _ = encode_and_check(tokenizer_name, template, dataset)
    refused = REFUSED_FEATURES[tokenizer_name, template]
    files, mapping = dataset_files(dataset), DATASETS[dataset]
    rows = {f"{path}:{number}": row for path in files for number, row in read_source_rows(path).items()}
    kept = {source.partition("#")[0] for source in result.dataset["source"]}
    expected_rejects = 0
    for source, row in rows.items():
        try:
            carried = features(conversation_from_row(row, mapping)) & refused
        except BadSample:  # a bad row whatever the template (reasoning given twice)
            carried = {"a bad row"}
        assert (source in kept) == (not carried), f"{source} carries {carried or 'nothing refused'}"
        expected_rejects += bool(carried)
    assert result.report["rows_read"] - result.report["kept"] == expected_rejects
    # Every reject reason names the feature it is about.
    words = [FEATURE_WORDS[feature] for feature in refused]
    for reason in result.report["rejected"]:
        assert any(re.search(word, reason) for word in words), reason


# train_on_reasoning false: the think block of each target is context; the answer, the tool-call markup and the
# end-of-turn marker are still targets, and the samples are the same. Supervised tokens with reasoning trained
# on, and without: on glaive (no reasoning) qwen3 then trains exactly the tokens qwen2.5 trains.
SUPERVISED_TOKENS = {
    ("qwen3", "glaive"): (94504, 90676),
    ("qwen3", "reason_tool_use"): (27675, 9187),
    ("qwen3", "fixtures"): (1613, 1095),
    ("qwen2.5-instruct", "fixtures"): (825, 729),  # <think> in the content of 4 rows
}


@pytest.mark.parametrize("tokenizer_name, template, dataset", [
    ("qwen3", "native", "glaive"), ("qwen3", "native", "reason_tool_use"), ("qwen3", "qwen3", "reason_tool_use"),
    ("qwen3", "native", "fixtures"), ("qwen3", "qwen3", "fixtures"), ("qwen2.5-instruct", "native", "fixtures")])
def test_reasoning_can_be_left_out_of_the_targets(tokenizer_name, template, dataset):
    result, _ = encode_and_check(tokenizer_name, template, dataset, train_on_reasoning=False)
    report = result.report
    counts = (report["rows_read"], report["kept"], report["samples"], report["split_samples"])
    assert counts == EXPECTED[tokenizer_name, dataset], report
    with_reasoning, without_reasoning = SUPERVISED_TOKENS[tokenizer_name, dataset]
    assert report["supervised_tokens"] == without_reasoning
    assert encode_and_check(tokenizer_name, template, dataset)[0].report["supervised_tokens"] == with_reasoning


@pytest.mark.parametrize("tokenizer_name, template, dataset, counts", [
    ("qwen3", "native", "reason_tool_use", (50, 48, 48, 0)),
    ("qwen3", "qwen3", "fixtures", (21, 21, 21, 0)),
    # Reasoning on a context turn is still the row's: a template that cannot render it rejects the row.
    ("qwen2.5-instruct", "native", "fixtures", (21, 14, 14, 0)),
    ("qwen2.5-instruct", "qwen2_5", "fixtures", (21, 14, 14, 0)),
    ("llama3", "native", "fixtures", (21, 4, 4, 0)),
])
def test_last_turn_only_with_tools_and_reasoning(tokenizer_name, template, dataset, counts):
    """loss_on_turns last: earlier turns are context, so no row needs a sample of its own for a turn."""
    result, _ = encode_and_check(tokenizer_name, template, dataset, loss_on_turns="last")
    report = result.report
    assert (report["rows_read"], report["kept"], report["samples"], report["split_samples"]) == counts, report


# ----- Bad input: each new field's problems name the file, the line and the reason --------------------------

GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _calling(call: dict) -> dict:
    return {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": "-3°C"}, {"role": "assistant", "content": "It is -3°C."}],
            "tools": [WEATHER_TOOL]}


BAD_ROWS = {
    "malformed arguments": (
        _calling({"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\""}}),
        ["messages[1].tool_calls[0].arguments", "not valid JSON"]),
    "tool call without a name": (
        _calling({"type": "function", "function": {"arguments": "{\"city\": \"Oslo\"}"}}),
        ["messages[1].tool_calls[0]", "has no name"]),
    "tools not a list": (
        _calling({"type": "function", "function": {"name": "get_weather", "arguments": {}}}) | {"tools": WEATHER_TOOL},
        ["'tools'", "expected a list of tools"]),
    "unknown content part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                      {"role": "assistant", "content": "A cat."}]},
        ["messages[0].content[0]", "'image_url'"]),
}


@pytest.mark.parametrize("problem", BAD_ROWS)
def test_bad_tool_and_reasoning_fields_name_file_line_and_reason(tmp_path, problem):
    row, reason_parts = BAD_ROWS[problem]
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as handle:  # the bad row is the 2nd row but on line 3: errors name the line
        handle.write(json.dumps(GOOD_ROW) + "\n\n" + json.dumps(row) + "\n")
    tokenizer = real_tokenizer("qwen3")
    settings = EncodeSettings(FieldMapping(messages_key="messages"), sequence_length=10**7, on_bad_sample="error")
    with pytest.raises(EncodeError) as error:
        encode_split([path], get_template("native", tokenizer), tokenizer, settings)
    message = str(error.value)
    assert message.startswith(f"{path} line 3: "), message
    for part in reason_parts:
        assert part in message, message
    # Asked to skip, the row is counted as rejected and the good one kept.
    skipping = EncodeSettings(settings.mapping, sequence_length=10**7, on_bad_sample="skip")
    report = encode_split([path], get_template("native", tokenizer), tokenizer, skipping).report
    assert (report["rows_read"], report["kept"], sum(report["rejected"].values())) == (2, 1, 1), report
