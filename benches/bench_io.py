"""virtio-blk throughput: vmkit against QEMU, same test guest, same image, one run.

Run: ``python benches/bench_io.py`` (``--markdown`` prints the table for
RESULTS.md). Needs ``qemu-system-x86_64`` (Debian: qemu-system-x86).

The test guest's ``blkbench`` step is a polling virtio-blk driver running at
CPL3 (natively, even on kvm_pvm): it keeps ``depth`` requests of ``size`` bytes
in flight on queue 0, kicks through the notify register (an ioeventfd on both
VMMs) and times the whole run with rdtsc. Each row boots a fresh VM per VMM,
the runs interleaved; the figures are medians.

Both VMMs get one queue of 256 entries on a raw image in the page cache: vmkit
``--disk path=...,num_queues=1,queue_size=256`` (io_uring), QEMU ``-M q35``
with ``virtio-blk-pci,disable-legacy=on,num-queues=1,queue-size=256`` on
``-drive ...,cache=writeback,aio=io_uring``. TSC ticks become seconds with the
TSC rate vmkit gives its guest (CPUID 0x40000010), which is the host's.

For the sequential rows a third figure, "host thread", is the same transfer by
one host thread with ``preadv``/``pwritev`` on the same image from
huge-page-backed memory, ``depth`` requests per call (what a VMM that merges a
full queue issues). Both VMMs end in such calls, and ext4 serialises buffered
writes to one file, so for writes it is a ceiling neither can pass.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import machine, qemu_binary
from vmkit import testguest

IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 256


@dataclass(frozen=True)
class Row:
    mode: str
    size: int
    depth: int
    count: int

    @property
    def label(self) -> str:
        kind = {"read": "sequential read", "write": "sequential write", "randread": "random read"}
        return f"{kind[self.mode]} {self.size // 1024} KiB, depth {self.depth}"

    @property
    def unit(self) -> str:
        return "IOPS" if self.mode == "randread" else "MB/s"


# Each run moves several GiB or a few hundred thousand requests (a few tenths of a second):
# steady state, not the first pass through the page cache.
ROWS = [
    Row("read", 128 << 10, 1, 20000),
    Row("read", 128 << 10, 32, 40000),
    Row("write", 128 << 10, 1, 20000),
    Row("write", 128 << 10, 32, 40000),
    Row("randread", 4096, 1, 100000),
    Row("randread", 4096, 32, 300000),
]

RESULT = re.compile(
    rb"step blkbench ok mode=\S+ size=\d+ depth=\d+ requests=(\d+) tsc=(\d+)(?: ns=(\d+))?"
)


def cmdline(row: Row) -> str:
    return testguest.cmdline(
        ["blkbench"],
        "poweroff",
        blkbench_mode=row.mode,
        blkbench_size=row.size,
        blkbench_depth=row.depth,
        blkbench_count=row.count,
    )


def vmkit_command(kernel: Path, image: Path, row: Row) -> list[str]:
    return [
        sys.executable, "-m", "vmkit",
        "--kernel", str(kernel), "--cmdline", cmdline(row),
        "--cpus", "boot=1", "--memory", "size=512M",
        "--disk", f"path={image},num_queues=1,queue_size={QUEUE_SIZE}",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def qemu_command(qemu: str, kernel: Path, image: Path, row: Row) -> list[str]:
    return [
        qemu, "-M", "q35", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-drive", f"if=none,id=d0,file={image},format=raw,cache=writeback,aio=io_uring",
        "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=1,"
        f"queue-size={QUEUE_SIZE}",
        "-kernel", str(kernel), "-append", cmdline(row),
    ]  # fmt: skip


def run(command: list[str]) -> tuple[int, int, int | None]:
    """(requests, tsc ticks, ns or None) from one boot."""
    proc = subprocess.run(command, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    m = RESULT.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(
            f"{command[0]} exited with {proc.returncode}:\n"
            f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def rate(row: Row, requests: int, seconds: float) -> float:
    if row.unit == "IOPS":
        return requests / seconds
    return requests * row.size / seconds / 1e6


def host_rate(image: Path, row: Row) -> float | None:
    """MB/s of one host thread doing the row's transfer; None for random rows."""
    if row.mode == "randread":
        return None  # a Python loop's per-call cost would swamp 4 KiB requests
    chunk = row.size * row.depth
    buffer = mmap.mmap(-1, chunk)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    buffer.write(bytes(range(256)) * (chunk // 256))
    io = os.pwritev if row.mode == "write" else os.preadv
    total = row.count * row.size
    fd = os.open(image, os.O_RDWR)
    try:
        start = time.perf_counter()
        done = 0
        while done < total:
            io(fd, [buffer], done % IMAGE_SIZE)
            done += chunk
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        buffer.close()
    return done / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    qemu = qemu_binary()
    if qemu is None:
        return 1
    kernel = testguest.image_path("pvh")
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-io-") as tmp:
        image = Path(tmp) / "disk.img"
        with image.open("wb") as f:
            # Real data (not a sparse hole) so reads hit the page cache.
            chunk = os.urandom(1 << 20)
            for _ in range(IMAGE_SIZE >> 20):
                f.write(chunk)
        table = []
        tsc_khz: float | None = None
        for row in ROWS:
            ours: list[int] = []
            theirs: list[int] = []
            host: list[float] = []
            requests = row.count
            for _ in range(args.runs):
                n, ticks, ns = run(vmkit_command(kernel, image, row))
                if ns:
                    tsc_khz = ticks * 1e6 / ns
                ours.append(ticks)
                requests = n
                theirs.append(run(qemu_command(qemu, kernel, image, row))[1])
                if (h := host_rate(image, row)) is not None:
                    host.append(h)
            if tsc_khz is None:
                raise RuntimeError("vmkit's guest reported no ns (no TSC leaf?)")
            v = rate(row, requests, statistics.median(ours) / (tsc_khz * 1e3))
            q = rate(row, requests, statistics.median(theirs) / (tsc_khz * 1e3))
            h = statistics.median(host) if host else None
            table.append((row, v, q, h))
            if not args.markdown:
                print(
                    f"{row.label:36} vmkit {v:12.1f} {row.unit:5} QEMU {q:12.1f}  ratio {v / q:.2f}"
                    + (f"  host {h:9.1f}" if h else "")
                )
    if args.markdown:
        print(f"Machine: {machine()}\n")
        print(f"Runs per row and VMM: {args.runs} (medians); image {IMAGE_SIZE >> 20} MiB\n")
        print("| workload | vmkit | QEMU q35 | vmkit / QEMU | host thread |")
        print("|---|---|---|---|---|")
        for row, v, q, h in table:
            host_cell = f"{h:,.1f} {row.unit}" if h else "—"
            print(
                f"| {row.label} | {v:,.1f} {row.unit} | {q:,.1f} {row.unit} | {v / q:.2f} "
                f"| {host_cell} |"
            )
        sample = ROWS[0]
        print(f"\nvmkit: `{' '.join(vmkit_command(kernel, Path('disk.img'), sample))}`\n")
        print(f"QEMU: `{' '.join(qemu_command(qemu, kernel, Path('disk.img'), sample))}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
