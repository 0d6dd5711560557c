"""virtio-balloon: the guest gives memory back to the host and takes it again,
driven by ``vm.resize {"desired_balloon"}`` as in Cloud Hypervisor.

The guest's ``balloon`` step takes ``balloon_mib`` MiB and writes every page,
then follows the host's target: it inflates (page numbers on the inflate
queue), and when the target falls, deflates and writes the pages again. The
host watches the VMM process's resident memory fall and rise.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote
from _rss import settles
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

MIB = 1 << 20
POOL_MIB = 64
INFLATE_MIB = 48


def guest_config(
    serial: Path, image: testguest.Format = "pvh", balloon: str = "size=0", lax_len: bool = False
) -> VmConfig:
    return VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path(image)),
            "--cmdline", testguest.cmdline(
                ["balloon", "ticks"], "poweroff", balloon_mib=POOL_MIB, ticks=100, tick_ms=20,
                balloon_lax_len=int(lax_len),
            ),
            "--memory", "size=256M",
            "--serial", f"file={serial}", "--console", "off",
            "--balloon", balloon,
        ]
    )  # fmt: skip


def wait_for(serial: Path, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, serial.read_text() if serial.exists() else "", re.M):
        assert time.monotonic() < deadline, f"no {pattern!r} in {serial.read_text()[-1000:]!r}"
        time.sleep(0.01)


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_memory_goes_back_to_the_host_and_comes_back(
    tmp_path: Path, image: testguest.Format
) -> None:
    serial = tmp_path / "serial.txt"
    vm = Vm.spawn(guest_config(serial, image))
    try:
        vm.boot()
        wait_for(serial, r"balloon ready")
        full = settles(vm.pid, lambda mib: mib > POOL_MIB)
        assert vm.info().memory_actual_size == 256 * MIB
        vm.resize_balloon(INFLATE_MIB * MIB)
        wait_for(serial, rf"balloon actual={INFLATE_MIB * 256}$")
        emptied = settles(vm.pid, lambda mib: mib < full - INFLATE_MIB * 0.9)
        info = vm.info()
        assert info.memory_actual_size == (256 - INFLATE_MIB) * MIB, "RAM less the balloon"
        assert info.config.balloon is not None and info.config.balloon.size == INFLATE_MIB * MIB
        vm.resize_balloon(0)
        wait_for(serial, rf"(?s)balloon actual={INFLATE_MIB * 256}\n.*balloon actual=0$")
        settles(vm.pid, lambda mib: mib > emptied + INFLATE_MIB * 0.9)
        assert vm.info().memory_actual_size == 256 * MIB
        exit_info = vm.wait(60)
        assert exit_info is not None and exit_info.reason == "poweroff", exit_info
    finally:
        vm.close()
    assert f"step balloon ok pages={INFLATE_MIB * 256}" in serial.read_text()


def test_a_vm_booted_with_a_balloon_inflates_at_once(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    # --balloon size= is the first target; later boots keep what resize set.
    serial = tmp_path / "serial.txt"
    vm = vmkit_vm(guest_config(serial, balloon="size=16M,deflate_on_oom=on"))
    vm.boot()
    wait_for(serial, r"balloon actual=4096$")
    assert vm.info().memory_actual_size == 240 * MIB
    vm.resize_balloon(8 * MIB)
    wait_for(serial, r"balloon actual=2048$")
    assert vm.info().config.balloon.size == 8 * MIB  # type: ignore[union-attr]
    vm.resize_balloon(0)
    wait_for(serial, r"(?s)balloon actual=2048\n.*balloon actual=0$")
    vm.reboot()
    wait_for(serial, r"(?s)ready.*ready")
    assert vm.info().config.balloon.size == 0  # type: ignore[union-attr]


def test_resizing_without_a_balloon_is_cloud_hypervisors_error(
    tmp_path: Path, vmkit_vm: VmFactory
) -> None:
    config = guest_config(tmp_path / "serial.txt")
    config.balloon = None
    vm = vmkit_vm(config)
    with pytest.raises(VmError, match="VM is not running"):
        vm.resize_balloon(MIB)
    vm.boot()
    with pytest.raises(VmError, match=r"^Error from device manager: MissingVirtioBalloon$"):
        vm.resize_balloon(MIB)


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_the_same_guest_under_cloud_hypervisor(tmp_path: Path) -> None:
    # ch-remote resize --balloon against both VMMs: the guest inflates and
    # deflates alike, info reports the same sizes and device tree.
    seen = {}
    for kind in ("ch", "vmkit"):
        serial = tmp_path / f"{kind}-serial.txt"
        # v37 reports an inflate buffer's length as written (the spec says 0).
        config = guest_config(serial, lax_len=kind == "ch")
        process = VmmProcess(
            kind, tmp_path / f"{kind}.sock", tmp_path / f"{kind}.log",
            (
                "--kernel", str(config.payload.kernel),  # type: ignore[union-attr]
                "--cmdline", config.payload.cmdline,  # type: ignore[union-attr]
                "--memory", "size=256M",
                "--serial", f"file={serial}", "--console", "off",
                "--balloon", "size=0",
            ),
        )  # fmt: skip
        try:
            wait_for(serial, r"balloon ready")
            status, _, err = ch_remote(process.socket_path, "resize", "--balloon", "48M")
            assert status == 0, err
            wait_for(serial, rf"balloon actual={INFLATE_MIB * 256}$")
            status, out, err = ch_remote(process.socket_path, "info")
            assert status == 0, err
            info = json.loads(out)
            status, _, err = ch_remote(process.socket_path, "resize", "--balloon", "0")
            assert status == 0, err
            wait_for(serial, rf"(?s)balloon actual={INFLATE_MIB * 256}\n.*balloon actual=0$")
            assert process.wait(30) == 0, process.log
        finally:
            process.stop()
        seen[kind] = (
            info["memory_actual_size"],
            info["config"]["balloon"],
            info["device_tree"],
            [line for line in serial.read_text().splitlines() if "step balloon" in line],
        )
    assert seen["vmkit"] == seen["ch"]
    assert seen["vmkit"][0] == (256 - INFLATE_MIB) * MIB
    assert "__balloon" in seen["vmkit"][2]
