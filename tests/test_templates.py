"""Templates: generation-faithful targets, splits where one render cannot hold them, refusals by feature, and
the one-render path of native templates giving exactly what prefix renders give."""

import pytest

from sft.data.conversation import Conversation, FieldMapping
from sft.data.encoding import EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import TemplateRefused, get_template
from sft.data.templates.native import NativeTemplate
from tests.conftest import real_tokenizer, shared_path

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def conversation(messages, tools=None):
    return Conversation(messages, [m["role"] == "assistant" for m in messages], tools)


def targets(sample):
    return [sample.text[start:end] for start, end in sample.spans]


REASONING_CHAT = [
    {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
]


@pytest.mark.parametrize("name", ["native", "qwen3"])
def test_qwen3_splits_a_turn_whose_reasoning_the_whole_render_drops(name):
    tokenizer = real_tokenizer("qwen3")
    samples = get_template(name, tokenizer).render(conversation(REASONING_CHAT))
    assert [sample.turn for sample in samples] == [None, 1]
    whole, split = samples
    assert whole.text == tokenizer.apply_chat_template(REASONING_CHAT, tokenize=False)
    assert "R1" not in whole.text and targets(whole) == ["<think>\nR2\n</think>\n\nA2<|im_end|>"]
    assert split.text == tokenizer.apply_chat_template(REASONING_CHAT[:2], tokenize=False)
    assert targets(split) == ["<think>\nR1\n</think>\n\nA1<|im_end|>"]
    masked = get_template(name, tokenizer).render(conversation(REASONING_CHAT), train_on_reasoning=False)
    assert [targets(sample) for sample in masked] == [["A2<|im_end|>"], ["A1<|im_end|>"]]


@pytest.mark.parametrize("tokenizer_name, name", [("qwen2.5-instruct", "native"), ("qwen2.5-instruct", "qwen2_5"),
                                                  ("qwen3", "native"), ("qwen3", "qwen3")])
def test_tool_calls_are_targets_and_tools_and_results_are_context(tokenizer_name, name):
    tokenizer = real_tokenizer(tokenizer_name)
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]},
                {"role": "tool", "content": "rain", "name": "get_weather"}, {"role": "tool", "content": "wind"},
                {"role": "assistant", "content": "Rain and wind."}]
    samples = get_template(name, tokenizer).render(conversation(messages, TOOLS))
    whole = samples[0]
    assert whole.text == tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    think = "<think>\n\n</think>\n\n" if tokenizer_name == "qwen3" else ""
    assert targets(whole)[-1] == think + "Rain and wind.<|im_end|>"
    all_targets = [target for sample in samples for target in targets(sample)]
    assert sorted(all_targets) == sorted([think + call + "\n" + call + "<|im_end|>", think + "Rain and wind.<|im_end|>"])
    prompt = whole.text[:whole.spans[0][0]]
    assert "get_weather" in prompt and all("<tool_response>" not in target and "# Tools" not in target for target in all_targets)


@pytest.mark.parametrize("tokenizer_name, name, feature", [
    ("llama3", "native", "tool calls"), ("llama3", "llama3", "tools"), ("qwen3", "chatml", "tools"),
    ("qwen2.5-instruct", "native", "reasoning"), ("qwen2.5-instruct", "qwen2_5", "reasoning"),
])
def test_a_template_that_cannot_render_a_feature_refuses_the_row_by_name(tokenizer_name, name, feature):
    tokenizer = real_tokenizer(tokenizer_name)
    if feature == "reasoning":
        chat = conversation(REASONING_CHAT)
    else:
        chat = conversation([{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}], TOOLS)
    with pytest.raises(TemplateRefused, match=feature.split()[0]):
        get_template(name, tokenizer).render(chat)


class PrefixRenders(NativeTemplate):
    """The reference for the one-render path: the native template with its stability probes answering no, so every
    trained turn is found by a prefix render."""

    def probe_stability(self):
        return False, False


def test_a_message_quoting_the_generation_header_is_rendered_the_exact_way():
    tokenizer = real_tokenizer("qwen2.5-instruct")
    template = get_template("native", tokenizer)
    assert template.stable_turns  # Qwen2.5's template passes the probes: one render per conversation
    messages = [{"role": "user", "content": "Explain '<|im_start|>assistant\n' please"},
                {"role": "assistant", "content": "It opens <|im_start|>assistant\n turns."},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
    fast = template.render(conversation(messages))
    slow = PrefixRenders.from_tokenizer(tokenizer).render(conversation(messages))
    assert [(s.text, s.spans) for s in fast] == [(s.text, s.spans) for s in slow]
    assert targets(fast[0]) == ["It opens <|im_start|>assistant\n turns.<|im_end|>", "Welcome.<|im_end|>"]


@pytest.mark.parametrize("tokenizer_name", ["qwen2.5-instruct", "qwen3"])
@pytest.mark.parametrize("dataset, key", [("glaive_toolcall_en_demo.json", "conversations"),
                                          ("reason_tool_use_demo_50.jsonl", "messages")])
def test_one_render_path_equals_prefix_renders_on_real_data(tokenizer_name, dataset, key):
    tokenizer = real_tokenizer(tokenizer_name)
    path = shared_path("datasets", dataset)
    settings = EncodeSettings(FieldMapping(messages_key=key), sequence_length=10**7, on_bad_sample="skip")
    fast = encode_split([path], get_template("native", tokenizer), tokenizer, settings)
    slow = encode_split([path], PrefixRenders.from_tokenizer(tokenizer), tokenizer, settings)
    assert fast.report == slow.report
    assert fast.dataset["input_ids"] == slow.dataset["input_ids"] and fast.dataset["labels"] == slow.dataset["labels"]


def test_the_config_names_every_template_and_no_other():
    """One list of template names: the config's choices are exactly native plus the named templates' table."""
    from sft.config.sections import TEMPLATES
    from sft.data.templates.named import NAMED

    assert sorted(TEMPLATES) == sorted(["native", *NAMED])
