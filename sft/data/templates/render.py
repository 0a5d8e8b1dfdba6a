"""Rendering a conversation into samples, each one string plus the character spans trained on.

Pure: templates see strings and the tokenizer's special-token strings, never token ids. A rendered
sample looks like this (ChatML; ``[...]`` marks the supervised span of each trained assistant turn)::

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>]\\n

**Generation-faithful targets.** A supervised span is exactly what the model must generate at that point:
for trained assistant message ``i`` the context is ``P_i = render(messages[:i], tools, add_generation_prompt)``
and the target is what ``render(messages[:i+1], tools)`` writes after ``P_i``, through the end-of-turn
marker (reasoning, content, tool-call markup, ``<|im_end|>``). One render of the whole conversation holds
every such target in most templates. Some templates render a past turn differently from the current one
(Qwen3 drops the reasoning of turns before the last user query and gives only the final turn a
``<think>`` block); then the whole render cannot hold turn ``i``'s faithful target, and the row gives one
more sample, ``render(messages[:i+1])`` with only turn ``i`` supervised (source ``<row>#<i>``, counted in
the report as ``split_samples``)::

    messages  user U1 | assistant (reasoning R1) A1 | user U2 | assistant (reasoning R2) A2
    sample    ... U1 ... A1 ... U2 ... [<think>R2</think> A2<|im_end|>]          (R1 dropped: A1 unsupervised)
    sample #1 ... U1 ... [<think>R1</think> A1<|im_end|>]

Every target is checked for what the row carries: a template that does not render the turn's reasoning,
tool calls or content, or the row's tools, refuses the row naming the feature (never trains without it).
With ``train_on_reasoning: false`` each target is masked from its start through ``</think>`` (and the
newlines after it), or through the reasoning text when the template writes no ``</think>``.

The templates themselves: sft/data/templates/named.py (written in Python as pieces) and native.py (the
tokenizer's own Jinja template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from sft.errors import UserError

Piece = tuple[str, Optional[int]]  # (text, index of the assistant message it is the target of, or None)


class TemplateError(UserError):
    """The template cannot produce exact labels for a conversation (or at all)."""


class TemplateRefused(ValueError):
    """The template refused this conversation (e.g. a Jinja raise_exception); a bad sample, not a bad template."""


@dataclass
class Sample:
    """One rendered sample: its text, the supervised character spans, and which turn it was split off for."""

    text: str
    spans: list[tuple[int, int]]
    turn: Optional[int] = None  # None: the whole conversation; i: rendered up to assistant message i alone
    turns: list[int] = field(default_factory=list)  # the assistant message of each span


def split_thinking(content: str) -> tuple[str, str]:
    """Qwen3's split of '<think>reasoning</think>answer' into (reasoning, answer)."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def reasoning_of(message: dict) -> str:
    """The reasoning a message carries: reasoning_content, or a <think> block leading its content."""
    if message.get("reasoning_content"):
        return message["reasoning_content"]
    return split_thinking(message["content"])[0]


class ChatTemplate:
    """Renders conversations to samples with generation-faithful spans (see the module docstring).

    A template gives ``_layout`` (the render of some messages and the span of each requested assistant
    message in it, or None where the turn's prompt is not a prefix of that render) and says whether its
    turns are ``turn_stable`` (a turn renders the same whatever follows it).
    """

    name: str = ""
    end_of_turn: str = ""
    turn_stable: bool = True
    features: frozenset = frozenset()  # what it renders, of: tools, tool_calls, custom_tool_calls, reasoning
    switches: dict = {}  # chat_template_kwargs of a Jinja template (read only; a template that takes them sets its own)

    def render_text(self, messages: list[dict], tools: Optional[list[dict]] = None,
                    add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def generation_prompt(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        """The text a model continues to answer after ``messages`` (for inference and the demo)."""
        return self.render_text(messages, tools, add_generation_prompt=True)

    def _layout(self, messages: list[dict], tools, indices: list[int]) -> tuple[str, dict[int, Optional[tuple[int, int]]]]:
        raise NotImplementedError

    def _check(self, conversation) -> None:
        """Refuse a conversation carrying anything this template does not render, naming it."""
        found = []
        if conversation.tools:
            found.append(("tools", "the row's tools (tools_key)"))
        for index, message in enumerate(conversation.messages):
            calls = message.get("tool_calls") or ()
            if any(call.get("type") != "custom" for call in calls):
                found.append(("tool_calls", f"the tool calls of message {index}"))
            if any(call.get("type") == "custom" for call in calls):
                found.append(("custom_tool_calls", f"custom tool calls (type custom, message {index})"))
            if message.get("reasoning_content"):  # a <think> block in the content is content to any template
                found.append(("reasoning", f"the reasoning_content of message {index}"))
        for feature, what in found:
            if feature == "custom_tool_calls" and feature not in self.features:
                raise TemplateRefused(f"template {self.name} does not support {what}: it renders only function "
                                      "tool calls; convert the call to a function call or leave the row out")
            if feature not in self.features:
                choices = "qwen2_5 or qwen3" if feature != "reasoning" else "qwen3"
                raise TemplateRefused(f"template {self.name} does not render {what}; use a template that does "
                                      f"(native for a model whose own template renders it, or {choices})")

    def render(self, conversation, train_on_reasoning: bool = True) -> list[Sample]:
        """The samples of one conversation: the whole render, plus one per turn it cannot hold faithfully."""
        self._check(conversation)
        messages, tools = conversation.messages, conversation.tools
        targets = [index for index, trained in enumerate(conversation.trained) if trained]
        full, spans = self._layout(messages, tools, targets)
        whole = Sample(full, [])
        samples = []
        for index in targets:
            span = spans[index]
            if span is None or not (index == len(messages) - 1 or self.turn_stable):
                text, local = self._layout(messages[:index + 1], tools, [index])
                if local[index] is None:
                    prompt = self.generation_prompt(messages[:index], tools)
                    at = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
                    if reasoning_of(messages[index]) and self.switches:
                        # e.g. Qwen3 with enable_thinking: false: the prompt closes an empty think block.
                        raise TemplateRefused(
                            f"template {self.name} with chat_template_kwargs {self.switches} writes the think block "
                            f"into the prompt, so assistant message {index}'s reasoning cannot be trained (drop the "
                            "reasoning, or the switch for reasoning data)")
                    raise TemplateError(
                        f"template {self.name}: the prompt render before assistant message {index} is not a prefix of "
                        f"the render through it (they differ at character {at}: prompt has {prompt[at:at + 30]!r}, the "
                        f"render has {text[at:at + 30]!r}); labels would be wrong. Choose a named template.")
                start, end = local[index]
                faithful = span is not None and span[0] == start and full[:start] == text[:start] and full[start:span[1]] == text[start:end]
                if not faithful:
                    samples.append(Sample(text, [local[index]], turn=index, turns=[index]))
                    continue
            whole.spans.append(span)
            whole.turns.append(index)
        if whole.spans:
            samples.insert(0, whole)
        for sample in samples:
            self._verify(sample, messages, tools)
            if not train_on_reasoning:
                sample.spans = [_mask_reasoning(sample.text, span, messages[turn]) for span, turn in zip(sample.spans, sample.turns)]
        return samples

    def _verify(self, sample: Sample, messages: list[dict], tools) -> None:
        """Refuse a row whose reasoning, tool calls, content or tools the render does not carry."""
        for (start, end), index in zip(sample.spans, sample.turns):
            message, target = messages[index], sample.text[start:end]
            if not target.endswith(self.end_of_turn):
                raise TemplateError(f"template {self.name}: assistant message {index}'s target does not end with "
                                    f"the end-of-turn marker {self.end_of_turn!r}")
            reasoning = reasoning_of(message).strip()
            if reasoning and reasoning not in target:
                raise TemplateRefused(f"template {self.name} does not render the reasoning of assistant message {index} "
                                      "(reasoning_content or a <think> block); choose a template that does, or remove it")
            answer = split_thinking(message["content"])[1].strip() if not message.get("reasoning_content") else message["content"].strip()
            if answer and answer not in target:
                raise TemplateRefused(f"template {self.name} does not render the content of assistant message {index}")
            for call in message.get("tool_calls", ()):
                name = call["custom"]["name"] if call.get("type") == "custom" else call["function"]["name"]
                if name not in target:
                    raise TemplateRefused(f"template {self.name} does not render the tool calls of assistant message "
                                          f"{index}; choose a template with tool calling (native on a tool-calling "
                                          "model, qwen2_5, qwen3)")
        if tools:
            prompt = sample.text[:sample.spans[0][0]] if sample.spans else sample.text
            missing = [tool["function"]["name"] for tool in tools if tool["function"]["name"] not in prompt]
            if missing:
                raise TemplateRefused(f"template {self.name} does not render the tools offered (tools_key), e.g. "
                                      f"{missing[0]!r}; choose a template with tool calling (native on a "
                                      "tool-calling model, qwen2_5, qwen3)")


def _mask_reasoning(text: str, span: tuple[int, int], message: dict) -> tuple[int, int]:
    """The span without its reasoning: from after '</think>' and its newlines (or after the reasoning text)."""
    start, end = span
    target = text[start:end]
    close = target.find("</think>")
    if close != -1:
        cut = start + close + len("</think>")
    else:
        reasoning = reasoning_of(message).strip()
        found = target.find(reasoning) if reasoning else -1
        if found == -1:
            return span
        cut = start + found + len(reasoning)
    while cut < end and text[cut] in "\n":
        cut += 1
    return cut, end


class PieceTemplate(ChatTemplate):
    """A template written as a function from (messages, tools, special tokens) to pieces; ``header`` is the
    generation prompt it ends with when asked to."""

    def __init__(self, name: str, pieces: Callable, header: str, tokens, end_of_turn: str,
                 features: frozenset = frozenset(), turn_stable: bool = True):
        self.name, self._pieces, self._header, self.tokens = name, pieces, header, tokens
        self.end_of_turn, self.features, self.turn_stable = end_of_turn, features, turn_stable

    def render_text(self, messages, tools=None, add_generation_prompt=False):
        text = "".join(text for text, _ in self._pieces(messages, tools, self.tokens))
        return text + self._header if add_generation_prompt else text

    def _layout(self, messages, tools, indices):
        parts, spans, position = [], {}, 0
        wanted = set(indices)
        for text, target in self._pieces(messages, tools, self.tokens):
            if target in wanted:
                begin = spans[target][0] if target in spans else position
                spans[target] = (begin, position + len(text))
            parts.append(text)
            position += len(text)
        return "".join(parts), {index: spans.get(index) for index in indices}
