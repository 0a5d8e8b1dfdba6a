"""Encoding a whole split: sources -> chunks encoded by worker processes -> Arrow files on disk and a report.

Memory does not grow with the data (guarantee 9). Each worker reads its own chunk of rows from the
source (inherited through fork, memory-mapped; see sft.data.sources), encodes it and sends back an Arrow
table; the main process appends the tables, in input order, to Arrow stream files listed in ``shards.json``
and the rejected rows to a JSONL file, keeping only the sample lengths (4 bytes a sample) for the report.
At most ``2 x workers`` chunks are in flight, so a slow disk cannot let results pile up::

    source --read(a,b)--> worker: encode_rows --Arrow bytes--> main: append data-*.arrow, rejects.jsonl
           --read(c,d)--> worker: ...                              (in order; lengths kept)

An encoded folder is read back with ``load_encoded``: each Arrow file memory-mapped by datasets'
``Dataset.from_file``, joined with ``concatenate_datasets`` (no copy). Only datasets' public API touches the
files: nothing here writes or reads its private ``save_to_disk`` state files. (Writing the folder with
``save_to_disk`` instead would write the data a second time, reading every encoded page back through a
memory map, where it counts in the process's memory: for the 1.1 GB that 1M Alpaca-style rows encode to,
measured 1.2 GiB peak PSS in process, or 8-16 s more and 0.6 GiB with its spawned writer process.)

Workers are forked processes that each encode contiguous chunks of rows and send back Arrow tables; the
output keeps the input order. (datasets.map with num_proc was measured here to gain only 1.2x from a
second process, against 2.2x for this pool; see bench/encode.py.)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

from sft.data.encoding import EncodeCounts, EncodeSettings, encode_rows
from sft.data.sources import RowSource, check_keys, open_source, reset_stop_signals
from sft.data.templates import ChatTemplate
from sft.errors import DataError

CHUNK_ROWS = 2048  # rows per unit of work handed to a worker; small enough for a smooth progress bar
BATCH_ROWS = 512  # rows per batched tokenizer call
IN_FLIGHT_PER_WORKER = 2  # chunks queued or being encoded per worker: keeps workers busy, bounds memory
SHARD_BYTES = 500 << 20  # an output file is closed past this size (save_to_disk's default shard size)
SHARDS_FILE = "shards.json"  # an encoded folder's list of Arrow files, in order, with their row counts
SHARDS_FORMAT = "sft-encoded-arrow"


@dataclass
class SplitResult:
    """An encoded split: the kept samples (memory-mapped from ``folder``), the report, the rejected rows' file."""

    dataset: "datasets.Dataset"  # columns input_ids, labels, length, source
    report: dict
    folder: str  # the encoded folder holding the dataset (read it with load_encoded)
    rejects_path: Optional[str]  # JSONL of {"source", "reason", "row"}; None when no row was rejected
    rejected: int


@dataclass(frozen=True)
class Chunk:
    """Rows [start, end) of the split's source number ``source``."""

    source: int
    start: int
    end: int


def output_features():
    """The encoded columns as datasets Features (their Arrow schema carries them, as save_to_disk's files do)."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("length", pa.int32()), ("source", pa.string())])
    return datasets.Features.from_arrow_schema(schema)


def _encode_chunk(state: dict, chunk: Chunk):
    """Read and encode one chunk into (Arrow table, counts, rejects), in the main process or a worker."""
    import pyarrow as pa

    rows = state["sources"][chunk.source].read(chunk.start, chunk.end)
    tables, counts, rejects = [], EncodeCounts(), []
    for batch_start in range(0, len(rows), BATCH_ROWS):
        encoded = encode_rows(rows[batch_start:batch_start + BATCH_ROWS], state["template"], state["backend"],
                              state["settings"])
        tables.append(_to_arrow(encoded.columns, state["schema"]))
        counts.merge(encoded.counts)
        rejects += encoded.rejects
    table = pa.concat_tables(tables) if tables else state["schema"].empty_table()
    return table, counts, rejects


def _list_array(lists: list[list[int]]):
    """A list<int32> Arrow array from Python lists, through numpy: several times faster than pa.array on lists."""
    import itertools

    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lists) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, lists), np.int64, len(lists)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _to_arrow(columns: dict[str, list], schema):
    import pyarrow as pa

    return pa.Table.from_arrays([_list_array(columns["input_ids"]), _list_array(columns["labels"]),
                                 pa.array(columns["length"], pa.int32()), pa.array(columns["source"], pa.string())],
                                schema=schema)


_WORKER_STATE: dict = {}


def _init_worker(state: dict) -> None:
    # With the fork start method the state is inherited, not pickled: neither the tokenizer nor the sources
    # (open memory maps) are copied per task.
    reset_stop_signals()
    _WORKER_STATE.update(state)


def _encode_chunk_in_worker(chunk: Chunk):
    import pyarrow as pa

    table, counts, rejects = _encode_chunk(_WORKER_STATE, chunk)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue(), counts, rejects


def _encoded_in_order(state: dict, chunks: list[Chunk], workers: int) -> Iterator[tuple]:
    """(table, counts, rejects) of every chunk, in order; with workers > 1 from a fork pool, a bounded window ahead."""
    if workers == 1:
        for chunk in chunks:
            yield _encode_chunk(state, chunk)
        return
    import multiprocessing

    import pyarrow as pa

    # One tokenizer thread per worker: Rust threads inside every worker would only fight for cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(state,))
    try:
        pending: deque = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.apply_async(_encode_chunk_in_worker, (chunk,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                break
        while pending:
            payload, counts, rejects = pending.popleft().get()
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append(pool.apply_async(_encode_chunk_in_worker, (chunk,)))
            yield pa.ipc.open_stream(payload).read_all(), counts, rejects
    finally:
        pool.terminate()
        pool.join()


class DatasetFolderWriter:
    """Appends tables, in order, to Arrow stream files ``data-NNNNN-of-NNNNN.arrow`` in ``folder`` and, on
    ``finish``, lists them in ``shards.json`` (ours: file names and row counts), for ``load_encoded``.

    Every file carries the columns' datasets Features in its schema (``Features.arrow_schema``), so
    ``datasets.Dataset.from_file`` gives each one back with its features, memory-mapped.
    """

    def __init__(self, folder: str, features, shard_bytes: int = SHARD_BYTES):
        self.folder, self.features, self.shard_bytes = folder, features, shard_bytes
        self.schema = features.arrow_schema
        self._parts: list[str] = []
        self._rows: list[int] = []
        self._sink = self._writer = None
        self._written = 0
        os.makedirs(folder, exist_ok=True)

    def write(self, table) -> None:
        if self._writer is None or self._written >= self.shard_bytes:
            self._close_part()
            self._parts.append(os.path.join(self.folder, f"data-{len(self._parts):05d}.arrow.part"))
            self._rows.append(0)
            import pyarrow as pa

            self._sink = pa.OSFile(self._parts[-1], "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
            self._written = 0
        self._writer.write_table(table.replace_schema_metadata(self.schema.metadata))
        self._written += table.nbytes
        self._rows[-1] += table.num_rows

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def finish(self) -> list[str]:
        """Close the files, name them data-NNNNN-of-NNNNN.arrow and list them, in order, in shards.json."""
        if not self._parts:
            self.write(self.schema.empty_table())
        self._close_part()
        count = len(self._parts)
        names = [f"data-{index:05d}-of-{count:05d}.arrow" for index in range(count)]
        for part, name in zip(self._parts, names):
            os.replace(part, os.path.join(self.folder, name))
        listing = {"format": SHARDS_FORMAT, "version": 1, "rows": sum(self._rows),
                   "files": [{"name": name, "rows": rows} for name, rows in zip(names, self._rows)]}
        with open(os.path.join(self.folder, SHARDS_FILE), "w", encoding="utf-8") as handle:
            json.dump(listing, handle, indent=2)
        return names


def load_encoded(folder: str) -> "datasets.Dataset":
    """The dataset in an encoded folder, memory-mapped: ours (``shards.json``) through ``Dataset.from_file`` per
    Arrow file and ``concatenate_datasets``; any other folder (written by ``Dataset.save_to_disk``: scripts/pack.py's
    output) through ``datasets.load_from_disk``. Raises DataError for a folder that does not hold what it lists."""
    import datasets

    listing_path = os.path.join(folder, SHARDS_FILE)
    if not os.path.isfile(listing_path):
        return datasets.load_from_disk(folder)
    try:
        with open(listing_path, encoding="utf-8") as handle:
            listing = json.load(handle)
        names, rows = [entry["name"] for entry in listing["files"]], listing["rows"]
        known = listing["format"] == SHARDS_FORMAT and names
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{listing_path}: unreadable ({error}); encode the data again") from None
    if not known:
        raise DataError(f"{listing_path}: not a list of encoded Arrow files written by scripts/encode.py")
    missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"{folder}: {', '.join(missing)} listed in {SHARDS_FILE} is missing; encode the data again")
    parts = [datasets.Dataset.from_file(os.path.join(folder, name)) for name in names]
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) != rows:
        raise DataError(f"{folder}: its Arrow files hold {len(dataset)} rows, {SHARDS_FILE} lists {rows}; "
                        "encode the data again")
    return dataset


class RejectsWriter:
    """Rejected rows, one JSON line each, written as they come; the file is created on the first one."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._handle = None

    def write(self, rejects: list[dict]) -> None:
        if rejects and self._handle is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._handle = open(self.path, "w", encoding="utf-8")
        for reject in rejects:
            self._handle.write(json.dumps(reject, ensure_ascii=False) + "\n")
        self.count += len(rejects)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _temporary_folder() -> str:
    """A folder for a split encoded without an out_dir (tests, benchmarks), removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="sft-encoded-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def encode_split(files: list[str], template: ChatTemplate, tokenizer, settings: EncodeSettings,
                 num_workers: int = 1, desc: str = "Encoding", out_dir: Optional[str] = None,
                 rejects_path: Optional[str] = None, work_dir: Optional[str] = None) -> SplitResult:
    """Read, map, render and tokenize every row of the sources ``files`` with ``num_workers`` processes.

    Writes the dataset to ``out_dir`` (Arrow files that ``load_encoded`` reads; default a temporary folder) and
    rejected rows to ``rejects_path`` (default beside it). JSON/JSONL inputs are scanned into ``work_dir``
    (default: the system's temporary folder), removed at the end. Raises DataError/EncodeError naming the source
    and row.
    """
    import numpy as np
    from tqdm.auto import tqdm

    if out_dir is None:
        base = _temporary_folder()
        out_dir, rejects_path = os.path.join(base, "dataset"), rejects_path or os.path.join(base, "rejects.jsonl")
    rejects_path = rejects_path or f"{out_dir.rstrip(os.sep)}-rejects.jsonl"
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    scan_dir = tempfile.mkdtemp(prefix=".sft-rows-", dir=work_dir)
    sources: list[RowSource] = []
    rejects = RejectsWriter(rejects_path)
    try:
        for spec in files:
            sources.append(open_source(spec, scan_dir))
            source = sources[-1]
            check_keys(source.name, source.first_values(), settings.mapping)
        chunks = [Chunk(index, start, min(len(source), start + CHUNK_ROWS))
                  for index, source in enumerate(sources) for start in range(0, len(source), CHUNK_ROWS)]
        count = sum(len(source) for source in sources)
        features = output_features()
        state = {"sources": sources, "template": template, "backend": tokenizer.backend_tokenizer,
                 "settings": settings, "schema": features.arrow_schema}
        workers = max(1, min(num_workers, len(chunks)))
        writer = DatasetFolderWriter(out_dir, features)
        counts, lengths = EncodeCounts(), []
        results = _encoded_in_order(state, chunks, workers)
        with tqdm(total=count, desc=desc, unit=" rows", disable=count == 0) as progress, contextlib.closing(results):
            for chunk, (table, chunk_counts, chunk_rejects) in zip(chunks, results):
                writer.write(table)
                lengths.append(table.column("length").to_numpy().astype(np.int32))
                counts.merge(chunk_counts)
                rejects.write(chunk_rejects)
                progress.update(chunk.end - chunk.start)
        writer.finish()
    finally:
        rejects.close()
        for source in sources:
            source.close()
        shutil.rmtree(scan_dir, ignore_errors=True)
    dataset = load_encoded(out_dir)
    lengths_array = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    return SplitResult(dataset, counts.report(lengths_array), out_dir,
                       rejects_path if rejects.count else None, rejects.count)
