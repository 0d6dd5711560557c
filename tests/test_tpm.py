"""TPM 2.0 (``--tpm socket=``): swtpm behind the CRB interface, beside the real
Cloud Hypervisor where it is at hand.

The test guest's ``tpm`` step finds the TPM2 table and the DSDT's MSFT0101
device, requests locality 0, sends TPM2_Startup(TPM_SU_CLEAR) and
TPM2_GetRandom(16) through the CRB and prints the response codes and the
bytes. Each test starts its own swtpm (tests/_swtpm.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_binary, ch_remote
from _swtpm import SWTPM, SWTPM_MISSING, Swtpm, unlistened_socket
from vmkit import VmConfig, logs, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.testguest import parse_results
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm
if SWTPM is None:
    pytest.skip(SWTPM_MISSING, allow_module_level=True)

needs_ch = pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)

#: Lines of the tpm step that both VMMs must print alike (the random bytes aside).
TPM_LINE = re.compile(r"^vmkit-guest: (tpm |step tpm )")
RANDOM = re.compile(r"^vmkit-guest: tpm random bytes=16 hex=([0-9a-f]{32})$", re.M)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    with Swtpm(tmp_path / "tpm") as tpm:
        yield tpm


def guest_args(
    image: testguest.Format, socket: Path, steps: tuple[str, ...] = ("tpm",), **options: int
) -> list[str]:
    return [
        "--kernel", str(testguest.image_path(image)),
        "--cmdline", testguest.cmdline(list(steps), "poweroff", **options),
        "--memory", "size=128M",
        "--serial", "tty", "--console", "off",
        "--tpm", f"socket={socket}",
    ]  # fmt: skip


def random_bytes(text: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in RANDOM.findall(text)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> list[str]:
    """This process's threads by name, but the log bridge's (once started,
    it serves every later VM)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        if name != "vmkit-log":
            names.append(name)
    return sorted(names)


def tpm_threads() -> int:
    return threads().count("tpm")


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_the_guest_starts_the_tpm_and_gets_random_bytes(
    swtpm: Swtpm, image: testguest.Format
) -> None:
    draws = []
    for _ in range(2):
        config = VmConfig.from_cli(guest_args(image, swtpm.socket, ("tpm", "acpi")))
        with Vm(config) as vm:
            vm.boot()
            vm.serial.wait_for("step tpm", timeout=30)
            assert tpm_threads() == 1, "the TPM's worker runs while the VM does"
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            text = vm.serial.text
        results = parse_results(text)
        assert results.ok("tpm"), text
        assert results.values("tpm") == {
            "startup_rc": "0x0",
            "getrandom_rc": "0x0",
            "bytes": "16",
            "control": "0xfed40040",
        }
        assert "tables=XSDT,FACP,APIC,MCFG,TPM2,DSDT " in text
        assert (
            "tpm table rev=3 len=52 class=0 control=0xfed40040 start_method=7 hid=MSFT0101 "
            "crs=0xfed40000/0x1000"
        ) in text
        (random,) = random_bytes(text)
        draws.append(random)
    assert tpm_threads() == 0
    # Each VM reset the TPM (CMD_INIT): the second one's Startup succeeded too.
    assert draws[0] != draws[1], "two draws of 16 random bytes came out equal"
    assert all(len(set(draw)) > 1 for draw in draws), draws


def test_a_vm_with_a_tpm_leaves_no_thread_or_descriptor_behind(swtpm: Swtpm) -> None:
    def run() -> None:
        config = VmConfig.from_cli(guest_args("pvh", swtpm.socket, ("tpm", "tpm")))
        with Vm(config) as vm:
            vm.boot()
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
            assert "summary passed=2 failed=0" in vm.serial.text

    run()  # one-time threads (the log bridge) start with the first VM
    gc.collect()
    fds, names = open_fds(), threads()
    for _ in range(3):
        run()
    gc.collect()
    assert (open_fds(), threads()) == (fds, names)


@needs_ch
def test_cloud_hypervisor_and_vmkit_show_the_guest_the_same_tpm(tmp_path: Path) -> None:
    # The same guest on both VMMs, each with a swtpm of its own: the same
    # tables, registers, response codes (a second Startup answers
    # TPM_RC_INITIALIZE) and device tree (no TPM node in either).
    shown, trees, draws = {}, {}, {}
    for kind in ("ch", "vmkit"):
        serial = tmp_path / f"{kind}-serial.txt"
        with Swtpm(tmp_path / f"{kind}-tpm") as tpm:
            process = VmmProcess(
                kind, tmp_path / f"{kind}.sock", tmp_path / f"{kind}.log",
                (
                    "--kernel", str(testguest.image_path("pvh")),
                    "--cmdline", testguest.cmdline(
                        ["tpm", "tpm", "ticks"], "poweroff", ticks=1000, tick_ms=20
                    ),
                    "--memory", "size=256M",
                    "--serial", f"file={serial}", "--console", "off",
                    "--tpm", f"socket={tpm.socket}",
                ),
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 30
                while "tick 0" not in (serial.read_text() if serial.exists() else ""):
                    assert time.monotonic() < deadline, process.log
                    time.sleep(0.02)
                status, out, err = ch_remote(process.socket_path, "info")
                assert status == 0, err
                trees[kind] = json.loads(out)["device_tree"]
            finally:
                process.stop()
        text = serial.read_text()
        shown[kind] = [line for line in text.splitlines() if TPM_LINE.match(line)]
        draws[kind] = random_bytes(text)
        shown[kind] = [RANDOM.sub("random", line) for line in shown[kind]]
    assert shown["vmkit"] == shown["ch"]
    assert "vmkit-guest: step tpm ok startup_rc=0x100 getrandom_rc=0x0 bytes=16 " in "\n".join(
        shown["vmkit"]
    )
    assert "vmkit-guest: tpm ready loc_state=0x82 loc_sts=0x1 ctrl_sts=0x0" in shown["vmkit"]
    assert trees["vmkit"] == trees["ch"]
    assert [len(d) for d in draws.values()] == [2, 2]
    assert len({d for pair in draws.values() for d in pair}) == 4


@pytest.mark.parametrize("absent", [True, False], ids=["no-file", "nobody-listens"])
def test_a_socket_nobody_listens_on_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, absent: bool
) -> None:
    path = tmp_path / "swtpm.sock"
    if not absent:
        unlistened_socket(path)
    cause = (
        "No such file or directory (os error 2)" if absent else "Connection refused (os error 111)"
    )
    message = (
        f"Error creating TPM device: --tpm socket={path}: cannot connect to swtpm's control "
        f"socket: {cause}"
    )
    gc.collect()  # earlier tests' VMs must not count
    fds, names = open_fds(), threads()
    config = VmConfig.from_cli(guest_args("pvh", path))
    with Vm(config) as vm, pytest.raises(VmError) as e:
        vm.boot()
    assert (e.value.kind, str(e.value)) == ("Device", message)
    del vm, e  # the traceback holds the Vm
    gc.collect()
    assert (open_fds(), threads()) == (fds, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if absent else ["swtpm.sock"])
    # The command: exit status 1 and the message, as Cloud Hypervisor's boot error.
    proc = subprocess.run(
        [sys.executable, "-m", "vmkit", *guest_args("pvh", path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (1, f"Error booting VM: {message}\n")
    if CH_DIR is not None:
        ch = subprocess.run(
            [ch_binary("cloud-hypervisor"), *guest_args("pvh", path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RUST_BACKTRACE": "0"},
        )
        assert ch.returncode == 1 and ch.stderr.startswith("Error booting VM: "), ch.stderr
        # v37 names the path only when the file is missing.
        assert "CreateTpmDevice" in ch.stderr
        assert (str(path) if absent else "ConnectionRefused") in ch.stderr, ch.stderr


def test_swtpm_that_was_not_initialised_is_refused_as_cloud_hypervisor_refuses_it(
    tmp_path: Path,
) -> None:
    # swtpm 0.7 started without --flags: v37 fails its CMD_GET_TPMESTABLISHED.
    with Swtpm(tmp_path / "tpm", flags=None) as tpm:
        config = VmConfig.from_cli(guest_args("pvh", tpm.socket))
        with Vm(config) as vm, pytest.raises(VmError) as e:
            vm.boot()
        assert str(e.value) == (
            f"Error creating TPM device: --tpm socket={tpm.socket}: CMD_GET_TPMESTABLISHED "
            "failed (start swtpm with --flags not-need-init or startup-clear, as Cloud "
            "Hypervisor needs): swtpm answered result 0xa"
        )
        if CH_DIR is not None:
            ch = subprocess.run(
                [ch_binary("cloud-hypervisor"), "--seccomp", "false",
                 *guest_args("pvh", tpm.socket)],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "RUST_BACKTRACE": "0"},
            )  # fmt: skip
            assert ch.returncode == 1 and "TPM not in established state" in ch.stderr


@pytest.fixture
def vmkit_errors() -> Iterator[list[str]]:
    """The messages of the VMM's error log records while the test runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("vmkit")
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    logs.sync_level()
    try:
        yield messages
    finally:
        logs.flush()
        logger.removeHandler(handler)
        logs.sync_level()


def test_swtpm_killed_mid_run_fails_the_guests_commands_and_the_vm_stays_controllable(
    swtpm: Swtpm,
    vmkit_errors: list[str],
    vmkit_vm: VmFactory,
) -> None:
    config = VmConfig.from_cli(
        guest_args("pvh", swtpm.socket, ("tpm", "ticks", "tpm", "ticks"), ticks=40, tick_ms=50)
    )
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for("step tpm ok", timeout=30)
    swtpm.kill()
    vm.serial.wait_for("step tpm fail", timeout=30)
    vm.pause()
    assert vm.info().state == "Paused"
    vm.resume()
    assert vm.info().state == "Running"
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    text = vm.serial.text
    vm.close()
    assert "vmkit-guest: tpm startup failed ctrl_sts=0x1 rsp_len=10 rc=0x101" in text
    assert (
        "vmkit-guest: step tpm fail startup: CRB_CTRL_STS.tpmSts set ctrl_sts=0x1 rc=0x101"
    ) in text
    logs.flush()
    assert any("swtpm closed the connection (has it exited?)" in m for m in vmkit_errors), (
        vmkit_errors
    )
    assert tpm_threads() == 0


def test_a_guest_reset_reconnects_and_the_tpm_starts_afresh(
    swtpm: Swtpm, vmkit_vm: VmFactory
) -> None:
    config = VmConfig.from_cli(guest_args("pvh", swtpm.socket))
    config.payload.cmdline = testguest.cmdline(["tpm"], "reset")  # type: ignore[union-attr]
    vm = vmkit_vm(config)
    vm.boot()
    deadline = time.monotonic() + 30
    while vm.serial.text.count("step tpm ok startup_rc=0x0 ") < 3:
        assert time.monotonic() < deadline, vm.serial.text
        time.sleep(0.02)
    vm.shutdown()
    vm.close()
    assert tpm_threads() == 0
    assert "step tpm fail" not in vm.serial.text


def test_a_vm_with_a_tpm_is_neither_snapshotted_nor_migrated(
    swtpm: Swtpm, tmp_path: Path, vmkit_vm: VmFactory
) -> None:
    config = VmConfig.from_cli(guest_args("pvh", swtpm.socket, ("tpm", "ticks"), ticks=500))
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for("step tpm ok", timeout=30)
    vm.pause()
    with pytest.raises(VmError) as e:
        vm.snapshot(snapshot)
    assert e.value.kind == "Unsupported"
    assert str(e.value) == (
        "A VM with a TPM (--tpm) cannot be snapshotted: its TPM's state lives in swtpm, "
        "which vmkit cannot carry along"
    )
    vm.resume()
    with pytest.raises(VmError) as e:
        vm.migrate_to(tmp_path / "nobody.sock")
    assert e.value.kind == "Unsupported" and "cannot be migrated" in str(e.value)
    assert vm.info().state == "Running"
    vm.close()
    assert list(snapshot.iterdir()) == []


def test_the_vmm_command_runs_the_tpm_under_its_seccomp_filters(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    # `vmkit` confines every thread (the TPM's worker, the vCPU that drives
    # the CRB, the VMM thread that reconnects after a reset): a call outside
    # a filter would kill it with SIGSYS.
    serial = tmp_path / "serial.txt"
    argv = guest_args("pvh", swtpm.socket)
    argv[argv.index("--cmdline") + 1] = testguest.cmdline(["tpm"], "reset")
    argv[argv.index("tty")] = f"file={serial}"
    process = subprocess.Popen(
        [sys.executable, "-m", "vmkit", *argv, "--seccomp", "true"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (serial.read_text() if serial.exists() else "").count("step tpm ok") < 2:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "seccomp" not in stderr, stderr


def test_a_spawned_vm_process_runs_the_tpm(swtpm: Swtpm, tmp_path: Path) -> None:
    # Vm.spawn's VM process (forked, confined as a whole) connects to swtpm
    # and runs the worker; closing it lets swtpm serve the next VM.
    serial = tmp_path / "serial.txt"
    args = guest_args("pvh", swtpm.socket)
    args[args.index("tty")] = f"file={serial}"
    for _ in range(2):
        serial.unlink(missing_ok=True)
        vm = Vm.spawn(VmConfig.from_cli(args))
        try:
            vm.boot()
            exit_info = vm.wait(30)
            assert exit_info is not None and exit_info.reason == "poweroff", exit_info
        finally:
            vm.close()
        assert "step tpm ok startup_rc=0x0 getrandom_rc=0x0 bytes=16" in serial.read_text()


def test_a_boot_that_fails_after_the_tpm_was_set_up_lets_swtpm_go(
    swtpm: Swtpm,
    tmp_path: Path,
    vmkit_vm: VmFactory,
) -> None:
    # The TPM is built before the disks: a missing image fails the boot
    # after swtpm was connected and initialised. Its thread and sockets go,
    # so swtpm (which serves one client at a time) takes the next VM.
    missing = tmp_path / "missing.img"
    gc.collect()
    fds, names = open_fds(), threads()
    config = VmConfig.from_cli([*guest_args("pvh", swtpm.socket), "--disk", f"path={missing}"])
    with Vm(config) as vm, pytest.raises(VmError) as e:
        vm.boot()
    assert str(missing) in str(e.value)
    del vm, e
    gc.collect()
    assert (open_fds(), threads()) == (fds, names)
    vm = vmkit_vm(VmConfig.from_cli(guest_args("pvh", swtpm.socket)))
    vm.boot()
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    assert "step tpm ok startup_rc=0x0 " in vm.serial.text
