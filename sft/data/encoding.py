"""Rendered conversations -> (input_ids, labels) with prompt tokens masked. Pure: plain lists in, lists out.

Each sample is tokenized once, as one string, in a batched call of the fast tokenizer; a token is a
target when its characters lie inside a supervised span (from ``sft.data.templates``)::

    text    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>]\\n
    tokens  <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello ! <|im_end|> \\n
    labels  -100 ...                                                    -100  Hello ! <|im_end|> -100

A token can straddle a span edge when the tokenizer merges characters across it (say a response that
starts with a newline after a prompt ending in one). Such a sample is re-tokenized piece by piece,
split at the span edges, which is exactly how a model sees it at inference (the prompt ends at a token
boundary); it is counted in the report as ``retokenized_at_boundary``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from sft.config import DataArgs
from sft.data.conversation import BadSample, FieldMapping, conversation_from_row, plain_text
from sft.errors import IGNORE_INDEX, UserError
from sft.data.sources import SourceRow
from sft.data.templates import ChatTemplate, TemplateError, TemplateRefused


class EncodeError(UserError):
    """A sample cannot be encoded under the configured policy; the message names file and row."""


@dataclass(frozen=True)
class EncodeSettings:
    """What decides how a row is encoded (all of it goes into the cache key)."""

    mapping: FieldMapping
    sequence_length: int
    overlong: str = DataArgs.overlong  # truncate | drop | error (defaults are the config's)
    on_bad_sample: str = DataArgs.on_bad_sample  # error | skip
    loss_on_turns: str = DataArgs.loss_on_turns  # all | last
    train_on_reasoning: bool = DataArgs.train_on_reasoning
    text_end: str = ""  # written after a plain-text row (text_key): the tokenizer's eos, so a packed text ends


def supervised_labels(encoding, spans: list[tuple[int, int]]) -> list[int] | None:
    """Labels from one tokenizers.Encoding and the supervised character spans; None if a token straddles an edge."""
    ids = encoding.ids
    count = len(ids)
    labels = [IGNORE_INDEX] * count
    for start, end in spans:
        first = encoding.char_to_token(start)
        last = encoding.char_to_token(end - 1)
        if first is None or last is None or encoding.token_to_chars(first)[0] != start:
            return None
        # Several byte tokens can share one character's offsets; take them all.
        while last + 1 < count and encoding.token_to_chars(last + 1)[1] <= end:
            last += 1
        if encoding.token_to_chars(last)[1] != end:
            return None
        labels[first:last + 1] = ids[first:last + 1]
    return labels


def tokenize_by_pieces(backend, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` split at every span edge, each piece alone; targets are the span pieces."""
    edges = sorted({0, len(text), *[edge for span in spans for edge in span]})
    pieces = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    encodings = backend.encode_batch([text[a:b] for a, b in pieces], add_special_tokens=False)
    ids: list[int] = []
    labels: list[int] = []
    span_set = set(spans)
    inside = [any(s <= a and b <= e for s, e in span_set) for a, b in pieces]
    for encoding, is_target in zip(encodings, inside):
        ids += encoding.ids
        labels += encoding.ids if is_target else [IGNORE_INDEX] * len(encoding.ids)
    return ids, labels


@dataclass
class EncodeCounts:
    """Running counts of encoding, mergeable across chunks and workers; ``report`` turns them into the report."""

    rows_read: int = 0
    rows_kept: int = 0  # rows that gave at least one sample
    samples: int = 0  # samples written (a row whose turns need their own render gives several)
    split_samples: int = 0  # of those, samples made for one turn (see sft.data.templates: generation-faithful targets)
    truncated: int = 0
    retokenized: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    plain_text: int = 0  # rows read as plain text (text_key), every token trained
    dropped: Counter = field(default_factory=Counter)  # reason -> samples dropped by a policy
    rejected: Counter = field(default_factory=Counter)  # reason kind -> rows rejected as bad input
    ignored_keys: Counter = field(default_factory=Counter)  # "messages[].weight" -> rows that had it
    notes: Counter = field(default_factory=Counter)  # odd but trainable (conversation.NOTE_*) -> rows kept with it

    def merge(self, other: "EncodeCounts") -> None:
        for name in ("rows_read", "rows_kept", "samples", "split_samples", "truncated", "retokenized",
                     "total_tokens", "supervised_tokens", "plain_text"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)
        self.rejected.update(other.rejected)
        self.ignored_keys.update(other.ignored_keys)
        self.notes.update(other.notes)

    def report(self, lengths) -> dict:
        """The split's report (a JSON-able dict, stored in encode_meta.json); ``lengths`` of the kept samples."""
        import numpy as np

        lengths = np.asarray(lengths)
        return {
            "rows_read": self.rows_read,
            "kept": self.rows_kept,
            "samples": self.samples,
            "split_samples": self.split_samples,
            "plain_text_rows": self.plain_text,
            "dropped": dict(sorted(self.dropped.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "ignored_keys": dict(sorted(self.ignored_keys.items())),
            "notes": dict(sorted(self.notes.items())),
            "truncated": self.truncated,
            "retokenized_at_boundary": self.retokenized,
            "total_tokens": self.total_tokens,
            "supervised_tokens": self.supervised_tokens,
            "supervised_fraction": round(self.supervised_tokens / self.total_tokens, 4) if self.total_tokens else 0.0,
            "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
            | {"max": int(lengths.max())} if len(lengths) else {},
        }


@dataclass
class EncodedChunk:
    """What encoding a batch of rows gives: the kept samples as columns, the counts, and the rejected rows."""

    columns: dict[str, list]  # input_ids, labels, length, source: one entry per kept sample
    counts: EncodeCounts
    rejects: list[dict]  # {"source", "reason", "row"}


def _reject(row: SourceRow, reason: str, settings: EncodeSettings, counts: EncodeCounts, rejects: list[dict]) -> None:
    if settings.on_bad_sample == "error":
        raise EncodeError(f"{row.where}: {reason} (set sft_train.data_args.on_bad_sample: skip to skip such rows)")
    counts.rejected[reason_kind(reason)] += 1
    rejects.append({"source": row.source, "reason": reason, "row": row.raw_text()})


def encode_rows(rows: list[SourceRow], template: ChatTemplate, backend, settings: EncodeSettings) -> EncodedChunk:
    """Encode a batch of rows into samples: map, render, tokenize in one batched call, label, apply the policies.

    Bad rows raise EncodeError naming the row when the policy is error; otherwise they are counted and returned
    in ``rejects``. A template error (the template itself cannot give exact labels) always raises.
    """
    counts = EncodeCounts(rows_read=len(rows))
    rejects: list[dict] = []
    rendered = []  # (row, sample source, text, spans, is_split)
    for row in rows:
        if row.error is not None:
            _reject(row, row.error, settings, counts, rejects)
            continue
        try:
            text = plain_text(row.value, settings.mapping)
            if text is not None:  # every token a target, the tokenizer's eos after it
                full = text + settings.text_end
                rendered.append((row, row.source, full, [(0, len(full))], False))
                counts.plain_text += 1
                continue
            conversation = conversation_from_row(row.value, settings.mapping, settings.loss_on_turns)
            samples = template.render(conversation, settings.train_on_reasoning)
        except (BadSample, TemplateRefused) as error:
            _reject(row, str(error), settings, counts, rejects)
            continue
        except TemplateError as error:
            raise EncodeError(f"{row.where}: {error}") from None
        for key in conversation.ignored_keys:
            counts.ignored_keys[key] += 1
        for note in conversation.notes:
            counts.notes[note] += 1
        for sample in samples:
            suffix = "" if sample.turn is None else f"#{sample.turn}"
            rendered.append((row, row.source + suffix, sample.text, sample.spans, sample.turn is not None))

    try:
        encodings = backend.encode_batch([text for _, _, text, _, _ in rendered], add_special_tokens=False)
    except TypeError:  # the Rust tokenizer takes only valid Unicode: some text holds a lone surrogate
        rendered = _without_unencodable(rendered, settings, counts, rejects)
        encodings = backend.encode_batch([text for _, _, text, _, _ in rendered], add_special_tokens=False)

    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "source": []}
    kept_rows = set()
    for encoding, (row, source, text, spans, is_split) in zip(encodings, rendered):
        ids = encoding.ids
        labels = supervised_labels(encoding, spans)
        retokenized = labels is None
        if retokenized:
            ids, labels = tokenize_by_pieces(backend, text, spans)
        truncated = False
        if len(ids) > settings.sequence_length:
            if settings.overlong == "error":
                raise EncodeError(f"{row.where}: {len(ids)} tokens, longer than sequence_length "
                                  f"{settings.sequence_length} (set sft_train.data_args.overlong: truncate or drop)")
            if settings.overlong == "drop":
                counts.dropped["longer than sequence_length"] += 1
                continue
            ids, labels = ids[: settings.sequence_length], labels[: settings.sequence_length]
            truncated = True
        supervised = len(labels) - labels.count(IGNORE_INDEX)
        # Only truncation can remove every target: an untruncated span always holds the end-of-turn token.
        if truncated and supervised == 0:
            counts.dropped["no supervised token left after truncation"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["length"].append(len(ids))
        columns["source"].append(source)
        kept_rows.add(id(row))
        counts.samples += 1
        counts.split_samples += is_split
        counts.truncated += truncated
        counts.retokenized += retokenized
        counts.total_tokens += len(ids)
        counts.supervised_tokens += supervised
    counts.rows_kept = len(kept_rows)
    return EncodedChunk(columns, counts, rejects)


def _without_unencodable(rendered: list[tuple], settings: EncodeSettings, counts: EncodeCounts,
                         rejects: list[dict]) -> list[tuple]:
    """``rendered`` less the rows whose text is not valid Unicode (a lone surrogate, as a JSON ``\\ud800`` escape
    gives), each rejected naming the field that holds it. Rare, so the row is mapped again here to name the field
    (and to take back what it added to the counts), rather than keeping every conversation on the common path."""
    bad = {}
    for row, _, text, _, _ in rendered:
        if id(row) not in bad and not _encodable(text):
            bad[id(row)] = row
    if not bad:
        raise RuntimeError("the tokenizer refused a batch whose texts are all valid Unicode")  # a bug, not bad data
    for row in bad.values():
        conversation = conversation_from_row(row.value, settings.mapping, settings.loss_on_turns)
        counts.ignored_keys.subtract(conversation.ignored_keys)
        counts.notes.subtract(conversation.notes)
        _reject(row, f"{_unencodable_field(conversation)} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                     "which is not Unicode text and cannot be tokenized", settings, counts, rejects)
    counts.ignored_keys, counts.notes = +counts.ignored_keys, +counts.notes  # drop the keys counted down to 0
    return [entry for entry in rendered if id(entry[0]) not in bad]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_field(conversation) -> str:
    """Where in a conversation the text that is not valid Unicode is, as 'message 2 content'."""
    for index, message in enumerate(conversation.messages):
        for key, value in message.items():
            if not _encodable(json.dumps(value, ensure_ascii=False)):
                return f"message {index} {key}"
    return "the row's tools" if conversation.tools else "the rendered text"


def reason_kind(reason: str) -> str:
    """A reject reason without its row-specific details, for counting: 'empty response', 'missing key ...'."""
    depth, cut = 0, len(reason)
    for position, char in enumerate(reason):  # the first ':' or ';' outside brackets ends the kind
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and char in ":;":
            cut = position
            break
    kind = reason[:cut].strip()
    return re.sub(r"\[\d+\]", "[i]", re.sub(r"message \d+", "message i", kind))
