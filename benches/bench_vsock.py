"""virtio-vsock host <-> guest: vmkit against Cloud Hypervisor, same test guest, one run.

Run: ``python benches/bench_vsock.py`` (``--runs N``, ``--mib M``,
``--requests R``, ``--hog``; ``--markdown`` prints the table for RESULTS.md).
Needs /dev/kvm and ``../shared/ch/cloud-hypervisor``.

Both VMMs boot the test guest's PVH ELF from their command lines (256 MiB,
``--serial file=``, ``--console off``, ``--vsock cid=3,socket=P``; Cloud
Hypervisor also ``--seccomp false``: at this revision its filter may kill it
on some paths here). Its ``vsock`` step is a polled virtio-vsock driver (8
receive buffers of 4 KiB, 8 transmit slots); it sets connections up and closes
them in its CPL0 code, and with ``vsock_cpl3=1`` (the default here; ``--cpl0``
turns it off) moves their data at CPL3, which runs natively where kvm_pvm
emulates every CPL0 instruction, so that the figures are the VMMs' rather than
the emulator's; the host side is Cloud Hypervisor's hybrid vsock,
which vmkit implements too: a host program reaches guest port 1234 by
connecting to the unix socket P and writing ``CONNECT 1234`` (``vmkit._vsock``),
and the guest reaches host port 1235 at the unix socket ``P_1235``, on which
the bench listens before the VMM starts. Every run is a fresh VMM process and
VM; the VMMs' runs are interleaved (vmkit, Cloud Hypervisor, vmkit, ...); the
figures are medians over the runs, the ratios are vmkit's median over Cloud
Hypervisor's, of the same run of the bench.

Rows:
- host -> guest, one stream: the guest's server with ``vsock_echo=0
  vsock_check=0`` (a sink); the host sends ``--mib`` MiB on one stream, shuts
  down its write side and reads until EOF (the guest answers the shutdown with
  RST once all bytes came); timed from the first ``sendall`` to EOF. The
  guest advertises a 1 MiB window and, as Linux does, reports what it consumed
  (a CREDIT_UPDATE) every 256 KiB: Cloud Hypervisor (v37 here) never asks for
  credit and would stall at the window's end otherwise;
- guest -> host, one stream: the guest's client with ``vsock_echo=0
  vsock_check=0`` (a source) sends ``--mib`` MiB on one stream and shuts it
  down; the host reads until EOF; timed from the first chunk received to EOF,
  over the bytes that came after that first chunk;
- request/response: the guest's server echoing and checking; the host sends
  ``--requests`` single bytes of the pattern, each after the echo of the one
  before, and times each round trip (median and 99th percentile of each run;
  the table gives the medians of those over the runs).

A run fails when the guest reports ``step vsock fail``, the VMM exits early or
does not exit 0 after the guest's power-off, or nothing moves for ``--stall``
seconds; it is reported with the VMM's serial tail and log, and that VMM is
not run again in that row (its cells say "failed", the reason below the
table; the exit status is 1 only if vmkit failed). Every run's VMM is
stopped (SIGTERM, then SIGKILL after 10 s) and its sockets and files
removed, a failed one's too.

Beside the throughput figures: each VMM's CPU seconds per GiB moved, the CPU
time (utime + stime, ``/proc/<pid>/stat``, exited threads included) of the VMM
process less its vCPU threads' (``vcpu<N>`` in both), over the timed window:
its device threads and event loops (bench_io.py's measure). The vCPU threads
are left out: the guest's driver polls, and on kvm_pvm their guest time cannot
be told from their exits. Clock ticks: 10 ms resolution.

``--hog``: one busy-loop process per CPU, at normal priority, during each run
(many VMs packed on a host).

With ``--cpl0`` the data goes through the guest's CPL0 code, emulated
instruction by instruction on kvm_pvm: those figures are the guest's more than
the VMM's.

QEMU cannot join: its virtio-vsock is vhost-vsock, which needs
/dev/vhost-vsock in the host kernel (absent on these machines) and offers the
host AF_VSOCK sockets rather than the hybrid vsock's unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from machine import CH, Hogs, Runs, machine, vmm_cpu_seconds
from vmkit import testguest
from vmkit._vsock import connect

GUEST_PORT = 1234
HOST_PORT = 1235
VMMS = ("vmkit", "ch")
NAMES = {"vmkit": "vmkit", "ch": "Cloud Hypervisor"}
#: How long the host waits for the guest to start listening or connecting.
BOOT_TIMEOUT = 60.0
#: Bytes per host send/receive call in the throughput rows.
CHUNK = 1 << 20
NO_QEMU = (
    "QEMU cannot join: its virtio-vsock is vhost-vsock, which needs /dev/vhost-vsock "
    "(absent on these machines) and gives the host AF_VSOCK sockets, not a unix socket."
)


def pattern(n: int) -> bytes:
    """The bytes of every stream of the guest's ``vsock`` step when it checks them."""
    return bytes((j * 7 + (j >> 8)) & 0xFF for j in range(n))


@dataclass(frozen=True)
class Row:
    kind: str  # "sink", "source" or "rr"
    label: str
    unit: str

    @property
    def latency(self) -> bool:
        return self.kind == "rr"


ROWS = [
    Row("sink", "host → guest, one stream", "MiB/s"),
    Row("source", "guest → host, one stream", "MiB/s"),
    Row("rr", "request/response, 1 byte", "µs"),
]


#: The guest moves a connection's data at CPL3 (``vsock_cpl3=1``), natively even on kvm_pvm,
#: so that the rows measure the VMMs; ``--cpl0`` keeps it in the emulated CPL0 driver.
GUEST_CPL3 = True


def guest_options(row: Row, size: int, timeout: float) -> dict[str, int | str]:
    """The ``vsock_*`` options of ``row``; ``size``: bytes per stream, or round trips."""
    common: dict[str, int | str] = {
        "vsock_bytes": size,
        "vsock_timeout_ms": int(timeout * 1e3),
        "vsock_cpl3": int(GUEST_CPL3),
    }
    sink = {"vsock_connect": 0, "vsock_echo": 0, "vsock_check": 0}
    if row.kind == "sink":
        return {"vsock_accept": 1, **sink, **common}
    if row.kind == "source":
        return {"vsock_accept": 0, "vsock_connect": 1, "vsock_echo": 0, "vsock_check": 0, **common}
    return {"vsock_accept": 1, "vsock_connect": 0, "vsock_echo": 1, "vsock_check": 1, **common}


def guest_args(cmdline: str, serial: Path, sock: Path) -> list[str]:
    return [
        "--kernel", str(testguest.image_path("pvh")), "--cmdline", cmdline,
        "--memory", "size=256M", "--serial", f"file={serial}", "--console", "off",
        "--vsock", f"cid=3,socket={sock}",
    ]  # fmt: skip


def command(vmm: str, cmdline: str, serial: Path, sock: Path) -> list[str]:
    if vmm == "ch":
        return [str(CH), *guest_args(cmdline, serial, sock), "--seccomp", "false"]
    return [sys.executable, "-m", "vmkit", *guest_args(cmdline, serial, sock)]


class RunFailed(Exception):
    """A run that did not complete: the VMM's serial tail and log are in the message,
    ``what`` says in a few words what went wrong."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class Vmm:
    """One VMM process booting the test guest, its serial and log in ``work``."""

    def __init__(self, vmm: str, cmdline: str, work: Path) -> None:
        self.name = vmm
        self.serial = work / "serial.txt"
        self.sock = work / "vsock.sock"
        self.log_path = work / "vmm.log"
        self.argv = command(vmm, cmdline, self.serial, self.sock)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def failure(self, what: str) -> RunFailed:
        serial = self.serial_text().splitlines()[-15:]
        try:
            log = self.log_path.read_text(errors="replace").splitlines()[-15:]
        except FileNotFoundError:
            log = []
        status = self.proc.poll()
        state = "running" if status is None else f"exited with {status}"
        return RunFailed(
            f"{NAMES[self.name]} ({state}): {what}\n"
            f"  command: {' '.join(self.argv)}\n"
            "  serial tail:\n" + "".join(f"    {line}\n" for line in serial) + "  log tail:\n"
            "" + "".join(f"    {line}\n" for line in log),
            what,
        )

    def check_alive(self) -> None:
        """Raises if the guest reported a failure or the VMM has exited."""
        if "step vsock fail" in self.serial_text():
            raise self.failure("the guest's vsock step failed")
        if self.proc.poll() is not None:
            raise self.failure("the VMM exited early")

    def wait_serial(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.serial_text():
            self.check_alive()
            if time.monotonic() > deadline:
                raise self.failure(f"no {text!r} on the serial within {timeout:.0f} s")
            time.sleep(0.005)

    def cpu(self) -> float:
        return vmm_cpu_seconds(self.proc.pid)

    def finish(self, timeout: float) -> None:
        """Waits for the guest's power-off; raises unless its step passed and the VMM exited 0."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.failure(f"still running {timeout:.0f} s after the transfer") from None
        if self.proc.returncode != 0 or "step vsock ok" not in self.serial_text():
            raise self.failure("the guest's vsock step did not pass")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Sample:
    value: float  # MiB/s, or the median round trip in µs
    cpu_per_gib: float | None = None  # throughput rows
    p99: float | None = None  # latency row, µs


def read_to_eof(stream: socket.socket, buffer: bytearray) -> int:
    """Bytes read until EOF (a reset counts as EOF: the guest answers with RST)."""
    total = 0
    view = memoryview(buffer)
    while True:
        try:
            n = stream.recv_into(view)
        except ConnectionResetError:
            return total
        if n == 0:
            return total
        total += n


def run_sink(vm: Vmm, streams: int, size: int, stall: float) -> Sample:
    """``streams`` streams of ``size`` bytes to the guest's sink, one after the other."""
    vm.wait_serial("vsock listening", BOOT_TIMEOUT)
    data = memoryview(bytes(CHUNK))
    start = cpu0 = 0.0
    for i in range(streams):
        with connect(str(vm.sock), GUEST_PORT, stall) as stream:
            stream.settimeout(stall)
            if i == 0:
                cpu0 = vm.cpu()
                start = time.perf_counter()
            sent = 0
            while sent < size:
                n = min(CHUNK, size - sent)
                stream.sendall(data[:n])
                sent += n
            stream.shutdown(socket.SHUT_WR)
            extra = read_to_eof(stream, bytearray(4096))
            if extra:
                raise vm.failure(f"the sink sent {extra} bytes back")
    elapsed = time.perf_counter() - start
    cpu = vm.cpu() - cpu0
    total = streams * size
    return Sample(total / elapsed / (1 << 20), cpu / (total / (1 << 30)))


def run_source(vm: Vmm, listener: socket.socket, size: int, stall: float) -> Sample:
    """One stream of ``size`` bytes from the guest's source, read until EOF."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not select.select([listener], [], [], 0.05)[0]:
        vm.check_alive()
        if time.monotonic() > deadline:
            raise vm.failure(f"the guest did not connect within {BOOT_TIMEOUT:.0f} s")
    stream, _ = listener.accept()
    with stream:
        stream.settimeout(stall)
        buffer = bytearray(CHUNK)
        first = stream.recv_into(buffer)
        cpu0 = vm.cpu()
        start = time.perf_counter()
        rest = read_to_eof(stream, buffer) if first else 0
        elapsed = time.perf_counter() - start
        cpu = vm.cpu() - cpu0
    if first + rest != size or not rest:
        raise vm.failure(f"{first + rest} bytes came, not {size}")
    return Sample(rest / elapsed / (1 << 20), cpu / (rest / (1 << 30)))


def run_rr(vm: Vmm, requests: int, stall: float) -> Sample:
    """``requests`` one-byte round trips through the guest's echo server."""
    vm.wait_serial("vsock listening", BOOT_TIMEOUT)
    data = pattern(requests)
    times: list[float] = []
    with connect(str(vm.sock), GUEST_PORT, stall) as stream:
        stream.settimeout(stall)
        for j in range(requests):
            byte = data[j : j + 1]
            start = time.perf_counter_ns()
            stream.sendall(byte)
            echo = stream.recv(1)
            times.append((time.perf_counter_ns() - start) / 1e3)
            if echo != byte:
                raise vm.failure(f"request {j}: echo {echo!r}, expected {byte!r}")
        stream.shutdown(socket.SHUT_WR)
        read_to_eof(stream, bytearray(4096))
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return Sample(statistics.median(times), p99=p99)


@dataclass(frozen=True)
class Limits:
    timeout: float  # the guest's bound on each half of its step (vsock_timeout_ms)
    stall: float  # the longest the host waits on one send or receive


def one_run(vmm: str, row: Row, size: int, limits: Limits, hog: bool) -> Sample:
    """A fresh VMM and VM doing ``row`` once (``size``: bytes per stream, or round
    trips); every process, socket and file it made is gone on return."""
    per_stream = size
    options = guest_options(row, per_stream, limits.timeout)
    cmdline = testguest.cmdline(["vsock"], "poweroff", **options)
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-vsock-", dir="/tmp") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            listener: socket.socket | None = None
            if row.kind == "source":
                # Listening before the VMM starts: the guest connects as soon as it boots.
                listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                listener.bind(f"{work / 'vsock.sock'}_{HOST_PORT}")
                listener.listen(4)
            stack.enter_context(Hogs(hog))
            vm = Vmm(vmm, cmdline, work)
            stack.callback(vm.stop)
            try:
                if row.kind == "sink":
                    sample = run_sink(vm, 1, per_stream, limits.stall)
                elif row.kind == "source":
                    assert listener is not None
                    sample = run_source(vm, listener, per_stream, limits.stall)
                else:
                    sample = run_rr(vm, per_stream, limits.stall)
            except TimeoutError as error:
                raise vm.failure(f"host side: no progress for {limits.stall:.0f} s") from error
            except OSError as error:
                raise vm.failure(f"host side: {error!r}") from error
            vm.finish(limits.stall)
    return sample


@dataclass
class Result:
    row: Row
    medians: dict[str, Sample | None]  # None: no run passed
    failed: dict[str, str]  # VMM -> what went wrong in its first failed run

    def note(self, vmm: str) -> str:
        return f"{NAMES[vmm]}: {self.failed[vmm]}" if vmm in self.failed else ""


def median_sample(got: list[Sample]) -> Sample | None:
    if not got:
        return None

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    value = med([s.value for s in got])
    assert value is not None
    return Sample(value, med([s.cpu_per_gib for s in got]), med([s.p99 for s in got]))


Get = Callable[[Sample], float | None]


def ratio(medians: dict[str, Sample | None], get: Get) -> str:
    kit, peer = medians.get("vmkit"), medians.get("ch")
    a = None if kit is None else get(kit)
    b = None if peer is None else get(peer)
    return f"{a / b:.2f}" if a is not None and b else "—"


def cell(sample: Sample | None, get: Get, fmt: str) -> str:
    value = None if sample is None else get(sample)
    return "failed" if value is None else format(value, fmt)


def value_of(s: Sample) -> float | None:
    return s.value


def p99_of(s: Sample) -> float | None:
    return s.p99


def cpu_of(s: Sample) -> float | None:
    return s.cpu_per_gib


def print_text(result: Result) -> None:
    row, medians = result.row, result.medians
    cells = []
    for vmm, sample in medians.items():
        text = f"{vmm} {cell(sample, value_of, '8.1f')}"
        if sample is None:
            pass
        elif row.latency:
            text += f" (p99 {cell(sample, p99_of, '.1f')})"
        else:
            text += f" ({cell(sample, cpu_of, '.2f')} s/GiB)"
        cells.append(text)
    ratios = f"vmkit/ch {ratio(medians, value_of)}"
    if row.latency:
        ratios += f" (p99 {ratio(medians, p99_of)})"
    notes = "; ".join(filter(None, (result.note(vmm) for vmm in VMMS)))
    line = f"{row.label:42} {row.unit:5} {'  '.join(cells)}  {ratios}"
    print(line + (f"  [failed: {notes}]" if notes else ""), flush=True)


def print_markdown(args: argparse.Namespace, results: list[Result]) -> None:
    mode = f"a busy loop on each of the {os.cpu_count()} CPUs" if args.hog else "idle host"
    print(f"Machine: {machine()}\n")
    print(
        f"Mode: {mode}; runs per row and VMM: {args.runs}, interleaved (medians); "
        f"{args.mib} MiB per throughput run, {args.requests} round trips per latency run. "
        "Ratios are vmkit's "
        "median over Cloud Hypervisor's, same run: above 1 is better for throughput, below 1 "
        "is better for latency. CPU s/GiB: the VMM's CPU time less its vCPU threads', over "
        "the timed window, per GiB moved.\n"
    )
    head = [
        "workload", "vmkit", "Cloud Hypervisor", "vmkit / Cloud Hypervisor",
        "vmkit CPU s/GiB", "Cloud Hypervisor CPU s/GiB",
    ]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    notes: list[str] = []
    for result in results:
        row, medians = result.row, result.medians
        kit, peer = medians.get("vmkit"), medians.get("ch")
        lines: list[tuple[str, Get]] = [(row.label + (", median" if row.latency else ""), value_of)]
        if row.latency:
            lines.append((f"{row.label}, p99", p99_of))
        for label, get in lines:
            cells = [
                label,
                f"{cell(kit, get, ',.1f')} {row.unit}",
                f"{cell(peer, get, ',.1f')} {row.unit}",
                ratio(medians, get),
            ]
            if row.latency:
                cells += ["—", "—"]
            else:
                cells += [cell(s, cpu_of, ".2f") for s in (kit, peer)]
            print("| " + " | ".join(cells) + " |")
        notes += [f"{row.label}: {n}" for vmm in VMMS if (n := result.note(vmm))]
    if notes:
        print("\nFailed runs (a VMM that fails a row is not run again in it):\n")
        print("".join(f"- {note}\n" for note in notes))
    sample = testguest.cmdline(
        ["vsock"], "poweroff", **guest_options(ROWS[0], args.mib << 20, args.timeout)
    )
    serial, sock = Path("serial.txt"), Path("vsock.sock")
    print(f"\nvmkit: `{' '.join(command('vmkit', sample, serial, sock))}`\n")
    print(f"Cloud Hypervisor: `{' '.join(command('ch', sample, serial, sock))}`\n")
    print(NO_QEMU)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32, help="MiB per one-stream run")
    parser.add_argument("--requests", type=int, default=2000, help="round trips per latency run")
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during each run")
    parser.add_argument(
        "--row", action="append", type=int, help=f"only these rows (0-{len(ROWS) - 1})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds each half of the guest's step may take (its vsock_timeout_ms)",
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=15.0,
        help="seconds without progress after which a run is failed",
    )
    parser.add_argument(
        "--cpl0",
        action="store_true",
        help="the guest moves the data in its CPL0 driver (emulated on kvm_pvm) instead of at CPL3",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    global GUEST_CPL3
    GUEST_CPL3 = not args.cpl0
    if args.runs < 1 or args.mib < 1 or args.requests < 1:
        parser.error("--runs, --mib and --requests must be at least 1")
    if args.row and not all(0 <= i < len(ROWS) for i in args.row):
        parser.error(f"--row: 0 to {len(ROWS) - 1}")
    if not CH.exists():
        print(f"no Cloud Hypervisor at {CH}", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C: every run's VMM, hogs and files are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    limits = Limits(args.timeout, args.stall)
    rows = [ROWS[i] for i in args.row] if args.row else ROWS
    if not args.markdown:
        print(f"Machine: {machine()}")
        print(NO_QEMU)
        print(
            "Medians; vmkit/ch: ratio of medians (throughput: above 1 is better; "
            "latency: below 1 is better)\n",
            flush=True,
        )
    results: list[Result] = []
    runs = Runs("bench_vsock", len(rows) * args.runs * len(VMMS))
    with runs:
        for row in rows:
            size = args.requests if row.latency else args.mib << 20
            samples: dict[str, list[Sample]] = {vmm: [] for vmm in VMMS}
            failed: dict[str, str] = {}
            for i in range(args.runs):
                # A VMM that failed this row is not run again in it (a stall costs --stall).
                for vmm in (v for v in VMMS if v not in failed):
                    runs.start(f"{row.label}, run {i + 1}/{args.runs}, {vmm}")
                    try:
                        samples[vmm].append(one_run(vmm, row, size, limits, args.hog))
                    except RunFailed as error:
                        failed[vmm] = error.what
                        with runs.progress.above():
                            print(f"{row.label}: run failed: {error}", file=sys.stderr, flush=True)
            result = Result(row, {vmm: median_sample(got) for vmm, got in samples.items()}, failed)
            results.append(result)
            if not args.markdown:
                with runs.progress.above():
                    print_text(result)
    if args.markdown:
        print_markdown(args, results)
    # A peer's failure is reported, not an error of the bench's.
    return 1 if any("vmkit" in r.failed for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after every run's clean-up
        sys.exit(130)
