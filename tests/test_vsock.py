"""virtio-vsock with Cloud Hypervisor's hybrid vsock: streams between host
programs and the test guest, both ways, several at once, data checked byte for
byte, beside the real Cloud Hypervisor where it is at hand.

The guest's ``vsock`` step is an echo server on port 1234 (the host connects
with ``vm.vsock_connect``) and then a client of host port 1235 (the host
listens on ``<socket>_1235`` and echoes); every stream carries the same
pattern each way.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote
from vmkit import VmConfig, testguest
from vmkit._vsock import connect
from vmkit.client import spawn
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

GUEST_PORT = 1234
HOST_PORT = 1235


def pattern(n: int) -> bytes:
    """The bytes every stream of the guest's ``vsock`` step carries."""
    return bytes((j * 7 + (j >> 8)) & 0xFF for j in range(n))


class EchoListener:
    """Echoes every stream accepted on the unix socket ``<vsock socket>_<port>``."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.path = path
        self.accepted = 0
        self.echoed = 0
        self.threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                stream, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._echo, args=(stream,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _echo(self, stream: socket.socket) -> None:
        with stream:
            while data := stream.recv(65536):
                stream.sendall(data)
                self.echoed += len(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(5)
        os.unlink(self.path)


def echo_through_guest(streams: list[socket.socket], size: int) -> None:
    """Sends the pattern on every stream at once, checks each echo, closes them."""
    for stream in streams:
        stream.sendall(pattern(size))
    for stream in streams:
        with stream:
            stream.settimeout(30)
            received = bytearray()
            while len(received) < size:
                chunk = stream.recv(65536)
                assert chunk, f"the guest closed after {len(received)} of {size} bytes"
                received += chunk
            assert bytes(received) == pattern(size)


def closed_by_peer(stream: socket.socket) -> bool:
    """Whether the other end closed ``stream`` (with or without a reset)
    rather than sending something."""
    try:
        return stream.recv(64) == b""
    except ConnectionResetError:
        return True


def guest_config(sock: Path, image: testguest.Format = "pvh", **options: int) -> VmConfig:
    return VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path(image)),
            "--cmdline", testguest.cmdline(["vsock"], "poweroff", **options),
            "--memory", "size=128M",
            "--serial", "tty", "--console", "off",
            "--vsock", f"cid=3,socket={sock}",
        ]
    )  # fmt: skip


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "vsock.sock"


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_streams_both_ways_several_at_once(sock: Path, image: testguest.Format) -> None:
    size = 100_000
    echo = EchoListener(f"{sock}_{HOST_PORT}")
    try:
        with Vm(guest_config(sock, image, vsock_accept=3, vsock_connect=3, vsock_bytes=size)) as vm:
            vm.boot()
            vm.serial.wait_for("vsock listening", timeout=30)
            echo_through_guest([vm.vsock_connect(GUEST_PORT) for _ in range(3)], size)
            exit_info = vm.wait(60)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            assert (
                f"step vsock ok cid=3 accepted=3 connected=3 bytes={6 * size}" in vm.serial.text
            ), vm.serial.text
        assert echo.accepted == 3 and echo.echoed == 3 * size
    finally:
        echo.close()
    assert not sock.exists(), "the VMM removes its socket with the VM"


def test_a_port_nobody_listens_on_is_refused(sock: Path, vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(guest_config(sock, vsock_accept=1, vsock_connect=0))
    vm.boot()
    vm.serial.wait_for("vsock listening", timeout=30)
    with pytest.raises(ConnectionRefusedError, match="vsock port 4321"):
        vm.vsock_connect(4321)
    echo_through_guest([vm.vsock_connect(GUEST_PORT)], 5000)
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text


def test_a_guest_connecting_to_a_host_port_nobody_listens_on_is_refused(
    sock: Path, vmkit_vm: VmFactory
) -> None:
    vm = vmkit_vm(guest_config(sock, vsock_accept=0, vsock_connect=1))
    vm.boot()
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff"
    assert f"step vsock fail host refused port {HOST_PORT}" in vm.serial.text, vm.serial.text


def test_idle_and_garbage_host_connections_do_not_stop_the_device(
    sock: Path, vmkit_vm: VmFactory
) -> None:
    # Host programs that connect and say nothing, or say nonsense, are dropped
    # (after 2 s, or at once); then the guest's real connection goes through.
    vm = vmkit_vm(guest_config(sock, vsock_accept=1, vsock_connect=0))
    vm.boot()
    vm.serial.wait_for("vsock listening", timeout=30)
    for text in (b"HELLO\n", b"CONNECT -1\n", b"CONNECT " + b"9" * 40 + b"\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.settimeout(10)
            bad.connect(str(sock))
            bad.sendall(text)
            assert closed_by_peer(bad), f"{text!r} was answered"
    idle = []
    for _ in range(100):
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.connect(str(sock))
        idle.append(stream)
    # Past 64 waiting for their line, the VMM closes new ones at once;
    # each idle one after 2 s.
    deadline = time.monotonic() + 10
    for stream in idle:
        stream.settimeout(max(0.1, deadline - time.monotonic()))
        assert closed_by_peer(stream), "an idle connection was kept"
        stream.close()
    echo_through_guest([vm.vsock_connect(GUEST_PORT)], 5000)
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text


def test_no_vsock_device_is_a_clear_error(tmp_path: Path) -> None:
    config = guest_config(tmp_path / "v.sock")
    config.vsock = None
    with Vm(config) as vm, pytest.raises(VmError, match=r"no vsock device \(--vsock\)"):
        vm.vsock_connect(GUEST_PORT)


def test_a_socket_path_in_use_is_refused_at_boot(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    vm = vmkit_vm(guest_config(taken))
    with pytest.raises(VmError, match=f"cannot bind the unix socket {taken}: Address already"):
        vm.boot()
    vm.close()
    assert taken.read_text() == "", "the file is left as it was"


def test_a_spawned_vm_with_a_vsock_added_before_boot(tmp_path: Path) -> None:
    # vm.add-vsock on a created VM (ch-remote add-vsock's request), then boot.
    sock = tmp_path / "v.sock"
    config = guest_config(sock, vsock_accept=1, vsock_connect=0)
    config.vsock = None
    with spawn(config) as vm:
        answer = vm.client.add_vsock(f"cid=3,socket={sock}")
        assert answer is None, "a cold add answers 204 without a body"
        vm.boot()
        vm.serial.wait_for("vsock listening", timeout=30)
        echo_through_guest([vm.vsock_connect(GUEST_PORT)], 5000)
        exit_info = vm.wait(30)
        assert exit_info is not None and exit_info.reason == "poweroff"


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_the_same_guest_and_host_programs_work_under_cloud_hypervisor(tmp_path: Path) -> None:
    # Both VMMs, the same command line, the same host side: the host protocol
    # (CONNECT/OK, <socket>_<port>) and the guest's view are Cloud Hypervisor's.
    size = 50_000
    results = {}
    trees: dict[str, Any] = {}
    for kind in ("ch", "vmkit"):
        sock = tmp_path / f"{kind}.sock"
        serial = tmp_path / f"{kind}-serial.txt"
        echo = EchoListener(f"{sock}_{HOST_PORT}")
        process = VmmProcess(
            kind,
            tmp_path / f"{kind}-api.sock",
            tmp_path / f"{kind}.log",
            (
                "--kernel", str(testguest.image_path("pvh")),
                "--cmdline", testguest.cmdline(["vsock"], "poweroff", vsock_bytes=size),
                "--memory", "size=128M",
                "--serial", f"file={serial}", "--console", "off",
                "--vsock", f"cid=3,socket={sock}",
            ),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "vsock listening" not in (serial.read_text() if serial.exists() else ""):
                assert time.monotonic() < deadline, process.log
                time.sleep(0.02)
            status, out, _ = ch_remote(process.socket_path, "info")
            assert status == 0
            trees[kind] = json.loads(out)["device_tree"]
            echo_through_guest([connect(str(sock), GUEST_PORT, 10) for _ in range(2)], size)
            assert process.wait(30) == 0, process.log
            results[kind] = [
                line for line in serial.read_text().splitlines() if "step vsock" in line
            ]
        finally:
            process.stop()
            echo.close()
        assert not sock.exists(), f"{kind} left its socket behind"
    assert (
        results["vmkit"]
        == results["ch"]
        == [f"vmkit-guest: step vsock ok cid=3 accepted=2 connected=2 bytes={4 * size}"]
    )


def test_the_socket_moves_with_a_vm_migrated_to_another_vmm_process(tmp_path: Path) -> None:
    # Cloud Hypervisor's receiver cannot bind the path its sender holds; vmkit's
    # sender hands its listening socket over, so host programs keep the path.
    from _helpers import move_spawned_vm

    sock = tmp_path / "v.sock"
    config = guest_config(
        sock, vsock_accept=2, vsock_connect=0, vsock_bytes=20_000, vsock_timeout_ms=60_000
    )
    config.serial.mode = "File"
    config.serial.file = str(tmp_path / "serial.log")
    sender = Vm.spawn(config)
    receiver = Vm.spawn(None)
    try:
        sender.boot()
        deadline = time.monotonic() + 30
        while "vsock listening" not in (tmp_path / "serial.log").read_text(errors="replace"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        move_spawned_vm(sender, receiver, tmp_path / "m.sock")
        assert sock.exists(), "the sender removed the socket the receiver listens on"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as by_path:
            by_path.connect(str(sock))  # a host program that knows only the path
            by_path.sendall(f"CONNECT {GUEST_PORT}\n".encode())
            by_path.settimeout(10)
            answer = b""
            while not answer.endswith(b"\n"):
                answer += by_path.recv(1)
            assert answer.startswith(b"OK "), answer
            echo_through_guest([by_path, receiver.vsock_connect(GUEST_PORT)], 20_000)
        exit_info = receiver.wait(timeout=60)
        assert exit_info is not None and exit_info.reason == "poweroff", exit_info
        text = (tmp_path / "serial.log").read_text()
        assert "step vsock ok cid=3 accepted=2 connected=0 bytes=40000" in text, text
    finally:
        sender.close()
        receiver.close()
    assert not sock.exists(), "the receiver removes the socket with the VM"


@pytest.mark.parametrize("mode", ["echo", "sink", "source"])
def test_the_guests_cpl3_pump_moves_data_both_ways(sock: Path, mode: str) -> None:
    # The benchmarks' guest driver (vsock_cpl3=1): its data must arrive whole.
    size = 300_000
    options = {
        "echo": {"vsock_accept": 1, "vsock_connect": 0},
        "sink": {"vsock_accept": 1, "vsock_connect": 0, "vsock_echo": 0},
        "source": {"vsock_accept": 0, "vsock_connect": 1, "vsock_echo": 0},
    }[mode]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{sock}_{HOST_PORT}")
    listener.listen(1)
    try:
        config = guest_config(sock, vsock_cpl3=1, vsock_check=0, vsock_bytes=size, **options)
        with Vm(config) as vm:
            vm.boot()
            if mode == "source":
                listener.settimeout(30)
                stream, _ = listener.accept()
                with stream:
                    received = 0
                    while chunk := stream.recv(65536):
                        received += len(chunk)
                assert received == size
            else:
                vm.serial.wait_for("vsock listening", timeout=30)
                if mode == "echo":
                    echo_through_guest([vm.vsock_connect(GUEST_PORT)], size)
                else:
                    with vm.vsock_connect(GUEST_PORT) as stream:
                        stream.sendall(bytes(size))
                        stream.shutdown(socket.SHUT_WR)
                        stream.settimeout(30)
                        assert closed_by_peer(stream)
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            assert "step vsock ok cid=3" in vm.serial.text, vm.serial.text
            assert f"bytes={size}" in vm.serial.text
    finally:
        listener.close()
        os.unlink(f"{sock}_{HOST_PORT}")
