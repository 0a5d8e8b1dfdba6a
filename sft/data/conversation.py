"""Mapping rows to conversations in OpenAI form. Pure: no tokenizer, no processes.

A row becomes a ``Conversation``: messages ``{"role": system|user|assistant|tool, "content": str, ...}``,
a flag per message saying whether it is trained on, and the tools offered. Row shapes understood:

* single-turn (the seed's mapping): system from ``system_key`` (optional), user = row[prompt_key],
  plus "\\n" + row[query_key] when that is non-empty, assistant = row[response_key];
* multi-turn, when ``messages_key`` is set: row[messages_key] is a list of OpenAI messages
  (role/content) or ShareGPT turns (from/value: human/gpt/system/function_call/observation/...), told
  apart per message;
* prompt/completion (TRL's conversational layout): ``prompt`` and ``completion``, each a list of messages,
  read as messages = prompt + completion with the prompt part context (never trained on, as TRL's
  completion-only loss). Read so when the row has them instead of row[messages_key], or, with
  ``messages_key`` unset, instead of row[prompt_key] and row[response_key], or when prompt_key and
  response_key name two such lists.

What messages may carry, in any of the forms seen in public data, and what they become:

    tool calls   tool_calls: [{"type": "function", "function": {"name", "arguments"}}] (or {"name",
                 "arguments"} items; the legacy function_call key; a ShareGPT function_call turn; content
                 parts of type tool_call)  ->  tool_calls, arguments parsed from JSON strings to objects.
                 OpenAI's {"type": "custom", "custom": {"name", "input"}} calls are kept as they are; a
                 template that cannot render them refuses the row.
    reasoning    reasoning_content (or reasoning, thinking; content parts of type reasoning, or Anthropic's
                 {"type": "thinking", "thinking": ...})  ->  reasoning_content. A <think>...</think> block
                 in the content is left to the template. Reasoning given in two of these places (two keys,
                 a key and a part, or either and a <think> block) is a bad row: a template would render both.
    tool results role tool / ShareGPT observation, with tool_call_id and name when present
    tools        row[tools_key]: a list of functions, or that list as a JSON string -> [{"type": "function",
                 "function": {...}}]
    weight/train weight: 0 or train: false on an assistant message makes it context (axolotl's convention)

Null values count as absent (Parquet stores every key of every message). Keys that none of this reads are
named in ``Conversation.ignored_keys`` and counted in the encode report. What is odd but trainable (a tool
result whose tool_call_id matches no call, a call to a function the row's tools do not offer, a conversation
that ends on a user turn) is named in ``Conversation.notes`` and counted in the report too. Problems with one
row raise ``BadSample(reason)``; problems with a whole file raise ``DataError`` naming the file (and line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sft.config import SFTConfig
from sft.data.message_parts import (MESSAGE_KEYS, REASONING_KEYS, BadSample, call_name, content_parts, describe_value,
                                    parse_tools, text_value, tool_calls)

# ShareGPT speaker names -> chat roles. function_call is the assistant calling a tool; observation is the
# tool's answer (LLaMA-Factory's glaive format).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}
PROMPT_COMPLETION = ("prompt", "completion")  # TRL's conversational prompt/completion columns
# Notes: odd but trainable rows, counted in the encode report (Conversation.notes).
NOTE_UNMATCHED_RESULT = "a tool result's tool_call_id matches no earlier tool call"
NOTE_UNOFFERED_CALL = "a tool call names a function the row's tools do not offer"
NOTE_ENDS_ON = "the conversation ends on a {role} turn (kept as unsupervised context)"
OPENAI_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "function": "tool",
}


@dataclass(frozen=True)
class FieldMapping:
    """Which row keys hold what (the seed's *_key config fields; defaults are SFTConfig's)."""

    prompt_key: str = SFTConfig.prompt_key
    query_key: Optional[str] = SFTConfig.query_key
    response_key: str = SFTConfig.response_key
    system_key: Optional[str] = SFTConfig.system_key
    messages_key: Optional[str] = SFTConfig.messages_key
    tools_key: Optional[str] = SFTConfig.tools_key
    text_key: Optional[str] = SFTConfig.text_key

    @classmethod
    def from_config(cls, config) -> "FieldMapping":
        return cls(prompt_key=config.prompt_key, query_key=config.query_key, response_key=config.response_key,
                   system_key=config.system_key, messages_key=config.messages_key, tools_key=config.tools_key,
                   text_key=config.text_key)

    def used_keys(self) -> set[str]:
        """Row keys this mapping reads."""
        keys = {self.messages_key} if self.messages_key is not None else {self.prompt_key, self.response_key, self.query_key}
        return {key for key in keys | {self.system_key, self.tools_key, self.text_key} if key is not None}

    def required_keys(self) -> dict[str, str]:
        """Row key -> the config field that names it, for keys every conversation row must have."""
        if self.messages_key is not None:
            return {self.messages_key: "messages_key"}
        keys = {self.prompt_key: "prompt_key", self.response_key: "response_key"}
        if self.query_key is not None:
            keys[self.query_key] = "query_key"
        return keys

    def missing_keys(self, seen: set[str]) -> dict[str, str]:
        """The required keys (as required_keys) that no row has, given the keys ``seen`` in the first rows;
        none when those rows are in the prompt/completion layout that conversation_from_row reads instead, or
        hold plain text (text_key: a source may hold plain text only)."""
        if self.text_key is not None and self.text_key in seen:
            return {}
        missing = {key: field_name for key, field_name in self.required_keys().items() if key not in seen}
        if missing and set(PROMPT_COMPLETION) <= seen and (self.messages_key is not None or (
                self.prompt_key not in seen and self.response_key not in seen)):
            return {}
        return missing


@dataclass
class Conversation:
    """One row as a conversation: OpenAI-form messages, which of them are targets, and the tools offered."""

    messages: list[dict]
    trained: list[bool]
    tools: Optional[list[dict]] = None
    ignored_keys: tuple[str, ...] = ()  # keys of the row or its messages that nothing reads ("messages[].weight")
    notes: tuple[str, ...] = ()  # odd but trainable things about the row (NOTE_*), counted in the report


def plain_text(row: dict, mapping: FieldMapping) -> Optional[str]:
    """The row's plain text (text_key), trained on every token; None for a row to read as a conversation."""
    if mapping.text_key is None or row.get(mapping.text_key) is None:
        return None
    text = row[mapping.text_key]
    if not isinstance(text, str):
        raise BadSample(f"{mapping.text_key!r} (text_key) must be a string of plain text, got {type(text).__name__}")
    if not text.strip():
        raise BadSample(f"{mapping.text_key!r} (text_key) is empty")
    return text


def conversation_from_row(row: dict, mapping: FieldMapping, loss_on_turns: str = "all") -> Conversation:
    """Map one row to a Conversation (see the module docstring for the shapes understood).

    Assistant turns before the first user turn (a chat split mid-way) have no prompt and become context.
    With loss_on_turns='last' only the final trainable assistant turn is a target.
    """
    split = _prompt_completion_keys(row, mapping)
    used = mapping.used_keys() if split is None else {*split, mapping.system_key, mapping.tools_key} - {None}
    ignored = {key for key, value in row.items() if key not in used and value is not None}
    if split is not None:
        messages = _prompt_completion(row, split, mapping, ignored)
    elif mapping.messages_key is None:
        messages = _single_turn(row, mapping)
    else:
        messages = _multi_turn(row, mapping, ignored)
    tools = None
    if mapping.tools_key is not None and row.get(mapping.tools_key) is not None:
        tools = parse_tools(row[mapping.tools_key], f"field '{mapping.tools_key}' (tools_key)")
    trained = []
    seen_user = False
    for message in messages:
        seen_user = seen_user or message["role"] == "user"
        trained.append(message["role"] == "assistant" and seen_user and message.pop("_train", True))
    for message in messages:
        message.pop("_train", None)
    if not any(trained):
        if not any(m["role"] == "assistant" for m in messages):
            raise BadSample("the conversation has no assistant turn")
        raise BadSample("no assistant turn follows a user turn (or every one has weight 0), so there is nothing to train on")
    for index, message in enumerate(messages):
        if trained[index] and not message["content"].strip() and not message.get("tool_calls"):
            raise BadSample(f"empty response: assistant turn at message {index} has no content and no tool calls")
    if loss_on_turns == "last":
        last = max(i for i, flag in enumerate(trained) if flag)
        trained = [i == last for i in range(len(trained))]
    return Conversation(messages, trained, tools, tuple(sorted(ignored)), _notes(messages, tools))


def _notes(messages: list[dict], tools: Optional[list[dict]]) -> tuple[str, ...]:
    """What is odd about a trainable conversation, for the report (NOTE_*); each note once per row."""
    notes = set()
    if messages[-1]["role"] != "assistant":
        notes.add(NOTE_ENDS_ON.format(role=messages[-1]["role"]))
    call_ids: set[str] = set()
    for message in messages:
        if "tool_calls" in message:
            offered = {tool["function"]["name"] for tool in tools or ()}
            call_ids.update(call["id"] for call in message["tool_calls"] if "id" in call)
            if any(call_name(call) not in offered for call in message["tool_calls"]):
                notes.add(NOTE_UNOFFERED_CALL)
        elif message["role"] == "tool" and "tool_call_id" in message and message["tool_call_id"] not in call_ids:
            notes.add(NOTE_UNMATCHED_RESULT)
    return tuple(sorted(notes)) if notes else ()


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _prompt_completion_keys(row: dict, mapping: FieldMapping) -> Optional[tuple[str, str]]:
    """The (prompt, completion) keys when the row is in the prompt/completion layout (see the module docstring)."""
    prompt, completion = PROMPT_COMPLETION
    if mapping.messages_key is None and isinstance(row.get(mapping.response_key), list):
        if _is_message_list(row.get(mapping.prompt_key)) and _is_message_list(row[mapping.response_key]):
            return mapping.prompt_key, mapping.response_key
    if completion not in row or not (_is_message_list(row.get(prompt)) and _is_message_list(row[completion])):
        return None
    if mapping.messages_key is not None:
        return (prompt, completion) if row.get(mapping.messages_key) is None else None
    return (prompt, completion) if mapping.prompt_key not in row and mapping.response_key not in row else None


def _prompt_completion(row: dict, keys: tuple[str, str], mapping: FieldMapping, ignored: set[str]) -> list[dict]:
    """messages = prompt + completion; the prompt's assistant turns are context, as in TRL's completion-only loss."""
    prompt = [_message(turn, f"{keys[0]}[{index}]", ignored) for index, turn in enumerate(row[keys[0]])]
    completion = [_message(turn, f"{keys[1]}[{index}]", ignored) for index, turn in enumerate(row[keys[1]])]
    for message in prompt:
        if message["role"] == "assistant":
            message["_train"] = False
    if not any(message["role"] == "assistant" for message in completion):
        raise BadSample(f"field '{keys[1]}' (the completion) has no assistant message, so there is nothing to train on")
    messages = prompt + completion
    return _with_system(messages, row, mapping)


def _single_turn(row: dict, mapping: FieldMapping) -> list[dict]:
    messages = []
    for key, field_name in mapping.required_keys().items():
        if key not in row:
            raise BadSample(f"missing key '{key}' ({field_name}); this row has keys: {', '.join(sorted(row)) or '(none)'}")
    if mapping.system_key is not None and mapping.system_key in row:
        system = text_value(row[mapping.system_key], f"field '{mapping.system_key}' (system_key)")
        if system.strip():
            messages.append({"role": "system", "content": system})
    prompt = text_value(row[mapping.prompt_key], f"field '{mapping.prompt_key}' (prompt_key)")
    if mapping.query_key is not None:
        query = text_value(row[mapping.query_key], f"field '{mapping.query_key}' (query_key)")
        if query:
            prompt = prompt + "\n" + query
    if not prompt.strip():
        raise BadSample(f"empty prompt: field '{mapping.prompt_key}' (prompt_key) has no content")
    response = text_value(row[mapping.response_key], f"field '{mapping.response_key}' (response_key)")
    if not response.strip():
        raise BadSample(f"empty response: field '{mapping.response_key}' (response_key) has no content")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": response})
    return messages


def _message(turn: dict, what: str, ignored: set[str]) -> dict:
    """One message of a multi-turn row in OpenAI form (see the module docstring)."""
    present = {key: value for key, value in turn.items() if value is not None}
    if "role" in present:
        roles, role_key, content_key = OPENAI_ROLES, "role", "content"
    elif "from" in present:
        roles, role_key, content_key = SHAREGPT_ROLES, "from", "value"
    else:
        raise BadSample(f"{what} has neither 'role' (OpenAI) nor 'from' (ShareGPT); its keys: {', '.join(sorted(turn))}")
    ignored.update(f"messages[].{key}" for key in present if key not in MESSAGE_KEYS)
    speaker = present[role_key]
    if not isinstance(speaker, str) or speaker.lower() not in roles:
        raise BadSample(f"{what}.{role_key} is {speaker!r}, not one of {', '.join(sorted(roles))}")
    role = roles[speaker.lower()]
    has_calls = any(key in present for key in ("tool_calls", "function_call"))
    if content_key not in turn and not has_calls:
        raise BadSample(f"{what} has no '{content_key}'; its keys: {', '.join(sorted(turn))}")
    if turn.get(content_key) is None and has_calls:
        content, reasoning, calls = "", [], []
    else:
        content, reasoning, calls = content_parts(turn.get(content_key), f"{what}.{content_key}")
    if speaker.lower() == "function_call":  # ShareGPT: the value is the call itself, as JSON
        calls += tool_calls(content, f"{what}.{content_key}")
        content = ""
    message = {"role": role, "content": content}
    for key in ("tool_calls", "function_call"):
        if key in present:
            calls += tool_calls(present[key], f"{what}.{key}")
    given = [f"{content_key} parts of type reasoning/thinking"] if reasoning else []
    for key in REASONING_KEYS:
        if key in present:
            reasoning.append(text_value(present[key], f"{what}.{key}"))
            given.append(f"'{key}'")
    # A template writes the reasoning it is given as a think block and the content as it is; Qwen3's own split
    # reads everything before a '</think>' in the content as reasoning, so either tag there is reasoning again.
    if given and "<think>" in content:
        given.append(f"a <think> block in its {content_key}")
    elif given and "</think>" in content:
        given.append(f"its {content_key} before a '</think>' tag")
    if len(given) > 1:
        raise BadSample(f"{what} gives its reasoning twice, in {given[0]} and in {given[1]}; a template would "
                        "render both, one after the other. Keep one")
    if (calls or reasoning) and role != "assistant":
        feature = "tool calls" if calls else "reasoning"
        raise BadSample(f"{what} is a {role} message with {feature}; only assistant messages can have them")
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n\n".join(reasoning)
    for key in ("tool_call_id", "name"):
        if key in present:
            message[key] = text_value(present[key], f"{what}.{key}")
    weight = present.get("weight", 1)
    train = present.get("train", True)
    if weight not in (0, 1) or not isinstance(train, bool):
        raise BadSample(f"{what}: weight must be 0 or 1 and train true or false, got weight {weight!r}, train {train!r}")
    if role == "assistant":
        message["_train"] = bool(weight) and train
    return message


def _multi_turn(row: dict, mapping: FieldMapping, ignored: set[str]) -> list[dict]:
    key = mapping.messages_key
    if key not in row:
        raise BadSample(f"missing key '{key}' (messages_key); this row has keys: {', '.join(sorted(row)) or '(none)'}")
    turns = row[key]
    if not isinstance(turns, list):
        raise BadSample(f"field '{key}' (messages_key) is {describe_value(turns)}, expected a list of messages")
    if not turns:
        raise BadSample(f"field '{key}' (messages_key) is an empty conversation")
    messages = []
    for index, turn in enumerate(turns):
        what = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise BadSample(f"{what} is a {type(turn).__name__}, expected an object")
        messages.append(_message(turn, what, ignored))
    return _with_system(messages, row, mapping)


def _with_system(messages: list[dict], row: dict, mapping: FieldMapping) -> list[dict]:
    """The row's system_key prompt put first, unless the conversation has its own system message."""
    if mapping.system_key is not None and row.get(mapping.system_key) is not None and messages[0]["role"] != "system":
        system = text_value(row[mapping.system_key], f"field '{mapping.system_key}' (system_key)")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    return messages
