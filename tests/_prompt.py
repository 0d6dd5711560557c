"""Calls that must not block: run them with a deadline, and unblock them to
fail the test cleanly (never hang the suite) when they do."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

#: Far longer than a refusal takes; a call that blocks on a FIFO waits forever.
PROMPT = 15.0
ROOT = Path(__file__).resolve().parent.parent


def call_promptly(call: Callable[[], object], unblock: Callable[[], None]) -> BaseException | None:
    """Runs `call` in a thread; returns what it raised. Fails the test if it is
    still running after PROMPT seconds, after `unblock`ing it."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as e:  # handed to the test
            raised.append(e)

    thread = threading.Thread(target=target, name="prompt-call")
    thread.start()
    thread.join(PROMPT)
    if thread.is_alive():
        unblock()
        thread.join(PROMPT)
        pytest.fail(f"{call} blocked")
    return raised[0] if raised else None


def unblock_reader_of(fifo: Path) -> Callable[[], None]:
    """Ends an open() blocked waiting for a writer of `fifo`."""
    return lambda: os.close(os.open(fifo, os.O_WRONLY))


def unblock_writer_of(fifo: Path) -> Callable[[], None]:
    """Ends an open() blocked waiting for a reader of `fifo`."""
    return lambda: os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))


def run_vmkit_promptly(
    argv: list[str], unblock: Callable[[], None], what: str
) -> subprocess.CompletedProcess[str]:
    """Runs the `vmkit` command; fails the test (after `unblock`) if it blocks."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "vmkit", *argv],
            capture_output=True,
            text=True,
            timeout=PROMPT * 2,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        unblock()
        pytest.fail(f"vmkit blocked on {what}")
