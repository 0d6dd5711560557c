"""vCPU hot-plug of a running VM (``vm.resize {"desired_vcpus"}``), as Cloud
Hypervisor v37 does it: new vCPU threads (each confined by the vCPU seccomp
filter) and a GED interrupt for the guest's CPU hot-plug AML; fewer vCPUs
marks the highest for removal until the guest ejects them; v37's errors.

The AML and the controller's registers are checked in test_acpi_tables.py and
in the Rust unit tests (devices::cpu_hotplug).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote, wait_for_line
from vmkit import VmConfig, testguest
from vmkit.client import ApiError
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm


def guest_args(cpus: str, serial: str = "tty") -> list[str]:
    # Ticks for far longer than a test: the guest runs throughout.
    return [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--cpus", cpus,
        "--memory", "size=64M",
        "--serial", serial, "--console", "off",
    ]  # fmt: skip


def vcpu_threads(pid: int | str = "self") -> dict[str, int]:
    """The process's vCPU threads by name, with their seccomp mode (2: filtered)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread just ended (ENOENT or ESRCH)
        if re.fullmatch(r"vcpu\d+", name):
            found[name] = int(re.search(r"^Seccomp:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return found


def confined_vcpu_threads(pid: int, count: int, timeout: float = 10) -> dict[str, int]:
    """The ``count`` vCPU threads, once each has installed its filter (a
    thread carries its name before it is confined)."""
    deadline = time.monotonic() + timeout
    while True:
        threads = vcpu_threads(pid)
        if len(threads) == count and set(threads.values()) == {2}:
            return threads
        if time.monotonic() > deadline:
            return threads
        time.sleep(0.01)


def no_vcpu_threads_left(timeout: float = 5) -> bool:
    """Whether the process's vCPU threads are gone (a joined thread can stay
    listed in /proc for a moment after it exited)."""
    deadline = time.monotonic() + timeout
    while vcpu_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_running_vm_grows_and_shrinks_as_v37_does() -> None:
    with Vm(VmConfig.from_cli(guest_args("boot=2,max=4"))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1"]
        vm.resize_vcpus(4)
        assert vm.info().config.cpus.boot_vcpus == 4
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1", "vcpu2", "vcpu3"]
        with pytest.raises(
            VmError, match=r"^Error from CPU manager: Requested vCPUs exceed maximum$"
        ):
            vm.resize_vcpus(5)
        assert vm.info().config.cpus.boot_vcpus == 4
        # Fewer: marked for removal; the threads run until the guest ejects
        # them (the test guest runs no AML), and v37 refuses other counts
        # meanwhile but takes the count that is present.
        vm.resize_vcpus(2)
        assert vm.info().config.cpus.boot_vcpus == 2
        assert len(vcpu_threads()) == 4
        with pytest.raises(VmError, match=r"^Error from CPU manager: Still pending removed vcpu$"):
            vm.resize_vcpus(3)
        with pytest.raises(VmError, match="Still pending removed vcpu"):
            vm.resize_vcpus(0)
        vm.resize_vcpus(4)
        assert vm.info().config.cpus.boot_vcpus == 4
        # Paused, a new vCPU's thread parks; the guest goes on after resume.
        vm.pause()
        assert vm.state == "Paused"
        vm.resume()
        assert vm.serial.wait_for("^vmkit-guest: tick 5$", timeout=30)
    assert no_vcpu_threads_left(), vcpu_threads()


def test_resize_from_a_paused_vm_adds_a_parked_vcpu() -> None:
    with Vm(VmConfig.from_cli(guest_args("boot=1,max=2"))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        vm.pause()
        vm.resize_vcpus(2)
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1"]
        assert vm.state == "Paused"
        text = vm.serial.text
        vm.resume()
        assert vm.serial.wait_for("^vmkit-guest: tick 3$", timeout=30), text
    assert no_vcpu_threads_left(), vcpu_threads()


def test_concurrent_resizes_leave_a_consistent_vm() -> None:
    with Vm(VmConfig.from_cli(guest_args("boot=1,max=8"))) as vm:
        vm.boot()
        errors: list[str] = []

        def grow(count: int) -> None:
            try:
                vm.resize_vcpus(count)
            except VmError as e:
                errors.append(str(e))

        workers = [threading.Thread(target=grow, args=(n,)) for n in (3, 5, 8, 2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert all("Still pending removed vcpu" in e for e in errors), errors
        assert 1 <= len(vcpu_threads()) <= 8
    assert no_vcpu_threads_left(), vcpu_threads()


# (ch-remote arguments, exit status, what stderr says, boot_vcpus after)
SCRIPT = [
    ("resize --cpus 5", 1, "Requested vCPUs exceed maximum", 2),
    ("resize --cpus 4", 0, "", 4),
    ("resize --cpus 3", 0, "", 3),
    ("resize --cpus 2", 1, "Still pending removed vcpu", 3),
    ("resize --cpus 0", 1, "Still pending removed vcpu", 3),
    ("resize --cpus 4", 0, "", 4),
]


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_ch_remote_resize_answers_as_cloud_hypervisor(kind: str, tmp_path: Path) -> None:
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    socket = tmp_path / "api.sock"
    args = tuple(guest_args("boot=2,max=4", serial=f"file={tmp_path / 'serial'}"))
    vmm = VmmProcess(kind, socket, tmp_path / "log", extra=args)
    try:
        vmm.wait_running()
        seen = []
        for command, *_ in SCRIPT:
            status, _, stderr = ch_remote(socket, *command.split())
            info_status, info, _ = ch_remote(socket, "info")
            assert info_status == 0, vmm.log
            boot_vcpus = int(re.search(r'"boot_vcpus":\s*(\d+)', info).group(1))  # type: ignore[union-attr]
            said = next((s for _, _, s, _ in SCRIPT if s and s in stderr), "")
            seen.append((command, status, said, boot_vcpus))
            if kind == "vmkit" and status == 0:
                # 4 threads each time: those marked for removal run on.
                threads = confined_vcpu_threads(vmm.proc.pid, 4)
                assert set(threads.values()) == {2}, f"every vCPU thread is confined: {threads}"
        assert seen == SCRIPT, vmm.log
    finally:
        vmm.stop()


@pytest.mark.parametrize("image", ["pvh", "elf"])
def test_the_guest_brings_a_hot_added_vcpu_online_and_ejects_it(image: testguest.Format) -> None:
    # The test guest runs no AML: it reads the controller's registers after
    # the GED interrupt, as the DSDT's CSCN and _EJ0 would, starts the new
    # vCPUs with INIT-SIPI-SIPI and later ejects the ones to remove.
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path(image)),
        "--cmdline", testguest.cmdline(
            ["cpuhotplug", "cpuunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--cpus", "boot=1,max=3",
        "--memory", "size=64M",
        "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: cpuhotplug waiting$", timeout=30)
        vm.resize_vcpus(3)
        assert vm.serial.wait_for("^vmkit-guest: step cpuhotplug ", timeout=30), vm.serial.text
        text = vm.serial.text
        assert "vmkit-guest: step cpuhotplug ok event=0x1 added=2 up=2" in text, text
        for uid in (1, 2):
            assert f"vmkit-guest: cpuhotplug inserted uid={uid} apic_id={uid}" in text
            assert f"vmkit-guest: smp cpu apic_id={uid} up" in text
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1", "vcpu2"]
        assert vm.serial.wait_for("^vmkit-guest: cpuunplug waiting$", timeout=30)
        vm.resize_vcpus(1)
        assert vm.serial.wait_for("^vmkit-guest: step cpuunplug ", timeout=30), vm.serial.text
        text = vm.serial.text
        assert "vmkit-guest: step cpuunplug ok event=0x1 removed=2" in text, text
        # The ejected vCPUs' threads stop.
        deadline = time.monotonic() + 10
        while sorted(vcpu_threads()) != ["vcpu0"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(vcpu_threads()) == ["vcpu0"]
        assert vm.info().config.cpus.boot_vcpus == 1
        # No removal pending now; the ejected vCPU (kept: KVM cannot make
        # the same vCPU twice) runs again.
        vm.resize_vcpus(2)
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1"]
        assert vm.serial.wait_for("^vmkit-guest: tick 2$", timeout=30), vm.serial.text
        assert vm.state == "Running"
    assert no_vcpu_threads_left(), vcpu_threads()


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_same_guest_code_hot_plugs_vcpus_on_vmkit_and_cloud_hypervisor(
    kind: str, tmp_path: Path
) -> None:
    # The guest finds the GED and the controller through the DSDT (vmkit and
    # Cloud Hypervisor place them differently), so one guest driving both
    # through the real ch-remote shows that the registers behave alike.
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    serial = tmp_path / "serial"
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["cpuhotplug", "cpuunplug", "ticks"], "poweroff", ticks=100000, tick_ms=20
        ),
        "--cpus", "boot=1,max=3",
        "--memory", "size=64M",
        "--serial", f"file={serial}", "--console", "off",
    ]  # fmt: skip
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=tuple(args))

    try:
        wait_for_line(serial, "^vmkit-guest: cpuhotplug waiting$", vmm)
        assert ch_remote(vmm.socket_path, "resize", "--cpus", "3")[0] == 0, vmm.log
        text = wait_for_line(serial, "^vmkit-guest: step cpuhotplug ", vmm)
        assert "vmkit-guest: step cpuhotplug ok event=0x1 added=2 up=2" in text, text
        wait_for_line(serial, "^vmkit-guest: cpuunplug waiting$", vmm)
        assert ch_remote(vmm.socket_path, "resize", "--cpus", "1")[0] == 0, vmm.log
        text = wait_for_line(serial, "^vmkit-guest: step cpuunplug ", vmm)
        assert "vmkit-guest: step cpuunplug ok event=0x1 removed=2" in text, text
    finally:
        vmm.stop()


def test_a_snapshot_keeps_the_hot_added_vcpus(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    with Vm(VmConfig.from_cli(guest_args("boot=1,max=3"))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        vm.resize_vcpus(3)
        vm.pause()
        vm.snapshot(snapshot)
        # Complete lines only: the pause may fall inside one.
        printed = vm.serial.text.rpartition("\n")[0]
        last_tick = int(re.findall(r"^vmkit-guest: tick (\d+)$", printed, re.M)[-1])
    assert no_vcpu_threads_left(), vcpu_threads()
    with Vm.restore(snapshot) as restored:
        assert restored.info().config.cpus.boot_vcpus == 3
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1", "vcpu2"]
        restored.resume()
        # The guest goes on counting where it was (however many ticks came
        # before the pause).
        assert restored.serial.wait_for(f"^vmkit-guest: tick {last_tick + 2}$", timeout=30)
        # The restored VM's controller has the three running: one fewer is a removal.
        restored.resize_vcpus(2)
        restored.pause()
        second = tmp_path / "second"
        second.mkdir()
        with pytest.raises(
            VmError,
            match=r"^A VM cannot be snapshotted while vCPU 2 is marked for removal: the guest "
            r"has not ejected it yet$",
        ):
            restored.snapshot(second)
        assert list(second.iterdir()) == [], "nothing written"
    assert no_vcpu_threads_left(), vcpu_threads()


def test_a_reboot_starts_the_resized_count() -> None:
    # As Cloud Hypervisor: vm.resize changes the config's boot_vcpus, which
    # the next boot starts.
    with Vm(VmConfig.from_cli(guest_args("boot=1,max=3"))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        vm.resize_vcpus(2)
        vm.reboot()
        assert vm.state == "Running"
        # The new boot's guest runs (the old boot's threads, vcpu1 among
        # them, were gone before the new ones started).
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        deadline = time.monotonic() + 10
        while sorted(vcpu_threads()) != ["vcpu0", "vcpu1"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1"]
        assert vm.info().config.cpus.boot_vcpus == 2
        # The new boot's controller starts from two: three is a hot-add again.
        vm.resize_vcpus(3)
        assert sorted(vcpu_threads()) == ["vcpu0", "vcpu1", "vcpu2"]
    assert no_vcpu_threads_left(), vcpu_threads()


def test_a_spawned_vm_resizes_through_its_client() -> None:
    with Vm.spawn(VmConfig.from_cli(guest_args("boot=1,max=3"))) as vm:
        vm.boot()
        vm.resize_vcpus(3)
        assert vm.info().config.cpus.boot_vcpus == 3
        assert len(confined_vcpu_threads(vm.pid, 3)) == 3
        with pytest.raises(ApiError, match="Requested vCPUs exceed maximum"):
            vm.resize_vcpus(4)
