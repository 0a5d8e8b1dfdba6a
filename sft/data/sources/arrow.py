"""Arrow IPC stream files read by slices from any forked process, without keeping the pages they touch, and
the writer of scanned JSON records into such a file."""

from __future__ import annotations

import mmap
from typing import Iterable, Optional

from sft.data.sources.rows import RawRow

RAW_BATCH_ROWS = 4096  # row texts per Arrow record batch of a scanned JSON/JSONL file
RAW_BATCH_CHARS = 16 << 20  # ... or fewer when the rows are long (an Arrow string array holds at most 2 GiB)


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
