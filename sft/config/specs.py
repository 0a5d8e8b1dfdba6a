"""What a ``file_name`` entry is, told from the string and the file system without loading anything:
a .json/.jsonl/.parquet file, a dataset folder (``save_to_disk`` or data files) or a Hub dataset id, with
``?config=`` and ``?split=``. The config checks its fields with it; sft.data.sources opens what it describes.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from sft.errors import DataError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def looks_like_hub_id(name: str) -> bool:
    """org/name, as the Hub names models and datasets (not a relative path such as ./a/b)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", name)) and not name.startswith((".", "/"))


@dataclass(frozen=True)
class SourceSpec:
    """One entry of file_name, taken apart: ``org/name?config=C&split=S`` -> path org/name, config C, split S."""

    text: str  # as configured: the prefix of every row's source id
    path: str  # file, folder or Hub id
    kind: str  # json | jsonl | parquet | saved (a save_to_disk folder) | folder | hub
    config: Optional[str] = None
    split: Optional[str] = None  # None: the default (train, or the only one)


def parse_spec(text: str) -> SourceSpec:
    """Tell what a file_name entry is, without loading it. Raises DataError for what cannot be an input."""
    path, query = text, ""
    if not os.path.exists(text) and "?" in text:
        path, _, query = text.partition("?")
    options: dict[str, str] = {}
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        if key not in ("config", "split"):
            raise DataError(f"{text}: unknown option '{key}'; a source takes ?config=NAME&split=NAME")
        if len(values) != 1 or not values[0]:
            raise DataError(f"{text}: give ?{key}= one non-empty value")
        options[key] = values[0]
    if os.path.isfile(path):
        kind = next((suffix[1:] for suffix in FILE_SUFFIXES if path.endswith(suffix)), None)
        if kind is None:
            raise DataError(f"{path} is neither .json, .jsonl nor .parquet (nor a dataset folder or Hub id)")
        if options:
            raise DataError(f"{text}: ?config= and ?split= choose within a dataset folder or Hub id, not a {path.rsplit('.', 1)[1]} file")
        return SourceSpec(text, path, kind)
    if os.path.isdir(path):
        saved = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))
        return SourceSpec(text, path, "saved" if saved else "folder", options.get("config"), options.get("split"))
    if path.endswith(FILE_SUFFIXES) or path.startswith((".", os.sep, "~")) or not looks_like_hub_id(path):
        raise DataError(f"file not found: {path}" if path.endswith(FILE_SUFFIXES) else
                        f"{path}: not found (neither a file, a folder nor a Hub dataset id org/name)")
    return SourceSpec(text, path, "hub", options.get("config"), options.get("split"))


def spec_problem(text: str) -> Optional[str]:
    """What is wrong with a file_name entry that can be told without loading it (for config checks), or None."""
    try:
        parse_spec(text)
    except DataError as error:
        return str(error)
    return None
