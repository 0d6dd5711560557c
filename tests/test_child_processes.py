"""What a VMM holds stays out of child processes, and children are started safely.

Every descriptor a running VM holds (KVM, guest memory, eventfds, epoll,
io_uring, timers, the tap, the pty, sockets, files) is close-on-exec, so a
program the host application starts while a VM runs (``subprocess`` with
``close_fds=False``, ``os.posix_spawn``) gets none of them; ``Vm.spawn``'s
VMM process holds only close-on-exec descriptors beyond stdio and inherits
none of its caller's. ``Vm.spawn`` runs the caller's interpreter by its
absolute path, never through a shell or a PATH lookup, and without the
current directory on ``sys.path``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmkit import Vm, VmConfig, testguest
from vmkit.client import spawn
from vmkit.vm import VmError

ROOT = Path(__file__).resolve().parent.parent
needs_kvm = pytest.mark.vmkit_kvm

#: Prints the child's descriptors as {fd: what it refers to} (the listing's own
#: descriptor is gone by the time it is looked at, and left out).
LIST_FDS = """
import json, os
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass
print(json.dumps(fds))
"""

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def can_make_taps() -> bool:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"vmkfd%d", flags))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def descriptors(pid: int | str = "self") -> dict[int, str]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return found


def close_on_exec(pid: int, fd: int) -> bool:
    """From /proc/PID/fdinfo: whether ``fd`` has O_CLOEXEC."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def child_descriptors_by_subprocess() -> dict[int, str]:
    result = subprocess.run(
        [sys.executable, "-c", LIST_FDS],
        close_fds=False,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=60,
    )
    return {int(fd): what for fd, what in json.loads(result.stdout).items()}


def child_descriptors_by_posix_spawn() -> dict[int, str]:
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", LIST_FDS],
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, write_end, 1)],
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as output:
        text = output.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return {int(fd): what for fd, what in json.loads(text).items()}


def leaked(vm_fds: dict[int, str], child: dict[int, str]) -> dict[int, str]:
    """The VM's descriptors that the child has too (same number, same object)."""
    return {fd: what for fd, what in vm_fds.items() if child.get(fd) == what}


def device_argv(tmp_path: Path, serial: str, console: str) -> list[str]:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(1 << 20)
    steps = ["blk", "rng", "console", "ticks"]
    argv = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", ticks=100_000, tick_ms=10),
        "--cpus", "boot=2", "--memory", "size=256M,shared=on",
        "--disk", f"path={disk},num_queues=2", "--rng", "src=/dev/urandom",
        "--serial", serial, "--console", console,
    ]  # fmt: skip
    if can_make_taps():
        argv += ["--net", "mac=12:34:56:78:9a:bc"]
    return argv


@pytest.fixture
def inheritable_pipe() -> Iterator[tuple[int, int]]:
    """The control: descriptors that are not close-on-exec do reach a child."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


@needs_kvm
@pytest.mark.parametrize(
    ("serial", "console"),
    [("socket", "pty"), ("pty", "file"), ("file", "null")],
)
def test_a_running_vm_leaks_no_descriptor_into_children(
    tmp_path: Path, serial: str, console: str, inheritable_pipe: tuple[int, int]
) -> None:
    serial_option = {"socket": f"socket={tmp_path}/serial.sock", "file": f"file={tmp_path}/s"}
    console_option = {"file": f"file={tmp_path}/c"}
    before = descriptors()
    config = VmConfig.from_cli(
        device_argv(
            tmp_path, serial_option.get(serial, serial), console_option.get(console, console)
        )
    )
    client = None
    with Vm(config) as vm:
        vm.boot()
        if serial == "socket":
            client = socket.socket(socket.AF_UNIX)
            client.connect(f"{tmp_path}/serial.sock")
        # Every device has been activated (queues, workers, io_uring) by now.
        vm.serial.wait_for(r"tick 1$", timeout=30) if serial != "socket" else time.sleep(1)
        now = descriptors()
        vm_fds = {fd: what for fd, what in now.items() if before.get(fd) != what}
        vm_fds.pop(inheritable_pipe[0], None)
        vm_fds.pop(inheritable_pipe[1], None)
        if client is not None:
            vm_fds.pop(client.fileno(), None)
        assert len(vm_fds) >= 10, vm_fds  # KVM, memory, eventfds, ...
        not_cloexec = {
            fd: what for fd, what in vm_fds.items() if not close_on_exec(os.getpid(), fd)
        }
        assert not not_cloexec, f"not close-on-exec: {not_cloexec}"
        for child in (child_descriptors_by_subprocess(), child_descriptors_by_posix_spawn()):
            assert child.get(inheritable_pipe[0]) == now[inheritable_pipe[0]], "control"
            assert not leaked(vm_fds, child), leaked(vm_fds, child)
    if client is not None:
        client.close()


@needs_kvm
@pytest.mark.parametrize("fresh_interpreter", [False, True], ids=["forked", "fresh"])
def test_the_spawned_vmm_inherits_nothing_and_leaks_nothing(
    tmp_path: Path, inheritable_pipe: tuple[int, int], fresh_interpreter: bool
) -> None:
    config = VmConfig.from_cli(device_argv(tmp_path, "null", "pty"))
    mine = os.readlink(f"/proc/self/fd/{inheritable_pipe[0]}")
    vm = spawn(config, serial_log=True, fresh_interpreter=fresh_interpreter)
    try:
        vm.boot()
        deadline = time.monotonic() + 30
        while "tick 1\n" not in vm.serial.text:
            assert time.monotonic() < deadline, vm.serial.text
            time.sleep(0.05)
        held = descriptors(vm.pid)
        assert mine not in held.values(), "the caller's descriptor reached the VMM"
        assert len(held) >= 13, held
        not_cloexec = {
            fd: what for fd, what in held.items() if fd > 2 and not close_on_exec(vm.pid, fd)
        }
        assert not not_cloexec, f"not close-on-exec in the VMM: {not_cloexec}"
    finally:
        vm.close()


def test_spawn_refuses_an_interpreter_it_would_have_to_look_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for executable in ("python3", ""):
        monkeypatch.setattr(sys, "executable", executable)
        with pytest.raises(VmError, match="interpreter path is unknown or relative") as raised:
            spawn(None, startup_timeout=5)
        assert raised.value.kind == "Spawn"


def test_a_vmkit_folder_in_the_current_directory_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m vmkit`` would import ./vmkit first; the spawned VMM must not."""
    marker = tmp_path / "ran"
    fake = tmp_path / "vmkit"
    fake.mkdir()
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("__init__.py", "__main__.py", "cli.py"):
        (fake / name).write_text(payload)
    monkeypatch.chdir(tmp_path)
    vm = spawn(None, startup_timeout=30)
    try:
        assert vm.client.ping().pid == vm.pid
    finally:
        vm.close()
    assert not marker.exists(), "the VMM ran the vmkit folder of the current directory"
