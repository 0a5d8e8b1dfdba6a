"""Chat templates: a conversation -> one rendered string plus the character spans that are trained on.

Pure: templates see strings and the tokenizer's special-token strings, never token ids. A rendered
sample looks like this (ChatML; ``[...]`` marks the supervised span of each trained assistant turn)::

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>]\\n

A supervised span is everything the model must generate after the generation prompt: the assistant
content (as the template writes it) through the end-of-turn marker, so the model learns to stop.

* Named templates (qwen2_5, qwen3, chatml, llama3, base/empty, alpaca) are written in Python as
  (text, is-target) pieces, so a turn's prompt is a prefix of the full render by construction.
* ``native`` runs the tokenizer's own Jinja template. The full conversation is rendered once; for each
  trained turn the prompt (messages before it + generation prompt) is rendered too and must be a prefix
  of the full render, else TemplateError. The span runs from the end of that prompt through the first
  end-of-turn marker after the turn's content.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

Piece = tuple[str, Optional[int]]  # (text, index of the assistant message it is the target of, or None)


class TemplateError(ValueError):
    """The template cannot produce exact labels for a conversation (or at all)."""


class TemplateRefused(ValueError):
    """The template refused this conversation (e.g. a Jinja raise_exception); a bad sample, not a bad template."""


class ChatTemplate:
    """Renders conversations to (text, supervised character spans)."""

    name: str = ""

    def render(self, messages: list[dict], trained: list[bool]) -> tuple[str, list[tuple[int, int]]]:
        raise NotImplementedError

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text a model continues to answer after ``messages`` (for inference and the demo)."""
        raise NotImplementedError


class PieceTemplate(ChatTemplate):
    """A template written as a function from messages to pieces."""

    def __init__(self, name: str, pieces: Callable[[list[dict], "SpecialTokens"], list[Piece]],
                 header: Callable[[list[dict], "SpecialTokens"], str], tokens: "SpecialTokens"):
        self.name, self._pieces, self._header, self.tokens = name, pieces, header, tokens

    def render(self, messages, trained):
        parts, spans, position = [], [], 0
        for text, target in self._pieces(messages, self.tokens):
            if target is not None and trained[target]:
                spans.append((position, position + len(text)))
            parts.append(text)
            position += len(text)
        return "".join(parts), spans

    def generation_prompt(self, messages):
        return "".join(text for text, _ in self._pieces(messages, self.tokens)) + self._header(messages, self.tokens)


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


def chatml_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
    pieces: list[Piece] = []
    for index, message in enumerate(messages):
        pieces += _chatml_turn(message["role"], message["content"], index)
    return pieces


def qwen2_5_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
    pieces: list[Piece] = []
    if not messages or messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n", None))
    for index, message in enumerate(messages):
        if message["role"] == "tool":
            pieces += _qwen_tool_turn(messages, index)
        else:
            pieces += _chatml_turn(message["role"], message["content"], index)
    return pieces


def _split_thinking(content: str) -> tuple[str, str]:
    """Qwen3's split of '<think>reasoning</think>answer' into (reasoning, answer)."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def qwen3_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
    # As Qwen3's own template: reasoning is kept only in assistant turns after the last real user query,
    # and the final assistant turn always carries a (possibly empty) <think> block.
    pieces: list[Piece] = []
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
        if role == "tool":
            pieces += _qwen_tool_turn(messages, index)
        elif role == "assistant":
            reasoning, answer = _split_thinking(content)
            body = answer
            if index > last_query and (index == len(messages) - 1 or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
            pieces += [("<|im_start|>assistant\n", None), (body + "<|im_end|>", index), ("\n", None)]
        else:
            pieces += _chatml_turn(role, content, index)
    return pieces


def chatml_header(messages, tokens) -> str:
    return "<|im_start|>assistant\n"


# ----- Llama 3 -------------------------------------------------------------------------------------

LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


def llama3_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
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


def empty_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
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


def alpaca_pieces(messages: list[dict], tokens: SpecialTokens) -> list[Piece]:
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


NAMED = {
    "chatml": (chatml_pieces, chatml_header),
    "qwen2_5": (qwen2_5_pieces, chatml_header),
    "qwen3": (qwen3_pieces, chatml_header),
    "llama3": (llama3_pieces, llama3_header),
    "empty": (empty_pieces, empty_header),
    "base": (empty_pieces, empty_header),
    "alpaca": (alpaca_pieces, alpaca_header),
}


# ----- The tokenizer's own template ----------------------------------------------------------------

def _compile(chat_template: str):
    # transformers' own compiler, so Jinja extensions and filters match apply_chat_template exactly.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(chat_template)


class NativeTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template, with spans found by prefix renders (see module doc)."""

    name = "native"
    _PROBE_USER, _PROBE_REPLY = "Probe question 7319?", "Probe answer 4826."

    def __init__(self, chat_template: str, special_tokens: dict[str, Any], added_tokens: list[str]):
        self._source = chat_template
        self._compiled = _compile(chat_template)
        self._kwargs = dict(special_tokens)
        self.end_of_turn = self._find_end_of_turn(sorted(added_tokens, key=len, reverse=True), special_tokens.get("eos_token"))

    def __getstate__(self):  # a compiled Jinja template cannot be pickled to worker processes; recompile there
        return {key: value for key, value in self.__dict__.items() if key != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compiled = _compile(self._source)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "NativeTemplate":
        chat_template = tokenizer.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise TemplateError(
                "template native: the tokenizer has no chat template; choose a named one "
                "(sft_train.data_args.template: chatml, qwen2_5, qwen3, llama3, alpaca, base)"
            )
        added = [token for token in tokenizer.get_added_vocab()]
        return cls(chat_template, tokenizer.special_tokens_map, added)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._kwargs)
        except Exception as error:  # a template's raise_exception, or a shape it cannot handle
            raise TemplateRefused(f"the chat template refused the conversation: {error}") from None

    def _find_end_of_turn(self, added_tokens: list[str], eos: Optional[str]) -> str:
        probe = [{"role": "user", "content": self._PROBE_USER}, {"role": "assistant", "content": self._PROBE_REPLY}]
        text = self._render(probe, False)
        if self._PROBE_REPLY not in text:
            raise TemplateError("template native: the chat template does not write the assistant's content verbatim")
        tail = text[text.index(self._PROBE_REPLY) + len(self._PROBE_REPLY):]
        for token in added_tokens:
            if token and tail.startswith(token):
                return token
        if eos and tail.lstrip().startswith(eos):
            return tail[: len(tail) - len(tail.lstrip()) + len(eos)]
        raise TemplateError(
            "template native: no end-of-turn token follows the assistant's content in the chat template "
            f"(it writes {tail[:40]!r}); the model could not learn to stop. Choose a named template."
        )

    def render(self, messages, trained):
        full = self._render(messages, False)
        spans: list[tuple[int, int]] = []
        for index, is_target in enumerate(trained):
            if not is_target:
                continue
            prompt = self._render(messages[:index], True)
            if not full.startswith(prompt):
                at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
                raise TemplateError(
                    f"template native: the prompt render before assistant message {index} is not a prefix of the "
                    f"full render (they differ at character {at}: prompt has {prompt[at:at + 30]!r}, full render has "
                    f"{full[at:at + 30]!r}); labels would be wrong. Choose a named template."
                )
            start = len(prompt)
            if spans and start < spans[-1][1]:
                raise TemplateError(f"template native: assistant message {index} starts inside the previous one's span")
            spans.append((start, self._turn_end(full, start, messages[index]["content"], index)))
        return full, spans

    def _turn_end(self, full: str, start: int, content: str, index: int) -> int:
        # The template may trim the content or drop its reasoning; try those forms, nearest first.
        reasoning, answer = _split_thinking(content)
        for core in (content, content.strip(), answer, answer.strip()):
            if not core:
                continue
            found = full.find(core, start)
            if found == -1 or self.end_of_turn in full[start:found]:
                continue
            end = full.find(self.end_of_turn, found + len(core))
            if end != -1:
                return end + len(self.end_of_turn)
        raise TemplateError(
            f"template native: cannot find assistant message {index}'s content followed by "
            f"{self.end_of_turn!r} in the render"
        )

    def generation_prompt(self, messages):
        return self._render(messages, True)


def get_template(name: str, tokenizer) -> ChatTemplate:
    """The template called ``name`` for this tokenizer (``native`` reads the tokenizer's own)."""
    if name == "native":
        return NativeTemplate.from_tokenizer(tokenizer)
    if name not in NAMED:
        raise TemplateError(f"unknown template {name!r}; choose one of native, {', '.join(NAMED)}")
    pieces, header = NAMED[name]
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    if name in ("empty", "base", "alpaca"):
        _require_eos(tokens, name)
    return PieceTemplate(name, pieces, header, tokens)
