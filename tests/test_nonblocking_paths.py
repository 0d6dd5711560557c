"""Paths a user names never block the VMM.

Opening a FIFO blocks until its other end is opened, and writing to a pipe
blocks while it is full; either, under the VMM's lock, would hang ``info``,
``vmm.shutdown`` and SIGTERM. So ``--rng src=`` refuses FIFOs, sockets and
directories at once; ``--serial``/``--console file=`` and ``--event-monitor
path=`` refuse a FIFO that nobody reads at once, and accept one with a reader,
dropping what a reader that does not keep up has no room for (the serial
capture still holds it) instead of waiting for it.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _prompt import (
    PROMPT,
    call_promptly,
    run_vmkit_promptly,
    unblock_reader_of,
    unblock_writer_of,
)
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm, VmError
from vmkit.vmm import ApiError, EventMonitor, Vmm

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

ROOT = Path(__file__).resolve().parent.parent
#: Far longer than a refusal or a shutdown takes; a blocked call never returns.
F_SETPIPE_SZ = 1031
#: The smallest pipe the kernel makes: a stuck reader's pipe fills in moments.
PIPE_SIZE = 4096


def argv(
    *extra: str,
    steps: tuple[str, ...] = ("hello",),
    serial: str = "null",
    console: str = "off",
    **options: int,
) -> list[str]:
    return [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", **options),
        "--cpus", "boot=1", "--memory", "size=256M",
        "--serial", serial, "--console", console, *extra,
    ]  # fmt: skip


def ticking(serial: str) -> list[str]:
    """A guest that prints a line every millisecond for far longer than a test."""
    return argv(serial=serial, steps=("ticks",), ticks=1_000_000, tick_ms=1)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "out.fifo"
    os.mkfifo(path)
    return path


@pytest.fixture
def stuck_reader(fifo: Path) -> Iterator[int]:
    """A reader of `fifo` that never reads, with the smallest pipe; closed at
    the end (which also frees a writer blocked on it)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        yield fd
    finally:
        os.close(fd)


def queued(fd: int) -> int:
    """Bytes waiting in the pipe `fd` reads."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def wait_until_full(reader: int) -> None:
    deadline = time.monotonic() + PROMPT
    while queued(reader) < PIPE_SIZE:
        assert time.monotonic() < deadline, f"the pipe holds only {queued(reader)} bytes"
        time.sleep(0.01)


def last_tick(vm: Vm) -> int:
    ticks = re.findall(r"tick (\d+)\r?\n", vm.serial.text)
    return int(ticks[-1]) if ticks else -1


# -- --rng src= ------------------------------------------------------------------------


def rng_refusal(path: Path) -> str:
    return (
        f"Error opening entropy source {path} (--rng src): not a regular file or character device"
    )


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
def test_rng_sources_that_are_not_files_are_refused_at_once(tmp_path: Path, kind: str) -> None:
    import socket

    path = tmp_path / kind
    listener = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
    else:
        path.mkdir()
    vm = Vm(VmConfig.from_cli(argv("--rng", f"src={path}")))
    try:
        error = call_promptly(vm.boot, unblock_reader_of(path))
    finally:
        vm.close()
        if listener is not None:
            listener.close()
    assert isinstance(error, VmError), error
    assert str(error) == rng_refusal(path)


def test_a_fifo_rng_source_leaves_the_vmm_answering(fifo: Path) -> None:
    vmm = Vmm()
    vmm.create(VmConfig.from_cli(argv("--rng", f"src={fifo}")))
    error = call_promptly(vmm.boot, unblock_reader_of(fifo))
    assert isinstance(error, ApiError), error
    assert rng_refusal(fifo) in str(error)
    assert vmm.lock.acquire(timeout=PROMPT), "the VMM's lock is still held"
    vmm.lock.release()
    vmm.vmm_shutdown()


def test_the_cli_refuses_a_fifo_rng_source_at_once(fifo: Path) -> None:
    result = run_vmkit_promptly(
        argv("--rng", f"src={fifo}"), unblock_reader_of(fifo), "the FIFO given as --rng src"
    )
    assert result.returncode == 1
    assert rng_refusal(fifo) in result.stderr


def test_a_regular_file_is_an_rng_source(tmp_path: Path, vmkit_vm: VmFactory) -> None:
    source = tmp_path / "entropy"
    source.write_bytes(os.urandom(4096))
    vm = vmkit_vm(VmConfig.from_cli(argv("--rng", f"src={source}", steps=("rng",))))
    vm.boot()
    exit_info = vm.wait(30)
    results = testguest.parse_results(vm.serial.text)
    vm.close()
    assert exit_info is not None and exit_info.reason == "poweroff", exit_info
    assert results.ok("rng"), results.lines


# -- --serial / --console file= ----------------------------------------------------------


def fifo_refusal(what: str, path: Path) -> str:
    return (
        f"Cannot create {what} output file {path} (--{what} file): "
        "it is a FIFO that no process has open for reading"
    )


@pytest.mark.parametrize("what", ["serial", "console"])
def test_an_output_fifo_without_a_reader_is_refused_at_once(what: str, fifo: Path) -> None:
    config = VmConfig.from_cli(argv(**{what: f"file={fifo}"}))

    def make_and_boot() -> None:
        with Vm(config) as vm:  # the serial and console backends open here
            vm.boot()

    error = call_promptly(make_and_boot, unblock_writer_of(fifo))
    assert isinstance(error, VmError), error
    assert fifo_refusal(what, fifo) in str(error)


def test_the_cli_refuses_an_output_fifo_without_a_reader(fifo: Path) -> None:
    result = run_vmkit_promptly(
        argv(serial=f"file={fifo}"), unblock_writer_of(fifo), "the FIFO given as --serial file"
    )
    assert result.returncode == 1
    assert fifo_refusal("serial", fifo) in result.stderr


def test_an_output_fifo_with_a_reader_gets_the_output(fifo: Path) -> None:
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with Vm(VmConfig.from_cli(argv(serial=f"file={fifo}"))) as vm:
            vm.boot()
            exit_info = vm.wait(30)
        os.set_blocking(reader, False)
        got = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert exit_info is not None and exit_info.reason == "poweroff", exit_info
    assert b"vmkit-guest: step hello ok" in got


def test_a_stuck_serial_reader_holds_up_neither_the_guest_nor_shutdown(
    fifo: Path, stuck_reader: int
) -> None:
    vm = Vm(VmConfig.from_cli(ticking(f"file={fifo}")))
    try:
        vm.boot()
        wait_until_full(stuck_reader)
        # The guest goes on printing (into the capture) while the pipe is full.
        tick = last_tick(vm)
        vm.serial.wait_for(rf"tick {tick + 100}$", timeout=PROMPT)
        assert call_promptly(vm.shutdown, lambda: os.close(os.dup(stuck_reader))) is None
        assert vm.wait(PROMPT) is not None
    finally:
        os.set_blocking(stuck_reader, False)
        vm.close()


def test_a_stuck_serial_reader_leaves_the_vmm_answering(fifo: Path, stuck_reader: int) -> None:
    vmm = Vmm()
    vmm.create(VmConfig.from_cli(ticking(f"file={fifo}")))
    try:
        vmm.boot()
        wait_until_full(stuck_reader)
        time.sleep(0.2)  # guest output keeps arriving at the full pipe
        assert call_promptly(vmm.info, lambda: None) is None
        assert call_promptly(vmm.vmm_shutdown, lambda: None) is None
    finally:
        vmm.close()


def assert_ends_on_sigterm(process: subprocess.Popen[bytes], while_what: str) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(PROMPT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vmkit did not end on SIGTERM while {while_what}")


def kill_if_running(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_ends_the_cli_while_its_serial_reader_is_stuck(
    fifo: Path, stuck_reader: int
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vmkit", *ticking(f"file={fifo}")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        wait_until_full(stuck_reader)
        time.sleep(0.2)
        assert_ends_on_sigterm(process, "its serial reader was stuck")
    finally:
        kill_if_running(process)
        assert process.stderr is not None
        process.stderr.close()


def test_sigterm_ends_the_cli_while_the_reader_of_its_stdout_is_stuck() -> None:
    """``--serial tty`` into a pipe nobody reads (``vmkit ... | stuck``): stdout
    is shared with other programs and stays blocking, so vmkit writes only
    while it has room."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vmkit", *ticking("tty")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        # Two pages: poll reports room only while a page of the pipe is free,
        # so vmkit stops writing once the second page has a byte in it.
        fcntl.fcntl(process.stdout.fileno(), F_SETPIPE_SZ, 2 * PIPE_SIZE)
        wait_until_full(process.stdout.fileno())
        time.sleep(0.5)  # the guest prints on: far more than the pipe holds
        assert_ends_on_sigterm(process, "its stdout was stuck")
    finally:
        kill_if_running(process)
        process.stdout.close()


# -- --event-monitor path= ----------------------------------------------------------------


def test_an_event_monitor_fifo_without_a_reader_is_refused_at_once(
    tmp_path: Path, fifo: Path
) -> None:
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vmkit",
                "--api-socket",
                str(tmp_path / "api.sock"),
                "--event-monitor",
                f"path={fifo}",
            ],
            capture_output=True,
            text=True,
            timeout=PROMPT * 2,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        unblock_writer_of(fifo)()
        pytest.fail("vmkit blocked on the FIFO given as --event-monitor path")
    assert result.returncode == 1
    assert (
        f"Error doing event monitor I/O: {fifo} (--event-monitor path) is a FIFO "
        "that no process has open for reading"
    ) in result.stderr


def test_a_stuck_event_reader_costs_events_not_the_vmm(fifo: Path, stuck_reader: int) -> None:
    """Events that a full pipe cannot take are dropped whole: emit never waits,
    and what the reader does get is a stream of complete events."""
    monitor = EventMonitor(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        started = time.monotonic()
        for index in range(200):
            monitor.emit("vm", "booting", {"index": str(index)})
        assert time.monotonic() - started < PROMPT
        assert monitor.error is None
        assert 0 < monitor.dropped < 200
    finally:
        monitor.close()
    got = b""
    while chunk := os.read(stuck_reader, 1 << 16):
        got += chunk
    events = [json.loads(text) for text in got.decode().split("\n\n") if text]
    assert len(events) == 200 - monitor.dropped
    assert [e["properties"]["index"] for e in events] == [str(i) for i in range(len(events))]


def test_a_spawned_vm_does_not_read_back_a_fifo_its_serial_goes_to(
    fifo: Path, stuck_reader: int
) -> None:
    """``Vm.spawn`` reads the serial file back for ``vm.serial``; a FIFO there
    is someone else's stream: reading it would block (and steal from it)."""
    from vmkit.client import spawn

    vm = spawn(VmConfig.from_cli(ticking(f"file={fifo}")))
    try:
        vm.boot()
        wait_until_full(stuck_reader)
        got: list[bytes] = []
        assert call_promptly(lambda: got.append(vm.serial.read()), lambda: None) is None
        assert got == [b""]
        assert queued(stuck_reader) >= PIPE_SIZE, "the guest's output was taken from the FIFO"
    finally:
        vm.close()
