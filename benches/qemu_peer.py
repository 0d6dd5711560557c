"""QEMU as a peer for the snapshot and migration benches: a microvm running the
test guest, driven over QMP (QEMU's own control protocol; ``ch-remote`` does
not speak it).

Snapshot = ``stop`` then ``migrate`` to ``exec:cat > <file>`` (QEMU's way of
saving a VM's state and RAM to a file; 7.2 has no ``file:`` URI); restore = a
new QEMU started with ``-incoming defer -S`` gets ``migrate-incoming`` from
``exec:cat <file>`` and stays paused until ``cont``. Live migration =
``migrate`` to ``unix:<sock>`` on which the receiving QEMU listens
(``-incoming unix:<sock>``), with ``max-bandwidth`` raised to 10 GiB/s (the
default, 128 MiB/s, is meant for networks shared with other traffic; a
same-host move has no such limit, as vmkit's and Cloud Hypervisor's have none).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmkit import testguest


def qemu_path() -> str | None:
    return shutil.which("qemu-system-x86_64")


class Qmp:
    """One QMP connection: commands in turn, events skipped."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.file = self.sock.makefile("rwb", buffering=0)
        json.loads(self.file.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def wait_migration(self, timeout: float = 120) -> dict[str, Any]:
        """Polls ``query-migrate`` until it completes; returns the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = self.execute("query-migrate")
            state = status.get("status")
            if state == "completed":
                return status
            if state in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {state}: {status}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU migration still {state}")
            time.sleep(0.0005)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def start(
    qemu: str,
    size: str,
    steps_cmdline: str,
    serial: Path | None,
    qmp: Path,
    incoming: str | None = None,
    machine: str = "microvm,acpi=on",
    devices: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], Qmp]:
    """A QEMU ``machine`` (microvm by default) with the test guest (PVH), 1
    vCPU, ``size`` of RAM, ``devices`` (more arguments), the serial port to
    ``serial`` (None: nowhere), QMP on ``qmp``; ``incoming``: waits for a
    migration there instead of booting (``defer``: ``migrate-incoming``)."""
    memory_mib = int(size[:-1]) * (1024 if size.endswith("G") else 1)
    argv = [
        qemu, "-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", f"{memory_mib}M", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot",
        "-serial", "null" if serial is None else f"file:{serial}",
        "-kernel", str(testguest.image_path("pvh")), "-append", steps_cmdline,
        "-qmp", f"unix:{qmp},server=on,wait=off", *devices,
    ]  # fmt: skip
    if incoming is not None:
        argv += ["-incoming", incoming, "-S"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return proc, Qmp(qmp)
    except BaseException:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"QEMU did not start: {err.decode(errors='replace')}") from None


def stop(proc: subprocess.Popen[bytes], qmp: Qmp) -> None:
    qmp.close()
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
