"""VMMs forked by the fork server are as isolated as freshly started ones.

``Vm.spawn`` forks each VMM from a pre-imported server as a child of the
caller (clone with CLONE_PARENT). These tests compare a forked VMM with a
fresh one from the outside (descriptors, signal dispositions, threads,
parent), check that VMMs do not depend on each other or on the server, and
that spawning and stopping leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import vmkit
from _spawndirs import own_tempdir, spawn_dirs  # noqa: F401 (a fixture)
from vmkit import Vm, VmConfig, _forkserver, registry, testguest
from vmkit.client import SpawnedVm

needs_kvm = pytest.mark.vmkit_kvm
pytestmark = needs_kvm


def guest_config(steps: str = "ticks", ticks: int = 100_000) -> VmConfig:
    kernel = testguest.image_path("pvh")
    return VmConfig.from_cli(
        ["--kernel", str(kernel), "--cmdline", f"steps={steps} ticks={ticks}",
         "--cpus", "boot=1", "--memory", "size=64M"]
    )  # fmt: skip


def assert_still_ticking(vm: SpawnedVm) -> None:
    last = max(int(n) for n in re.findall(r"tick (\d+)", vm.serial.text))
    vm.serial.wait_for(rf"tick {last + 2}$", timeout=30)
    assert vm.state == "Running"


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def thread_names(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names[Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()] += 1
        except OSError:
            pass
    return names


def descriptor_kinds(pid: int) -> Counter[str]:
    """What each descriptor refers to, without numbers and inode numbers."""
    kinds: Counter[str] = Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return kinds


def settled(vm: SpawnedVm) -> None:
    """Waits until the VMM's thread set stops changing (start-up threads done)."""
    previous = None
    for _ in range(100):
        now = thread_names(vm.pid)
        if now == previous:
            return
        previous = now
        time.sleep(0.05)


SIGINT, SIGTERM = 1 << (signal.SIGINT - 1), 1 << (signal.SIGTERM - 1)


def test_a_vm_process_holds_only_what_it_needs() -> None:
    with Vm.spawn(guest_config()) as vm, Vm.spawn(None, fresh_interpreter=True) as fresh:
        assert isinstance(vm.process, _forkserver.ForkedProcess)
        assert not isinstance(fresh.process, _forkserver.ForkedProcess)
        settled(fresh)
        status = status_fields(vm.pid)
        # This program's child, confined, its files its own only (as a fresh VMM).
        assert status["PPid"] == status_fields(fresh.pid)["PPid"] == str(os.getpid())
        assert status["Seccomp"] == status_fields(fresh.pid)["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        assert status["Umask"] == status_fields(fresh.pid)["Umask"] == "0077"
        # No Python: SIGPIPE ignored; handlers only for SIGSYS (the seccomp
        # report) and glibc's own two (32, 33); SIGTERM and SIGINT blocked
        # everywhere and taken from a signalfd.
        assert int(status["SigIgn"], 16) == 1 << (signal.SIGPIPE - 1)
        sigsys, glibc = 1 << (signal.SIGSYS - 1), (1 << 31) | (1 << 32)
        assert int(status["SigCgt"], 16) & ~glibc == sigsys
        assert int(status["SigBlk"], 16) == SIGINT | SIGTERM
        assert thread_names(vm.pid) == Counter({"python": 1, "vmm-control": 1})
        # stdin (/dev/null), the log twice, the control socket, the signalfd: nothing
        # of the fork server's or of this program's.
        fds = descriptor_kinds(vm.pid)
        assert fds == Counter(
            {"/dev/null": 1, str(vm.log_path): 2, "socket": 1, "anon_inode": 1}
        ), fds
        links = {os.readlink(f"/proc/{vm.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{vm.pid}/fd")}
        assert "anon_inode:[signalfd]" in links
        assert vm.client.ping().pid == vm.pid
        # Its VM's threads, each under its own filter too, once booted.
        vm.boot()
        vm.serial.wait_for(r"tick \d+", timeout=30)
        assert thread_names(vm.pid)["vcpu0"] == 1
        for tid in os.listdir(f"/proc/{vm.pid}/task"):
            task = Path(f"/proc/{vm.pid}/task/{tid}/status").read_text()
            assert re.search(r"^Seccomp:\s+2$", task, re.M), (tid, task)


def test_this_program_keeps_no_descriptor_of_a_spawned_vmms_log() -> None:
    """A fleet of spawned VMs costs this program no descriptor per VM for
    the logs: the VMM writes through its own copy, which the log outlives."""
    with Vm.spawn(guest_config()) as vm, Vm.spawn(None, fresh_interpreter=True) as fresh:
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed while listed
                held.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert vm.log_path is not None and fresh.log_path is not None
        assert str(vm.log_path) not in held and str(fresh.log_path) not in held
        assert str(vm.log_path) in descriptor_kinds(vm.pid)
        assert str(fresh.log_path) in descriptor_kinds(fresh.pid)


def test_the_vm_forker_is_a_fresh_interpreter_that_holds_only_its_socket() -> None:
    with Vm.spawn(None) as vm:
        server = _forkserver._shared
        assert server is not None and server.forker is not None
        forker = server.forker.pid
        # This program's child, as the VM processes it forks.
        assert status_fields(forker)["PPid"] == status_fields(vm.pid)["PPid"] == str(os.getpid())
        # Its own isolated interpreter (no site, no PYTHON* variables), not a
        # copy of the fork server's memory: VM processes map less of it.
        words = Path(f"/proc/{forker}/cmdline").read_bytes().split(b"\0")
        assert words[1:4] == [b"-I", b"-S", b"-c"], words
        assert os.path.samefile(words[0].decode(), sys.executable)
        # Beside stdio, only its request socket.
        beyond_stdio = [
            os.readlink(f"/proc/{forker}/fd/{fd}")
            for fd in os.listdir(f"/proc/{forker}/fd")
            if int(fd) > 2
        ]
        assert len(beyond_stdio) == 1 and beyond_stdio[0].startswith("socket:"), beyond_stdio


def test_the_vmm_takes_the_callers_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Vm.spawn(None).close()  # the server is running, started elsewhere
    monkeypatch.chdir(tmp_path)
    with Vm.spawn(None) as vm:
        assert os.readlink(f"/proc/{vm.pid}/cwd") == str(tmp_path)


def test_a_python_startup_variable_needs_a_fresh_interpreter() -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    with Vm.spawn(None, env=env) as vm:
        assert not isinstance(vm.process, _forkserver.ForkedProcess)
        assert vm.client.ping().pid == vm.pid


def test_other_python_variables_do_not_start_the_shared_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in a program whose first spawn brings its own PYTHON* variables: the
    # server must still be started for this program's own, or every later
    # default spawn would need a fresh interpreter.
    monkeypatch.setattr(_forkserver, "_shared", None)
    try:
        with Vm.spawn(None, env={**os.environ, "PYTHONHASHSEED": "12345"}) as vm:
            assert not isinstance(vm.process, _forkserver.ForkedProcess)
        assert _forkserver._shared is None
        with Vm.spawn(None) as vm:
            assert isinstance(vm.process, _forkserver.ForkedProcess)
    finally:
        started = _forkserver._shared
        if started is not None:
            started.close()


def context_switches(pid: int, tid: int) -> int:
    """Every context switch so far of thread ``tid`` of ``pid``."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return sum(int(n) for n in re.findall(r"^\w+_ctxt_switches:\s+(\d+)$", status, re.M))


def thread_ids(pid: int, name: str) -> list[int]:
    ids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == name:
                ids.append(int(tid))
    return ids


def halted_guest_config() -> VmConfig:
    """A guest that says hello, then halts with interrupts off: idle."""
    config = guest_config("hello")
    assert config.payload is not None
    config.payload.cmdline = testguest.cmdline(["hello"], exit="halt")
    return config


def test_an_idle_vm_wakes_neither_its_process_nor_this_one() -> None:
    # Waiting for the VM to stop and for its device events is done on their
    # eventfds, not by asking the VM process again and again: a fleet of idle
    # VMs costs no CPU.
    with Vm.spawn(halted_guest_config()) as vm:
        vm.boot()
        vm.serial.wait_for("exit halt", timeout=30)
        time.sleep(0.2)
        # The thread of this program that waits for the VM to stop, for its
        # device events and for its process to end (one for every VM), and
        # the VM process's thread that answers requests. No other thread
        # waits for this VM here.
        (control,) = thread_ids(vm.pid, "vmm-control")
        names = [t.name for t in threading.enumerate()]
        assert "vmm-watch" not in names and not any(n.startswith("vm-process") for n in names)
        watchers = [t.native_id for t in threading.enumerate() if t.name == "vmkit-reactor"]
        assert len(watchers) == 1 and watchers[0] is not None
        watcher = watchers[0]
        before = context_switches(vm.pid, control), context_switches(os.getpid(), watcher)
        time.sleep(1.0)
        assert (context_switches(vm.pid, control), context_switches(os.getpid(), watcher)) == before
        assert vm.state == "Running"


def stack_resident_kib(pid: int, tid: int) -> int:
    """Resident KiB of the mapping that holds thread ``tid``'s stack pointer
    (read while the thread waits in a system call)."""
    for _ in range(200):
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
        if len(fields) >= 3:  # "running" while it is on a CPU
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"thread {tid} never waited in a system call")
    sp = int(fields[-2], 16)
    holds_sp = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            low, high = (int(x, 16) for x in head[0].split("-"))
            holds_sp = low <= sp < high
        elif holds_sp and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError(f"no mapping holds thread {tid}'s stack pointer {sp:#x}")


def test_a_running_vm_process_gives_back_the_stack_its_set_up_used() -> None:
    # Creating and booting a VM runs deep on the control thread, and the
    # vCPU thread installs its filter before its run loop: a VM process
    # keeps none of those pages, which every VM of a fleet would pay for.
    with Vm.spawn(halted_guest_config()) as vm:
        vm.boot()
        vm.serial.wait_for("exit halt", timeout=30)
        (control,) = thread_ids(vm.pid, "vmm-control")
        (vcpu,) = thread_ids(vm.pid, "vcpu0")
        # 80 and 48 KiB before the pages went back.
        assert stack_resident_kib(vm.pid, control) <= 32
        assert stack_resident_kib(vm.pid, vcpu) <= 16


@pytest.mark.usefixtures("own_tempdir")
def test_close_all_ends_a_fleet_and_leaves_nothing_behind() -> None:
    Vm.spawn(None).close()  # the fork server and the reactor stay: start them first
    with Vm(guest_config()) as first:  # so does the CPU pressure file a first VM opens
        first.boot()
    del first
    before_dirs, before_fds = spawn_dirs(), open_descriptors()
    before_threads = {t.ident for t in threading.enumerate()}
    spawned = [Vm.spawn(guest_config()) for _ in range(4)]
    python_vmm = Vm.spawn(guest_config(), fresh_interpreter=True)
    here = Vm(guest_config())
    vms = [*spawned, python_vmm, here]
    for vm in vms:
        vm.boot()
    for vm in [*spawned, python_vmm]:
        vm.serial.wait_for(r"tick \d+", timeout=30)
    spawned[0].close()  # closing one again does nothing
    vmkit.close_all(vms)
    for vm in [*spawned, python_vmm]:
        assert vm.closed and vm.process.returncode is not None
        assert not Path(f"/proc/{vm.pid}").exists()
    assert here.state == "Shutdown"
    assert spawn_dirs() == before_dirs
    # An in-process Vm's descriptors go with the object (its exit_fd stays
    # valid until then); a spawned VM's with its close.
    del here, vms
    assert open_descriptors() == before_fds
    deadline = time.monotonic() + 5
    while {t.ident for t in threading.enumerate()} - before_threads - {_reactor_ident()}:
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.01)


def test_a_closed_vms_serial_output_and_log_stay_readable() -> None:
    """What the guest printed and the VMM logged are still there once ``close``
    or ``close_all`` has removed the files they were in (the VM process must
    not remove them first, as it does when this program dies)."""
    single = Vm.spawn(guest_config(), vmm_args=["-vv"])
    fleet = [Vm.spawn(guest_config(), vmm_args=["-vv"]) for _ in range(3)]
    for vm in [single, *fleet]:
        vm.boot()
    logged = {}
    for vm in [single, *fleet]:
        vm.serial.wait_for(r"tick 2$", timeout=30)
        assert vm.log_path is not None
        logged[vm.pid] = vm.log_path.read_text()
        assert "DEBUG" in logged[vm.pid]
    single.close()
    vmkit.close_all(fleet)
    for vm in [single, *fleet]:
        assert vm.tmpdir is not None and not vm.tmpdir.exists()
        assert re.search(r"tick 2$", vm.serial.text, re.MULTILINE), vm.serial.text
        assert vm.log.startswith(logged[vm.pid]), (vm.log, logged[vm.pid])


def test_an_ending_vm_process_removes_its_own_registry_entry() -> None:
    """A fleet's stop costs this program less per VM: each VM process removes
    its entry from ``vmkit ls`` as it exits, in parallel with the others."""
    vm = Vm.spawn(guest_config())
    vm.boot()
    entry = Path(registry.registry_dir(), f"{vm.name}.json")
    assert entry.exists()
    vm._begin_close()
    os.waitid(os.P_PID, vm.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert not entry.exists()
    vm.close()
    assert vm.name not in {e.name for e in registry.entries()}


def _reactor_ident() -> int | None:
    # The program's one reactor thread stays (it started with the first VM).
    return next((t.ident for t in threading.enumerate() if t.name == "vmkit-reactor"), None)


def test_one_vmm_crashing_leaves_the_others_running() -> None:
    with Vm.spawn(guest_config()) as first, Vm.spawn(guest_config()) as second:
        for vm in (first, second):
            vm.boot()
            vm.serial.wait_for(r"tick \d+", timeout=30)
        os.kill(first.pid, signal.SIGSEGV)
        exit_info = first.wait(30)
        assert exit_info is not None and "SIGSEGV" in exit_info.message
        assert_still_ticking(second)


def test_the_servers_death_leaves_running_vmms_alone() -> None:
    with Vm.spawn(guest_config()) as vm:
        vm.boot()
        vm.serial.wait_for(r"tick \d+", timeout=30)
        server = _forkserver._shared
        assert server is not None and server.forker is not None
        forker = server.forker.pid
        os.kill(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server.process.pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_still_ticking(vm)
        # The next spawn finds it dead and starts a new one.
        with Vm.spawn(None) as another:
            assert isinstance(another.process, _forkserver.ForkedProcess)
            assert another.client.ping().pid == another.pid
        assert _forkserver._shared is not server
        # The dead server's VM forker ended with it and was reaped: nothing left.
        assert not Path(f"/proc/{forker}").exists()
    assert vm.process.returncode == 0


def open_descriptors(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


@pytest.mark.usefixtures("own_tempdir")
def test_200_spawn_and_stop_cycles_leave_nothing_behind() -> None:
    config = guest_config(steps="ready")
    Vm.spawn(None).close()  # the server, started once
    server = _forkserver._shared
    assert server is not None
    fds, server_fds = open_descriptors(), open_descriptors(server.process.pid)
    threads = thread_names(os.getpid())
    children = children_of(os.getpid())
    temp = spawn_dirs()
    for _ in range(200):
        with Vm.spawn(config) as vm:
            vm.boot()
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.log
    assert _forkserver._shared is server, "the server was restarted"
    assert open_descriptors() == fds
    assert open_descriptors(server.process.pid) == server_fds
    assert thread_names(os.getpid()) == threads, [t.name for t in threading.enumerate()]
    assert children_of(os.getpid()) == children, "a VMM process (or zombie) is left"
    assert spawn_dirs() - temp == set()


#: Spawns VMs until the descriptor limit stops one, for limits that stop the
#: spawn at each of its steps that opens a descriptor; prints what a user sees.
_OUT_OF_DESCRIPTORS = """
import json, os, resource, sys, tempfile
import vmkit
from vmkit import Vm, VmConfig, VmError, testguest

config = VmConfig.from_cli(["--kernel", str(testguest.image_path("pvh")),
    "--cmdline", "steps=ticks", "--cpus", "boot=1", "--memory", "size=64M"])
Vm.spawn(None).close()  # the server, started once
before = sorted(os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
results = []
for headroom in range(24, 32):
    limit = len(before) + headroom
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    vms, error = [], None
    try:
        for _ in range(50):
            vms.append(Vm.spawn(config))
            vms[-1].boot()
    except VmError as e:
        error = (e.kind, str(e))
    running = sum(vm.state == "Running" for vm in vms)
    vmkit.close_all(vms)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    results.append({
        "limit": limit, "spawned": len(vms), "running": running, "error": error,
        "fds_left": sorted(os.listdir("/proc/self/fd")) == before,
        "dirs_left": [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("vmkit-vmm-")],
    })
print(json.dumps(results))
"""


def test_a_spawn_past_the_descriptor_limit_says_so_and_leaves_nothing(
    own_tempdir: Path,  # noqa: F811 (the fixture)
) -> None:
    """A program that runs out of file descriptors, wherever in a spawn that
    happens, gets VmError naming the limit and what to do; its VMs so far run
    on, and the failed spawn leaves no directory or descriptor behind."""
    import json
    import subprocess

    env = {**os.environ, "TMPDIR": str(own_tempdir)}
    run = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for result in json.loads(run.stdout):
        assert result["spawned"] >= 1 and result["running"] == result["spawned"], result
        assert result["error"] is not None, result
        kind, message = result["error"]
        assert kind == "Spawn", result
        assert message == (
            "Cannot start a VMM: this program has used up its file descriptors "
            f"(RLIMIT_NOFILE is {result['limit']}, and each spawned VM keeps several open "
            "here): raise the limit (ulimit -n, or resource.setrlimit in the program)"
        ), result
        assert result["fds_left"], f"descriptors were left open: {result}"
        assert result["dirs_left"] == [], result


def test_forked_process_waits_and_signals_like_popen() -> None:
    with Vm.spawn(None) as vm:
        process = vm.process
        assert isinstance(process, _forkserver.ForkedProcess)
        assert process.poll() is None
        with pytest.raises(Exception, match="timed out"):
            process.wait(0.05)
        process.terminate()
        assert process.wait(30) == 0  # SIGTERM: the VMM exits cleanly
        process.kill()  # reaped: nothing is sent (the pid may be reused)
        assert process.poll() == 0
