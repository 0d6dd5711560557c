"""Host files a user names: a FIFO as --kernel or --initramfs is refused at
once (it would block the boot, and the VMM's lock, forever), and disk images
are locked while a VM uses them (exclusive when writable, shared when
readonly=on), with ``lock_disks=False`` to opt out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _prompt import PROMPT, call_promptly, unblock_reader_of
from vmkit import VmConfig, testguest
from vmkit.config import DiskConfig
from vmkit.vm import Vm, VmError
from vmkit.vmm import ApiError, Vmm

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

ROOT = Path(__file__).resolve().parent.parent


def argv(
    *extra: str,
    kernel: str | None = None,
    steps: tuple[str, ...] = ("hello",),
    exit: str = "poweroff",
    **options: int,
) -> list[str]:
    return [
        "--kernel", kernel or str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, exit, **options),
        "--cpus", "boot=1", "--memory", "size=256M",
        "--serial", "null", "--console", "off", *extra,
    ]  # fmt: skip


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "payload.fifo"
    os.mkfifo(path)
    return path


def payload_argv(option: str, fifo: Path) -> list[str]:
    if option == "kernel":
        return argv(kernel=str(fifo))
    return argv("--initramfs", str(fifo))


@pytest.mark.parametrize("option", ["kernel", "initramfs"])
def test_a_fifo_payload_is_refused_at_once(option: str, fifo: Path) -> None:
    vm = Vm(VmConfig.from_cli(payload_argv(option, fifo)))
    try:
        error = call_promptly(vm.boot, unblock_reader_of(fifo))
    finally:
        vm.close()
    assert isinstance(error, VmError), error
    assert str(error) == f"Cannot open {option} {fifo} (--{option}): not a regular file"


@pytest.mark.parametrize("option", ["kernel", "initramfs"])
def test_a_fifo_payload_leaves_the_vmm_answering(option: str, fifo: Path) -> None:
    """Through the API layer: vm.boot fails at once, and the VMM's lock is free
    again for info and vmm.shutdown."""
    vmm = Vmm()
    vmm.create(VmConfig.from_cli(payload_argv(option, fifo)))
    error = call_promptly(vmm.boot, unblock_reader_of(fifo))
    assert isinstance(error, ApiError), error
    assert "not a regular file" in str(error) and str(fifo) in str(error)
    acquired = vmm.lock.acquire(timeout=PROMPT)
    assert acquired, "the VMM's lock is still held"
    vmm.lock.release()
    vmm.vmm_shutdown()


@pytest.mark.parametrize("option", ["kernel", "initramfs"])
def test_the_cli_refuses_a_fifo_payload_at_once(option: str, fifo: Path) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vmkit", *payload_argv(option, fifo)],
            capture_output=True,
            text=True,
            timeout=PROMPT * 2,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"vmkit blocked on the FIFO given as --{option}")
    assert result.returncode != 0
    assert f"Cannot open {option} {fifo} (--{option}): not a regular file" in result.stderr


def image(path: Path, size: int = 1 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def lock_refusal(what: str, disk: Path) -> str:
    return (
        "Cannot create virtio-blk device _disk0: "
        f"Cannot get the {what} lock on disk image {disk} (--disk): "
        "is another VM or process using the image?"
    )


@contextmanager
def running(disk_option: str, lock_disks: bool = True) -> Iterator[Vm]:
    """A VM that keeps running (its guest ticks) with `disk_option` as --disk."""
    vm = Vm(
        VmConfig.from_cli(argv("--disk", disk_option, steps=("ticks",), ticks=100_000, tick_ms=10)),
        lock_disks=lock_disks,
    )
    try:
        vm.boot()
        vm.serial.wait_for(r"tick 1$", timeout=20)
        assert vm.state == "Running"
        yield vm
    finally:
        vm.close()


def boot_error(disk_option: str, lock_disks: bool = True) -> str | None:
    """Boots a VM on `disk_option` and shuts it down; returns why it failed to
    boot, if it did."""
    vm = Vm(VmConfig.from_cli(argv("--disk", disk_option)), lock_disks=lock_disks)
    try:
        vm.boot()
    except VmError as e:
        return str(e)
    finally:
        vm.close()
    return None


def test_a_second_vm_on_a_writable_image_is_refused_until_the_first_stops(
    tmp_path: Path,
) -> None:
    disk = image(tmp_path / "disk.img")
    with running(f"path={disk}") as first:
        assert boot_error(f"path={disk}") == lock_refusal("write", disk)
        assert boot_error(f"path={disk},readonly=on") == lock_refusal("read", disk)
        first.shutdown()
        assert first.wait(10) is not None
    assert boot_error(f"path={disk}") is None


def test_another_process_is_refused_too(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img")
    with running(f"path={disk}"):
        result = subprocess.run(
            [sys.executable, "-m", "vmkit", *argv("--disk", f"path={disk}")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode != 0
    assert lock_refusal("write", disk) in result.stderr


def test_read_only_disks_share_an_image(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img")
    with running(f"path={disk},readonly=on"):
        assert boot_error(f"path={disk},readonly=on") is None
        assert boot_error(f"path={disk}") == lock_refusal("write", disk)


def test_lock_disks_false_opts_out(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img")
    with running(f"path={disk}", lock_disks=False):
        # Neither the unlocked VM holds a lock, nor does this one take one.
        assert boot_error(f"path={disk}") is None
        assert boot_error(f"path={disk}", lock_disks=False) is None
    with running(f"path={disk}"):
        assert boot_error(f"path={disk}", lock_disks=False) is None


def test_a_guest_reset_keeps_its_own_image(tmp_path: Path) -> None:
    """A reset rebuilds the devices: the new disk must not be refused the lock
    the old one held."""
    disk = image(tmp_path / "disk.img")
    vm = Vm(VmConfig.from_cli(argv("--disk", f"path={disk}", exit="reset")))
    try:
        vm.boot()
        for _ in range(3):
            vm.serial.wait_for(r"^vmkit-guest: ready$", timeout=20)
        assert vm.boots >= 3
        assert vm.state == "Running", vm.wait(0)
        # Still locked while it runs.
        assert boot_error(f"path={disk}") == lock_refusal("write", disk)
        vm.shutdown()
        assert vm.wait(10) is not None
    finally:
        vm.close()
    assert boot_error(f"path={disk}") is None


def test_a_hot_added_disk_locks_its_image_until_the_guest_ejects_it(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img")
    other = image(tmp_path / "other.img")
    steps = ("pcihotplug", "pciunplug", "ticks")
    vm = Vm(VmConfig.from_cli(argv(steps=steps, ticks=100000, tick_ms=20)))
    try:
        vm.boot()
        assert vm.serial.wait_for("pcihotplug waiting$", timeout=30)
        vm.add_disk(DiskConfig(path=str(disk)))
        assert boot_error(f"path={disk}") == lock_refusal("write", disk)
        # An image another VM holds cannot be hot-added either.
        with running(f"path={other}"):
            with pytest.raises(VmError, match="Cannot get the write lock on disk image"):
                vm.add_disk(DiskConfig(path=str(other), id="held"))
        assert vm.serial.wait_for("pciunplug waiting$", timeout=30)
        vm.remove_device("_disk0")
        assert vm.serial.wait_for("step pciunplug ok", timeout=30)
        # Released once the guest ejected it (the VMM tears the device down).
        deadline = time.monotonic() + 10
        while boot_error(f"path={disk}") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert boot_error(f"path={disk}") is None
    finally:
        vm.close()
