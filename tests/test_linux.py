"""Booting Debian's stock Linux kernel (built by vmkit.debian_guest).

On any KVM host the kernel must print its early-boot checkpoints: they prove
the boot protocol (PVH for vmlinux, the 64-bit protocol for the bzImage), the
memory map, the initramfs placement, the command line and the ACPI tables.

On kvm_pvm hosts stock Linux cannot get further (its CPL0 code runs through
KVM's instruction emulator, which lacks instructions the kernel needs), and
vmkit must report that emulation failure as a clear VM error. The full boot
tests (to the init marker, SMP, power-off and reboot) need hardware KVM and
skip on kvm_pvm, saying so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from vmkit import VmConfig
from vmkit.debian_guest import DebianGuest
from vmkit.pytest_plugin import VmFactory, VmkitPaths

# The guest comes from the plugin's vmkit_debian_guest fixture (built once).
pytestmark = pytest.mark.vmkit_kvm

PVM = Path("/sys/module/kvm_pvm").exists()
FULL_BOOT_SKIP = pytest.mark.vmkit_hardware_kvm
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1"


@pytest.fixture
def guest(vmkit_debian_guest: DebianGuest) -> DebianGuest:
    return vmkit_debian_guest


def linux_config(guest: DebianGuest, kernel: str, cmdline: str, memory: str) -> VmConfig:
    image = guest.vmlinux if kernel == "vmlinux" else guest.vmlinuz
    return VmConfig.from_cli(
        ["--kernel", str(image), "--initramfs", str(guest.initramfs),
         "--cmdline", cmdline, "--cpus", "boot=2,max=4", "--memory", memory,
         "--console", "off"]
    )  # fmt: skip


def e820_usable(text: str) -> list[tuple[int, int]]:
    ranges = []
    for m in re.finditer(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] usable", text):
        ranges.append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    return ranges


@pytest.mark.parametrize("kernel", ["vmlinux", "vmlinuz"])
def test_linux_early_boot_checkpoints(guest: DebianGuest, kernel: str, vmkit_vm: VmFactory) -> None:
    cfg = linux_config(guest, kernel, CMDLINE, "size=1G")
    # With every VM thread under its seccomp filter (the default, said here):
    # Linux's early boot (device probing, ACPI, SMP set-up) needs no other call.
    vm = vmkit_vm(cfg, watchdog_timeout=60, seccomp=True)
    vm.boot()
    serial = vm.serial
    # bzImage's decompressor runs first: ~2 minutes where each CPL0 instruction
    # is emulated (kvm_pvm), a fraction of a second on hardware KVM.
    serial.wait_for(r"Linux version 6\.1\.", timeout=300 if kernel == "vmlinuz" else 150)
    serial.wait_for(re.escape(f"Command line: {CMDLINE}"), timeout=30)
    serial.wait_for(r"BIOS-e820: \[mem 0x0000000000100000-0x000000003fffffff\] usable", 30)
    ramdisk = serial.wait_for(r"RAMDISK: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]", timeout=60)
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"):
        serial.wait_for(rf"ACPI: {table} 0x", timeout=60)
    # Linux reads the version register of vmkit's IOAPIC (0x11, 24 pins).
    serial.wait_for(
        r"IOAPIC\[0\]: apic_id 0, version 17, address 0xfec00000, GSI 0-23", timeout=120
    )
    serial.wait_for(r"TSC deadline timer available", timeout=30)
    serial.wait_for(r"smpboot: Allowing 4 CPUs, 2 hotplug CPUs", timeout=120)
    text = serial.text
    # The map is exactly the configured RAM: [0, 640 KiB) and [1 MiB, 1 GiB).
    assert e820_usable(text) == [(0, 0xA0000), (0x100000, 1 << 30)]
    # The initramfs sits page-aligned at the top of RAM, whole.
    start, end = int(ramdisk.group(1), 16), int(ramdisk.group(2), 16) + 1
    assert end == 1 << 30 and start % 4096 == 0
    assert end - start >= guest.initramfs.stat().st_size
    # How the VMM reports an instruction kvm_pvm cannot emulate is the same for
    # both formats, and the wait for it ~30 s: checked once, with vmlinux.
    if PVM and kernel == "vmlinux":
        exit_info = vm.wait(180)
        assert exit_info is not None, "no emulation failure within 3 minutes"
        assert exit_info.reason == "internal-error"
        assert "instruction emulation failed" in exit_info.message
        assert re.search(r"at RIP 0x[0-9a-f]+ \(CPL 0", exit_info.message)
        assert "instruction bytes:" in exit_info.message
    else:
        vm.shutdown()


@FULL_BOOT_SKIP
@pytest.mark.parametrize("kernel", ["vmlinux", "vmlinuz"])
def test_linux_boots_to_init_with_every_vcpu(
    guest: DebianGuest, kernel: str, vmkit_vm: VmFactory
) -> None:
    cfg = linux_config(guest, kernel, CMDLINE + " vmkit.exit=poweroff", "size=512M")
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"VMKIT-GUEST-READY", timeout=60)
    vm.serial.wait_for(r"VMKIT-GUEST cpus=2", timeout=30)
    exit_info = vm.wait(60)
    assert exit_info is not None and exit_info.reason == "poweroff"


@FULL_BOOT_SKIP
def test_linux_reboot_boots_again(guest: DebianGuest, vmkit_vm: VmFactory) -> None:
    cfg = linux_config(guest, "vmlinux", CMDLINE + " reboot=k vmkit.exit=reboot", "size=512M")
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"VMKIT-GUEST-READY", timeout=60)
    vm.serial.wait_for(r"VMKIT-GUEST-READY", timeout=60)
    assert vm.boots >= 2
    vm.shutdown()


def can_create_taps() -> bool:
    return os.access("/dev/net/tun", os.R_OK | os.W_OK) and os.geteuid() == 0


@FULL_BOOT_SKIP
@pytest.mark.parametrize("kernel", ["vmlinux", "vmlinuz"])
def test_linux_uses_every_virtio_device(
    guest: DebianGuest,
    kernel: str,
    tmp_path: Path,
    vmkit_vm: VmFactory,
    vmkit_disk: Callable[..., Path],
) -> None:
    disk = vmkit_disk(64 << 20)
    console = tmp_path / "hvc0.txt"
    image = guest.vmlinux if kernel == "vmlinux" else guest.vmlinuz
    cfg = VmConfig.from_cli(
        ["--kernel", str(image), "--initramfs", str(guest.initramfs),
         "--cmdline", CMDLINE + " vmkit.exit=poweroff vmkit.vdawrite=linux-was-here",
         "--cpus", "boot=2", "--memory", "size=512M", "--console", f"file={console}",
         "--disk", f"path={disk},serial=vmkit-vda,num_queues=2"]
    )  # fmt: skip
    vm = vmkit_vm(cfg)
    vm.boot()
    serial = vm.serial
    serial.wait_for(r"VMKIT-GUEST-READY", timeout=60)
    serial.wait_for(r"VMKIT-GUEST vda sectors=131072 serial=vmkit-vda queues=2", 30)
    serial.wait_for(r"VMKIT-GUEST vda wrote 14 bytes", 30)
    serial.wait_for(r"VMKIT-GUEST hwrng virtio_rng\.\d+ bytes=32", 30)
    serial.wait_for(r"VMKIT-GUEST hvc0 written", 30)
    exit_info = vm.wait(60)
    assert exit_info is not None and exit_info.reason == "poweroff"
    vm.close()
    # Flushed by the guest, so in the host file once the VM is gone.
    assert disk.read_bytes()[4096 : 4096 + 14] == b"linux-was-here"
    assert "VMKIT-GUEST hvc0 hello" in console.read_text()


@FULL_BOOT_SKIP
def test_linux_pings_the_host_over_a_tap(
    guest: DebianGuest, vmkit_vm: VmFactory, vmkit_paths: VmkitPaths
) -> None:
    if not can_create_taps():
        pytest.skip("creating a tap needs /dev/net/tun and CAP_NET_ADMIN")
    cfg = linux_config(
        guest, "vmlinux",
        CMDLINE + " vmkit.exit=poweroff vmkit.ip=192.168.249.2/24 vmkit.peer=192.168.249.1",
        "size=512M",
    )  # fmt: skip
    net = f"tap={vmkit_paths.tap()},ip=192.168.249.1,mask=255.255.255.0,mac=12:34:56:78:9a:bc"
    cfg.net = VmConfig.from_cli(["--kernel", "k", "--net", net]).net
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"VMKIT-GUEST ping 192\.168\.249\.1 ok", timeout=90)
    counters = vm.counters()["_net0"]
    assert counters["tx_frames"] >= 1 and counters["rx_frames"] >= 1
    exit_info = vm.wait(60)
    assert exit_info is not None and exit_info.reason == "poweroff"
