"""vhost-user devices against Cloud Hypervisor's own backends: virtio-blk
served by ``vhost_user_block`` (data checked in the host image), virtio-net
served by ``vhost_user_net`` (a frame each way through its tap, vmkit as
client or as server), the same command lines under the real Cloud
Hypervisor, a backend killed and started again while the guest uses it, and
nothing left behind.

They need /dev/kvm and the backends at ../shared/ch; the net tests also
need taps (/dev/net/tun, CAP_NET_ADMIN). Each skips with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote
from _helpers import fnv1a64, sector_pattern
from _sockets import wait_listening
from test_snapshot import finishes, new_dir
from vmkit import VmConfig, testguest
from vmkit.config import NetConfig
from vmkit.testguest import GuestResults, parse_results
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm
if CH_DIR is None or not (CH_DIR / "vhost_user_block").is_file():
    pytest.skip(CH_MISSING + " (and its vhost_user_block, vhost_user_net)", allow_module_level=True)

SECTOR = 512
GUEST_MAC = "12:34:56:78:9a:bc"
HOST_MAC = bytes.fromhex("020000564d4b")
ETHERTYPE = b"\x88\xb5"


class Backend:
    """One of Cloud Hypervisor's vhost-user backends, ended (and reaped) on stop."""

    def __init__(self, argv: list[str], socket_path: Path, log: Path, wait: bool = True) -> None:
        assert CH_DIR is not None
        self.socket_path = socket_path
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            wait_listening(socket_path, process=self.proc, why_not=log.read_text)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def exited(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def block_backend(tmp_path: Path, disk: Path, queues: int = 1, wait: bool = True) -> Backend:
    assert CH_DIR is not None
    sock = tmp_path / "blk.sock"
    sock.unlink(missing_ok=True)
    argv = [
        str(CH_DIR / "vhost_user_block"), "--block-backend",
        f"path={disk},socket={sock},num_queues={queues},queue_size=128",
    ]  # fmt: skip
    # It removes its socket file once a frontend connected: a VMM looking
    # for it may take it before `wait` sees it.
    return Backend(argv, sock, tmp_path / "vhost_user_block.log", wait=wait)


def image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def guest_config(steps: list[str], *extra: str, cpus: str = "boot=2", **options: int) -> VmConfig:
    return VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(steps, "poweroff", **options),
         "--cpus", cpus, "--memory", "size=256M,shared=on", "--serial", "null",
         "--console", "off", *extra]
    )  # fmt: skip


def run_vmkit(cfg: VmConfig, timeout: float = 60) -> GuestResults:
    with Vm(cfg, watchdog_timeout=30) as vm:
        vm.boot()
        exit_info = vm.wait(timeout)
        assert exit_info is not None, vm.serial.text
        assert exit_info.reason == "poweroff", (exit_info, vm.serial.text)
        return parse_results(vm.serial.text)


def run_ch(tmp_path: Path, steps: list[str], *extra: str, **options: int) -> GuestResults:
    """The same guest under the real Cloud Hypervisor (it exits at power-off)."""
    assert CH_DIR is not None
    serial = tmp_path / "ch-serial.txt"
    argv = [
        str(CH_DIR / "cloud-hypervisor"),
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", **options),
        "--cpus", "boot=2", "--memory", "size=256M,shared=on",
        "--serial", f"file={serial}", "--console", "off", *extra,
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return parse_results(serial.read_text(errors="replace"))


def lines(results: GuestResults, prefix: str) -> list[str]:
    return [line for line in results.lines if line.startswith(f"vmkit-guest: {prefix} ")]


def fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split()[3:] if "=" in word)


def test_blk_reads_the_backend_image_and_writes_reach_it_as_under_cloud_hypervisor(
    tmp_path: Path,
) -> None:
    sector, count = 100, 8
    host_data = os.urandom(count * SECTOR)
    seen: dict[str, list[str]] = {}
    for peer in ("vmkit", "ch"):
        # One image file for both (the serial the backend reports is its inode's).
        disk = image(tmp_path / "disk.img", 1 << 20)
        with disk.open("r+b") as f:
            f.seek(sector * SECTOR)
            f.write(host_data)
        backend = block_backend(tmp_path, disk)
        try:
            disk_option = f"vhost_user=on,socket={backend.socket_path}"
            if peer == "vmkit":
                cfg = guest_config(
                    ["blk"], "--disk", disk_option, blk_sector=sector, blk_count=count
                )
                results = run_vmkit(cfg)
            else:
                results = run_ch(
                    tmp_path, ["blk"], "--disk", disk_option, blk_sector=sector, blk_count=count
                )
            # The backend ends with its frontend's connection.
            assert backend.exited(10), "the backend outlived the VM's connection"
        finally:
            backend.kill()
        assert results.ok("blk"), results.lines
        (read,) = lines(results, "blk read")
        assert int(fields(read)["fnv"], 16) == fnv1a64(host_data)
        (write,) = lines(results, "blk write")
        assert fields(write)["flushed"] == "1" and fields(write)["verified"] == "1"
        data = disk.read_bytes()
        expected = sector_pattern(sector, count * SECTOR)
        assert data[sector * SECTOR : (sector + count) * SECTOR] == expected
        assert data[: sector * SECTOR] == bytes(sector * SECTOR)
        seen[peer] = [*lines(results, "blk dev"), read, write]
    # The device the guest finds (capacity, read-only, queues, serial: the
    # backend's) and what it reads and writes are the same under both VMMs.
    assert seen["vmkit"] == seen["ch"]


def test_blk_queues_come_from_the_backend(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img", 1 << 20)
    backend = block_backend(tmp_path, disk, queues=2)
    try:
        option = f"vhost_user=on,socket={backend.socket_path},num_queues=2"
        results = run_vmkit(guest_config(["blk"], "--disk", option))
    finally:
        backend.kill()
    assert results.ok("blk"), results.lines
    (dev,) = lines(results, "blk dev")
    assert fields(dev)["queues"] == "2"

    backend = block_backend(tmp_path, disk, queues=1)
    try:
        option = f"vhost_user=on,socket={backend.socket_path},num_queues=2"
        with pytest.raises(VmError, match=r"--disk _disk0: the vhost-user backend at .* serves 1 "):
            with Vm(guest_config(["blk"], "--disk", option)) as vm:
                vm.boot()
    finally:
        backend.kill()


def test_blk_io_goes_on_after_the_backend_is_killed_and_started_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vmkit connects to the backend (client mode): the backend killed in the
    middle of the guest's reads comes back, vmkit connects again, and the
    guest's requests in flight are served by the new one."""
    caplog.set_level(logging.INFO, logger="vmkit")
    disk = image(tmp_path / "disk.img", 4 << 20)
    backend = block_backend(tmp_path, disk)
    option = f"vhost_user=on,socket={backend.socket_path}"
    cfg = guest_config(
        ["blkbench"], "--disk", option,
        blkbench_mode="randread", blkbench_depth=4, blkbench_count=400000,
        blkbench_stall_ms=30000,
    )  # fmt: skip
    try:
        with Vm(cfg, watchdog_timeout=60) as vm:
            vm.boot()
            time.sleep(0.5)
            backend.kill()
            time.sleep(0.5)
            assert vm.wait(0) is None, "the guest finished before the backend went"
            backend = block_backend(tmp_path, disk, wait=False)
            exit_info = vm.wait(120)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            results = parse_results(vm.serial.text)
    finally:
        backend.kill()
    assert results.ok("blkbench"), results.lines
    assert results.values("blkbench")["requests"] == "400000"
    messages = [r.getMessage() for r in caplog.records]
    assert any("the backend disconnected; connecting again for up to 60s" in m for m in messages), (
        messages
    )
    assert any("vhost-user backend connected again" in m for m in messages), messages


# --- virtio-net through vhost_user_net ---------------------------------------------------


def _tap_support() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command is missing"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"no /dev/net/tun: {e}"
    os.close(fd)
    return None


_tap_why = _tap_support()
needs_taps = pytest.mark.skipif(_tap_why is not None, reason=_tap_why or "")
_taps = iter(range(10_000))


def net_backend(tmp_path: Path, tap: str, client: bool, wait: bool = True) -> Backend:
    assert CH_DIR is not None
    sock = tmp_path / "net.sock"
    # 192.168.150-199: clear of test_net's fixed 192.168.249 and .251.
    argv = [
        str(CH_DIR / "vhost_user_net"), "--net-backend",
        f"ip=192.168.{150 + os.getpid() % 50}.1,mask=255.255.255.0,socket={sock},"
        f"num_queues=2,tap={tap},client={'on' if client else 'off'}",
    ]  # fmt: skip
    return Backend(argv, sock, tmp_path / "vhost_user_net.log", wait=wait)


def tap_name() -> str:
    return f"vuk{os.getpid() % 10000}x{next(_taps)}"


@contextlib.contextmanager
def persistent_tap() -> Iterator[tuple[str, socket.socket]]:
    """A tap made beforehand (the backend attaches to it by name) with a
    packet socket on it: nothing the guest sends can come before the socket."""
    name = tap_name()
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        with packet_socket(name) as sock:
            yield name, sock
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def packet_socket(name: str, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            sock.bind((name, 0))
            sock.settimeout(0.2)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def await_ping(sock: socket.socket, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError as e:
            # The backend configures its tap after we bound to it: a link
            # change is reported once (ENETDOWN), then frames flow.
            if e.errno == errno.ENETDOWN:
                continue
            raise
        if frame[12:14] == ETHERTYPE and frame[14:].startswith(b"vmkit-guest"):
            return frame
    pytest.fail(f"no frame from the guest within {timeout} s")


def pong(sock: socket.socket) -> None:
    sock.send(b"\xff" * 6 + HOST_MAC + ETHERTYPE + b"vmkit-host pong".ljust(46, b"\0"))


def pong_until_answered(sock: socket.socket, vm: Vm, timeout: float = 30) -> None:
    """Answers the guest's frame until its net step ends: frames sent before
    a new backend took the rings over are the tap's to drop."""
    deadline = time.monotonic() + timeout
    while "step net " not in vm.serial.text:
        assert time.monotonic() < deadline, vm.serial.text
        pong(sock)
        time.sleep(0.2)


def net_option(tmp_path: Path, server: bool) -> str:
    mode = "server" if server else "client"
    return f"vhost_user=on,socket={tmp_path / 'net.sock'},mac={GUEST_MAC},vhost_mode={mode}"


def check_net_results(results: GuestResults) -> list[str]:
    assert results.ok("net"), results.lines
    (rx,) = lines(results, "net rx")
    assert rx == "vmkit-guest: net rx len=60 payload=vmkit-host pong"
    values = results.values("net")
    assert values["mac"] == GUEST_MAC and values["tx"] == "1"
    return [rx]


class LateBackend(threading.Thread):
    """Server mode: starts the backend once the VMM listens on the socket."""

    def __init__(self, tmp_path: Path, tap: str) -> None:
        super().__init__()
        self.tmp_path, self.tap = tmp_path, tap
        self.backend: Backend | None = None

    def run(self) -> None:
        wait_listening(self.tmp_path / "net.sock", timeout=30)
        self.backend = net_backend(self.tmp_path, self.tap, client=True, wait=False)


def exchange(tmp_path: Path, peer: str, server: bool) -> list[str]:
    """Boots the net step under `peer` and answers its frame; returns what
    the guest received."""
    with persistent_tap() as (tap, sock):
        late = LateBackend(tmp_path, tap) if server else None
        backend = None if server else net_backend(tmp_path, tap, client=False)
        steps, options = ["net"], {"net_lax_len": 1, "net_timeout_ms": 20000}
        net = net_option(tmp_path, server)
        holder: dict[str, GuestResults] = {}
        vm = (
            Vm(guest_config(steps, "--net", net, cpus="boot=1", **options))
            if peer == "vmkit"
            else None
        )
        runner = threading.Thread(
            target=lambda: holder.setdefault("r", run_ch(tmp_path, steps, "--net", net, **options))
        )
        try:
            if late is not None:
                late.start()
            if vm is not None:
                vm.boot()
            else:
                runner.start()
            frame = await_ping(sock)
            pong(sock)
            if vm is not None:
                exit_info = vm.wait(30)
                assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
                holder["r"] = parse_results(vm.serial.text)
                vm.close()
            else:
                runner.join(60)
            if late is not None:
                late.join()
                backend = late.backend
            assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
            assert frame[14:] == b"vmkit-guest net ping".ljust(46, b"\0")
            received = check_net_results(holder["r"])
            assert backend is not None and backend.exited(10), "the backend outlived the VM"
            return received
        finally:
            if vm is not None:
                vm.close()
            if late is not None:
                late.join()
                backend = late.backend
            if backend is not None:
                backend.kill()


@needs_taps
@pytest.mark.parametrize("server", [False, True], ids=["client", "server"])
def test_net_a_frame_each_way_as_under_cloud_hypervisor(tmp_path: Path, server: bool) -> None:
    seen = {peer: exchange(tmp_path, peer, server) for peer in ("vmkit", "ch")}
    assert seen["vmkit"] == seen["ch"]
    assert not (tmp_path / "net.sock").exists() or not server, "the VMM's socket outlived it"


@needs_taps
@pytest.mark.parametrize("server", [False, True], ids=["client", "server"])
def test_a_hot_added_net_exchanges_frames_and_is_ejected(tmp_path: Path, server: bool) -> None:
    # vm.add-net on a running VM with a vhost_user_net backend: the guest
    # finds the device through the PCI hot-plug controller, sends and takes a
    # frame through the backend's tap, then ejects it; the backend's
    # connection ends with the device.
    steps = ["pcihotplug", "net", "pciunplug", "ticks"]
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            steps, "poweroff", net_lax_len=1, net_timeout_ms=20000, ticks=100000, tick_ms=20
        ),
        "--memory", "size=128M,shared=on", "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    with persistent_tap() as (tap, sock):
        late = LateBackend(tmp_path, tap) if server else None
        backend = None if server else net_backend(tmp_path, tap, client=False)
        try:
            with Vm(config) as vm:
                vm.boot()
                assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
                if late is not None:
                    late.start()
                added = vm.add_net(NetConfig.parse(net_option(tmp_path, server)))
                assert added == {"id": "_net0", "bdf": "0000:00:02.0"}
                frame = await_ping(sock)
                assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
                pong(sock)
                assert vm.serial.wait_for("^vmkit-guest: step net ", timeout=30)
                check_net_results(parse_results(vm.serial.text))
                assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
                vm.remove_device("_net0")
                assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30)
                if late is not None:
                    late.join()
                    backend = late.backend
                assert backend is not None and backend.exited(10), "the backend outlived its device"
                assert vm.state == "Running"
        finally:
            if late is not None:
                late.join()
                backend = late.backend
            if backend is not None:
                backend.kill()


@needs_taps
def test_net_server_mode_backend_restarted_mid_exchange_delivers_to_the_guest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vmkit listens (vhost_mode=server): the backend killed after the guest's
    frame left connects back when started again, and the host's answer
    reaches the receive buffers the guest posted before."""
    caplog.set_level(logging.INFO, logger="vmkit")
    cfg = guest_config(
        ["net"], "--net", net_option(tmp_path, server=True), cpus="boot=1",
        net_lax_len=1, net_timeout_ms=30000,
    )  # fmt: skip
    with persistent_tap() as (tap, sock):
        late = LateBackend(tmp_path, tap)
        late.start()
        backend = None
        try:
            with Vm(cfg, watchdog_timeout=60) as vm:
                vm.boot()
                late.join()
                await_ping(sock)
                assert late.backend is not None
                late.backend.kill()
                backend = net_backend(tmp_path, tap, client=True, wait=False)
                pong_until_answered(sock, vm)
                exit_info = vm.wait(40)
                assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
                results = parse_results(vm.serial.text)
        finally:
            late.join()
            for started in (late.backend, backend):
                if started is not None:
                    started.kill()
    check_net_results(results)
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for it to connect again" in m for m in messages), messages
    assert any("vhost-user backend connected again" in m for m in messages), messages
    assert not (tmp_path / "net.sock").exists(), "the VM's socket outlived it"


@needs_taps
def test_client_mode_backend_gone_is_reported_and_the_vm_stays_controllable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmkit")
    wanted = f"vhost-user backend at {tmp_path / 'net.sock'}: the backend disconnected"

    def run() -> None:
        caplog.clear()
        # The guest's net step drives the device, then waits for an answer.
        cfg = guest_config(
            ["net"], "--net", net_option(tmp_path, server=False), cpus="boot=1",
            net_lax_len=1, net_timeout_ms=60000,
        )  # fmt: skip
        with persistent_tap() as (tap, sock), Vm(cfg, watchdog_timeout=60) as vm:
            backend = net_backend(tmp_path, tap, client=False)
            try:
                vm.boot()
                await_ping(sock)
                backend.kill()
                deadline = time.monotonic() + 10
                while not any(wanted in r.getMessage() for r in caplog.records):
                    # The backend's own log says why, should it have gone earlier.
                    assert time.monotonic() < deadline, (
                        [r.getMessage() for r in caplog.records],
                        backend.log_path.read_text(errors="replace"),
                    )
                    time.sleep(0.05)
                # Looking for the backend never holds up the VM's control.
                vm.pause()
                vm.resume()
                started = time.monotonic()
                vm.shutdown()
                assert vm.wait(10) is not None
                assert time.monotonic() - started < 5
            finally:
                backend.kill()

    run()
    gc.collect()
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    run()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads


def test_guest_resets_keep_the_backend_connection(tmp_path: Path) -> None:
    """A reset rebuilds the devices and memory: the backend (which ends when
    its frontend goes) keeps serving the next boot."""
    disk = image(tmp_path / "disk.img", 1 << 20)
    backend = block_backend(tmp_path, disk)
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["blk"], "reset"),
         "--cpus", "boot=1", "--memory", "size=256M,shared=on", "--serial", "null",
         "--console", "off", "--disk", f"vhost_user=on,socket={backend.socket_path}"]
    )  # fmt: skip
    try:
        with Vm(cfg, watchdog_timeout=30) as vm:
            vm.boot()
            deadline = time.monotonic() + 60
            while vm.serial.text.count("step blk ok") < 3:
                assert time.monotonic() < deadline, vm.serial.text
                assert "step blk fail" not in vm.serial.text, vm.serial.text
                time.sleep(0.05)
            assert backend.proc.poll() is None
            vm.shutdown()
        assert backend.exited(10), "the backend outlived the VM"
    finally:
        backend.kill()


def test_a_vm_with_a_vhost_user_disk_snapshots_and_restores_with_io_in_flight(
    tmp_path: Path,
) -> None:
    """The guest reads its vhost-user disk without pause (16 requests in
    flight); the snapshot waits until the backend has finished what it took.
    The snapshotted VM then goes on with the same backend, and a VM restored
    from the snapshot, with a fresh backend on a copy of the image as the
    snapshot left it, sees every request complete once, reads the disk and
    writes to it."""
    count, sector, sectors = 300_000, 100, 8
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    host_data = disk.read_bytes()[sector * SECTOR : (sector + sectors) * SECTOR]
    backend = block_backend(tmp_path, disk)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["blkbench", "blk", "hello"], "poweroff", blkbench_mode="randread",
            blkbench_depth=16, blkbench_count=count, blk_sector=sector, blk_count=sectors,
        ),
        "--memory", "size=256M,shared=on", "--serial", "tty", "--console", "off",
        "--disk", f"vhost_user=on,socket={backend.socket_path}",
    ])  # fmt: skip
    snap = new_dir(tmp_path / "snap")
    try:
        with Vm(config) as vm:
            vm.boot()
            assert vm.serial.wait_for("vmkit-guest: ready", timeout=30)
            time.sleep(0.2)
            vm.pause()
            vm.snapshot(snap)
            assert "step blkbench" not in vm.serial.text, "the bench ended before the snapshot"
            shutil.copyfile(disk, tmp_path / "copy.img")
            vm.resume()
            exit_info = vm.wait(timeout=120)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            text = vm.serial.text
            assert "summary passed=3 failed=0" in text and f"requests={count}" in text, text
        assert backend.exited(10), "the backend outlived the VM's connection"
    finally:
        backend.kill()
    assert disk.read_bytes()[sector * SECTOR : (sector + sectors) * SECTOR] == sector_pattern(
        sector, sectors * SECTOR
    )
    copy = tmp_path / "copy.img"
    backend = block_backend(tmp_path, copy)
    try:
        with Vm.restore(snap) as restored:
            text = finishes(restored, steps=3, timeout=120)
            assert f"requests={count}" in text, text
            results = parse_results(text)
            (read,) = lines(results, "blk read")
            assert int(fields(read)["fnv"], 16) == fnv1a64(host_data)
    finally:
        backend.kill()
    data = copy.read_bytes()
    assert data[sector * SECTOR : (sector + sectors) * SECTOR] == sector_pattern(
        sector, sectors * SECTOR
    )


@needs_taps
def test_a_vm_with_a_vhost_user_net_snapshots_and_restores_waiting_for_a_frame(
    tmp_path: Path,
) -> None:
    """The guest has sent its frame and waits for the answer, its receive
    buffers posted, when the VM is snapshotted; restored in a fresh VMM with
    a fresh backend on the same tap, the answer reaches it in those buffers."""
    snap = new_dir(tmp_path / "snap")
    options = {"net_lax_len": 1, "net_timeout_ms": 60000}
    config = guest_config(
        ["net"], "--net", net_option(tmp_path, server=False), cpus="boot=1", **options
    )
    with persistent_tap() as (tap, sock):
        backend = net_backend(tmp_path, tap, client=False)
        try:
            with Vm(config) as vm:
                vm.boot()
                await_ping(sock)
                vm.pause()
                vm.snapshot(snap)
                before = vm.serial.text
            assert backend.exited(10), "the backend outlived the VM's connection"
        finally:
            backend.kill()
        assert "step net" not in before, before
        backend = net_backend(tmp_path, tap, client=False)
        try:
            with Vm.restore(snap) as restored:
                restored.resume()
                pong_until_answered(sock, restored)
                exit_info = restored.wait(30)
                assert exit_info is not None and exit_info.reason == "poweroff"
                check_net_results(parse_results(before + restored.serial.text))
        finally:
            backend.kill()


def test_migration_is_refused_by_name(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img", 1 << 20)
    backend = block_backend(tmp_path, disk)
    cfg = guest_config(
        ["ticks"], "--disk", f"vhost_user=on,socket={backend.socket_path}", ticks=100000
    )
    try:
        with Vm(cfg) as vm:
            vm.boot()
            with pytest.raises(VmError, match=r"^Migration of a VM with vhost-user devices ") as e:
                vm.migrate_to(tmp_path / "m.sock")
            assert e.value.kind == "Unsupported"
            assert vm.state == "Running"
    finally:
        backend.kill()


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_ch_remote_adds_a_vhost_user_disk_before_boot(tmp_path: Path, kind: str) -> None:
    """The real ch-remote's add-disk on a created VM: the guest finds the
    backend's disk at boot, under either VMM, with the same answers."""
    disk = image(tmp_path / "disk.img", 1 << 20)
    backend = block_backend(tmp_path, disk)
    serial = tmp_path / "serial.log"
    config = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["blk"], "poweroff"),
         "--memory", "size=256M,shared=on",
         "--serial", f"file={serial}", "--console", "off"]
    )  # fmt: skip
    (tmp_path / "vm.json").write_text(config.to_json())
    process = VmmProcess(kind, tmp_path / "api.sock", tmp_path / f"{kind}.log")
    try:
        assert ch_remote(process.socket_path, "create", str(tmp_path / "vm.json"))[0] == 0
        status, out, err = ch_remote(
            process.socket_path, "add-disk", f"vhost_user=on,socket={backend.socket_path},id=vu0"
        )
        assert (status, out, err) == (0, "", ""), process.log
        status, _, err = ch_remote(process.socket_path, "boot")
        assert status == 0, (err, process.log)
        deadline = time.monotonic() + 30
        while "vmkit-guest: exit" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline, serial.read_text(errors="replace")
            time.sleep(0.05)
        text = serial.read_text(errors="replace")
        assert "step blk ok disks=1" in text, text
    finally:
        process.stop()
        backend.kill()


def test_the_backends_completions_raise_msix_interrupts(tmp_path: Path) -> None:
    """The guest's msix step on a vhost-user disk: one request per queue,
    each completion's interrupt arrives on the queue's vector (the backend
    signals the vector's irqfd), as under Cloud Hypervisor; and none before
    (Cloud Hypervisor's backend answers any kick with a signal, so the VMM
    must not kick idle rings when it hands them over)."""
    disk = image(tmp_path / "disk.img", 1 << 20)
    seen = {}
    for peer in ("vmkit", "ch"):
        backend = block_backend(tmp_path, disk, queues=2)
        option = f"vhost_user=on,socket={backend.socket_path},num_queues=2"
        try:
            if peer == "vmkit":
                results = run_vmkit(guest_config(["msix"], "--disk", option))
            else:
                results = run_ch(tmp_path, ["msix"], "--disk", option)
        finally:
            backend.kill()
        assert results.ok("msix"), (peer, results.lines)
        seen[peer] = results.values("msix")
        assert seen[peer]["spurious"] == "0", (peer, seen[peer])
    assert seen["vmkit"] == seen["ch"]
