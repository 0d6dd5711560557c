"""Booting the vmkit test guest: boot protocols, vCPUs, memory layouts, serial
modes, pause/resume, exit paths, error paths and resource hygiene.

These run wherever /dev/kvm works, including kvm_pvm hosts (the test guest
keeps its CPL0 code to what PVM's emulator runs).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _vcpus import quiet_vcpus, vcpu_switches
from vmkit import VmConfig, testguest
from vmkit.config import SgxEpcConfig
from vmkit.pytest_plugin import VmFactory
from vmkit.testguest import GuestResults, parse_results
from vmkit.vm import Vm, VmError, VmExit, VmInfo

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

ALL_STEPS = ["hello", "memmap", "acpi", "smp", "timer", "cpl3", "pio"]
#: RAM the map gives below 1 MiB is [0, 0xa0000), as Cloud Hypervisor's; the rest of
#: the first MiB (the ACPI tables are there) is not listed.
RESERVED_LOW = 0x100000 - 0xA0000


def config(
    fmt: testguest.Format = "pvh",
    steps: list[str] | tuple[str, ...] = ("hello",),
    exit: str = "poweroff",
    cpus: str = "boot=2",
    memory: str = "size=256M",
    serial: str | None = None,
    **options: int,
) -> VmConfig:
    argv = [
        "--kernel", str(testguest.image_path(fmt)),
        "--cmdline", testguest.cmdline(steps, exit, **options),
        "--cpus", cpus,
        "--memory", memory,
        "--console", "off",
    ]  # fmt: skip
    if serial is not None:
        argv += ["--serial", serial]
    return VmConfig.from_cli(argv)


def run(
    cfg: VmConfig, timeout: float = 60, watchdog: float | None = 30
) -> tuple[VmExit, GuestResults]:
    with Vm(cfg, watchdog_timeout=watchdog) as vm:
        vm.boot()
        exit_info = vm.wait(timeout)
        if exit_info is None:
            vm.shutdown()
            pytest.fail(f"the VM did not stop within {timeout} s:\n{vm.serial.text}")
        return exit_info, parse_results(vm.serial.text)


@pytest.mark.parametrize("fmt", testguest.FORMATS)
def test_every_step_passes(fmt: testguest.Format) -> None:
    exit_info, results = run(config(fmt, ALL_STEPS))
    assert exit_info.reason == "poweroff", exit_info
    assert results.protocol == ("pvh" if fmt == "pvh" else "linux64")
    assert results.ready
    assert results.failed == 0 and results.passed == len(ALL_STEPS), results.lines
    assert results.values("acpi")["tables"] == "XSDT,FACP,APIC,MCFG,DSDT"
    assert results.exit == "poweroff"


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smp_starts_every_vcpu(vcpus: int) -> None:
    exit_info, results = run(config(steps=["acpi", "smp"], cpus=f"boot={vcpus}"))
    assert exit_info.reason == "poweroff"
    assert results.values("acpi")["cpus"] == str(vcpus)
    assert results.values("smp")["cpus"] == str(vcpus)


@pytest.mark.parametrize(("fmt", "entry"), [("pvh", 0x01), ("bzimage", 0x02)])
def test_debug_port_writes_are_timed(
    fmt: testguest.Format, entry: int, vmkit_vm: VmFactory
) -> None:
    before = time.monotonic()
    vm = vmkit_vm(config(fmt))
    vm.boot()
    assert vm.wait(30) is not None
    writes = vm.debug_port_writes()
    vm.close()
    after = time.monotonic()
    assert [w.value for w in writes] == [entry, 0x7F]
    first, ready = writes
    assert 0 < first.seconds < ready.seconds < after - before
    assert before < first.monotonic < ready.monotonic < after


def test_max_vcpus_are_listed_but_not_started() -> None:
    _, results = run(config(steps=["acpi", "smp"], cpus="boot=2,max=4"))
    assert results.values("acpi")["cpus"] == "2"
    assert results.values("acpi")["max_cpus"] == "4"
    assert results.values("smp")["cpus"] == "2"


@pytest.mark.parametrize(
    ("size", "ram_ranges", "high"),
    [(64 << 20, 2, False), (1 << 30, 2, False), (3584 << 20, 3, True)],
    ids=["64M", "1G", "3.5G"],
)
def test_memory_map_matches_the_config(size: int, ram_ranges: int, high: bool) -> None:
    # A coarse stride keeps first-touch costs low on the 3.5 GiB map.
    cfg = config(steps=["memmap"], memory=f"size={size}", memmap_stride=16 << 20)
    exit_info, results = run(cfg)
    assert exit_info.reason == "poweroff", results.lines
    values = results.values("memmap")
    assert int(values["ram_bytes"]) == size - RESERVED_LOW
    assert int(values["ranges"]) == ram_ranges
    ranges = [line for line in results.lines if "memmap range" in line]
    above_4g = [line for line in ranges if "start=0x100000000 " in line]
    assert bool(above_4g) == high, ranges
    if high:
        assert f"end={hex(0x100000000 + size - 0xC0000000)} type=1" in above_4g[0]


def test_serial_off_has_no_device(vmkit_vm: VmFactory) -> None:
    cfg = config(serial="off")
    vm = vmkit_vm(cfg)
    vm.boot()
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff"
    assert vm.serial.read() == b""


def test_serial_null_is_still_captured() -> None:
    cfg = config(serial="null")
    exit_info, results = run(cfg)
    assert exit_info.reason == "poweroff" and results.ready


def test_serial_file(tmp_path: Path) -> None:
    out = tmp_path / "serial.log"
    exit_info, _ = run(config(serial=f"file={out}"))
    assert exit_info.reason == "poweroff"
    text = out.read_text()
    assert "vmkit-guest: ready" in text and "vmkit-guest: exit poweroff" in text


def test_serial_pty(vmkit_vm: VmFactory) -> None:
    cfg = config(steps=["ticks"], serial="pty", ticks=40, tick_ms=25)
    vm = vmkit_vm(cfg)
    vm.boot()
    pty = vm.serial_pty
    assert pty is not None and pty.startswith("/dev/pts/")
    fd = os.open(pty, os.O_RDONLY | os.O_NOCTTY)
    try:
        received = b""
        deadline = time.monotonic() + 20
        while b"tick 30" not in received and time.monotonic() < deadline:
            received += os.read(fd, 4096)
    finally:
        os.close(fd)
    assert b"tick 30" in received
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff"


def test_serial_socket(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    path = tmp_path / "serial.sock"
    cfg = config(steps=["ticks"], serial=f"socket={path}", ticks=60, tick_ms=25)
    vm = vmkit_vm(cfg)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    vm.boot()
    client.settimeout(20)
    received = b""
    while b"tick 50" not in received:
        chunk = client.recv(4096)
        if not chunk:
            break
        received += chunk
    client.close()
    assert b"tick 50" in received
    assert vm.wait(30) is not None
    vm.close()
    assert not path.exists(), "the socket file is removed when the VM is closed"


def test_serial_tty_through_the_command_line() -> None:
    kernel = testguest.image_path("pvh")
    proc = subprocess.run(
        [sys.executable, "-m", "vmkit", "--kernel", str(kernel),
         "--cmdline", testguest.cmdline(["hello"]), "--serial", "tty", "--console", "off"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "vmkit-guest: ready" in proc.stdout
    assert "vmkit-guest: exit poweroff" in proc.stdout


def test_pause_stops_progress_and_resume_continues(vmkit_vm: VmFactory) -> None:
    cfg = config(steps=["ticks"], ticks=60, tick_ms=20)
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"tick 5$", timeout=20)
    vm.pause()
    assert vm.state == "Paused"
    time.sleep(0.1)  # output already in flight
    before = vm.serial.read()
    time.sleep(0.6)
    assert vm.serial.read() == before, "the guest printed while paused"
    with pytest.raises(VmError, match="invalid VM state transition: Paused to Paused"):
        vm.pause()
    vm.resume()
    assert vm.state == "Running"
    vm.serial.wait_for(r"tick 59$", timeout=20)
    exit_info = vm.wait(20)
    assert exit_info is not None and exit_info.reason == "poweroff"
    assert parse_results(vm.serial.text).ok("ticks")


def test_state_transitions_follow_cloud_hypervisor(vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config(steps=["ticks"], ticks=1000, tick_ms=10))
    assert vm.state == "Created"
    with pytest.raises(VmError) as e:
        vm.pause()
    assert e.value.kind == "State"
    vm.boot()
    with pytest.raises(VmError, match="invalid VM state transition: Running to Running"):
        vm.boot()
    with pytest.raises(VmError, match="invalid VM state transition: Running to Running"):
        vm.resume()
    vm.shutdown()
    assert vm.state == "Shutdown"
    exit_info = vm.wait(5)
    assert exit_info == VmExit("shutdown", "The VM was shut down")
    with pytest.raises(VmError, match="invalid VM state transition: Shutdown to Paused"):
        vm.pause()
    # Shutdown → Running: a fresh boot of the same config.
    vm.boot()
    vm.serial.wait_for(r"tick 3$", timeout=20)
    assert vm.boots == 2


@pytest.mark.parametrize(
    ("exit", "reason", "words"),
    [
        ("poweroff", "poweroff", "powered off"),
        ("triple-fault", "triple-fault", "triple-faulted"),
        ("hang", "hang", "spinning"),
        ("halt", "hang", "halted"),
    ],
)
def test_exit_paths_end_the_vm_with_the_right_reason(exit: str, reason: str, words: str) -> None:
    exit_info, results = run(config(exit=exit), timeout=30, watchdog=1.0)
    assert exit_info.reason == reason, exit_info
    assert words in exit_info.message
    assert results.exit == exit


#: Long enough that a watchdog armed with the old 30 s default, which samples
#: every vCPU once a second, would have kicked them at least twice.
QUIET_WINDOW = 3.0


def test_no_watchdog_by_default_a_guest_halted_with_interrupts_off_keeps_running(
    vmkit_vm: VmFactory,
) -> None:
    # As in Cloud Hypervisor: the VM runs on, and nothing samples its vCPUs.
    vm = vmkit_vm(config(exit="halt"))
    vm.boot()
    vm.serial.wait_for(r"exit halt$", timeout=20)
    before = quiet_vcpus()
    assert vm.wait(QUIET_WINDOW) is None
    assert vm.state == "Running"
    woken = vcpu_switches() - before
    vm.close()
    assert woken <= 1, f"the vCPU threads were woken {woken} times: a watchdog samples them"


def test_a_watchdog_asked_for_ends_a_halted_guest(vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config(exit="halt"), watchdog_timeout=0.5)
    vm.boot()
    exit_info = vm.wait(20)
    vm.close()
    assert exit_info is not None and exit_info.reason == "hang", exit_info
    assert "halted" in exit_info.message


def kvm_fds() -> list[str]:
    """What this process's KVM VM and vCPU descriptors are."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue
        if "kvm-vm" in target or "kvm-vcpu" in target:
            targets.append(target)
    return sorted(targets)


def test_shutdown_returns_stopped_and_release_frees_the_kvm_vm(vmkit_vm: VmFactory) -> None:
    gc.collect()
    before = kvm_fds()
    vm = vmkit_vm(config(steps=["ticks"], ticks=100000, tick_ms=1))
    vm.boot()
    vm.serial.wait_for(r"tick 3$", timeout=20)
    vm.shutdown()
    assert vm.state == "Shutdown"
    assert vm.wait(0) == VmExit("shutdown", "The VM was shut down")
    # The vCPUs were stopped and joined: the guest prints nothing more.
    printed = vm.serial.read()
    time.sleep(0.05)
    assert vm.serial.read() == printed
    vm.release()
    assert kvm_fds() == before, "the KVM VM outlived release()"
    # A fresh boot after the release works as before.
    vm.boot()
    vm.serial.wait_for(r"tick 3$", timeout=20)
    vm.close()
    vm.release()  # after close() too
    assert kvm_fds() == before


def test_exit_fd_is_readable_exactly_while_the_vm_is_stopped(vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config(steps=["ticks"], ticks=100000, tick_ms=10))
    poller = select.poll()
    poller.register(vm.exit_fd, select.POLLIN)
    assert poller.poll(0) == [], "readable before the first boot"
    vm.boot()
    vm.serial.wait_for(r"tick 1$", timeout=20)
    assert poller.poll(0) == [], "readable while running"
    vm.shutdown()
    assert poller.poll(0) == [(vm.exit_fd, select.POLLIN)], "not readable once stopped"
    vm.boot()
    assert poller.poll(0) == [], "still readable after booting again"
    vm.close()
    with Vm(config()) as vm:  # the guest powers off by itself
        poller = select.poll()
        poller.register(vm.exit_fd, select.POLLIN)
        vm.boot()
        assert poller.poll(30_000) == [(vm.exit_fd, select.POLLIN)]
        assert vm.wait(0) == VmExit("poweroff", "The guest powered off")


@pytest.mark.parametrize("exit", ["reset", "acpi-reset"])
def test_reset_reboots_the_vm(exit: str, vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config(exit=exit))
    vm.boot()
    for _ in range(3):
        vm.serial.wait_for(r"^vmkit-guest: ready$", timeout=20)
    assert vm.boots >= 3
    assert vm.state == "Running"
    vm.shutdown()
    exit_info = vm.wait(10)
    assert exit_info is not None and exit_info.reason == "shutdown"


@pytest.mark.parametrize("exit", ["reset", "acpi-reset"])
def test_control_calls_across_guest_resets_never_find_no_boot(
    exit: str, vmkit_vm: VmFactory
) -> None:
    """While the guest resets over and over, every control call acts on a
    boot: none answers "VM is not running" while the VM is up."""
    vm = vmkit_vm(config(exit=exit))
    vm.boot()
    failures: list[str] = []
    calls = 0
    deadline = time.monotonic() + 30
    while vm.boots < 8 and time.monotonic() < deadline:
        for call in (vm.pause, vm.resume, vm.counters, vm.power_button, vm.info):
            try:
                call()
            except VmError as e:
                failures.append(f"{call.__name__}: {e} (state {vm.state})")
            calls += 1
    boots = vm.boots
    assert vm.state == "Running"
    vm.shutdown()
    vm.close()
    assert boots >= 8, f"the guest reset only {boots - 1} times in 30 s"
    assert not failures, f"{len(failures)} of {calls} calls failed: {failures[:5]}"


def test_reboot_from_python(vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config(steps=["ticks"], ticks=1000, tick_ms=10))
    vm.boot()
    vm.serial.wait_for(r"tick 2$", timeout=20)
    vm.reboot()
    vm.serial.wait_for(r"^vmkit-guest: ready$", timeout=20)
    assert vm.boots == 2


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def first_vm_of_the_process() -> None:
    """Boots and ends a VM: a process's first VM starts what stays for the
    process (the log thread, the CPU pressure file), which a leak count taken
    before it would take for the test's own leak."""
    run(config())
    gc.collect()  # earlier tests' VMs must not count


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_corrupt_kernel_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinux"
    junk.write_bytes(b"\x7fELF" + bytes(4092))
    cfg = VmConfig.from_cli(["--kernel", str(junk), "--console", "off"])
    first_vm_of_the_process()
    fds, threads = open_fds(), thread_count()
    # Not vmkit_vm: the fixture would hold the Vm past the leak check.
    with Vm(cfg) as vm:
        with pytest.raises(VmError) as e:
            vm.boot()
        assert vm.state == "Created", "a failed boot leaves the VM as it was"
    assert e.value.kind == "Kernel"
    assert str(junk) in str(e.value)
    del vm, e  # the traceback holds the Vm
    gc.collect()
    assert (open_fds(), thread_count()) == (fds, threads)


def test_unbootable_file_is_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n" * 100)
    cfg = VmConfig.from_cli(["--kernel", str(text), "--console", "off"])
    with Vm(cfg) as vm, pytest.raises(VmError, match="neither an ELF vmlinux nor a bzImage"):
        vm.boot()


def test_missing_initramfs_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "initramfs.img"
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")), "--initramfs", str(missing),
         "--console", "off"]
    )  # fmt: skip
    first_vm_of_the_process()
    fds, threads = open_fds(), thread_count()
    with Vm(cfg) as vm, pytest.raises(VmError) as e:
        vm.boot()
    assert e.value.kind == "Initramfs"
    assert str(missing) in str(e.value) and "No such file" in str(e.value)
    del vm, e  # the traceback holds the Vm
    gc.collect()
    assert (open_fds(), thread_count()) == (fds, threads)


def test_unsupported_devices_are_refused_clearly() -> None:
    cfg = config()
    cfg.sgx_epc = [SgxEpcConfig(id="epc0", size=64 << 20)]
    with pytest.raises(VmError, match=r"--sgx-epc is not supported yet") as e:
        Vm(cfg)
    assert e.value.kind == "Unsupported"


@pytest.mark.parametrize(
    ("option", "value", "key"),
    [
        ("--disk", "readonly=on", "readonly=on"),
        ("--disk", "rate_limit_group=g0", "rate_limit_group"),
        ("--net", "tap=vmtap9", "tap"),
        ("--net", "ip=10.1.2.3", "ip"),
    ],
)
def test_keys_a_vhost_user_backend_owns_are_refused_by_name(
    option: str, value: str, key: str
) -> None:
    """v37 drops them silently; a user who asked for a read-only disk must
    not get a writable one."""
    argv = ["--kernel", str(testguest.image_path("pvh")), "--serial", "null", "--console", "off"]
    argv += ["--cpus", "boot=2", "--memory", "size=64M,shared=on"]
    if key == "rate_limit_group":
        argv += ["--rate-limit-group", "id=g0,bw_size=1000,bw_refill_time=100"]
    cfg = VmConfig.from_cli([*argv, option, f"vhost_user=on,socket=/tmp/vmkit-vu.sock,{value}"])
    with pytest.raises(VmError) as e:
        Vm(cfg)
    assert e.value.kind == "Unsupported"
    assert str(e.value).startswith(f"{option} {key} cannot be used with vhost_user=on: ")


SMBIOS_REFUSAL = (
    "--platform serial_number, uuid and oem_strings (SMBIOS tables) are not supported yet"
)


@pytest.mark.parametrize(
    ("args", "kind", "message"),
    [
        (["--console", "socket=/tmp/vmkit-absent.sock"], "Unsupported",
         "The virtio console cannot use a socket (--console socket=...): only --serial can "
         "(NoSocketOptionSupportForConsoleDevice)"),
        (["--memory", "size=1000000"], "Memory",
         "--memory size 1000000 is not a multiple of the page size 4096 (MisalignedMemorySize)"),
        (["--memory", "size=4M,hugepages=on,hugepage_size=2M",
          "--memory-zone", "id=z0,size=1M,hugepage_size=2M"], "Memory",
         "--memory-zone z0 size 1048576 is not a multiple of the page size 2097152 "
         "(MisalignedMemorySize)"),
        (["--platform", "serial_number=x"], "Unsupported", SMBIOS_REFUSAL),
        (["--platform", "uuid=1-2"], "Unsupported", SMBIOS_REFUSAL),
        (["--platform", "oem_strings=[a]"], "Unsupported", SMBIOS_REFUSAL),
    ],
)  # fmt: skip
def test_what_v37_refuses_at_boot_an_in_process_vm_refuses(
    args: list[str], kind: str, message: str
) -> None:
    argv = ["--kernel", str(testguest.image_path("pvh")), "--serial", "null"]
    if "--console" not in args:
        argv += ["--console", "off"]
    cfg = VmConfig.from_cli([*argv, *args])
    fds = open_fds()
    with pytest.raises(VmError) as e:
        Vm(cfg)
    assert (e.value.kind, str(e.value)) == (kind, message)
    del e
    assert open_fds() == fds


def test_firmware_is_refused_clearly() -> None:
    cfg = VmConfig.from_cli(["--firmware", "/fw.bin", "--console", "off"])
    with Vm(cfg) as vm, pytest.raises(VmError, match="--firmware is not supported yet"):
        vm.boot()


def test_waiting_for_output_after_the_vm_stopped_says_why(vmkit_vm: VmFactory) -> None:
    vm = vmkit_vm(config())
    vm.boot()
    assert vm.wait(30) is not None
    with pytest.raises(VmError, match="stopped before printing") as e:
        vm.serial.wait_for("never printed", timeout=5)
    assert e.value.kind == "Stopped"


def test_waiting_blocks_without_the_gil(vmkit_vm: VmFactory) -> None:
    counter = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1

    vm = vmkit_vm(config(steps=["ticks"], ticks=20, tick_ms=20))
    vm.boot()
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        vm.wait(30)
    finally:
        stop.set()
        thread.join()
    vm.close()
    assert counter > 10_000, "another Python thread could not run while wait() blocked"


def test_fifty_boot_cycles_leak_nothing() -> None:
    cfg = config()
    for _ in range(3):  # warm up allocator pools and caches
        run(cfg)
    gc.collect()
    fds, threads, rss = open_fds(), thread_count(), rss_kib()
    started = time.monotonic()
    for _ in range(50):
        exit_info, _ = run(cfg)
        assert exit_info.reason == "poweroff"
    gc.collect()
    assert open_fds() == fds
    assert thread_count() == threads
    assert rss_kib() - rss < 16 << 10, "RSS grew by more than 16 MiB over 50 boots"
    assert time.monotonic() - started < 120


def vmkit_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmkit", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_demo_boots_the_test_guest() -> None:
    proc = vmkit_cli("demo", "--steps", "hello,acpi")
    assert proc.returncode == 0, proc.stderr
    assert "vmkit-guest: step acpi ok" in proc.stdout
    assert "Booted the pvh test guest: first guest instruction" in proc.stdout


def test_cli_without_a_kernel_says_so() -> None:
    proc = vmkit_cli("--cpus", "boot=2")
    assert proc.returncode == 1
    assert "No kernel specified" in proc.stderr


def test_cli_reports_why_the_vm_stopped() -> None:
    kernel = testguest.image_path("pvh")
    proc = vmkit_cli(
        "--kernel", str(kernel), "--cmdline", testguest.cmdline(["hello"], "triple-fault"),
        "--serial", "null", "--console", "off",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "VM stopped: vCPU 0 triple-faulted" in proc.stderr


def test_cli_boot_error_uses_cloud_hypervisor_wording(tmp_path: Path) -> None:
    proc = vmkit_cli("--kernel", str(tmp_path / "missing"), "--console", "off")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error booting VM: Cannot open kernel")


@pytest.mark.parametrize(
    "memory",
    ["size=256M,shared=on", "size=256M,prefault=on", "size=256M,mergeable=on,thp=off"],
)
def test_memory_backings_boot(memory: str) -> None:
    exit_info, results = run(config(steps=["memmap"], memory=memory))
    assert exit_info.reason == "poweroff", results.lines
    assert int(results.values("memmap")["ram_bytes"]) == (256 << 20) - RESERVED_LOW


def test_memory_zones_make_up_guest_ram() -> None:
    cfg = config(steps=["memmap"], memory="size=0")
    cfg.memory = type(cfg.memory).parse("size=0", zones=["id=a,size=128M", "id=b,size=64M"])
    exit_info, results = run(cfg)
    assert exit_info.reason == "poweroff"
    assert int(results.values("memmap")["ram_bytes"]) == (192 << 20) - RESERVED_LOW


def free_huge_pages() -> int:
    path = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    return int(path.read_text()) if path.exists() else 0


def test_huge_pages_boot_or_fail_clearly() -> None:
    cfg = config(steps=["memmap"], memory="size=64M,hugepages=on,hugepage_size=2M")
    if free_huge_pages() >= 32:
        exit_info, _ = run(cfg)
        assert exit_info.reason == "poweroff"
    else:
        with pytest.raises(VmError) as e, Vm(cfg) as vm:
            vm.boot()
        assert e.value.kind == "Memory"
        assert "needs 32 huge pages of 2048 KiB" in str(e.value)


def test_affinity_pins_vcpu_threads(vmkit_vm: VmFactory) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host CPUs")
    cfg = config(steps=["ticks"], cpus="boot=2,affinity=[0@[0],1@[1]]", ticks=100, tick_ms=10)
    vm = vmkit_vm(cfg)
    vm.boot()
    vm.serial.wait_for(r"tick 1$", timeout=20)
    pinned = {}
    for task in Path("/proc/self/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith("vcpu"):
            status = (task / "status").read_text()
            allowed = next(
                line.split(":")[1].strip()
                for line in status.splitlines()
                if line.startswith("Cpus_allowed_list")
            )
            pinned[name] = allowed
    vm.shutdown()
    vm.close()
    assert pinned == {"vcpu0": "0", "vcpu1": "1"}


def test_dropping_a_running_vm_stops_it() -> None:
    gc.collect()
    threads = thread_count()
    vm = Vm(config(steps=["ticks"], ticks=100000, tick_ms=10))
    vm.boot()
    vm.serial.wait_for(r"tick 1$", timeout=20)
    del vm
    gc.collect()
    deadline = time.monotonic() + 10
    while thread_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread_count() == threads, "vCPU or VMM threads outlived the Vm object"


def test_a_closed_vm_refuses_every_call_but_close() -> None:
    vm = Vm(config())
    vm.boot()
    assert vm.wait(30) is not None
    printed = vm.serial.read()
    vm.close()
    vm.close()  # idempotent
    calls: list[tuple[str, Callable[[], object]]] = [
        ("boot", vm.boot), ("pause", vm.pause), ("resume", vm.resume),
        ("shutdown", vm.shutdown), ("reboot", vm.reboot), ("power_button", vm.power_button),
        ("wait", lambda: vm.wait(0)), ("info", vm.info), ("counters", vm.counters),
        ("device_events", vm.device_events), ("debug_port_writes", vm.debug_port_writes),
        ("serial_pty", lambda: vm.serial_pty), ("console_pty", lambda: vm.console_pty),
        ("serial.wait_for", lambda: vm.serial.wait_for("x", timeout=1)),
    ]  # fmt: skip
    for name, call in calls:
        with pytest.raises(ValueError, match="I/O operation on closed VM"):
            call()
        assert vm.state == "Shutdown", f"{name} changed the state of a closed VM"
    # What stays true after closing stays readable.
    assert vm.state == "Shutdown"
    assert vm.boots == 1
    assert vm.serial.read() == printed and b"hello" in printed
    assert vm.config.payload is not None


def test_info_is_the_typed_vm_info(vmkit_vm: VmFactory) -> None:
    cfg = config(steps=["ticks"], ticks=100000, tick_ms=10)
    vm = vmkit_vm(cfg)
    before = vm.info()
    assert isinstance(before, VmInfo) and isinstance(before.config, VmConfig)
    assert (before.state, before.device_tree) == ("Created", None)
    assert before.config == cfg and before.config is not cfg
    assert before.memory_actual_size == 256 << 20
    vm.boot()
    vm.serial.wait_for(r"tick 1$", timeout=20)
    info = vm.info()
    assert info.state == "Running"
    assert info.config.cpus.boot_vcpus == 2
    assert info.device_tree is not None and "__rng" in info.device_tree
    assert VmInfo.from_dict(info.to_dict()) == info


def test_dropping_a_busy_vm_lets_other_threads_run() -> None:
    vm = Vm(config(steps=["ticks"], ticks=100000, tick_ms=10))
    vm.boot()
    vm.serial.wait_for(r"tick 1$", timeout=20)
    beats: list[float] = []
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(0.0005)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        time.sleep(0.02)
        started = time.monotonic()
        del vm  # no reference cycle: this ends the VM, joining its threads
        ended = time.monotonic()
    finally:
        stop.set()
        thread.join()
    took = ended - started
    if took < 0.01:
        pytest.skip(f"dropping the VM took {took * 1e3:.1f} ms: too quick to observe other threads")
    during = [t for t in beats if started < t < ended]
    assert len(during) >= 3, (
        f"another Python thread ran {len(during)} times in the {took * 1e3:.0f} ms "
        "the drop took: the drop held the GIL"
    )


def test_ctrl_c_interrupts_the_command_line() -> None:
    kernel = testguest.image_path("pvh")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit", "--kernel", str(kernel),
         "--cmdline", testguest.cmdline(["ticks"], ticks=100000, tick_ms=10),
         "--serial", "tty", "--console", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = b""
    while b"tick 3" not in seen:
        chunk = proc.stdout.read1(4096)
        assert chunk, "vmkit exited before the guest ticked"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


def test_ioapic_delivers_com1_as_the_guest_programs_it() -> None:
    # The IOAPIC is vmkit's (KVM's split irqchip): the guest reads its
    # registers and routes COM1's pin masked, edge- and level-triggered.
    exit_info, results = run(config(steps=["ioapic", "hello"]))
    assert exit_info.reason == "poweroff", results.lines
    assert results.values("ioapic") == {
        "version": "0x170011",
        "masked": "0",
        "edge": "2",
        "level": "2",
    }, results.lines
    # The loopback bytes stayed in the UART; the step after it still prints.
    assert results.passed == 2 and results.failed == 0, results.lines


def test_power_button_reaches_the_guest(vmkit_vm: VmFactory) -> None:
    cfg = config(steps=["powerbutton"])
    vm = vmkit_vm(cfg)
    with pytest.raises(VmError, match="VM is not running"):
        vm.power_button()
    vm.boot()
    vm.serial.wait_for(r"vmkit-guest: powerbutton waiting", timeout=30)
    vm.power_button()
    exit_info = vm.wait(30)
    results = parse_results(vm.serial.text)
    vm.close()
    assert exit_info is not None and exit_info.reason == "poweroff"
    # One edge interrupt on the GED's pin, and the power-button bit (read once).
    assert results.values("powerbutton") == {"event": "0x8", "interrupts": "1"}, results.lines
