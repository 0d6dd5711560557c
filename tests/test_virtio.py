"""virtio-pci devices under the vmkit test guest: PCI enumeration (ECAM, two
segments), virtio-rng, virtio-console, virtio-blk (data reaches the host file,
read-only disks refuse writes, serial ids, multi-queue), MSI-X interrupts,
counters, automatic ids, and clear errors for what vmkit does not provide.

They run wherever /dev/kvm works, kvm_pvm included.
"""

from __future__ import annotations

import gc
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import fnv1a64, sector_pattern
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.testguest import GuestResults, parse_results
from vmkit.vm import Vm, VmError, VmExit, VmInfo

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

SECTOR = 512


def image(path: Path, size: int, fill: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        f.write(fill)
    return path


def boot(
    steps: list[str],
    *extra: str,
    cpus: str = "boot=2",
    timeout: float = 60,
    **options: int,
) -> tuple[VmExit, GuestResults, Vm]:
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(steps, "poweroff", **options),
         "--cpus", cpus, "--memory", "size=256M", "--serial", "null", *extra]
    )  # fmt: skip
    vm = Vm(cfg, watchdog_timeout=30)
    try:
        vm.boot()
        exit_info = vm.wait(timeout)
        if exit_info is None:
            pytest.fail(f"the VM did not stop within {timeout} s:\n{vm.serial.text}")
        return exit_info, parse_results(vm.serial.text), vm
    finally:
        vm.close()


def lines(results: GuestResults, prefix: str) -> list[dict[str, str]]:
    found = []
    for line in results.lines:
        if line.startswith(f"vmkit-guest: {prefix} "):
            words = line.split()[3:]
            found.append(dict(w.split("=", 1) for w in words if "=" in w))
    return found


def assert_passed(exit_info: VmExit, results: GuestResults, *steps: str) -> None:
    assert exit_info.reason == "poweroff", (exit_info, results.lines)
    for step in steps:
        assert results.ok(step), results.lines


@pytest.mark.parametrize("fmt", ["pvh", "bzimage"])
def test_every_device_step_passes(
    tmp_path: Path, fmt: testguest.Format, vmkit_vm: VmFactory
) -> None:
    disk = image(tmp_path / "disk.img", 4 << 20)
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path(fmt)),
         "--cmdline", testguest.cmdline(["pci", "rng", "console", "blk", "msix"]),
         "--cpus", "boot=2", "--memory", "size=256M", "--serial", "null",
         "--console", f"file={tmp_path / 'console.txt'}", "--disk", f"path={disk}"]
    )  # fmt: skip
    vm = vmkit_vm(cfg)
    vm.boot()
    exit_info = vm.wait(60)
    assert exit_info is not None
    results = parse_results(vm.serial.text)
    vm.close()
    assert_passed(exit_info, results, "pci", "rng", "console", "blk", "msix")
    # Console (its transmit queue), disk and rng: each queue's vector fired.
    # No interrupt on a queue with nothing in flight.
    assert results.values("msix") == {"devices": "3", "vectors": "3", "spurious": "0"}
    # The console step's line, then the one msix sends on the transmit queue.
    assert (tmp_path / "console.txt").read_text() == (
        "vmkit-guest: virtio-console hello\nvmkit-guest: virtio-console msix\n"
    )


def test_pci_layout_follows_cloud_hypervisor(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img", 1 << 20)
    exit_info, results, _ = boot(["pci"], "--console", "null", "--disk", f"path={disk}")
    assert_passed(exit_info, results, "pci")
    devices = {d["bdf"]: d for d in lines(results, "pci dev")}
    # Host bridge at 00.0, then console, disks, rng (Cloud Hypervisor's order).
    assert devices["0000:00:00.0"]["vendor"] == "0x8086"
    assert devices["0000:00:00.0"]["class"] == "0x060000"
    kinds = [(bdf, d["device"]) for bdf, d in sorted(devices.items()) if d["vendor"] == "0x1af4"]
    assert kinds == [
        ("0000:00:01.0", "0x1043"),
        ("0000:00:02.0", "0x1042"),
        ("0000:00:03.0", "0x1044"),
    ]
    # Modern-only virtio: one 512 KiB memory BAR each, from the top of the windows
    # down; the disk (on segment 0) has a 32-bit one, the others 64-bit ones.
    assert devices["0000:00:02.0"]["bar0"] == "0xe7f80000/0x80000"
    console, rng = (devices[bdf]["bar0"].split("/") for bdf in ("0000:00:01.0", "0000:00:03.0"))
    assert console[1] == rng[1] == "0x80000,64"
    assert int(rng[0], 16) == int(console[0], 16) - 0x80000 >= 1 << 32


def test_two_disks_on_two_pci_segments(tmp_path: Path) -> None:
    first = image(tmp_path / "a.img", 2 << 20)
    second = image(tmp_path / "b.img", 3 << 20)
    exit_info, results, _ = boot(
        ["pci", "blk"],
        "--console", "off",
        "--platform", "num_pci_segments=2",
        "--disk", f"path={first},id=first", f"path={second},id=second,pci_segment=1",
    )  # fmt: skip
    assert_passed(exit_info, results, "pci", "blk")
    assert results.values("pci")["segments"] == "2"
    disks = {d["bdf"]: d for d in lines(results, "blk dev")}
    assert disks["0000:00:01.0"]["capacity"] == str((2 << 20) // SECTOR)
    assert disks["0001:00:01.0"]["capacity"] == str((3 << 20) // SECTOR)
    for path in (first, second):
        data = path.read_bytes()
        assert data[:SECTOR] == sector_pattern(0, SECTOR)


def test_guest_reads_host_data_and_its_flushed_writes_reach_the_file(tmp_path: Path) -> None:
    sector, count = 100, 8
    host_data = os.urandom(count * SECTOR)
    disk = image(tmp_path / "disk.img", 1 << 20)
    with disk.open("r+b") as f:
        f.seek(sector * SECTOR)
        f.write(host_data)
    exit_info, results, _ = boot(
        ["blk"], "--console", "off", "--disk", f"path={disk},serial=vmkit-disk-0",
        blk_sector=sector, blk_count=count,
    )  # fmt: skip
    assert_passed(exit_info, results, "blk")
    (dev,) = lines(results, "blk dev")
    assert dev["serial"] == "vmkit-disk-0" and dev["ro"] == "0" and dev["queues"] == "1"
    (read,) = lines(results, "blk read")
    assert int(read["fnv"], 16) == fnv1a64(host_data)
    (write,) = lines(results, "blk write")
    assert write["flushed"] == "1" and write["verified"] == "1"
    data = disk.read_bytes()
    expected = sector_pattern(sector, count * SECTOR)
    assert data[sector * SECTOR : (sector + count) * SECTOR] == expected
    # Nothing outside the range was touched.
    assert data[: sector * SECTOR] == bytes(sector * SECTOR)
    assert data[(sector + count) * SECTOR :] == bytes(len(data) - (sector + count) * SECTOR)


def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    content = os.urandom(64 * SECTOR)
    disk = tmp_path / "ro.img"
    disk.write_bytes(content)
    exit_info, results, _ = boot(["blk"], "--console", "off", "--disk", f"path={disk},readonly=on")
    assert_passed(exit_info, results, "blk")
    (dev,) = lines(results, "blk dev")
    assert dev["ro"] == "1"
    (refused,) = lines(results, "blk readonly")
    assert refused["write_status"] == "1"  # VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == content


def test_multi_queue_disk_serves_every_queue(tmp_path: Path) -> None:
    disk = image(tmp_path / "mq.img", 1 << 20)
    exit_info, results, _ = boot(
        ["blk"], "--console", "off", "--disk", f"path={disk},num_queues=4", cpus="boot=4"
    )
    assert_passed(exit_info, results, "blk")
    (dev,) = lines(results, "blk dev")
    assert dev["queues"] == "4"


def test_long_serial_ids_are_cut_to_twenty_bytes(tmp_path: Path) -> None:
    disk = image(tmp_path / "s.img", 1 << 20)
    serial = "abcdefghijklmnopqrstuvwxyz"
    exit_info, results, _ = boot(
        ["blk"], "--console", "off", "--disk", f"path={disk},serial={serial}"
    )
    assert_passed(exit_info, results, "blk")
    assert lines(results, "blk dev")[0]["serial"] == serial[:20]


def test_default_serial_is_cloud_hypervisors(tmp_path: Path) -> None:
    # Cloud Hypervisor v37 answers GET_ID with st_dev, st_rdev and st_ino run
    # together in decimal (checked against the real one).
    disk = image(tmp_path / "d.img", 1 << 20)
    exit_info, results, _ = boot(["blk"], "--console", "off", "--disk", f"path={disk}")
    assert_passed(exit_info, results, "blk")
    st = disk.stat()
    assert lines(results, "blk dev")[0]["serial"] == f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]


def test_counters_ids_and_device_tree(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    first = image(tmp_path / "a.img", 1 << 20)
    second = image(tmp_path / "b.img", 1 << 20)
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["blk", "ticks"], "poweroff", ticks=200, tick_ms=20),
         "--cpus", "boot=2", "--memory", "size=256M", "--serial", "null", "--console", "off",
         "--disk", f"path={first}", f"path={second},id=named"]
    )  # fmt: skip
    vm = vmkit_vm(cfg)
    before = vm.info()
    assert isinstance(before, VmInfo) and before.device_tree is None
    assert before.config.disks is not None
    assert [d.id for d in before.config.disks] == [None, "named"]
    with pytest.raises(VmError, match="VM is not running"):
        vm.counters()
    vm.boot()
    vm.serial.wait_for(r"step blk ok", timeout=30)
    info = vm.info()
    assert info.config.disks is not None
    assert [d.id for d in info.config.disks] == ["_disk0", "named"]
    tree = info.device_tree
    assert tree is not None
    # Cloud Hypervisor's nodes: the PCI function holds the BDF and BARs.
    assert tree["_virtio-pci-_disk0"]["pci_bdf"] == "0000:00:01.0"
    assert tree["_virtio-pci-named"]["pci_bdf"] == "0000:00:02.0"
    assert tree["_virtio-pci-__rng"]["pci_bdf"] == "0000:00:03.0"
    assert tree["named"]["parent"] == "_virtio-pci-named"
    bar = tree["_virtio-pci-_disk0"]["resources"][0]["PciBar"]
    # A disk on segment 0 has a 32-bit BAR, at the top of the 32-bit window.
    assert bar == {
        "index": 0, "base": 0xE7F8_0000, "size": 0x80000, "type_": "Mmio32",
        "prefetchable": False,
    }  # fmt: skip
    counters = vm.counters()
    assert set(counters) == {"_disk0", "named"}
    disk0 = counters["_disk0"]
    # The blk step: a GET_ID, a read of 8 sectors, a write, a flush, a read back.
    assert disk0["write_ops"] >= 1 and disk0["write_bytes"] >= 8 * SECTOR
    assert disk0["read_ops"] >= 2 and disk0["read_bytes"] >= 16 * SECTOR
    assert disk0["read_latency_min"] <= disk0["read_latency_avg"] <= disk0["read_latency_max"]
    assert set(disk0) == {
        "read_bytes", "write_bytes", "read_ops", "write_ops",
        "read_latency_min", "read_latency_max", "read_latency_avg",
        "write_latency_min", "write_latency_max", "write_latency_avg",
    }  # fmt: skip
    vm.shutdown()


def test_console_modes(tmp_path: Path) -> None:
    # null: the device exists and swallows output.
    exit_info, results, _ = boot(["console"], "--console", "null")
    assert_passed(exit_info, results, "console")
    # off: no device at all.
    exit_info, results, _ = boot(["console"], "--console", "off")
    assert not results.ok("console")
    assert "no virtio-console" in results.steps["console"][2]


def test_console_pty_carries_output(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["ticks", "console"], "poweroff", ticks=25, tick_ms=20),
         "--memory", "size=128M", "--serial", "null", "--console", "pty"]
    )  # fmt: skip
    got = bytearray()
    vm = vmkit_vm(cfg)
    vm.boot()
    pty = vm.console_pty
    assert pty and Path(pty).exists()
    fd = os.open(pty, os.O_RDONLY | os.O_NOCTTY)
    try:
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                got.extend(chunk)
                if b"hello" in got:
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        exit_info = vm.wait(30)
        thread.join(5)
        done.set()
    finally:
        os.close(fd)
    vm.close()
    assert exit_info is not None and exit_info.reason == "poweroff"
    assert b"vmkit-guest: virtio-console hello" in got


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--disk", "path=/nonexistent/disk.img"], r"_disk0.*/nonexistent/disk\.img"),
        (["--rng", "src=/nonexistent/entropy"], r"entropy source /nonexistent/entropy"),
    ],
)
def test_unavailable_devices_fail_clearly(argv: list[str], message: str) -> None:
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")), "--console", "off", *argv]
    )
    with pytest.raises(VmError, match=message):
        with Vm(cfg) as vm:
            vm.boot()


def test_disk_cycles_leak_nothing(tmp_path: Path) -> None:
    disk = image(tmp_path / "d.img", 1 << 20)
    argv = ["--console", "null", "--disk", f"path={disk},num_queues=2"]

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    boot(["blk"], *argv)
    gc.collect()
    fd_count, thread_count = fds(), threading.active_count()
    task_count = len(os.listdir("/proc/self/task"))
    for _ in range(10):
        exit_info, results, vm = boot(["rng", "blk", "console"], *argv)
        assert_passed(exit_info, results, "blk")
        del vm
    gc.collect()
    assert fds() == fd_count
    assert threading.active_count() == thread_count
    assert len(os.listdir("/proc/self/task")) == task_count


def test_default_platform_has_the_rng_alone() -> None:
    exit_info, results, _ = boot(["pci", "rng"], "--console", "off")
    assert_passed(exit_info, results, "pci", "rng")
    functions = [(d["bdf"], d["device"]) for d in lines(results, "pci dev")]
    assert functions == [("0000:00:00.0", "0x0d57"), ("0000:00:01.0", "0x1044")]
    assert re.fullmatch(r"0x[0-9a-f]+/0x80000,64", lines(results, "pci dev")[1]["bar0"])


def blkbench(disk_options: str, path: Path, **options: int | str) -> tuple[int, int]:
    """(requests, guest-timed ns) of one blkbench run on a disk at `path`."""
    cfg = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["blkbench"], "poweroff", **options),
         "--cpus", "boot=1", "--memory", "size=256M", "--serial", "null", "--console", "off",
         "--disk", f"path={path},queue_size=256{disk_options}"]
    )  # fmt: skip
    with Vm(cfg) as vm:
        vm.boot()
        exit_info = vm.wait(120)
        results = parse_results(vm.serial.text)
    assert exit_info is not None and results.ok("blkbench"), results.lines
    values = results.values("blkbench")
    return int(values["requests"]), int(values["ns"])


def slot_pattern(slot: int, size: int) -> bytes:
    """What blkbench's write mode keeps in buffer `slot` (guest/README.md)."""
    return b"".join(
        struct.pack("<Q", 0x564D4B4954000000 ^ (slot << 16) ^ j) for j in range(size // 8)
    )


@pytest.mark.parametrize("engine", ["", ",_disable_io_uring=on"], ids=["io_uring", "sync"])
def test_writes_in_flight_together_land_where_the_guest_put_them(
    tmp_path: Path, engine: str
) -> None:
    # 32 requests in flight, written once over the whole disk: the VMM merges
    # the contiguous ones, and each must still land at its own offset.
    size, depth = 64 << 10, 32
    disk = image(tmp_path / "merge.img", 8 << 20)
    count = (8 << 20) // size
    requests, _ = blkbench(
        engine, disk,
        blkbench_mode="write", blkbench_size=size, blkbench_depth=depth, blkbench_count=count,
    )  # fmt: skip
    assert requests == count
    data = disk.read_bytes()
    slots = {slot_pattern(slot, size): slot for slot in range(depth)}
    written = [slots.get(data[i * size : (i + 1) * size]) for i in range(count)]
    assert None not in written, [i for i, slot in enumerate(written) if slot is None]
    # The first batch went out from slots 0, 1, ... in order.
    assert written[:depth] == list(range(depth))


@pytest.mark.parametrize(
    ("limit", "mode", "size", "depth", "count", "rate"),
    [
        # 100 operations per 100 ms: 1000 IOPS.
        (",ops_size=100,ops_refill_time=100", "randread", 4096, 1, 3000, 1000.0),
        # 4 MiB per 100 ms, counted in bytes.
        (",bw_size=4194304,bw_refill_time=100", "read", 65536, 4, 2000, 41943040.0),
    ],
    ids=["ops", "bandwidth"],
)
def test_rate_limits_hold_within_ten_percent(
    tmp_path: Path, limit: str, mode: str, size: int, depth: int, count: int, rate: float
) -> None:
    disk = image(tmp_path / "rl.img", 32 << 20)
    requests, ns = blkbench(
        limit, disk,
        blkbench_mode=mode, blkbench_size=size, blkbench_depth=depth, blkbench_count=count,
    )  # fmt: skip
    seconds = ns / 1e9
    measured = requests / seconds if "ops" in limit else requests * size / seconds
    # The bucket starts full, so the first `size` tokens pass at once: the
    # long-run rate still must hold within 10 %.
    assert abs(measured / rate - 1) < 0.10, (measured, rate, seconds)


def test_unlimited_disk_is_much_faster_than_the_limit(tmp_path: Path) -> None:
    disk = image(tmp_path / "fast.img", 32 << 20)
    requests, ns = blkbench("", disk, blkbench_mode="randread", blkbench_count=3000)
    assert requests / (ns / 1e9) > 5 * 1000


def _own_cgroup_v2_dir() -> Path | None:
    """This process's cgroup v2 directory, where a v2 hierarchy is mounted
    whole (its root shown at the mount point)."""
    own = next(
        (line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
         if line.startswith("0::")),
        None,
    )  # fmt: skip
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, filesystem = line.partition(" - ")
        fields = mount.split()
        if filesystem.split()[:1] == ["cgroup2"] and fields[3] == "/" and own is not None:
            return Path(fields[4]) / own.lstrip("/")
    return None


def test_disk_queues_watch_their_own_cgroup_v2_cpu_pressure(tmp_path: Path) -> None:
    # A VMM in a cgroup of its own (a container, a service) judges whether
    # the CPUs are contended by its own tasks' waits: the host's figure
    # counts any two tasks sharing a CPU anywhere.
    parent = _own_cgroup_v2_dir()
    if parent is None:
        pytest.skip("no cgroup v2 hierarchy is mounted here")
    child = parent / f"vmkit-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup in {parent}: {e.strerror}")
    try:
        disk = image(tmp_path / "disk.img", 1 << 20)
        argv = [
            sys.executable, "-m", "vmkit", "-vv",
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", testguest.cmdline(["hello"], exit="poweroff"),
            "--disk", f"path={disk}", "--serial", "null", "--console", "off",
        ]  # fmt: skip
        # The shell moves itself into the cgroup, then becomes the VMM.
        enter = 'echo 0 > "$1" && shift && exec "$@"'
        done = subprocess.run(
            ["sh", "-c", enter, "sh", str(child / "cgroup.procs"), *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        source = f"disk queues watch the CPU pressure in {child / 'cpu.pressure'}"
        assert source in done.stderr, done.stderr[-2000:]
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                child.rmdir()
                break
            except OSError:  # its last process is still on its way out
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
