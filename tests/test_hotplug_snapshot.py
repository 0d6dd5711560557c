"""Snapshots and live migrations of a VM whose PCI devices were hot-plugged or
removed, as Cloud Hypervisor v37 does them: the saved config is the live one,
every device comes back in the slot (and address ranges) it had whatever the
config's order, and the guest goes on hot-plugging and ejecting.

The test guest's ``pcihotplug``/``blk``/``pciunplug`` steps check it from
inside: the guest remembers where it found a disk before the snapshot and
reads (and later ejects) it there afterwards.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote, wait_for_line
from _helpers import move_spawned_vm, restore_refused
from test_migration import Receiver, migrate
from test_pci_hotplug import SECTORS, _tap_support, image, settle
from vmkit import VmConfig, testguest
from vmkit.config import DiskConfig, NetConfig, PmemConfig
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

# A hot-plug cycle, then another after the snapshot or migration.
CYCLES = ["pcihotplug", "blk", "pciunplug"] * 2 + ["ticks"]


def guest(tmp_path: Path, steps: list[str], memory: str = "size=64M") -> VmConfig:
    """The test guest running ``steps`` with a boot disk ``boot`` (00:01.0;
    the rng is 00:02.0)."""
    image(tmp_path / "boot.img", seed=1)
    return VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", ticks=100000, tick_ms=20),
        "--memory", memory, "--serial", "tty", "--console", "off",
        "--disk", f"path={tmp_path / 'boot.img'},readonly=on,id=boot",
    ])  # fmt: skip


def bdfs(vm: Vm) -> dict[str, str]:
    """Device id → BDF of each PCI function in the device tree."""
    return pci_functions(vm.info().device_tree or {})


def pci_functions(tree: dict[str, dict[str, object]]) -> dict[str, str]:
    """Device id → BDF in a device tree (a virtio device's is its
    ``_virtio-pci-<id>`` node's)."""
    return {
        str(node["id"]).removeprefix("_virtio-pci-"): str(node["pci_bdf"])
        for node in tree.values()
        if node.get("pci_bdf")
    }


def hot_added_disk_read(vm: Vm, path: Path, digest: int) -> dict[str, str]:
    """Hot-adds the writable image ``path`` while the guest waits in
    ``pcihotplug``; checks that the guest found it at 00:03.0 and read
    ``digest`` there."""
    assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30), vm.serial.text
    mark = len(vm.serial.text)
    info = vm.add_disk(DiskConfig(path=str(path)))
    assert info["bdf"] == "0000:00:03.0", info
    assert vm.serial.wait_for("^vmkit-guest: step blk ", timeout=30), vm.serial.text
    text = vm.serial.text[mark:]
    assert "pcihotplug added bdf=0000:00:03.0 vendor=0x1af4 device=0x1042" in text, text
    read = f"blk read bdf=0000:00:03.0 sector=0 count={SECTORS} fnv=0x{digest:016x}"
    assert read in text, text
    return info


def goes_on_hot_plugging(vm: Vm, tmp_path: Path, hot_id: str) -> None:
    """In a restored or migrated VM whose guest waits in ``pciunplug`` with
    ``hot_id`` at 00:03.0: the guest ejects it where it was, and the next
    hot-plug takes that slot and v37's next automatic id."""
    vm.remove_device(hot_id)
    assert vm.serial.wait_for("^vmkit-guest: step pciunplug ", timeout=30), vm.serial.text
    text = vm.serial.text.split("pciunplug waiting")[-1]
    assert "pciunplug ejected bdf=0000:00:03.0" in text, text
    assert "step pciunplug ok event=0x4 ejected=1" in text, text
    settle(vm, hot_id)
    digest = image(tmp_path / "next.img", seed=9)
    info = hot_added_disk_read(vm, tmp_path / "next.img", digest)
    assert info == {"id": "_disk1", "bdf": "0000:00:03.0"}
    assert [d.id for d in vm.info().config.disks or []] == ["boot", "_disk1"]


def boot_error(disk: Path) -> str | None:
    """Why a second VM cannot boot on the writable image ``disk`` (another VM
    holds its lock), or None if it can."""
    other = Vm(VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--memory", "size=32M", "--serial", "null", "--console", "off",
        "--disk", f"path={disk}",
    ]))  # fmt: skip
    try:
        other.boot()
    except VmError as e:
        return str(e)
    finally:
        other.close()
    return None


LOCKED = "Cannot get the write lock on disk image"


def test_a_hot_added_disk_is_restored_in_its_slot_and_the_guest_goes_on(tmp_path: Path) -> None:
    # Config order after the add is boot, _disk0, rng: built in that order the
    # disk would be 00:02.0 and the rng 00:03.0; the guest reads and ejects it
    # where it found it, 00:03.0.
    snap = tmp_path / "snap"
    snap.mkdir()
    digest = image(tmp_path / "hot.img", seed=5)
    vm = Vm(guest(tmp_path, CYCLES))
    try:
        vm.boot()
        hot = hot_added_disk_read(vm, tmp_path / "hot.img", digest)
        assert hot["id"] == "_disk0"
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.pause()
        before = (vm.info().config, vm.info().device_tree)
        vm.snapshot(snap)
    finally:
        vm.close()
    assert pci_functions(before[1] or {}) == {
        "boot": "0000:00:01.0",
        "__rng": "0000:00:02.0",
        "_disk0": "0000:00:03.0",
    }
    restored = Vm.restore(snap)
    try:
        # The config, and every node with its BARs where the guest had them.
        assert (restored.info().config, restored.info().device_tree) == before
        # The restore locked the hot-added image as a boot disk's.
        assert LOCKED in (boot_error(tmp_path / "hot.img") or ""), "not locked"
        restored.resume()
        goes_on_hot_plugging(restored, tmp_path, "_disk0")
        # The ejected disk's image is free again; the new one is locked.
        assert boot_error(tmp_path / "hot.img") is None
        assert LOCKED in (boot_error(tmp_path / "next.img") or ""), "not locked"
    finally:
        restored.close()


def test_a_hot_plug_the_guest_has_not_seen_yet_reaches_it_after_the_restore(
    tmp_path: Path,
) -> None:
    # Added while paused: the GED interrupt, its event and the controller's
    # PCIU bit are all the snapshot's; the restored guest finds the disk.
    snap = tmp_path / "snap"
    snap.mkdir()
    digest = image(tmp_path / "hot.img", seed=4)
    with Vm(guest(tmp_path, ["pcihotplug", "blk", "ticks"])) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
        vm.pause()
        info = vm.add_disk(DiskConfig(path=str(tmp_path / "hot.img"), readonly=True))
        assert info == {"id": "_disk0", "bdf": "0000:00:03.0"}
        vm.snapshot(snap)
    restored = Vm.restore(snap)
    try:
        restored.resume()
        assert restored.serial.wait_for("^vmkit-guest: step blk ", timeout=30)
        text = restored.serial.text
        assert "step pcihotplug ok event=0x4 added=1" in text, text
        assert "pcihotplug added bdf=0000:00:03.0 vendor=0x1af4 device=0x1042" in text, text
        assert f"blk read bdf=0000:00:03.0 sector=0 count={SECTORS} fnv=0x{digest:016x}" in text
    finally:
        restored.close()


def test_a_hot_added_pmem_region_is_restored_where_the_guest_maps_it(tmp_path: Path) -> None:
    # The pmem device's memory region is guest RAM for the driver: it must
    # come back at the address the guest read from its config space.
    snap = tmp_path / "snap"
    snap.mkdir()
    image(tmp_path / "p.img", seed=3, size=2 << 20)
    vm = Vm(guest(tmp_path, ["pcihotplug", "pciunplug", "pmem", "ticks"]))
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
        pmem = PmemConfig.parse(f"file={tmp_path / 'p.img'},discard_writes=on")
        assert vm.add_pmem(pmem) == {"id": "_pmem0", "bdf": "0000:00:03.0"}
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.pause()
        before = (vm.info().config, vm.info().device_tree)
        vm.snapshot(snap)
    finally:
        vm.close()
    region = (before[1] or {})["_pmem0"]["resources"][0]["MmioAddressRange"]
    restored = Vm.restore(snap)
    try:
        assert (restored.info().config, restored.info().device_tree) == before
        restored.resume()
        restored.remove_device("boot")  # lets the guest's pciunplug step end
        assert restored.serial.wait_for("^vmkit-guest: step pmem ", timeout=30)
        text = restored.serial.text
        assert f"pmem dev bdf=0000:00:03.0 start={region['base']:#x} " in text, (region, text)
        assert "step pmem ok devices=1" in text, text
    finally:
        restored.close()


def test_a_boot_device_removed_before_the_snapshot_stays_gone(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    vm = Vm(guest(tmp_path, ["pciunplug", "pcihotplug", "blk", "ticks"]))
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.remove_device("boot")
        assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok event=0x4 ejected=1", timeout=30)
        assert vm.serial.wait_for("^vmkit-guest: pcihotplug waiting$", timeout=30)
        vm.pause()
        vm.snapshot(snap)
    finally:
        vm.close()
    restored = Vm.restore(snap)
    try:
        assert restored.info().config.disks in (None, [])
        assert bdfs(restored) == {"__rng": "0000:00:02.0"}
        restored.resume()
        digest = image(tmp_path / "new.img", seed=7)
        # Its slot is the next hot-plug's.
        info = restored.add_disk(DiskConfig(path=str(tmp_path / "new.img"), readonly=True))
        assert info == {"id": "_disk0", "bdf": "0000:00:01.0"}
        assert restored.serial.wait_for("^vmkit-guest: step blk ", timeout=30)
        text = restored.serial.text.split("pcihotplug waiting")[-1]
        assert f"blk read bdf=0000:00:01.0 sector=0 count={SECTORS} fnv=0x{digest:016x}" in text
    finally:
        restored.close()


def test_a_removal_the_guest_has_not_ejected_is_refused_until_it_does(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    with Vm(guest(tmp_path, ["pciunplug", "ticks"])) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        vm.pause()
        vm.remove_device("boot")  # the paused guest cannot eject it yet
        refusal = (
            "A VM cannot be {} while device boot is marked for removal: the guest has not "
            "ejected it yet"
        )
        with pytest.raises(VmError) as e:
            vm.snapshot(snap)
        assert str(e.value) == refusal.format("snapshotted"), str(e.value)
        assert list(snap.iterdir()) == []
        # As v37, the sender connects first (a missing receiver is that error).
        receiver = Receiver(tmp_path / "m.sock")
        try:
            with pytest.raises(VmError) as e:
                vm.migrate_to(tmp_path / "m.sock")
        finally:
            receiver.join()
        assert str(e.value) == refusal.format("migrated"), str(e.value)
        assert receiver.vm is None and receiver.error is not None
        assert vm.state == "Paused"
        vm.resume()
        assert vm.serial.wait_for("^vmkit-guest: step pciunplug ok event=0x4 ejected=1", timeout=30)
        vm.pause()
        vm.snapshot(snap)
    restored = Vm.restore(snap)
    try:
        assert restored.info().config.disks in (None, [])
        assert "boot" not in bdfs(restored)
    finally:
        restored.close()


@pytest.mark.parametrize("local", [False, True], ids=["copied", "local"])
def test_a_migration_carries_hot_plugged_devices_in_their_slots(
    tmp_path: Path, local: bool
) -> None:
    # The hot-added disk is writable: the receiver can lock it only because
    # the sender let it go.
    digest = image(tmp_path / "hot.img", seed=6)
    sender = Vm(guest(tmp_path, CYCLES, memory="size=64M,shared=on"))
    try:
        sender.boot()
        hot_added_disk_read(sender, tmp_path / "hot.img", digest)
        assert sender.serial.wait_for("^vmkit-guest: pciunplug waiting$", timeout=30)
        before = (sender.info().config, sender.info().device_tree)
        _, vm = migrate(sender, tmp_path / "m.sock", local=local)
        assert sender.state == "Shutdown"
    finally:
        sender.close()
    try:
        assert (vm.info().config, vm.info().device_tree) == before
        assert LOCKED in (boot_error(tmp_path / "hot.img") or ""), "not locked"
        goes_on_hot_plugging(vm, tmp_path, "_disk0")
    finally:
        vm.close()


def wait_in_file(path: Path, pattern: str, timeout: float = 30) -> str:
    """Polls ``path`` until a line matches ``pattern``; its text then."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        assert time.monotonic() < deadline, f"no line {pattern!r}: {text[-2000:]}"
        time.sleep(0.01)


def test_vm_processes_migrate_hot_plugged_devices_through_the_api(tmp_path: Path) -> None:
    # Vm.spawn on both sides (vm.add-disk, vm.send-migration, vm.remove-device
    # over HTTP); the receiving process takes over the hot-added disk's lock.
    serial = tmp_path / "serial.log"
    config = guest(tmp_path, CYCLES)
    config.serial.mode = "File"
    config.serial.file = str(serial)
    digest = image(tmp_path / "hot.img", seed=8)
    sender = Vm.spawn(config)
    receiver = Vm.spawn(None)
    try:
        sender.boot()
        wait_in_file(serial, "^vmkit-guest: pcihotplug waiting$")
        assert sender.add_disk(DiskConfig(path=str(tmp_path / "hot.img"))) == {
            "id": "_disk0",
            "bdf": "0000:00:03.0",
        }
        text = wait_in_file(serial, "^vmkit-guest: pciunplug waiting$")
        assert f"blk read bdf=0000:00:03.0 sector=0 count={SECTORS} fnv=0x{digest:016x}" in text
        before = (sender.info().config, pci_functions(sender.info().device_tree or {}))
        move_spawned_vm(sender, receiver, tmp_path / "m.sock")
        info = receiver.info()
        assert (info.config, pci_functions(info.device_tree or {})) == before
        assert LOCKED in (boot_error(tmp_path / "hot.img") or ""), "not locked"
        receiver.remove_device("_disk0")
        text = wait_in_file(serial, "^vmkit-guest: step pciunplug ok event=0x4 ejected=1")
        assert "pciunplug ejected bdf=0000:00:03.0" in text.split("pciunplug waiting")[-1]
        # The guest's next step takes the GED interrupt from its "waiting" line
        # on: a disk added before that line is missed (the guest is slow under load).
        wait_in_file(serial, r"(?s)step pciunplug ok.*^vmkit-guest: pcihotplug waiting$")
        next_digest = image(tmp_path / "next.img", seed=9)
        added = receiver.add_disk(DiskConfig(path=str(tmp_path / "next.img"), readonly=True))
        assert added == {"id": "_disk1", "bdf": "0000:00:03.0"}
        wait_in_file(serial, f"blk read bdf=0000:00:03.0 .* fnv=0x{next_digest:016x}$")
    finally:
        sender.close()
        receiver.close()


def test_a_hot_added_tap_moves_with_the_migration(tmp_path: Path) -> None:
    if (reason := _tap_support()) is not None:
        pytest.skip(reason)
    sender = Vm(guest(tmp_path, ["ticks"]))
    try:
        sender.boot()
        info = sender.add_net(NetConfig.parse("tap=vmkhpsnap0,mac=12:34:56:78:9a:bd"))
        assert info == {"id": "_net0", "bdf": "0000:00:03.0"}
        _, vm = migrate(sender, tmp_path / "m.sock")
    finally:
        sender.close()
    try:
        # The receiver runs on the sender's tap queues (it could not attach
        # the tap while the sender held it).
        assert bdfs(vm)["_net0"] == "0000:00:03.0"
        assert [n.id for n in vm.info().config.net or []] == ["_net0"]
        assert os.path.exists("/sys/class/net/vmkhpsnap0")
    finally:
        vm.close()
    # vmkit's tap goes with its last descriptor (the kernel takes a moment).
    deadline = time.monotonic() + 10
    while os.path.exists("/sys/class/net/vmkhpsnap0") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists("/sys/class/net/vmkhpsnap0"), "the tap was left behind"


def platform_parts(data: bytes) -> tuple[bytes, bytes]:
    """A ``platform`` file split before its placement (docs/snapshot-format.md)."""
    at = 4 + 8
    (length,) = struct.unpack_from("<I", data, at)
    at += 4 + length
    (marker,) = struct.unpack_from("<I", data, at)
    at += 4
    if marker == 1:
        (length,) = struct.unpack_from("<I", data, at)
        at += 4 + length
    (length,) = struct.unpack_from("<I", data, at)
    at += 4 + length
    return data[:at], data[at:]


def parse_placement(data: bytes) -> tuple[bytes, list[list[object]], bytes]:
    """(the placement's head, its functions as [id, segment, slot, bar, region],
    what follows it: the memory hot-plug blob)."""
    (segments,) = struct.unpack_from("<I", data, 16)
    at = 20 + 8 * segments
    head = data[:at]
    (count,) = struct.unpack_from("<I", data, at)
    at += 4
    functions: list[list[object]] = []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", data, at)
        name = data[at + 4 : at + 4 + length].decode()
        at += 4 + length
        segment, slot, bar, region = struct.unpack_from("<IIQQ", data, at)
        at += 24
        functions.append([name, segment, slot, bar, region])
    rest = data[at:]
    assert struct.unpack_from("<I", rest)[0] == len(rest) - 4, "the file ends with one blob"
    return head, functions, rest


def encode_placement(head: bytes, functions: list[list[object]]) -> bytes:
    out = head + struct.pack("<I", len(functions))
    for name, segment, slot, bar, region in functions:
        raw = str(name).encode()
        out += struct.pack("<I", len(raw)) + raw + struct.pack("<IIQQ", segment, slot, bar, region)
    return out


@pytest.fixture(scope="module")
def hot_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of a VM with a disk hot-added at 00:03.0."""
    base = tmp_path_factory.mktemp("hot")
    snap = base / "snap"
    snap.mkdir()
    image(base / "hot.img", seed=2)
    with Vm(guest(base, ["ticks"])) as vm:
        vm.boot()
        vm.add_disk(DiskConfig(path=str(base / "hot.img"), readonly=True))
        vm.pause()
        vm.snapshot(snap)
    return snap


def edit_disk(functions: list[list[object]]) -> list[object]:
    return next(f for f in functions if f[0] == "_disk0")


HOSTILE = {
    "two devices in one slot": (
        lambda fs: edit_disk(fs).__setitem__(2, 1),
        "_disk0 in slot 0000:00:01, which another device has",
    ),
    "a slot past the bus": (
        lambda fs: edit_disk(fs).__setitem__(2, 40),
        "_disk0 in slot 40 (slots 1 to 31 hold devices)",
    ),
    "an unknown id": (
        lambda fs: fs.append(["ghost", 0, 9, 0xC000_0000, 0]),
        "a place for device ghost, which the config lacks",
    ),
    "a device of the config left out": (
        lambda fs: fs.remove(edit_disk(fs)),
        "device _disk0 of the config has no place",
    ),
    "a BAR over another's": (
        lambda fs: edit_disk(fs).__setitem__(3, next(f for f in fs if f[0] == "boot")[3]),
        "device _disk0's BAR at",
    ),
    "a BAR outside the window": (
        lambda fs: edit_disk(fs).__setitem__(3, 0x1000),
        "device _disk0's BAR at 0x1000 is not free in segment 0's 32-bit window",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_placements_are_refused_cleanly(
    hot_snapshot: Path, tmp_path: Path, case: str
) -> None:
    edit, message = HOSTILE[case]
    target = tmp_path / "hostile"
    target.mkdir()
    for p in hot_snapshot.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    before, placement = platform_parts((target / "platform").read_bytes())
    head, functions, rest = parse_placement(placement)
    edit(functions)
    (target / "platform").write_bytes(before + encode_placement(head, functions) + rest)
    error = restore_refused(target)
    assert message in str(error), str(error)
    # The untouched snapshot restores.
    Vm.restore(hot_snapshot).close()


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_restored_device_tree_is_cloud_hypervisor_s(kind: str, tmp_path: Path) -> None:
    # Both VMMs: boot disk, hot-add, remove the boot disk (the guest ejects
    # it), snapshot, restore in a new process: the same ids in the same slots.
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    image(tmp_path / "boot.img", seed=1)
    image(tmp_path / "hot.img", seed=2)
    serial = tmp_path / "serial"
    args = (
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["pcihotplug", "pciunplug", "ticks"], "poweroff",
                                       ticks=100000, tick_ms=20),
        "--memory", "size=64M", "--serial", f"file={serial}", "--console", "off",
        "--disk", f"path={tmp_path / 'boot.img'},readonly=on,id=boot",
    )  # fmt: skip
    snap = tmp_path / "snap"
    snap.mkdir()
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=args)
    try:
        wait_for_line(serial, "^vmkit-guest: pcihotplug waiting$", vmm)
        status, out, err = ch_remote(vmm.socket_path, "add-disk", f"path={tmp_path / 'hot.img'}")
        assert status == 0, err
        wait_for_line(serial, "^vmkit-guest: pciunplug waiting$", vmm)
        assert ch_remote(vmm.socket_path, "remove-device", "boot")[0] == 0, vmm.log
        wait_for_line(serial, "^vmkit-guest: step pciunplug ok", vmm)
        assert ch_remote(vmm.socket_path, "pause")[0] == 0, vmm.log
        status, _, err = ch_remote(vmm.socket_path, "snapshot", f"file://{snap}")
        assert status == 0, err
    finally:
        vmm.stop()
    restored = VmmProcess(kind, tmp_path / "api2.sock", tmp_path / "log2",
                          extra=("--restore", f"source_url=file://{snap}"))  # fmt: skip
    try:
        status, out, err = ch_remote(restored.socket_path, "info")
        assert status == 0, err
        info = json.loads(out)
        tree = pci_functions(info["device_tree"])
        assert tree == {"__rng": "0000:00:02.0", "_disk0": "0000:00:03.0"}, tree
        assert [d["id"] for d in info["config"]["disks"]] == ["_disk0"]
        # The next hot-plug takes the first free slot.
        status, out, err = ch_remote(
            restored.socket_path, "add-disk", f"path={tmp_path / 'boot.img'},readonly=on"
        )
        assert status == 0, err
        assert json.loads(out) == {"id": "_disk1", "bdf": "0000:00:01.0"}
    finally:
        restored.stop()
