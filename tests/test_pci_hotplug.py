"""PCI device hot-plug and removal on a running VM (``vm.add-disk`` & co,
``vm.remove-device``), as Cloud Hypervisor v37 does it: the first free slot
of the device's segment, v37's automatic ids, ``{"id", "bdf"}`` answers, a
GED interrupt for the guest's PCI hot-plug AML, and the device torn down when
the guest ejects it.

The AML is checked in test_acpi_tables.py; the controller's registers and
hostile ejects in the Rust unit tests (devices::pci_hotplug,
device_manager::tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote, wait_for_line
from _sockets import wait_listening
from vmkit import VmConfig, testguest
from vmkit.config import DiskConfig, FsConfig, NetConfig, PmemConfig, VsockConfig
from vmkit.errors import ConfigError
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

SECTORS = 8  # the blk step reads blk_count sectors (8 by default) from sector 0


def fnv1a64(data: bytes) -> int:
    """The guest's BUF_FNV hash (FNV-1a, 64 bits)."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def image(path: Path, seed: int, size: int = 1 << 20) -> int:
    """An image whose first sectors hold a pattern of `seed`; their hash."""
    head = bytes((seed * 31 + i * 7 + (i >> 9)) & 0xFF for i in range(SECTORS * 512))
    path.write_bytes(head + bytes(size - len(head)))
    return fnv1a64(head)


def none_left_since(before: tuple[int, int] | None, timeout: float = 10) -> bool:
    """Whether this process has no more threads and descriptors than
    `before` (waiting for them to close). Fewer is fine: threads of an
    earlier test may still have been ending when `before` was taken."""
    assert before is not None
    deadline = time.monotonic() + timeout
    while True:
        threads, fds = process_counts()
        if threads <= before[0] and fds <= before[1]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def process_counts() -> tuple[int, int]:
    """(threads, open descriptors) of this process."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def settle(vm: Vm, gone: str, timeout: float = 10) -> None:
    """Waits until the VMM tore down device `gone` (off the device tree)."""
    deadline = time.monotonic() + timeout
    while gone in (vm.info().device_tree or {}) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone not in (vm.info().device_tree or {}), vm.info().device_tree


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_same_guest_code_hot_plugs_a_disk_on_vmkit_and_cloud_hypervisor(
    kind: str, tmp_path: Path
) -> None:
    # The guest finds the GED and the controller through the DSDT (the two
    # VMMs place them differently): the same slot, the same data read, the
    # same eject, driven by the real ch-remote.
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    serial = tmp_path / "serial"
    digest = image(tmp_path / "d.img", seed=3)
    args = (
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["pcihotplug", "blk", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--memory", "size=64M",
        "--serial", f"file={serial}", "--console", "off",
    )  # fmt: skip
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=args)

    try:
        wait_for_line(serial, "^vmkit-guest: pcihotplug waiting$", vmm)
        status, out, err = ch_remote(
            vmm.socket_path, "add-disk", f"path={tmp_path / 'd.img'},readonly=on,id=hot"
        )
        assert status == 0, err
        assert json.loads(out) == {"id": "hot", "bdf": "0000:00:02.0"}
        text = wait_for_line(serial, "^vmkit-guest: step blk ", vmm)
        assert "pcihotplug added bdf=0000:00:02.0 vendor=0x1af4 device=0x1042" in text, text
        assert f"blk read bdf=0000:00:02.0 sector=0 count={SECTORS} fnv=0x{digest:016x}" in text
        assert "step blk ok disks=1" in text, text
        wait_for_line(serial, "^vmkit-guest: pciunplug waiting$", vmm)
        assert ch_remote(vmm.socket_path, "remove-device", "hot")[0] == 0, vmm.log
        text = wait_for_line(serial, "^vmkit-guest: step pciunplug ", vmm)
        assert "step pciunplug ok event=0x4 ejected=1" in text, text
    finally:
        vmm.stop()


@pytest.mark.parametrize("boot_format", ["pvh", "elf"])
def test_the_guest_reads_a_hot_added_disk_and_ejects_it(
    boot_format: testguest.Format, tmp_path: Path
) -> None:
    # The test guest runs no AML: after the GED interrupt it reads PSEG/PCIU
    # (PCID) as PCNT would, probes the new slot, drives the disk with its blk
    # step and ejects it through B0EJ, twice.
    steps = ["pcihotplug", "blk", "pciunplug"] * 2 + ["ticks"]
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path(boot_format)),
        "--cmdline", testguest.cmdline(steps, "poweroff", ticks=100000, tick_ms=20),
        "--memory", "size=64M",
        "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    hashes = [image(tmp_path / f"d{i}.img", seed=i + 1) for i in range(2)]
    with Vm(config) as vm:
        vm.boot()
        before = None
        for cycle in range(2):
            assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
            if before is None:
                before = process_counts()
            path = str(tmp_path / f"d{cycle}.img")
            info = vm.add_disk(DiskConfig(path=path, readonly=True))
            # rng is 00:01.0; the slot the first disk left is the second's.
            assert info == {"id": f"_disk{cycle}", "bdf": "0000:00:02.0"}
            live = vm.info()
            assert [d.id for d in live.config.disks or []] == [info["id"]]
            assert live.device_tree[info["id"]]["parent"] == f"_virtio-pci-{info['id']}"
            assert vm.serial.wait_for("^vmkit-guest: step blk ", timeout=30), vm.serial.text
            text = vm.serial.text.split("pcihotplug waiting")[-1]
            assert "step pcihotplug ok event=0x4 added=1" in text, text
            assert "pcihotplug added bdf=0000:00:02.0 vendor=0x1af4 device=0x1042" in text
            # The data the guest read through the hot-added disk is the image's.
            assert f"blk read bdf=0000:00:02.0 sector=0 count={SECTORS} " \
                   f"fnv=0x{hashes[cycle]:016x}" in text, text  # fmt: skip
            assert "step blk ok disks=1" in text, text

            assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
            vm.remove_device(info["id"])
            # Out of the config at once; off the tree once the guest ejected it.
            assert vm.info().config.disks in (None, [])
            assert vm.serial.wait_for("^vmkit-guest: step pciunplug ", timeout=30)
            text = vm.serial.text.split("pciunplug waiting")[-1]
            assert "step pciunplug ok event=0x4 ejected=1" in text, text
            settle(vm, info["id"])
        # Nothing left behind: the workers stopped, the images closed.
        assert none_left_since(before), (process_counts(), before)
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        assert vm.state == "Running"


def test_errors_are_cloud_hypervisor_s(tmp_path: Path) -> None:
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--memory", "size=64M", "--serial", "null", "--console", "off",
        "--platform", "num_pci_segments=2",
    ])  # fmt: skip
    image(tmp_path / "a.img", 1)
    with Vm(config) as vm:
        with pytest.raises(VmError, match=r"^VM is not running$"):
            vm.add_disk(DiskConfig(path=str(tmp_path / "a.img")))
        vm.boot()
        first = vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), readonly=True, id="a"))
        assert first == {"id": "a", "bdf": "0000:00:02.0"}
        with pytest.raises(ConfigError, match="Identifier a is not unique"):
            vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), id="a"))
        with pytest.raises(ConfigError, match="Invalid PCI segment id: 5"):
            vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), pci_segment=5))
        on_one = vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), readonly=True, pci_segment=1))
        assert on_one == {"id": "_disk0", "bdf": "0001:00:01.0"}
        vsock = vm.add_vsock(VsockConfig(cid=3, socket=str(tmp_path / "v.sock")))
        assert vsock == {"id": "_vsock1", "bdf": "0000:00:03.0"}
        with pytest.raises(VmError, match=r"^Too many virtio-vsock devices$"):
            vm.add_vsock(VsockConfig(cid=4, socket=str(tmp_path / "w.sock")))
        with pytest.raises(VmError, match=r'^Error from device manager: UnknownDeviceId\("x"\)$'):
            vm.remove_device("x")
        with pytest.raises(VmError, match=r"^Error from device manager: RemovalNotAllowed\(Rng\)$"):
            vm.remove_device("__rng")
        # Segment 1 has room for 30 more (its host bridge and _disk0 hold two of 32).
        for _ in range(30):
            vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), readonly=True, pci_segment=1))
        with pytest.raises(
            VmError,
            match=r"^Error from device manager: NextPciDeviceId\(NoPciDeviceSlotAvailable\)$",
        ):
            vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), readonly=True, pci_segment=1))
        # The ticks guest ejects nothing: removed from the config, still on the bus.
        vm.remove_device("_vsock1")
        assert vm.info().config.vsock is None
        assert "_vsock1" in (vm.info().device_tree or {})
    assert not (tmp_path / "v.sock").exists()


# (ch-remote arguments, exit status, what stdout or stderr says)
SCRIPT = [
    ("add-disk path={img},readonly=on", 0, '{"id":"_disk1","bdf":"0000:00:03.0"}'),
    ("add-disk path={img},id=_disk1", 1, "validate config: Identifier _disk1 is not unique"),
    ("add-disk path={img},readonly=on,id=mydisk", 0, '{"id":"mydisk","bdf":"0000:00:04.0"}'),
    ("add-disk path={img},readonly=on,pci_segment=1", 0, '{"id":"_disk2","bdf":"0001:00:01.0"}'),
    ("add-disk path={img},pci_segment=5", 1, "validate config: Invalid PCI segment id: 5"),
    ("add-vsock cid=3,socket={dir}/v.sock", 0, '{"id":"_vsock3","bdf":"0000:00:05.0"}'),
    ("add-vsock cid=4,socket={dir}/w.sock", 1, "Error: Too many virtio-vsock devices"),
    ("remove-device nosuch", 1, 'Error from device manager: UnknownDeviceId("nosuch")'),
    ("remove-device __rng", 1, "Error from device manager: RemovalNotAllowed(Rng)"),
    ("remove-device __console", 1, 'Error from device manager: UnknownDeviceId("__console")'),
    ("remove-device mydisk", 0, ""),
    ("add-disk path={img},readonly=on", 0, '{"id":"_disk4","bdf":"0000:00:06.0"}'),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_ch_remote_hot_plug_answers_as_cloud_hypervisor(kind: str, tmp_path: Path) -> None:
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    image(tmp_path / "d.img", 1)
    image(tmp_path / "boot.img", 2)
    args = (
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--memory", "size=64M", "--serial", f"file={tmp_path / 'serial'}", "--console", "off",
        "--disk", f"path={tmp_path / 'boot.img'},readonly=on",
        "--platform", "num_pci_segments=2",
    )  # fmt: skip
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=args)
    try:
        vmm.wait_running()
        seen = []
        for command, _status, _ in SCRIPT:
            argv = command.format(img=tmp_path / "d.img", dir=tmp_path).split()
            got, stdout, stderr = ch_remote(tmp_path / "api.sock", *argv)
            said = next(
                (s for _, _, s in SCRIPT if s and (s in stdout or s in stderr)), stdout.strip()
            )
            seen.append((command, got, said))
        assert seen == SCRIPT, vmm.log
        _, info, _ = ch_remote(tmp_path / "api.sock", "info")
        live = json.loads(info)
        assert [d["id"] for d in live["config"]["disks"]] == [
            "_disk0",
            "_disk1",
            "_disk2",
            "_disk4",
        ]
        assert live["config"]["vsock"]["id"] == "_vsock3"
        # The ticks guest does not eject: mydisk stays on the bus, as in v37.
        assert live["device_tree"]["_virtio-pci-mydisk"]["pci_bdf"] == "0000:00:04.0"
    finally:
        vmm.stop()


def _tap_support() -> str | None:
    """Why this host cannot make taps (vmkit opens `tap=` itself), or None."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"no /dev/net/tun: {e}"
    os.close(fd)
    return None if os.geteuid() == 0 else "creating a tap needs CAP_NET_ADMIN"


# (kind, its config's option string, the virtio PCI device id the guest finds)
KINDS = [
    ("disk", "path={dir}/k.img,readonly=on", 0x1042),
    ("pmem", "file={dir}/k.img,discard_writes=on", 0x105B),
    ("vsock", "cid=7,socket={dir}/k.sock", 0x1053),
    ("net", "tap=vmkhp0,mac=12:34:56:78:9a:bc", 0x1041),
]


@pytest.mark.parametrize("spawned", [False, True], ids=["in-process", "spawned"])
@pytest.mark.parametrize(("kind", "option", "device_id"), KINDS, ids=[k[0] for k in KINDS])
def test_each_kind_is_added_seen_ejected_and_released(
    kind: str, option: str, device_id: int, spawned: bool, tmp_path: Path
) -> None:
    if kind == "net" and (why := _tap_support()) is not None:
        pytest.skip(why)
    image(tmp_path / "k.img", 3, size=2 << 20)  # pmem: a multiple of 2 MiB
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["pcihotplug", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--memory", "size=64M", "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    parse = {
        "disk": DiskConfig,
        "pmem": PmemConfig,
        "vsock": VsockConfig,
        "net": NetConfig,
    }[kind]
    item = parse.parse(option.format(dir=tmp_path))
    with Vm.spawn(config) if spawned else Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
        before = process_counts() if not spawned else None
        info = getattr(vm, f"add_{kind}")(item)
        assert info["bdf"] == "0000:00:02.0", info
        line = f"pcihotplug added bdf=0000:00:02.0 vendor=0x1af4 device=0x{device_id:04x}"
        assert vm.serial.wait_for("^vmkit-guest: step pcihotplug ", timeout=30)
        assert line in vm.serial.text, vm.serial.text
        if kind == "net":
            assert Path("/sys/class/net/vmkhp0").exists()
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.remove_device(info["id"])
        assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30), vm.serial.text
        deadline = time.monotonic() + 10
        while info["id"] in (vm.info().device_tree or {}) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert info["id"] not in (vm.info().device_tree or {})
        if kind == "net":  # vmkit's tap goes with the device's last descriptor
            while Path("/sys/class/net/vmkhp0").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not Path("/sys/class/net/vmkhp0").exists()
        if kind == "vsock":
            assert not (tmp_path / "k.sock").exists(), "its listening socket is removed"
        if before is not None:
            while process_counts() != before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert process_counts() == before
        # Its slot is free again.
        again = getattr(vm, f"add_{kind}")(item)
        assert again["bdf"] == "0000:00:02.0", again


def test_a_tap_descriptor_handed_over_by_add_net_is_released_with_the_device() -> None:
    # ch-remote add-net fd=N sends the tap with SCM_RIGHTS; the VMM (and the
    # VM process behind it) owns it then and lets it go with the device: the
    # tap, not persistent, vanishes once our own descriptor closes too.
    if (why := _tap_support()) is not None:
        pytest.skip(why)
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR)
    ifr = fcntl.ioctl(
        fd, 0x400454CA, struct.pack("16sH22x", b"vmkhpfd%d", 0x0002 | 0x1000 | 0x4000)
    )
    name = ifr[:16].rstrip(b"\0").decode()
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["pcihotplug", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--memory", "size=64M", "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    try:
        with Vm.spawn(config) as vm:
            vm.boot()
            assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
            info = vm.client.add_net(NetConfig.parse("mac=12:34:56:78:9a:bc"), fds=[fd])
            assert info is not None and info.bdf == "0000:00:02.0", info
            assert vm.serial.wait_for("^vmkit-guest: step pcihotplug ok", timeout=30)
            assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
            vm.remove_device(info.id)
            assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30)
            os.close(fd)
            fd = -1
            deadline = time.monotonic() + 10
            while Path(f"/sys/class/net/{name}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not Path(f"/sys/class/net/{name}").exists(), "a copy of the tap is still open"
            assert vm.state == "Running"
    finally:
        if fd >= 0:
            os.close(fd)


def test_a_hostile_guest_ejects_only_what_cloud_hypervisor_lets_it(tmp_path: Path) -> None:
    # Garbage of every size at every offset, segments that do not exist, and
    # an eject of every slot. As in v37 the guest may eject its own disk (it
    # leaves the bus; the config keeps it); vmkit keeps the host bridge and
    # the devices v37 never removes (rng), and nothing panics or stalls.
    image(tmp_path / "boot.img", 4)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["pcihostile", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--memory", "size=64M", "--serial", "tty", "--console", "off",
        "--disk", f"path={tmp_path / 'boot.img'},readonly=on",
    ])  # fmt: skip
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: step pcihostile ", timeout=30), vm.serial.text
        # Bridge at 00:00.0 and rng at 00:02.0 stay; the disk at 00:01.0 went.
        assert "step pcihostile ok pseg=0x0 present=0x5" in vm.serial.text, vm.serial.text
        settle(vm, "_disk0")
        tree = vm.info().device_tree or {}
        assert "__rng" in tree and "_virtio-pci-_disk0" not in tree, tree
        assert [d.id for d in vm.info().config.disks or []] == ["_disk0"]
        assert vm.serial.wait_for("^vmkit-guest: tick 2$", timeout=30)
        assert vm.state == "Running"
        # Its slot is the next hot-plug's.
        again = vm.add_disk(DiskConfig(path=str(tmp_path / "boot.img"), readonly=True, id="d"))
        assert again == {"id": "d", "bdf": "0000:00:01.0"}


def test_a_reboot_keeps_what_was_hot_plugged_and_removed(tmp_path: Path) -> None:
    # As v37: the config changes at once, and the next boot builds it.
    image(tmp_path / "a.img", 5)
    image(tmp_path / "b.img", 6)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--memory", "size=64M", "--serial", "null", "--console", "off",
        "--disk", f"path={tmp_path / 'a.img'},readonly=on,id=a",
    ])  # fmt: skip
    with Vm(config) as vm:
        vm.boot()
        assert vm.add_disk(DiskConfig(path=str(tmp_path / "b.img"), readonly=True, id="b")) == {
            "id": "b",
            "bdf": "0000:00:03.0",
        }
        vm.remove_device("a")  # the ticks guest does not eject it
        assert "a" in (vm.info().device_tree or {})
        vm.reboot()
        assert vm.boots == 2
        info = vm.info()
        assert [d.id for d in info.config.disks or []] == ["b"]
        tree = info.device_tree or {}
        assert "a" not in tree
        assert tree["_virtio-pci-b"]["pci_bdf"] == "0000:00:01.0", "built in config order"


def test_a_hot_added_vhost_user_disk_is_served_and_its_backend_let_go(tmp_path: Path) -> None:
    # Cloud Hypervisor's own vhost_user_block serves it; when the guest
    # ejected the device, vmkit closes its connection and the backend ends.
    if CH_DIR is None or not (CH_DIR / "vhost_user_block").is_file():
        pytest.skip(CH_MISSING + " (and its vhost_user_block)")
    digest = image(tmp_path / "vu.img", 7)
    sock = tmp_path / "blk.sock"
    with open(tmp_path / "backend.log", "wb") as log:
        backend = subprocess.Popen(
            [str(CH_DIR / "vhost_user_block"), "--block-backend",
             f"path={tmp_path / 'vu.img'},socket={sock},num_queues=1,queue_size=128"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_listening(sock, process=backend)
        config = VmConfig.from_cli([
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", testguest.cmdline(
                ["pcihotplug", "blk", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
            ),
            "--memory", "size=128M,shared=on", "--serial", "tty", "--console", "off",
        ])  # fmt: skip
        with Vm(config) as vm:
            vm.boot()
            assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
            disk = DiskConfig.parse(f"vhost_user=on,socket={sock}")
            assert vm.add_disk(disk) == {"id": "_disk0", "bdf": "0000:00:02.0"}
            assert vm.serial.wait_for("^vmkit-guest: step blk ", timeout=30), vm.serial.text
            assert f"fnv=0x{digest:016x}" in vm.serial.text, vm.serial.text
            assert "step blk ok disks=1" in vm.serial.text, vm.serial.text
            assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
            vm.remove_device("_disk0")
            assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30)
            # The backend ends with its frontend's connection.
            backend.wait(10)
            assert vm.state == "Running"
    finally:
        if backend.poll() is None:
            backend.kill()
        backend.wait()


def test_a_hot_added_virtio_fs_is_mounted_by_the_guest_and_virtiofsd_let_go(
    tmp_path: Path,
) -> None:
    virtiofsd = shutil.which("virtiofsd") or str(Path.home() / ".cargo/bin/virtiofsd")
    if not os.access(virtiofsd, os.X_OK):
        pytest.skip("virtiofsd is not installed (PATH, ~/.cargo/bin): `cargo install virtiofsd`")
    share = tmp_path / "share"
    share.mkdir()
    data = os.urandom(10_007)
    (share / "host.txt").write_bytes(data)
    sock = tmp_path / "fs.sock"
    with open(tmp_path / "virtiofsd.log", "wb") as log:
        daemon = subprocess.Popen(
            [virtiofsd, f"--socket-path={sock}", f"--shared-dir={share}", "--cache=never",
             "--sandbox=none"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_listening(sock, process=daemon)
        config = VmConfig.from_cli([
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", testguest.cmdline(
                ["pcihotplug", "fs", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
            ),
            "--memory", "size=256M,shared=on", "--serial", "tty", "--console", "off",
        ])  # fmt: skip
        with Vm(config) as vm:
            vm.boot()
            assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
            fs = FsConfig.parse(f"tag=vmkitfs,socket={sock},num_queues=1,queue_size=1024")
            assert vm.add_fs(fs) == {"id": "_fs0", "bdf": "0000:00:02.0"}
            assert vm.serial.wait_for("^vmkit-guest: step fs ", timeout=30), vm.serial.text
            read = f"vmkit-guest: fs read name=host.txt len={len(data)} fnv=0x{fnv1a64(data):016x}"
            assert read in vm.serial.text, vm.serial.text
            assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
            vm.remove_device("_fs0")
            assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30)
            assert daemon.wait(10) == 0, "virtiofsd ends cleanly when its frontend goes"
            assert vm.state == "Running"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()


def test_the_guest_finds_a_disk_hot_added_on_the_second_segment(tmp_path: Path) -> None:
    # PSEG selects segment 1, whose PCIU has the slot; the disk's BAR is in
    # that segment's 64-bit window, as Cloud Hypervisor places it.
    digest = image(tmp_path / "s1.img", 8)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["pcihotplug", "blk", "pciunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--memory", "size=64M", "--serial", "tty", "--console", "off",
        "--platform", "num_pci_segments=2",
    ])  # fmt: skip
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
        disk = DiskConfig(path=str(tmp_path / "s1.img"), readonly=True, pci_segment=1)
        assert vm.add_disk(disk) == {"id": "_disk0", "bdf": "0001:00:01.0"}
        assert vm.serial.wait_for("^vmkit-guest: step blk ", timeout=30), vm.serial.text
        text = vm.serial.text
        assert "pcihotplug added bdf=0001:00:01.0 vendor=0x1af4 device=0x1042" in text, text
        assert f"blk read bdf=0001:00:01.0 sector=0 count={SECTORS} fnv=0x{digest:016x}" in text
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.remove_device("_disk0")
        assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok event=0x4 ejected=1", timeout=30)
        settle(vm, "_disk0")


def test_a_vm_whose_devices_changed_is_snapshotted_as_it_is_now(tmp_path: Path) -> None:
    # The saved config is the live one: the hot-added disk in, the removed
    # one out (restores and migrations: test_hotplug_snapshot.py).
    image(tmp_path / "a.img", 9)
    image(tmp_path / "b.img", 10)
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["pciunplug", "ticks"], "poweroff", ticks=100000,
                                       tick_ms=20),
        "--memory", "size=64M", "--serial", "tty", "--console", "off",
        "--disk", f"path={tmp_path / 'b.img'},readonly=on,id=b",
    ])  # fmt: skip
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.remove_device("b")
        assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok", timeout=30)
        vm.add_disk(DiskConfig(path=str(tmp_path / "a.img"), readonly=True))
        vm.pause()
        vm.snapshot(snapshot)
        saved = json.loads((snapshot / "config.json").read_text())
        assert [d["id"] for d in saved["disks"]] == ["_disk0"]
        assert saved == json.loads(vm.info().config.to_json())
