"""``native``: the tokenizer's own Jinja chat template, run with the row's tools. Spans come from prefix renders,
or from one render when probes at load time show the template is prefix-stable (see NativeTemplate)."""

from __future__ import annotations

from typing import Any, Optional

from sft.data.templates.render import ChatTemplate, TemplateError, TemplateRefused, reasoning_of, split_thinking


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

    def __init__(self, chat_template: str, special_tokens: dict[str, Any], added_tokens: list[str],
                 switches: Optional[dict] = None, name: str = "native"):
        self.name, self.switches = name, dict(switches or {})
        self._source = chat_template
        self._compiled = _compile(chat_template)
        self._kwargs = {**special_tokens, **self.switches}
        self.end_of_turn = self._find_end_of_turn(sorted(added_tokens, key=len, reverse=True), special_tokens.get("eos_token"))
        self.header = self._find_header()
        self.stable_turns, self.stable_last = self.probe_stability() if self.header else (False, False)
        self.turn_stable = self.stable_turns
        self.features = self._probe_features()

    def __getstate__(self):  # a compiled Jinja template cannot be pickled to worker processes; recompile there
        return {key: value for key, value in self.__dict__.items() if key != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compiled = _compile(self._source)

    @classmethod
    def from_tokenizer(cls, tokenizer, switches: Optional[dict] = None) -> "NativeTemplate":
        chat_template = tokenizer.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise TemplateError(
                "template native: the tokenizer has no chat template; choose a named one "
                "(sft_train.data_args.template: chatml, qwen2_5, qwen3, llama3, alpaca, base) or a Jinja file"
            )
        return cls.from_text(chat_template, tokenizer, switches)

    @classmethod
    def from_file(cls, path: str, tokenizer, switches: Optional[dict] = None) -> "NativeTemplate":
        """A Jinja chat template read from ``path``, with the tokenizer's special tokens."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise TemplateError(f"template {path}: cannot read the Jinja file ({error})") from None
        return cls.from_text(text, tokenizer, switches, name=path)

    @classmethod
    def from_text(cls, chat_template: str, tokenizer, switches: Optional[dict] = None,
                  name: str = "native") -> "NativeTemplate":
        added = [token for token in tokenizer.get_added_vocab()]
        try:
            return cls(chat_template, tokenizer.special_tokens_map, added, switches, name)
        except TemplateError:
            raise
        except Exception as error:  # Jinja syntax errors
            raise TemplateError(f"template {name}: not a valid Jinja chat template ({error})") from None

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
            raise TemplateError(f"template {self.name}: the chat template does not write the assistant's content verbatim")
        tail = text[text.index(reply["content"]) + len(reply["content"]):]
        for token in added_tokens:
            if token and tail.startswith(token):
                return token
        if eos and tail.lstrip().startswith(eos):
            return tail[: len(tail) - len(tail.lstrip()) + len(eos)]
        raise TemplateError(
            f"template {self.name}: no end-of-turn token follows the assistant's content in the chat template "
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
        content = message["content"] if message.get("reasoning_content") else split_thinking(message["content"])[1]
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

    def probe_stability(self) -> tuple[bool, bool]:
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
