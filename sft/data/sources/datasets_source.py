"""Parquet files, save_to_disk folders, dataset folders and Hub ids, through ``datasets``: loaded (and
converted, in a child process, on first use), then read from their memory-mapped Arrow files."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from sft.config.specs import SourceSpec
from sft.data.sources.arrow import MappedArrowFiles
from sft.data.sources.rows import RowSource, SourceRow, file_fingerprint
from sft.errors import DataError
from sft.files import file_digest


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
