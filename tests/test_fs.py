"""virtio-fs: the test guest's FUSE client against virtiofsd, through vmkit's
vhost-user frontend, beside the real Cloud Hypervisor where it is at hand.

The guest's ``fs`` step reads ``host.txt`` from the shared folder's root and
prints its length and FNV-1a hash, then creates ``guest.txt`` there and writes
``fs_bytes`` of the blk step's sector pattern to it (FSYNC, FLUSH, RELEASE),
and reads its size back with GETATTR (guest/README.md).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_binary, ch_remote
from _helpers import fnv1a64, sector_pattern
from _sockets import wait_listening
from _vuproxy import ProtocolFeatureMask
from vmkit import VmConfig, testguest
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm


def _find_virtiofsd() -> str | None:
    found = shutil.which("virtiofsd")
    if found:
        return found
    for candidate in (Path.home() / ".cargo/bin/virtiofsd", Path("/usr/libexec/virtiofsd")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


VIRTIOFSD = _find_virtiofsd()
if VIRTIOFSD is None:
    pytest.skip(
        "virtiofsd is not installed (PATH, ~/.cargo/bin, /usr/libexec): `cargo install virtiofsd`",
        allow_module_level=True,
    )

HOST_BYTES = 100_003  # two 64 KiB READs and a short one
WRITE_BYTES = 70_144  # two WRITEs: 64 KiB and the rest (a multiple of 512)
TAG = "vmkitfs"


class Virtiofsd:
    """virtiofsd serving ``share`` on ``socket`` (it ends when its frontend goes)."""

    def __init__(self, share: Path, socket_path: Path, log: Path) -> None:
        assert VIRTIOFSD is not None
        self.socket_path = socket_path
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    VIRTIOFSD, f"--socket-path={socket_path}", f"--shared-dir={share}",
                    "--cache=never", "--sandbox=none",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_listening(socket_path, process=self.proc, why_not=lambda: f"log {self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    folder = tmp_path / "share"
    folder.mkdir()
    data = os.urandom(HOST_BYTES)
    (folder / "host.txt").write_bytes(data)
    yield folder, data


def guest_argv(
    socket_path: Path, image: testguest.Format = "pvh", **options: int | str
) -> list[str]:
    steps = options.pop("steps", "fs")
    return [
        "--kernel", str(testguest.image_path(image)),
        "--cmdline", testguest.cmdline(str(steps).split(","), "poweroff", **options),
        "--memory", "size=256M,shared=on",
        "--fs", f"tag={TAG},socket={socket_path},num_queues=1,queue_size=1024",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def fs_lines(text: str) -> list[str]:
    shown = ("vmkit-guest: fs ", "vmkit-guest: step fs ")
    return [line for line in text.splitlines() if line.startswith(shown)]


def words(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture(scope="module")
def warm_vmkit() -> None:
    """Boots a VM without devices once: the first VM in a process starts vmkit's
    process-wide threads and descriptors (log, spawner, /dev/kvm), which must not
    count as the fs VM's."""
    boot_vmkit(
        ["--kernel", str(testguest.image_path("pvh")), "--serial", "tty", "--console", "off"]
    )


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def boot_vmkit(argv: list[str]) -> str:
    with Vm(VmConfig.from_cli(argv)) as vm:
        vm.boot()
        exit_info = vm.wait(60)
        assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
        return vm.serial.text


@pytest.mark.parametrize("image", ["pvh", "bzimage"])
def test_the_guest_reads_the_host_file_and_its_writes_reach_the_host(
    tmp_path: Path, share: tuple[Path, bytes], image: testguest.Format, warm_vmkit: None
) -> None:
    folder, data = share
    gc.collect()  # earlier tests' objects, so that only this VM's threads and fds count
    threads, fds = os_threads(), open_fds()
    daemon = Virtiofsd(folder, tmp_path / "fs.sock", tmp_path / "virtiofsd.log")
    try:
        # Twice: the device reset at the end of the first run ends the FUSE
        # session, and the second starts a new one with INIT.
        text = boot_vmkit(
            guest_argv(daemon.socket_path, image, steps="fs,fs", fs_bytes=WRITE_BYTES)
        )
        assert daemon.wait(10) == 0, "virtiofsd ends cleanly when its frontend goes"
    finally:
        daemon.stop()
    lines = fs_lines(text)
    assert len(lines) == 12 and lines[:6] == lines[6:], text
    tag, init, read, write, attr, step = (words(line) for line in lines[:6])
    assert tag["tag"] == TAG and tag["request_queues"] == "1"
    assert init["major"] == "7" and int(init["minor"]) >= 31 and int(init["max_write"]) >= 4096
    assert read == {"name": "host.txt", "len": str(HOST_BYTES), "fnv": f"0x{fnv1a64(data):016x}"}
    assert write == {"name": "guest.txt", "len": str(WRITE_BYTES), "fsync": "1"}
    assert attr == {"name": "guest.txt", "size": str(WRITE_BYTES), "mode": "0x81a4"}
    assert lines[5] == f"vmkit-guest: step fs ok read={HOST_BYTES} written={WRITE_BYTES}"
    assert step == {"read": str(HOST_BYTES), "written": str(WRITE_BYTES)}
    written = folder / "guest.txt"
    assert written.read_bytes() == sector_pattern(0, WRITE_BYTES)
    assert written.stat().st_mode & 0o777 == 0o644
    assert (folder / "host.txt").read_bytes() == data, "the read changed nothing"
    deadline = time.monotonic() + 5
    while os_threads() != threads:  # the VM's threads may take a moment to be reaped
        assert time.monotonic() < deadline, f"{os_threads()} threads, {threads} before"
        time.sleep(0.05)
    assert open_fds() <= fds, "a descriptor was left open"


def test_a_missing_host_file_fails_the_step_with_enoent(
    tmp_path: Path, share: tuple[Path, bytes]
) -> None:
    folder, _ = share
    daemon = Virtiofsd(folder, tmp_path / "fs.sock", tmp_path / "virtiofsd.log")
    try:
        text = boot_vmkit(guest_argv(daemon.socket_path, steps="fs,hello", fs_read="absent.txt"))
        assert daemon.wait(10) == 0
    finally:
        daemon.stop()
    assert "vmkit-guest: step fs fail LOOKUP error=-2" in text.splitlines(), text
    assert "vmkit-guest: step hello ok" in text, "the guest goes on after the failure"
    assert not (folder / "guest.txt").exists(), "the step stops at the first failure"


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_cloud_hypervisor_and_vmkit_show_the_guest_the_same_files(tmp_path: Path) -> None:
    # The same host file and command line under both VMMs, each with its own
    # virtiofsd: the same guest output and the same file written. v37 does
    # not accept the DEVICE_STATE protocol feature that virtiofsd >= 1.11
    # offers (_vuproxy.py), so its virtiofsd is reached through a relay that
    # hides it; vmkit talks to virtiofsd directly.
    data = os.urandom(HOST_BYTES)
    outputs, files = {}, {}
    for kind in ("ch", "vmkit"):
        folder = tmp_path / f"{kind}-share"
        folder.mkdir()
        (folder / "host.txt").write_bytes(data)
        daemon = Virtiofsd(folder, tmp_path / f"{kind}-fs.sock", tmp_path / f"{kind}-fs.log")
        try:
            if kind == "vmkit":
                text = boot_vmkit(guest_argv(daemon.socket_path, fs_bytes=WRITE_BYTES))
            else:
                with ProtocolFeatureMask(tmp_path / "ch-relay.sock", daemon.socket_path) as relay:
                    argv = guest_argv(relay.path, fs_bytes=WRITE_BYTES)
                    result = subprocess.run(
                        [ch_binary("cloud-hypervisor"), *argv],
                        capture_output=True, text=True, timeout=60, check=False,
                    )  # fmt: skip
                    assert result.returncode == 0, result.stderr
                    text = result.stdout
                assert relay.error is None, relay.error
            assert daemon.wait(10) == 0, daemon.log
        finally:
            daemon.stop()
        outputs[kind] = fs_lines(text)
        files[kind] = (folder / "guest.txt").read_bytes()
    read = f"vmkit-guest: fs read name=host.txt len={HOST_BYTES} fnv=0x{fnv1a64(data):016x}"
    assert outputs["vmkit"] == outputs["ch"]
    assert read in outputs["ch"], outputs["ch"]
    assert outputs["ch"][-1] == f"vmkit-guest: step fs ok read={HOST_BYTES} written={WRITE_BYTES}"
    assert files["vmkit"] == files["ch"] == sector_pattern(0, WRITE_BYTES)


def test_a_socket_that_cannot_be_reached_fails_naming_fs_the_id_and_the_path(
    tmp_path: Path,
) -> None:
    # A path under a regular file is refused at once (ENOTDIR). A socket
    # nobody listens on is retried for 60 s, as Cloud Hypervisor does, and
    # is not tested here for that reason.
    (tmp_path / "file").write_bytes(b"")
    path = tmp_path / "file" / "fs.sock"
    argv = guest_argv(path)
    argv[argv.index("--fs") + 1] += ",id=share0"
    with Vm(VmConfig.from_cli(argv)) as vm, pytest.raises(VmError) as e:
        vm.boot()
    assert e.value.kind == "Device"
    assert str(e.value).endswith(
        f"--fs share0: cannot connect to the vhost-user backend at {path}: "
        "Not a directory (os error 20)"
    ), str(e.value)


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_ch_remote_adds_a_share_before_boot(tmp_path: Path, share: tuple[Path, bytes]) -> None:
    """The real ch-remote's add-fs on a created vmkit VM: the guest finds the
    share at boot and reads the host's file through it."""
    folder, data = share
    daemon = Virtiofsd(folder, tmp_path / "fs.sock", tmp_path / "virtiofsd.log")
    serial = tmp_path / "serial.log"
    argv = guest_argv(daemon.socket_path)
    at = argv.index("--fs")
    del argv[at : at + 2]
    argv[argv.index("tty")] = f"file={serial}"
    (tmp_path / "vm.json").write_text(VmConfig.from_cli(argv).to_json())
    process = VmmProcess("vmkit", tmp_path / "api.sock", tmp_path / "vmkit.log")
    try:
        assert ch_remote(process.socket_path, "create", str(tmp_path / "vm.json"))[0] == 0
        status, out, err = ch_remote(
            process.socket_path, "add-fs", f"tag={TAG},socket={daemon.socket_path},id=share0"
        )
        assert (status, out, err) == (0, "", ""), process.log
        assert ch_remote(process.socket_path, "boot")[0] == 0, process.log
        deadline = time.monotonic() + 30
        while "vmkit-guest: exit" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline, serial.read_text(errors="replace")
            time.sleep(0.05)
        read = words(next(line for line in fs_lines(serial.read_text()) if " fs read " in line))
        assert int(read["fnv"], 16) == fnv1a64(data)
        assert "step fs ok" in serial.read_text()
    finally:
        process.stop()
        daemon.stop()


def powers_off(vm: Vm, timeout: float = 60) -> str:
    """Resumes the paused ``vm`` until its guest powers off; what it printed."""
    vm.resume()
    exit_info = vm.wait(timeout)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    return vm.serial.text


def test_a_vm_with_a_share_snapshots_and_restores_with_virtiofsds_own_state(
    tmp_path: Path, share: tuple[Path, bytes]
) -> None:
    """The guest reads the host's file over and over through one open handle
    when the VM is snapshotted. virtiofsd gives its state (the inodes and
    handles the guest holds, vhost-user DEVICE_STATE) into the snapshot; the
    snapshotted VM goes on with it, and a VM restored with a fresh virtiofsd
    on the same folder goes on with that handle too."""
    folder, data = share
    sock = tmp_path / "fs.sock"
    config = VmConfig.from_cli(guest_argv(sock, fs_bytes=WRITE_BYTES, fs_rounds=1000))
    snap = tmp_path / "snap"
    snap.mkdir()
    daemon = Virtiofsd(folder, sock, tmp_path / "first.log")
    try:
        with Vm(config) as vm:
            vm.boot()
            assert vm.serial.wait_for("^vmkit-guest: fs init ", timeout=30), vm.serial.text
            time.sleep(0.05)  # into the reads (~1.5 ms a round here)
            vm.pause()
            vm.snapshot(snap)
            assert "step fs" not in vm.serial.text, "the step ended before the snapshot"
            text = powers_off(vm)
            assert "step fs ok" in text, text + daemon.log
        assert daemon.wait(10) == 0, daemon.log
    finally:
        daemon.stop()
    (folder / "guest.txt").unlink()
    daemon = Virtiofsd(folder, sock, tmp_path / "second.log")
    try:
        with Vm.restore(snap) as restored:
            text = powers_off(restored)
        assert "vmkit-guest: ready" not in text, "a second boot"
        assert "step fs ok" in text, text + daemon.log
        read = words(next(line for line in fs_lines(text) if " fs read " in line))
        assert int(read["fnv"], 16) == fnv1a64(data)
    finally:
        daemon.stop()
    assert (folder / "guest.txt").read_bytes() == sector_pattern(0, WRITE_BYTES)


def test_a_share_whose_virtiofsd_keeps_its_state_is_not_snapshotted(
    tmp_path: Path, share: tuple[Path, bytes]
) -> None:
    # A virtiofsd that does not give its state (an older one: the relay
    # hides DEVICE_STATE): a restore could not go on with the guest's files.
    folder, _ = share
    daemon = Virtiofsd(folder, tmp_path / "fs.sock", tmp_path / "virtiofsd.log")
    snap = tmp_path / "snap"
    snap.mkdir()
    try:
        with ProtocolFeatureMask(tmp_path / "relay.sock", daemon.socket_path) as relay:
            # Snapshotted while the guest's FUSE session is open (a device
            # the guest reset holds nothing).
            argv = guest_argv(relay.path, fs_rounds=100000)
            with Vm(VmConfig.from_cli(argv)) as vm:
                vm.boot()
                assert vm.serial.wait_for("^vmkit-guest: fs init ", timeout=30)
                vm.pause()
                with pytest.raises(VmError) as e:
                    vm.snapshot(snap)
                assert e.value.kind == "Snapshot"
                assert str(e.value) == (
                    f"Cannot snapshot the VM: _fs0: the vhost-user backend at {relay.path} "
                    "cannot give its state (protocol feature DEVICE_STATE; virtiofsd has it "
                    "from version 1.11), which holds the guest's open files"
                )
                assert list(snap.iterdir()) == [], "nothing written"
                vm.resume()
                assert vm.state == "Running"
    finally:
        daemon.stop()
