"""Fleet figures: N VMs started at once, their memory, and stopping them.

vmkit's three ways to run a VM (the ``vmkit`` CLI, ``Vm.spawn()``, an
in-process ``Vm``) against Cloud Hypervisor (``../shared/ch/cloud-hypervisor``)
and QEMU microvm, same test guest, same run, N = 1, 4, 16, 32.

Run: ``python benches/bench_density.py`` (prints a markdown table for
RESULTS.md; ``--counts 1,4`` and ``--runs`` change the sweep). A missing peer
binary leaves its column out, with a note. Run it from a virtual environment
(``python -m venv``): a site-packages ``.pth`` hook (some images install one)
adds its cost to every interpreter start, which would be charged to vmkit's
CLI.

Each VM: the test guest's PVH image, 1 vCPU, 256 MiB, command line
``steps=hello exit=halt``: it prints its ``ready`` line, then halts with
interrupts off, idle. Figures per mode and N, medians over ``--runs``
interleaved rounds:

- start: from launching all N at once (processes started back to back; for
  ``Vm.spawn`` and in-process VMs one thread per VM, each making its VM and
  booting it) until every guest's ``ready`` line has arrived. Serial output
  goes to a pipe (a FIFO for ``Vm.spawn``) read by one selector thread that
  stamps arrivals; in process, ``serial.wait_for``.
- memory: Pss per VM once all are up: the VMM processes' Pss (``Vm.spawn``:
  the VM processes, with the fork server's own Pss and this program's growth
  per VM in notes), in process the growth of this process's Pss, over N.
- stop: from asking every VM to stop at once (SIGTERM to each process;
  ``vmkit.close_all`` of the spawned VMs, which returns once every process is
  reaped and its files removed; ``Vm.close()`` of each in-process VM in turn,
  then ``release()`` of each) until every process has exited and been reaped
  (every in-process VM's KVM VM and memory freed).

Also: ``import vmkit`` (a fresh interpreter's ``import vmkit`` minus
``pass``) and the fork server's start (the first ``Vm.spawn``'s extra cost).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import plots
import vmkit
from bench_boot import qemu_command
from machine import CH, Runs, machine, reap
from vmkit import Vm, VmConfig, _forkserver, testguest
from vmkit.client import SpawnedVm
from vmkit.config import ConsoleConfig

READY = b"vmkit-guest: ready"
MEMORY_MIB = 256
MODES = ("vmkit CLI", "Vm.spawn", "in process", "Cloud Hypervisor", "QEMU microvm")


def pss_mib(pid: int | str) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Arrivals:
    """One thread that reads every serial pipe and stamps each VM's ready line."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.ready: dict[int, float] = {}
        self.buffers: dict[int, bytes] = {}
        self.tokens: dict[int, object] = {}
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def watch(self, fd: int) -> None:
        os.set_blocking(fd, False)
        with self.lock:
            self.buffers[fd] = b""
            # Its own token: an event select() returned for an earlier pipe
            # under the same number must not read (and end) this one.
            self.tokens[fd] = self.selector.register(fd, selectors.EVENT_READ, object()).data

    def run(self) -> None:
        while not self.stop:
            with self.lock:
                empty = not self.buffers
            if empty:
                time.sleep(0.001)
                continue
            for key, _ in self.selector.select(0.01):
                fd = key.fd
                # Read under the lock: forget() cannot then close the pipe
                # between the token's check and the read.
                with self.lock:
                    if self.tokens.get(fd) is not key.data:
                        continue  # forgotten since select() returned it
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    now = time.monotonic()
                    if not chunk:
                        self.selector.unregister(fd)
                        del self.buffers[fd], self.tokens[fd]
                        continue
                    data = self.buffers[fd] + chunk
                    if fd not in self.ready and READY in data:
                        self.ready[fd] = now
                    self.buffers[fd] = data[-256:]

    def wait_all(self, fds: list[int], timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if all(fd in self.ready for fd in fds):
                    return max(self.ready[fd] for fd in fds)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(fd in self.ready for fd in fds)}/{len(fds)} ready")
            time.sleep(0.0005)

    def seen(self, fd: int) -> bytes | None:
        """The last output read from a watched pipe; None once it is not watched."""
        with self.lock:
            return self.buffers.get(fd)

    def forget(self, fds: list[int]) -> None:
        with self.lock:
            for fd in fds:
                self.ready.pop(fd, None)
                if fd in self.buffers:
                    self.selector.unregister(fd)
                    del self.buffers[fd], self.tokens[fd]


def unread(fd: int) -> bytes | str:
    try:
        return os.read(fd, 65536)
    except OSError as e:
        return str(e)


class Result:
    def __init__(self) -> None:
        self.start: list[float] = []
        self.memory: list[float] = []
        self.stop: list[float] = []
        #: Vm.spawn: this (the spawning) program's own Pss growth per VM
        self.caller_memory: list[float] = []


def vmm_args(kernel: Path, cmdline: str) -> list[str]:
    return [
        "--kernel", str(kernel), "--cmdline", cmdline, "--cpus", "boot=1",
        "--memory", f"size={MEMORY_MIB}M", "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def run_processes(
    commands: list[list[str]], arrivals: Arrivals, result: Result, settle: float
) -> None:
    """Starts every command at once (serial on stdout), waits for all ready, stops them."""
    errors = tempfile.TemporaryFile()
    start = time.monotonic()
    procs = [
        subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        for c in commands
    ]
    fds = [p.stdout.fileno() for p in procs if p.stdout is not None]
    for fd in fds:
        arrivals.watch(fd)
    try:
        try:
            last = arrivals.wait_all(fds)
        except TimeoutError as e:
            errors.seek(0)
            raise TimeoutError(f"{commands[0][0]}: {e}: {errors.read()[-2000:]!r}") from None
        result.start.append(last - start)
        time.sleep(settle)
        result.memory.append(sum(pss_mib(p.pid) for p in procs) / len(procs))
        stop = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            reap(p, 60)
        result.stop.append(time.monotonic() - stop)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        arrivals.forget(fds)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
        errors.close()


def in_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_spawned(
    config: VmConfig, count: int, arrivals: Arrivals, result: Result, settle: float
) -> None:
    fifo_dir = Path(tempfile.mkdtemp(prefix="vmkit-density-"))
    fifos = []
    for i in range(count):
        path = fifo_dir / f"serial{i}"
        os.mkfifo(path, 0o600)
        # Read and write: with a writer of its own the FIFO never reads as
        # ended (once in about 2,000 VMs the reader read an end before the
        # VM's output and stopped watching; cause not found).
        fifos.append((path, os.open(path, os.O_RDWR | os.O_NONBLOCK)))
    for _, fd in fifos:
        arrivals.watch(fd)
    vms: list[SpawnedVm | None] = [None] * count
    caller_before = pss_mib("self")

    def start(i: int) -> None:
        own = ConsoleConfig(mode="File", file=str(fifos[i][0]))
        vm = Vm.spawn(dataclasses.replace(config, serial=own))
        vms[i] = vm
        vm.boot()

    try:
        started = time.monotonic()
        in_threads(count, start)
        try:
            last = arrivals.wait_all([fd for _, fd in fifos])
        except TimeoutError:
            for (path, fd), vm in zip(fifos, vms, strict=True):
                if fd not in arrivals.ready and vm is not None:
                    print(f"not ready: pid {vm.pid} {path} state {vm.state} log {vm.log!r}")
                    print(f"  serial seen {arrivals.seen(fd)!r}, unread {unread(fd)!r}")
            raise
        result.start.append(last - started)
        time.sleep(settle)
        result.memory.append(sum(pss_mib(vm.pid) for vm in vms if vm) / count)
        result.caller_memory.append((pss_mib("self") - caller_before) / count)
        stop = time.monotonic()
        vmkit.close_all(vm for vm in vms if vm is not None)
        result.stop.append(time.monotonic() - stop)
    finally:
        for vm in vms:
            if vm is not None:
                vm.close()
        arrivals.forget([fd for _, fd in fifos])
        for _, fd in fifos:
            os.close(fd)
        shutil.rmtree(fifo_dir, ignore_errors=True)


def run_in_process(config: VmConfig, count: int, result: Result, settle: float) -> None:
    vms: list[Vm | None] = [None] * count
    before = pss_mib("self")

    def start(i: int) -> None:
        vm = Vm(copy.deepcopy(config))
        vms[i] = vm
        vm.boot()
        vm.serial.wait_for("vmkit-guest: ready", timeout=120)

    try:
        started = time.monotonic()
        in_threads(count, start)
        result.start.append(time.monotonic() - started)
        time.sleep(settle)
        result.memory.append((pss_mib("self") - before) / count)
        stop = time.monotonic()
        for vm in vms:
            if vm is not None:
                vm.close()  # returns once stopped; the kernel's teardown goes on
        for vm in vms:
            if vm is not None:
                vm.release()  # gone: KVM VM and guest memory freed, as a reaped process's
        result.stop.append(time.monotonic() - stop)
    finally:
        for vm in vms:
            if vm is not None:
                vm.close()


def import_time(python: str, runs: int = 15) -> float:
    """``import vmkit`` in a fresh interpreter, minus the interpreter's own start (ms)."""

    def timed(code: str) -> float:
        start = time.monotonic()
        subprocess.run([python, "-c", code], check=True)
        return time.monotonic() - start

    bare, imported = [], []
    for _ in range(runs):
        bare.append(timed("pass"))
        imported.append(timed("import vmkit"))
    return (statistics.median(imported) - statistics.median(bare)) * 1e3


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:.1f} {unit}" if unit == "MiB" else f"{value * 1e3:.0f} ms"


def ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "n/a"
    return f"{a / b:.2f} \u00d7"


def plot(
    path: Path,
    points: dict[str, dict[str, list[tuple[float, float]]]],
    spread: dict[str, dict[str, list[tuple[float, float]]]],
    subtitle: str,
) -> Path | None:
    """The fleet chart: start and stop times (seconds in, ms drawn) and Pss per VM
    (MiB) over N, a line per way of running VMs. ``points[what][mode]``: (N, value)
    with ``what`` one of start, memory, stop; ``spread`` the same, (lowest, highest)."""

    def panel(what: str, title: str, axis: str) -> plots.Lines:
        factor = 1.0 if what == "memory" else 1e3
        return plots.Lines(
            title,
            axis,
            "N (VMs at once)",
            {mode: [(n, y * factor) for n, y in got] for mode, got in points[what].items()},
            {
                mode: [(lo * factor, hi * factor) for lo, hi in got]
                for mode, got in spread.get(what, {}).items()
            },
        )

    return plots.line_chart(
        path,
        "Fleet: N VMs started, held and stopped at once (test guest, 1 vCPU, 256 MiB each)",
        subtitle,
        [
            panel("start", "N started → all ready", "ms"),
            panel("memory", "Pss per VM", "MiB"),
            panel("stop", "N stopped → all gone", "ms"),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1,4,16,32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--settle", type=float, default=0.5, help="s between ready and Pss")
    parser.add_argument(
        "--plot", type=Path, default=plots.PLOT_DIR / "density.png", help="the chart (PNG) to write"
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    kernel = testguest.image_path("pvh")
    cmdline = testguest.cmdline(["hello"], exit="halt")
    config = VmConfig.from_cli(
        [*vmm_args(kernel, cmdline)[:-4], "--serial", "null", "--console", "off"]
    )
    vmkit_cli = Path(sys.executable).parent / "vmkit"
    qemu = shutil.which("qemu-system-x86_64")
    notes = []
    modes = [m for m in MODES if m in args.modes.split(",")]
    if not CH.exists() and "Cloud Hypervisor" in modes:
        modes.remove("Cloud Hypervisor")
        notes.append(f"Cloud Hypervisor left out: {CH} is missing.")
    if qemu is None and "QEMU microvm" in modes:
        modes.remove("QEMU microvm")
        notes.append("QEMU left out: qemu-system-x86_64 is missing.")
    if not vmkit_cli.exists() and "vmkit CLI" in modes:
        modes.remove("vmkit CLI")
        notes.append(f"vmkit CLI left out: no {vmkit_cli} beside this Python.")

    started = time.monotonic()
    Vm.spawn(None).close()
    server_start = time.monotonic() - started
    server = _forkserver._shared
    server_pss = pss_mib(server.process.pid) if server is not None else float("nan")
    imported = import_time(sys.executable)

    arrivals = Arrivals()
    results: dict[tuple[str, int], Result] = {}
    runs = Runs("bench_density", len(counts) * args.runs * len(modes))
    with runs:
        for count in counts:
            for mode in modes:
                results[(mode, count)] = Result()
            for i in range(args.runs):
                for mode in modes:
                    runs.start(f"N = {count}, round {i + 1}/{args.runs}, {mode}")
                    result = results[(mode, count)]
                    if mode == "vmkit CLI":
                        cmd = [str(vmkit_cli), *vmm_args(kernel, cmdline)]
                        run_processes([cmd] * count, arrivals, result, args.settle)
                    elif mode == "Cloud Hypervisor":
                        cmd = [str(CH), *vmm_args(kernel, cmdline)]
                        run_processes([cmd] * count, arrivals, result, args.settle)
                    elif mode == "QEMU microvm":
                        assert qemu is not None
                        cmd = qemu_command(qemu, kernel, cmdline)
                        cmd[cmd.index("-debugcon") + 1] = "null"
                        run_processes([cmd] * count, arrivals, result, args.settle)
                    elif mode == "Vm.spawn":
                        run_spawned(config, count, arrivals, result, args.settle)
                    else:
                        run_in_process(config, count, result, args.settle)

    def med(mode: str, count: int, what: str) -> float:
        values = getattr(results[(mode, count)], what)
        return statistics.median(values) if values else float("nan")

    peers = [m for m in ("Cloud Hypervisor", "QEMU microvm") if m in modes]
    print(f"Machine: {machine()}\n")
    print(
        f"`import vmkit`: {imported:.1f} ms; fork server start (first `Vm.spawn` only): "
        f"{server_start * 1e3:.0f} ms, its Pss {server_pss:.1f} MiB. "
        f"Medians of {args.runs} interleaved rounds; ratios are vmkit's figure over the peer's.\n"
    )
    for note in notes:
        print(note + "\n")
    columns = (
        ("start", "ms", "N started → all ready"),
        ("memory", "MiB", "Pss per VM"),
        ("stop", "ms", "N stopped → all gone"),
    )
    header = "| N | VMM |"
    for _what, _unit, title in columns:
        header += f" {title} |" + "".join(f" vs {p.split()[0]} |" for p in peers)
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for count in counts:
        for mode in modes:
            row = f"| {count} | {mode} |"
            for what, unit, _title in columns:
                value = med(mode, count, what)
                row += f" {fmt(value, unit)} |"
                for peer in peers:
                    row += " |" if mode in peers else f" {ratio(value, med(peer, count, what))} |"
            print(row)
    if "Vm.spawn" in modes:
        growth = ", ".join(
            f"N = {count}: {fmt(med('Vm.spawn', count, 'caller_memory'), 'MiB')}"
            for count in counts
        )
        print(
            "\n`Vm.spawn`'s Pss is the VM processes'; the spawning program holds each VM's "
            f"API server and VMM state, and grew by this much per VM: {growth}."
        )
    arrivals.stop = True
    plots.wrote(
        plot(
            args.plot,
            {
                what: {
                    mode: [(count, med(mode, count, what)) for count in counts] for mode in modes
                }
                for what in ("start", "memory", "stop")
            },
            {
                what: {
                    mode: [plots.spread(getattr(results[(mode, count)], what)) for count in counts]
                    for mode in modes
                }
                for what in ("start", "memory", "stop")
            },
            f"{machine()}\nmedians of {args.runs} interleaved rounds; "
            "whiskers: lowest to highest round",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
