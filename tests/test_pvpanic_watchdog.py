"""pvpanic and virtio-watchdog, beside Cloud Hypervisor's own binary.

The test guest drives both devices (``pvpanic``: read the supported events,
report one; ``watchdog``: pet it, then stop). vmkit and the real Cloud Hypervisor
run the same command line side by side; what a user sees (the event monitor's
events, the device tree, where the guest finds the devices) must agree.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote
from _helpers import monitor_events
from vmkit import DeviceEvent, VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

needs_ch = pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
KINDS = ("ch", "vmkit")


def events(path: Path) -> list[str]:
    """``source event key=value ...`` for each event of an event-monitor file,
    leaving out ``cpu_manager`` events (v37's CLI boot does not report them)."""
    return [
        " ".join(
            [e["source"], e["event"], *(f"{k}={v}" for k, v in (e["properties"] or {}).items())]
        )
        for e in monitor_events(path)
        if e["source"] != "cpu_manager"
    ]


class Side:
    """One VMM (``ch`` or ``vmkit``) booting the test guest with ``options``."""

    def __init__(self, kind: str, tmp_path: Path, cmdline: str, options: list[str]) -> None:
        self.serial = tmp_path / f"{kind}-serial.txt"
        self.events = tmp_path / f"{kind}-events.json"
        self.socket = tmp_path / f"{kind}-api.sock"
        self.disk = tmp_path / f"{kind}-disk.img"
        self.disk.write_bytes(bytes(1 << 20))
        argv = [
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", cmdline,
            "--memory", "size=256M",
            "--serial", f"file={self.serial}",
            "--console", "off",
            "--disk", f"path={self.disk}",
            "--event-monitor", f"path={self.events}",
            *options,
        ]  # fmt: skip
        self.process = VmmProcess(kind, self.socket, tmp_path / f"{kind}.log", tuple(argv))

    def text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Waits for ``pattern`` on the serial port; returns when it was seen."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text(), re.M):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text()[-2000:]!r}"
            assert self.process.proc.poll() is None, self.process.log
            time.sleep(0.05)
        return time.monotonic()


def side_events(side: Side) -> list[str]:
    """The events so far (a file being written may end mid-event)."""
    try:
        return events(side.events)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def run_side_by_side(
    tmp_path: Path, cmdline: str, options: list[str], kinds: tuple[str, ...] = KINDS
) -> dict[str, Side]:
    sides: dict[str, Side] = {}
    try:
        for kind in kinds:
            sides[kind] = Side(kind, tmp_path, cmdline, options)
    except BaseException:
        for side in sides.values():
            side.process.stop()
        raise
    return sides


@needs_ch
@pytest.mark.parametrize(
    ("value", "event"), [(1, "panic"), (2, "crash_loaded"), (4, "unknown_event")]
)
def test_a_guest_panic_is_reported_as_cloud_hypervisor_reports_it(
    tmp_path: Path, value: int, event: str
) -> None:
    cmdline = testguest.cmdline(["pvpanic"], "poweroff", pvpanic_event=value)
    sides = run_side_by_side(tmp_path, cmdline, ["--pvpanic"])
    try:
        for side in sides.values():
            assert side.process.wait(30) == 0, side.process.log
    finally:
        for side in sides.values():
            side.process.stop()
    ch, vmkit = (events(sides[kind].events) for kind in KINDS)
    assert f"guest panic event={event}" in vmkit
    # Up to the VM's end: v37 sometimes exits before writing its last events.
    shutdown = vmkit.index("vm shutdown") + 1
    assert vmkit[:shutdown] == ch[:shutdown]
    assert vmkit[shutdown:] == ["vm deleted", "vmm shutdown"]
    for side in sides.values():
        assert re.search(
            rf"step pvpanic ok bdf=0000:00:0\d\.0 supported=0x3 event={value:#x}$",
            side.text(),
            re.M,
        ), side.text()


@needs_ch
def test_devices_sit_where_cloud_hypervisor_puts_them(tmp_path: Path) -> None:
    cmdline = testguest.cmdline(["pci", "ticks"], "poweroff", ticks=2000, tick_ms=20)
    sides = run_side_by_side(tmp_path, cmdline, ["--pvpanic", "--watchdog"])
    try:
        infos: dict[str, dict[str, Any]] = {}
        layouts: dict[str, list[str]] = {}
        for kind, side in sides.items():
            side.wait_for(r"step pci ok", 30)
            status, out, err = ch_remote(side.socket, "info")
            assert status == 0, err
            infos[kind] = json.loads(out)
            layouts[kind] = re.findall(r"^vmkit-guest: (pci dev .*)$", side.text(), re.M)
    finally:
        for side in sides.values():
            side.process.stop()
    assert layouts["vmkit"] == layouts["ch"]
    assert any("vendor=0x1b36 device=0x0011 class=0x088000" in line for line in layouts["vmkit"])
    assert any("vendor=0x1af4 device=0x1063" in line for line in layouts["vmkit"])
    assert infos["vmkit"]["device_tree"] == infos["ch"]["device_tree"]
    tree = infos["vmkit"]["device_tree"]
    assert tree["__pvpanic"]["resources"][0]["PciBar"]["size"] == 2
    assert tree["__watchdog"]["parent"] == "_virtio-pci-__watchdog"
    for kind in KINDS:
        assert (infos[kind]["config"]["pvpanic"], infos[kind]["config"]["watchdog"]) == (
            True,
            True,
        )


@needs_ch
def test_a_guest_reset_is_reported_as_cloud_hypervisor_reports_it(tmp_path: Path) -> None:
    # The guest resets at once, every boot: compare the first three boots.
    sides = run_side_by_side(tmp_path, testguest.cmdline(["hello"], "reset"), [])
    try:
        for side in sides.values():
            deadline = time.monotonic() + 30
            # (Cloud Hypervisor's serial file starts again at each boot.)
            while side_events(side).count("vm booted") < 3:
                assert time.monotonic() < deadline, side_events(side)
                time.sleep(0.05)
    finally:
        for side in sides.values():
            side.process.stop()
    ch, vmkit = (events(sides[kind].events)[:9] for kind in KINDS)
    assert vmkit == ch
    assert vmkit[3:9] == ["vm shutdown", "vm booting", "vm booted"] * 2


@needs_ch
def test_the_watchdog_resets_a_guest_that_stops_petting(tmp_path: Path) -> None:
    # Two pets 200 ms apart, then the guest halts: Cloud Hypervisor checks
    # every 15 s and resets once the last pet is over 20 s old, 30 s after
    # the first pet. Both VMMs run at once, so the test waits that long once.
    cmdline = testguest.cmdline(["watchdog"], "halt", watchdog_pets=2, watchdog_pet_ms=200)
    sides = run_side_by_side(tmp_path, cmdline, ["--watchdog"])
    try:
        petted = {kind: side.wait_for(r"step watchdog ok", 30) for kind, side in sides.items()}
        reset = {}
        for kind, side in sides.items():
            # (Cloud Hypervisor's serial file starts again at each boot.)
            deadline = time.monotonic() + 60
            while side_events(side).count("vm booted") < 2:
                assert time.monotonic() < deadline, side_events(side)
                assert side.process.proc.poll() is None, side.process.log
                time.sleep(0.05)
            reset[kind] = time.monotonic()
    finally:
        for side in sides.values():
            side.process.stop()
    for kind in KINDS:
        waited = reset[kind] - petted[kind]
        assert 25 < waited < 40, f"{kind}: reset {waited:.1f} s after the last pet"
    ch, vmkit = (events(sides[kind].events) for kind in KINDS)
    second_boot = ch.index("vm booted", ch.index("vm booted") + 1) + 1
    assert vmkit[:second_boot] == ch[:second_boot]
    assert "virtio-device activated id=__watchdog" in vmkit[:second_boot]


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_in_process_vms_report_the_panic_and_pets_from_both_boot_formats(
    tmp_path: Path,
    image: testguest.Format,
    vmkit_vm: VmFactory,
) -> None:
    config = VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path(image)),
            "--cmdline", testguest.cmdline(
                ["pvpanic", "watchdog"], "poweroff", pvpanic_event=2, watchdog_pets=2,
                watchdog_pet_ms=10
            ),
            "--memory", "size=128M",
            "--serial", "tty", "--console", "off",
            "--pvpanic", "--watchdog",
        ]
    )  # fmt: skip
    vm = vmkit_vm(config)
    vm.boot()
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff"
    assert "summary passed=2 failed=0" in vm.serial.text, vm.serial.text
    found, next_index = vm.device_events()
    assert found == [
        DeviceEvent("guest", "panic", {"event": "crash_loaded"}),
        DeviceEvent("virtio-device", "activated", {"id": "__watchdog"}),
    ]
    assert vm.device_events(next_index) == ([], next_index)


def test_a_snapshot_keeps_both_devices(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    # Paused while the guest pets, snapshotted, restored: the restored VM
    # has both devices where they were, and its guest pets on to the end.
    cmdline = testguest.cmdline(
        ["pvpanic", "watchdog", "pvpanic"], "poweroff", watchdog_pets=20, watchdog_pet_ms=50
    )
    config = VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", cmdline,
            "--memory", "size=128M",
            "--serial", "tty", "--console", "off",
            "--pvpanic", "--watchdog",
        ]
    )  # fmt: skip
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for(r"watchdog pet 3", timeout=30)
    vm.pause()
    tree = vm.info().to_dict()["device_tree"]
    vm.snapshot(snapshot)
    vm.shutdown()
    vm.close()
    with Vm.restore(snapshot) as restored:
        assert restored.info().to_dict()["device_tree"] == tree
        restored.resume()
        exit_info = restored.wait(60)
        assert exit_info is not None and exit_info.reason == "poweroff", exit_info
        assert re.search(r"step watchdog ok pets=20", restored.serial.text), restored.serial.text
        assert "step pvpanic ok" in restored.serial.text
        found, _ = restored.device_events()
        assert DeviceEvent("guest", "panic", {"event": "panic"}) in found


def test_the_watchdog_resets_a_bzimage_guest_too(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    # The other boot format: pets, then silence, then the reset (a second
    # boot, reported as v37 reports a guest reset), in process.
    config = VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path("bzimage")),
            "--cmdline", testguest.cmdline(
                ["watchdog"], "halt", watchdog_pets=2, watchdog_pet_ms=200
            ),
            "--memory", "size=128M",
            "--serial", "tty", "--console", "off",
            "--watchdog",
        ]
    )  # fmt: skip
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for(r"step watchdog ok pets=2", timeout=30)
    petted = time.monotonic()
    deadline = petted + 60
    while vm.serial.text.count("boot protocol=linux64") < 2:
        assert time.monotonic() < deadline, vm.serial.text[-1000:]
        time.sleep(0.05)
    waited = time.monotonic() - petted
    assert 25 < waited < 40, f"reset {waited:.1f} s after the last pet"
    found, _ = vm.device_events()
    assert [e.event for e in found if e.source == "vm"] == ["shutdown", "booting", "booted"]
