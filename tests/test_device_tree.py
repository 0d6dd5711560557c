"""What the guest and ``info()`` see of the devices, compared with Cloud Hypervisor.

vmkit places devices where Cloud Hypervisor v37 does (PCI slots, BAR windows and
addresses, class codes, the RSDP, the memory map) and reports CH's device tree. The
shape is checked everywhere; where the real CH is at hand (``/work/shared/ch`` or
``$VMKIT_CH_DIR``) both boot the same test guest and config and must agree key by key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

CH_DIR = Path(os.environ.get("VMKIT_CH_DIR", "/work/shared/ch"))
BAR_SIZE = 0x80000
#: What the guest prints about the layout: PCI functions (ids, class, BARs),
#: the ACPI tables and RSDP, the memory map.
LAYOUT_LINE = re.compile(r"^vmkit-guest: (pci dev .*|memmap range .*|step acpi ok .*)$", re.M)
STEPS = ["memmap", "acpi", "pci", "ticks"]
GUEST_OPTIONS = {"memmap_stride": 1 << 24, "ticks": 1000, "tick_ms": 50}


def guest_args(tmp_path: Path, vmm: str) -> list[str]:
    """Two segments, disks on both, a console, RAM above the 32-bit hole
    (files of their own per VMM: Cloud Hypervisor locks its disk images)."""
    disks = []
    for name in ("a", "b"):
        disk = tmp_path / f"{vmm}-{name}.img"
        disk.write_bytes(bytes(1 << 20))
        disks.append(disk)
    return [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(STEPS, "poweroff", **GUEST_OPTIONS),
        "--cpus", "boot=2",
        "--memory", "size=4100M",
        "--platform", "num_pci_segments=2",
        "--console", f"file={tmp_path / f'{vmm}-console.txt'}",
        "--disk", f"path={disks[0]}", f"path={disks[1]},pci_segment=1",
    ]  # fmt: skip


@pytest.fixture
def vmkit_booted(tmp_path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(info, serial text) of vmkit running the guest, once its pci step passed."""
    with Vm(VmConfig.from_cli(guest_args(tmp_path, "vmkit"))) as vm:
        vm.boot()
        vm.serial.wait_for(r"step pci ok", timeout=60)
        yield vm.info().to_dict(), vm.serial.text


def test_device_tree_has_cloud_hypervisors_shape(
    vmkit_booted: tuple[dict[str, Any], str],
) -> None:
    info, _ = vmkit_booted
    tree = info["device_tree"]
    virtio = ["__console", "_disk0", "_disk1", "__rng"]
    assert set(tree) == {"__ioapic", "__serial"} | {
        name for id_ in virtio for name in (id_, f"_virtio-pci-{id_}")
    }
    for node_id, node in tree.items():
        assert set(node) == {"id", "resources", "parent", "children", "pci_bdf"}
        assert node["id"] == node_id
        for child in node["children"]:
            assert tree[child]["parent"] == node_id
    for platform in ("__ioapic", "__serial"):
        assert tree[platform] == {
            "id": platform, "resources": [], "parent": None, "children": [], "pci_bdf": None
        }  # fmt: skip
    bdfs = {}
    bars = {}
    for id_ in virtio:
        function = tree[f"_virtio-pci-{id_}"]
        assert function["children"] == [id_] and function["parent"] is None
        assert tree[id_]["pci_bdf"] is None and tree[id_]["resources"] == []
        bdfs[id_] = function["pci_bdf"]
        [resource] = function["resources"]
        bars[id_] = resource["PciBar"]
        assert bars[id_]["index"] == 0 and bars[id_]["size"] == BAR_SIZE
        assert bars[id_]["prefetchable"] is False
    # Cloud Hypervisor's order: console, disks, then rng; each segment from slot 1.
    assert bdfs == {
        "__console": "0000:00:01.0",
        "_disk0": "0000:00:02.0",
        "_disk1": "0001:00:01.0",
        "__rng": "0000:00:03.0",
    }
    # A disk on segment 0 gets a 32-bit BAR at the top of its 32-bit window (two
    # segments share [3 GiB, 3.625 GiB)); everything else a 64-bit one, from the
    # top of the segment's 64-bit window down.
    assert bars["_disk0"]["type_"] == "Mmio32"
    assert bars["_disk0"]["base"] == 0xD400_0000 - BAR_SIZE
    for id_ in ("__console", "_disk1", "__rng"):
        assert bars[id_]["type_"] == "Mmio64" and bars[id_]["base"] >= 1 << 32
    assert bars["__rng"]["base"] == bars["__console"]["base"] - BAR_SIZE


def test_guest_sees_cloud_hypervisors_layout(vmkit_booted: tuple[dict[str, Any], str]) -> None:
    _, serial = vmkit_booted
    lines = LAYOUT_LINE.findall(serial)
    assert "step acpi ok rsdp=0xa0000 tables=XSDT,FACP,APIC,MCFG,DSDT cpus=2 max_cpus=2" in lines
    assert lines[:4] == [
        "memmap range start=0x0 end=0xa0000 type=1",
        "memmap range start=0x100000 end=0xc0000000 type=1",
        "memmap range start=0x100000000 end=0x140400000 type=1",
        "memmap range start=0xe8000000 end=0xf8000000 type=2",  # ECAM, after all RAM
    ]
    classes = dict(re.findall(r"pci dev bdf=(\S+) vendor=\S+ device=\S+ class=(\S+)", serial))
    assert classes == {
        "0000:00:00.0": "0x060000",  # host bridge
        "0000:00:01.0": "0xffff00",  # console: "other", virtio subclass
        "0000:00:02.0": "0x018000",  # block: mass storage
        "0000:00:03.0": "0xffff00",  # rng
        "0001:00:00.0": "0x060000",
        "0001:00:01.0": "0x018000",
    }


def run_cloud_hypervisor(tmp_path: Path, args: list[str]) -> tuple[dict[str, Any], str]:
    """(info, serial text) of the real CH running the guest with `args`."""
    socket = tmp_path / "ch.sock"
    serial = tmp_path / "ch-serial.txt"
    argv = [
        str(CH_DIR / "cloud-hypervisor"),
        *args,
        "--serial", f"file={serial}",
        "--api-socket", f"path={socket}",
        "--seccomp", "log",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "step pci ok" not in (serial.read_text() if serial.exists() else ""):
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"Cloud Hypervisor did not reach the pci step: {stderr[-2000:]}")
            time.sleep(0.1)
        remote = [str(CH_DIR / "ch-remote"), "--api-socket", str(socket)]
        info = subprocess.run([*remote, "info"], capture_output=True, check=True, timeout=30)
        subprocess.run([*remote, "shutdown-vmm"], capture_output=True, timeout=30)
        return json.loads(info.stdout), serial.read_text()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()


needs_ch = pytest.mark.skipif(
    not (CH_DIR / "cloud-hypervisor").exists() or not (CH_DIR / "ch-remote").exists(),
    reason=f"needs Cloud Hypervisor's binaries in {CH_DIR} (or $VMKIT_CH_DIR)",
)


def assert_same(ours: tuple[dict[str, Any], str], theirs: tuple[dict[str, Any], str]) -> None:
    """The device trees agree key by key; the guest saw the same layout."""
    our_tree, their_tree = ours[0]["device_tree"], theirs[0]["device_tree"]
    assert set(our_tree) == set(their_tree)
    for node_id, node in their_tree.items():
        assert our_tree[node_id] == node, node_id
    assert LAYOUT_LINE.findall(ours[1]) == LAYOUT_LINE.findall(theirs[1])


@needs_ch
def test_device_tree_and_layout_match_cloud_hypervisor(
    vmkit_booted: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    assert_same(vmkit_booted, run_cloud_hypervisor(tmp_path, guest_args(tmp_path, "ch")))


def can_make_taps() -> bool:
    status = Path("/proc/self/status").read_text()
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    cap_net_admin = bool(int(cap_eff.split()[1], 16) >> 12 & 1)
    return cap_net_admin and os.access("/dev/net/tun", os.R_OK | os.W_OK)


@needs_ch
@pytest.mark.skipif(not can_make_taps(), reason="needs CAP_NET_ADMIN and /dev/net/tun (taps)")
def test_a_net_device_matches_cloud_hypervisor(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    # Each VMM makes a tap of its own; the guest only reads the PCI function.
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["acpi", "pci", "ticks"], "poweroff", **GUEST_OPTIONS),
        "--memory", "size=512M",
        "--console", "off",
        "--net", "mac=12:34:56:78:9a:bc",
    ]  # fmt: skip
    vm = vmkit_vm(VmConfig.from_cli(args))
    vm.boot()
    vm.serial.wait_for(r"step pci ok", timeout=60)
    ours = (vm.info().to_dict(), vm.serial.text)
    vm.close()
    theirs = run_cloud_hypervisor(tmp_path, args)
    assert "_net0" in theirs[0]["device_tree"]
    assert_same(ours, theirs)
