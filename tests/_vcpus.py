"""Watching a VMM's vCPU threads from outside: how often they were woken.

A vCPU whose guest halted with interrupts off sleeps in ``KVM_RUN`` until the
VMM kicks it (pause, stop, or a watchdog taking a sample), so its threads'
context switches count the VMM's kicks.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import time
from pathlib import Path
from typing import IO

SYS_TGKILL = 234  # x86_64


def vcpu_tids(pid: int | str = "self") -> list[int]:
    """The thread ids of ``pid``'s vCPU threads (named ``vcpu<N>``)."""
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("vcpu"):
                tids.append(int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile (ENOENT or ESRCH)
    return tids


def vcpu_switches(pid: int | str = "self") -> int:
    """Context switches of ``pid``'s vCPU threads so far, all added up."""
    total = 0
    for tid in vcpu_tids(pid):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):  # the thread just ended
            continue
        total += sum(int(n) for n in re.findall(r"ctxt_switches:\s+(\d+)", status))
    return total


def quiet_vcpus(pid: int | str = "self", settle: float = 0.5, timeout: float = 20) -> int:
    """Waits until no vCPU thread of ``pid`` has been switched for ``settle``
    seconds (the guest has settled in its halt); returns the switch count."""
    deadline = time.monotonic() + timeout
    count = vcpu_switches(pid)
    while True:
        time.sleep(settle)
        now = vcpu_switches(pid)
        if now == count:
            return count
        if time.monotonic() > deadline:
            raise AssertionError(f"the vCPU threads of {pid} never went quiet")
        count = now


def tgkill(pid: int, tid: int, sig: signal.Signals) -> None:
    """Sends ``sig`` to thread ``tid`` of process ``pid`` (not to the process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, int(sig)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def read_until(stream: IO[bytes], pattern: bytes, timeout: float) -> bytes:
    """Reads ``stream`` (a pipe) until ``pattern`` appears; what was read."""
    fd = stream.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while pattern not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"{pattern!r} did not come within {timeout} s: {seen!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"the stream ended before {pattern!r}: {seen!r}")
        seen += chunk
    return seen
