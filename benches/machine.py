"""What the benchmarks share: the machine line, where the peers are, a VMM's CPU time, CPU
hogs, its resident memory, a serial file's lines, a socket that listens, stopping a VMM."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import vmkit
from vmkit._forkserver import wait_ended

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _sockets import wait_listening as wait_listening


def machine(with_kvm: bool = True) -> str:
    """CPU, CPU count, kernel, the kind of /dev/kvm, Python and vmkit versions."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kvm = "kvm_pvm" if Path("/sys/module/kvm_pvm").exists() else "hardware KVM"
    kvm_part = f"/dev/kvm: {kvm}, " if with_kvm else ""
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, {kvm_part}"
        f"Python {platform.python_version()}, vmkit {vmkit.__version__}"
    )


_ROOT = Path(__file__).resolve().parent.parent
#: The real Cloud Hypervisor, the peer of every benchmark: in the ``shared/``
#: beside the checkout (a git worktree's is one level further up).
CH = next(
    (
        path
        for base in (_ROOT.parent, _ROOT.parent.parent)
        if (path := base / "shared" / "ch" / "cloud-hypervisor").is_file()
    ),
    _ROOT.parent / "shared" / "ch" / "cloud-hypervisor",
)


def qemu_binary() -> str | None:
    """The peer VMM's path; None, having said how to install it, if it is missing."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("qemu-system-x86_64 is needed (apt-get install qemu-system-x86)", file=sys.stderr)
    return qemu


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The vCPU threads of vmkit and Cloud Hypervisor (``vcpu<N>``) and QEMU (``CPU <N>/KVM``).
VCPU_THREAD = re.compile(r"vcpu\d+|CPU \d+/KVM")


def cpu_ticks(stat_path: Path) -> int:
    """utime + stime from a proc(5) stat file (fields 14 and 15)."""
    stat = stat_path.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def vmm_cpu_seconds(pid: int) -> float:
    """A VMM process's CPU time (its exited threads' included) less its vCPU
    threads': what its device workers and event loops spent."""
    total = cpu_ticks(Path(f"/proc/{pid}/stat"))
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if VCPU_THREAD.fullmatch((task / "comm").read_text().strip()):
                total -= cpu_ticks(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread has just exited
    return total / CLOCK_TICKS


#: How ``thread_times`` sorts a VMM's threads: its vCPUs, io_uring's
#: kernel-side workers (``iou-wrk-<pid>``, threads of the VMM process), the rest.
THREAD_CLASSES = ("vCPU", "io_uring workers", "other")


def thread_times(pid: int) -> dict[int, tuple[str, int, int]]:
    """Per live thread of the process: its class (``THREAD_CLASSES``), nanoseconds
    on a CPU and nanoseconds runnable but waiting for one (``schedstat``)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ran, waited = map(int, (task / "schedstat").read_text().split()[:2])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # the thread has just exited
        if VCPU_THREAD.fullmatch(name):
            kind = "vCPU"
        elif name.startswith("iou-wrk"):
            kind = "io_uring workers"
        else:
            kind = "other"
        times[int(task.name)] = (kind, ran, waited)
    return times


class Hogs:
    """One busy-loop process per CPU at normal priority, while the block runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Hogs:
        if self.enabled:
            for _ in range(os.cpu_count() or 1):
                self.procs.append(
                    subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
                )
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


class Runs:
    """Which peer, row and run a benchmark is at, on a line on stderr while it is a
    terminal (nothing elsewhere; stdout untouched): ``start(what)`` before each run,
    ``print(text)`` for result lines on stdout while the line is shown.

        with Runs("bench_io", total=rows * runs * vmms) as runs:
            runs.start("random read 4 KiB, depth 1: run 2/5, QEMU q35")
    """

    def __init__(self, bench: str, total: int) -> None:
        from vmkit._progress import Progress

        self.bench = bench
        self.started = 0
        self.progress = Progress(bench, total=total, unit="runs")

    def __enter__(self) -> Runs:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()

    def start(self, what: str) -> None:
        self.progress.update(self.started, label=f"{self.bench}: {what}")
        self.started += 1

    def print(self, text: str) -> None:
        with self.progress.above():
            print(text, flush=True)


def resident_mib(pid: int) -> float:
    """The process's resident memory (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settled_rss(pid: int, seconds: float = 0.3) -> float:
    """VmRSS once the kernel's per-thread counters have caught up."""
    time.sleep(seconds)
    return resident_mib(pid)


def wait_serial_line(
    serial: Path, pattern: str, after: int = 0, timeout: float = 300
) -> tuple[float, int]:
    """Polls a ``--serial file=`` every millisecond for ``pattern`` (a
    multi-line regex) at or after offset ``after``: the monotonic time it was
    seen and the offset just past it."""
    regex = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while True:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        found = regex.search(text, after)
        if found:
            return time.monotonic(), found.end()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} on the serial port: {text[-800:]!r}")
        time.sleep(0.001)


def reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Waits for ``proc`` to end and reaps it, woken the moment it ends.

    Not ``Popen.wait(timeout)``: that polls with sleeps that double from
    0.5 ms, so it notices an exit up to as late again as it has waited (an
    exit at 8 ms is seen at 15.5), which a stop figure would count.
    """
    if proc.returncode is not None:
        return proc.returncode
    pidfd = os.pidfd_open(proc.pid)  # unreaped until the wait below: still this child
    try:
        if not wait_ended(pidfd, timeout):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            reap(proc, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
