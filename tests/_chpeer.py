"""Cloud Hypervisor's own binaries as the reference for vmkit's tests.

CI clones the repository with ``shared/`` beside it, so the binaries are at
``../shared/ch`` from the repository root (a git worktree one level deeper
finds them one level further up). ``CH_DIR`` is None when they are absent;
tests that need them skip with ``CH_MISSING``.

``VmmProcess`` starts either VMM with an API socket and ends it again:
``cloud-hypervisor --api-socket path=S --seccomp log`` (its HTTP thread
needs ``--seccomp log`` with this build, see ``shared/ch/README.md``) or
``python -m vmkit --api-socket S``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _http import request

ROOT = Path(__file__).resolve().parent.parent


def _find_ch_dir() -> Path | None:
    for base in (ROOT.parent, ROOT.parent.parent):
        candidate = base / "shared" / "ch"
        if (candidate / "cloud-hypervisor").is_file() and (candidate / "ch-remote").is_file():
            return candidate
    return None


CH_DIR = _find_ch_dir()
CH_MISSING = (
    "Cloud Hypervisor's binaries are not at ../shared/ch from the repository root "
    "(cloud-hypervisor and ch-remote, see shared/ch/README.md)"
)


def ch_binary(name: str) -> str:
    assert CH_DIR is not None, CH_MISSING
    return str(CH_DIR / name)


class VmmProcess:
    """A VMM process serving the API on ``socket_path``; ``kind`` is ``ch`` or ``vmkit``."""

    def __init__(
        self, kind: str, socket_path: Path, log_path: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.socket_path = socket_path
        self.log_path = log_path
        if kind == "ch":
            argv = [
                ch_binary("cloud-hypervisor"),
                "--api-socket", f"path={socket_path}",
                "--seccomp", "log",
            ]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "vmkit", "--api-socket", str(socket_path)]
        argv += extra
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start-up: {self.log}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(os.fspath(self.socket_path))
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.kind} did not listen on {self.socket_path}: {self.log}")

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def wait_running(self, timeout: float = 30) -> None:
        """Waits until the command line's VM is booted. Both VMMs may answer
        an API request before that (then vm.resize only edits the config):
        a test of a running VM's answers waits for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Plain HTTP: the wait needs no ch-remote (tests of vmkit alone use it).
            try:
                reply = request(os.fspath(self.socket_path), "GET", "vm.info")
            except OSError:
                reply = None
            if reply is not None and reply.status == 200 and reply.json()["state"] == "Running":
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{self.kind}: the VM never ran: {self.log}")

    def stop(self) -> None:
        """Ends the process if it still runs (SIGTERM, then SIGKILL) and reaps it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket_path.unlink(missing_ok=True)


def wait_for_line(serial: Path, pattern: str, vmm: VmmProcess, timeout: float = 30) -> str:
    """Polls a ``--serial file=`` until a whole line matches ``pattern``;
    returns the complete lines written so far (a line being written is left
    out, so that what the caller checks is whole)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        written = serial.read_text(errors="replace") if serial.exists() else ""
        text = written[: written.rfind("\n") + 1]
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(0.01)
    raise AssertionError(f"{vmm.kind}: no line {pattern!r}: {text[-2000:]}\n{vmm.log}")


def ch_remote(socket_path: Path, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    """Runs the real ch-remote against ``socket_path``: (exit status, stdout, stderr)."""
    result = subprocess.run(
        [ch_binary("ch-remote"), "--api-socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr
