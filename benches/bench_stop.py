"""Stopping VMs: vmkit against Cloud Hypervisor and QEMU, same test guest, one run.

Run: ``python benches/bench_stop.py`` (``--vms N``, ``--rounds R``). Needs
/dev/kvm; Cloud Hypervisor's figures need ``../shared/ch/cloud-hypervisor``
(or ``--ch PATH``), QEMU's ``qemu-system-x86_64`` (microvm, as in
``bench_boot``); each is left out, with a note, without it.

Every VM boots the vmkit test guest's PVH ELF with 1 vCPU and 128 MiB; the
guest prints its ready line and halts with interrupts off, so nothing ends
it but the VMM. Measured, as medians over the rounds (runs interleaved):

- in-process: ``Vm.shutdown()`` of each of N running VMs in turn (per VM and
  all N), then ``close()``, then ``release()`` (the kernel's teardown of the
  KVM VMs, which goes on in the background after ``shutdown()``);
- start, one process: from launching the VMM to its guest's ready line (the
  process that the next row stops; with ``--api-socket``, what a
  ``ch-remote`` user starts);
- SIGTERM, one process: from ``kill`` to the process reaped, for ``vmkit``
  and ``cloud-hypervisor`` (each plain, and with ``--api-socket``) and QEMU;
- SIGTERM, N processes at once: from the first ``kill`` to the last reaped;
- guest power-off: from the arrival of the guest's last serial line before
  its power-off to the process reaped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import machine
from bench_boot import qemu_command
from vmkit import VmConfig, testguest
from vmkit.vm import Vm

MEMORY = "size=128M"
READY = b"vmkit-guest: exit halt"
POWEROFF_LINE = b"vmkit-guest: exit poweroff"


def guest_args(cmdline: str) -> list[str]:
    kernel = str(testguest.image_path("pvh"))
    return [
        "--kernel", kernel, "--cmdline", cmdline, "--cpus", "boot=1", "--memory", MEMORY,
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def command(which: str, cmdline: str, workdir: Path, index: int) -> list[str]:
    if which in ("ch", "ch-api"):
        argv = [str(CH), *guest_args(cmdline)]
        if which == "ch-api":
            argv += ["--api-socket", f"path={workdir / f'ch-api-{index}.sock'}"]
        return argv
    if which == "qemu":
        assert QEMU is not None
        qemu = qemu_command(QEMU, testguest.image_path("pvh"), cmdline)
        qemu[qemu.index("-m") + 1] = MEMORY.removeprefix("size=")
        qemu[qemu.index("-debugcon") + 1] = "null"
        return qemu
    argv = [sys.executable, "-m", "vmkit", *guest_args(cmdline)]
    if which == "vmkit-api":
        argv += ["--api-socket", str(workdir / f"api-{index}.sock")]
    return argv


def start(which: str, cmdline: str, workdir: Path, index: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command(which, cmdline, workdir, index),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def read_until(process: subprocess.Popen[bytes], pattern: bytes) -> float:
    """Reads the VMM's serial output until ``pattern``; when it arrived."""
    assert process.stdout is not None
    seen = b""
    while pattern not in seen:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"the VMM ended before printing {pattern!r}: {seen[-300:]!r}")
        seen += chunk
    return time.monotonic()


def sigterm_all(which: str, count: int, workdir: Path) -> tuple[float, list[float], float]:
    """Boots ``count`` VMMs, SIGTERMs them at once: (last reaped, each reaped,
    launch to the last guest ready), seconds."""
    cmdline = testguest.cmdline(["hello"], "halt")
    launched = time.monotonic()
    processes = [start(which, cmdline, workdir, i) for i in range(count)]
    try:
        ready = max(read_until(process, READY) for process in processes) - launched
        time.sleep(0.3)  # every vCPU halted, every VMM waiting
        started = time.monotonic()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        reaped = []
        for process in processes:
            machine.reap(process, 60)
            reaped.append(time.monotonic() - started)
        return max(reaped), reaped, ready
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def poweroff(which: str, workdir: Path) -> float:
    """From the guest's last line before its power-off to the VMM reaped."""
    process = start(which, testguest.cmdline(["hello"], "poweroff"), workdir)
    try:
        printed = read_until(process, POWEROFF_LINE)
        machine.reap(process, 60)
        return time.monotonic() - printed
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def in_process(count: int) -> dict[str, float]:
    """Times shutdown, close and release of ``count`` running in-process VMs."""
    cmdline = testguest.cmdline(["hello"], "halt")
    config = VmConfig.from_cli([*guest_args(cmdline)[:-4], "--serial", "null", "--console", "off"])
    vms = [Vm(config) for _ in range(count)]
    for vm in vms:
        vm.boot()
    for vm in vms:
        vm.serial.wait_for("exit halt", timeout=60)
    time.sleep(0.3)
    each = []
    started = time.monotonic()
    for vm in vms:
        before = time.monotonic()
        vm.shutdown()
        each.append(time.monotonic() - before)
    shut = time.monotonic()
    for vm in vms:
        vm.close()
    closed = time.monotonic()
    for vm in vms:
        vm.release()
    released = time.monotonic()
    return {
        "shutdown per VM (median)": statistics.median(each),
        "shutdown per VM (max)": max(each),
        f"shutdown of all {count}": shut - started,
        f"close of all {count} after": closed - shut,
        f"release of all {count} after": released - closed,
    }


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


def main() -> None:
    global CH, QEMU
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ch", type=Path, default=machine.CH)
    args = parser.parse_args()
    CH = args.ch
    QEMU = shutil.which("qemu-system-x86_64")
    peers = (["ch", "ch-api"] if CH.exists() else []) + (["qemu"] if QEMU else [])
    kinds = ["vmkit", "vmkit-api", *peers]
    if not CH.exists():
        print(f"{CH} is missing: Cloud Hypervisor's figures are left out")
    if QEMU is None:
        print("qemu-system-x86_64 is missing: QEMU's figures are left out")
    results: dict[str, dict[str, list[float]]] = {k: {} for k in ["in-process", *kinds]}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(args.rounds):
            for key, value in in_process(args.vms).items():
                results["in-process"].setdefault(key, []).append(value)
            for kind in kinds:
                one, _, ready = sigterm_all(kind, 1, workdir)
                many, each, _ = sigterm_all(kind, args.vms, workdir)
                row = results[kind]
                row.setdefault("start, 1 process: guest ready", []).append(ready)
                row.setdefault("SIGTERM, 1 process: reaped", []).append(one)
                row.setdefault(f"SIGTERM, {args.vms} at once: last reaped", []).append(many)
                row.setdefault(f"SIGTERM, {args.vms} at once: median reaped", []).append(
                    statistics.median(each)
                )
                row.setdefault("guest power-off: reaped", []).append(poweroff(kind, workdir))
    for kind, rows in results.items():
        print(f"{kind}:")
        for name, values in rows.items():
            print(f"  {name:42} {statistics.median(values) * 1e3:8.2f} ms")


CH = machine.CH
QEMU: str | None = None

if __name__ == "__main__":
    main()
