"""A process's resident memory, as /proc reports it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def resident_mib(pid: int) -> float:
    """VmRSS of ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def settles(pid: int, check: Callable[[float], bool], timeout: float = 5) -> float:
    """The process's resident MiB once ``check(mib)`` holds (the kernel's
    per-thread RSS counters reach /proc a little late)."""
    deadline = time.monotonic() + timeout
    while True:
        mib = resident_mib(pid)
        if check(mib):
            return mib
        assert time.monotonic() < deadline, f"resident memory stayed at {mib:.1f} MiB"
        time.sleep(0.02)
