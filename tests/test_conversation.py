"""Rows -> conversations: tools, tool calls, reasoning and tool results in every form the data brings them,
and a clear reason for every row that cannot be mapped (guarantee 7)."""

import json
import re

import pytest

from sft.data.conversation import BadSample, FieldMapping, conversation_from_row

MULTI = FieldMapping(messages_key="messages")
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}


def user(text="What is the weather in Oslo?"):
    return {"role": "user", "content": text}


def test_single_turn_mapping_follows_the_seed():
    mapping = FieldMapping(system_key="system")
    conversation = conversation_from_row({"system": "Be brief.", "instruction": "Add", "input": "1+1", "output": "2"}, mapping)
    assert conversation.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n1+1"},
                                     {"role": "assistant", "content": "2"}]
    assert conversation.trained == [False, False, True] and conversation.tools is None
    conversation = conversation_from_row({"instruction": "Hi", "input": "", "output": "Hello"}, FieldMapping())
    assert conversation.messages[0] == {"role": "user", "content": "Hi"}  # an empty query adds no newline


def test_multi_turn_openai_and_sharegpt_rows():
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                           {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "2"}]}]}
    conversation = conversation_from_row(openai, MULTI)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[-1]["content"] == "A2" and conversation.trained == [False, False, True, False, True]
    assert conversation_from_row(openai, MULTI, loss_on_turns="last").trained == [False, False, False, False, True]
    sharegpt = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}], "id": "x"}
    conversation = conversation_from_row(sharegpt, FieldMapping(messages_key="conversations"))
    assert [m["role"] for m in conversation.messages] == ["assistant", "user", "assistant"]
    assert conversation.trained == [False, False, True]  # an assistant turn with no prompt before it is context
    assert conversation.ignored_keys == ("id",)


def test_openai_tool_calls_with_string_and_object_arguments_and_tool_results():
    row = {"messages": [
        user(),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": "12:00"},
        {"role": "assistant", "content": "Rain at noon."}],
        "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}},
                             {"type": "function", "function": {"name": "get_time"}}])}
    conversation = conversation_from_row(row, MULTI)
    calls = conversation.messages[1]["tool_calls"]
    assert conversation.messages[1]["content"] == ""
    assert calls[0] == {"type": "function", "function": CALL["function"], "id": "call_1"}
    assert calls[1]["function"] == {"name": "get_time", "arguments": {"zone": "CET"}}
    assert conversation.messages[2] == {"role": "tool", "content": "rain", "tool_call_id": "call_1", "name": "get_weather"}
    assert conversation.trained == [False, True, False, False, True]
    assert conversation.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
                                  {"type": "function", "function": {"name": "get_time"}}]


def test_sharegpt_function_call_and_observation_turns():
    row = {"conversations": [{"from": "human", "value": "Weather?"},
                             {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})},
                             {"from": "observation", "value": "rain"}, {"from": "gpt", "value": "Rain."}],
           "tools": json.dumps([{"name": "get_weather", "description": "d", "parameters": {}}])}
    conversation = conversation_from_row(row, FieldMapping(messages_key="conversations"))
    assert conversation.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert conversation.messages[2] == {"role": "tool", "content": "rain"}
    assert conversation.trained == [False, True, False, True]


def test_content_parts_carry_reasoning_and_tool_calls():
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "I should call the tool."},
                                          {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})}]},
        {"role": "tool", "content": [{"type": "text", "value": "rain"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "It rains."}, {"type": "text", "value": "Rain."}]}]}
    messages = conversation_from_row(row, MULTI).messages
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "I should call the tool."}
    assert messages[3] == {"role": "assistant", "content": "Rain.", "reasoning_content": "It rains."}


def test_reasoning_keys_legacy_function_call_and_flat_tool_calls():
    row = {"messages": [user(), {"role": "assistant", "content": "", "reasoning": "Think.",
                                 "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}},
                        {"role": "function", "content": "rain"},
                        {"role": "assistant", "content": "Rain.", "thinking": "Done.",
                         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]}]}
    messages = conversation_from_row(row, MULTI).messages
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "Think."}
    assert messages[2]["role"] == "tool"
    assert messages[3]["tool_calls"] == [CALL] and messages[3]["reasoning_content"] == "Done."


def test_parquet_style_nulls_count_as_absent():
    # Parquet stores messages as structs: every message has every key, null where it has none.
    keys = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None, "tool_call_id": None, "name": None}
    row = {"messages": [{**keys, "role": "user", "content": "Hi"}, {**keys, "role": "assistant", "content": "Hello"},
                        {**keys, "role": "user", "content": "Weather?"},
                        {**keys, "role": "assistant", "content": None, "tool_calls": [
                            {"id": None, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]}],
           "tools": None, "id": None}
    conversation = conversation_from_row(row, MULTI)
    assert conversation.messages[:2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert conversation.messages[3] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert conversation.tools is None and conversation.ignored_keys == ()


def test_weight_and_train_flags_make_a_turn_context_and_unknown_keys_are_named():
    row = {"messages": [user("a"), {"role": "assistant", "content": "b", "weight": 0}, user("c"),
                        {"role": "assistant", "content": "d", "train": True, "score": 0.5},
                        user("e"), {"role": "assistant", "content": "f", "train": False}], "source": "x"}
    conversation = conversation_from_row(row, MULTI)
    assert conversation.trained == [False, False, False, True, False, False]
    assert conversation.ignored_keys == ("messages[].score", "source")


@pytest.mark.parametrize("row, mapping, reason", [
    ({"instruction": "a", "input": None, "output": "b"}, FieldMapping(), r"field 'input' \(query_key\) is null"),
    ({"instruction": 5, "input": "", "output": "b"}, FieldMapping(), r"field 'instruction' \(prompt_key\) is a int"),
    ({"instruction": "a", "input": "", "output": "  "}, FieldMapping(), r"empty response"),
    ({"instruction": "a", "output": "b"}, FieldMapping(), r"missing key 'input' \(query_key\); this row has keys: instruction, output"),
    ({"messages": []}, MULTI, r"empty conversation"),
    ({"messages": None}, MULTI, r"'messages' \(messages_key\) is null"),
    ({"messages": [user("q")]}, MULTI, r"no assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, MULTI, r"no assistant turn follows a user turn"),
    ({"messages": [user("q"), {"role": "robot", "content": "a"}]}, MULTI, r"messages\[1\]\.role is 'robot'"),
    ({"messages": [user("q"), {"role": "assistant", "content": None}]}, MULTI, r"messages\[1\]\.content is null"),
    ({"messages": [user("q"), {"role": "assistant", "content": ""}]}, MULTI, r"empty response: .* no content and no tool calls"),
    ({"messages": [{"speaker": "user", "text": "q"}]}, MULTI, r"neither 'role' \(OpenAI\) nor 'from' \(ShareGPT\)"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "a"}]},
     MULTI, r"messages\[0\]\.content\[0\] is a part of type 'image_url'"),
    # tool calls and tools
    ({"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"'}}]}]},
     MULTI, r"messages\[1\]\.tool_calls\[0\]\.arguments is not valid JSON"),
    ({"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
     MULTI, r"messages\[1\]\.tool_calls\[0\] has no name"),
    ({"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     MULTI, r"messages\[1\]\.tool_calls\[0\]\.arguments is a list, expected a JSON object"),
    ({"messages": [user(), {"role": "assistant", "content": "ok"}], "tools": {"name": "f"}},
     MULTI, r"field 'tools' \(tools_key\) is a dict, expected a list of tools"),
    ({"messages": [user(), {"role": "assistant", "content": "ok"}], "tools": "[{\"name\": "},
     MULTI, r"field 'tools' \(tools_key\) is not valid JSON"),
    ({"messages": [user(), {"role": "assistant", "content": "ok"}], "tools": [{"description": "no name"}]},
     MULTI, r"field 'tools' \(tools_key\)\[0\] has no function name"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(city='Oslo')"}]},
     FieldMapping(messages_key="conversations"), r"conversations\[1\]\.value is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "hmm"}, {"role": "assistant", "content": "a"}]},
     MULTI, r"messages\[0\] is a user message with reasoning"),
    ({"messages": [user(), {"role": "assistant", "content": "a", "weight": 0.5}]}, MULTI, r"weight must be 0 or 1"),
])
def test_bad_rows_say_why(row, mapping, reason):
    with pytest.raises(BadSample, match=reason):
        conversation_from_row(row, mapping)


# ----- Issue 17: reasoning given twice, thinking parts, custom calls, notes, TRL's prompt/completion --------

@pytest.mark.parametrize("message, where", [
    ({"role": "assistant", "content": "<think>R</think>A", "reasoning_content": "R"}, "a <think> block in its content"),
    ({"role": "assistant", "content": "R</think>\n\nA", "reasoning_content": "R"}, "its content before a '</think>' tag"),
    ({"role": "assistant", "content": "A", "reasoning": "R", "reasoning_content": "R"}, "'reasoning_content' and in 'reasoning'"),
    ({"role": "assistant", "content": [{"type": "thinking", "thinking": "R"}, {"type": "text", "text": "A"}],
      "reasoning_content": "R"}, "content parts of type reasoning/thinking and in 'reasoning_content'"),
    ({"from": "gpt", "value": "<think>R</think>A", "thinking": "R"}, "a <think> block in its value"),
])
def test_reasoning_given_twice_is_a_bad_row(message, where):
    with pytest.raises(BadSample, match=r"messages\[1\] gives its reasoning twice, in .*" + re.escape(where)):
        conversation_from_row({"messages": [user(), message]}, MULTI)


def test_anthropic_thinking_parts_are_reasoning():
    parts = [{"type": "thinking", "thinking": "First.", "signature": "sig"}, {"type": "text", "text": "A"},
             {"type": "thinking", "thinking": "Second."}]
    message = conversation_from_row({"messages": [user(), {"role": "assistant", "content": parts}]}, MULTI).messages[1]
    assert message == {"role": "assistant", "content": "A", "reasoning_content": "First.\n\nSecond."}


def test_custom_tool_calls_are_kept_for_the_template_to_judge():
    custom = {"id": "c1", "type": "custom", "custom": {"name": "shell", "input": "ls"}}
    message = conversation_from_row({"messages": [user(), {"role": "assistant", "content": None, "tool_calls": [custom]}]},
                                    MULTI).messages[1]
    assert message["tool_calls"] == [custom]
    with pytest.raises(BadSample, match=r"messages\[1\]\.tool_calls\[0\] is a custom tool call \(type custom\) with no"):
        conversation_from_row({"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [
            {"type": "custom", "custom": {"input": "ls"}}]}]}, MULTI)


def test_odd_but_trainable_rows_carry_notes():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {}}}
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    row = {"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_2", "content": "rain"}, {"role": "assistant", "content": "Rain."},
                        user("Thanks")], "tools": tools}
    assert conversation_from_row(row, MULTI).notes == (
        "a tool call names a function the row's tools do not offer",
        "a tool result's tool_call_id matches no earlier tool call",
        "the conversation ends on a user turn (kept as unsupervised context)")
    assert conversation_from_row({"messages": [user(), {"role": "assistant", "content": "A"}]}, MULTI).notes == ()


TRL_ROW = {"prompt": [{"role": "system", "content": "S"}, user("U1"), {"role": "assistant", "content": "A1"}, user("U2")],
           "completion": [{"role": "assistant", "content": "A2"}], "tools": None}


@pytest.mark.parametrize("mapping", [MULTI, FieldMapping(), FieldMapping(prompt_key="prompt", response_key="completion", query_key=None)])
def test_trl_prompt_completion_rows_train_only_the_completion(mapping):
    conversation = conversation_from_row(TRL_ROW, mapping)
    assert [m["content"] for m in conversation.messages] == ["S", "U1", "A1", "U2", "A2"]
    assert conversation.trained == [False, False, False, False, True] and conversation.ignored_keys == ()
    assert mapping.missing_keys({"prompt", "completion", "tools"}) == {}
    with pytest.raises(BadSample, match=r"field 'completion' \(the completion\) has no assistant message"):
        conversation_from_row({**TRL_ROW, "completion": [user("more")]}, mapping)


def test_missing_keys_still_names_what_other_rows_lack():
    assert MULTI.missing_keys({"conversations"}) == {"messages": "messages_key"}
    assert FieldMapping().missing_keys({"instruction", "output"}) == {"input": "query_key"}
    # the default keys are there: the rows are single-turn even if they also have prompt and completion
    assert FieldMapping().missing_keys({"instruction", "output", "prompt", "completion"}) == {"input": "query_key"}


def test_a_call_to_an_unoffered_function_is_noted_also_when_the_row_ends_on_it():
    row = {"messages": [user(), {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {}}]}]}
    assert conversation_from_row(row, MULTI).notes == ("a tool call names a function the row's tools do not offer",)
    row["tools"] = [{"name": "get_weather"}]
    assert conversation_from_row(row, MULTI).notes == ()
