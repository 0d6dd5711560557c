"""Waiting for a unix socket to listen.

A socket's file appears at bind(), before listen(): a client that connects in
between is refused. So the file's existence is not the signal; the kernel's
socket table is. Probing by connecting is no better: it would take the one
connection a migration receiver or a vhost-user backend accepts.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: /proc/net/unix's flag for a listening socket.
_SO_ACCEPTCON = 0x10000


def listening(path: Path) -> bool:
    """Whether a unix socket listens at ``path``."""
    try:
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:  # no procfs: the file is the best sign left
        return path.exists()
    for line in table:
        # Num RefCount Protocol Flags Type St Inode Path
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


def wait_listening(
    path: Path,
    *,
    timeout: float = 10.0,
    process: subprocess.Popen[Any] | None = None,
    why_not: Callable[[], str] | None = None,
) -> None:
    """Returns once something listens at ``path``; fails if ``process`` (the
    server) exits first or ``timeout`` passes. ``why_not`` adds the server's
    side (its log, say) to the failure."""
    deadline = time.monotonic() + timeout
    while not listening(path):
        if process is not None and process.poll() is not None:
            failure = f"{process.args!r} exited {process.returncode} before listening on {path}"
        elif time.monotonic() > deadline:
            failure = f"nothing listens on {path} after {timeout} s"
        else:
            time.sleep(0.002)
            continue
        raise AssertionError(failure + (f": {why_not()}" if why_not is not None else ""))
