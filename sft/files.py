"""Small helpers on files that several layers share (no sft imports: any module may use them)."""

from __future__ import annotations

import hashlib


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
