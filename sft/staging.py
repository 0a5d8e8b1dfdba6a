"""Folders that appear whole or not at all: written under a staging name beside their final place, then renamed
into it (a rename within one file system is atomic). A staging folder is named after its writer's host and pid, so
the leftovers of a killed writer can be told from a live one's work and removed.

    with atomic_dir("encoded/abc") as staging:
        write_everything_into(staging)
    # encoded/abc now holds all of it; after an error or a kill it holds what it held before

Pure file operations, no sft imports: any layer may use them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from contextlib import contextmanager
from typing import Iterator

_STAGING = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


@contextmanager
def atomic_dir(final: str) -> Iterator[str]:
    """Yield an empty staging folder beside ``final``; when the block ends without an error, it replaces
    ``final`` (whatever was there before); after an error it is removed and ``final`` is left as it was. Staging
    folders that dead processes left in the same parent are removed first."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        move_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: str, final: str) -> None:
    """Rename a finished staging folder to ``final``, replacing what is there."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(staging, final)


def staging_path(final: str) -> str:
    """Where a folder is written before it is renamed to ``final``: beside it, named after this host and process,
    so that ``remove_stale_staging`` can tell a dead writer's leftovers from a live one's work."""
    return f"{final.rstrip(os.sep)}.tmp-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(parent: str) -> list[str]:
    """Remove the staging folders in ``parent`` (``staging_path``: ``<name>.tmp-<host>-<pid>``) whose writer is a
    dead process on this host; returns their names. Another host's are left alone: its processes cannot be seen
    from here."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        match = _STAGING.search(entry)
        if match and match["host"] == socket.gethostname() and not _alive(int(match["pid"])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed
