"""Live migration: a running VM moved to another VMM (another process, or
another Vm in this one) without the guest losing a write, what is refused,
and receivers that must not trust what arrives.

The test guest's ``dirty`` step rewrites a region every few milliseconds and
checks, before each rewrite, that every qword still holds the last round's
value: a page the migration fails to send again after the guest wrote it
makes the guest fail, naming the address.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _helpers import event_names, move_spawned_vm
from _sockets import wait_listening
from vmkit import VmConfig, testguest
from vmkit.client import SpawnedVm
from vmkit.vm import Migration, Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

ROUNDS = 120


def dirtying(
    cpus: int = 1,
    memory: str = "size=128M",
    steps: tuple[str, ...] = ("dirty",),
    extra: tuple[str, ...] = (),
    **options: int | str,
) -> VmConfig:
    """The test guest rewriting 32 MiB every 5 ms (checking each round), then powering off."""
    words = {"dirty_mib": 32, "dirty_rounds": ROUNDS, "dirty_ms": 5, **options}
    return VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(list(steps), "poweroff", **words),
        "--cpus", f"boot={cpus}", "--memory", memory,
        "--serial", "tty", "--console", "off", *extra,
    ])  # fmt: skip


def rounds_seen(text: str) -> list[int]:
    prefix = "vmkit-guest: dirty round "
    return [int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]


class Receiver:
    """``Vm.receive_migration`` on ``path`` in a thread: ``vm`` or ``error`` once done."""

    def __init__(self, path: Path, **options: object) -> None:
        self.path = path
        self.vm: Vm | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(options,))
        self.thread.start()
        wait_listening(path)

    def _run(self, options: dict[str, object]) -> None:
        try:
            self.vm = Vm.receive_migration(self.path, **options)  # type: ignore[arg-type]
        except BaseException as e:
            self.error = e

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


def migrate(sender: Vm, path: Path, *, local: bool = False) -> tuple[Migration, Vm]:
    """Migrates ``sender``'s VM to a receiver in this process on ``path``: the
    report and the VM received."""
    receiver = Receiver(path)
    try:
        report = sender.migrate_to(path, local=local)
    except VmError as e:
        receiver.join()
        raise AssertionError(f"{e}; the receiver's error: {receiver.error!r}") from e
    receiver.join()
    assert receiver.error is None, receiver.error
    assert receiver.vm is not None
    return report, receiver.vm


def migrate_mid_run(
    config: VmConfig, sock: Path, *, local: bool = False
) -> tuple[Migration, Vm, str]:
    """Boots ``config``, migrates it to a receiver in this process once the guest
    is 10 rounds in; returns the report, the receiving VM and what the guest
    printed before the move."""
    sender = Vm(config)
    sender.boot()
    assert sender.serial.wait_for("^vmkit-guest: dirty round 10$", timeout=30), sender.serial.text
    report, received = migrate(sender, sock, local=local)
    exit_info = sender.wait(0)
    assert exit_info is not None and exit_info.reason == "migrated", exit_info
    assert sender.state == "Shutdown"
    before = sender.serial.text
    sender.close()
    return report, received, before


def writing_to_disk(vm: Vm) -> None:
    """Waits until the guest's blkbench writes reach the disk: its device is
    started and has requests in flight."""
    deadline = time.monotonic() + 30
    while vm.counters()["_disk0"]["write_ops"] == 0:
        assert time.monotonic() < deadline, vm.serial.text
        time.sleep(0.001)


def finishes(vm: Vm, before: str, steps: int = 1) -> None:
    """The migrated guest runs on to the end: every round once, in order, and
    every check of the previous round's writes passed."""
    assert vm.state == "Running"
    exit_info = vm.wait(timeout=60)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    after = vm.serial.text
    assert f"vmkit-guest: summary passed={steps} failed=0" in after, after
    assert "vmkit-guest: ready" not in after, "the guest booted again"
    # The sender's text may end inside a line that the receiver's completes.
    assert rounds_seen(before + after) == list(range(ROUNDS))
    vm.close()


@pytest.mark.parametrize("cpus", [1, 4])
def test_a_guest_rewriting_memory_moves_without_losing_a_write(tmp_path: Path, cpus: int) -> None:
    steps = ("smp", "dirty") if cpus > 1 else ("dirty",)
    report, vm, before = migrate_mid_run(dirtying(cpus, steps=steps), tmp_path / "m.sock")
    # The region went over while the guest rewrote it, then again as it changed.
    assert report.rounds >= 2, report
    assert report.bytes >= 32 << 20, report
    assert 0 < report.downtime < report.total, report
    assert not report.local
    assert not (tmp_path / "m.sock").exists(), "the receiver leaves its socket behind"
    if cpus > 1:
        assert f"step smp ok cpus={cpus}" in before
    finishes(vm, before, steps=len(steps))


def test_local_migration_hands_shared_memory_over(tmp_path: Path) -> None:
    config = dirtying(memory="size=128M,shared=on")
    report, vm, before = migrate_mid_run(config, tmp_path / "m.sock", local=True)
    assert report.local and report.bytes == 0 and report.rounds == 0, report
    finishes(vm, before)


def test_shared_memory_without_local_is_copied_but_not_its_holes(tmp_path: Path) -> None:
    report, vm, before = migrate_mid_run(
        dirtying(memory="size=128M,shared=on"), tmp_path / "m.sock"
    )
    # The memfd's holes (never written) are skipped, not read.
    assert 32 << 20 <= report.bytes < 100 << 20, report
    finishes(vm, before)


def test_a_shared_memory_file_moves_within_one_host_only_by_hand_over(tmp_path: Path) -> None:
    """A ``file=`` zone mapped shared is the guest's memory itself: copying pages
    into it on the same host would put older contents under the running guest,
    so the receiver refuses (before it opens the file) and the VM runs on; with
    ``local=True`` the file is handed over and the guest goes on, every check
    passing."""
    zone = tmp_path / "zone.mem"
    zone.write_bytes(b"")
    config = dirtying(
        memory="size=16M,shared=on",
        extra=("--memory-zone", f"id=z1,size=32M,file={zone},shared=on"),
    )
    sender = Vm(config)
    try:
        sender.boot()
        assert sender.serial.wait_for("^vmkit-guest: dirty round 10$", timeout=30)
        receiver = Receiver(tmp_path / "m.sock")
        with pytest.raises(VmError) as e:
            sender.migrate_to(tmp_path / "m.sock")
        receiver.join()
        assert (
            f"memory zone z1 is the shared file {zone}, in which the sending VMM on this host "
            "runs the guest: migrate with local=true" in str(e.value)
        ), str(e.value)
        assert sender.state == "Running"
        receiver = Receiver(tmp_path / "m2.sock")
        report = sender.migrate_to(tmp_path / "m2.sock", local=True)
        receiver.join()
        assert receiver.error is None, receiver.error
        assert report.local and report.bytes == 0, report
        before = sender.serial.text
    finally:
        sender.close()
    assert receiver.vm is not None
    finishes(receiver.vm, before)


@pytest.mark.parametrize("cpus", [1, 4])
def test_disk_io_in_flight_completes_across_the_move(tmp_path: Path, cpus: int) -> None:
    """blkbench keeps 16 writes in flight while the VM moves; then the blk step
    writes, flushes and reads back through the receiver's device."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    steps = ("smp", "dirty", "blkbench", "blk") if cpus > 1 else ("dirty", "blkbench", "blk")
    config = dirtying(
        cpus,
        steps=steps,
        extra=("--disk", f"path={disk}"),
        dirty_rounds=ROUNDS,
        # ~2 s here: the move comes right after blkbench starts.
        blkbench_mode="write", blkbench_size=65536, blkbench_depth=16, blkbench_count=300_000,
    )  # fmt: skip
    sender = Vm(config)
    sender.boot()
    assert sender.serial.wait_for("^vmkit-guest: step dirty ok", timeout=30), sender.serial.text
    writing_to_disk(sender)
    receiver = Receiver(tmp_path / "m.sock")
    try:
        sender.migrate_to(tmp_path / "m.sock")
    finally:
        receiver.join()
    assert receiver.error is None, receiver.error
    assert receiver.vm is not None
    before = sender.serial.text
    sender.close()
    assert "step blkbench" not in before, "blkbench ended before the move: make it longer"
    vm = receiver.vm
    exit_info = vm.wait(timeout=120)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    after = vm.serial.text
    assert "step blkbench ok mode=write" in after, after
    assert f"vmkit-guest: summary passed={len(steps)} failed=0" in after, after
    vm.close()


def test_a_refused_or_failed_send_leaves_the_vm_running(tmp_path: Path) -> None:
    vm = Vm(dirtying())
    vm.boot()
    assert vm.serial.wait_for("^vmkit-guest: dirty round 2$", timeout=30)
    with pytest.raises(VmError) as e:
        vm.migrate_to(tmp_path / "absent.sock")
    assert str(e.value) == (
        "Error connecting to UNIX socket: No such file or directory (os error 2)"
    )
    assert e.value.kind == "Migration"
    with pytest.raises(VmError) as e:
        vm.migrate_to(tmp_path / "absent.sock", local=True)
    assert str(e.value) == "Local migration requires shared memory or hugepages enabled"
    # A receiver that refuses after the config: the pages never went.
    with FakeReceiver(tmp_path / "refuses.sock", refuse_on="Config") as fake:
        with pytest.raises(VmError) as e:
            vm.migrate_to(fake.path)
    assert "the receiving VMM refused the migration: no room here" in str(e.value)
    # A receiver that vanishes in the middle of the pages.
    with FakeReceiver(tmp_path / "drops.sock", drop_after_bytes=8 << 20) as fake:
        with pytest.raises(VmError) as e:
            vm.migrate_to(fake.path)
    assert e.value.kind == "Migration", str(e.value)
    assert vm.state == "Running"
    # A receiver that refuses at the very end: it does not run the VM, so it runs on here.
    with FakeReceiver(tmp_path / "late.sock", refuse_on="Complete") as fake:
        with pytest.raises(VmError, match="refused the migration: no room here"):
            vm.migrate_to(fake.path)
    assert vm.state == "Running"
    # The guest never noticed: every round checked out.
    exit_info = vm.wait(timeout=60)
    assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
    assert "vmkit-guest: summary passed=1 failed=0" in vm.serial.text
    vm.close()


def send_in_thread(vm: Vm | SpawnedVm, path: Path) -> tuple[threading.Thread, list[BaseException]]:
    """``vm.migrate_to(path)`` on a thread (started); the list gets its error."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            vm.migrate_to(path)
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    return sender, errors


def test_a_guest_that_powers_off_during_a_send_is_the_error_given(tmp_path: Path) -> None:
    """The guest powering off mid-migration ends the send with that reason,
    not with a refusal that this side's hang-up drew from the receiver."""
    vm = Vm(dirtying(dirty_rounds=10))
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: dirty round 2$", timeout=30)
        held = threading.Event()
        with FakeReceiver(tmp_path / "held.sock", hold=held) as fake:
            sender, errors = send_in_thread(vm, fake.path)
            try:
                # The pages wait in a full socket while the guest ends.
                deadline = time.monotonic() + 30
                while "vmkit-guest: summary passed=1" not in vm.serial.text:
                    assert time.monotonic() < deadline, vm.serial.text
                    time.sleep(0.01)
            finally:
                held.set()
                sender.join(30)
        assert [str(e) for e in errors] == [
            "the VM stopped during the migration: The guest powered off"
        ]
        assert isinstance(errors[0], VmError) and errors[0].kind == "Migration"
    finally:
        vm.close()


@pytest.mark.parametrize("spawned", [False, True], ids=["in-process", "spawned"])
def test_a_stalled_migration_holds_up_no_state_wait_or_serial_wait(
    tmp_path: Path, spawned: bool
) -> None:
    """While a send waits on a receiver that reads nothing, other threads
    still get the VM's state at once, ``wait(timeout)`` returns on time, and
    ``serial.wait_for`` times out on time; ``info()`` waits for the send, as
    Cloud Hypervisor's API requests do. A spawned VM's API is served in this
    program, and the send holds it and the VM process's channel."""
    import faulthandler

    config = dirtying(dirty_rounds=100_000)
    vm = Vm.spawn(config) if spawned else Vm(config)
    # Were the GIL held while waiting, nothing here would run again: end the
    # process (with every thread's traceback) rather than hang the suite.
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: dirty round 2$", timeout=30)
        held = threading.Event()
        answers: dict[str, object] = {}

        def ask() -> None:
            answers["state"] = vm.state
            started = time.monotonic()
            answers["wait"] = vm.wait(0.5)
            answers["waited"] = time.monotonic() - started

        def ask_info() -> None:
            answers["info"] = vm.info().state

        with FakeReceiver(tmp_path / "held.sock", hold=held, refuse_on="State") as fake:
            sender, errors = send_in_thread(vm, fake.path)
            asker = threading.Thread(target=ask)
            info_asker = threading.Thread(target=ask_info)
            try:
                assert fake.holding.wait(30)
                asker.start()
                info_asker.start()
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    vm.serial.wait_for("^never printed$", timeout=0.5)
                assert time.monotonic() - started < 5
                asker.join(5)
                assert not asker.is_alive(), "vm.state or vm.wait(0.5) waited for the send"
                assert info_asker.is_alive() and "info" not in answers
            finally:
                held.set()
                sender.join(30)
                for thread in (asker, info_asker):
                    if thread.ident is not None:
                        thread.join(30)
        assert answers["state"] == "Running"
        assert answers["wait"] is None
        assert isinstance(answers["waited"], float) and 0.45 < answers["waited"] < 5
        assert answers["info"] == "Running"  # once the refused send returned
        refusal = "the receiving VMM refused the migration: no room here"
        assert len(errors) == 1 and refusal in str(errors[0]), errors
        assert vm.serial.wait_for("^vmkit-guest: dirty round", timeout=30)
    finally:
        faulthandler.cancel_dump_traceback_later()
        vm.close()


def test_a_receiver_gone_at_the_last_step_leaves_the_vm_paused(tmp_path: Path) -> None:
    """After the last step the receiver may run the VM: with no word from it,
    the VM must not run here too. It stays paused, and the error says so;
    resumed, it runs on, its disk too (blkbench had requests in flight)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 << 20))
    config = dirtying(
        steps=("dirty", "blkbench"),
        extra=("--disk", f"path={disk}"),
        dirty_rounds=20,
        blkbench_mode="write", blkbench_size=65536, blkbench_depth=16, blkbench_count=300_000,
    )  # fmt: skip
    vm = Vm(config)
    try:
        vm.boot()
        assert vm.serial.wait_for("^vmkit-guest: step dirty ok", timeout=30), vm.serial.text
        writing_to_disk(vm)
        with FakeReceiver(tmp_path / "gone.sock", vanish_on="Complete") as fake:
            with pytest.raises(VmError) as e:
                vm.migrate_to(fake.path)
        assert "did not confirm the VM runs" in str(e.value), str(e.value)
        assert "the VM stays paused here" in str(e.value)
        assert vm.state == "Paused"
        assert "step blkbench" not in vm.serial.text, "blkbench ended first: make it longer"
        # The user decides: here it can go on.
        vm.resume()
        exit_info = vm.wait(timeout=60)
        assert exit_info is not None and exit_info.reason == "poweroff", vm.serial.text
        assert "vmkit-guest: summary passed=2 failed=0" in vm.serial.text
    finally:
        vm.close()


# -- receivers that trust nothing ------------------------------------------------------------

KINDS = {
    "Hello": 1, "Config": 2, "MemoryFds": 3, "Pages": 4, "State": 5, "Complete": 6, "Ack": 7,
    "TapFds": 8,
}  # fmt: skip
MAGIC = b"vmkit-migration\0"


def frame(kind: str, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("<IQ", KINDS[kind], len(payload) if length is None else length) + payload


def hello(version: int = 4, local: int = 0) -> bytes:
    return frame("Hello", MAGIC + struct.pack("<II", version, local))


def config_frame(config: VmConfig, memory_size: int | None = None) -> bytes:
    message = {
        "config": config.to_json(),
        "memory_size": config.memory.size if memory_size is None else memory_size,
        "vcpus": config.cpus.boot_vcpus,
        "kernel_format": "pvh-elf",
    }
    return frame("Config", json.dumps(message).encode())


def no_taps() -> bytes:
    return frame("TapFds", b"[]")


class FakeReceiver:
    """A listener that reads frames, answers the config and the state, and
    refuses (an ACK with an error) on the first ``refuse_on`` frame, closes
    without a word on the first ``vanish_on`` one, or closes after
    ``drop_after_bytes``. With ``hold``, it reads nothing after the config
    until ``hold`` is set, and then, as vmkit's receiver does, answers the
    connection's end with an ACK saying so."""

    def __init__(
        self,
        path: Path,
        refuse_on: str | None = None,
        vanish_on: str | None = None,
        drop_after_bytes: int | None = None,
        hold: threading.Event | None = None,
    ) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fspath(path))
        self.listener.listen(1)
        self.refuse_on = refuse_on
        self.vanish_on = vanish_on
        self.drop_after_bytes = drop_after_bytes
        self.hold = hold
        #: set once it holds (``hold``): the sender waits in a send from then on
        self.holding = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            received = 0
            names = {v: k for k, v in KINDS.items()}
            while True:
                header = conn.recv(12, socket.MSG_WAITALL)
                if len(header) < 12:
                    if self.hold is not None:
                        closed = b"the other VMM closed the migration connection"
                        with contextlib.suppress(OSError):
                            conn.sendall(frame("Ack", struct.pack("<I", 1) + closed))
                    return
                kind, length = struct.unpack("<IQ", header)
                left = length
                while left:
                    chunk = conn.recv(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                    received += len(chunk)
                    if self.drop_after_bytes is not None and received >= self.drop_after_bytes:
                        return
                name = names.get(kind, "?")
                if name == self.vanish_on:
                    return
                if name == self.refuse_on:
                    conn.sendall(frame("Ack", struct.pack("<I", 1) + b"no room here"))
                    return
                if name in ("Config", "State"):
                    conn.sendall(frame("Ack", struct.pack("<I", 0)))
                if name == "Config" and self.hold is not None:
                    self.holding.set()
                    self.hold.wait(30)

    def __enter__(self) -> FakeReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(10)
        self.listener.close()


def pages(addr: int, data: bytes) -> bytes:
    return frame("Pages", struct.pack("<Q", addr) + data)


def tiny() -> VmConfig:
    return VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")), "--memory", "size=64M",
        "--serial", "null", "--console", "off",
    ])  # fmt: skip


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "not vmkit": (lambda: b"GET / HTTP/1.1\r\n\r\n" + bytes(64), "unknown frame kind"),
    "newer protocol": (lambda: hello(version=5), "protocol version 5, this vmkit speaks version 4"),
    "huge frame": (
        lambda: hello() + frame("Config", b"", length=1 << 40),
        "a Config frame of 1099511627776 bytes (at most 1048576)",
    ),
    "bad config": (lambda: hello() + frame("Config", b'{"config": "{}"}'), "the config message"),
    "memory size lies": (
        lambda: hello() + config_frame(tiny(), memory_size=1 << 40),
        "1099511627776 bytes of memory and 1 vCPUs sent, the config has 67108864",
    ),
    "pages past RAM": (
        lambda: (
            hello()
            + config_frame(tiny())
            + no_taps()
            + frame("Pages", struct.pack("<Q", 64 << 20) + bytes(4096))
        ),
        "4096 bytes at 0x4000000 are not guest RAM",
    ),
    "pages wrapping around": (
        lambda: (
            hello()
            + config_frame(tiny())
            + no_taps()
            + frame("Pages", struct.pack("<Q", 2**64 - 8) + bytes(16))
        ),
        "are not guest RAM",
    ),
    "garbage state": (
        lambda: (
            hello()
            + config_frame(tiny())
            + no_taps()
            + frame("State", b"\x56\x4b\x4d\x53" + bytes(12))
        ),
        "0 vCPUs",
    ),
    "complete before state": (
        lambda: hello() + config_frame(tiny()) + no_taps() + frame("Complete", b""),
        "a Complete frame among the pages",
    ),
    "pages before the taps": (
        lambda: hello() + config_frame(tiny()) + pages(0, bytes(4096)),
        "a Pages frame where TapFds was due",
    ),
    "taps for no such device": (
        lambda: hello() + config_frame(tiny()) + frame("TapFds", b'[{"id": "_net0", "count": 1}]'),
        "taps for _net0, not a net device",
    ),
    "a tap list that is not one": (
        lambda: hello() + config_frame(tiny()) + frame("TapFds", b'{"id": 1}'),
        "the tap list",
    ),
    "cut short": (lambda: hello() + config_frame(tiny())[:20], "closed the migration connection"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_receiver_refuses_what_a_hostile_sender_sends(tmp_path: Path, case: str) -> None:
    data, message = HOSTILE[case]
    path = tmp_path / "m.sock"
    gc.collect()  # earlier tests' VMs, so that only this one's descriptors count
    threads = threading.active_count()
    fds = set(os.listdir("/proc/self/fd"))
    receiver = Receiver(path)
    answer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.fspath(path))
        s.sendall(data())
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        # Bytes it never read make the receiver's close a reset ("not vmkit").
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 16):
                answer += chunk
    receiver.join()
    assert isinstance(receiver.error, VmError), receiver.error
    assert message in str(receiver.error), str(receiver.error)
    assert receiver.error.kind == "Migration", receiver.error.kind
    # The sender is told why (after the ACK of the config, if it got that far).
    assert message.encode() in answer or case in ("cut short", "not vmkit"), answer
    assert not path.exists()
    assert threading.active_count() == threads
    assert set(os.listdir("/proc/self/fd")) <= fds, "a descriptor was left open"


@pytest.mark.parametrize("sent", [1, 3])
def test_a_receiver_counts_the_taps_handed_over(tmp_path: Path, sent: int) -> None:
    """Descriptors that come with ``TAP_FDS`` must be as many as it lists;
    the receiver keeps none of them when it refuses."""
    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")), "--memory", "size=64M",
        "--cpus", "boot=2", "--net", "tap=vmkit-nothere,num_queues=4",
        "--serial", "null", "--console", "off",
    ])  # fmt: skip
    path = tmp_path / "m.sock"
    gc.collect()
    fds = set(os.listdir("/proc/self/fd"))
    receiver = Receiver(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, open(os.devnull) as null:
        s.connect(os.fspath(path))
        s.sendall(hello() + config_frame(config))
        listed = json.dumps([{"id": "_net0", "count": 2}]).encode()
        socket.send_fds(s, [frame("TapFds", listed)], [null.fileno()] * sent)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(1 << 16):
                pass
    receiver.join()
    assert isinstance(receiver.error, VmError), receiver.error
    assert f"2 tap queues announced, {sent} received" in str(receiver.error), str(receiver.error)
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= fds, "a descriptor was left open"


# -- between VMM processes ------------------------------------------------------------------


def test_vm_processes_migrate_through_the_api(tmp_path: Path) -> None:
    """``Vm.spawn`` on both sides: the sender's VMM process exits once the
    receiver's runs the VM, as Cloud Hypervisor's does. The receiving process
    had a VM of its own running: as in Cloud Hypervisor, the one received
    replaces it."""
    config = dirtying()
    config.serial.mode = "File"
    config.serial.file = str(tmp_path / "serial.log")
    sender = Vm.spawn(config)
    receiver = Vm.spawn(dirtying(memory="size=64M", dirty_rounds=1_000_000))
    try:
        receiver.boot()
        sender.boot()
        deadline = time.monotonic() + 30
        while "dirty round 10\n" not in (tmp_path / "serial.log").read_text(errors="replace"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        move_spawned_vm(sender, receiver, tmp_path / "m.sock")
        info = receiver.info()
        assert info.state == "Running"
        assert info.config.memory.size == 128 << 20, "the receiver's own VM is still there"
        exit_info = receiver.wait(timeout=60)
        assert exit_info is not None, exit_info
        text = (tmp_path / "serial.log").read_text()
        assert "vmkit-guest: summary passed=1 failed=0" in text, text
    finally:
        sender.close()
        receiver.close()


def test_the_vmkit_command_migrates_with_the_real_ch_remote(tmp_path: Path) -> None:
    from _chpeer import CH_DIR, CH_MISSING, VmmProcess, ch_remote

    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    serial = tmp_path / "serial.log"
    config = dirtying()
    config.serial.mode = "File"
    config.serial.file = str(serial)
    (tmp_path / "vm.json").write_text(config.to_json())
    monitor = {side: tmp_path / f"{side}.events" for side in "ab"}
    a = VmmProcess(
        "vmkit", tmp_path / "a.sock", tmp_path / "a.log",
        extra=("--event-monitor", f"path={monitor['a']}"),
    )  # fmt: skip
    b = VmmProcess(
        "vmkit", tmp_path / "b.sock", tmp_path / "b.log",
        extra=("--event-monitor", f"path={monitor['b']}"),
    )  # fmt: skip
    try:
        for args in (["create", str(tmp_path / "vm.json")], ["boot"]):
            assert ch_remote(a.socket_path, *args) == (0, "", ""), args
        deadline = time.monotonic() + 30
        while "dirty round 10\n" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        url = f"unix:{tmp_path / 'm.sock'}"
        remote = [str(CH_DIR / "ch-remote"), "--api-socket", str(b.socket_path)]
        waiting = subprocess.Popen(
            [*remote, "receive-migration", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_listening(
            tmp_path / "m.sock", process=waiting, why_not=lambda: waiting.communicate()[1]
        )
        assert ch_remote(a.socket_path, "send-migration", url) == (0, "", "")
        assert waiting.wait(30) == 0, waiting.communicate()
        assert a.wait(10) == 0, a.log  # v37: the sending VMM exits
        status, out, _ = ch_remote(b.socket_path, "info")
        assert status == 0 and json.loads(out)["state"] == "Running"
        assert b.wait(60) == 0, b.log  # the guest powered off there
        assert "vmkit-guest: summary passed=1 failed=0" in serial.read_text()
    finally:
        a.stop()
        b.stop()
    # Cloud Hypervisor's events (checked against v37): the sender pauses and
    # snapshots the VM on the way, then deletes it and ends; the receiver
    # restores and resumes it.
    assert event_names(monitor["a"])[-7:] == [
        "vm pausing", "vm paused", "vm snapshotting", "vm snapshotted",
        "vm shutdown", "vm deleted", "vmm shutdown",
    ]  # fmt: skip
    assert event_names(monitor["b"])[:5] == [
        "vmm starting", "vm restoring", "vm restored", "vm resuming", "vm resumed",
    ]  # fmt: skip


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
