"""Wall time and peak memory of a whole process tree, measured from outside (Linux /proc only).

Memory is the sum of PSS (proportional set size: each shared page divided among the processes that map
it) over the process and all its descendants, so forked workers that share their parent's pages are not
counted twice, as they would be by summing RSS. It is sampled every `interval` seconds; a peak shorter
than that can be missed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Optional


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:  # the process ended between listdir and open
            continue
        # The command name (field 2) may hold spaces and ')', so fields are counted after the last ')'.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children = _children_by_parent()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def tree_pss_bytes(root: int) -> int:
    """Sum of PSS over `root` and its descendants, in bytes (processes that end while being read count 0)."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Measured:
    seconds: float
    """Wall time from start to exit (or to the kill, when it timed out)."""
    peak_pss_bytes: int
    """Largest sampled sum of PSS over the process tree; 0 when not sampled."""
    returncode: Optional[int]
    """Exit status; None when it ran past the timeout and was killed."""
    output: str
    """stdout and stderr together."""


def run_measured(command: list[str], env: Optional[dict] = None, timeout: Optional[float] = None,
                 interval: float = 0.2, sample_memory: bool = True) -> Measured:
    """Run `command` to its end (or kill its whole session after `timeout` seconds), timing it and, with
    `sample_memory`, sampling its tree's PSS every `interval` seconds."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
        start = time.perf_counter()
        # A session of its own, so that a timeout can stop every process the command started.
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        peak = 0
        returncode: Optional[int] = None
        while True:
            if sample_memory:
                peak = max(peak, tree_pss_bytes(process.pid))
            try:
                returncode = process.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                if timeout is not None and time.perf_counter() - start > timeout:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    returncode = None
                    break
        seconds = time.perf_counter() - start
        output.seek(0)
        text = output.read()
    return Measured(seconds, peak, returncode, text)
