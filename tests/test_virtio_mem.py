"""virtio-mem (``hotplug_method=virtio-mem``, ``--memory-zone
...,hotplug_size=``) as Cloud Hypervisor v37 does it: a virtio-mem device per
zone, named as the zone; ``vm.resize {"desired_ram"}`` and ``vm.resize-zone``
set its requested size; the test guest plugs, uses and unplugs the blocks;
``info`` reports ``hotplugged_size`` and ``memory_actual_size`` as v37 does;
v37's errors, side by side with the real binaries.

The device's request handling (hostile requests included) is checked in the
Rust unit tests (virtio::mem), the region's placement in memory::tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_binary, ch_remote
from _helpers import restore_refused
from _http import request
from _rss import resident_mib, settles
from vmkit import VmConfig, testguest
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

MIB = 1 << 20


def guest_args(
    memory: list[str], steps: list[str], serial: str = "tty", image: str = "pvh", **options: int
) -> list[str]:
    return [
        "--kernel", str(testguest.image_path(image)),  # type: ignore[arg-type]
        "--cmdline", testguest.cmdline(steps, "poweroff", **options),
        "--cpus", "boot=1",
        *memory,
        "--serial", serial, "--console", "off",
    ]  # fmt: skip


def wait_for(serial: Path, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, serial.read_text() if serial.exists() else "", re.M):
        assert time.monotonic() < deadline, f"no {pattern!r} in {serial.read_text()[-1000:]!r}"
        time.sleep(0.01)


def ticking(memory: list[str], serial: str = "tty") -> list[str]:
    return guest_args(memory, ["ticks"], serial, ticks=100000, tick_ms=20)


DEFAULT_ZONE = ["--memory", "size=64M,hotplug_method=virtio-mem,hotplug_size=256M"]
ZONES = [
    "--memory", "size=0,hotplug_method=virtio-mem",
    "--memory-zone", "id=z0,size=64M,hotplug_size=256M,hotplugged_size=64M",
    "id=z1,size=32M,hotplug_size=128M",
]  # fmt: skip


@pytest.mark.parametrize("image", ["pvh", "elf"])
def test_the_guest_plugs_uses_and_returns_memory(image: str) -> None:
    memory = ["--memory", "size=64M,hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=4M"]
    with Vm(VmConfig.from_cli(guest_args(memory, ["virtiomem"], image=image))) as vm:
        vm.boot()
        # Plugged at boot, as hotplugged_size asks.
        assert vm.serial.wait_for("^vmkit-guest: virtiomem waiting requested=0x400000$", timeout=30)
        text = vm.serial.text
        # Where v37 puts the region: past RAM below the hole, at 4 GiB.
        assert (
            "vmkit-guest: virtiomem dev addr=0x100000000 region_size=0x8000000 "
            "block_size=0x200000 usable=0x8000000 plugged=0x0 requested=0x400000"
        ) in text, text
        assert "vmkit-guest: virtiomem plugged=0x400000 requested=0x400000 verified=1" in text
        info = vm.info()
        assert info.memory_actual_size == 68 * MIB
        assert info.config.memory.hotplugged_size == 4 * MIB
        # More: a config interrupt, and the guest plugs the rest.
        vm.resize_memory(80 * MIB)
        assert vm.serial.wait_for(
            "^vmkit-guest: virtiomem waiting requested=0x1000000$", timeout=30
        )
        text = vm.serial.text
        assert "vmkit-guest: virtiomem config interrupt requested=0x1000000" in text
        assert "vmkit-guest: virtiomem plugged=0x1000000 requested=0x1000000 verified=1" in text
        assert vm.info().memory_actual_size == 80 * MIB
        # Back to boot RAM: the guest unplugs everything and the step ends.
        vm.resize_memory(64 * MIB)
        assert vm.serial.wait_for("^vmkit-guest: step virtiomem ", timeout=30)
        results = testguest.parse_results(vm.serial.text)
        assert results.ok("virtiomem"), vm.serial.text
        assert results.values("virtiomem") == {"plugged_max": str(16 * MIB), "interrupts": "2"}
        assert "vmkit-guest: virtiomem plugged=0x0 requested=0x0 verified=1" in vm.serial.text
        info = vm.info()
        assert info.memory_actual_size == 64 * MIB
        assert info.config.memory.hotplugged_size is None


def test_a_hostile_guest_gets_defined_answers_and_the_vm_goes_on() -> None:
    memory = ["--memory", "size=64M,hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=4M"]
    args = guest_args(memory, ["virtiomem", "hello"], virtiomem_hostile=1)
    with Vm(VmConfig.from_cli(args)) as vm:
        vm.boot()
        assert vm.wait(timeout=60) is not None, vm.serial.text
        results = testguest.parse_results(vm.serial.text)
        # 14 bad requests and 3 malformed chains, each answered as the spec
        # and v37 say; then the device still plugs and unplugs.
        assert results.ok("virtiomem"), vm.serial.text
        assert results.values("virtiomem") == {"hostile": "17", "plugged_max": str(4 * MIB)}
        assert results.ok("hello")


def test_zones_resize_through_the_vm_and_appear_as_v37_shows_them(tmp_path: Path) -> None:
    with Vm(VmConfig.from_cli(ticking(ZONES))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        info = vm.info()
        tree = info.device_tree
        assert tree["z0"]["parent"] == "_virtio-pci-z0"
        # After the rng, in zone order, as v37 puts them.
        assert tree["_virtio-pci-z0"]["pci_bdf"] == "0000:00:02.0"
        assert tree["_virtio-pci-z1"]["pci_bdf"] == "0000:00:03.0"
        assert info.memory_actual_size == (64 + 64 + 32) * MIB
        vm.resize_zone("z0", 192 * MIB)
        vm.resize_zone("z1", 34 * MIB)
        zones = vm.info().config.memory.zones or []
        assert [(z.id, z.hotplugged_size) for z in zones] == [("z0", 128 * MIB), ("z1", 2 * MIB)]
        assert vm.info().memory_actual_size == (64 + 128 + 32 + 2) * MIB
        for zone, size, says in [
            ("z0", 192 * MIB, "new size 0x8000000 and requested_size are identical"),
            ("z1", 33 * MIB, "new size 0x100000 is not aligned on block_size 0x200000"),
            ("z1", 1024 * MIB, "new size 0x3e000000 is bigger than region_size 0x8000000"),
        ]:
            with pytest.raises(VmError) as raised:
                vm.resize_zone(zone, size)
            assert str(raised.value) == (
                "Memory manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio "
                f"configuration: ResizeError({says})))"
            )
        for zone, size in [("zz", 64 * MIB), ("z1", 16 * MIB)]:
            with pytest.raises(VmError, match=r"^Failed resizing a memory zone$"):
                vm.resize_zone(zone, size)
        with pytest.raises(VmError, match=r"^Memory manager error: InvalidResizeWithMemoryZones$"):
            vm.resize_memory(512 * MIB)
        zones = vm.info().config.memory.zones or []
        assert [(z.id, z.hotplugged_size) for z in zones] == [("z0", 128 * MIB), ("z1", 2 * MIB)]
        # A snapshot carries the sizes asked for: the restored VM shows them.
        vm.pause()
        vm.snapshot(tmp_path)
        with Vm.restore(tmp_path) as restored:
            zones = restored.info().config.memory.zones or []
            assert [(z.id, z.hotplugged_size) for z in zones] == [
                ("z0", 128 * MIB),
                ("z1", 2 * MIB),
            ]
            assert restored.info().memory_actual_size == (64 + 128 + 32 + 2) * MIB
        vm.resume()
        # A reboot keeps the resized sizes, as v37's config does.
        vm.reboot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        assert vm.info().memory_actual_size == (64 + 128 + 32 + 2) * MIB


def test_unplugged_memory_goes_back_to_the_host(tmp_path: Path) -> None:
    # A spawned VM (its own process, resized through its control socket):
    # the host watches that process's resident memory rise as the guest
    # writes the plugged blocks and fall when it unplugs them.
    serial = tmp_path / "serial.txt"
    args = guest_args(
        [
            "--memory", "size=0,hotplug_method=virtio-mem",
            "--memory-zone", "id=z0,size=64M,hotplug_size=128M,hotplugged_size=96M",
        ],
        ["virtiomem", "ticks"], f"file={serial}", ticks=100000, tick_ms=20,
    )  # fmt: skip
    with Vm.spawn(VmConfig.from_cli(args)) as vm:
        vm.boot()
        wait_for(serial, r"virtiomem waiting requested=0x6000000$")
        plugged = settles(vm.pid, lambda mib: mib > 96)
        assert vm.info().memory_actual_size == 160 * MIB
        with pytest.raises(VmError, match=r"^Memory manager error: InvalidResizeWithMemoryZones$"):
            vm.resize_memory(256 * MIB)
        vm.resize_zone("z0", 64 * MIB)
        wait_for(serial, r"step virtiomem ok plugged_max=100663296 interrupts=1$")
        settles(vm.pid, lambda mib: mib < plugged - 96 * 0.9)
        assert vm.info().memory_actual_size == 64 * MIB
        assert resident_mib(vm.pid) < plugged


def test_a_snapshot_carries_the_plugged_blocks_and_leaves_unplugged_ones_out(
    tmp_path: Path,
) -> None:
    # The guest plugs 192 MiB and writes its pattern there, then gives 160
    # MiB back; the snapshot holds the 32 MiB still plugged. A VM restored
    # from it (its own process) holds those and not the unplugged blocks,
    # and its guest finds its pattern intact as it plugs more, then unplugs all.
    serial = tmp_path / "serial.txt"
    zone = ["--memory", "size=0,hotplug_method=virtio-mem",
            "--memory-zone", "id=z0,size=64M,hotplug_size=256M,hotplugged_size=192M"]  # fmt: skip
    args = guest_args(
        zone, ["virtiomem", "ticks"], f"file={serial}", ticks=100000, tick_ms=20,
        virtiomem_timeout_ms=120000,
    )  # fmt: skip
    snap = tmp_path / "snap"
    snap.mkdir()
    with Vm.spawn(VmConfig.from_cli(args)) as vm:
        vm.boot()
        wait_for(serial, r"virtiomem waiting requested=0xc000000$")
        vm.resize_zone("z0", 96 * MIB)
        wait_for(serial, r"virtiomem waiting requested=0x2000000$")
        kept = settles(vm.pid, lambda mib: mib > 0)
        vm.pause()
        vm.snapshot(snap)
    memory = snap / "memory"
    assert memory.stat().st_size == (64 + 256) * MIB
    on_disk = memory.stat().st_blocks * 512 / MIB
    assert 32 <= on_disk < 48, f"{on_disk:.1f} MiB: the plugged blocks and what RAM the guest wrote"
    serial.unlink()
    with Vm.spawn(None, restore=snap) as restored:
        info = restored.info()
        assert info.memory_actual_size == 96 * MIB
        zones = info.config.memory.zones or []
        assert [(z.id, z.hotplugged_size) for z in zones] == [("z0", 32 * MIB)]
        restored.resume()
        # The 32 MiB plugged came in; none of the 160 MiB given back did.
        resident = settles(restored.pid, lambda mib: mib > 0)
        assert resident < kept + 48, f"{resident:.1f} MiB restored, {kept:.1f} MiB before"
        restored.resize_zone("z0", 128 * MIB)
        wait_for(serial, r"virtiomem plugged=0x4000000 requested=0x4000000 verified=1$")
        restored.resize_zone("z0", 64 * MIB)
        wait_for(serial, r"step virtiomem ok plugged_max=201326592 interrupts=3$")
        assert restored.info().memory_actual_size == 64 * MIB


@pytest.mark.parametrize("local", [False, True])
def test_a_migration_carries_the_plugged_blocks(tmp_path: Path, local: bool) -> None:
    from test_migration import Receiver

    shared = ",shared=on" if local else ""
    memory = ["--memory", f"size=64M,hotplug_method=virtio-mem,hotplug_size=256M,"
              f"hotplugged_size=32M{shared}"]  # fmt: skip
    args = guest_args(memory, ["virtiomem", "ticks"], ticks=100000, tick_ms=20)
    with Vm(VmConfig.from_cli(args)) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: virtiomem waiting requested=0x2000000$", 30)
        receiver = Receiver(tmp_path / "m.sock")
        try:
            report = vm.migrate_to(tmp_path / "m.sock", local=local)
        finally:
            receiver.join()
        assert receiver.error is None, receiver.error
        if not local:
            # The plugged blocks, not the whole region.
            assert 32 * MIB <= report.bytes < 96 * MIB, report
    assert receiver.vm is not None
    with receiver.vm as moved:
        assert moved.info().memory_actual_size == 96 * MIB
        moved.resize_memory(128 * MIB)
        assert moved.serial.wait_for(
            "^vmkit-guest: virtiomem plugged=0x4000000 requested=0x4000000 verified=1$", timeout=30
        ), moved.serial.text
        moved.resize_memory(64 * MIB)
        assert moved.serial.wait_for("^vmkit-guest: step virtiomem ok", timeout=30)
        assert testguest.parse_results(moved.serial.text).ok("virtiomem"), moved.serial.text


def test_a_snapshot_whose_bitmap_does_not_fit_the_region_is_refused(tmp_path: Path) -> None:
    # An edited config gives the region 384 MiB (the header and the memory
    # file made to match): the saved bitmap, for 256 MiB, does not fit it.
    memory = ["--memory", "size=64M,hotplug_method=virtio-mem,hotplug_size=256M,hotplugged_size=8M"]
    with Vm(VmConfig.from_cli(ticking(memory))) as vm:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        vm.pause()
        vm.snapshot(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["memory"]["hotplug_size"] = 384 * MIB
    (tmp_path / "config.json").write_text(json.dumps(config))
    header = json.loads((tmp_path / "snapshot.json").read_text())
    header["memory_size"] += 128 * MIB
    (tmp_path / "snapshot.json").write_text(json.dumps(header))
    with open(tmp_path / "memory", "r+b") as file:
        file.truncate(header["memory_size"])
    error = restore_refused(tmp_path)
    assert "virtio-mem state of 25 bytes, expected 33 for a region of 192 blocks" in str(error), (
        error
    )


def test_resize_without_a_virtio_mem_region_answers_as_v37() -> None:
    memory = ["--memory", "size=64M,hotplug_method=virtio-mem"]
    with Vm(VmConfig.from_cli(ticking(memory))) as vm:
        vm.boot()
        with pytest.raises(VmError, match=r"^Memory manager error: MissingVirtioMemHandler$"):
            vm.resize_memory(128 * MIB)
        # Less than boot RAM changes nothing, and is no error.
        vm.resize_memory(32 * MIB)
        assert vm.info().memory_actual_size == 64 * MIB


def first_line(text: str) -> str:
    """The first line of ch-remote's stderr. v37 puts a stack backtrace
    between its error text and the closing parentheses; vmkit closes them
    on the same line: compared without them."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.removesuffix(")))")


# (ch-remote arguments, exit status, first line of stderr, hotplugged_size
# of mem0 after, memory_actual_size after)
DEFAULT_SCRIPT = [
    ("resize --memory 128M", 0, "", 64 * MIB, 128 * MIB),
    ("resize --memory 64M", 0, "", None, 64 * MIB),
    ("resize --memory 32M", 0, "", None, 64 * MIB),
    ("resize --memory 96M", 0, "", 32 * MIB, 96 * MIB),
    (
        "resize --memory 65M", 1,
        "Error running command: Server responded with an error: InternalServerError: Memory "
        "manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio configuration: "
        "ResizeError(new size 0x100000 is not aligned on block_size 0x200000",
        32 * MIB, 96 * MIB,
    ),
    ("resize --memory 320M", 0, "", 256 * MIB, 320 * MIB),
    (
        "resize --memory 321M", 1,
        "Error running command: Server responded with an error: InternalServerError: Memory "
        "manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio configuration: "
        "ResizeError(new size 0x10100000 is bigger than region_size 0x10000000",
        256 * MIB, 320 * MIB,
    ),
    (
        "resize --memory 320M", 1,
        "Error running command: Server responded with an error: InternalServerError: Memory "
        "manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio configuration: "
        "ResizeError(new size 0x10000000 and requested_size are identical",
        256 * MIB, 320 * MIB,
    ),
    (
        "resize-zone --id mem0 --size 128M", 1,
        "Error running command: Server responded with an error: InternalServerError: Failed "
        "resizing a memory zone",
        256 * MIB, 320 * MIB,
    ),
]  # fmt: skip

ZONE_SCRIPT = [
    ("resize-zone --id z0 --size 192M", 0, "", [128 * MIB, None], 224 * MIB),
    ("resize-zone --id z1 --size 64M", 0, "", [128 * MIB, 32 * MIB], 256 * MIB),
    ("resize-zone --id z0 --size 64M", 0, "", [0, 32 * MIB], 128 * MIB),
    (
        "resize-zone --id z9 --size 64M", 1,
        "Error running command: Server responded with an error: InternalServerError: Failed "
        "resizing a memory zone",
        [0, 32 * MIB], 128 * MIB,
    ),
    (
        "resize-zone --id z1 --size 3M", 1,
        "Error running command: Server responded with an error: InternalServerError: Failed "
        "resizing a memory zone",
        [0, 32 * MIB], 128 * MIB,
    ),
    (
        "resize-zone --id z1 --size 65M", 1,
        "Error running command: Server responded with an error: InternalServerError: Memory "
        "manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio configuration: "
        "ResizeError(new size 0x2100000 is not aligned on block_size 0x200000",
        [0, 32 * MIB], 128 * MIB,
    ),
    (
        "resize --memory 512M", 1,
        "Error running command: Server responded with an error: InternalServerError: Memory "
        "manager error: InvalidResizeWithMemoryZones",
        [0, 32 * MIB], 128 * MIB,
    ),
]  # fmt: skip


def memory_state(socket: Path) -> tuple[object, int]:
    reply = request(str(socket), "GET", "vm.info")  # plain HTTP: no ch-remote needed
    assert reply.status == 200, reply.text
    info = reply.json()
    memory = info["config"]["memory"]
    if memory["zones"]:
        hotplugged: object = [z["hotplugged_size"] for z in memory["zones"]]
    else:
        hotplugged = memory["hotplugged_size"]
    return hotplugged, info["memory_actual_size"]


ZONES_NONE_PLUGGED = [
    "--memory", "size=0,hotplug_method=virtio-mem",
    "--memory-zone", "id=z0,size=64M,hotplug_size=256M", "id=z1,size=32M,hotplug_size=128M",
]  # fmt: skip
CASES = {
    "default-zone": (DEFAULT_ZONE, DEFAULT_SCRIPT, ["_virtio-pci-mem0", "mem0"]),
    "zones": (ZONES_NONE_PLUGGED, ZONE_SCRIPT, ["_virtio-pci-z0", "_virtio-pci-z1", "z0", "z1"]),
}


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ch_remote_resize_answers_as_cloud_hypervisor(kind: str, case: str, tmp_path: Path) -> None:
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    memory, script, device_ids = CASES[case]
    socket = tmp_path / "api.sock"
    args = tuple(ticking(memory, f"file={tmp_path / 'serial'}"))
    vmm = VmmProcess(kind, socket, tmp_path / "log", extra=args)
    try:
        vmm.wait_running()
        seen: list[tuple[object, ...]] = []
        for command, *_ in script:
            status, _, stderr = ch_remote(socket, *str(command).split())
            seen.append((command, status, first_line(stderr), *memory_state(socket)))
        assert seen == script, vmm.log
        # The devices are named as v37 names them (the zone's id).
        status, out, _ = ch_remote(socket, "info")
        tree = json.loads(out)["device_tree"]
        assert sorted(i for i in tree if "__" not in i) == device_ids
        assert tree[device_ids[-1]]["parent"] == f"_virtio-pci-{device_ids[-1]}"
    finally:
        vmm.stop()


def test_the_http_api_resizes_a_zone(tmp_path: Path) -> None:
    socket = tmp_path / "api.sock"
    vmm = VmmProcess("vmkit", socket, tmp_path / "log", extra=tuple(ticking(ZONES, "null")))
    try:
        import http.client
        import socket as sockets

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
                self.sock.connect(str(socket))

        def put(path: str, body: str) -> tuple[int, str]:
            connection = Connection("localhost")
            connection.request("PUT", f"/api/v1/{path}", body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            text = reply.read().decode()
            connection.close()
            return reply.status, text

        assert put("vm.resize-zone", '{"id":"z1","desired_ram":67108864}') == (204, "")
        assert memory_state(socket) == ([64 * MIB, 32 * MIB], 192 * MIB)
        assert put("vm.resize-zone", '{"id":"z1","desired_ram":67108864}') == (
            500,
            "Memory manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio "
            "configuration: ResizeError(new size 0x2000000 and requested_size are identical)))",
        )
        assert put("vm.resize-zone", '{"id":"nope","desired_ram":67108864}') == (
            500,
            "Failed resizing a memory zone",
        )
        assert put("vm.resize-zone", '{"id":"z1"}')[0] == 400
    finally:
        vmm.stop()


def test_the_vmkit_command_resizes_as_ch_remote_does(tmp_path: Path) -> None:
    # `vmkit remote` (the CLI) against vmkit: the same statuses and texts.
    socket = tmp_path / "api.sock"
    vmm = VmmProcess("vmkit", socket, tmp_path / "log", extra=tuple(ticking(ZONES, "null")))

    def remote(*args: str) -> tuple[int, str]:
        argv = [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(socket), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return done.returncode, first_line(done.stderr)

    try:
        assert remote("resize-zone", "--id", "z1", "--size", "64M") == (0, "")
        assert memory_state(socket) == ([64 * MIB, 32 * MIB], 192 * MIB)
        assert remote("resize-zone", "--id", "z1", "--size", "33M") == (
            1,
            "Error running command: Server responded with an error: InternalServerError: Memory "
            "manager error: VirtioMemResizeFail(ResizeError(Failed to update virtio "
            "configuration: ResizeError(new size 0x100000 is not aligned on block_size 0x200000",
        )
        assert remote("resize", "--memory", "1G") == (
            1,
            "Error running command: Server responded with an error: InternalServerError: Memory "
            "manager error: InvalidResizeWithMemoryZones",
        )
        assert memory_state(socket) == ([64 * MIB, 32 * MIB], 192 * MIB)
    finally:
        vmm.stop()


@pytest.mark.parametrize(
    "memory, says",
    [
        ("size=64M,hotplug_method=virtio-mem,hotplug_size=0", "'hotplug_size' can't be 0"),
        (
            "size=64M,hotplug_method=virtio-mem,hotplug_size=256M,hotplugged_size=512M",
            "'hotplugged_size' 536870912 can't be bigger than 'hotplug_size' 268435456",
        ),
        (
            "size=64M,hotplug_method=virtio-mem,hotplug_size=100M",
            "Virtio-mem size is not aligned with 134217728",
        ),
    ],
)
def test_bad_virtio_mem_settings_are_refused_at_boot(memory: str, says: str) -> None:
    with Vm(VmConfig.from_cli(ticking(["--memory", memory]))) as vm:
        with pytest.raises(VmError, match=re.escape(says)):
            vm.boot()


NUMA = [
    "--cpus", "boot=2",
    "--memory", "size=0,hotplug_method=virtio-mem",
    "--memory-zone", "id=a,size=64M,hotplug_size=128M",
    "id=b,size=32M,hotplug_size=256M,hotplugged_size=2M",
    "--numa", "guest_numa_id=0,cpus=[0],memory_zones=[a]",
    "guest_numa_id=1,cpus=[1],memory_zones=[b]",
]  # fmt: skip
# What v37 gives the guest (its numa step): each zone's virtio-mem region,
# past RAM from 4 GiB, follows its RAM in the SRAT, hot-pluggable (flags 0x3).
NUMA_SEEN = [
    "srat mem base=0x0 len=0x4000000 node=0 flags=0x1",
    "srat mem base=0x100000000 len=0x8000000 node=0 flags=0x3",
    "srat cpu type=2 apic=0 node=0 flags=0x1",
    "srat mem base=0x4000000 len=0x2000000 node=1 flags=0x1",
    "srat mem base=0x108000000 len=0x10000000 node=1 flags=0x3",
    "srat cpu type=2 apic=1 node=1 flags=0x1",
]


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_srat_lists_each_region_as_hot_pluggable_memory_of_its_node(kind: str) -> None:
    if kind == "ch" and CH_DIR is None:
        pytest.skip(CH_MISSING)
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["numa"], "poweroff"),
        *NUMA, "--serial", "tty", "--console", "off",
    ]  # fmt: skip
    argv = [ch_binary("cloud-hypervisor")] if kind == "ch" else [sys.executable, "-m", "vmkit"]
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    seen = [
        line.removeprefix("vmkit-guest: ")
        for line in result.stdout.splitlines()
        if line.startswith("vmkit-guest: srat ")
    ]
    assert seen == NUMA_SEEN, result.stdout


@pytest.mark.parametrize("kind", ["vmkit", "ch"])
def test_the_device_names_its_zones_node(kind: str) -> None:
    # VIRTIO_MEM_F_ACPI_PXM and node_id: zone a belongs to node 1. The guest
    # plugs hotplugged_size once, checks it and unplugs it (virtiomem_wait=0).
    if kind == "ch" and CH_DIR is None:
        pytest.skip(CH_MISSING)
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["virtiomem"], "poweroff", virtiomem_wait=0),
        "--cpus", "boot=2",
        "--memory", "size=0,hotplug_method=virtio-mem",
        "--memory-zone", "id=a,size=64M,hotplug_size=128M,hotplugged_size=4M", "id=b,size=32M",
        "--numa", "guest_numa_id=0,cpus=[0],memory_zones=[b]",
        "guest_numa_id=1,cpus=[1],memory_zones=[a]",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip
    argv = [ch_binary("cloud-hypervisor")] if kind == "ch" else [sys.executable, "-m", "vmkit"]
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (
        "vmkit-guest: virtiomem dev addr=0x100000000 region_size=0x8000000 block_size=0x200000 "
        "usable=0x8000000 plugged=0x0 requested=0x400000 node_id=1"
    ) in result.stdout, result.stdout
    assert "vmkit-guest: step virtiomem ok plugged_max=4194304" in result.stdout, result.stdout
