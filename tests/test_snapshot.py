"""Snapshot and restore in process: a paused VM written to a directory and
brought back, the guest going on where it stopped; what is refused, and
hostile snapshot files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest
from _helpers import event_names, restore_refused
from _sockets import wait_listening
from vmkit import VmConfig, testguest
from vmkit.client import SpawnedVm
from vmkit.config import DiskConfig
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

TICKS = 30


def ticking(
    cpus: int = 1, steps: tuple[str, ...] = ("hello", "ticks"), memory: str = "size=128M"
) -> VmConfig:
    """The test guest counting ticks (one line each, 20 ms apart), then powering off."""
    return VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(list(steps), "poweroff", ticks=TICKS, tick_ms=20),
        "--cpus", f"boot={cpus}", "--memory", memory,
        "--serial", "tty", "--console", "off",
    ])  # fmt: skip


def paused_at_tick(config: VmConfig, tick: int) -> Vm:
    vm = Vm(config)
    vm.boot()
    assert vm.serial.wait_for(f"^vmkit-guest: tick {tick}$", timeout=30)
    vm.pause()
    return vm


def ticks_seen(text: str) -> list[int]:
    return [
        int(line.split()[-1]) for line in text.splitlines() if line.startswith("vmkit-guest: tick ")
    ]


def ticks_across(before: str, after: str) -> list[int]:
    """The ticks of the guest's serial output before a snapshot and after its
    restore: the pause may fall inside a line that the restored VM completes."""
    return ticks_seen(before + after)


def finishes(vm: Vm, steps: int = 2, timeout: float = 30) -> str:
    """Resumes a restored VM until the guest powers off, its ``steps`` steps
    passed; what it printed."""
    assert vm.state == "Paused"
    vm.resume()
    exit_info = vm.wait(timeout=timeout)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    text = vm.serial.text
    assert f"vmkit-guest: summary passed={steps} failed=0" in text, text
    # The guest went on: no second boot.
    assert "vmkit-guest: ready" not in text
    return text


def new_dir(path: Path) -> Path:
    path.mkdir()
    return path


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_a_restored_vm_goes_on_where_it_stopped(tmp_path: Path, cpus: int) -> None:
    vm = paused_at_tick(ticking(cpus), 5)
    vm.snapshot(new_dir(tmp_path / "snap"))
    before = vm.serial.text
    vm.close()
    assert ticks_seen(before)[-1] >= 5

    restored = Vm.restore(tmp_path / "snap")
    try:
        assert restored.config.cpus.boot_vcpus == cpus
        assert restored.kernel_format == "pvh-elf"
        after = finishes(restored)
    finally:
        restored.close()
    # Every tick once: the ones before the snapshot, then the rest.
    assert ticks_across(before, after) == list(range(TICKS))


def test_one_snapshot_restores_into_several_vms_and_stays_as_written(tmp_path: Path) -> None:
    snap = new_dir(tmp_path / "snap")
    vm = paused_at_tick(ticking(), 3)
    vm.snapshot(snap)
    before = vm.serial.text
    vm.close()
    written = digest(snap)
    # Guest memory is the snapshot's file mapped copy-on-write: sparse on disk.
    memory = snap / "memory"
    assert memory.stat().st_size == 128 << 20
    assert memory.stat().st_blocks * 512 < 16 << 20

    clones = [Vm.restore(snap) for _ in range(3)]
    results: dict[int, str] = {}
    try:
        threads = [
            threading.Thread(target=lambda i=i, c=c: results.__setitem__(i, finishes(c)))
            for i, c in enumerate(clones)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for clone in clones:
            clone.close()
    assert len(results) == 3
    for after in results.values():
        assert ticks_across(before, after) == list(range(TICKS))
    assert digest(snap) == written, "a restored VM wrote into the snapshot"


def test_a_restored_vm_can_be_snapshotted_again(tmp_path: Path) -> None:
    vm = paused_at_tick(ticking(), 3)
    vm.snapshot(new_dir(tmp_path / "first"))
    first = vm.serial.text
    vm.close()
    second = Vm.restore(tmp_path / "first")
    try:
        second.resume()
        # A few ticks on from the pause (more than 3 may have come before it).
        ahead = min(ticks_seen(first.rpartition("\n")[0])[-1] + 3, TICKS - 1)
        assert second.serial.wait_for(f"^vmkit-guest: tick {ahead}$", timeout=30)
        second.pause()
        second.snapshot(new_dir(tmp_path / "second"))
        first += second.serial.text
    finally:
        second.close()
    third = Vm.restore(tmp_path / "second")
    try:
        assert ticks_across(first, finishes(third)) == list(range(TICKS))
    finally:
        third.close()


def test_a_snapshot_needs_a_paused_vm_and_a_directory_for_new_files(tmp_path: Path) -> None:
    snap = new_dir(tmp_path / "snap")
    vm = Vm(ticking())
    try:
        with pytest.raises(VmError) as e:
            vm.snapshot(snap)
        assert (e.value.kind, str(e.value)) == ("State", "Trying to snapshot while VM is running")
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: tick 1$", timeout=30)
        with pytest.raises(VmError, match=r"^Trying to snapshot while VM is running$"):
            vm.snapshot(snap)
        vm.pause()
        # Cloud Hypervisor's answers: the directory must exist, its files must not.
        with pytest.raises(VmError, match=r"^Destination is not a directory$"):
            vm.snapshot(tmp_path / "absent")
        vm.snapshot(snap)
        written = digest(snap)
        with pytest.raises(VmError, match=r"^File exists \(os error 17\)$"):
            vm.snapshot(snap)
        assert digest(snap) == written, "the first snapshot was touched"
    finally:
        vm.close()
    assert not (tmp_path / "absent").exists()
    # Guest memory inside: for the owner only.
    assert {p.stat().st_mode & 0o777 for p in snap.iterdir()} == {0o600}
    with pytest.raises(VmError, match=r"^Destination is not a directory$"):
        Vm.restore(tmp_path / "absent")


def test_virtio_devices_the_guest_used_work_after_a_restore(tmp_path: Path) -> None:
    """The guest initialised and reset virtio-rng before the snapshot (its PCI
    configuration, MSI-X table and registers changed); after the restore it
    drives it again, and the rest of its steps pass."""
    snap = new_dir(tmp_path / "snap")
    vm = paused_at_tick(ticking(steps=("rng", "ticks", "rng", "pci")), 3)
    vm.snapshot(snap)
    vm.close()
    restored = Vm.restore(snap)
    try:
        finishes(restored, steps=4)
        assert "vmkit-guest: step rng ok" in restored.serial.text
    finally:
        restored.close()


@pytest.mark.parametrize(("depth", "count"), [(1, 400_000), (16, 1_000_000)])
def test_disk_io_in_flight_goes_on_after_a_restore(tmp_path: Path, depth: int, count: int) -> None:
    """The guest reads its disk without pause (requests in flight on io_uring
    when the VM pauses): the snapshot waits for them, and the restored guest's
    driver sees every request complete once, in its rings."""
    snap = new_dir(tmp_path / "snap")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(
            ["blkbench", "hello"], "poweroff",
            blkbench_mode="randread", blkbench_depth=depth, blkbench_count=count,
        ),
        "--memory", "size=128M", "--disk", f"path={disk}",
        "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    vm = Vm(config)
    try:
        vm.boot()
        vm.serial.wait_for("vmkit-guest: ready", timeout=30)
        threading.Event().wait(0.2)
        vm.pause()
        vm.snapshot(snap)
        assert "step blkbench" not in vm.serial.text, "the bench ended before the snapshot"
    finally:
        vm.close()
    restored = Vm.restore(snap)
    try:
        # ~1-3 s here; a host short of memory makes every VM here many times
        # slower (seen: 30 s was not enough while a process held 16 GiB).
        finishes(restored, timeout=180)
        assert f"requests={count}" in restored.serial.text, restored.serial.text
    finally:
        restored.close()


def test_shared_and_file_backed_memory_in_zones_snapshots_and_restores(tmp_path: Path) -> None:
    """Guest RAM that is not private anonymous memory: a shared base, a shared
    zone and a file-backed zone. The guest rewrites 24 MiB across the first two
    (checking each round); paused mid-run, snapshotted and restored, it goes on
    with every check passing, and the restored VM's memory is shared again.
    What the zone files hold by then does not show through: the shared one is
    the guest's memory and holds the snapshot's (zeros: the guest never wrote
    it); a private one is the guest's first contents only, and stays as it is."""
    zone_file = tmp_path / "zone.mem"
    zone_file.write_bytes(b"")
    private_file = tmp_path / "private.mem"
    private_file.write_bytes(b"\xab" * (4 << 20))
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["dirty"], "poweroff", dirty_mib=24, dirty_rounds=60,
                                       dirty_ms=5),
        "--memory", "size=16M,shared=on",
        "--memory-zone", "id=z0,size=16M,shared=on", f"id=z1,size=16M,file={zone_file},shared=on",
        f"id=z2,size=4M,file={private_file}",
        "--serial", "tty", "--console", "off",
    ])  # fmt: skip
    snap = new_dir(tmp_path / "snap")
    vm = Vm(config)
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: dirty round 10$", timeout=30), vm.serial.text
        vm.pause()
        vm.snapshot(snap)
        before = vm.serial.text
    finally:
        vm.close()
    # Holes in the shared memory stay holes: the untouched zone z1 takes no
    # space (24 MiB dirtied, the 4 MiB of z2's file the guest saw, the guest).
    assert (snap / "memory").stat().st_blocks * 512 < 34 << 20
    zone_file.write_bytes(b"\xff" * (16 << 20))
    private_file.write_bytes(b"\xcd" * (4 << 20))
    restored = Vm.restore(snap)
    try:
        assert restored.state == "Paused"
        assert zone_file.read_bytes() == bytes(16 << 20), "stale data in the shared zone"
        assert private_file.read_bytes() == b"\xcd" * (4 << 20)
        restored.resume()
        exit_info = restored.wait(timeout=30)
        assert exit_info is not None and exit_info.reason == "poweroff", restored.serial.text
        after = restored.serial.text
        assert "vmkit-guest: summary passed=1 failed=0" in after, after
        rounds = [
            int(line.rsplit(" ", 1)[1])
            for line in (before + after).splitlines()
            if line.startswith("vmkit-guest: dirty round ")
        ]
        assert rounds == list(range(60))
    finally:
        restored.close()


def snapshot_with_a_disk(tmp_path: Path, copies: int) -> tuple[Path, Path, bytes, list[Path]]:
    """A guest that writes its 1 MiB disk (``blk``) after a few ticks,
    snapshotted before it does: the snapshot, the disk, its contents then, and
    ``copies`` copies of it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096)
    config = ticking(steps=("hello", "ticks", "blk"))
    config.disks = [DiskConfig.parse(f"path={disk}")]
    snap = new_dir(tmp_path / "snap")
    vm = paused_at_tick(config, 2)
    try:
        vm.snapshot(snap)
    finally:
        vm.close()
    original = disk.read_bytes()
    paths = [tmp_path / f"clone{i}.img" for i in range(copies)]
    for path in paths:
        path.write_bytes(original)
    return snap, disk, original, paths


def each_wrote_its_own_copy(disk: Path, original: bytes, copies: list[Path]) -> None:
    assert disk.read_bytes() == original, "a clone wrote the snapshot's image"
    for copy in copies:
        assert copy.read_bytes() != original, "the clone did not write its own copy"


def run_to_poweroff(clones: list[SpawnedVm], disks: list[Path] | None = None) -> None:
    """Resumes every clone, each until its guest powers off, then closes them all
    (``disks``: each clone's disk image, checked in its config first)."""
    try:
        for index, clone in enumerate(clones):
            if disks is not None:
                assert clone.info().config.disks[0].path == str(disks[index])
            clone.resume()
        for clone in clones:
            exit_info = clone.wait(timeout=30)
            assert exit_info is not None and exit_info.reason == "poweroff", exit_info
    finally:
        for clone in clones:
            clone.close()


def short_image(tmp_path: Path) -> Path:
    """An image smaller than the snapshot's (4 KiB against 1 MiB)."""
    short = tmp_path / "short.img"
    short.write_bytes(bytes(4096))
    return short


def test_clones_run_on_their_own_copies_of_the_disk(tmp_path: Path) -> None:
    """Three clones of one snapshot, each given its own copy of the disk image:
    they run at once (no image lock between them), each writes and reads back
    its own copy, and the snapshot's image is left as it was."""
    snap, disk, original, copies = snapshot_with_a_disk(tmp_path, 3)
    clones = [Vm.restore(snap, disks={"_disk0": copy}) for copy in copies]
    try:
        for clone in clones:
            clone.resume()
        for clone in clones:
            exit_info = clone.wait(timeout=30)
            assert exit_info is not None and exit_info.reason == "poweroff", clone.serial.text
            assert "vmkit-guest: summary passed=3 failed=0" in clone.serial.text
            assert "blk write bdf=" in clone.serial.text
    finally:
        for clone in clones:
            clone.close()
    each_wrote_its_own_copy(disk, original, copies)
    # What does not fit is refused before anything runs.
    short = short_image(tmp_path)
    with pytest.raises(VmError) as e:
        Vm.restore(snap, disks={"_disk0": short})
    assert e.value.kind == "Snapshot"
    assert str(e.value) == (
        f"disk _disk0: {short} holds 4096 bytes, the snapshot's image held {1 << 20}"
    )
    with pytest.raises(VmError, match="disk _disk9: the snapshot's VM has no disk with this id"):
        Vm.restore(snap, disks={"_disk9": copies[0]})


def test_clones_in_processes_get_their_own_disks(tmp_path: Path) -> None:
    """``Vm.spawn(None, restore=snap, disks=...)``: each VM process writes its
    own copy (``vm.restore``'s ``disks``, which only vmkit reads), the
    snapshot's image stays as it was, and an image that does not fit is
    refused with the reason before the process runs anything."""
    from vmkit.client import ApiError

    snap, disk, original, copies = snapshot_with_a_disk(tmp_path, 2)
    clones = [Vm.spawn(None, restore=snap, disks={"_disk0": copy}) for copy in copies]
    run_to_poweroff(clones, disks=copies)
    each_wrote_its_own_copy(disk, original, copies)
    short = short_image(tmp_path)
    with pytest.raises(ApiError) as e:
        Vm.spawn(None, restore=snap, disks={"_disk0": short})
    assert f"disk _disk0: {short} holds 4096 bytes" in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="give restore too"):
        Vm.spawn(ticking(), disks={"_disk0": short})


def test_a_missing_disk_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    snap, disk, _, _ = snapshot_with_a_disk(tmp_path, 0)
    disk.unlink()
    gc.collect()
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(VmError) as e:
        Vm.restore(snap)
    assert str(disk) in str(e.value) and "No such file" in str(e.value), str(e.value)
    gc.collect()
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds, "a descriptor was left open"


def test_a_failed_snapshot_leaves_no_files(tmp_path: Path) -> None:
    snap = new_dir(tmp_path / "snap")
    (snap / "memory").mkdir()  # the memory file cannot be created
    vm = paused_at_tick(ticking(), 1)
    try:
        with pytest.raises(VmError) as e:
            vm.snapshot(snap)
        assert (e.value.kind, str(e.value)) == ("Snapshot", "File exists (os error 17)")
    finally:
        vm.close()
    assert [p.name for p in snap.iterdir()] == ["memory"]


@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    snap = new_dir(tmp_path_factory.mktemp("good") / "snap")
    vm = paused_at_tick(ticking(), 1)
    vm.snapshot(snap)
    vm.close()
    return snap


def hostile(good: Path, target: Path, edit: str) -> None:
    """A copy of ``good`` in ``target`` with one file broken as ``edit`` says."""
    target.mkdir()
    for p in good.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    header = json.loads((target / "snapshot.json").read_text())
    if edit == "no header":
        (target / "snapshot.json").unlink()
    elif edit == "foreign format":
        header["format"] = "cloud-hypervisor"
    elif edit == "newer version":
        header["version"] = 99
    elif edit == "huge vcpu count":
        header["vcpus"] = 1 << 40
    elif edit == "more vcpus than the config":
        header["vcpus"] = 2
        (target / "vcpu-1").write_bytes((target / "vcpu-0").read_bytes())
    elif edit == "short memory":
        with open(target / "memory", "r+b") as f:
            f.truncate((128 << 20) - 4096)
    elif edit == "truncated vcpu":
        data = (target / "vcpu-0").read_bytes()
        (target / "vcpu-0").write_bytes(data[: len(data) // 2])
    elif edit == "garbage vcpu":
        (target / "vcpu-0").write_bytes(os.urandom(3000))
    elif edit == "garbage platform":
        (target / "platform").write_bytes(b"\xff" * 64)
    elif edit == "bad config":
        (target / "config.json").write_text('{"cpus": {"boot_vcpus": "two"}}')
    elif edit == "config with more memory":
        config = json.loads((target / "config.json").read_text())
        config["memory"]["size"] *= 2
        (target / "config.json").write_text(json.dumps(config))
    elif edit == "a cpu feature this host lacks":
        # CPUID leaf 7's PCOMMIT (EBX bit 22), which KVM never offers.
        data = bytearray((target / "vcpu-0").read_bytes())
        (count,) = struct.unpack_from("<I", data, 8)
        at = 12
        for _ in range(count):
            function, index = struct.unpack_from("<II", data, at + 4)
            if (function, index) == (7, 0):
                (ebx,) = struct.unpack_from("<I", data, at + 4 + 16)
                struct.pack_into("<I", data, at + 4 + 16, ebx | 1 << 22)
            at += 4 + 40
        (target / "vcpu-0").write_bytes(bytes(data))
    elif edit == "invalid config":
        config = json.loads((target / "config.json").read_text())
        config["cpus"]["max_vcpus"] = 0  # below boot_vcpus
        (target / "config.json").write_text(json.dumps(config))
    if (target / "snapshot.json").exists():
        (target / "snapshot.json").write_text(json.dumps(header))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("no header", "snapshot.json"),
        ("foreign format", 'format "cloud-hypervisor", not "vmkit-snapshot"'),
        ("newer version", "format version 99, but this vmkit reads version 5"),
        ("huge vcpu count", "1099511627776 vCPUs"),
        (
            "more vcpus than the config",
            "the snapshot has 2 vCPU states but its config boots 1 vCPUs",
        ),
        ("short memory", "134213632 bytes of guest memory, the snapshot's VM has 134217728"),
        ("truncated vcpu", "vcpu-0"),
        ("garbage vcpu", "not a vmkit vCPU state"),
        ("garbage platform", "not a vmkit platform state"),
        ("bad config", "config.json"),
        (
            "config with more memory",
            "268435456 bytes of guest memory, the snapshot's memory file holds 134217728",
        ),
        ("invalid config", "config.json"),
        (
            "a cpu feature this host lacks",
            "the saved vCPUs use CPU features this host's KVM does not offer "
            "(CPUID 0x7.0 Ebx 0x00400000)",
        ),
    ],
)
def test_hostile_snapshots_are_refused_cleanly(
    good_snapshot: Path, tmp_path: Path, edit: str, message: str
) -> None:
    target = tmp_path / "hostile"
    hostile(good_snapshot, target, edit)
    error = restore_refused(target)
    assert message in str(error), str(error)


def test_a_spawned_vm_snapshots_and_another_vmm_process_restores_it(tmp_path: Path) -> None:
    """The VM-process path: the snapshot is taken in one VM process and restored,
    through the API, in another (both under their seccomp filters)."""
    from vmkit.config import RestoreConfig

    serial = tmp_path / "serial.log"
    snap = new_dir(tmp_path / "snap")
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello", "ticks"], "poweroff", ticks=TICKS, tick_ms=20),
        "--memory", "size=128M", "--serial", f"file={serial}", "--console", "off",
    ])  # fmt: skip
    with Vm.spawn(config) as vm:
        vm.boot()
        vm.serial.wait_for("^vmkit-guest: tick 3$", timeout=30)
        vm.pause()
        vm.snapshot(snap)
    before = serial.read_text()
    # Through the API of a VMM started without a config...
    with Vm.spawn(None) as restored:
        restored.client.restore(RestoreConfig(source_url=f"file://{snap}"))
        assert restored.client.info().state == "Paused"
        restored.client.resume()
        exit_info = restored.wait(timeout=30)
        assert exit_info is not None and exit_info.reason == "poweroff"
    after = serial.read_text()
    assert "vmkit-guest: summary passed=2 failed=0" in after
    assert ticks_across(before, after) == list(range(TICKS))
    # ... and with Vm.spawn(restore=...), whose serial reads the config's file.
    with Vm.spawn(None, restore=snap, prefault=True) as restored:
        assert restored.state == "Paused"
        restored.resume()
        restored.serial.wait_for("summary passed=2 failed=0", timeout=30)
        assert ticks_across(before, restored.serial.text) == list(range(TICKS))
    with pytest.raises(ValueError, match="a config or a snapshot to restore, not both"):
        Vm.spawn(config, restore=snap)


@pytest.mark.parametrize("cpus", [1, 4])
def test_a_guest_rewriting_memory_is_snapshotted_mid_round_and_checks_out_in_another_process(
    tmp_path: Path, cpus: int
) -> None:
    """The ``dirty`` step (32 MiB rewritten every 5 ms, each round checking the
    last) snapshotted in a VM process while it runs, with 1 and 4 vCPUs, and
    restored in another: every check passes there, every round runs once."""
    serial = tmp_path / "serial.log"
    snap = new_dir(tmp_path / "snap")
    steps = ["smp", "dirty"] if cpus > 1 else ["dirty"]
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", dirty_mib=32, dirty_rounds=80,
                                       dirty_ms=5),
        "--cpus", f"boot={cpus}", "--memory", "size=128M",
        "--serial", f"file={serial}", "--console", "off",
    ])  # fmt: skip
    with Vm.spawn(config) as vm:
        vm.boot()
        vm.serial.wait_for("^vmkit-guest: dirty round 20$", timeout=30)
        vm.pause()
        vm.snapshot(snap)
    before = serial.read_text()
    with Vm.spawn(None, restore=snap) as restored:
        restored.resume()
        exit_info = restored.wait(timeout=30)
        assert exit_info is not None and exit_info.reason == "poweroff"
        after = restored.serial.text
    assert f"vmkit-guest: summary passed={len(steps)} failed=0" in after, after
    prefix = "vmkit-guest: dirty round "
    rounds = [int(line[len(prefix) :]) for line in (before + after).splitlines()
              if line.startswith(prefix)]  # fmt: skip
    assert rounds == list(range(80))


def test_vmkit_remote_snapshots_and_restores_with_events_and_prefault(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    def vmkit(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "vmkit", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def remote(sock: Path, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(sock), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    serial, snap = tmp_path / "serial.log", new_dir(tmp_path / "snap")
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello", "ticks"], "poweroff", ticks=TICKS, tick_ms=20),
        "--memory", "size=128M", "--serial", f"file={serial}", "--console", "off",
    ])  # fmt: skip
    (tmp_path / "vm.json").write_text(config.to_json())
    first_sock, first_events = tmp_path / "first.sock", tmp_path / "first.events"
    first = vmkit("--api-socket", str(first_sock), "--event-monitor", f"path={first_events}")
    try:
        wait_listening(first_sock, timeout=30, process=first)
        remote(first_sock, "create", str(tmp_path / "vm.json"))
        remote(first_sock, "boot")
        deadline = time.monotonic() + 30
        while "tick 3\n" not in (serial.read_text() if serial.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        remote(first_sock, "pause")
        remote(first_sock, "snapshot", f"file://{snap}")
        remote(first_sock, "shutdown-vmm")
        assert first.wait(30) == 0
    finally:
        first.kill()
        first.wait()
    events = event_names(first_events)
    assert events[events.index("vm paused") + 1 :][:2] == ["vm snapshotting", "vm snapshotted"]
    before = serial.read_text()

    second_sock, second_events = tmp_path / "second.sock", tmp_path / "second.events"
    second = vmkit("--api-socket", str(second_sock), "--event-monitor", f"path={second_events}")
    try:
        wait_listening(second_sock, timeout=30, process=second)
        remote(second_sock, "restore", f"source_url=file://{snap},prefault=on")
        assert json.loads(remote(second_sock, "info"))["state"] == "Paused"
        remote(second_sock, "resume")
        assert second.wait(30) == 0  # the guest powered off
    finally:
        second.kill()
        second.wait()
    assert event_names(second_events)[1:3] == ["vm restoring", "vm restored"]
    assert ticks_across(before, serial.read_text()) == list(range(TICKS))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("prefault", [False, True])
def test_prefault_reads_guest_memory_in_at_restore(good_snapshot: Path, prefault: bool) -> None:
    before = _rss_mib()
    vm = Vm.restore(good_snapshot, prefault=prefault)
    try:
        grown = _rss_mib() - before
    finally:
        vm.close()
        vm.release()
    # 128 MiB of guest RAM: mapped and read in up front, or only as touched.
    assert grown > 100 if prefault else grown < 32, grown


def test_clones_in_processes_of_their_own(tmp_path: Path) -> None:
    """One snapshot, three VM processes restored from it at once: each guest
    finishes on its own (their serial port is off: a file would be shared)."""
    snap = new_dir(tmp_path / "snap")
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello", "ticks"], "poweroff", ticks=TICKS, tick_ms=20),
        "--memory", "size=128M", "--serial", "null", "--console", "off",
    ])  # fmt: skip
    vm = Vm(config)
    try:
        vm.boot()
        threading.Event().wait(0.2)
        vm.pause()
        vm.snapshot(snap)
    finally:
        vm.close()
    run_to_poweroff([Vm.spawn(None, restore=snap) for _ in range(3)])
