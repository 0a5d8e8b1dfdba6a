"""Reading JSON/JSONL rows and mapping them to conversations. Pure: no tokenizer, no processes.

A row becomes a list of messages ``{"role": system|user|assistant|tool, "content": str}`` plus a flag
per message saying whether it is trained on. Two row shapes are understood:

* single-turn (the seed's mapping): system from ``system_key`` (optional), user = row[prompt_key],
  plus "\\n" + row[query_key] when that is non-empty, assistant = row[response_key];
* multi-turn, when ``messages_key`` is set: row[messages_key] is a list of OpenAI messages
  (role/content) or ShareGPT turns (from/value: human/gpt/system/...), told apart per message.

Problems with one row raise ``BadSample(reason)``; problems with a whole file raise ``DataError``
naming the file (and line).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from sft.config import SFTConfig

# ShareGPT speaker names -> chat roles. function_call is the assistant calling a tool; observation is the
# tool's answer (LLaMA-Factory's glaive format).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}
OPENAI_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "function": "tool",
}


class DataError(ValueError):
    """A whole input file is unusable (unreadable, malformed JSON, a key no row has)."""


class BadSample(ValueError):
    """One row is unusable; ``reason`` says why, ``field`` names the key or message at fault."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FieldMapping:
    """Which row keys hold what (the seed's *_key config fields; defaults are SFTConfig's)."""

    prompt_key: str = SFTConfig.prompt_key
    query_key: Optional[str] = SFTConfig.query_key
    response_key: str = SFTConfig.response_key
    system_key: Optional[str] = SFTConfig.system_key
    messages_key: Optional[str] = SFTConfig.messages_key

    @classmethod
    def from_config(cls, config) -> "FieldMapping":
        return cls(prompt_key=config.prompt_key, query_key=config.query_key, response_key=config.response_key,
                   system_key=config.system_key, messages_key=config.messages_key)

    def required_keys(self) -> dict[str, str]:
        """Row key -> the config field that names it, for keys every row must have."""
        if self.messages_key is not None:
            return {self.messages_key: "messages_key"}
        keys = {self.prompt_key: "prompt_key", self.response_key: "response_key"}
        if self.query_key is not None:
            keys[self.query_key] = "query_key"
        return keys


@dataclass(frozen=True)
class RawRow:
    """One record of an input file, kept as its JSON text so that any shape fits one Arrow column."""

    row: int  # 1-based position in the file
    line: int  # 1-based line where the record starts
    text: str


def location(path: str, row: int, line: int) -> str:
    """How errors name a row: 'file.jsonl line 7' or 'file.json row 12 (line 340)'."""
    if path.endswith(".jsonl"):
        return f"{path} line {line}"
    return f"{path} row {row} (line {line})"


def read_rows(path: str, skip_malformed: bool = False) -> tuple[list[RawRow], list[tuple[RawRow, str]]]:
    """Read every record of a .json array or .jsonl file, checking JSON syntax and that rows are objects.

    Returns (rows, rejected). Malformed JSONL lines raise DataError naming file and line, or with
    ``skip_malformed`` are returned in ``rejected`` with the reason. A malformed .json array always
    raises: after a syntax error nothing later in the file can be trusted.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if path.endswith(".jsonl"):
        return _read_jsonl(path, text, skip_malformed)
    return list(_read_json_array(path, text)), []


def _read_jsonl(path: str, text: str, skip_malformed: bool) -> tuple[list[RawRow], list[tuple[RawRow, str]]]:
    rows, rejected = [], []
    row_number = 0
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row_number += 1
        raw = RawRow(row_number, line_number, line)
        try:
            value = json.loads(line)
            reason = None if isinstance(value, dict) else f"the record is a JSON {type(value).__name__}, expected an object"
        except json.JSONDecodeError as error:
            reason = f"malformed JSON: {error.msg} (column {error.colno})"
        if reason is None:
            rows.append(raw)
        elif skip_malformed:
            rejected.append((raw, reason))
        else:
            raise DataError(f"{path} line {line_number}: {reason}")
    return rows, rejected


def _read_json_array(path: str, text: str) -> Iterator[RawRow]:
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r\ufeff"
    position, line, counted_to = 0, 1, 0

    def line_at(index: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, index)
        counted_to = index
        return line

    def skip(index: int) -> int:
        while index < len(text) and text[index] in whitespace:
            index += 1
        return index

    position = skip(0)
    if position == len(text):
        raise DataError(f"{path}: the file is empty; expected a JSON array of row objects")
    if text[position] != "[":
        hint = " (one object per line? name the file .jsonl)" if text[position] == "{" else ""
        raise DataError(f"{path} line {line_at(position)}: expected a JSON array of row objects{hint}")
    position = skip(position + 1)
    row = 0
    if position < len(text) and text[position] == "]":
        return
    while True:
        row += 1
        start_line = line_at(position)
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {error.lineno} column {error.colno}: malformed JSON in row {row}: {error.msg}") from None
        if not isinstance(value, dict):
            raise DataError(f"{path} row {row} (line {start_line}): the record is a JSON {type(value).__name__}, expected an object")
        yield RawRow(row, start_line, text[position:end])
        position = skip(end)
        if position < len(text) and text[position] == ",":
            position = skip(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            if skip(position + 1) != len(text):
                raise DataError(f"{path} line {line_at(skip(position + 1))}: unexpected text after the closing ']'")
            return
        where = f"line {line_at(min(position, len(text)))}"
        raise DataError(f"{path} {where}: malformed JSON after row {row}: expected ',' or ']'")


def check_keys(path: str, rows: list[RawRow], mapping: FieldMapping) -> None:
    """Fail early, listing the keys the file has, when no row has a key the mapping needs."""
    if not rows:
        return
    seen: set[str] = set()
    present: dict[str, bool] = dict.fromkeys(mapping.required_keys(), False)
    for raw in rows[:1000]:
        keys = json.loads(raw.text).keys()
        seen.update(keys)
        for key in present:
            present[key] = present[key] or key in keys
    for key, field_name in mapping.required_keys().items():
        if not present[key]:
            have = ", ".join(sorted(seen)) or "(none)"
            hint = " (or null if the data has no such column)" if field_name == "query_key" else ""
            raise DataError(
                f"{path}: no row has the key '{key}' named by {field_name}; the rows have keys: {have}. "
                f"Set {field_name} to one of them{hint}."
            )


def _text(value: Any, what: str) -> str:
    if value is None:
        raise BadSample(f"{what} is null")
    if not isinstance(value, str):
        raise BadSample(f"{what} is a {type(value).__name__}, expected a string")
    return value


def conversation_from_row(row: dict, mapping: FieldMapping, loss_on_turns: str = "all") -> tuple[list[dict], list[bool]]:
    """Map one row to (messages, trained): messages are {role, content} dicts, trained flags which are targets.

    Assistant turns before the first user turn (a chat split mid-way) have no prompt and become context.
    With loss_on_turns='last' only the final trainable assistant turn is a target.
    """
    if mapping.messages_key is None:
        messages = _single_turn(row, mapping)
    else:
        messages = _multi_turn(row, mapping)
    trained = []
    seen_user = False
    for message in messages:
        seen_user = seen_user or message["role"] == "user"
        trained.append(message["role"] == "assistant" and seen_user)
    if not any(trained):
        if not any(m["role"] == "assistant" for m in messages):
            raise BadSample("the conversation has no assistant turn")
        raise BadSample("no assistant turn follows a user turn, so there is nothing to train on")
    for index, message in enumerate(messages):
        if trained[index] and not message["content"].strip():
            raise BadSample(f"empty response: assistant turn at message {index} has no content")
    if loss_on_turns == "last":
        last = max(i for i, flag in enumerate(trained) if flag)
        trained = [i == last for i in range(len(trained))]
    return messages, trained


def _single_turn(row: dict, mapping: FieldMapping) -> list[dict]:
    messages = []
    for key, field_name in mapping.required_keys().items():
        if key not in row:
            raise BadSample(f"missing key '{key}' ({field_name}); this row has keys: {', '.join(sorted(row)) or '(none)'}")
    if mapping.system_key is not None and mapping.system_key in row:
        system = _text(row[mapping.system_key], f"field '{mapping.system_key}' (system_key)")
        if system.strip():
            messages.append({"role": "system", "content": system})
    prompt = _text(row[mapping.prompt_key], f"field '{mapping.prompt_key}' (prompt_key)")
    if mapping.query_key is not None:
        query = _text(row[mapping.query_key], f"field '{mapping.query_key}' (query_key)")
        if query:
            prompt = prompt + "\n" + query
    if not prompt.strip():
        raise BadSample(f"empty prompt: field '{mapping.prompt_key}' (prompt_key) has no content")
    response = _text(row[mapping.response_key], f"field '{mapping.response_key}' (response_key)")
    if not response.strip():
        raise BadSample(f"empty response: field '{mapping.response_key}' (response_key) has no content")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": response})
    return messages


def _message_content(value: Any, what: str) -> str:
    # OpenAI allows content as a list of parts; text-only lists are joined, anything else is refused.
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadSample(f"{what} has a non-text part ({json.dumps(part)[:80]}); only text is supported")
            texts.append(part["text"])
        return "".join(texts)
    return _text(value, what)


def _multi_turn(row: dict, mapping: FieldMapping) -> list[dict]:
    key = mapping.messages_key
    if key not in row:
        raise BadSample(f"missing key '{key}' (messages_key); this row has keys: {', '.join(sorted(row)) or '(none)'}")
    turns = row[key]
    if not isinstance(turns, list):
        raise BadSample(f"field '{key}' (messages_key) is {'null' if turns is None else 'a ' + type(turns).__name__}, expected a list of messages")
    if not turns:
        raise BadSample(f"field '{key}' (messages_key) is an empty conversation")
    messages = []
    for index, turn in enumerate(turns):
        what = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise BadSample(f"{what} is a {type(turn).__name__}, expected an object")
        if "role" in turn:
            roles, role_key, content_key = OPENAI_ROLES, "role", "content"
        elif "from" in turn:
            roles, role_key, content_key = SHAREGPT_ROLES, "from", "value"
        else:
            raise BadSample(f"{what} has neither 'role' (OpenAI) nor 'from' (ShareGPT); its keys: {', '.join(sorted(turn))}")
        speaker = turn[role_key]
        if not isinstance(speaker, str) or speaker.lower() not in roles:
            raise BadSample(f"{what}.{role_key} is {speaker!r}, not one of {', '.join(sorted(roles))}")
        if content_key not in turn:
            raise BadSample(f"{what} has no '{content_key}'; its keys: {', '.join(sorted(turn))}")
        content = _message_content(turn[content_key], f"{what}.{content_key}")
        messages.append({"role": roles[speaker.lower()], "content": content})
    if mapping.system_key is not None and row.get(mapping.system_key) is not None and messages[0]["role"] != "system":
        system = _text(row[mapping.system_key], f"field '{mapping.system_key}' (system_key)")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    return messages


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes (for the encode cache key)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(path)}:{digest.hexdigest()}"
