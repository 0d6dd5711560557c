"""ACPI memory hot-plug of a running VM (``--memory hotplug_size=``,
``vm.resize {"desired_ram"}``), as Cloud Hypervisor v37 does it: a DIMM in
the hot-plug area after boot RAM, announced through the memory hot-plug
controller and a GED interrupt; v37's errors and its ``info`` answers, side
by side with the real cloud-hypervisor.

The AML is checked in test_acpi_tables.py, the controller's registers in the
Rust unit tests (devices::memory_hotplug).
"""

from __future__ import annotations

import json
import re
import socket as socketlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote, wait_for_line
from _helpers import restore_refused
from _http import read_reply, request
from _rss import resident_mib, settles
from vmkit import VmConfig, testguest
from vmkit.client import ApiError
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

MIB = 1 << 20
GIB = 1 << 30


def put(socket: Path, endpoint: str, body: dict[str, object]) -> tuple[int, str]:
    """A raw HTTP PUT to the API socket: (status, body)."""
    data = json.dumps(body).encode()
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket))
        sock.sendall(
            f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        reply = read_reply(sock)
    return reply.status, reply.text.strip()


def guest_args(
    memory: str, steps: tuple[str, ...] = (), image: str = "pvh", serial: str = "tty"
) -> list[str]:
    # Ticks for far longer than a test after its steps: the guest runs throughout.
    return [
        "--kernel", str(testguest.image_path(image)),  # type: ignore[arg-type]
        "--cmdline", testguest.cmdline([*steps, "ticks"], "poweroff", ticks=100000, tick_ms=20),
        "--memory", memory,
        "--serial", serial, "--console", "off",
    ]  # fmt: skip


@pytest.mark.parametrize("image", ["pvh", "elf"])
def test_the_guest_uses_hot_added_memory(image: str) -> None:
    # The test guest runs no AML: after the GED interrupt it reads the
    # controller's registers as MSCN and MCRS would, then writes and checks
    # a pattern over the new RAM.
    config = VmConfig.from_cli(guest_args("size=64M,hotplug_size=1G", ("memhotplug",), image))
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30)
        vm.resize_memory(320 * MIB)
        assert vm.serial.wait_for("^vmkit-guest: step memhotplug ", timeout=60), vm.serial.text
        text = vm.serial.text
        # Cloud Hypervisor's place for the first DIMM of a VM whose RAM ends
        # below the 32-bit hole: 4 GiB.
        assert "memhotplug inserted slot=0 base=0x100000000 size=0x10000000" in text, text
        assert re.search(r"step memhotplug ok event=0x2 slots=1 bytes=0x10000000 tested=\d+", text)
        info = vm.info()
        assert info.config.memory.size == 320 * MIB
        assert info.memory_actual_size == 320 * MIB
        assert vm.serial.wait_for("^vmkit-guest: tick 2$", timeout=30), vm.serial.text
        assert vm.state == "Running"


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_same_guest_code_hot_adds_memory_on_vmkit_and_cloud_hypervisor(
    kind: str, tmp_path: Path
) -> None:
    # The guest finds the GED and the controller through the DSDT (the two
    # VMMs place them differently): the same DIMM at the same address, the
    # same registers, driven by the real ch-remote.
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    serial = tmp_path / "serial"
    args = guest_args("size=64M,hotplug_size=1G", ("memhotplug",), serial=f"file={serial}")
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=tuple(args))

    try:
        wait_for_line(serial, "^vmkit-guest: memhotplug waiting$", vmm, timeout=60)
        assert ch_remote(vmm.socket_path, "resize", "--memory", "320M")[0] == 0, vmm.log
        text = wait_for_line(serial, "^vmkit-guest: step memhotplug ", vmm, timeout=60)
        assert "memhotplug inserted slot=0 base=0x100000000 size=0x10000000" in text, text
        assert re.search(r"step memhotplug ok event=0x2 slots=1 bytes=0x10000000 ", text), text
    finally:
        vmm.stop()


@contextmanager
def resident_growth(pid: int, at_least: float | None) -> Iterator[None]:
    """What the block does grows the process's resident memory by ``at_least``
    MiB, or (None) by less than 32 MiB."""
    before = resident_mib(pid)
    yield
    if at_least is not None:
        settles(pid, lambda mib: mib - before >= at_least)
    else:
        time.sleep(0.5)
        assert resident_mib(pid) - before < 32


@pytest.mark.parametrize("prefault", ["on", "off"])
@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_prefault_allocates_a_hot_added_dimm_as_cloud_hypervisor_does(
    kind: str, prefault: str, tmp_path: Path
) -> None:
    # v37 maps each DIMM with MAP_POPULATE under prefault=on: its 128 MiB are
    # the VMM's at once, though the guest (ticking) never touches them.
    if kind == "ch" and CH_DIR is None:
        pytest.skip(CH_MISSING)
    args = guest_args(f"size=64M,hotplug_size=512M,prefault={prefault}", serial="null")
    vmm = VmmProcess(kind, tmp_path / "api.sock", tmp_path / "log", extra=tuple(args))
    try:
        vmm.wait_running()
        with resident_growth(vmm.proc.pid, 128 if prefault == "on" else None):
            desired = {"desired_ram": 192 * MIB}
            assert put(vmm.socket_path, "vm.resize", desired) == (204, ""), vmm.log
    finally:
        vmm.stop()


@pytest.mark.parametrize("prefault", [True, False])
@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_a_restore_with_prefault_takes_the_hot_added_dimms_too(
    kind: str, prefault: bool, tmp_path: Path
) -> None:
    # A 64 MiB VM with a 128 MiB DIMM the guest never touched, snapshotted
    # and restored in a fresh VMM: prefault takes all of its memory at once,
    # as v37's restore does (v37 takes it all without prefault too).
    if kind == "ch" and CH_DIR is None:
        pytest.skip(CH_MISSING)
    snap = tmp_path / "snap"
    snap.mkdir()
    args = guest_args("size=64M,hotplug_size=512M", serial="null")
    vmm = VmmProcess(kind, tmp_path / "a.sock", tmp_path / "a.log", extra=tuple(args))
    try:
        vmm.wait_running()
        assert put(vmm.socket_path, "vm.resize", {"desired_ram": 192 * MIB}) == (204, ""), vmm.log
        assert request(str(vmm.socket_path), "PUT", "vm.pause").status == 204, vmm.log
        url = {"destination_url": f"file://{snap}"}
        assert put(vmm.socket_path, "vm.snapshot", url) == (204, ""), vmm.log
    finally:
        vmm.stop()
    vmm = VmmProcess(kind, tmp_path / "b.sock", tmp_path / "b.log")
    try:
        with resident_growth(vmm.proc.pid, 180 if prefault or kind == "ch" else None):
            restore = {"source_url": f"file://{snap}", "prefault": prefault}
            assert put(vmm.socket_path, "vm.restore", restore) == (204, ""), vmm.log
    finally:
        vmm.stop()


def test_resizes_and_errors_through_vmkit_vm() -> None:
    config = VmConfig.from_cli(guest_args("size=512M,hotplug_size=1G"))
    with Vm(config) as vm:
        with pytest.raises(VmError, match="not running"):
            vm.resize_memory(GIB)
        vm.boot()
        seen = []
        for size in (768, 640, 700, 2048, 1536, 1408, 1664, 1024):
            try:
                vm.resize_memory(size * MIB)
                said = ""
            except VmError as e:
                said = str(e)
            info = vm.info()
            seen.append(
                (size, said, info.config.memory.size // MIB, info.memory_actual_size // MIB)
            )
        # What the real v37 binary answers for the same sequence (see
        # test_ch_remote_resize_answers_as_cloud_hypervisor).
        insufficient = "Memory manager error: InsufficientHotplugRam"
        assert seen == [
            (768, "", 768, 768),
            (640, "", 640, 640),  # ACPI RAM never shrinks; the size does
            (700, "", 700, 700),  # below what the guest has: nothing to add
            (2048, insufficient, 700, 700),
            (1536, insufficient, 700, 700),  # would fill the area to its last byte
            (1408, "", 1408, 1408),
            (1664, insufficient, 1408, 1408),
            (1024, "", 1024, 1024),
        ]
        with pytest.raises(ValueError, match="size=-1"):
            vm.resize_memory(-1)


# (desired_ram in MiB, HTTP status, body) for a 512M VM with hotplug_size=2G,
# a 512M VM without, in that order; bodies as v37 writes them.
HTTP_SCRIPT = {
    "size=512M,hotplug_size=2G": [
        (600, 500, "Memory manager error: InvalidSize"),
        *((512 + 128 * i, 204, "") for i in range(1, 9)),
        (1664, 500, "Memory manager error: NoSlotAvailable"),
    ],
    "size=512M": [
        (1024, 500, "Memory manager error: InsufficientHotplugRam"),
        (256, 204, ""),
    ],
}


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_http_api_answers_as_cloud_hypervisor(kind: str, tmp_path: Path) -> None:
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    for index, (memory, script) in enumerate(HTTP_SCRIPT.items()):
        socket = tmp_path / f"api{index}.sock"
        args = tuple(guest_args(memory, serial=f"file={tmp_path / f'serial{index}'}"))
        vmm = VmmProcess(kind, socket, tmp_path / f"log{index}", extra=args)
        try:
            vmm.wait_running()
            seen = []
            for size, *_ in script:
                status, text = put(socket, "vm.resize", {"desired_ram": size * MIB})
                seen.append((size, status, text))
            assert seen == script, vmm.log
            # The last size taken is the config's.
            last_taken = [size for size, status, _ in script if status == 204][-1]
            _, info, _ = ch_remote(socket, "info")
            assert json.loads(info)["config"]["memory"]["size"] == last_taken * MIB
        finally:
            vmm.stop()


# (ch-remote arguments, exit status, what stderr says, memory.size and
# memory_actual_size in MiB after)
CH_REMOTE_SCRIPT = [
    ("resize --memory 768M", 0, "", 768),
    ("resize --memory 700M", 0, "", 700),
    ("resize --memory 2G", 1, "InsufficientHotplugRam", 700),
    ("resize --memory 1408M", 0, "", 1408),
]


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_ch_remote_resize_answers_as_cloud_hypervisor(kind: str, tmp_path: Path) -> None:
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    socket = tmp_path / "api.sock"
    args = tuple(guest_args("size=512M,hotplug_size=1G", serial=f"file={tmp_path / 'serial'}"))
    vmm = VmmProcess(kind, socket, tmp_path / "log", extra=args)
    try:
        vmm.wait_running()
        seen = []
        for command, *_ in CH_REMOTE_SCRIPT:
            status, _, stderr = ch_remote(socket, *command.split())
            info_status, info, _ = ch_remote(socket, "info")
            assert info_status == 0, vmm.log
            parsed = json.loads(info)
            size = parsed["config"]["memory"]["size"] // MIB
            assert parsed["memory_actual_size"] // MIB == size
            assert parsed["config"]["memory"]["hotplugged_size"] is None
            said = next((s for _, _, s, _ in CH_REMOTE_SCRIPT if s and s in stderr), "")
            seen.append((command, status, said, size))
        assert seen == CH_REMOTE_SCRIPT, vmm.log
    finally:
        vmm.stop()


@pytest.mark.parametrize(
    ("memory", "reason"),
    [
        ("size=512M,hotplug_size=1G,hotplugged_size=256M", "with hotplug method 'acpi'"),
        ("size=512M,hotplugged_size=256M", "no 'hotplug_size'"),
    ],
)
def test_hotplugged_size_is_refused_with_acpi_as_v37_refuses_it(memory: str, reason: str) -> None:
    # v37: "Error booting VM: VmBoot(MemoryManager(InvalidMemoryParameters))",
    # logging the reason; hotplugged_size is virtio-mem's.
    config = VmConfig.from_cli(guest_args(memory))
    with Vm(config) as vm, pytest.raises(VmError) as raised:
        vm.boot()
    assert "InvalidMemoryParameters" in str(raised.value)
    assert reason in str(raised.value)


def test_a_hostile_guest_cannot_hurt_the_controller() -> None:
    config = VmConfig.from_cli(
        guest_args("size=64M,hotplug_size=512M", ("memhpgarbage", "memhotplug"))
    )
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30), vm.serial.text
        assert "step memhpgarbage ok slot0_status=0x0" in vm.serial.text, vm.serial.text
        # The controller still works after the garbage.
        vm.resize_memory(192 * MIB)
        assert vm.serial.wait_for("^vmkit-guest: step memhotplug ", timeout=60), vm.serial.text
        assert "step memhotplug ok event=0x2 slots=1 bytes=0x8000000" in vm.serial.text
        assert vm.state == "Running"


def test_a_snapshot_before_any_hot_add_keeps_the_area(tmp_path: Path) -> None:
    # Nothing plugged yet: the snapshot carries boot RAM, and the restored VM
    # has the same hot-plug area and controller, so a hot-add works there.
    config = VmConfig.from_cli(guest_args("size=64M,hotplug_size=512M", ("memhotplug",)))
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30)
        vm.pause()
        (tmp_path / "snap").mkdir()
        vm.snapshot(tmp_path / "snap")
    with Vm.restore(tmp_path / "snap") as restored:
        restored.resume()
        restored.resize_memory(320 * MIB)
        assert restored.serial.wait_for("^vmkit-guest: step memhotplug ", timeout=60)
        text = restored.serial.text
        assert "step memhotplug ok event=0x2 slots=1 bytes=0x10000000" in text, text
        assert restored.info().memory_actual_size == 320 * MIB


def test_migration_before_any_hot_add_keeps_the_area(tmp_path: Path) -> None:
    from test_migration import migrate

    config = VmConfig.from_cli(guest_args("size=64M,hotplug_size=512M", ("memhotplug",)))
    with Vm(config) as sender:
        sender.boot()
        assert sender.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30)
        _, received = migrate(sender, tmp_path / "m.sock")
    with received as moved:
        moved.resize_memory(192 * MIB)
        assert moved.serial.wait_for("^vmkit-guest: step memhotplug ", timeout=60)
        assert "step memhotplug ok event=0x2 slots=1 bytes=0x8000000" in moved.serial.text


def grown(memory: str = "size=64M,hotplug_size=1G") -> Vm:
    """A VM whose guest hot-added a 256 MiB DIMM (slot 0, at 4 GiB) and wrote
    its pattern there, then waits for the next one (a second `memhotplug`,
    which first checks that the first DIMM kept its pattern)."""
    vm = Vm(VmConfig.from_cli(guest_args(memory, ("memhotplug", "memhotplug"))))
    vm.boot()
    assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30), vm.serial.text
    vm.resize_memory(320 * MIB)
    assert vm.serial.wait_for("^vmkit-guest: step memhotplug ok ", timeout=60), vm.serial.text
    assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30), vm.serial.text
    return vm


def grows_on(vm: Vm) -> None:
    """In a VM that came from `grown`'s: its size is the resized one; the
    guest finds its first DIMM's pattern intact and uses a second DIMM."""
    info = vm.info()
    assert info.config.memory.size == 320 * MIB
    assert info.memory_actual_size == 320 * MIB
    vm.resize_memory(448 * MIB)
    assert vm.serial.wait_for("^vmkit-guest: step memhotplug ", timeout=60), vm.serial.text
    text = vm.serial.text
    # The second DIMM follows the first, in the next slot.
    assert "memhotplug inserted slot=1 base=0x110000000 size=0x8000000" in text, text
    assert re.search(r"step memhotplug ok event=0x2 slots=1 bytes=0x8000000 tested=\d+ "
                     r"kept=0x10000000$", text, re.M), text  # fmt: skip
    assert vm.info().memory_actual_size == 448 * MIB


@pytest.mark.parametrize("shared", ["off", "on"])
def test_a_snapshot_carries_hot_added_dimms(tmp_path: Path, shared: str) -> None:
    # Private memory comes back copy-on-write from the file and the DIMMs
    # copied in; shared memory (memfds) is made afresh and all copied in.
    snap = tmp_path / "snap"
    snap.mkdir()
    with grown(f"size=64M,hotplug_size=1G,shared={shared}") as vm:
        vm.pause()
        vm.snapshot(snap)
    # Boot RAM, then the DIMM; only what the guest wrote takes disk space.
    memory = snap / "memory"
    assert memory.stat().st_size == 320 * MIB
    assert memory.stat().st_blocks * 512 < 64 * MIB
    with Vm.restore(snap) as restored:
        restored.resume()
        grows_on(restored)
        # A reboot starts the resized RAM, as the original's would.
        restored.reboot()
        assert restored.serial.wait_for("boot protocol=pvh", timeout=30)
        info = restored.info()
        assert info.config.memory.size == 448 * MIB
        assert info.memory_actual_size == 448 * MIB
        assert restored.state == "Running"


@pytest.mark.parametrize("local", [False, True])
def test_a_migration_carries_hot_added_dimms(tmp_path: Path, local: bool) -> None:
    from test_migration import migrate

    # A local migration hands the memory files over: shared memory.
    with grown("size=64M,hotplug_size=1G,shared=on" if local else "size=64M,hotplug_size=1G") as vm:
        report, received = migrate(vm, tmp_path / "m.sock", local=local)
        assert report.local == local
        if not local:
            assert report.bytes >= 256 * MIB * 0.9, "the DIMM's pattern went over"
    with received as moved:
        grows_on(moved)


def test_pages_the_guest_writes_in_a_dimm_during_a_migration_arrive(tmp_path: Path) -> None:
    # The guest rewrites 16 MiB of its DIMM every 5 ms, checking the last
    # round each time: a dirty page of the DIMM's KVM slot left behind fails it.
    # The migration takes 0.7-0.9 s here: the rounds last well beyond it.
    from test_migration import migrate, rounds_seen

    rounds = 600
    args = guest_args("size=64M,hotplug_size=1G", ("memhotplug", "dirty"))
    args[3] = testguest.cmdline(
        ["memhotplug", "dirty"], "poweroff", dirty_dimm=1, dirty_mib=16, dirty_rounds=rounds,
        dirty_ms=5,
    )  # fmt: skip
    with Vm(VmConfig.from_cli(args)) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: memhotplug waiting$", timeout=30)
        vm.resize_memory(320 * MIB)
        assert vm.serial.wait_for("^vmkit-guest: dirty round 10$", timeout=60), vm.serial.text
        report, received = migrate(vm, tmp_path / "m.sock")
        assert report.rounds >= 2, report
        before = vm.serial.text
    with received as moved:
        exit_info = moved.wait(timeout=60)
        assert exit_info is not None and exit_info.reason == "poweroff", moved.serial.text
        after = moved.serial.text
        assert "vmkit-guest: summary passed=2 failed=0" in after, after
        assert rounds_seen(before + after) == list(range(rounds))


def hot_plug_state(snap: Path) -> tuple[bytearray, int]:
    """The `platform` file and where its memory hot-plug state starts (the
    last blob: size, selection, 8 slots of base, length, flags)."""
    platform = bytearray((snap / "platform").read_bytes())
    return platform, len(platform) - (8 + 4 + 4 + 8 * 20)


@pytest.mark.parametrize(
    ("slot", "base", "says"),
    [
        (0, 8 * GIB, "slot 0: the DIMM at 0x200000000 (0x10000000 bytes) lies outside the"),
        (1, 4 * GIB + 128 * MIB, "slot 1: the DIMM at 0x108000000 overlaps slot 0's at"),
    ],
)  # fmt: skip
def test_a_hostile_hot_plug_state_is_refused(
    tmp_path: Path, slot: int, base: int, says: str
) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    with grown() as vm:
        vm.resize_memory(448 * MIB)
        assert vm.serial.wait_for("kept=0x10000000$", timeout=60), vm.serial.text
        vm.pause()
        vm.snapshot(snap)
    platform, at = hot_plug_state(snap)
    slot_at = at + 16 + 20 * slot
    was = int.from_bytes(platform[slot_at : slot_at + 8], "little")
    assert was == [4 * GIB, 4 * GIB + 256 * MIB][slot], "not the DIMM's base"
    platform[slot_at : slot_at + 8] = base.to_bytes(8, "little")
    (snap / "platform").write_bytes(platform)
    error = restore_refused(snap)
    assert str(error).startswith(f"the memory hot-plug state: {says}"), error


def test_a_reboot_starts_the_resized_ram() -> None:
    config = VmConfig.from_cli(guest_args("size=64M,hotplug_size=512M"))
    with Vm(config) as vm:
        vm.boot()
        vm.resize_memory(192 * MIB)
        vm.reboot()
        assert vm.serial.wait_for("boot protocol=pvh", timeout=30)
        info = vm.info()
        # As v37: the next boot's RAM is the resized size, the hot-plug area after it.
        assert info.config.memory.size == 192 * MIB
        assert info.memory_actual_size == 192 * MIB
        assert vm.state == "Running"


def test_a_spawned_vm_grows_through_its_client() -> None:
    config = VmConfig.from_cli(guest_args("size=64M,hotplug_size=512M", ("memhotplug",)))
    with Vm.spawn(config) as vm:
        vm.boot()
        vm.resize_memory("192M")
        info = vm.info()
        assert info.config.memory.size == 192 * MIB
        assert info.memory_actual_size == 192 * MIB
        with pytest.raises(ApiError, match="Memory manager error: InvalidSize"):
            vm.resize_memory("200M")
