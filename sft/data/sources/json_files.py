"""JSON and JSONL files: scanned once, in blocks, into an Arrow file of row texts (exact row and line numbers
in errors, any row shape, bounded memory), then read from that file by position."""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import tempfile
from typing import Iterator, Optional

from sft.data.sources.arrow import MappedArrowFiles, write_raw_rows
from sft.data.sources.rows import RawRow, RowSource, SourceRow, file_fingerprint
from sft.errors import DataError

BLOCK_BYTES = 8 << 20  # bytes read at a time from a .json array


class JsonRowSource(RowSource):
    """A .json array of row objects or a .jsonl file, scanned once into an Arrow file of (row, line, text).

    Rows are parsed only when read, by the process that reads them. A JSONL line that is not a JSON object,
    and a row with a key twice in one object (JSON would keep the last value and drop the other silently),
    become malformed rows (rejected, or an error, by the on_bad_sample policy); a syntax error in a .json
    array stops the scan with a DataError, since nothing after it can be trusted.
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
                value = _ROW_DECODER.decode(text)
            except json.JSONDecodeError as error:  # only JSONL lines get here: the array scan checked its rows
                rows.append(SourceRow(source, where, None, f"malformed JSON: {error.msg} (column {error.colno})", text))
                continue
            except DuplicateKey as error:
                rows.append(SourceRow(source, where, None, f"duplicate key {error.key!r} in one JSON object (JSON keeps "
                                      "only the last value, so the other would be lost); give each key once", text))
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


class DuplicateKey(ValueError):
    """A JSON object gives one key twice."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        raise DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


# Rows are parsed with the pairs of every object in hand, so that a key given twice is seen (a plain dict keeps the last).
_ROW_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def iter_jsonl(path: str) -> Iterator[RawRow]:
    """Every non-blank line of a .jsonl file, unparsed, one line in memory at a time.

    An empty file, and a JSON array (pretty-printed over lines, or on one line), raise DataError saying so.
    """
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
                if row == 1:
                    first_is_array = _check_not_an_array(path, line_number, line)
                yield RawRow(row, line_number, line)
    if row == 0:
        raise DataError(f"{path}: the file is empty; expected JSON Lines, one row object per line")
    if row == 1 and first_is_array:
        raise DataError(f"{path}: this is a JSON array on one line, not JSON Lines (one row object per line); "
                        "name the file .json")


def _check_not_an_array(path: str, line_number: int, line: str) -> bool:
    """Raise DataError when a .jsonl file's first line opens a JSON array spread over lines; True when the line
    is a whole JSON array (then the file is an array on one line if nothing follows)."""
    if not line.lstrip().startswith("["):
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{path} line {line_number}: this is a JSON array, not JSON Lines (one row object per line); "
                        "name the file .json") from None
    return True


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
