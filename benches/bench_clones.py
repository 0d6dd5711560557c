"""Clones: N VMs restored from one snapshot of a warmed-up VM, against N VMs
booted and warmed up each, in process, one run; then N clones each in a VMM
process of its own, vmkit's (``Vm.spawn(None, restore=...)``) beside Cloud
Hypervisor's (``cloud-hypervisor --restore``), when ``../shared/ch`` is there.

Run: ``python benches/bench_clones.py`` (``--count 20``, ``--warm 64``).

The warm-up: the test guest reads ``--warm`` MiB of a disk of random bytes
into its memory (``blkbench``: that many MiB of 4 MiB buffers, each read
once), then counts ticks. One VM
is warmed up, paused and snapshotted; then ``count`` clones are restored from
the snapshot and resumed, one after the other, each until it prints a tick
(*clones*), and ``count`` VMs are booted, one after the other, each until its
warm-up is done and it prints a tick (*boots*). For each set: the time, and
this process's Pss growth per VM once all run (guest RAM a clone has not
written is the snapshot file's page cache, shared by every clone).

The process rows: the same guest warmed up and snapshotted by each VMM (through
the real ``ch-remote`` for Cloud Hypervisor), then ``count`` VMM processes
started one after the other, each restoring the snapshot and resuming it
(timed until the last resume returned), and the Pss of those processes,
summed, per clone. Cloud Hypervisor runs with ``--seccomp false`` (its filter
at this revision kills it on a restore request here). QEMU, where installed:
the guest on ``-M q35`` (its virtio-blk is PCI, which microvm's guest cannot
reach without port I/O), saved with ``migrate`` to a file; each clone a QEMU
started with ``-incoming defer``, ``migrate-incoming`` from the file, ``cont``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import machine
import qemu_peer
from bench_snapshot import CH_DIR, remote, start, stop
from vmkit import VmConfig, testguest
from vmkit.vm import Vm

MIB = 1 << 20


def pss_mib() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_tick(serial: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "vmkit-guest: tick 1\n" not in serial.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{serial}: the guest did not warm up")
        time.sleep(0.01)


def vmkit_process_clones(snap: Path, count: int) -> tuple[float, float]:
    """``count`` VM processes restoring ``snap`` and resuming: time, Pss per clone."""
    vms = []
    try:
        started = time.monotonic()
        for _ in range(count):
            vm = Vm.spawn(None, restore=snap)
            vms.append(vm)
            vm.resume()
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        return elapsed, sum(process_pss_mib(vm.pid) for vm in vms) / count
    finally:
        for vm in vms:
            vm.close()


def ch_process_clones(cfg: VmConfig, work: Path, count: int) -> tuple[float, float]:
    """Cloud Hypervisor: the same guest warmed up and snapshotted through
    ch-remote, then ``count`` processes restoring it and resuming."""
    serial = work / "ch-serial.log"
    cfg.serial.mode = "File"
    cfg.serial.file = str(serial)
    (work / "ch-vm.json").write_text(cfg.to_json())
    snap = work / "ch-snap"
    snap.mkdir()
    sock = work / "ch-first.sock"
    first = start("ch", sock)
    try:
        remote(sock, "create", str(work / "ch-vm.json"))
        remote(sock, "boot")
        wait_for_tick(serial)
        remote(sock, "pause")
        remote(sock, "snapshot", f"file://{snap}")
    finally:
        stop(first, sock)
    clones: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        started = time.monotonic()
        for i in range(count):
            sock = work / f"ch-{i}.sock"
            proc = start("ch", sock)
            clones.append((proc, sock))
            remote(sock, "restore", f"source_url=file://{snap}")
            remote(sock, "resume")
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        return elapsed, sum(process_pss_mib(proc.pid) for proc, _ in clones) / count
    finally:
        for proc, sock in clones:
            stop(proc, sock)


def qemu_process_clones(disk: Path, warm_mib: int, work: Path, count: int) -> tuple[float, float]:
    """QEMU: the same guest warmed up and saved over QMP, then ``count`` QEMU
    processes loading it and continuing."""
    qemu = qemu_peer.qemu_path()
    assert qemu is not None
    serial = work / "qemu-serial.log"
    state = work / "qemu-state"
    devices = (
        "-drive", f"if=none,id=d0,file={disk},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
    )  # fmt: skip
    args = (qemu, "512M", guest_cmdline(warm_mib))
    proc, qmp = qemu_peer.start(*args, serial, work / "q.qmp", machine="q35", devices=devices)
    try:
        wait_for_tick(serial)
        qmp.execute("stop")
        qmp.execute("migrate", uri=f"exec:cat > {state}")
        qmp.wait_migration()
    finally:
        qemu_peer.stop(proc, qmp)
    clones = []
    try:
        started = time.monotonic()
        for i in range(count):
            clone = qemu_peer.start(
                *args, None, work / f"q{i}.qmp", incoming="defer", machine="q35", devices=devices
            )
            clones.append(clone)
            clone[1].execute("migrate-incoming", uri=f"exec:cat {state}")
            clone[1].wait_migration()
            clone[1].execute("cont")
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        return elapsed, sum(process_pss_mib(proc.pid) for proc, _ in clones) / count
    finally:
        for proc, qmp in clones:
            qemu_peer.stop(proc, qmp)


def guest_cmdline(warm_mib: int) -> str:
    steps = ["blkbench", "ticks"]
    options = {
        "blkbench_size": 4 * MIB,
        "blkbench_depth": warm_mib // 4,
        "blkbench_count": warm_mib // 4,
        "ticks": 1_000_000,
        "tick_ms": 20,
    }
    return testguest.cmdline(steps, "poweroff", **options)


def config(disk: Path, warm_mib: int) -> VmConfig:
    return VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", guest_cmdline(warm_mib),
        "--memory", "size=512M", "--disk", f"path={disk},readonly=on",
        "--serial", "null", "--console", "off",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--warm", type=int, default=64, help="MiB the guest reads in")
    args = parser.parse_args()
    print(f"Machine: {machine.machine()}\n")
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-clones-") as work:
        disk = Path(work) / "disk.img"
        disk.write_bytes(os.urandom(args.warm * MIB))
        cfg = config(disk, args.warm)
        snap = Path(work) / "snap"
        snap.mkdir()
        first = Vm(cfg)
        first.boot()
        first.serial.wait_for("^vmkit-guest: tick 1$", timeout=120)
        first.pause()
        first.snapshot(snap)
        first.close()
        first.release()
        del first

        results = {}
        for kind in ("clones", "boots"):
            before = pss_mib()
            started = time.monotonic()
            vms = []
            try:
                for _ in range(args.count):
                    if kind == "clones":
                        vm = Vm.restore(snap)
                        vm.resume()
                    else:
                        vm = Vm(cfg)
                        vm.boot()
                    vms.append(vm)
                    vm.serial.wait_for("^vmkit-guest: tick [0-9]+$", timeout=120)
                elapsed = time.monotonic() - started
                time.sleep(0.5)
                per_vm = (pss_mib() - before) / args.count
            finally:
                for vm in vms:
                    vm.close()
                for vm in vms:
                    vm.release()
            results[kind] = (elapsed, per_vm)
        snapshot_disk = sum(p.stat().st_blocks * 512 for p in snap.iterdir()) / MIB
        processes = {"vmkit": vmkit_process_clones(snap, args.count)}
        if (CH_DIR / "cloud-hypervisor").exists():
            processes["ch"] = ch_process_clones(config(disk, args.warm), Path(work), args.count)
        if qemu_peer.qemu_path():
            processes["qemu"] = qemu_process_clones(disk, args.warm, Path(work), args.count)

    clones, boots = results["clones"], results["boots"]
    print(
        f"{args.count} VMs, 512 MiB each, guest warmed up with {args.warm} MiB read from disk; "
        f"snapshot on disk {snapshot_disk:.1f} MiB.\n"
    )
    print("| | clones (restore + resume) | boots (boot + warm-up) | clones / boots |")
    print("|---|---|---|---|")
    print(
        f"| {args.count} VMs running | {clones[0] * 1e3:.0f} ms | {boots[0] * 1e3:.0f} ms "
        f"| {clones[0] / boots[0]:.3f} \u00d7 |"
    )
    print(
        f"| Pss per VM | {clones[1]:.1f} MiB | {boots[1]:.1f} MiB "
        f"| {clones[1] / boots[1]:.2f} \u00d7 |"
    )
    print("\nClones in VMM processes of their own (restore + resume, one after the other):\n")
    names = {"vmkit": "vmkit", "ch": "Cloud Hypervisor", "qemu": "QEMU q35"}
    peers = [k for k in processes if k != "vmkit"]
    heads = [names[k] for k in processes] + [f"vmkit / {names[k]}" for k in peers]
    print("| | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for index, label, unit, scale in (
        (0, f"{args.count} clones running", "ms", 1e3),
        (1, "Pss per clone process", "MiB", 1.0),
    ):
        values = [processes[k][index] for k in processes]
        cells = [f"{v * scale:.1f} {unit}" for v in values]
        cells += [f"{values[0] / v:.3f} \u00d7" for v in values[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
