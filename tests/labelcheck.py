"""An independent check of labels (exact labels, docs/guarantees.md), built on HF's own chat-template rendering, not on sft.data.templates.

For every kept source row the checker works out, from scratch, which samples the encoder must have written and
what each one must hold, then compares them with the encoded dataset token by token after decoding.

The rule (generation-faithful labels). Write R(messages, gen) for the template's render with the row's tools
(``apply_chat_template(..., tools=tools, add_generation_prompt=gen, tokenize=False)`` for native and for the
named templates that copy a model's own template; a plain formula for chatml, base/empty and alpaca), and E for
its end-of-turn marker. For each trained assistant message i:

    context  P_i = R(messages[:i], gen=True)          what the model sees before it answers
    alone    L_i = R(messages[:i+1], gen=False)       the conversation cut after turn i
    target   T_i = L_i[len(P_i) : L_i.rindex(E) + len(E)]   what the model must generate, through E
    full     F   = R(messages, gen=False)

Turn i is faithful in the whole conversation when F starts with P_i + T_i; its target is then a span of the
whole-conversation sample (source "<path>:<row>"). Otherwise (Qwen3 drops the reasoning of earlier turns and
gives only the last turn an empty think block) the row gets its own sample for the turn (source
"<path>:<row>#<i>"), whose text is L_i and whose one target is T_i. The whole-conversation sample exists only
when at least one trained turn is faithful in it. With train_on_reasoning false, a target that holds
``</think>`` loses everything through the first ``</think>`` and the newlines right after it.

A template may not silently drop what a row carries: for every tools list, tool call and reasoning text of a
kept row, rendering with and without it must differ (else the encoder should have rejected the row by name).

Only the message mapping (``sft.data.conversation.conversation_from_row``) is shared with the encoder. The check assumes no
sample was truncated or dropped for length (encode with a large sequence_length).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from dataclasses import dataclass

from sft.data.conversation import BadSample, FieldMapping, conversation_from_row

IGNORE_INDEX = -100
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
LLAMA3_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# A named template must render exactly as its model's own template; this is the tokenizer that holds it.
REFERENCE_TOKENIZERS = {"qwen2_5": "qwen2.5-instruct", "qwen3": "qwen3", "llama3": "llama3"}
PLAIN_FORMULAS = ("chatml", "base", "empty", "alpaca")


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def supervised_runs(labels):
    """Contiguous runs of target positions."""
    runs, current = [], []
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(position)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


# ----- Reading the input rows, independently of sft.data.sources --------------------------------------------

def read_source_rows(path: str) -> dict[int, dict | None]:
    """1-based row number -> the row as parsed (None for a malformed JSONL line, which cannot have been kept).

    JSONL rows are counted over non-blank lines; a .json file is an array of rows; .parquet rows in order.
    """
    if path.endswith(".jsonl"):
        rows, number = {}, 0
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                number += 1
                try:
                    rows[number] = json.loads(line)
                except json.JSONDecodeError:
                    rows[number] = None
        return rows
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            return dict(enumerate(json.load(handle), start=1))
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return dict(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise AssertionError(f"labelcheck cannot read {path}: use .json, .jsonl or .parquet")


# ----- How each template renders ------------------------------------------------------------------------

class Renderer:
    """R(messages, tools, gen) and the end-of-turn marker E of one template, from HF or a plain formula."""

    def __init__(self, name: str, tokenizer, switches=None):
        # switches: chat_template_kwargs, given to apply_chat_template; a Jinja file is given as its chat_template.
        self.name, self.tokenizer, self.switches = name, tokenizer, dict(switches or {})
        if name.endswith((".jinja", ".j2")):
            with open(name, encoding="utf-8") as handle:
                self.switches["chat_template"] = handle.read()
            name = "native"
        if name in REFERENCE_TOKENIZERS:
            from tests.conftest import real_tokenizer

            self.reference = real_tokenizer(REFERENCE_TOKENIZERS[name])
        elif name == "native":
            self.reference = tokenizer
        elif name not in PLAIN_FORMULAS:
            raise AssertionError(f"labelcheck knows no template {name!r}")
        if name in ("qwen2_5", "qwen3", "chatml"):
            self.end_of_turn = "<|im_end|>"
        elif name == "llama3":
            self.end_of_turn = "<|eot_id|>"
        elif name == "native":
            source = self.switches.get("chat_template") or (tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else "")
            markers = [marker for marker in ("<|im_end|>", "<|eot_id|>") if marker in source]
            assert len(markers) == 1, "labelcheck: cannot tell the end-of-turn marker of this tokenizer's template"
            self.end_of_turn = markers[0]
        else:
            assert tokenizer.eos_token, f"template {name} needs an eos token"
            self.end_of_turn = tokenizer.eos_token

    def render(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        if self.name in PLAIN_FORMULAS:
            return self._formula(messages, add_generation_prompt)
        # apply_chat_template gets copies: the check must not depend on whether it edits its input.
        text = self.reference.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.switches)
        if self.name == "llama3":
            # The old Llama-3 template writes an assistant header after every conversation, asked or not; the
            # named template writes it only as the generation prompt.
            assert text.endswith(LLAMA3_HEADER)
            return text if add_generation_prompt else text.removesuffix(LLAMA3_HEADER)
        return text

    def _formula(self, messages: list[dict], add_generation_prompt: bool) -> str:
        bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token
        if self.name == "chatml":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.name in ("base", "empty"):
            return bos + "".join(m["content"] + (eos if m["role"] == "assistant" else "") for m in messages)
        system = ALPACA_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        parts = [bos + system + "\n\n"]
        for m in messages:
            if m["role"] == "assistant":
                parts.append("### Response:\n" + m["content"] + eos + "\n\n")
            elif m["role"] == "tool":
                parts.append("### Input:\n" + m["content"] + "\n\n")
            else:
                parts.append("### Instruction:\n" + m["content"] + "\n\n")
        return "".join(parts) + ("### Response:\n" if add_generation_prompt else "")


# ----- The expected samples of one row ------------------------------------------------------------------

@dataclass
class ExpectedSample:
    text: str
    spans: list[tuple[int, int]]  # supervised character spans, in order, not overlapping

    def runs(self) -> list[str]:
        """The texts of the supervised runs: spans that touch form one run of tokens."""
        merged: list[list[int]] = []
        for start, end in self.spans:
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        return [self.text[start:end] for start, end in merged]


def _without(messages: list[dict], index: int, key: str) -> list[dict]:
    changed = [dict(message) for message in messages]
    changed[index].pop(key)
    return changed


def dropped_features(renderer: Renderer, conversation) -> list[str]:
    """What the template renders no trace of: such a row must be rejected by name, not trained without it."""
    messages, tools = conversation.messages, conversation.tools
    dropped = []
    if tools and renderer.render(messages, tools, False) == renderer.render(messages, None, False):
        dropped.append("tools")
    for index, message in enumerate(messages):
        cut = messages[:index + 1]
        for key in ("tool_calls", "reasoning_content"):
            if message.get(key) and key not in dropped:
                if renderer.render(cut, tools, False) == renderer.render(_without(cut, index, key), tools, False):
                    dropped.append(key)
    return dropped


def _mask_reasoning(text: str, start: int, end: int) -> tuple[int, int]:
    """train_on_reasoning false: the span starts after its first </think> and the newlines that follow."""
    close = text.find("</think>", start, end)
    if close == -1:
        return start, end
    start = close + len("</think>")
    while start < end and text[start] == "\n":
        start += 1
    return start, end


def expected_samples(renderer: Renderer, conversation, train_on_reasoning: bool = True) -> dict[str, ExpectedSample]:
    """Source suffix ("" for the whole conversation, "#i" for turn i alone) -> the sample the row must give."""
    messages, tools = conversation.messages, conversation.tools
    marker = renderer.end_of_turn
    full = renderer.render(messages, tools, False)
    whole_spans: list[tuple[int, int]] = []
    alone_samples: dict[str, ExpectedSample] = {}
    for index, trained in enumerate(conversation.trained):
        if not trained:
            continue
        prompt = renderer.render(messages[:index], tools, True)
        alone = renderer.render(messages[:index + 1], tools, False)
        assert alone.startswith(prompt), (
            f"template {renderer.name}: the generation prompt before message {index} is not a prefix of the "
            "conversation cut after it; the encoder should have raised a template error")
        assert marker in alone[len(prompt):], f"template {renderer.name}: no {marker!r} after message {index}"
        target = alone[len(prompt):alone.rindex(marker) + len(marker)]
        if full.startswith(prompt) and full.startswith(target, len(prompt)):
            whole_spans.append((len(prompt), len(prompt) + len(target)))
        else:
            alone_samples[f"#{index}"] = ExpectedSample(alone, [(len(prompt), len(prompt) + len(target))])
    samples = {"": ExpectedSample(full, whole_spans)} if whole_spans else {}
    samples.update(alone_samples)
    for sample in samples.values():
        for (_, end), (start, _) in zip(sample.spans, sample.spans[1:]):
            assert end <= start, "labelcheck: targets overlap in one render"
        if not train_on_reasoning:
            sample.spans = [_mask_reasoning(sample.text, start, end) for start, end in sample.spans]
    return samples


# ----- Checking an encoded dataset ----------------------------------------------------------------------

@dataclass
class Checked:
    """What a check covered: source rows with samples, samples, and of those the one-turn (#i) samples."""

    rows: int
    samples: int
    split_samples: int


def _row_key(source: str) -> tuple[str, str]:
    """'data.jsonl:7#3' -> ('data.jsonl:7', '#3'); 'data.jsonl:7' -> ('data.jsonl:7', '')."""
    base, hash_sign, turn = source.partition("#")
    return base, hash_sign + turn


def check_encoded(dataset, files, mapping: FieldMapping, name, tokenizer, loss_on_turns="all",
                  train_on_reasoning=True, switches=None) -> Checked:
    """Check every sample of an encoded dataset against its source row; asserts on the first difference.

    Per kept source row, the set of samples must be exactly the expected one (none missing, none extra); per
    sample, the decoded ids must be the expected text, every label must be -100 or its input id, and the
    decoded supervised runs must be exactly the expected targets.
    """
    renderer = Renderer(name, tokenizer, switches)
    raw = {}
    for path in files:
        for number, row in read_source_rows(path).items():
            raw[f"{path}:{number}"] = row
    by_row: dict[str, dict[str, dict]] = defaultdict(dict)
    for example in dataset:
        base, suffix = _row_key(example["source"])
        assert base in raw, f"sample {example['source']} names no row of {files}"
        assert suffix not in by_row[base], f"sample {example['source']} written twice"
        by_row[base][suffix] = example
    samples = split_samples = 0
    for base, written in by_row.items():
        row = raw[base]
        assert row is not None, f"{base}: a malformed row was kept"
        try:
            conversation = conversation_from_row(row, mapping, loss_on_turns)
        except BadSample as error:
            raise AssertionError(f"{base}: kept, but the row is bad: {error}") from None
        dropped = dropped_features(renderer, conversation)
        assert not dropped, (f"{base}: kept, but template {name} renders no trace of its {', '.join(dropped)}; "
                             "the row should have been rejected naming the feature")
        expected = expected_samples(renderer, conversation, train_on_reasoning)
        assert sorted(written) == sorted(expected), (
            f"{base}: samples written {sorted(written)}, expected {sorted(expected)} ('' = whole conversation)")
        for suffix, sample in expected.items():
            example = written[suffix]
            where = base + suffix
            ids, labels = example["input_ids"], example["labels"]
            assert len(ids) == len(labels), where
            if "length" in example:
                assert example["length"] == len(ids), where
            text = decode(tokenizer, ids)
            assert text == sample.text, _first_difference(where, sample.text, text)
            for label, token in zip(labels, ids):
                assert label == IGNORE_INDEX or label == token, f"{where}: a label differs from its input id"
            runs = [decode(tokenizer, [ids[p] for p in run]) for run in supervised_runs(labels)]
            assert runs == sample.runs(), f"{where}: supervised runs\n  got      {runs}\n  expected {sample.runs()}"
            samples += 1
            split_samples += suffix != ""
    return Checked(len(by_row), samples, split_samples)


def _first_difference(where: str, expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (f"{where}: decoded text differs at character {at}: "
            f"expected {expected[at:at + 60]!r}, got {got[at:at + 60]!r}")
