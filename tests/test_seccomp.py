"""Seccomp confinement, with Cloud Hypervisor's ``--seccomp`` semantics.

Each VMM thread kind runs under its own filter. To show that a filter is
there and does what ``--seccomp`` says, a real thread of a running VMM (the
release build users run, no test-only code) is made to execute a system call
its filter does not allow, through ptrace (tests/_inject.py): ``getpgid``,
which no vmkit filter allows and which changes nothing when it goes through.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from _inject import Injected, inject_syscall, seccomp_filters, seccomp_mode, threads
from _swtpm import SWTPM, Swtpm
from vmkit import testguest

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm
if not Path("/proc/self/status").read_text().count("Seccomp:"):
    pytest.skip("this kernel has no seccomp", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
GETPGID = 121  # x86_64; outside every vmkit filter (checked in the Rust tests)
CH_MESSAGE = (
    "\n==== Possible seccomp violation ====\n"
    "Try running with `strace -ff` to identify the cause and open an issue: "
    "https://github.com/cloud-hypervisor/cloud-hypervisor/issues/new\n"
)

#: Thread kind (as the SIGSYS message names it) -> its threads' names.
KINDS: dict[str, str] = {
    "vcpu": r"vcpu\d+",
    "vmm": r"vmm",
    "spawner": r"vmkit-spawner",
    "block (io_uring)": r"_disk0-q\d+",
    "block (sync)": r"_disk1-q\d+",
    "net": r"_net\d+_qp\d+",
    "rng": r"_+rng\d*_q0",
    "console": r"_+console\d*",
    "tpm": r"tpm",
    "serial input": r"console-input",
    "serial socket": r"serial-socket",
    "vmkit process": r"python[\d.]*|vmkit(-log)?",
}


def _can_make_taps() -> bool:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return os.geteuid() == 0


TAPS = _can_make_taps()


def vmm_argv(
    tmp_path: Path, mode: str, ticks: int = 100, tpm_socket: Path | None = None
) -> list[str]:
    """A `vmkit` command line with a thread of every kind (net where taps can be
    made, the TPM's where swtpm listens on ``tpm_socket``)."""
    disks = []
    for i in range(2):
        image = tmp_path / f"disk{i}.img"
        image.write_bytes(b"\0" * (1 << 20))
        disks.append(f"path={image}" + (",_disable_io_uring=on" if i else ""))
    # The test guest resets each device after its step, which stops the
    # device's worker: the steps repeat, so that every worker keeps coming back.
    steps = (["rng", "blk", "console"] + (["net"] if TAPS else [])) * 60 + ["ticks"]
    argv = [
        sys.executable, "-m", "vmkit",
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", ticks=ticks, net_timeout_ms=20),
        "--cpus", "boot=1", "--memory", "size=64M",
        "--disk", *disks,
        "--rng", "src=/dev/urandom",
        "--serial", f"socket={tmp_path / 'serial.sock'}",
        "--console", "pty",
        "--seccomp", mode,
    ]  # fmt: skip
    if TAPS:
        argv += ["--net", f"tap=vmksc{os.getpid() % 10000}x{len(str(tmp_path)) % 10}"]
    if tpm_socket is not None:
        argv += ["--tpm", f"socket={tpm_socket}"]
    return argv


def expected_kinds() -> list[str]:
    return [kind for kind in KINDS if (kind != "net" or TAPS) and (kind != "tpm" or SWTPM)]


#: Kinds whose threads the spawner starts; the others start from the main thread.
SPAWNED = {"block (io_uring)", "block (sync)", "net", "rng", "console", "tpm"}


class GuestFinished(AssertionError):
    """The VMM exited normally (its guest ran all its steps) before the thread
    the test looks for was caught: device workers come and go with each step."""


def find_thread(process: subprocess.Popen[str], kind: str, deadline: float) -> int:
    """A thread of ``kind`` that has installed its own filter: it runs under
    more filters than the thread that started it (a new thread carries its
    name before it is confined)."""
    while time.monotonic() < deadline:
        if process.poll() == 0:
            raise GuestFinished(f"the guest powered off before a {kind} thread was seen")
        assert process.poll() is None, process.communicate()[1]
        names = threads(process.pid)
        for name, tids in names.items():
            if not re.fullmatch(KINDS[kind], name):
                continue
            if kind == "vmkit process":
                return tids[0]
            try:
                creator = names["vmkit-spawner"][0] if kind in SPAWNED else process.pid
                for tid in tids:
                    if seccomp_filters(process.pid, tid) > seccomp_filters(process.pid, creator):
                        return tid
                if (
                    seccomp_filters(process.pid, process.pid)
                    == 0
                    == seccomp_mode(process.pid, tids[0])
                ):
                    return tids[0]  # --seccomp false: nothing to wait for
            except (KeyError, FileNotFoundError, ProcessLookupError):
                pass  # the spawner not there yet, or the thread just ended
        time.sleep(0.002)
    raise AssertionError(f"no {kind} thread in {threads(process.pid)}")


def inject_into(process: subprocess.Popen[str], kind: str, trapped: bool = False) -> Injected:
    """Makes a thread of ``kind`` call getpgid(0); device workers come and go,
    so a thread that ended before it could be stopped is replaced by the next
    (and, where the filter traps the call, one that is ending too)."""
    deadline = time.monotonic() + 30
    # The interpreter is confined once start-up is done: by the time vCPUs run.
    find_thread(process, "vcpu", deadline)
    while True:
        tid = find_thread(process, kind, deadline)
        try:
            return inject_syscall(process.pid, tid, GETPGID, 0, refuse_exiting=trapped)
        except (ProcessLookupError, ChildProcessError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"every {kind} thread ended before it could be stopped") from e
        except OSError as e:
            # A thread in the middle of exiting refuses a tracer with EPERM.
            ended = e.errno == errno.ESRCH or (e.errno == errno.EPERM and exiting(process.pid, tid))
            if not ended or time.monotonic() > deadline:
                raise


def exiting(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` is gone or on its way out (zombie or dead)."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@contextmanager
def vmm(tmp_path: Path, mode: str, ticks: int = 100) -> Iterator[subprocess.Popen[str]]:
    with ExitStack() as stack:
        tpm = stack.enter_context(Swtpm(tmp_path / "tpm")) if SWTPM else None
        yield stack.enter_context(
            vmm_process(vmm_argv(tmp_path, mode, ticks, tpm.socket if tpm else None))
        )


@contextmanager
def vmm_process(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def kernel_log() -> str | None:
    result = subprocess.run(["dmesg"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


@pytest.mark.parametrize("kind", expected_kinds())
def test_a_call_outside_the_filter_kills_the_vmm_with_sigsys(tmp_path: Path, kind: str) -> None:
    for attempt in range(3):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        with vmm(folder, "true") as process:
            try:
                injected = inject_into(process, kind, trapped=True)
            except GuestFinished:
                if attempt == 2:
                    raise
                continue  # a short-lived worker was missed: a fresh VMM
            assert injected.killed_by == signal.SIGSYS
            _, stderr = process.communicate(timeout=20)
        break
    assert process.returncode == -signal.SIGSYS
    assert CH_MESSAGE in stderr
    assert f"vmkit: system call {GETPGID} is outside the seccomp filter of this {kind} thread" in (
        stderr
    )


def test_every_thread_of_a_running_vmkit_is_confined(tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    with vmm(tmp_path, "true") as process:
        deadline = time.monotonic() + 30
        for kind in expected_kinds():
            find_thread(process, kind, deadline)
            for name, tids in threads(process.pid).items():
                for tid in tids:
                    try:
                        seen[name] = seccomp_mode(process.pid, tid)
                    except (FileNotFoundError, ProcessLookupError):
                        pass  # a worker that just ended
    # kvm-*: KVM's kernel threads; iou-wrk-*: io_uring's kernel workers, which
    # the block engine's requests can start under load (they make no system calls).
    known = "|".join(KINDS.values()) + r"|kvm-.*|iou-wrk-\d+"
    assert not [name for name in seen if not re.fullmatch(known, name)], seen
    assert seen and set(seen.values()) == {2}, seen


@contextmanager
def audit_records_unthrottled() -> Iterator[bool]:
    """Lifts the kernel's printk rate limit (10 audit records per 5 s) while
    the block runs, where this process may (root): other tests' VMMs in log
    mode, Cloud Hypervisor's among them, write records meanwhile too. False
    where it may not."""
    burst = Path("/proc/sys/kernel/printk_ratelimit_burst")
    try:
        before = burst.read_text()
        burst.write_text("100000\n")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        burst.write_text(before)


def test_log_mode_lets_the_call_through_and_the_kernel_logs_it(tmp_path: Path) -> None:
    log_before = kernel_log()
    with audit_records_unthrottled() as unthrottled, vmm(tmp_path, "log", ticks=1200) as process:
        # Device workers first, while the guest's steps still start them.
        kinds = sorted(expected_kinds(), key=lambda kind: kind not in SPAWNED)
        for i, kind in enumerate(kinds):
            if i and i % 5 == 0 and not unthrottled:
                # The kernel prints at most 10 audit records per 5 s.
                time.sleep(5.5)
            injected = inject_into(process, kind)
            assert injected.killed_by is None, kind
            assert injected.result == os.getpgid(process.pid), kind
        # The VM runs on to its end: every step and tick, then power-off (exit 0).
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert "seccomp violation" not in stderr
    log = kernel_log()
    if log is None or log_before is None:
        pytest.skip("the kernel log (dmesg) is not readable here")
    records = re.findall(
        rf"type=1326 .*pid={process.pid} comm=\"([^\"]+)\".* syscall={GETPGID} ", log
    )
    for kind in expected_kinds():
        assert any(re.fullmatch(KINDS[kind], comm) for comm in records), (kind, records)


def test_false_installs_nothing(tmp_path: Path) -> None:
    with vmm(tmp_path, "false") as process:
        find_thread(process, "vcpu", time.monotonic() + 30)
        for name, ids in threads(process.pid).items():
            for tid in ids:
                assert seccomp_mode(process.pid, tid) == 0, name
        injected = inject_into(process, "vcpu")
        assert injected.killed_by is None
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr


IN_PROCESS = textwrap.dedent(
    """
    import sys, threading, time
    from vmkit import VmConfig, testguest
    from vmkit.vm import Vm

    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["rng"] * 300 + ["ticks"], "poweroff", ticks=100),
        "--cpus", "boot=1", "--memory", "size=64M", "--serial", "null",
        "--console", "off", "--rng", "src=/dev/urandom",
    ])
    mine = threading.Thread(target=time.sleep, args=(60,), name="users-thread", daemon=True)
    mine.start()
    with Vm(config, seccomp=sys.argv[1] if sys.argv[1] == "log" else sys.argv[1] == "true") as vm:
        vm.boot()
        print("booted", flush=True)
        vm.wait(timeout=60)
    print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["true", "log"])
def test_an_in_process_vm_confines_its_own_threads_only(mode: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "booted\n"
        kinds = ["vcpu", "vmm", "spawner"]
        deadline = time.monotonic() + 30
        tids = {kind: find_thread(process, kind, deadline) for kind in kinds}
        names = threads(process.pid)
        # The program's own threads: the main thread and the one it started.
        for name in ("python", "users-thread"):
            for tid in names.get(name, []) + names.get(name[:15], []):
                assert seccomp_mode(process.pid, tid) == 0, name
        assert seccomp_mode(process.pid, process.pid) == 0
        for kind, tid in tids.items():
            assert seccomp_mode(process.pid, tid) == 2, kind
        injected = inject_into(process, "rng", trapped=mode == "true")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if mode == "true":
        assert injected.killed_by == signal.SIGSYS
        assert process.returncode == -signal.SIGSYS
        assert CH_MESSAGE in stderr
        assert "outside the seccomp filter of this rng thread" in stderr
    else:
        assert injected.killed_by is None
        assert process.returncode == 0, stderr
        assert stdout == "stopped\n"


def test_a_spawned_vmm_is_confined_as_a_whole() -> None:
    """``Vm.spawn``'s VMM process: the API server's threads too."""
    from vmkit import VmConfig
    from vmkit.vm import Vm

    config = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=200),
         "--cpus", "boot=1", "--memory", "size=64M", "--console", "off"]
    )  # fmt: skip
    with Vm.spawn(config) as vm:
        vm.boot()
        assert vm.info().state == "Running"  # an API request: its thread exists now
        names = threads(vm.pid)
        assert "vcpu0" in names and "vmm" in names
        modes = {}
        for name, tids in names.items():
            for tid in tids:
                try:
                    modes[f"{name}/{tid}"] = seccomp_mode(vm.pid, tid)
                except FileNotFoundError:
                    pass  # a thread that ended meanwhile (the info request's)
        assert set(modes.values()) == {2}, modes
        assert any(name.startswith("vcpu0/") for name in modes), modes


def test_a_bad_seccomp_value_is_refused_by_name() -> None:
    from vmkit import VmConfig
    from vmkit.vm import Vm

    config = VmConfig.from_cli(["--kernel", str(testguest.image_path("pvh"))])
    with pytest.raises(ValueError, match='seccomp must be true, false or log, not "maybe"'):
        Vm(config, seccomp="maybe")
