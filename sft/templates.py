"""Chat templates: a conversation -> rendered samples, each one string plus the character spans trained on.

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

* Named templates (qwen2_5, qwen3, chatml, llama3, base/empty, alpaca) are written in Python as
  (text, target-of) pieces, so spans are known by construction; they render tools and tool calls as the
  model's own template does, or refuse the row naming the feature.
* ``native`` runs the tokenizer's own Jinja template with ``tools``. Spans come from prefix renders, or
  from one render when probes at load time show the template is prefix-stable (see NativeTemplate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sft.errors import UserError

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

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


def reasoning_of(message: dict) -> str:
    """The reasoning a message carries: reasoning_content, or a <think> block leading its content."""
    if message.get("reasoning_content"):
        return message["reasoning_content"]
    return _split_thinking(message["content"])[0]


def _tojson(value: Any) -> str:
    # As transformers' chat-template tojson filter: no ASCII escaping, default separators.
    return json.dumps(value, ensure_ascii=False)


class ChatTemplate:
    """Renders conversations to samples with generation-faithful spans (see the module docstring).

    A template gives ``_layout`` (the render of some messages and the span of each requested assistant
    message in it, or None where the turn's prompt is not a prefix of that render) and says whether its
    turns are ``turn_stable`` (a turn renders the same whatever follows it).
    """

    name: str = ""
    end_of_turn: str = ""
    turn_stable: bool = True
    features: frozenset = frozenset()  # what it renders, of: tools, tool_calls, reasoning

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
            if message.get("tool_calls"):
                found.append(("tool_calls", f"the tool calls of message {index}"))
            if message.get("reasoning_content"):  # a <think> block in the content is content to any template
                found.append(("reasoning", f"the reasoning_content of message {index}"))
        for feature, what in found:
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
            answer = _split_thinking(message["content"])[1].strip() if not message.get("reasoning_content") else message["content"].strip()
            if answer and answer not in target:
                raise TemplateRefused(f"template {self.name} does not render the content of assistant message {index}")
            for call in message.get("tool_calls", ()):
                if call["function"]["name"] not in target:
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
    """A template written as a function from (messages, tools) to pieces."""

    def __init__(self, name: str, pieces: Callable, header: Callable, tokens: "SpecialTokens",
                 end_of_turn: str, features: frozenset = frozenset(), turn_stable: bool = True):
        self.name, self._pieces, self._header, self.tokens = name, pieces, header, tokens
        self.end_of_turn, self.features, self.turn_stable = end_of_turn, features, turn_stable

    def render_text(self, messages, tools=None, add_generation_prompt=False):
        text = "".join(text for text, _ in self._pieces(messages, tools, self.tokens))
        return text + self._header(messages, self.tokens) if add_generation_prompt else text

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


class SpecialTokens:
    """The special-token strings templates need, read from a tokenizer."""

    def __init__(self, bos: Optional[str] = None, eos: Optional[str] = None):
        self.bos, self.eos = bos, eos

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        return cls(bos=tokenizer.bos_token, eos=tokenizer.eos_token)


# ----- ChatML family -------------------------------------------------------------------------------

def _chatml_turn(role: str, content: str, index: int) -> list[Piece]:
    if role == "assistant":
        return [("<|im_start|>assistant\n", None), (content + "<|im_end|>", index), ("\n", None)]
    return [(f"<|im_start|>{role}\n{content}<|im_end|>\n", None)]


def _qwen_tool_turn(messages: list[dict], index: int) -> list[Piece]:
    # Qwen writes tool results as a user turn holding <tool_response> blocks; consecutive results share it.
    text = ""
    if index == 0 or messages[index - 1]["role"] != "tool":
        text += "<|im_start|>user"
    text += "\n<tool_response>\n" + messages[index]["content"] + "\n</tool_response>"
    if index == len(messages) - 1 or messages[index + 1]["role"] != "tool":
        text += "<|im_end|>\n"
    return [(text, None)]


QWEN_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _qwen_tools_block(tools: list[dict]) -> str:
    return QWEN_TOOLS_INTRO + "".join("\n" + _tojson(tool) for tool in tools) + QWEN_TOOLS_OUTRO


def _qwen_tool_call(call: dict) -> str:
    function = call["function"]
    arguments = function["arguments"]
    arguments = arguments if isinstance(arguments, str) else _tojson(arguments)
    return '<tool_call>\n{"name": "' + function["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"


def chatml_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    pieces: list[Piece] = []
    for index, message in enumerate(messages):
        pieces += _chatml_turn(message["role"], message["content"], index)
    return pieces


def qwen2_5_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    # As Qwen2.5's own template: a default system prompt; tools go into the system turn; tool calls follow
    # the content, each in <tool_call> tags with its arguments as JSON.
    has_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        system = messages[0]["content"] if has_system else QWEN_DEFAULT_SYSTEM
        pieces: list[Piece] = [("<|im_start|>system\n" + system + "\n\n" + _qwen_tools_block(tools), None)]
    elif has_system:
        pieces = [(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n", None)]
    else:
        pieces = [(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n", None)]
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0 and has_system:
            continue
        if role == "tool":
            pieces += _qwen_tool_turn(messages, index)
        elif role == "assistant" and message.get("tool_calls"):
            body = content + "".join("\n" + _qwen_tool_call(call) for call in message["tool_calls"])
            if not content:  # the generation prompt's newline is already written
                body = body[1:]
            pieces += [("<|im_start|>assistant\n", None), (body + "<|im_end|>", index), ("\n", None)]
        else:
            pieces += _chatml_turn(role, content, index)
    return pieces


def _split_thinking(content: str) -> tuple[str, str]:
    """Qwen3's split of '<think>reasoning</think>answer' into (reasoning, answer)."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def qwen3_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    # As Qwen3's own template: reasoning is kept only in assistant turns after the last real user query,
    # and the final assistant turn always carries a (possibly empty) <think> block.
    has_system = bool(messages) and messages[0]["role"] == "system"
    pieces: list[Piece] = []
    if tools:
        system = messages[0]["content"] + "\n\n" if has_system else ""
        pieces.append(("<|im_start|>system\n" + system + _qwen_tools_block(tools), None))
    elif has_system:
        pieces.append((f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n", None))
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index]["content"]
        if messages[index]["role"] == "user" and not (
            content.startswith("<tool_response>") and content.endswith("</tool_response>")
        ):
            last_query = index
            break
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0 and has_system:
            continue
        if role == "tool":
            pieces += _qwen_tool_turn(messages, index)
        elif role == "assistant":
            if message.get("reasoning_content") is not None:
                reasoning = message["reasoning_content"]
            else:
                reasoning, content = _split_thinking(content) if "</think>" in content else ("", content)
            body = content
            if index > last_query and (index == len(messages) - 1 or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            for number, call in enumerate(message.get("tool_calls") or ()):
                body += ("\n" if number or content else "") + _qwen_tool_call(call)
            pieces += [("<|im_start|>assistant\n", None), (body + "<|im_end|>", index), ("\n", None)]
        else:
            pieces += _chatml_turn(role, content, index)
    return pieces


def chatml_header(messages, tokens) -> str:
    return "<|im_start|>assistant\n"


# ----- Llama 3 -------------------------------------------------------------------------------------

LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


def llama3_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    # Llama 3 strips each message's surrounding whitespace, as its own template does.
    pieces: list[Piece] = [(tokens.bos or "<|begin_of_text|>", None)]
    for index, message in enumerate(messages):
        header = f"<|start_header_id|>{LLAMA3_ROLES[message['role']]}<|end_header_id|>\n\n"
        content = message["content"].strip()
        if message["role"] == "assistant":
            pieces += [(header, None), (content + "<|eot_id|>", index)]
        else:
            pieces.append((header + content + "<|eot_id|>", None))
    return pieces


def llama3_header(messages, tokens) -> str:
    return "<|start_header_id|>assistant<|end_header_id|>\n\n"


# ----- Templates for base models -------------------------------------------------------------------

def _require_eos(tokens: SpecialTokens, name: str) -> str:
    if not tokens.eos:
        raise TemplateError(f"template {name}: the tokenizer has no eos token to end responses with")
    return tokens.eos


def empty_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    # No markup at all: the texts follow each other; a response ends with eos so the model learns to stop.
    eos = _require_eos(tokens, "empty")
    pieces: list[Piece] = [(tokens.bos, None)] if tokens.bos else []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            pieces.append((message["content"] + eos, index))
        else:
            pieces.append((message["content"], None))
    return pieces


def empty_header(messages, tokens) -> str:
    return ""


def alpaca_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    eos = _require_eos(tokens, "alpaca")
    system = ALPACA_DEFAULT_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        offset = 1
    else:
        offset = 0
    pieces: list[Piece] = [((tokens.bos or "") + system + "\n\n", None)]
    for index, message in enumerate(messages, start=offset):
        if message["role"] == "assistant":
            pieces += [("### Response:\n", None), (message["content"] + eos, index), ("\n\n", None)]
        elif message["role"] == "tool":
            pieces.append(("### Input:\n" + message["content"] + "\n\n", None))
        else:  # user, or a later system message, is an instruction
            pieces.append(("### Instruction:\n" + message["content"] + "\n\n", None))
    return pieces


def alpaca_header(messages, tokens) -> str:
    return "### Response:\n"


TOOLS = frozenset({"tools", "tool_calls"})
# name -> (pieces, generation header, end-of-turn marker (None: eos), features rendered, turn-stable)
NAMED = {
    "chatml": (chatml_pieces, chatml_header, "<|im_end|>", frozenset(), True),
    "qwen2_5": (qwen2_5_pieces, chatml_header, "<|im_end|>", TOOLS, True),
    "qwen3": (qwen3_pieces, chatml_header, "<|im_end|>", TOOLS | {"reasoning"}, False),
    "llama3": (llama3_pieces, llama3_header, "<|eot_id|>", frozenset(), True),
    "empty": (empty_pieces, empty_header, None, frozenset(), True),
    "base": (empty_pieces, empty_header, None, frozenset(), True),
    "alpaca": (alpaca_pieces, alpaca_header, None, frozenset(), True),
}


# ----- The tokenizer's own template ----------------------------------------------------------------

def _compile(chat_template: str):
    # transformers' own compiler, so Jinja extensions and filters match apply_chat_template exactly.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(chat_template)


# Probe conversations for NativeTemplate's stability check: multi-turn, system, reasoning, tools and calls.
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_lookup", "description": "Look a word up.",
                                                "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}
_PROBE_CALL = {"type": "function", "function": {"name": "probe_lookup", "arguments": {"word": "kestrel"}}}
_PROBES = [
    ([{"role": "user", "content": "Probe question 7319?"}, {"role": "assistant", "content": "Probe answer 4826."}], None),
    ([{"role": "system", "content": "Probe system 1177."}, {"role": "user", "content": "First probe 2231?"},
      {"role": "assistant", "content": "First reply 5521."}, {"role": "user", "content": "Second probe 9043?"},
      {"role": "assistant", "content": "Second reply 6612."}], None),
    ([{"role": "user", "content": "Think probe 3391?"},
      {"role": "assistant", "content": "Thought reply 8820.", "reasoning_content": "Probe reasoning 4417."},
      {"role": "user", "content": "Think again 7702?"},
      {"role": "assistant", "content": "Second thought 1290.", "reasoning_content": "Probe reasoning 5563."}], None),
    ([{"role": "system", "content": "Probe system 1177."}, {"role": "user", "content": "Tool probe 6604?"},
      {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
      {"role": "tool", "content": "probe result 3318", "name": "probe_lookup"},
      {"role": "assistant", "content": "Tool reply 2046."}, {"role": "user", "content": "Last probe 8182?"},
      {"role": "assistant", "content": "Last reply 7735."}], [_PROBE_TOOL]),
]


class NativeTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template, rendered with the row's tools.

    A turn's span starts where ``render(messages[:i], add_generation_prompt=True)`` ends and runs through
    the end-of-turn marker after the turn's reasoning, content and tool calls. Finding the starts takes
    one prefix render per trained turn, unless the template is prefix-stable: at load, probe conversations
    (multi-turn, system, reasoning, tools, tool calls) are rendered both ways, and when every prefix render
    equals the whole render up to the k-th generation header (and the turn renders the same there), spans
    are read off one render by locating those headers. A conversation whose render holds the header text
    anywhere else (say, quoted in a message) is rendered the slow way. When only the final turn is stable
    (Qwen3), the one-render path serves conversations whose only target is the final message.
    """

    name = "native"

    def __init__(self, chat_template: str, special_tokens: dict[str, Any], added_tokens: list[str], fast: bool = True):
        self._source = chat_template
        self._compiled = _compile(chat_template)
        self._kwargs = dict(special_tokens)
        self.end_of_turn = self._find_end_of_turn(sorted(added_tokens, key=len, reverse=True), special_tokens.get("eos_token"))
        self.header = self._find_header()
        self.stable_turns, self.stable_last = self._probe_stability() if fast and self.header else (False, False)
        self.turn_stable = self.stable_turns
        self.features = self._probe_features()

    def __getstate__(self):  # a compiled Jinja template cannot be pickled to worker processes; recompile there
        return {key: value for key, value in self.__dict__.items() if key != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compiled = _compile(self._source)

    @classmethod
    def from_tokenizer(cls, tokenizer, fast: bool = True) -> "NativeTemplate":
        chat_template = tokenizer.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise TemplateError(
                "template native: the tokenizer has no chat template; choose a named one "
                "(sft_train.data_args.template: chatml, qwen2_5, qwen3, llama3, alpaca, base)"
            )
        added = [token for token in tokenizer.get_added_vocab()]
        return cls(chat_template, tokenizer.special_tokens_map, added, fast=fast)

    def render_text(self, messages, tools=None, add_generation_prompt=False):
        # Reasoning is also offered as `thinking`, as apply_chat_template does for templates that read that name.
        messages = [{"thinking": m["reasoning_content"], **m} if m.get("reasoning_content") is not None else m
                    for m in messages]
        try:
            return self._compiled.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._kwargs)
        except Exception as error:  # a template's raise_exception, or a shape it cannot handle
            raise TemplateRefused(f"the chat template refused the conversation: {error}") from None

    def _find_end_of_turn(self, added_tokens: list[str], eos: Optional[str]) -> str:
        user, reply = _PROBES[0][0]
        text = self.render_text([user, reply])
        if reply["content"] not in text:
            raise TemplateError("template native: the chat template does not write the assistant's content verbatim")
        tail = text[text.index(reply["content"]) + len(reply["content"]):]
        for token in added_tokens:
            if token and tail.startswith(token):
                return token
        if eos and tail.lstrip().startswith(eos):
            return tail[: len(tail) - len(tail.lstrip()) + len(eos)]
        raise TemplateError(
            "template native: no end-of-turn token follows the assistant's content in the chat template "
            f"(it writes {tail[:40]!r}); the model could not learn to stop. Choose a named template."
        )

    def _find_header(self) -> str:
        """What the generation prompt adds after a conversation ('<|im_start|>assistant\\n'); '' if unclear."""
        user = _PROBES[0][0][:1]
        prompt, plain = self.render_text(user, add_generation_prompt=True), self.render_text(user)
        return prompt[len(plain):] if prompt.startswith(plain) else ""

    def _turn_end(self, text: str, start: int, message: dict, last: bool) -> int:
        """End of the turn starting at ``start``: past the end-of-turn marker after its reasoning, content and calls."""
        if last:  # the render ends with this turn: its marker is the last one
            end = text.rfind(self.end_of_turn)
            return end + len(self.end_of_turn) if end >= start else start
        position = start
        content = message["content"] if message.get("reasoning_content") else _split_thinking(message["content"])[1]
        needles = [reasoning_of(message).strip(), content.strip()] + [call["function"]["name"] for call in message.get("tool_calls", ())]
        for needle in needles:
            found = text.find(needle, position) if needle else -1
            if found != -1:
                position = found + len(needle)
        end = text.find(self.end_of_turn, position)
        return end + len(self.end_of_turn) if end != -1 else start

    def _fast_starts(self, text: str, messages: list[dict]) -> Optional[list[int]]:
        """Where each assistant turn starts, read off one render, or None when the headers are ambiguous."""
        assistants = sum(message["role"] == "assistant" for message in messages)
        if text.count(self.header) != assistants:
            return None
        starts, position = [], 0
        for _ in range(assistants):
            position = text.index(self.header, position) + len(self.header)
            starts.append(position)
        return starts

    def _layout(self, messages, tools, indices):
        full = self.render_text(messages, tools)
        last = len(messages) - 1
        fast = self.stable_turns or (self.stable_last and indices == [last])
        starts = self._fast_starts(full, messages) if fast else None
        spans: dict[int, Optional[tuple[int, int]]] = {}
        if starts is not None:
            turn_of = {index: k for k, index in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant")}
            for index in indices:
                start = starts[turn_of[index]]
                spans[index] = (start, self._turn_end(full, start, messages[index], index == last))
            return full, spans
        for index in indices:
            prompt = self.render_text(messages[:index], tools, add_generation_prompt=True)
            if full.startswith(prompt):
                spans[index] = (len(prompt), self._turn_end(full, len(prompt), messages[index], index == last))
            else:
                spans[index] = None
        return full, spans

    def _probe_features(self) -> frozenset:
        """Which of tools, tool calls and reasoning_content this template writes (probed: with vs without)."""
        question = {"role": "user", "content": "Feature probe 5150?"}
        plain = {"role": "assistant", "content": "Feature reply 6262."}
        probes = {
            "tools": (([question, plain], [_PROBE_TOOL]), ([question, plain], None), "probe_lookup"),
            "tool_calls": (([question, {**plain, "tool_calls": [_PROBE_CALL]}], None), ([question, plain], None), "probe_lookup"),
            "reasoning": (([question, {**plain, "reasoning_content": "Probe reasoning 4417."}], None), ([question, plain], None),
                          "Probe reasoning 4417."),
        }
        features = set()
        for feature, (with_it, without, mark) in probes.items():
            try:
                text = self.render_text(*with_it)
                if mark in text and text != self.render_text(*without):
                    features.add(feature)
            except TemplateRefused:
                pass
        return frozenset(features)

    def _probe_stability(self) -> tuple[bool, bool]:
        """(every turn, the final turn): does the one-render path give the prefix renders' spans on the probes?"""
        every = final = True
        for messages, tools in _PROBES:
            try:
                full = self.render_text(messages, tools)
                starts = self._fast_starts(full, messages)
                assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
                for k, index in enumerate(assistants):
                    prompt = self.render_text(messages[:index], tools, add_generation_prompt=True)
                    local = self.render_text(messages[:index + 1], tools)
                    end = self._turn_end(local, len(prompt), messages[index], True)
                    ok = (starts is not None and starts[k] == len(prompt) and full.startswith(prompt)
                          and full[len(prompt):].startswith(local[len(prompt):end])
                          and self._turn_end(full, len(prompt), messages[index], index == len(messages) - 1) == end)
                    every = every and ok
                    if index == len(messages) - 1:
                        final = final and ok
            except (TemplateRefused, TemplateError):
                return False, False
        return every, final


def get_template(name: str, tokenizer, fast: bool = True) -> ChatTemplate:
    """The template called ``name`` for this tokenizer (``native`` reads the tokenizer's own)."""
    if name == "native":
        return NativeTemplate.from_tokenizer(tokenizer, fast=fast)
    if name not in NAMED:
        raise TemplateError(f"unknown template {name!r}; choose one of native, {', '.join(NAMED)}")
    pieces, header, end_of_turn, features, turn_stable = NAMED[name]
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    if end_of_turn is None:
        end_of_turn = _require_eos(tokens, name)
    return PieceTemplate(name, pieces, header, tokens, end_of_turn, features, turn_stable)
