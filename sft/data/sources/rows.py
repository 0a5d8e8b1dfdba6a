"""A row on its way to the encoder (``SourceRow``), a scanned JSON record (``RawRow``), the interface every
input implements (``RowSource``), several sources read as one (``ConcatenatedSource``), and the early check that
the rows have the keys the mapping names."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from sft.data.conversation import FieldMapping
from sft.errors import DataError
from sft.files import file_digest

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


class ConcatenatedSource(RowSource):
    """Several sources read as one, in order: the data files of a dataset folder's split. Every row keeps the id
    and the place its own source gives it (``folder/b.jsonl:3``, ``folder/b.jsonl line 3``)."""

    def __init__(self, spec: str, name: str, parts: list[RowSource]):
        self.spec, self.name, self.parts = spec, name, parts
        self._starts: Optional[list[int]] = None

    def _offsets(self) -> list[int]:
        if self._starts is None:
            starts = [0]
            for part in self.parts:
                starts.append(starts[-1] + len(part))
            self._starts = starts
        return self._starts

    def __len__(self) -> int:
        return self._offsets()[-1]

    def read(self, start: int, end: int) -> list[SourceRow]:
        starts, rows = self._offsets(), []
        index = max(0, bisect.bisect_right(starts, start) - 1)
        while index < len(self.parts) and starts[index] < end:
            first, last = max(start, starts[index]), min(end, starts[index + 1])
            if first < last:
                rows += self.parts[index].read(first - starts[index], last - starts[index])
            index += 1
        return rows

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        for part in self.parts:
            digest.update(part.fingerprint().encode())
        return f"{self.spec}:{digest.hexdigest()}"

    def close(self) -> None:
        for part in self.parts:
            part.close()


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes, with its name (for the encode cache key)."""
    return f"{os.path.basename(path)}:{file_digest(path)}"


def check_keys(name: str, values: list[dict], mapping: FieldMapping) -> None:
    """Fail early, listing the keys the rows have, when none of ``values`` (the first rows) has a key the mapping needs."""
    if not values:
        return
    seen: set[str] = set()
    for value in values:
        seen.update(value.keys())
    for key, field_name in mapping.missing_keys(seen).items():
        have = ", ".join(sorted(seen)) or "(none)"
        hint = " (or null if the data has no such column)" if field_name == "query_key" else ""
        raise DataError(
            f"{name}: no row has the key '{key}' named by {field_name}; the rows have keys: {have}. "
            f"Set {field_name} to one of them{hint}."
        )
