"""Where rows come from: input files and datasets, read into ``SourceRow`` records. No tokenizer, no processes.

Every entry of ``data_args.file_name`` is a *source spec*, opened by ``open_source`` into a ``RowSource``:

    rows.json / rows.jsonl        our own streamed reader (exact row and line numbers in errors, any row shape)
    rows.parquet                  datasets.load_dataset("parquet", ...), memory-mapped and cached
    folder written by save_to_disk  datasets.load_from_disk (a DatasetDict folder: pick the split with ?split=)
    a folder of JSON/JSONL files  its split's files (datasets' data-file rules), each read by our JSON reader
    any other folder, or org/name datasets.load_dataset, with ?config=NAME&split=NAME (split default train)

Whatever datasets gives back is checked before it is read: rows are read from its Arrow files only when they
are the dataset's rows, columns it stores as JSON text (``Json``) are decoded, and media columns are refused.

A ``RowSource`` has a length, reads any range of rows (also inside forked worker processes, which inherit
it), and has a content fingerprint for the encode cache. Nothing holds a whole input in memory: JSON and
JSONL files are scanned once, in blocks, into an Arrow file of row texts; that file and datasets' Arrow
files are memory-mapped, and after every read the pages touched are handed back to the kernel
(``madvise(DONTNEED)``): a mapped page counts in a process's resident memory for as long as it stays
mapped, so a reader that kept them would grow with the data it has read.
"""

from __future__ import annotations

from typing import Optional

from sft.config.specs import parse_spec
from sft.data.sources.arrow import MappedArrowFiles, write_raw_rows
from sft.data.sources.datasets_source import DatasetSource, open_folder, reset_stop_signals
from sft.data.sources.json_files import JsonRowSource, iter_json_array, iter_jsonl
from sft.data.sources.rows import ConcatenatedSource, RawRow, RowSource, SourceRow, check_keys

__all__ = ["ConcatenatedSource", "DatasetSource", "JsonRowSource", "MappedArrowFiles", "RawRow", "RowSource", "SourceRow",
           "check_keys", "iter_json_array", "iter_jsonl", "open_source", "reset_stop_signals", "source_fingerprint",
           "write_raw_rows"]


def open_source(text: str, work_dir: Optional[str] = None) -> RowSource:
    """The RowSource for one file_name entry. JSON/JSONL files are scanned into ``work_dir`` (default: a
    temporary folder removed on close) on first use, so that ``fingerprint`` alone costs one hash of the file."""
    spec = parse_spec(text)
    if spec.kind in ("json", "jsonl"):
        return JsonRowSource(spec.path, work_dir)
    if spec.kind == "folder":
        return open_folder(spec, work_dir)
    return DatasetSource(spec)


def source_fingerprint(text: str) -> str:
    with open_source(text) as source:
        return source.fingerprint()
