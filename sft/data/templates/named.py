"""The named templates, written in Python as (text, target-of) pieces so that spans are known by construction:
qwen2_5 and qwen3 (one Qwen skeleton; qwen3 switches thinking on), chatml, llama3, base/empty and alpaca. They
render tools and tool calls as the model's own template does, or refuse the row naming the feature."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sft.data.templates.render import Piece, PieceTemplate, TemplateError, split_thinking

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class SpecialTokens:
    """The special-token strings templates need, read from a tokenizer."""

    def __init__(self, bos: Optional[str] = None, eos: Optional[str] = None):
        self.bos, self.eos = bos, eos

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        return cls(bos=tokenizer.bos_token, eos=tokenizer.eos_token)


def _tojson(value: Any) -> str:
    # As transformers' chat-template tojson filter: no ASCII escaping, default separators.
    return json.dumps(value, ensure_ascii=False)


# ----- ChatML and Qwen -----------------------------------------------------------------------------

def _chatml_turn(role: str, content: str, index: int) -> list[Piece]:
    if role == "assistant":
        return [("<|im_start|>assistant\n", None), (content + "<|im_end|>", index), ("\n", None)]
    return [(f"<|im_start|>{role}\n{content}<|im_end|>\n", None)]


def chatml_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    pieces: list[Piece] = []
    for index, message in enumerate(messages):
        pieces += _chatml_turn(message["role"], message["content"], index)
    return pieces


QWEN_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _qwen_system(messages: list[dict], tools, default: Optional[str]) -> list[Piece]:
    # The system turn: the row's system message (else ``default``), with the tools block appended when tools are offered.
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else default
    if tools:
        block = QWEN_TOOLS_INTRO + "".join("\n" + _tojson(tool) for tool in tools) + QWEN_TOOLS_OUTRO
        return [("<|im_start|>system\n" + (system + "\n\n" if system is not None else "") + block, None)]
    return [] if system is None else [(f"<|im_start|>system\n{system}<|im_end|>\n", None)]


def _qwen_tool_result(messages: list[dict], index: int) -> list[Piece]:
    # Qwen writes tool results as a user turn holding <tool_response> blocks; consecutive results share it.
    text = ""
    if index == 0 or messages[index - 1]["role"] != "tool":
        text += "<|im_start|>user"
    text += "\n<tool_response>\n" + messages[index]["content"] + "\n</tool_response>"
    if index == len(messages) - 1 or messages[index + 1]["role"] != "tool":
        text += "<|im_end|>\n"
    return [(text, None)]


def _qwen_tool_call(call: dict) -> str:
    function = call["function"]
    arguments = function["arguments"]
    arguments = arguments if isinstance(arguments, str) else _tojson(arguments)
    return '<tool_call>\n{"name": "' + function["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"


def _last_query(messages: list[dict]) -> int:
    # The last user message that is not a tool response: Qwen3 keeps reasoning only in turns after it.
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index]["content"]
        if messages[index]["role"] == "user" and not (
            content.startswith("<tool_response>") and content.endswith("</tool_response>")
        ):
            return index
    return len(messages) - 1


def qwen_pieces(messages: list[dict], tools, tokens: SpecialTokens, thinking: bool) -> list[Piece]:
    """As Qwen's own templates: ChatML turns, tools in the system turn, tool calls after the content in
    <tool_call> tags, tool results in a user turn. Qwen2.5 (``thinking`` off) adds a default system prompt and
    renders no reasoning. Qwen3 (``thinking`` on) has no default system prompt, keeps reasoning only in assistant
    turns after the last real user query, and gives the final assistant turn a (possibly empty) <think> block."""
    pieces = _qwen_system(messages, tools, None if thinking else QWEN_DEFAULT_SYSTEM)
    has_system = bool(messages) and messages[0]["role"] == "system"
    last_query = _last_query(messages) if thinking else len(messages)
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0 and has_system:
            continue
        if role == "tool":
            pieces += _qwen_tool_result(messages, index)
        elif role == "assistant":
            reasoning = ""
            if thinking and message.get("reasoning_content") is not None:
                reasoning = message["reasoning_content"]
            elif thinking:
                reasoning, content = split_thinking(content)
            body = content
            if index > last_query and (index == len(messages) - 1 or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            for number, call in enumerate(message.get("tool_calls") or ()):
                body += ("\n" if number or content else "") + _qwen_tool_call(call)
            pieces += [("<|im_start|>assistant\n", None), (body + "<|im_end|>", index), ("\n", None)]
        else:
            pieces += _chatml_turn(role, content, index)
    return pieces


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


# ----- Templates for base models -------------------------------------------------------------------

def empty_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    # No markup at all: the texts follow each other; a response ends with eos so the model learns to stop.
    pieces: list[Piece] = [(tokens.bos, None)] if tokens.bos else []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            pieces.append((message["content"] + tokens.eos, index))
        else:
            pieces.append((message["content"], None))
    return pieces


def alpaca_pieces(messages: list[dict], tools, tokens: SpecialTokens) -> list[Piece]:
    system = ALPACA_DEFAULT_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        offset = 1
    else:
        offset = 0
    pieces: list[Piece] = [((tokens.bos or "") + system + "\n\n", None)]
    for index, message in enumerate(messages, start=offset):
        if message["role"] == "assistant":
            pieces += [("### Response:\n", None), (message["content"] + tokens.eos, index), ("\n\n", None)]
        elif message["role"] == "tool":
            pieces.append(("### Input:\n" + message["content"] + "\n\n", None))
        else:  # user, or a later system message, is an instruction
            pieces.append(("### Instruction:\n" + message["content"] + "\n\n", None))
    return pieces


# ----- The table -----------------------------------------------------------------------------------

TOOLS = frozenset({"tools", "tool_calls"})


@dataclass(frozen=True)
class Named:
    """One named template: its pieces, the generation header it ends with, its end-of-turn marker (None: the
    tokenizer's eos), the row features it renders, and whether a past turn renders as it did when it was last."""

    pieces: Callable
    header: str
    end_of_turn: Optional[str]
    features: frozenset = frozenset()
    turn_stable: bool = True


NAMED = {
    "chatml": Named(chatml_pieces, "<|im_start|>assistant\n", "<|im_end|>"),
    "qwen2_5": Named(functools.partial(qwen_pieces, thinking=False), "<|im_start|>assistant\n", "<|im_end|>", TOOLS),
    "qwen3": Named(functools.partial(qwen_pieces, thinking=True), "<|im_start|>assistant\n", "<|im_end|>",
                   TOOLS | {"reasoning"}, turn_stable=False),
    "llama3": Named(llama3_pieces, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "empty": Named(empty_pieces, "", None),
    "base": Named(empty_pieces, "", None),
    "alpaca": Named(alpaca_pieces, "### Response:\n", None),
}


def named_template(name: str, tokenizer) -> PieceTemplate:
    """The named template ``name`` (a key of NAMED) for this tokenizer's special tokens."""
    spec = NAMED[name]
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    end_of_turn = spec.end_of_turn
    if end_of_turn is None:
        if not tokens.eos:
            raise TemplateError(f"template {name}: the tokenizer has no eos token to end responses with")
        end_of_turn = tokens.eos
    return PieceTemplate(name, spec.pieces, spec.header, tokens, end_of_turn, spec.features, spec.turn_stable)
