"""Where rows come from: input files and datasets, read into ``SourceRow`` records. No tokenizer, no processes.

Every entry of ``data_args.file_name`` is a *source spec*, opened by ``open_source`` into a ``RowSource``:

    rows.json / rows.jsonl        our own streamed reader (exact row and line numbers in errors, any row shape)
    rows.parquet                  datasets.load_dataset("parquet", ...), memory-mapped and cached
    folder written by save_to_disk  datasets.load_from_disk (a DatasetDict folder: pick the split with ?split=)
    any other folder, or org/name datasets.load_dataset, with ?config=NAME&split=NAME (split default train)

A ``RowSource`` has a length, reads any range of rows (also inside forked worker processes, which inherit
it), and has a content fingerprint for the encode cache. Nothing holds a whole input in memory: JSON and
JSONL files are scanned once, in blocks, into an Arrow file of row texts; that file and datasets' Arrow
files are memory-mapped, and after every read the pages touched are handed back to the kernel
(``madvise(DONTNEED)``): a mapped page counts in a process's resident memory for as long as it stays
mapped, so a reader that kept them would grow with the data it has read.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from sft.data import FieldMapping
from sft.errors import DataError
from sft.specs import SourceSpec, parse_spec
from sft.files import file_digest

BLOCK_BYTES = 8 << 20  # bytes read at a time from a .json array
RAW_BATCH_ROWS = 4096  # row texts per Arrow record batch of a scanned JSON/JSONL file
RAW_BATCH_CHARS = 16 << 20  # ... or fewer when the rows are long (an Arrow string array holds at most 2 GiB)
KEY_CHECK_ROWS = 1000  # rows whose keys check_keys looks at


@dataclass(frozen=True)
class SourceRow:
    """One input row on its way to the encoder.

    ``source`` is its stable id (written to the encoded ``source`` column and the rejects file),
    ``where`` is how an error names it (``data.jsonl line 7``), ``value`` the parsed row, or None when
    the row is malformed, in which case ``error`` says why.
    """

    source: str
    where: str
    value: Optional[dict]
    error: Optional[str] = None
    text: Optional[str] = None  # the row as read, for the rejects file; None: json.dumps(value)

    def raw_text(self) -> str:
        return self.text if self.text is not None else json.dumps(self.value, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class RawRow:
    """One record of a JSON/JSONL file, kept as its JSON text so that any shape fits one Arrow column."""

    row: int  # 1-based position in the file
    line: int  # 1-based line where the record starts
    text: str


# ----- sources -----------------------------------------------------------------------------------

class RowSource:
    """Rows of one input, by position. Built in the main process, read from any process forked after it."""

    name: str  # how errors name the whole source
    spec: str  # the file_name entry; row ids are f"{spec}:{row}"

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, end: int) -> list[SourceRow]:
        """Rows [start, end) (0-based), in order, malformed ones as SourceRow(value=None, error=reason)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of the content (never of a path or a timestamp alone), for the encode cache key."""
        raise NotImplementedError

    def first_values(self, limit: int = KEY_CHECK_ROWS) -> list[dict]:
        """The parsed values of the first ``limit`` rows (malformed rows left out), for check_keys."""
        return [row.value for row in self.read(0, min(limit, len(self))) if row.value is not None]

    def close(self) -> None:
        pass

    def __enter__(self) -> "RowSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(text: str, work_dir: Optional[str] = None) -> RowSource:
    """The RowSource for one file_name entry. JSON/JSONL files are scanned into ``work_dir`` (default: a
    temporary folder removed on close) on first use, so that ``fingerprint`` alone costs one hash of the file."""
    spec = parse_spec(text)
    if spec.kind in ("json", "jsonl"):
        return JsonRowSource(spec.path, work_dir)
    return DatasetSource(spec)


def source_fingerprint(text: str) -> str:
    with open_source(text) as source:
        return source.fingerprint()


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes, with its name (for the encode cache key)."""
    return f"{os.path.basename(path)}:{file_digest(path)}"


class MappedArrowFiles:
    """The rows of Arrow IPC stream files, memory-mapped once and read by slices in any (forked) process.

    Each read hands the touched pages back (madvise DONTNEED): the data stays in the page cache, shared,
    but stops counting in this process's memory, which therefore does not grow with the rows read.
    """

    def __init__(self, paths: list[str], columns: Optional[list[str]] = None):
        import pyarrow as pa

        self._maps: list[mmap.mmap] = []
        self._tables = []
        for path in paths:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mapped)
            # Zero-copy: the table's buffers point into the mapping.
            table = pa.ipc.open_stream(pa.py_buffer(mapped)).read_all()
            self._tables.append(table.select(columns) if columns is not None else table)
        self.column_names = self._tables[0].column_names if self._tables else []
        self._starts = [0]
        for table in self._tables:
            self._starts.append(self._starts[-1] + table.num_rows)
        self.release()

    def __len__(self) -> int:
        return self._starts[-1]

    def to_pylist(self, start: int, end: int) -> list[dict]:
        """Rows [start, end) as dicts, then the pages they were read from are released."""
        rows: list[dict] = []
        for index, table in enumerate(self._tables):
            first, last = max(start, self._starts[index]), min(end, self._starts[index + 1])
            if first < last:
                rows += table.slice(first - self._starts[index], last - first).to_pylist()
        self.release()
        return rows

    def release(self) -> None:
        for mapped in self._maps:
            if hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._tables = []
        for mapped in self._maps:
            try:
                mapped.close()
            except BufferError:  # a slice handed out still points into it; the mapping goes with it
                pass
        self._maps = []


class JsonRowSource(RowSource):
    """A .json array of row objects or a .jsonl file, scanned once into an Arrow file of (row, line, text).

    Rows are parsed (json.loads) only when read, by the process that reads them. A JSONL line that is not
    a JSON object becomes a malformed row (rejected, or an error, by the on_bad_sample policy); a syntax
    error in a .json array stops the scan with a DataError, since nothing after it can be trusted.
    """

    def __init__(self, path: str, work_dir: Optional[str] = None, block_bytes: int = BLOCK_BYTES):
        self.name = self.spec = path
        self.path = path
        self.jsonl = path.endswith(".jsonl")
        self._work_dir = work_dir
        self._own_dir: Optional[str] = None
        self._block_bytes = block_bytes
        self._rows: Optional[MappedArrowFiles] = None
        self._arrow_path: Optional[str] = None

    def _scanned(self) -> MappedArrowFiles:
        if self._rows is None:
            if self._work_dir is None:
                self._own_dir = self._work_dir = tempfile.mkdtemp(prefix="sft-rows-")
            os.makedirs(self._work_dir, exist_ok=True)
            handle, arrow_path = tempfile.mkstemp(prefix=os.path.basename(self.path) + "-", suffix=".arrow",
                                                  dir=self._work_dir)
            os.close(handle)
            self._arrow_path = arrow_path
            records = iter_jsonl(self.path) if self.jsonl else iter_json_array(self.path, self._block_bytes)
            write_raw_rows(records, arrow_path)
            self._rows = MappedArrowFiles([arrow_path])
        return self._rows

    def __len__(self) -> int:
        return len(self._scanned())

    def read(self, start: int, end: int) -> list[SourceRow]:
        rows = []
        for record in self._scanned().to_pylist(start, end):
            row, line, text = record["row"], record["line"], record["text"]
            where = f"{self.path} line {line}" if self.jsonl else f"{self.path} row {row} (line {line})"
            source = f"{self.path}:{row}"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:  # only JSONL lines get here: the array scan checked its rows
                rows.append(SourceRow(source, where, None, f"malformed JSON: {error.msg} (column {error.colno})", text))
                continue
            if not isinstance(value, dict):
                rows.append(SourceRow(source, where, None, f"the record is a JSON {type(value).__name__}, expected an object", text))
                continue
            rows.append(SourceRow(source, where, value, None, text))
        return rows

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
            self._rows = None
        if self._arrow_path is not None:
            try:
                os.remove(self._arrow_path)
            except FileNotFoundError:
                pass
            self._arrow_path = None
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = self._work_dir = None


class DatasetSource(RowSource):
    """A Parquet file, a save_to_disk folder, a dataset folder or a Hub dataset, through HF datasets.

    datasets keeps the rows in Arrow files (its cache, or the saved folder); those are read directly,
    memory-mapped, as MappedArrowFiles. Rows come as plain dicts: a Parquet struct column gives every
    message every key, None where a row lacked it, which the mapping reads as absent.
    """

    def __init__(self, spec: SourceSpec):
        self.spec = spec.text
        self._spec = spec
        self._rows: Optional[MappedArrowFiles] = None
        self._dataset = None  # kept only when its rows are not plainly its Arrow files (see _loaded)
        self._cache_files: list[str] = []
        split = spec.split or "train"
        single = spec.kind == "saved" and not os.path.isfile(os.path.join(spec.path, "dataset_dict.json"))
        if spec.kind == "parquet" or single:
            self.name = spec.path
        elif spec.config is not None:
            self.name = f"{spec.path} (config {spec.config}, split {split})"
        else:
            self.name = f"{spec.path} (split {split})"

    def _loaded(self):
        if self._rows is None and self._dataset is None:
            if self._spec.kind in ("parquet", "folder", "hub"):
                _prepare_in_child(self._spec)
            dataset = load_dataset_for(self._spec)
            self._cache_files = [entry["filename"] for entry in dataset.cache_files]
            rows = None
            # Read the Arrow files directly when the dataset is exactly their rows, in order (what load_dataset
            # and load_from_disk give); otherwise (an indices mapping, in-memory data) go through datasets.
            if self._cache_files and dataset._indices is None:
                try:
                    rows = MappedArrowFiles(self._cache_files, dataset.column_names)
                except (KeyError, ValueError, OSError):
                    rows = None
                if rows is not None and len(rows) != len(dataset):
                    rows.close()
                    rows = None
            if rows is None:
                self._dataset = dataset.with_format("arrow")
            self._rows = rows
        return self._rows if self._rows is not None else self._dataset

    def __len__(self) -> int:
        return len(self._loaded())

    def read(self, start: int, end: int) -> list[SourceRow]:
        data = self._loaded()
        values = data.to_pylist(start, end) if isinstance(data, MappedArrowFiles) else data[start:end].to_pylist()
        return [SourceRow(f"{self.spec}:{start + offset + 1}", f"{self.name} row {start + offset + 1}", value)
                for offset, value in enumerate(values)]

    def fingerprint(self) -> str:
        if self._spec.kind == "parquet":
            return file_fingerprint(self._spec.path)
        self._loaded()
        digest = hashlib.sha256(self.name.encode())
        for path in self._cache_files:
            digest.update(file_digest(path).encode())
        if not self._cache_files:  # an in-memory dataset: hash its rows
            for start in range(0, len(self), 10_000):
                digest.update(json.dumps(self._dataset[start:start + 10_000].to_pylist(), default=str).encode())
        return f"{self.spec}:{digest.hexdigest()}"

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
        self._rows = self._dataset = None


def load_dataset_for(spec: SourceSpec):
    """The datasets.Dataset of a non-JSON spec; every failure a DataError naming the spec and what to change."""
    import datasets

    split = spec.split or "train"
    try:
        if spec.kind == "parquet":
            return datasets.load_dataset("parquet", data_files=spec.path, split="train")
        if spec.kind == "saved":
            if spec.config is not None:
                raise DataError(f"{spec.text}: a save_to_disk folder has no configs; drop ?config=")
            loaded = datasets.load_from_disk(spec.path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{spec.text}: no split '{split}'; the folder has splits: {', '.join(loaded)} "
                                    f"(choose one with ?split=NAME)")
                return loaded[split]
            if spec.split is not None:
                raise DataError(f"{spec.text}: the folder holds one dataset, not splits; drop ?split=")
            return loaded
        return datasets.load_dataset(spec.path, name=spec.config, split=split)
    except DataError:
        raise
    except ValueError as error:  # datasets says "Unknown split", "BuilderConfig not found", "Config name is missing"
        explained = _explain_choice(spec, split) if spec.kind in ("folder", "hub") else None
        raise DataError(explained or f"{spec.text}: {_first_line(error)}") from None
    except ConnectionError as error:
        raise DataError(f"{spec.text}: cannot reach the Hub for dataset '{spec.path}' ({_first_line(error)}); "
                        "give a local file or folder, or run where the Hub is reachable") from None
    except Exception as error:  # DatasetNotFoundError, FileNotFoundError, an unreadable Parquet file, ...
        raise DataError(f"{spec.text}: cannot load dataset '{spec.path}': {type(error).__name__}: {_first_line(error)}") from None


def _prepare(spec: SourceSpec) -> None:
    load_dataset_for(spec)


def _prepare_in_child(spec: SourceSpec) -> None:
    """Let datasets build its Arrow cache (from Parquet or Hub files, the first time) in a child process.

    The conversion reads a whole Parquet row group at a time and the allocator keeps that memory after it
    is freed; done in a child, it goes away with the child instead of staying in the encoder (and being
    shared into every worker). Loading from the cache afterwards costs next to nothing.
    """
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1, initializer=reset_stop_signals) as pool:
        pool.apply(_prepare, (spec,))


def reset_stop_signals() -> None:
    """In a forked worker: SIGTERM and SIGINT back to their defaults. Handlers are inherited through fork, and
    a caller's handler that only records the signal (a training loop that saves on SIGTERM) would keep
    Pool.terminate from ending the worker: the pool would wait for it forever."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _explain_choice(spec: SourceSpec, split: str) -> Optional[str]:
    """For a wrong or missing ?config= / ?split=, the message listing the ones the dataset has (None: not that)."""
    import datasets

    try:
        configs = datasets.get_dataset_config_names(spec.path)
        if spec.config is None and len(configs) > 1 and "default" not in configs:
            return f"{spec.text}: the dataset has several configs; choose one with ?config=NAME: {', '.join(configs)}"
        if spec.config is not None and spec.config not in configs:
            return f"{spec.text}: no config '{spec.config}'; the dataset has configs: {', '.join(configs)}"
        splits = datasets.get_dataset_split_names(spec.path, spec.config)
    except Exception:
        return None
    if split.split("[")[0] not in splits:
        return f"{spec.text}: no split '{split}'; the dataset has splits: {', '.join(splits)} (choose one with ?split=NAME)"
    return None


# ----- scanning JSON and JSONL files ---------------------------------------------------------------

def iter_jsonl(path: str) -> Iterator[RawRow]:
    """Every non-blank line of a .jsonl file, unparsed, one line in memory at a time."""
    row = 0
    with _open_binary(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {line_number}: not UTF-8 text ({error.reason} at byte {error.start} "
                                "of the line)") from None
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                row += 1
                yield RawRow(row, line_number, line)


class _TextWindow:
    """A sliding window on a UTF-8 file's text: refilled in blocks, read text dropped, line numbers kept."""

    def __init__(self, path: str, handle, block_bytes: int):
        self.path, self.handle, self.block_bytes = path, handle, block_bytes
        self.text = ""
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes_read = 0
        self._first_line = 1  # line number of text[0]
        self._first_column = 0  # characters before text[0] on its line
        self._counted_to, self._counted_line = 0, 1  # line_of's running count (positions only move forward)

    def fill(self) -> bool:
        """Append the next block; False at the end of the file."""
        if self.eof:
            return False
        data = self.handle.read(self.block_bytes)
        pending = len(self._decoder.getstate()[0])
        try:
            self.text += self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as error:
            raise DataError(f"{self.path}: not UTF-8 text ({error.reason} at byte "
                            f"{self._bytes_read - pending + error.start})") from None
        self._bytes_read += len(data)
        self.eof = not data
        return bool(data)

    def skip_whitespace(self, index: int) -> int:
        """The first index at or after ``index`` that is not whitespace (refilling as needed); len(text) at the end."""
        while True:
            index = _WHITESPACE.match(self.text, index).end()
            if index < len(self.text) or not self.fill():
                return index

    def line_of(self, index: int) -> int:
        if index < self._counted_to:
            self._counted_to, self._counted_line = 0, self._first_line
        self._counted_line += self.text.count("\n", self._counted_to, index)
        self._counted_to = index
        return self._counted_line

    def column_of(self, index: int) -> int:
        newline = self.text.rfind("\n", 0, index)
        return index - newline if newline >= 0 else self._first_column + index + 1

    def drop(self, index: int) -> None:
        """Forget text[:index] (already read), keeping line and column numbers right."""
        line = self.line_of(index)
        newline = self.text.rfind("\n", 0, index)
        self._first_column = index - newline - 1 if newline >= 0 else self._first_column + index
        self._first_line = line
        self.text = self.text[index:]
        self._counted_to, self._counted_line = 0, line


_WHITESPACE = re.compile("[ \t\n\r\ufeff]*")


def iter_json_array(path: str, block_bytes: int = BLOCK_BYTES) -> Iterator[RawRow]:
    """The records of a .json array of row objects, each with its row number, first line and exact text.

    The file is decoded in blocks of ``block_bytes`` into a window that holds the rows not yet read, so
    memory is one block plus the longest row. Syntax errors raise DataError naming line and column.
    """
    decoder = json.JSONDecoder()
    with _open_binary(path) as handle:
        window = _TextWindow(path, handle, block_bytes)
        position = window.skip_whitespace(0)
        if position == len(window.text):
            raise DataError(f"{path}: the file is empty; expected a JSON array of row objects")
        if window.text[position] != "[":
            hint = " (one object per line? name the file .jsonl)" if window.text[position] == "{" else ""
            raise DataError(f"{path} line {window.line_of(position)}: expected a JSON array of row objects{hint}")
        position = window.skip_whitespace(position + 1)
        row = 0
        if position < len(window.text) and window.text[position] == "]":
            _check_nothing_after(window, position)
            return
        while True:
            row += 1
            if position > block_bytes:
                window.drop(position)
                position = 0
            start_line = window.line_of(position)
            value, end = _decode_value(window, decoder, position, row)
            if not isinstance(value, dict):
                raise DataError(f"{path} row {row} (line {start_line}): the record is a JSON {type(value).__name__}, "
                                "expected an object")
            yield RawRow(row, start_line, window.text[position:end])
            position = window.skip_whitespace(end)
            if position < len(window.text) and window.text[position] == ",":
                position = window.skip_whitespace(position + 1)
                continue
            if position < len(window.text) and window.text[position] == "]":
                _check_nothing_after(window, position)
                return
            raise DataError(f"{path} line {window.line_of(position)}: malformed JSON after row {row}: expected ',' or ']'")


def _decode_value(window: _TextWindow, decoder: json.JSONDecoder, position: int, row: int):
    """One JSON value at ``position``, refilling the window while the value may run past its end."""
    while True:
        try:
            value, end = decoder.raw_decode(window.text, position)
        except json.JSONDecodeError as error:
            # A value cut by the window's end fails either as an unterminated string or within a few
            # characters of the end (a cut literal, number or escape); anything else is a real syntax error.
            cut = error.msg.startswith("Unterminated string") or error.pos >= len(window.text) - 16
            if cut and window.fill():
                continue
            raise DataError(f"{window.path} line {window.line_of(error.pos)} column {window.column_of(error.pos)}: "
                            f"malformed JSON in row {row}: {error.msg}") from None
        if end < len(window.text) or not window.fill():  # a number at the very end may go on in the next block
            return value, end


def _check_nothing_after(window: _TextWindow, position: int) -> None:
    after = window.skip_whitespace(position + 1)
    if after != len(window.text):
        raise DataError(f"{window.path} line {window.line_of(after)}: unexpected text after the closing ']'")


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None


def write_raw_rows(records: Iterable[RawRow], arrow_path: str) -> int:
    """Write (row, line, text) records to an Arrow IPC stream file, a batch at a time. Returns the row count."""
    import pyarrow as pa

    schema = pa.schema([("row", pa.int64()), ("line", pa.int64()), ("text", pa.string())])
    count = 0
    with pa.OSFile(arrow_path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        rows: list[int] = []
        lines: list[int] = []
        texts: list[str] = []
        chars = 0

        def flush() -> None:
            nonlocal chars
            writer.write_batch(pa.record_batch([pa.array(rows, pa.int64()), pa.array(lines, pa.int64()),
                                                pa.array(texts, pa.string())], schema=schema))
            rows.clear(), lines.clear(), texts.clear()
            chars = 0

        for record in records:
            rows.append(record.row)
            lines.append(record.line)
            texts.append(record.text)
            chars += len(record.text)
            count += 1
            if len(rows) >= RAW_BATCH_ROWS or chars >= RAW_BATCH_CHARS:
                flush()
        if rows:
            flush()
    return count


def read_all(path: str) -> list[SourceRow]:
    """Every row of one source, in memory: for tests and small tools, never for the encode path."""
    with open_source(path) as source:
        return source.read(0, len(source))


# ----- checks ------------------------------------------------------------------------------------

def check_keys(name: str, values: list[dict], mapping: FieldMapping) -> None:
    """Fail early, listing the keys the rows have, when none of ``values`` (the first rows) has a key the mapping needs."""
    if not values:
        return
    seen: set[str] = set()
    for value in values:
        seen.update(value.keys())
    for key, field_name in mapping.required_keys().items():
        if key not in seen:
            have = ", ".join(sorted(seen)) or "(none)"
            hint = " (or null if the data has no such column)" if field_name == "query_key" else ""
            raise DataError(
                f"{name}: no row has the key '{key}' named by {field_name}; the rows have keys: {have}. "
                f"Set {field_name} to one of them{hint}."
            )
