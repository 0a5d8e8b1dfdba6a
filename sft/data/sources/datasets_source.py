"""Parquet files, save_to_disk folders, dataset folders and Hub ids, through ``datasets``: loaded (and
converted, in a child process, on first use), then read from their memory-mapped Arrow files. A local folder of
JSON/JSONL files is not handed to datasets' JSON builder (it turns a column whose type varies from row to row into
JSON strings, and fails on files with different columns): its files, found by datasets' own data-file rules, are
read one by one with our JSON reader (``open_folder``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Callable, Iterator, Optional

from sft.config.specs import SourceSpec
from sft.data.sources.arrow import MappedArrowFiles
from sft.data.sources.json_files import JsonRowSource
from sft.data.sources.rows import ConcatenatedSource, RowSource, SourceRow, file_fingerprint
from sft.errors import DataError
from sft.files import file_digest

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")  # what datasets' JSON builder reads uncompressed


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
        self._decode: Optional[Callable[[dict], dict]] = None  # for columns datasets stores encoded (Json)
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
            self._decode = row_decoder(dataset.features, self.name)
            self._cache_files = [entry["filename"] for entry in dataset.cache_files]
            rows = None
            # Read the Arrow files directly when the dataset is exactly their rows, in order (what load_dataset
            # and load_from_disk give): checked through the public API, by the row count and a few rows read both
            # ways. Otherwise (a slice, an indices mapping, in-memory data) the rows go through datasets.
            if self._cache_files:
                try:
                    rows = MappedArrowFiles(self._cache_files, dataset.column_names)
                except (KeyError, ValueError, OSError):
                    rows = None
                if rows is not None and not _same_rows(rows, dataset):
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
        if self._decode is not None:
            values = [self._decode(value) for value in values]
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
    with _datasets_errors(spec, split):
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


@contextlib.contextmanager
def _datasets_errors(spec: SourceSpec, split: str) -> Iterator[None]:
    """Turns what datasets raises into one DataError line naming the spec and the reason."""
    try:
        yield
    except DataError:
        raise
    except ValueError as error:  # datasets says "Unknown split", "BuilderConfig not found", "Config name is missing"
        explained = _explain_choice(spec, split) if spec.kind in ("folder", "hub") else None
        raise DataError(explained or f"{spec.text}: {_first_line(error)}") from None
    except ConnectionError as error:
        raise DataError(f"{spec.text}: cannot reach the Hub for dataset '{spec.path}' ({_first_line(error)}); "
                        "give a local file or folder, or run where the Hub is reachable") from None
    except Exception as error:  # DatasetNotFoundError, FileNotFoundError, an unreadable file, DatasetGenerationError
        raise DataError(f"{spec.text}: cannot load dataset '{spec.path}': {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """The reason of a datasets error in one line: a generation error's first line says nothing, its cause (or the
    rest of its message) does."""
    while error.__cause__ is not None:
        error = error.__cause__
    if type(error).__name__ == "CastError" and callable(getattr(error, "details", None)):
        try:  # which columns differ
            return (f"the data files do not all have the same columns ({error.details()}); give each file as its "
                    "own file_name entry")
        except Exception:
            pass
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "generating data using" in str(error):  # DatasetGenerationCastError: why, then the file it was reading
        file = str(error).split("generating data using", 1)[1].strip().splitlines()[0]
        why = next((line for line in lines if line.startswith("All the data files")), lines[0])
        return f"{file}: {why}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def row_decoder(features, name: str) -> Optional[Callable[[dict], dict]]:
    """How to turn a row read from datasets' Arrow files into the row itself: None when the stored values are the
    values; ``features.decode_example`` when a column is a ``Json`` feature (stored as JSON text: what datasets'
    JSON builder makes of a column whose type varies from row to row). A column of media (Image, Audio, ...) is
    not a text row: DataError naming it."""
    import datasets

    plain = (datasets.Value, datasets.ClassLabel, datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)
    needs_decoding = False

    def walk(feature, column: str) -> None:
        nonlocal needs_decoding
        if isinstance(feature, dict):
            for inner in feature.values():
                walk(inner, column)
        elif isinstance(feature, (list, tuple)):
            for inner in feature:
                walk(inner, column)
        elif isinstance(feature, (datasets.List, datasets.LargeList)):
            walk(feature.feature, column)
        elif isinstance(feature, datasets.Json):
            needs_decoding = True
        elif not isinstance(feature, plain):
            raise DataError(f"{name}: column '{column}' holds {type(feature).__name__} data, which cannot be read as "
                            "rows of text; give a dataset of text rows (or map the column out first)")

    for column, feature in features.items():
        walk(feature, column)
    return features.decode_example if needs_decoding else None


def _same_rows(rows: MappedArrowFiles, dataset) -> bool:
    """Whether ``rows`` (the dataset's Arrow files, read directly) are the dataset's rows in order: the same count
    and the same first, middle and last rows as the dataset itself gives."""
    count = len(dataset)
    if len(rows) != count:
        return False
    arrow = dataset.with_format("arrow")
    for index in sorted({0, count // 2, count - 1}) if count else ():
        if rows.to_pylist(index, index + 1) != arrow[index:index + 1].to_pylist():
            return False
    return True


def open_folder(spec: SourceSpec, work_dir: Optional[str] = None) -> RowSource:
    """A local dataset folder (not a save_to_disk one): the data files of the split, found by datasets' own rules
    (``load_dataset_builder``, which reads no data). JSON/JSONL files are read one by one with our JSON reader,
    every row named by its file and line, whatever its shape; other formats come through ``DatasetSource``
    (``load_dataset``), Parquet files checked first to have the same columns."""
    import datasets

    split = spec.split or "train"
    with _datasets_errors(spec, split):
        builder = datasets.load_dataset_builder(spec.path, name=spec.config)
    files = {str(name): list(paths) for name, paths in (builder.config.data_files or {}).items()}
    if builder.name != "json":
        if builder.name == "parquet" and split in files:
            _check_same_columns(spec, files[split])
        return DatasetSource(spec)
    if split not in files:
        explained = f"no split '{split}'; the dataset has splits: {', '.join(files)} (choose one with ?split=NAME)"
        if "[" in split:
            explained = "a slice of a split is not read from a folder of JSON files; give the whole split"
        raise DataError(f"{spec.text}: {explained}")
    if getattr(builder.config, "field", None) is not None:
        raise DataError(f"{spec.text}: the folder's config reads the rows from the JSON field "
                        f"'{builder.config.field}' of each file, which is not supported; give the rows as a JSON array "
                        "or as JSON Lines")
    name = f"{spec.path} (split {split})"
    if spec.config is not None:
        name = f"{spec.path} (config {spec.config}, split {split})"
    return ConcatenatedSource(spec.text, name, [_json_file(spec.path, path, work_dir) for path in files[split]])


def _json_file(folder: str, path: str, work_dir: Optional[str]) -> JsonRowSource:
    """One data file of a JSON folder, named from the folder as it was given (``data/chat/part-1.jsonl``)."""
    root = os.path.abspath(folder)
    if path.startswith(root + os.sep):
        path = os.path.join(folder, os.path.relpath(path, root))
    if not path.lower().endswith(JSON_SUFFIXES):
        raise DataError(f"{path}: only plain .json and .jsonl files are read from a dataset folder "
                        "(decompress it, or convert it to JSON Lines)")
    source = JsonRowSource(path, work_dir)
    # datasets reads a .json file of one object per line as JSON Lines; so does this reader
    source.jsonl = not path.lower().endswith(".json") or _starts_with_object(path)
    return source


def _starts_with_object(path: str) -> bool:
    """Whether the file's first character that is not whitespace (or a byte order mark) is '{'."""
    try:
        with open(path, "rb") as handle:
            while True:
                block = handle.read(1 << 16)
                if not block:
                    return False
                text = block.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
                if text:
                    return text.startswith(b"{")
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None


def _check_same_columns(spec: SourceSpec, paths: list[str]) -> None:
    """datasets reads the Parquet files of a split as one table: files with other columns make it fail without
    naming the file. Their schemas (footers only) are compared here first, to name it."""
    import pyarrow.parquet as pq

    first: Optional[tuple[str, list[str]]] = None
    for path in paths:
        try:
            names = pq.read_schema(path).names
        except Exception:  # unreadable: load_dataset says so
            return
        if first is None:
            first = (path, names)
        elif set(names) != set(first[1]):
            raise DataError(f"{spec.text}: {path} has the columns {', '.join(names)} but {first[0]} has "
                            f"{', '.join(first[1])}; datasets reads the files of a split as one table, so they need the "
                            "same columns: give the files as separate file_name entries")


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
