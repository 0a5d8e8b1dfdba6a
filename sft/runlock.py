"""One run per output folder: an advisory lock on ``<output_dir>/.run.lock`` and a writability check (the staging
folders dead processes left behind are sft/staging.py's). Pure file operations; the caller decides which process runs them.

The lock is ``flock(2)`` on an open file: the kernel drops it when the holding process ends, however it ends
(SIGKILL included), so a killed run never blocks the next one. The file names its holder (host, pid, start time)
for the refusal message. Shared file systems honour it where they honour flock (NFSv4, Lustre mounted with
``flock``); two runs on a file system that ignores it are not kept apart.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from typing import IO, Optional

from sft.errors import UserError

LOCK_FILE = ".run.lock"


class OutputDirError(UserError):
    """The output folder is held by another run or cannot be written."""


def check_writable(folders: list[str], field: str = "output_dir") -> None:
    """Create each folder (if missing) and write a probe file into it, so an unwritable output is found at start,
    not at the first save."""
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
            os.close(handle)
            os.remove(probe)
        except OSError as error:
            raise OutputDirError(f"{field}: cannot write to {folder} ({error.strerror or error}); make it writable or "
                                 f"choose another --{field}") from None


class RunLock:
    """The lock a run holds on its output folder for as long as it runs."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._handle: Optional[IO[str]] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise OutputDirError naming the run that holds it."""
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputDirError(f"output_dir {os.path.dirname(self.path)} is in use by the run of {holder}: wait for it "
                                 "to end, or give this run another --output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()
