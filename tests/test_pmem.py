"""virtio-pmem: a host file mapped into the guest beside its RAM, beside the real
Cloud Hypervisor where it is at hand.

The guest's ``pmem`` step reads each region's place from the device (start,
size), hashes ``pmem_bytes`` at ``pmem_offset`` as it finds them, writes the
blk step's sector pattern there, reads it back and sends FLUSH. The host then
finds the pattern in the file, or, with ``discard_writes=on``, the file as it
was.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote
from _helpers import fnv1a64, sector_pattern
from vmkit import VmConfig, testguest
from vmkit.client import spawn
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

MIB = 1 << 20
OFFSET = 8192
BYTES = 16384


def seeded_file(path: Path, size: int) -> bytes:
    """A file of ``size`` bytes with recognisable contents; returns them."""
    data = bytes((i * 13 + 5) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


def guest_args(
    image: testguest.Format, pmem: list[str], steps: tuple[str, ...] = ("pmem",)
) -> list[str]:
    return [
        "--kernel", str(testguest.image_path(image)),
        "--cmdline", testguest.cmdline(
            list(steps), "poweroff", pmem_offset=OFFSET, pmem_bytes=BYTES, ticks=25, tick_ms=20
        ),
        "--memory", "size=128M",
        "--serial", "tty", "--console", "off",
        "--pmem", *pmem,
    ]  # fmt: skip


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_the_guest_writes_reach_the_file_and_discarded_ones_do_not(
    tmp_path: Path,
    image: testguest.Format,
    vmkit_vm: VmFactory,
) -> None:
    shared, private = tmp_path / "shared.img", tmp_path / "private.img"
    before = seeded_file(shared, 4 * MIB)
    seeded_file(private, 2 * MIB)
    private_before = private.read_bytes()
    config = VmConfig.from_cli(
        guest_args(
            image, [f"file={shared}", f"file={private},discard_writes=on"], ("pmem", "ticks")
        )
    )
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for("step pmem", timeout=30)
    tree = vm.info().device_tree
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    text = vm.serial.text
    vm.close()
    assert "step pmem ok devices=2" in text and "summary passed=2 failed=0" in text, text
    hashes = [
        int(h, 16) for h in re.findall(r"^vmkit-guest: pmem dev .* fnv=(0x[0-9a-f]+)$", text, re.M)
    ]
    expected = fnv1a64(before[OFFSET : OFFSET + BYTES])
    assert hashes == [expected, fnv1a64(private_before[OFFSET : OFFSET + BYTES])]
    after = shared.read_bytes()
    assert after[OFFSET : OFFSET + BYTES] == sector_pattern(OFFSET // 512, BYTES)
    assert after[:OFFSET] == before[:OFFSET] and after[OFFSET + BYTES :] == before[OFFSET + BYTES :]
    assert private.read_bytes() == private_before, "discard_writes=on changed the file"
    assert tree is not None
    regions = [tree[id_]["resources"][0]["MmioAddressRange"] for id_ in ("_pmem0", "_pmem1")]
    assert [r["size"] for r in regions] == [4 * MIB, 2 * MIB]
    assert all(r["base"] % (2 * MIB) == 0 for r in regions)
    starts = [int(a, 16) for a in re.findall(r"pmem dev .* start=(0x[0-9a-f]+)", text)]
    assert starts == [r["base"] for r in regions], "the guest finds them where info() says"


def test_a_folder_with_a_size_gets_a_temporary_file(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    folder = tmp_path / "pmem"
    folder.mkdir()
    config = VmConfig.from_cli(guest_args("pvh", [f"file={folder},size=4M"]))
    vm = vmkit_vm(config)
    vm.boot()
    exit_info = vm.wait(30)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    assert "size=0x400000 fnv=" in vm.serial.text
    assert "step pmem ok devices=1" in vm.serial.text
    vm.close()
    assert list(folder.iterdir()) == [], "the temporary file has no name and is gone"


@pytest.mark.parametrize(
    ("make", "option", "message"),
    [
        (lambda p: p.write_bytes(bytes(3 * MIB)), "file={p}",
         "{p}: size 3145728 is not a multiple of 2 MiB (PmemSizeNotAligned)"),
        (lambda p: p.write_bytes(bytes(2 * MIB)), "file={p},size=4M",
         "{p}: size 4194304 is past the end of the file (2097152 bytes) (MappingPastEof)"),
        (lambda p: None, "file={p}", "cannot open {p}: No such file or directory (os error 2)"),
        (lambda p: p.mkdir(), "file={p}",
         "{p} is a directory: give size= for a temporary file there "
         "(PmemWithDirectorySizeMissing)"),
    ],
)  # fmt: skip
def test_files_cloud_hypervisor_refuses_are_refused_with_the_reason(
    tmp_path: Path, make: object, option: str, message: str
) -> None:
    path = tmp_path / "pmem"
    make(path)  # type: ignore[operator]
    config = VmConfig.from_cli(guest_args("pvh", [option.format(p=path)]))
    with Vm(config) as vm, pytest.raises(VmError) as e:
        vm.boot()
    assert e.value.kind == "Device"
    assert str(e.value) == "Error creating pmem device: " + message.format(p=path)


def test_a_pmem_added_before_boot_through_the_api(tmp_path: Path) -> None:
    pmem = tmp_path / "added.img"
    before = seeded_file(pmem, 2 * MIB)
    config = VmConfig.from_cli(guest_args("pvh", [f"file={tmp_path / 'unused'}"]))
    config.pmem = None
    config.serial.mode = "File"
    config.serial.file = str(tmp_path / "serial.log")
    with spawn(config) as vm:
        assert vm.client.add_pmem(f"file={pmem}") is None, "a cold add answers 204"
        vm.boot()
        exit_info = vm.wait(30)
        assert exit_info is not None and exit_info.reason == "poweroff"
    text = (tmp_path / "serial.log").read_text()
    assert "step pmem ok devices=1" in text, text
    assert pmem.read_bytes()[OFFSET : OFFSET + BYTES] == sector_pattern(OFFSET // 512, BYTES)
    assert pmem.read_bytes()[:OFFSET] == before[:OFFSET]


def test_a_restored_vm_maps_the_same_file(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    pmem = tmp_path / "p.img"
    seeded_file(pmem, 2 * MIB)
    config = VmConfig.from_cli(
        [
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", testguest.cmdline(
                ["ticks", "pmem"], "poweroff", ticks=40, tick_ms=20, pmem_offset=OFFSET,
                pmem_bytes=BYTES,
            ),
            "--memory", "size=128M",
            "--serial", "tty", "--console", "off",
            "--pmem", f"file={pmem}",
        ]
    )  # fmt: skip
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    vm = vmkit_vm(config)
    vm.boot()
    vm.serial.wait_for(r"tick 5$", timeout=30)
    vm.pause()
    tree = vm.info().device_tree
    vm.snapshot(snapshot)
    vm.close()
    with Vm.restore(snapshot) as restored:
        assert restored.info().device_tree == tree
        restored.resume()
        exit_info = restored.wait(30)
        assert exit_info is not None and exit_info.reason == "poweroff"
        assert "step pmem ok devices=1" in restored.serial.text, restored.serial.text
    assert pmem.read_bytes()[OFFSET : OFFSET + BYTES] == sector_pattern(OFFSET // 512, BYTES)


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_cloud_hypervisor_and_vmkit_give_the_guest_the_same_regions(tmp_path: Path) -> None:
    # Two regions and a disk on both VMMs: the same addresses, ids, device
    # tree, guest output and file contents afterwards.
    outputs, trees, files = {}, {}, {}
    for kind in ("ch", "vmkit"):
        shared, private = tmp_path / f"{kind}-a.img", tmp_path / f"{kind}-b.img"
        seeded_file(shared, 4 * MIB)
        seeded_file(private, 2 * MIB)
        disk = tmp_path / f"{kind}-disk.img"
        disk.write_bytes(bytes(MIB))
        serial = tmp_path / f"{kind}-serial.txt"
        process = VmmProcess(
            kind, tmp_path / f"{kind}.sock", tmp_path / f"{kind}.log",
            (
                "--kernel", str(testguest.image_path("pvh")),
                "--cmdline", testguest.cmdline(
                    ["pci", "pmem", "ticks"], "poweroff", pmem_offset=OFFSET, pmem_bytes=BYTES,
                    ticks=1000, tick_ms=20,
                ),
                "--memory", "size=256M",
                "--serial", f"file={serial}", "--console", "off",
                "--disk", f"path={disk}",
                "--pmem", f"file={shared}", f"file={private},discard_writes=on",
            ),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "step pmem" not in (serial.read_text() if serial.exists() else ""):
                assert time.monotonic() < deadline, process.log
                time.sleep(0.02)
            status, out, err = ch_remote(process.socket_path, "info")
            assert status == 0, err
            trees[kind] = json.loads(out)["device_tree"]
        finally:
            process.stop()
        shown = ("vmkit-guest: pci dev", "vmkit-guest: pmem", "vmkit-guest: step pmem")
        outputs[kind] = [line for line in serial.read_text().splitlines() if line.startswith(shown)]
        files[kind] = (shared.read_bytes(), private.read_bytes())
    assert outputs["vmkit"] == outputs["ch"]
    assert "vmkit-guest: step pmem ok devices=2" in outputs["vmkit"]
    assert trees["vmkit"] == trees["ch"]
    assert trees["vmkit"]["_pmem1"]["resources"][0]["MmioAddressRange"]["size"] == 4 * MIB
    assert files["vmkit"] == files["ch"]
