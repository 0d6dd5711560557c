"""virtio-net on a Linux tap under the vmkit test guest: a frame each way
between the guest and an AF_PACKET socket on the host, counters, a tap that
vmkit creates (configured, up, gone after the VM), a tap descriptor the
caller opened (``fd=``), and clear errors for unusable taps and descriptors.

They need /dev/kvm, /dev/net/tun and CAP_NET_ADMIN (to create taps), and
skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import move_spawned_vm
from _sockets import wait_listening
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.testguest import GuestResults, parse_results
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
ETH_P_ALL = 0x0003
ETHERTYPE = b"\x88\xb5"
GUEST_MAC = "12:34:56:78:9a:bc"
HOST_MAC = bytes.fromhex("020000564d4b")


def open_tap(name: str, flags: int = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) -> tuple[int, str]:
    """Opens /dev/net/tun and attaches it to the tap `name` (created if absent)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd, ifr[:16].rstrip(b"\0").decode()


def _tap_support() -> str | None:
    """Why taps cannot be used here, or None."""
    if shutil.which("ip") is None:
        return "the ip command is missing"
    try:
        fd, _ = open_tap("vmtap%d")
    except OSError as e:
        return f"cannot create a tap (needs /dev/net/tun and CAP_NET_ADMIN): {e}"
    os.close(fd)
    return None


_why = _tap_support()
if _why is not None:
    pytest.skip(_why, allow_module_level=True)

_names = itertools.count()


def unique_name() -> str:
    return f"vmkn{os.getpid() % 100000}x{next(_names)}"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def quiet(name: str) -> None:
    """No IPv6 chatter from the host on this interface (the guest ignores it anyway)."""
    try:
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
    except OSError:
        pass


def interfaces() -> dict[str, dict[str, Any]]:
    return {i["ifname"]: i for i in json.loads(ip("-j", "addr"))}


@pytest.fixture
def tap() -> Iterator[str]:
    """A persistent tap made with `ip tuntap`, up, deleted afterwards."""
    name = unique_name()
    ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        quiet(name)
        ip("link", "set", name, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def packet_socket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((name, 0))
    sock.settimeout(0.2)
    return sock


def config(steps: list[str], *extra: str, **options: int) -> VmConfig:
    return VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(steps, "poweroff", **options),
         "--cpus", "boot=1", "--memory", "size=256M", "--serial", "null", *extra]
    )  # fmt: skip


def answer_ping(vm: Vm, sock: socket.socket, timeout: float = 20) -> bytes:
    """Waits for the guest's frame and answers it; returns the guest's frame."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(65536)
        except TimeoutError:
            continue
        if frame[12:14] == ETHERTYPE and frame[14:].startswith(b"vmkit-guest"):
            pong = b"\xff" * 6 + HOST_MAC + ETHERTYPE + b"vmkit-host pong".ljust(46, b"\0")
            sock.send(pong)
            return frame
    pytest.fail(f"no frame from the guest within {timeout} s:\n{vm.serial.text}")


def net_rx_line(results: GuestResults) -> re.Match[str]:
    for line in results.lines:
        match = re.fullmatch(r"vmkit-guest: net rx len=(\d+) payload=(.*)", line)
        if match:
            return match
    pytest.fail(f"no net rx line: {results.lines}")


def check_exchange(vm: Vm, name: str) -> GuestResults:
    """The guest's ping reaches `name`, the host's pong reaches the guest."""
    with packet_socket(name) as sock:
        vm.boot()
        frame = answer_ping(vm, sock)
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert len(frame) == 60
    assert frame[14:] == b"vmkit-guest net ping".ljust(46, b"\0")
    vm.serial.wait_for(r"step net (ok|fail)", timeout=20)
    results = parse_results(vm.serial.text)
    assert results.ok("net"), results.lines
    rx = net_rx_line(results)
    assert rx.groups() == ("60", "vmkit-host pong")
    values = results.values("net")
    assert values["mac"] == GUEST_MAC and values["tx"] == "1"
    assert int(values["rx"]) >= 1
    return results


def test_a_frame_each_way_and_counters(tap: str, vmkit_vm: VmFactory) -> None:
    cfg = config(["net", "ticks"], "--net", f"tap={tap},mac={GUEST_MAC}", ticks=50, tick_ms=20)
    vm = vmkit_vm(cfg)
    check_exchange(vm, tap)
    counters = vm.counters()["_net0"]
    assert set(counters) == {"rx_bytes", "rx_frames", "tx_bytes", "tx_frames"}
    # Payload bytes, without the 12-byte virtio-net header.
    assert (counters["tx_frames"], counters["tx_bytes"]) == (1, 60)
    assert counters["rx_frames"] >= 1 and counters["rx_bytes"] >= 60
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    vm.close()
    # The user's tap outlives the VM.
    assert tap in interfaces()


def test_vmkit_creates_configures_and_removes_its_tap(vmkit_vm: VmFactory) -> None:
    before = set(interfaces())
    cfg = config(["ticks"], "--net", "ip=192.168.249.1,mask=255.255.255.0", ticks=1000, tick_ms=10)
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"tick 1\b", timeout=20)
    new = {n: i for n, i in interfaces().items() if n not in before}
    assert len(new) == 1, new
    ((name, info),) = new.items()
    assert name.startswith("vmtap")
    assert "UP" in info["flags"]
    addrs = [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"]
    assert addrs == [("192.168.249.1", 24)]
    vm.shutdown()
    assert name not in interfaces(), "the tap vmkit created outlived the VM"


def test_a_caller_opened_tap_descriptor() -> None:
    fd, name = open_tap(unique_name())
    try:
        quiet(name)
        ip("link", "set", name, "up")
        cfg = config(["net"], "--net", f"fd=[{fd}],mac={GUEST_MAC}")
        with Vm(cfg) as vm:
            check_exchange(vm, name)
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff"
        # vmkit used a duplicate: the caller's descriptor is still open.
        os.fstat(fd)
        assert name in interfaces()
    finally:
        os.close(fd)


def boot_error(*net: str) -> VmError:
    vm = Vm(config(["hello"], "--net", *net))
    try:
        with pytest.raises(VmError) as info:
            vm.boot()
        return info.value
    finally:
        vm.close()


def test_unusable_taps_and_descriptors_are_named() -> None:
    with open("/dev/null", "rb") as f:
        e = boot_error(f"fd=[{f.fileno()}]")
    assert e.kind == "Device"
    assert re.search(r"_net0: fd=\d+: not a tap device", e.message), e.message

    closed = 999_999
    with pytest.raises(OSError):
        os.fstat(closed)
    e = boot_error(f"fd=[{closed}]")
    assert f"fd={closed}: not an open file descriptor" in e.message, e.message

    e = boot_error("tap=lo")
    assert "tap=lo: TUNSETIFF" in e.message and "not a tap" in e.message, e.message

    e = boot_error("tap=averyveryverylongname")
    assert "tap=averyveryverylongname" in e.message, e.message
    assert "at most 15 bytes" in e.message, e.message

    # A tap opened without a virtio-net header cannot be used.
    fd, _ = open_tap(unique_name(), IFF_TAP | IFF_NO_PI)
    try:
        e = boot_error(f"fd=[{fd}]")
        assert "without IFF_VNET_HDR" in e.message, e.message
    finally:
        os.close(fd)


def test_boots_leak_no_descriptors_threads_or_taps(tap: str) -> None:
    def run() -> None:
        # Two devices: one on the user's tap, one on a tap vmkit creates.
        with Vm(config(["hello"], "--net", f"tap={tap}", "ip=10.99.0.1")) as vm:
            vm.boot()
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff"

    def vmkit_taps() -> set[str]:
        # Other tests' VMs (other xdist workers) make taps too, under names of
        # their own or as vmkit's vmtapN while they run: only these count.
        return {name for name in interfaces() if name.startswith("vmtap")}

    run()
    gc.collect()
    fds, threads, taps = len(os.listdir("/proc/self/fd")), threading.active_count(), vmkit_taps()
    for _ in range(3):
        run()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert tap in interfaces()  # the user's tap stays
    deadline = time.monotonic() + 10
    while not vmkit_taps() <= taps and time.monotonic() < deadline:
        time.sleep(0.1)  # another worker's VM may hold a vmtapN a moment
    assert vmkit_taps() <= taps


def answer_pings(sock: socket.socket, count: int, serial: Path, timeout: float = 30) -> None:
    """Answers the guest's first ``count`` pings (only those: a pong that
    lands between steps would be left in the ring for the next one)."""
    deadline = time.monotonic() + timeout
    answered = 0
    while answered < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{answered} of {count} pings within {timeout} s:\n{serial.read_text()}")
        try:
            frame = sock.recv(65536)
        except TimeoutError:
            continue
        if frame[12:14] == ETHERTYPE and frame[14:].startswith(b"vmkit-guest"):
            sock.send(b"\xff" * 6 + HOST_MAC + ETHERTYPE + b"vmkit-host pong".ljust(46, b"\0"))
            answered += 1


def wait_text(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {timeout} s:\n{path.read_text(errors='replace')}")
        time.sleep(0.005)


def test_a_vm_moves_within_one_host_with_its_tap(tmp_path: Path) -> None:
    """A same-host move (a VMM upgrade) between VMM processes: the receiver
    cannot attach the tap while the sender holds it, so the sender hands its
    tap over. Frames flow on both sides of the move, and the tap vmkit made
    lives until the VM that now has it is gone."""
    name = unique_name()
    serial = tmp_path / "serial.log"
    cfg = config(
        ["ticks", "net", "ticks", "net"],
        "--net", f"tap={name},ip=192.168.251.1,mask=255.255.255.0,mac={GUEST_MAC}",
        ticks=25, tick_ms=20,
    )  # fmt: skip
    cfg.serial.mode, cfg.serial.file = "File", str(serial)
    sender = Vm.spawn(cfg)
    receiver = Vm.spawn(config(["hello"]))
    try:
        sender.boot()
        with packet_socket(name) as sock:
            answer_pings(sock, 1, serial)
            wait_text(serial, "step net ok")
            move_spawned_vm(sender, receiver, tmp_path / "m.sock")
            assert name in interfaces(), "the tap went with the sending process"
            # The receiver opened the serial file afresh (as Cloud Hypervisor's does).
            assert "step net ok" not in serial.read_text(), (
                "the second net step ran before the move"
            )
            answer_pings(sock, 1, serial)
        exit_info = receiver.wait(timeout=60)
        assert exit_info is not None and exit_info.reason == "poweroff", serial.read_text()
        results = parse_results(serial.read_text())
        assert (results.passed, results.failed) == (4, 0), results.lines
        # The answer after the move (the file holds only what came since).
        assert net_rx_line(results).groups() == ("60", "vmkit-host pong")
    finally:
        sender.close()
        receiver.close()
    assert name not in interfaces(), "the tap outlived the VM"


class Relay:
    """Copies bytes between a client on ``path`` and ``target``, as a relay
    between hosts would: descriptors sent along do not get through."""

    def __init__(self, path: Path, target: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fspath(path))
        self.listener.listen(1)
        self.target = target
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        self.listener.close()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(os.fspath(self.target))

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(1 << 16):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(server, client), daemon=True)
        back.start()
        pipe(client, server)
        back.join(30)
        client.close()
        server.close()


@pytest.mark.parametrize("given", ["tap", "fd"])
def test_taps_that_do_not_arrive_are_opened_by_name_or_refused(tmp_path: Path, given: str) -> None:
    """Through a relay (as between hosts) the tap queues do not arrive: the
    receiver opens a tap by name (here the sender still holds it, so that
    fails with the reason), and refuses a device given as descriptors, which
    belong to the sender. The VM runs on where it was."""
    name = unique_name()
    fd, _ = open_tap(name) if given == "fd" else (-1, name)
    net = f"fd=[{fd}]" if given == "fd" else f"tap={name},ip=192.168.251.1,mask=255.255.255.0"
    cfg = config(["hello", "ticks"], "--net", net, ticks=40, tick_ms=20)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            Vm.receive_migration(tmp_path / "m.sock")
        except BaseException as e:
            errors.append(e)

    try:
        with Vm(cfg) as vm:
            vm.boot()
            receiver = threading.Thread(target=receive)
            receiver.start()
            wait_listening(tmp_path / "m.sock")
            Relay(tmp_path / "relay.sock", tmp_path / "m.sock")
            with pytest.raises(VmError) as e:
                vm.migrate_to(tmp_path / "relay.sock")
            receiver.join(30)
            assert "the receiving VMM refused the migration" in str(e.value), str(e.value)
            if given == "tap":
                assert f"tap={name}" in str(e.value), str(e.value)
                assert "in use by another process" in str(e.value)
            else:
                assert f"net _net0: fd=[{fd}] are the sending process's descriptors" in str(
                    e.value
                ), str(e.value)
            assert len(errors) == 1 and isinstance(errors[0], VmError)
            assert vm.state == "Running"
            exit_info = vm.wait(timeout=30)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            assert "vmkit-guest: summary passed=2 failed=0" in vm.serial.text
    finally:
        if fd >= 0:
            os.close(fd)
    assert name not in ip("-o", "link", "show")


def test_a_tap_given_as_a_descriptor_moves_with_the_vm(tmp_path: Path) -> None:
    """``fd=``: the caller's descriptor is the sender's to hand over; the
    receiver adopts the tap and the guest's frames flow on after the move."""
    fd, name = open_tap(unique_name())
    try:
        quiet(name)
        ip("link", "set", name, "up")
        cfg = config(
            ["ticks", "net", "ticks"], "--net", f"fd=[{fd}],mac={GUEST_MAC}", ticks=25, tick_ms=20
        )
        received: list[Vm] = []
        waiting = threading.Thread(
            target=lambda: received.append(Vm.receive_migration(tmp_path / "m.sock"))
        )
        with packet_socket(name) as sock:
            with Vm(cfg) as vm:
                vm.boot()
                waiting.start()
                wait_listening(tmp_path / "m.sock")
                vm.migrate_to(tmp_path / "m.sock")
                waiting.join(30)
                assert "step net" not in vm.serial.text, "moved too late"
            (moved,) = received
            with moved:
                answer_ping(moved, sock)
                assert moved.serial.wait_for(r"step net ok", timeout=20), moved.serial.text
                # The moved device counts from the move on: the guest's one frame.
                assert moved.counters()["_net0"]["tx_frames"] == 1
                exit_info = moved.wait(30)
                assert exit_info is not None and exit_info.reason == "poweroff", moved.serial.text
                assert parse_results(moved.serial.text).ok("net")
        # The caller's descriptor is still the caller's.
        os.fstat(fd)
    finally:
        os.close(fd)


def test_a_snapshot_whose_tap_descriptor_is_gone_is_refused_by_name(tmp_path: Path) -> None:
    """A restore needs the taps the config names: a device given as ``fd=``
    whose descriptor is closed by then is named in the error, and nothing is
    left behind."""
    fd, name = open_tap(unique_name())
    snap = tmp_path / "snap"
    snap.mkdir()
    try:
        with Vm(config(["ticks"], "--net", f"fd=[{fd}]", ticks=1000, tick_ms=10)) as vm:
            vm.boot()
            assert vm.serial.wait_for(r"tick 1\b", timeout=20)
            vm.pause()
            vm.snapshot(snap)
    finally:
        os.close(fd)
    gc.collect()
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    with pytest.raises(VmError) as e:
        Vm.restore(snap)
    assert "Cannot create virtio-net device _net0" in str(e.value), str(e.value)
    assert f"fd={fd}" in str(e.value), str(e.value)
    gc.collect()
    assert (threading.active_count(), len(os.listdir("/proc/self/fd"))) == (threads, fds)
    assert name not in interfaces()
