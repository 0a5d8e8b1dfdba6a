"""Bad input from the wild (issue 17), through scripts/encode.py with the Qwen3 tokenizer and its own template.

Every row is encoded correctly or refused in one line naming file, row and reason: under the strict default
an `error:` line and exit status 1, under on_bad_sample: skip a counted rejection whose reason is in the
rejects file. Never a traceback, never silent. Rows that are odd but trainable are kept and counted as notes.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from tests.conftest import ROOT, real_tokenizer, shared_path

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def user(text="What is the weather in Oslo?"):
    return {"role": "user", "content": text}


def assistant(text="It rains in Oslo.", **extra):
    return {"role": "assistant", "content": text, **extra}


def call(name="get_weather", call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": {"city": "Oslo"}}}


GOOD = {"messages": [user("Hi"), assistant("Hello!")]}


@dataclass
class Encoded:
    returncode: int
    stdout: str
    stderr: str
    out: str

    @property
    def report(self) -> dict:
        with open(os.path.join(self.out, "encode_meta.json"), encoding="utf-8") as handle:
            return json.load(handle)["reports"]["train"]

    def rejects(self) -> list[dict]:
        path = os.path.join(self.out, "rejects-train.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    def supervised_texts(self) -> list[str]:
        from sft.data.pipeline import load_encoded

        tokenizer = real_tokenizer("qwen3")
        return [tokenizer.decode([token for token in labels if token != -100])
                for labels in load_encoded(os.path.join(self.out, "train"))["labels"]]

    def error_line(self) -> str:
        """The one `error:` line of a refused run (and that it is the only thing said, with no traceback)."""
        assert self.returncode == 1, self.stdout + self.stderr
        assert "Traceback" not in self.stderr, self.stderr
        lines = [line for line in self.stderr.splitlines() if line.strip() and "Encoding train" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr
        return lines[0]


def encode(tmp_path, data: str, skip: bool = False, keys: Optional[str] = "messages_key: messages") -> Encoded:
    """Run scripts/encode.py on ``data`` (template native, the Qwen3 tokenizer) with the top-level ``keys``."""
    tokenizer = shared_path("tokenizers", "qwen3")
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    run.mkdir()
    config = run / "run.yaml"
    config.write_text(f"pretrain: {tokenizer}\noutput_dir: {run / 'output'}\nsequence_length: 1024\n{keys or ''}\n"
                      f"sft_train:\n  data_args:\n    file_name: {data}\n    template: native\n"
                      + ("    on_bad_sample: skip\n" if skip else ""))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "encode.py"), "--config_path", str(config),
                             "--out", str(run / "encoded")], capture_output=True, text=True, cwd=ROOT)
    assert "Traceback" not in result.stderr, result.stderr
    return Encoded(result.returncode, result.stdout, result.stderr, str(run / "encoded"))


def write_jsonl(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


# ----- 2. duplicate JSON keys ---------------------------------------------------------------------------

def test_a_key_given_twice_is_a_bad_row_naming_the_key(tmp_path):
    two_conversations = ('{"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}], '
                         '"messages": [{"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}]}')
    two_roles = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "role": "user"}]}'
    path = write_jsonl(tmp_path, "dup.jsonl", [two_conversations, two_roles, GOOD])
    line = encode(tmp_path, path).error_line()
    assert "dup.jsonl line 1: duplicate key 'messages' in one JSON object" in line
    skipped = encode(tmp_path, path, skip=True)
    assert skipped.report["kept"] == 1 and sum(skipped.report["rejected"].values()) == 2
    assert [(reject["source"].rsplit(":", 1)[1], reject["reason"].split(" in one")[0]) for reject in skipped.rejects()] == [
        ("1", "duplicate key 'messages'"), ("2", "duplicate key 'role'")]
    array = tmp_path / "dup.json"  # a .json array is read by another scanner: the same check applies
    array.write_text(f"[{two_roles},\n {json.dumps(GOOD)}]")
    line = encode(tmp_path, str(array)).error_line()
    assert "dup.json row 1 (line 1): duplicate key 'role' in one JSON object" in line


# ----- 3. text that is not Unicode --------------------------------------------------------------------

def test_a_lone_surrogate_is_a_bad_row_not_a_traceback(tmp_path):
    lone = '{"id": 2, "messages": [{"role": "user", "content": "bad \\ud800 here"}, {"role": "assistant", "content": "ok"}]}'
    emoji = '{"id": 3, "messages": [{"role": "user", "content": "a pair \\ud83d\\ude00 is fine"}, {"role": "assistant", "content": "ok"}]}'
    path = write_jsonl(tmp_path, "surrogate.jsonl", [GOOD, lone, emoji])
    line = encode(tmp_path, path).error_line()
    assert "surrogate.jsonl line 2: message 0 content holds a lone surrogate" in line
    skipped = encode(tmp_path, path, skip=True)
    assert skipped.returncode == 0 and skipped.report["kept"] == 2
    assert skipped.report["ignored_keys"] == {"id": 1}  # the rejected row's keys are not counted
    assert [reject["source"].rsplit(":", 1)[1] for reject in skipped.rejects()] == ["2"]
    assert "lone surrogate" in skipped.rejects()[0]["reason"]


# ----- 4 and 5h. reasoning given twice; Anthropic thinking parts ---------------------------------------

def test_reasoning_given_twice_is_a_bad_row_and_a_thinking_part_is_reasoning(tmp_path):
    thinking_part = {"type": "thinking", "thinking": "Two and two make four.", "signature": "EqQBCkYIARgC"}
    rows = [
        {"messages": [user("2+2?"), assistant("<think>Count them.</think>4", reasoning_content="Two and two make four.")]},
        {"messages": [user("2+2?"), assistant([thinking_part, {"type": "text", "text": "4"}], reasoning_content="Count.")]},
        {"messages": [user("2+2?"), assistant("4", reasoning="Count.", reasoning_content="Count.")]},
        {"messages": [user("2+2?"), assistant([thinking_part, {"type": "text", "text": "4"}])]},
    ]
    path = write_jsonl(tmp_path, "think.jsonl", rows)
    line = encode(tmp_path, path).error_line()
    assert ("think.jsonl line 1: messages[1] gives its reasoning twice, in 'reasoning_content' and in a <think> block "
            "in its content") in line
    skipped = encode(tmp_path, path, skip=True)
    assert [reject["source"].rsplit(":", 1)[1] for reject in skipped.rejects()] == ["1", "2", "3"]
    assert all("gives its reasoning twice" in reject["reason"] for reject in skipped.rejects())
    assert skipped.supervised_texts() == ["<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"]


# ----- 5a, 5b, 5c. odd but trainable: counted as notes ---------------------------------------------------

def test_odd_but_trainable_rows_are_kept_and_counted_as_notes(tmp_path):
    rows = [
        {"messages": [user(), assistant("", tool_calls=[call()]), {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
                      assistant()], "tools": [TOOL]},
        {"messages": [user(), assistant("", tool_calls=[call("get_time")]),
                      {"role": "tool", "tool_call_id": "call_1", "content": "noon"}, assistant("At noon.")], "tools": [TOOL]},
        {"messages": [user("Hi"), assistant("Hello!"), user("Bye")]},
        {"messages": [user(), assistant("", tool_calls=[call()]), {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                      assistant()], "tools": [TOOL]},
    ]
    encoded = encode(tmp_path, write_jsonl(tmp_path, "odd.jsonl", rows))
    assert encoded.returncode == 0 and encoded.report["kept"] == 4 and encoded.report["rejected"] == {}
    assert encoded.report["notes"] == {
        "a tool call names a function the row's tools do not offer": 1,
        "a tool result's tool_call_id matches no earlier tool call": 1,
        "the conversation ends on a user turn (kept as unsupervised context)": 1,
    }


# ----- 5d, 5e. whole files that are not JSON Lines -----------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_jsonl_file_says_it_is_empty(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    line = encode(tmp_path, str(path), skip=True).error_line()
    assert line == f"error: {path}: the file is empty; expected JSON Lines, one row object per line"


def test_a_json_array_named_jsonl_is_refused_with_the_fix(tmp_path):
    rows = [GOOD] * 3
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps(rows, indent=2))
    line = encode(tmp_path, str(pretty), skip=True).error_line()
    assert line == (f"error: {pretty} line 1: this is a JSON array, not JSON Lines (one row object per line); "
                    "name the file .json")
    one_line = tmp_path / "one_line.jsonl"
    one_line.write_text(json.dumps(rows) + "\n")
    assert "this is a JSON array on one line, not JSON Lines" in encode(tmp_path, str(one_line), skip=True).error_line()


# ----- 5f. TRL's conversational prompt/completion layout ------------------------------------------------------

TRL_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello! How can I help?"), user()],
     "completion": [assistant("", tool_calls=[call()]), {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                    assistant("It rains.")],
     "tools": [TOOL]},
    {"prompt": [user("2+2?")], "completion": [assistant("4")], "tools": None},
]


def write_trl_parquet(tmp_path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**row, "tools": json.dumps(row["tools"]) if row["tools"] else None,
             "prompt": [{**m, "tool_calls": None} for m in row["prompt"]],
             "completion": [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                                 for c in m["tool_calls"]] if m.get("tool_calls") else None}
                            for m in row["completion"]]} for row in TRL_ROWS]
    path = tmp_path / "trl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_trl_prompt_completion_parquet_is_read_with_the_prompt_as_context(tmp_path):
    path = write_trl_parquet(tmp_path)
    encoded = encode(tmp_path, path, keys="prompt_key: prompt\nresponse_key: completion\nquery_key: null")
    assert encoded.returncode == 0 and encoded.report["kept"] == 2, encoded.stderr
    assert encoded.report["ignored_keys"] == {} and encoded.report["notes"] == {}
    # Only the completion is trained on: its call and its answer (Qwen3 trains the call turn in a sample of its
    # own); the prompt's assistant turn is context.
    targets = "".join(encoded.supervised_texts())
    assert "Hello! How can I help?" not in targets
    empty_think = "<think>\n\n</think>\n\n"
    assert targets == (f"{empty_think}It rains.<|im_end|>"
                       f'{empty_think}<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n</tool_call><|im_end|>'
                       f"{empty_think}4<|im_end|>"), targets


@pytest.mark.parametrize("keys", ["messages_key: messages", None])
def test_trl_prompt_completion_parquet_needs_no_key_settings(tmp_path, keys):
    encoded = encode(tmp_path, write_trl_parquet(tmp_path), keys=keys)
    assert encoded.returncode == 0 and encoded.report["kept"] == 2, encoded.stderr


# ----- 5g. OpenAI custom tool calls ---------------------------------------------------------------------------

def test_a_custom_tool_call_is_refused_as_unsupported_by_the_template(tmp_path):
    custom = {"id": "call_1", "type": "custom", "custom": {"name": "shell", "input": "ls -la"}}
    rows = [{"messages": [user("List the files."), assistant("", tool_calls=[custom]),
                          {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}, assistant("One file: a.txt.")]},
            GOOD]
    path = write_jsonl(tmp_path, "custom.jsonl", rows)
    line = encode(tmp_path, path).error_line()
    assert "custom.jsonl line 1: template native does not support custom tool calls (type custom, message 1)" in line
    skipped = encode(tmp_path, path, skip=True)
    assert skipped.report["kept"] == 1 and list(skipped.report["rejected"]) == [
        "template native does not support custom tool calls (type custom, message i)"]
