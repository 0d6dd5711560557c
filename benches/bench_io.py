"""virtio-blk throughput: vmkit against Cloud Hypervisor and QEMU, same test guest, one run.

Run: ``python benches/bench_io.py`` (``--markdown`` prints the table for
RESULTS.md). Needs ``qemu-system-x86_64`` (Debian: qemu-system-x86); Cloud
Hypervisor (``../shared/ch/cloud-hypervisor``) joins when present.

The test guest's ``blkbench`` step is a polling virtio-blk driver running at
CPL3 (natively, even on kvm_pvm): it keeps ``depth`` requests of ``size`` bytes
in flight on queue 0, kicks through the notify register (an ioeventfd on every
VMM) and times the whole run with rdtsc. Each row boots fresh VMs per VMM, the
VMMs' runs interleaved; the figures are medians, ratios are of medians of the
same run.

Every VMM gets one queue of 256 entries on a raw image in the page cache: vmkit
``--disk path=...,num_queues=1,queue_size=256`` (io_uring), Cloud Hypervisor
the same option (its raw-file backend on io_uring), QEMU ``-M q35`` with
``virtio-blk-pci,disable-legacy=on,num-queues=1,queue-size=256`` on
``-drive ...,cache=writeback,aio=io_uring``. Cloud Hypervisor v37 reports a
write's data length as its used length (the spec says 1), so its guest gets
``blkbench_lax_len=1``; the others are held to the spec.

Modes (one per invocation):
- idle (default): one VM at a time on an otherwise idle host;
- ``--vms N``: N VMs of the same VMM do the row at once (each on its own image);
  the figure is their aggregate: all bytes moved over the window from the first
  VM's start to the last VM's end (guest-timed, placed on the host clock by the
  arrival of each result line);
- ``--hog``: one busy-loop process per CPU, at normal priority, during the row.

``--vmm vmkit-cg`` adds vmkit with ``--cpu-groups true`` (its vCPU threads at
an eighth of its device threads' CPU weight, in cgroups of their own).
``--vmm qemu-vcpu`` adds QEMU with ``ioeventfd=off`` on the disk: the guest's
queue notifications exit to QEMU's vCPU thread, which submits the requests
itself (page-cache reads complete in that submission), so no IO thread
competes with the vCPU for the CPU; its CPU seconds per GiB leave that IO
work out with the vCPU threads, so they are not comparable.
Contended modes divide each VM's request count by the VMs and by 2 with
``--hog``, so that a mode takes minutes; ``--scale F`` multiplies every count
(each VM's run should last well over the VMs' start-up skew).

``--threads`` adds where each VMM's CPU time went during the run: ms on a
CPU and ms runnable but waiting for one, per second, for its vCPU threads, its
io_uring workers and its other threads (``/proc/<pid>/task/*/schedstat``),
with the busy loops (``--hog``) or the other VMs taking the rest.

Beside each figure: the VMM's CPU seconds per GiB moved: the CPU time
(utime + stime, ``/proc/<pid>/stat``, exited threads included) of the VMM
process less its vCPU threads' (``/proc/<pid>/task/*/stat``), so its device
workers, event loops and io_uring workers, between the guest's first serial
line and its result line (process start-up, an interpreter for vmkit, is not
counted). The vCPU threads are left out: they spin in the guest's polling loop,
and on kvm_pvm their guest time cannot be told from their exits. Clock ticks:
10 ms resolution, a few per cent of a run.

For the sequential rows in idle mode, "host thread" is the same transfer by one
host thread with ``preadv``/``pwritev`` on the same image from
huge-page-backed memory, ``depth`` requests per call (what a VMM that merges a
full queue issues); for writes it is a ceiling (ext4 serialises buffered
writes to one file).
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import plots
from machine import (
    CH,
    THREAD_CLASSES,
    Hogs,
    Runs,
    machine,
    qemu_binary,
    thread_times,
    vmm_cpu_seconds,
)
from vmkit import testguest

IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 256
VMMS = ("vmkit", "vmkit-cg", "ch", "qemu", "qemu-vcpu")
#: Run unless --vmm names others (vmkit-cg, vmkit --cpu-groups true, needs a writable cpu cgroup).
DEFAULT_VMMS = ("vmkit", "ch", "qemu")
#: The columns whose ratios to each other VMM are reported.
VMKITS = ("vmkit", "vmkit-cg")
NAMES = {
    "vmkit": "vmkit",
    "vmkit-cg": "vmkit --cpu-groups",
    "ch": "Cloud Hypervisor",
    "qemu": "QEMU q35",
    "qemu-vcpu": "QEMU q35 ioeventfd=off",
}


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


# Each run moves several GiB or a few hundred thousand requests (a few tenths of a second
# idle): steady state, not the first pass through the page cache.
ROWS = [
    Row("read", 128 << 10, 1, 20000),
    Row("read", 128 << 10, 32, 40000),
    Row("write", 128 << 10, 1, 20000),
    Row("write", 128 << 10, 32, 40000),
    Row("randread", 4096, 1, 100000),
    Row("randread", 4096, 32, 300000),
]

RESULT = re.compile(
    rb"step blkbench ok mode=\S+ size=\d+ depth=\d+ requests=(\d+) tsc=(\d+)(?: ns=(\d+))?[^\n]*\n"
)
FAILED = re.compile(rb"step blkbench fail[^\n]*")


def cmdline(row: Row, lax_len: bool = False) -> str:
    return testguest.cmdline(
        ["blkbench"],
        "poweroff",
        blkbench_mode=row.mode,
        blkbench_size=row.size,
        blkbench_depth=row.depth,
        blkbench_count=row.count,
        **({"blkbench_lax_len": 1} if lax_len else {}),
    )


def vmkit_command(kernel: Path, image: Path, row: Row) -> list[str]:
    return [
        sys.executable, "-m", "vmkit",
        "--kernel", str(kernel), "--cmdline", cmdline(row),
        "--cpus", "boot=1", "--memory", "size=512M",
        "--disk", f"path={image},num_queues=1,queue_size={QUEUE_SIZE}",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def ch_command(kernel: Path, image: Path, row: Row) -> list[str]:
    return [
        str(CH),
        "--kernel", str(kernel), "--cmdline", cmdline(row, lax_len=True),
        "--cpus", "boot=1", "--memory", "size=512M",
        "--disk", f"path={image},num_queues=1,queue_size={QUEUE_SIZE}",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def qemu_command(
    qemu: str, kernel: Path, image: Path, row: Row, ioeventfd: bool = True
) -> list[str]:
    return [
        qemu, "-M", "q35", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-name", "bench,debug-threads=on",
        "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-drive", f"if=none,id=d0,file={image},format=raw,cache=writeback,aio=io_uring",
        "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=1,"
        f"queue-size={QUEUE_SIZE}" + ("" if ioeventfd else ",ioeventfd=off"),
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


@dataclass
class VmResult:
    requests: int
    ticks: int
    ns: int | None
    end: float  # host monotonic time its result line arrived
    cpu: float  # VMM CPU seconds from the first serial line to the result line
    #: Per thread class, ms on a CPU and ms waiting for one per second, over the same span.
    threads: dict[str, tuple[float, float]]


class Running:
    """One VMM process, its serial output read as it comes."""

    def __init__(
        self,
        command: list[str],
        log: IO[bytes],
        env: dict[str, str] | None,
        track_threads: bool = False,
    ) -> None:
        self.command = command
        self.track_threads = track_threads
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=None if env is None else {**os.environ, **env},
        )
        self.log = log
        self.out = bytearray()
        self.cpu_start: float | None = None
        # thread_times at the first serial line; each thread's latest sample since
        # (kept after it exits: the VMM may end its device threads before its
        # result line is read), and when the latest sample was taken.
        self.threads_start: dict[int, tuple[str, int, int]] | None = None
        self.threads_seen: dict[int, tuple[str, int, int]] = {}
        self.threads_span: tuple[float, float] | None = None
        self.result: VmResult | None = None

    def feed(self, chunk: bytes) -> None:
        self.out.extend(chunk)
        if self.cpu_start is None and b"\n" in self.out:
            self.cpu_start = vmm_cpu_seconds(self.proc.pid)
            if self.track_threads:
                now = time.monotonic()
                self.threads_start = thread_times(self.proc.pid)
                self.threads_span = (now, now)
        if self.result is None and (m := RESULT.search(self.out)):
            now = time.monotonic()
            cpu = vmm_cpu_seconds(self.proc.pid) - (self.cpu_start or 0.0)
            ns = int(m.group(3)) if m.group(3) else None
            self.result = VmResult(int(m.group(1)), int(m.group(2)), ns, now, cpu, self.split())

    def sample_threads(self) -> None:
        """Takes each thread's latest times while the run goes on."""
        if self.threads_span is None or self.result is not None:
            return
        try:
            latest = thread_times(self.proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            return  # exiting: the previous samples stand
        self.threads_seen.update(latest)
        self.threads_span = (self.threads_span[0], time.monotonic())

    def split(self) -> dict[str, tuple[float, float]]:
        """Per thread class, ms on a CPU and ms waiting per second, from the
        first serial line to the last sample."""
        threads = {kind: (0.0, 0.0) for kind in THREAD_CLASSES}
        if self.threads_start is None or self.threads_span is None:
            return threads
        seconds = self.threads_span[1] - self.threads_span[0]
        if seconds <= 0:
            return threads
        for tid, (kind, ran, waited) in self.threads_seen.items():
            _, ran0, waited0 = self.threads_start.get(tid, (kind, 0, 0))
            before = threads[kind]
            threads[kind] = (
                before[0] + (ran - ran0) / 1e6 / seconds,
                before[1] + (waited - waited0) / 1e6 / seconds,
            )
        return threads

    def failure(self) -> str:
        self.log.seek(0)
        m = FAILED.search(self.out)
        detail = m.group(0) if m else bytes(self.out[-2000:])
        return (
            f"{self.command[0]} exited with {self.proc.returncode}: "
            f"{detail.decode(errors='replace')}\n{self.log.read()[-2000:].decode(errors='replace')}"
        )


def run_group(
    commands: list[list[str]], env: dict[str, str] | None = None, track_threads: bool = False
) -> list[VmResult]:
    """Starts every command at once (with `env` added to the environment); their
    results once all have exited. `track_threads`: sample each VMM's thread
    times every 0.1 s (``VmResult.threads``)."""
    logs = [tempfile.TemporaryFile() for _ in commands]
    try:
        vms = [
            Running(command, log, env, track_threads)
            for command, log in zip(commands, logs, strict=True)
        ]
        with selectors.DefaultSelector() as selector:
            for vm in vms:
                assert vm.proc.stdout is not None
                selector.register(vm.proc.stdout, selectors.EVENT_READ, vm)
            deadline = time.monotonic() + 300
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.1 if track_threads else 1):
                    vm = key.data
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        vm.feed(chunk)
                    else:
                        selector.unregister(key.fileobj)
                if track_threads:
                    for vm in vms:
                        vm.sample_threads()
        results = []
        for vm in vms:
            try:
                vm.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                vm.proc.kill()
                vm.proc.wait()
            assert vm.proc.stdout is not None
            vm.proc.stdout.close()
            if vm.proc.returncode != 0 or vm.result is None:
                raise RuntimeError(vm.failure())
            results.append(vm.result)
        return results
    finally:
        for log in logs:
            log.close()


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


@dataclass
class Sample:
    rate: float  # aggregate, the row's unit
    cpu_per_gib: float
    #: Per thread class, summed over the VMs: ms on a CPU, ms waiting, per second.
    threads: dict[str, tuple[float, float]]


def measure(
    row: Row,
    commands: list[list[str]],
    tsc_khz: float,
    env: dict[str, str] | None = None,
    track_threads: bool = False,
) -> Sample:
    results = run_group(commands, env, track_threads)
    starts = [r.end - r.ticks / (tsc_khz * 1e3) for r in results]
    window = max(r.end for r in results) - min(starts)
    requests = sum(r.requests for r in results)
    gib = requests * row.size / (1 << 30)
    threads = {
        kind: (
            sum(r.threads[kind][0] for r in results),
            sum(r.threads[kind][1] for r in results),
        )
        for kind in THREAD_CLASSES
    }
    return Sample(rate(row, requests, window), sum(r.cpu for r in results) / gib, threads)


def make_image(path: Path) -> None:
    from vmkit._progress import Progress

    with path.open("wb") as f, Progress(f"making {path.name}", total=IMAGE_SIZE, unit="bytes") as p:
        # Real data (not a sparse hole) so reads hit the page cache.
        chunk = os.urandom(1 << 20)
        for i in range(IMAGE_SIZE >> 20):
            f.write(chunk)
            p.update((i + 1) << 20)


def plot(
    path: Path,
    mode: str,
    rows: list[str],
    units: list[str],
    figures: dict[str, list[float]],
    spread: dict[str, list[tuple[float, float]]],
    subtitle: str,
) -> Path | None:
    """The IO chart: a panel per unit (MB/s rows, IOPS rows), a bar per VMM."""
    panels = []
    for unit, what in (("MB/s", "throughput, MB/s"), ("IOPS", "requests per second (IOPS)")):
        index = [i for i, u in enumerate(units) if u == unit]
        if not index:
            continue
        panel = {
            name: [values[i] for i in index]
            for name, values in figures.items()
            if any(not math.isnan(values[i]) for i in index)
        }
        panel_spread = {
            name: [got[i] for i in index] for name, got in spread.items() if name in panel
        }
        panels.append(plots.Bars(unit, what, [rows[i] for i in index], panel, panel_spread))
    return plots.bar_chart(
        path, f"Block IO, virtio-blk (test guest's blkbench): {mode}", subtitle, panels
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=1, help="VMs per VMM doing each row at once")
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during each row")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every row's request count (longer runs: less start-up skew between VMs)",
    )
    parser.add_argument("--vmm", action="append", choices=VMMS, help="only these VMMs")
    parser.add_argument("--row", action="append", type=int, help="only these rows (0-5)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="also run vmkit with these environment variables, as VMM LABEL (A/B runs)",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="also report where each VMM's CPU time went: vCPU threads, io_uring workers, the rest",
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--plot", type=Path, help="the chart (PNG) to write (default: plots/io-MODE.png)"
    )
    args = parser.parse_args()
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        label, _, assignments = spec.partition(":")
        pairs = [a.partition("=") for a in assignments.split(",") if a]
        if not label or label in VMMS or any(not name or not eq for name, eq, _ in pairs):
            parser.error(f"--variant {spec!r}: expected LABEL:NAME=VALUE[,NAME=VALUE]")
        variants[label] = {name: value for name, _, value in pairs}
    if args.vms < 1:
        parser.error(f"--vms {args.vms}: at least 1")
    qemu = qemu_binary()
    vmms = [v for v in args.vmm or DEFAULT_VMMS if v != "ch" or CH.exists()] + list(variants)
    if qemu is None and ("qemu" in vmms or "qemu-vcpu" in vmms):
        return 1
    if not CH.exists():
        print(f"{CH} is missing: no Cloud Hypervisor column", file=sys.stderr)
    rows = [ROWS[i] for i in args.row] if args.row else ROWS
    kernel = testguest.image_path("pvh")

    def command(vmm: str, image: Path, row: Row) -> list[str]:
        if vmm == "vmkit" or vmm in variants:
            return vmkit_command(kernel, image, row)
        if vmm == "vmkit-cg":
            return [*vmkit_command(kernel, image, row), "--cpu-groups", "true"]
        if vmm == "ch":
            return ch_command(kernel, image, row)
        assert qemu is not None
        return qemu_command(qemu, kernel, image, row, ioeventfd=vmm != "qemu-vcpu")

    idle = args.vms == 1 and not args.hog
    table: list[tuple[Row, dict[str, Sample], float | None]] = []
    runs_of: dict[tuple[str, str], list[float]] = {}  # (row, vmm) -> each run's rate
    host_runs: dict[str, list[float]] = {}
    runs = Runs("bench_io", len(rows) * args.runs * len(vmms))
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-io-") as tmp:
        images = [Path(tmp) / f"disk{i}.img" for i in range(args.vms)]
        for image in images:
            make_image(image)
        # The TSC rate vmkit gives its guest (CPUID 0x40000010), which is the host's.
        _, ticks, ns = run(vmkit_command(kernel, images[0], Row("randread", 4096, 1, 1000)))
        if not ns:
            raise RuntimeError("vmkit's guest reported no ns (no TSC leaf?)")
        tsc_khz = ticks * 1e6 / ns
        with runs:
            for row in rows:
                # Contended rows move less per VM, so that a mode takes minutes.
                share = args.vms * (2 if args.hog else 1)
                count = int(row.count * args.scale) // share
                scaled = Row(row.mode, row.size, row.depth, max(1000, count))
                samples: dict[str, list[Sample]] = {vmm: [] for vmm in vmms}
                host: list[float] = []
                for run_index in range(args.runs):
                    for vmm in vmms:
                        runs.start(
                            f"{row.label}, run {run_index + 1}/{args.runs}, {NAMES.get(vmm, vmm)}"
                        )
                        with Hogs(args.hog):
                            commands = [command(vmm, image, scaled) for image in images]
                            samples[vmm].append(
                                measure(row, commands, tsc_khz, variants.get(vmm), args.threads)
                            )
                    if idle and (h := host_rate(images[0], row)) is not None:
                        host.append(h)
                for vmm, got in samples.items():
                    runs_of[(row.label, vmm)] = [s.rate for s in got]
                host_runs[row.label] = host
                medians = {
                    vmm: Sample(
                        statistics.median(s.rate for s in got),
                        statistics.median(s.cpu_per_gib for s in got),
                        {
                            kind: (
                                statistics.median(s.threads[kind][0] for s in got),
                                statistics.median(s.threads[kind][1] for s in got),
                            )
                            for kind in THREAD_CLASSES
                        },
                    )
                    for vmm, got in samples.items()
                }
                h = statistics.median(host) if host else None
                table.append((row, medians, h))
                if not args.markdown:
                    cells = "  ".join(
                        f"{vmm} {m.rate:11.1f} ({m.cpu_per_gib:5.2f} s/GiB)"
                        for vmm, m in medians.items()
                    )
                    ratios = "  ".join(
                        f"{kit}/{vmm} {medians[kit].rate / medians[vmm].rate:.2f}"
                        for kit in VMKITS
                        if kit in medians
                        for vmm in vmms
                        if vmm not in VMKITS
                    )
                    runs.print(f"{row.label:36} {row.unit:4} {cells}  {ratios}")
                    if args.threads:
                        for vmm, m in medians.items():
                            runs.print(f"{'':41} {vmm:10} {thread_split(m)}")
    if args.markdown:
        print_markdown(args, vmms, table, kernel, qemu)
    mode, slug = "idle host, one VM", "idle"
    if args.vms > 1:
        mode, slug = f"{args.vms} VMs per VMM doing IO at once (aggregate)", f"vms{args.vms}"
    if args.hog:
        mode += f", a busy loop on each of the {os.cpu_count()} CPUs"
        slug = "hog" if args.vms == 1 else f"{slug}-hog"
    labels = [row.label for row, _, _ in table]
    figures = {NAMES.get(v, v): [m[v].rate for _, m, _ in table] for v in vmms}
    spread = {NAMES.get(v, v): [plots.spread(runs_of[(r, v)]) for r in labels] for v in vmms}
    if any(h for _, _, h in table):
        figures["host thread"] = [h if h else math.nan for _, _, h in table]
        spread["host thread"] = [plots.spread(host_runs[r]) for r in labels]
    plots.wrote(
        plot(
            args.plot or plots.PLOT_DIR / f"io-{slug}.png",
            mode,
            labels,
            [row.unit for row, _, _ in table],
            figures,
            spread,
            f"{machine()}\nmedians of {args.runs} runs per cell; whiskers: lowest to highest run",
        )
    )
    return 0


def thread_split(sample: Sample) -> str:
    """``vCPU 547/455, io_uring workers 0/0, other 467/474`` (ms run/waited per s)."""
    return ", ".join(
        f"{kind} {ran:.0f}/{waited:.0f}" for kind, (ran, waited) in sample.threads.items()
    )


def print_markdown(
    args: argparse.Namespace,
    vmms: list[str],
    table: list[tuple[Row, dict[str, Sample], float | None]],
    kernel: Path,
    qemu: str | None,
) -> None:
    mode = "idle host"
    if args.vms > 1:
        mode = f"{args.vms} VMs per VMM at once (aggregate)"
    if args.hog:
        mode += f", a busy loop on each of the {os.cpu_count()} CPUs"
    print(f"Machine: {machine()}\n")
    print(f"Mode: {mode}; runs per row and VMM: {args.runs} (medians); "
          f"image {IMAGE_SIZE >> 20} MiB per VM\n")  # fmt: skip
    kits = [v for v in VMKITS if v in vmms]
    others = [v for v in vmms if v not in VMKITS]

    def name(vmm: str) -> str:
        return NAMES.get(vmm, vmm)

    head = [name(v) for v in vmms] + [f"{name(k)} / {name(v)}" for k in kits for v in others]
    head += [f"{name(v)} CPU s/GiB" for v in vmms]
    with_host = any(h for _, _, h in table)
    if with_host:
        head.append("host thread")
    print("| workload | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for row, medians, h in table:
        cells = [f"{medians[v].rate:,.1f} {row.unit}" for v in vmms]
        cells += [f"{medians[k].rate / medians[v].rate:.2f}" for k in kits for v in others]
        cells += [f"{medians[v].cpu_per_gib:.2f}" for v in vmms]
        if with_host:
            cells.append(f"{h:,.1f} {row.unit}" if h else "—")
        print(f"| {row.label} | " + " | ".join(cells) + " |")
    if args.threads:
        print(
            "\nWhere the CPU went (ms on a CPU / ms runnable but waiting, per second of the run,"
            " all VMs together):\n"
        )
        print("| workload | " + " | ".join(name(v) for v in vmms) + " |")
        print("|---" * (len(vmms) + 1) + "|")
        for row, medians, _ in table:
            print(f"| {row.label} | " + " | ".join(thread_split(medians[v]) for v in vmms) + " |")
    sample = ROWS[0]
    print(f"\nvmkit: `{' '.join(vmkit_command(kernel, Path('disk.img'), sample))}`\n")
    if "ch" in vmms:
        print(f"Cloud Hypervisor: `{' '.join(ch_command(kernel, Path('disk.img'), sample))}`\n")
    if qemu is not None and "qemu" in vmms:
        print(f"QEMU: `{' '.join(qemu_command(qemu, kernel, Path('disk.img'), sample))}`")


if __name__ == "__main__":
    sys.exit(main())
