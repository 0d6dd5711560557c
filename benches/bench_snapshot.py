"""Snapshot and restore: vmkit against Cloud Hypervisor (both driven by the real
``ch-remote`` over their APIs) and QEMU microvm (over QMP), same guest, runs
interleaved.

Run: ``python benches/bench_snapshot.py`` (``--runs N``, ``--sizes 256M,2G``).
Needs /dev/kvm and ``../shared/ch/`` (``cloud-hypervisor`` and ``ch-remote``);
QEMU (``qemu-system-x86_64``) where installed.

Each run: the VMM boots the test guest (1 vCPU), which prints a tick line
every 20 ms; once it has printed a few, ``ch-remote pause`` and ``ch-remote
snapshot file://<dir>`` (timed: *snapshot*). The VMM is stopped; a fresh,
idle VMM process gets ``ch-remote restore source_url=file://<dir>`` (timed:
*restore*) and ``ch-remote resume``; *restore → ticking* is from the restore
request to the guest's next tick line in its serial file. Also reported: the
snapshot directory's size on disk. Cloud Hypervisor runs with ``--seccomp
false``: at this revision its filter kills it on a snapshot request here.
QEMU: ``stop`` and ``migrate`` to a file, then a new QEMU's ``migrate-incoming``
from it and ``cont`` (``qemu_peer.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import machine
import qemu_peer
from vmkit import VmConfig, testguest

ROOT = Path(__file__).resolve().parent.parent
CH_DIR = ROOT.parent / "shared" / "ch"
TIMES = "\u00d7"


def vmm_argv(kind: str, sock: Path) -> list[str]:
    if kind == "ch":
        return [
            str(CH_DIR / "cloud-hypervisor"),
            "--api-socket",
            f"path={sock}",
            "--seccomp",
            "false",
        ]
    return [sys.executable, "-m", "vmkit", "--api-socket", str(sock)]


def start(kind: str, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        vmm_argv(kind, sock), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return proc
        except OSError:
            time.sleep(0.005)
    proc.kill()
    raise RuntimeError(f"{kind} did not listen on {sock}")


def stop(proc: subprocess.Popen[bytes], sock: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sock.unlink(missing_ok=True)


def remote(sock: Path, *args: str) -> None:
    result = subprocess.run(
        [str(CH_DIR / "ch-remote"), "--api-socket", str(sock), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ch-remote {' '.join(args)}: {result.stderr.strip()}")


def ticks(serial: Path) -> int:
    try:
        return serial.read_text(errors="replace").count("vmkit-guest: tick ")
    except FileNotFoundError:
        return 0


def wait_ticks(serial: Path, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while ticks(serial) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{serial}: fewer than {count} ticks")
        time.sleep(0.001)


def disk_usage(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir())


def one_run(kind: str, size: str, work: Path) -> dict[str, float]:
    serial = work / "serial.log"
    snap = work / "snap"
    snap.mkdir()
    if kind == "qemu":
        return one_qemu_run(size, work, serial, snap)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello", "ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--memory", f"size={size}", "--serial", f"file={serial}", "--console", "off",
    ])  # fmt: skip
    (work / "vm.json").write_text(config.to_json())
    sock = work / "api.sock"
    proc = start(kind, sock)
    try:
        remote(sock, "create", str(work / "vm.json"))
        remote(sock, "boot")
        wait_ticks(serial, 5)
        remote(sock, "pause")
        started = time.monotonic()
        remote(sock, "snapshot", f"file://{snap}")
        snapshot = time.monotonic() - started
    finally:
        stop(proc, sock)
    on_disk = disk_usage(snap)
    proc = start(kind, sock)
    try:
        started = time.monotonic()
        remote(sock, "restore", f"source_url=file://{snap}")
        restore = time.monotonic() - started
        seen = ticks(serial)
        remote(sock, "resume")
        wait_ticks(serial, seen + 1)
        progress = time.monotonic() - started
    finally:
        stop(proc, sock)
    shutil.rmtree(snap)
    serial.unlink(missing_ok=True)
    return {"snapshot": snapshot, "restore": restore, "progress": progress, "disk": on_disk}


def one_qemu_run(size: str, work: Path, serial: Path, snap: Path) -> dict[str, float]:
    qemu = qemu_peer.qemu_path()
    assert qemu is not None
    cmdline = testguest.cmdline(["hello", "ticks"], "poweroff", ticks=100000, tick_ms=20)
    state = snap / "state"
    proc, qmp = qemu_peer.start(qemu, size, cmdline, serial, work / "qmp.sock")
    try:
        wait_ticks(serial, 5)
        qmp.execute("stop")
        started = time.monotonic()
        qmp.execute("migrate", uri=f"exec:cat > {state}")
        qmp.wait_migration()
        snapshot = time.monotonic() - started
    finally:
        qemu_peer.stop(proc, qmp)
    on_disk = disk_usage(snap)
    # A fresh serial file, as the other VMMs' restores open theirs afresh.
    serial.unlink()
    proc, qmp = qemu_peer.start(qemu, size, cmdline, serial, work / "qmp2.sock", incoming="defer")
    try:
        started = time.monotonic()
        qmp.execute("migrate-incoming", uri=f"exec:cat {state}")
        qmp.wait_migration()
        restore = time.monotonic() - started
        seen = ticks(serial)
        qmp.execute("cont")
        wait_ticks(serial, seen + 1)
        progress = time.monotonic() - started
    finally:
        qemu_peer.stop(proc, qmp)
    shutil.rmtree(snap)
    serial.unlink(missing_ok=True)
    return {"snapshot": snapshot, "restore": restore, "progress": progress, "disk": on_disk}


Medians = dict[str, dict[str, float]]
NAMES = {"vmkit": "vmkit", "ch": "Cloud Hypervisor", "qemu": "QEMU microvm"}


def peers() -> tuple[str, ...]:
    """The VMMs to run: vmkit, Cloud Hypervisor, and QEMU where installed."""
    return ("vmkit", "ch", "qemu") if qemu_peer.qemu_path() else ("vmkit", "ch")


def interleaved_medians(
    sizes: str,
    runs: int,
    one_run: Callable[[str, str, Path], dict[str, float]],
    prefix: str,
    kinds: tuple[str, ...] = ("vmkit", "ch"),
) -> list[tuple[str, Medians]]:
    """``one_run(kind, size, workdir)`` ``runs`` times per guest size, each VMM of
    ``kinds`` in turn; each measure's median per VMM, per size. Prints the
    table's head."""
    rows = []
    progress = machine.Runs(Path(sys.argv[0]).stem, len(sizes.split(",")) * runs * len(kinds))
    for size in sizes.split(","):
        results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        with progress:
            for i in range(runs):
                for kind in kinds:
                    progress.start(f"guest RAM {size}, run {i + 1}/{runs}, {kind}")
                    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as work:
                        results[kind].append(one_run(kind, size, Path(work)))
        rows.append((
            size,
            {k: {m: statistics.median(r[m] for r in results[k]) for m in results[k][0]}
             for k in kinds},
        ))  # fmt: skip
    peers = kinds[1:]
    print(f"Medians of {runs} interleaved runs; ratios are vmkit's figure over each peer's.\n")
    names = [NAMES[k] for k in kinds]
    ratios = [f"vmkit / {NAMES[k]}" for k in peers]
    print("| guest RAM | measure | " + " | ".join(names + ratios) + " |")
    print("|---|---|" + "---|" * (len(names) + len(ratios)))
    return rows


def print_times(size: str, med: Medians, measures: tuple[tuple[str, str], ...]) -> None:
    """A table row per (measure, label): each VMM's median in ms, then vmkit's
    ratio to each peer."""
    for key, label in measures:
        values = [med[k][key] for k in med]
        times = " | ".join(f"{v * 1e3:.1f} ms" for v in values)
        ratios = " | ".join(f"{values[0] / v:.2f} {TIMES}" for v in values[1:])
        print(f"| {size} | {label} | {times} | {ratios} |")


def side_by_side_args(description: str | None, hog: bool = False) -> argparse.Namespace:
    """``--runs`` and ``--sizes`` (and ``--hog`` if asked for); exits without
    Cloud Hypervisor; prints the machine."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="256M,2G")
    if hog:
        parser.add_argument("--hog", action="store_true", help="a busy loop per CPU throughout")
    args = parser.parse_args()
    if not (CH_DIR / "cloud-hypervisor").exists():
        sys.exit(f"no Cloud Hypervisor in {CH_DIR}")
    print(f"Machine: {machine.machine()}\n")
    return args


def main() -> None:
    args = side_by_side_args(__doc__)
    rows = interleaved_medians(args.sizes, args.runs, one_run, "vmkit-bench-snap-", peers())
    for size, med in rows:
        print_times(size, med, (
            ("snapshot", "snapshot (paused VM → files written)"),
            ("restore", "restore (request → Paused VM)"),
            ("progress", "restore → guest ticking again"),
        ))  # fmt: skip
        values = [med[k]["disk"] for k in med]
        sizes = " | ".join(f"{v / 2**20:.1f} MiB" for v in values)
        ratios = " | ".join(f"{values[0] / v:.3f} {TIMES}" for v in values[1:])
        print(f"| {size} | snapshot on disk | {sizes} | {ratios} |")


if __name__ == "__main__":
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    main()
