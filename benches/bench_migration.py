"""Live migration: vmkit against Cloud Hypervisor (both driven by the real
``ch-remote`` over their APIs) and QEMU microvm (over QMP), same guest, runs
interleaved.

Run: ``python benches/bench_migration.py`` (``--runs N``, ``--sizes 256M,2G``).
Needs /dev/kvm and ``../shared/ch/`` (``cloud-hypervisor`` and ``ch-remote``);
QEMU (``qemu-system-x86_64``) where installed.

Each run: a VMM boots the test guest (1 vCPU) running the ``dirty`` step: it
rewrites 32 MiB every 5 ms, checking the previous round, and prints a line per
round. A second, idle VMM of the same kind gets ``ch-remote
receive-migration unix:<sock>``; once the guest is 20 rounds in, ``ch-remote
send-migration unix:<sock>`` is timed (*total*: the request until the sender
answers, the VM running on the receiver). A thread polls the serial file
every 0.5 ms and notes when each round's line first appears: *largest gap*
is the longest time between two consecutive rounds around the migration
(the guest-visible pause plus one round's 5 ms). The guest must go on for 20
rounds on the receiver with no check failed. Cloud Hypervisor runs with
``--seccomp false`` (its filter at this revision kills it on these requests
here). QEMU: ``migrate`` to the receiving QEMU's ``-incoming unix:<sock>``,
timed until ``query-migrate`` says completed, with ``max-bandwidth`` raised
(``qemu_peer.py``); its receiver writes the serial port to a file of its own.
``--hog`` runs a busy loop per CPU throughout (the contended case).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from pathlib import Path

import qemu_peer
from bench_io import Hogs
from bench_snapshot import (
    CH_DIR,
    interleaved_medians,
    peers,
    print_times,
    remote,
    side_by_side_args,
    start,
    stop,
)
from machine import wait_listening
from vmkit import VmConfig, testguest

ROUNDS = 100_000


class RoundClock:
    """When each ``dirty round <i>`` line first appeared in the serial files."""

    def __init__(self, *serials: Path) -> None:
        self.serials = serials
        self.seen: dict[int, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        prefix = "vmkit-guest: dirty round "
        while not self.done.is_set():
            now = time.monotonic()
            text = ""
            for serial in self.serials:
                try:
                    text += serial.read_text(errors="replace")
                except FileNotFoundError:
                    pass
            for line in text.splitlines():
                if line.startswith(prefix) and line[len(prefix) :].isdigit():
                    self.seen.setdefault(int(line[len(prefix) :]), now)
            time.sleep(0.0005)

    def latest(self) -> int:
        return max(self.seen, default=-1)

    def largest_gap(self, start: float, end: float) -> float:
        times = sorted(t for t in self.seen.values() if start - 0.1 <= t <= end + 0.5)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def wait_rounds(clock: RoundClock, rounds: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while clock.latest() < rounds:
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.001)


def one_qemu_run(size: str, work: Path) -> dict[str, float]:
    qemu = qemu_peer.qemu_path()
    assert qemu is not None
    cmdline = testguest.cmdline(
        ["dirty"], "poweroff", dirty_mib=32, dirty_rounds=ROUNDS, dirty_ms=5
    )
    serials = (work / "serial.log", work / "serial-receiver.log")
    migration = work / "m.sock"
    sender, source = qemu_peer.start(qemu, size, cmdline, serials[0], work / "a.qmp")
    receiver, target = qemu_peer.start(
        qemu, size, cmdline, serials[1], work / "b.qmp", incoming=f"unix:{migration}"
    )
    clock = RoundClock(*serials)
    try:
        wait_rounds(clock, 20, "the guest did not start its rounds")
        source.execute("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        started = time.monotonic()
        source.execute("migrate", uri=f"unix:{migration}")
        source.wait_migration()
        total = time.monotonic() - started
        target.wait_migration()
        target.execute("cont")
        after = clock.latest()
        wait_rounds(clock, after + 20, "the guest did not go on after the migration", 10)
        text = serials[1].read_text(errors="replace")
        if "fail" in text:
            raise RuntimeError(f"qemu: the guest failed after the migration: {text[-300:]}")
        gap = clock.largest_gap(started, started + total)
    finally:
        clock.stop()
        qemu_peer.stop(sender, source)
        qemu_peer.stop(receiver, target)
    return {"total": total, "gap": gap}


def one_run(kind: str, size: str, work: Path) -> dict[str, float]:
    if kind == "qemu":
        return one_qemu_run(size, work)
    serial = work / "serial.log"
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["dirty"], "poweroff", dirty_mib=32, dirty_rounds=ROUNDS, dirty_ms=5
        ),
        "--memory", f"size={size}", "--serial", f"file={serial}", "--console", "off",
    ])  # fmt: skip
    (work / "vm.json").write_text(config.to_json())
    source, target, migration = work / "a.sock", work / "b.sock", work / "m.sock"
    sender = start(kind, source)
    receiver = start(kind, target)
    clock = RoundClock(serial)
    try:
        remote(source, "create", str(work / "vm.json"))
        remote(source, "boot")
        deadline = time.monotonic() + 30
        while clock.latest() < 20:
            if time.monotonic() > deadline:
                raise TimeoutError("the guest did not start its rounds")
            time.sleep(0.001)
        waiting = subprocess.Popen(
            [str(CH_DIR / "ch-remote"), "--api-socket", str(target), "receive-migration",
             f"unix:{migration}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_listening(migration, process=waiting, why_not=lambda: waiting.communicate()[1])
        started = time.monotonic()
        remote(source, "send-migration", f"unix:{migration}")
        total = time.monotonic() - started
        if waiting.wait(60) != 0:
            raise RuntimeError(f"receive-migration: {waiting.communicate()[1]}")
        after = clock.latest()
        deadline = time.monotonic() + 10
        while clock.latest() < after + 20:
            if time.monotonic() > deadline:
                raise TimeoutError("the guest did not go on after the migration")
            time.sleep(0.001)
        text = serial.read_text(errors="replace")
        if "fail" in text:
            raise RuntimeError(f"{kind}: the guest failed after the migration: {text[-300:]}")
        gap = clock.largest_gap(started, started + total)
    finally:
        clock.stop()
        stop(sender, source)
        stop(receiver, target)
    return {"total": total, "gap": gap}


def main() -> None:
    args = side_by_side_args(__doc__, hog=True)
    with Hogs(args.hog):
        rows = interleaved_medians(args.sizes, args.runs, one_run, "vmkit-bench-mig-", peers())
    for size, med in rows:
        print_times(size, med, (
            ("total", "send-migration (request → VM running on the receiver)"),
            ("gap", "largest gap between two guest rounds (5 ms apart when running)"),
        ))  # fmt: skip


if __name__ == "__main__":
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    main()
