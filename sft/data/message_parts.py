"""One message's values, read faithfully or refused as a bad row: text, JSON values, the tools offered, tool calls
(function and custom) and content parts (text, tool calls, reasoning, Anthropic thinking). Pure; used by
sft.data.conversation, which maps whole rows."""

from __future__ import annotations

import json
from typing import Any, Optional


class BadSample(ValueError):
    """One row is unusable; ``reason`` says why, ``field`` names the key or message at fault."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Message keys read here; anything else (with a non-null value) is reported as ignored.
MESSAGE_KEYS = {"role", "content", "from", "value", "reasoning_content", "reasoning", "thinking", "tool_calls",
                "function_call", "tool_call_id", "name", "weight", "train"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def text_value(value: Any, what: str) -> str:
    if value is None:
        raise BadSample(f"{what} is null")
    if not isinstance(value, str):
        raise BadSample(f"{what} is a {type(value).__name__}, expected a string")
    return value


def json_value(value: Any, what: str) -> Any:
    """A value that may be given as JSON text: parsed, naming the field when the text is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise BadSample(f"{what} is not valid JSON: {error.msg} (column {error.colno})") from None


def describe_value(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def parse_tools(value: Any, what: str) -> Optional[list[dict]]:
    """Tools as [{"type": "function", "function": {"name", ...}}]; bare function schemas are wrapped."""
    value = json_value(value, what)
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadSample(f"{what} is {describe_value(value)}, expected a list of tools")
    tools = []
    for index, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise BadSample(f"{what}[{index}] is {describe_value(tool)}, expected an object")
        function = tool.get("function") if tool.get("type") == "function" or "function" in tool else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadSample(f"{what}[{index}] has no function name")
        tools.append({"type": "function", "function": function})
    return tools


def custom_tool_call(value: dict, what: str) -> dict:
    """OpenAI's custom tool call {"type": "custom", "custom": {"name", "input": free text}}, kept as it is."""
    custom = value.get("custom")
    if not isinstance(custom, dict) or not isinstance(custom.get("name"), str) or not custom["name"]:
        raise BadSample(f"{what} is a custom tool call (type custom) with no custom.name")
    text = custom.get("input")
    text = "" if text is None else text_value(text, f"{what}.custom.input")
    call = {"type": "custom", "custom": {"name": custom["name"], "input": text}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def call_name(call: dict) -> str:
    """The name of the tool a call calls (a function call's or a custom call's)."""
    return call["custom"]["name"] if call.get("type") == "custom" else call["function"]["name"]


def tool_call(value: Any, what: str) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments": object}} (or a custom call)."""
    value = json_value(value, what)
    if not isinstance(value, dict):
        raise BadSample(f"{what} is {describe_value(value)}, expected an object with a name and arguments")
    if value.get("type") == "custom":
        return custom_tool_call(value, what)
    function = value.get("function") if isinstance(value.get("function"), dict) else value
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise BadSample(f"{what} has no name")
    arguments = function.get("arguments", function.get("parameters", {}))
    arguments = {} if arguments is None else json_value(arguments, f"{what}.arguments")
    if not isinstance(arguments, dict):
        raise BadSample(f"{what}.arguments is {describe_value(arguments)}, expected a JSON object")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def tool_calls(value: Any, what: str) -> list[dict]:
    value = json_value(value, what)
    calls = value if isinstance(value, list) else [value]
    return [tool_call(call, f"{what}[{index}]" if isinstance(value, list) else what) for index, call in enumerate(calls)]


def content_parts(value: Any, what: str) -> tuple[str, list[str], list[dict]]:
    """Content as (text, reasoning texts, tool calls): a string, or a list of typed parts."""
    if not isinstance(value, list):
        return text_value(value, what), [], []
    texts, reasoning, calls = [], [], []
    for index, part in enumerate(value):
        part_what = f"{what}[{index}]"
        if not isinstance(part, dict):
            raise BadSample(f"{part_what} is {describe_value(part)}, expected a content part object")
        kind = part.get("type")
        text = part.get("text") if part.get("text") is not None else part.get("value")
        if kind == "thinking" and text is None:  # Anthropic: {"type": "thinking", "thinking": ..., "signature": ...}
            text = part.get("thinking")
        if kind == "text" and isinstance(text, str):
            texts.append(text)
        elif kind in ("reasoning", "thinking") and isinstance(text, str):
            reasoning.append(text)
        elif kind == "tool_call" and text is not None:
            calls += tool_calls(text, part_what)
        else:
            raise BadSample(f"{part_what} is a part of type {kind!r}; supported parts: text, reasoning, thinking, "
                            f"tool_call (the part: {json.dumps(part, default=str)[:80]})")
    return "".join(texts), reasoning, calls
