"""Rendered conversations -> (input_ids, labels) with prompt tokens masked. Pure: plain lists in, lists out.

Each sample is tokenized once, as one string, in a batched call of the fast tokenizer; a token is a
target when its characters lie inside a supervised span (from ``sft.templates``)::

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
from dataclasses import dataclass

from sft.config import DataArgs
from sft.data import BadSample, FieldMapping, conversation_from_row, location
from sft.templates import ChatTemplate, TemplateRefused

IGNORE_INDEX = -100

# Status of an encoded row: kept, dropped by a policy (counted, not an error), or rejected as bad input.
KEPT = "kept"


class EncodeError(ValueError):
    """A sample cannot be encoded under the configured policy; the message names file and row."""


@dataclass(frozen=True)
class EncodeSettings:
    """What decides how a row is encoded (all of it goes into the cache key)."""

    mapping: FieldMapping
    sequence_length: int
    overlong: str = DataArgs.overlong  # truncate | drop | error (defaults are the config's)
    on_bad_sample: str = DataArgs.on_bad_sample  # error | skip
    loss_on_turns: str = DataArgs.loss_on_turns  # all | last


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


def encode_rows(rows: dict, files: list[str], template: ChatTemplate, backend, settings: EncodeSettings) -> dict:
    """Encode a batch of raw rows (columns file_index, row, line, text) into output columns.

    Output columns: input_ids, labels, length, source, plus status (kept / dropped:... / rejected:...),
    truncated and retokenized for the report. Bad rows raise EncodeError when the policy is error.
    """
    batch = len(rows["text"])
    status = [KEPT] * batch
    texts, spans_of, positions = [], [], []
    for i in range(batch):
        where = location(files[rows["file_index"][i]], rows["row"][i], rows["line"][i])
        try:
            messages, trained = conversation_from_row(json.loads(rows["text"][i]), settings.mapping, settings.loss_on_turns)
            text, spans = template.render(messages, trained)
        except (BadSample, TemplateRefused) as error:
            if settings.on_bad_sample == "error":
                raise EncodeError(f"{where}: {error} (set sft_train.data_args.on_bad_sample: skip to skip such rows)") from None
            status[i] = f"rejected:{error}"
            continue
        except Exception as error:  # TemplateError: the template itself is wrong, whatever the policy
            raise EncodeError(f"{where}: {error}") from None
        texts.append(text)
        spans_of.append(spans)
        positions.append(i)

    input_ids = [[] for _ in range(batch)]
    labels = [[] for _ in range(batch)]
    truncated = [False] * batch
    retokenized = [False] * batch
    for encoding, text, spans, i in zip(backend.encode_batch(texts, add_special_tokens=False), texts, spans_of, positions):
        ids = encoding.ids
        row_labels = supervised_labels(encoding, spans)
        if row_labels is None:
            ids, row_labels = tokenize_by_pieces(backend, text, spans)
            retokenized[i] = True
        if len(ids) > settings.sequence_length:
            if settings.overlong == "error":
                where = location(files[rows["file_index"][i]], rows["row"][i], rows["line"][i])
                raise EncodeError(
                    f"{where}: {len(ids)} tokens, longer than sequence_length {settings.sequence_length} "
                    "(set sft_train.data_args.overlong: truncate or drop)"
                )
            if settings.overlong == "drop":
                status[i] = "dropped:longer than sequence_length"
                continue
            ids, row_labels = ids[: settings.sequence_length], row_labels[: settings.sequence_length]
            truncated[i] = True
        # Only truncation can remove every target: an untruncated span always holds the end-of-turn token.
        if truncated[i] and all(label == IGNORE_INDEX for label in row_labels):
            status[i] = "dropped:no supervised token left after truncation"
            continue
        input_ids[i], labels[i] = ids, row_labels
    return {
        "input_ids": input_ids,
        "labels": labels,
        "length": [len(ids) for ids in input_ids],
        "source": [f"{files[rows['file_index'][i]]}:{rows['row'][i]}" for i in range(batch)],
        "status": status,
        "truncated": truncated,
        "retokenized": retokenized,
    }


def reason_kind(reason: str) -> str:
    """A reject reason without its row-specific details, for counting: 'empty response', 'missing key ...'."""
    kind = re.split(r"[;:]", reason, maxsplit=1)[0].strip()
    return re.sub(r"\[\d+\]", "[i]", re.sub(r"message \d+", "message i", kind))


@dataclass
class SplitResult:
    """An encoded split: the kept rows, the report counts and the rejected rows."""

    dataset: "datasets.Dataset"  # columns input_ids, labels, length, source
    report: dict
    rejects: list[dict]  # {"source", "reason", "row"}


CHUNK_ROWS = 2048  # rows per unit of work handed to a worker; small enough for a smooth progress bar


def _encode_chunk(state: dict, start: int, end: int):
    """Encode rows[start:end] of the split into an Arrow table (runs in the main process or a worker)."""
    import pyarrow as pa

    columns = state["columns"]
    parts = []
    for batch_start in range(start, end, 512):
        batch_end = min(end, batch_start + 512)
        batch = {name: values[batch_start:batch_end] for name, values in columns.items()}
        out = encode_rows(batch, state["files"], state["template"], state["backend"], state["settings"])
        parts.append(pa.table({
            "input_ids": pa.array(out["input_ids"], type=pa.list_(pa.int32())),
            "labels": pa.array(out["labels"], type=pa.list_(pa.int32())),
            "length": pa.array(out["length"], type=pa.int32()),
            "source": pa.array(out["source"], type=pa.string()),
            "status": pa.array(out["status"], type=pa.string()),
            "truncated": pa.array(out["truncated"], type=pa.bool_()),
            "retokenized": pa.array(out["retokenized"], type=pa.bool_()),
        }))
    return pa.concat_tables(parts)


_WORKER_STATE: dict = {}


def _init_worker(state: dict) -> None:
    # With the fork start method the state is inherited, not pickled: the tokenizer is not copied per task.
    _WORKER_STATE.update(state)


def _encode_chunk_in_worker(bounds: tuple[int, int]) -> bytes:
    import pyarrow as pa

    table = _encode_chunk(_WORKER_STATE, *bounds)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def encode_split(files: list[str], template: ChatTemplate, tokenizer, settings: EncodeSettings,
                 num_workers: int = 1, desc: str = "Encoding") -> SplitResult:
    """Read, map, render and tokenize every row of ``files`` with ``num_workers`` processes.

    Workers are forked processes that each encode contiguous chunks of rows and send back Arrow
    tables; the output keeps the input order. (datasets.map with num_proc was measured here to gain
    only 1.2x from a second process, against 2.2x for this pool; see bench/encode.py.)
    """
    import multiprocessing
    import os

    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    from sft.data import check_keys, read_rows

    skip = settings.on_bad_sample == "skip"
    columns = {"file_index": [], "row": [], "line": [], "text": []}
    rejects: list[dict] = []
    for file_index, path in enumerate(files):
        rows, malformed = read_rows(path, skip_malformed=skip)
        check_keys(path, rows, settings.mapping)
        for raw, reason in malformed:
            rejects.append({"source": f"{path}:{raw.row}", "reason": reason, "row": raw.text})
        for raw in rows:
            columns["file_index"].append(file_index)
            columns["row"].append(raw.row)
            columns["line"].append(raw.line)
            columns["text"].append(raw.text)
    count = len(columns["text"])
    rows_read = count + len(rejects)
    state = {"columns": columns, "files": files, "template": template, "backend": tokenizer.backend_tokenizer,
             "settings": settings}
    chunks = [(start, min(count, start + CHUNK_ROWS)) for start in range(0, count, CHUNK_ROWS)]
    workers = max(1, min(num_workers, len(chunks)))
    tables = []
    with tqdm(total=count, desc=desc, unit=" rows", disable=count == 0) as progress:
        if workers == 1:
            for start, end in chunks:
                tables.append(_encode_chunk(state, start, end))
                progress.update(end - start)
        else:
            # One tokenizer thread per worker: Rust threads inside every worker would only fight for cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            context = multiprocessing.get_context("fork")
            with context.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
                for (start, end), payload in zip(chunks, pool.imap(_encode_chunk_in_worker, chunks)):
                    tables.append(pa.ipc.open_stream(payload).read_all())
                    progress.update(end - start)
    table = pa.concat_tables(tables) if tables else None

    status = table.column("status").to_pylist() if table is not None else []
    dropped: dict[str, int] = {}
    for index, value in enumerate(status):
        if value == KEPT:
            continue
        if value.startswith("dropped:"):
            reason = value.split(":", 1)[1]
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            rejects.append({"source": f"{files[columns['file_index'][index]]}:{columns['row'][index]}",
                            "reason": value.split(":", 1)[1], "row": columns["text"][index]})
    rejected: dict[str, int] = {}
    for reject in rejects:
        kind = reason_kind(reject["reason"])
        rejected[kind] = rejected.get(kind, 0) + 1
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("length", pa.int32()), ("source", pa.string())])
    if table is None:
        kept_table = schema.empty_table()
        truncated = retokenized = 0
    else:
        mask = pc.equal(table.column("status"), KEPT)
        truncated = int(pc.sum(pc.and_(mask, table.column("truncated"))).as_py() or 0)
        retokenized = int(pc.sum(pc.and_(mask, table.column("retokenized"))).as_py() or 0)
        kept_table = table.filter(mask).select(schema.names)
    kept = datasets.Dataset(datasets.table.InMemoryTable(kept_table.combine_chunks()))
    lengths = kept_table.column("length").to_numpy() if len(kept) else np.zeros(0, dtype=np.int64)
    supervised = 0
    if len(kept):
        flat = pc.list_flatten(kept_table.column("labels"))
        supervised = int(pc.sum(pc.not_equal(flat, IGNORE_INDEX)).as_py() or 0)
    total = int(lengths.sum())
    report = {
        "rows_read": rows_read,
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "rejected": dict(sorted(rejected.items())),
        "truncated": truncated,
        "retokenized_at_boundary": retokenized,
        "total_tokens": total,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / total, 4) if total else 0.0,
        "length_percentiles": {
            f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)
        } | {"max": int(lengths.max())} if len(lengths) else {},
    }
    return SplitResult(kept, report, rejects)
