"""Progress lines on a terminal (``vmkit._progress``): drawn on a pseudo-terminal,
throttled, cleared at the end; nothing on a pipe or a file, with ``TERM=dumb`` or
when quiet; stdout untouched. Then real commands under a pseudo-terminal:
``vmkit remote snapshot`` of a spawned test-guest VM and ``Vm.snapshot``/``restore``.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest
from vmkit import _progress
from vmkit._progress import Progress
from vmkit.client import SpawnedVm

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def terminal(columns: int = 100) -> Iterator[tuple[TextIO, Callable[[], str]]]:
    """A pseudo-terminal: the stream to give Progress, and a reader of what it shows."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # show the bytes as written (no \n -> \r\n)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    stream = os.fdopen(slave, "w", encoding="utf-8")
    try:
        yield stream, lambda: drain(master)
    finally:
        stream.close()
        os.close(master)


def drain(fd: int, wait: float = 0.05) -> str:
    data = b""
    while select.select([fd], [], [], wait)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vmkit-progress"]


@pytest.fixture(autouse=True)
def plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_a_terminal_shows_the_label_redrawn_in_place_then_cleared() -> None:
    with terminal() as (stream, read):
        with Progress("copying the disk", stream=stream):
            time.sleep(0.45)
            assert progress_threads(), "no ticker thread while the block runs"
        shown = read()
    assert "copying the disk" in shown
    draws = shown.count("\rcopying the disk")
    assert 2 <= draws <= 7, shown  # at once, then about every 0.1 s (a busy host: fewer)
    assert "s" in shown.split("copying the disk")[-1]  # the elapsed time
    # Cleared at the end: the last thing written blanks the line and returns.
    last = shown.rsplit("\r", 2)
    assert last[-1] == "" and last[-2].strip() == "", repr(shown[-120:])
    assert "\n" not in shown
    assert not progress_threads(), "the ticker thread outlived the block"


def test_a_pipe_a_file_dumb_terminals_and_quiet_get_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe, (tmp_path / "log").open("w") as file:
        for stream in (pipe, file, io.StringIO()):
            with Progress("working", total=10, stream=stream) as p:
                assert not p.active
                p.update(5)
                time.sleep(0.15)
    with os.fdopen(read_end) as r:
        assert r.read() == ""
    assert (tmp_path / "log").read_text() == ""
    with terminal() as (stream, read):
        with Progress("quiet please", stream=stream, quiet=True):
            time.sleep(0.15)
        monkeypatch.setenv("TERM", "dumb")
        with Progress("dumb terminal", stream=stream):
            time.sleep(0.15)
        assert read() == ""
    assert not progress_threads()


def test_a_known_total_draws_a_bar_with_amounts_and_no_color_drops_colour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with terminal() as (stream, read):
        with Progress("download", total=4 << 20, unit="bytes", stream=stream) as p:
            p.update(1 << 20)
            time.sleep(0.15)
        coloured = read()
        monkeypatch.setenv("NO_COLOR", "1")
        with Progress("download", total=4 << 20, unit="bytes", stream=stream) as p:
            p.update(3 << 20)
            time.sleep(0.15)
        plain = read()
    assert "[\x1b[36m######" in coloured and "25%" in coloured and "1.0 MiB / 4.0 MiB" in coloured
    assert "\x1b" not in plain
    assert "##################......" in plain and "75%" in plain and "3.0 MiB / 4.0 MiB" in plain


def test_updates_cost_no_output_and_redraws_stay_under_ten_a_second() -> None:
    with terminal() as (stream, read):
        with Progress("busy", total=1_000_000, stream=stream) as p:
            start = time.monotonic()
            done = 0
            while time.monotonic() - start < 0.5:
                for _ in range(1000):
                    done += 1
                    p.update(done)
            elapsed = time.monotonic() - start
        shown = read()
    draws = shown.count("\rbusy")
    assert done > 10_000
    assert draws <= elapsed * 10 + 2, f"{draws} redraws in {elapsed:.2f} s"


def test_a_probe_feeds_the_amount_and_long_lines_fit_the_terminal(tmp_path: Path) -> None:
    (tmp_path / "memory").write_bytes(b"x" * (3 << 20))
    with terminal(columns=40) as (stream, read):
        label = "snapshot to " + "/very/long/path" * 5
        probe = lambda: _progress.bytes_under(tmp_path)  # noqa: E731
        with Progress(label, unit="bytes", probe=probe, stream=stream):
            time.sleep(0.25)
        shown = read()
    lines = [part for part in shown.split("\r") if part.strip()]
    assert lines and all(len(line) <= 39 for line in lines), lines
    # The label gives way; the amount and the time stay.
    assert all(line.startswith("snapshot to /very/") and "... " in line for line in lines), lines
    assert all(line.rstrip().endswith("s") for line in lines), lines
    with terminal() as (stream, read):
        with Progress("snapshot", unit="bytes", probe=probe, stream=stream):
            time.sleep(0.25)
        assert "3.0 MiB" in read()
    assert _progress.bytes_under(tmp_path / "absent") == 0.0


def test_notes_stay_above_the_line_and_go_plainly_to_pipes() -> None:
    with terminal() as (stream, read):
        with Progress("building", stream=stream) as p:
            p.note("[1/6] resolving packages")
            with p.above():
                pass
        shown = read()
    assert "[1/6] resolving packages\n" in shown
    assert shown.index("[1/6]") > shown.index("building")  # the line was cleared first
    out = io.StringIO()
    with Progress("building", stream=out) as p:
        p.note("[1/6] resolving packages")
    assert out.getvalue() == "[1/6] resolving packages\n"
    out = io.StringIO()
    with Progress("building", stream=out, quiet=True) as p:
        p.note("[1/6] resolving packages")
    assert out.getvalue() == ""


def test_an_exception_in_the_block_still_clears_the_line() -> None:
    with terminal() as (stream, read):
        with pytest.raises(RuntimeError, match="boom"), Progress("failing", stream=stream):
            raise RuntimeError("boom")
        shown = read()
    assert (
        shown.startswith("\rfailing")
        and shown.endswith("\r")
        and shown.split("\r")[-2].strip() == ""
    )
    assert not progress_threads()


def test_import_vmkit_does_not_import_the_progress_module() -> None:
    code = "import sys, vmkit; print('vmkit._progress' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"


# -- real commands -------------------------------------------------------------------

kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="boots a VM: needs read-write /dev/kvm"
)


def run_with_stderr(argv: list[str], on_terminal: bool) -> tuple[int, bytes, str]:
    """Runs argv with stdout on a pipe and stderr on a pseudo-terminal or a pipe;
    (exit status, stdout, stderr as shown)."""
    if not on_terminal:
        done = subprocess.run(argv, capture_output=True, timeout=60, cwd=ROOT)
        return done.returncode, done.stdout, done.stderr.decode()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 300, 0, 0))
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            ready = select.select([master], [], [], 60)[0]
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
        return proc.wait(30), out, b"".join(chunks).decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def paused_test_guest(tmp_path: Path) -> SpawnedVm:
    from vmkit import Vm, VmConfig, testguest

    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "halt"),
        "--cpus", "boot=1", "--memory", "size=128M", "--serial", "null", "--console", "off",
    ])  # fmt: skip
    vm = Vm.spawn(config, api_socket=tmp_path / "api.sock")
    vm.boot()
    vm.pause()
    return vm


@kvm
def test_vmkit_remote_snapshot_shows_progress_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = paused_test_guest(tmp_path)
    try:
        results = {}
        for on_terminal in (True, False):
            snap = tmp_path / f"snap-{on_terminal}"
            snap.mkdir()
            argv = [sys.executable, "-m", "vmkit", "remote", "--api-socket",
                    str(tmp_path / "api.sock"), "snapshot", f"file://{snap}"]  # fmt: skip
            results[on_terminal] = run_with_stderr(argv, on_terminal)
            assert any(snap.iterdir()), "no snapshot written"
        # The same through SpawnedVm.snapshot, in this process.
        (tmp_path / "spawned").mkdir()
        # Wide enough for the whole destination (pytest-xdist's paths are long).
        with terminal(columns=250) as (stream, read):
            monkeypatch.setattr(sys, "stderr", stream)
            vm.snapshot(tmp_path / "spawned", progress=True)
            assert f"\rsnapshot to file://{tmp_path / 'spawned'}" in read()
    finally:
        vm.close()
    (code_tty, out_tty, err_tty), (code_pipe, out_pipe, err_pipe) = results[True], results[False]
    assert code_tty == code_pipe == 0
    assert out_tty == out_pipe == b""
    assert f"\rsnapshot to file://{tmp_path}/snap-True" in err_tty
    assert err_tty.endswith("\r") and err_tty.rstrip(" \r").count("\n") == 0
    assert err_pipe == ""


@kvm
def test_vm_snapshot_and_restore_show_progress_when_asked_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmkit import Vm, VmConfig, testguest

    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "halt"),
        "--cpus", "boot=1", "--memory", "size=128M", "--serial", "null", "--console", "off",
    ])  # fmt: skip
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        with Vm(config) as vm:
            vm.boot()
            vm.pause()
            (tmp_path / "quiet").mkdir()
            vm.snapshot(tmp_path / "quiet")
            assert read() == ""
            (tmp_path / "shown").mkdir()
            vm.snapshot(tmp_path / "shown", progress=True)
            assert f"\rsnapshot to {tmp_path / 'shown'}" in read()
        with Vm.restore(tmp_path / "shown", progress=True) as restored:
            assert restored.state == "Paused"
        assert f"\rrestore from {tmp_path / 'shown'}" in read()


def test_guest_build_keeps_its_step_lines_and_adds_a_bar_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``build_debian_guest(progress=True)``'s wiring, with the build itself stood in
    for (a real one downloads ~28 MB: tests/test_debian_guest.py)."""
    from vmkit import debian_guest

    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "linux.deb").write_bytes(b"x" * (2 << 20))

    def fake_build(
        cache: Path, say: Callable[[str], None], force: bool, meter: Progress | None = None
    ) -> str:
        say("[1/6] resolving packages")
        if meter is not None:
            meter.track(4 << 20, "bytes", lambda: _progress.bytes_under(tmp_path / "debs"))
        time.sleep(0.25)
        say("[6/6] done: somewhere")
        return "built"

    monkeypatch.setattr(debian_guest, "_build_locked", fake_build)
    with terminal() as (stream, read):
        monkeypatch.setattr(sys, "stderr", stream)
        assert debian_guest.build_debian_guest(tmp_path / "cache") == "built"
        shown = read()
    assert "[1/6] resolving packages\n" in shown and "[6/6] done: somewhere\n" in shown
    assert "\rvmkit guest build [1/6] [" in shown and "2.0 MiB / 4.0 MiB" in shown
    assert shown.endswith("\r")  # the bar cleared
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    assert debian_guest.build_debian_guest(tmp_path / "cache") == "built"
    assert piped.getvalue() == "[1/6] resolving packages\n[6/6] done: somewhere\n"


@kvm
def test_vmkit_restore_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """``vmkit --api-socket S --restore source_url=...``: the restore's line on a
    terminal, nothing on a pipe; the VMM then waits with the VM Paused."""
    from vmkit import Vm, VmConfig, testguest
    from vmkit.client import Client

    config = VmConfig.from_cli([
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "halt"),
        "--cpus", "boot=1", "--memory", "size=128M", "--serial", "null", "--console", "off",
    ])  # fmt: skip
    snap = tmp_path / "snap"
    snap.mkdir()
    with Vm(config) as vm:
        vm.boot()
        vm.pause()
        vm.snapshot(snap)
    shown = {}
    for on_terminal in (True, False):
        sock = tmp_path / f"api-{on_terminal}.sock"
        master, slave = pty.openpty() if on_terminal else os.pipe()
        if on_terminal:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 300, 0, 0))
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmkit", "--api-socket", str(sock),
             "--restore", f"source_url=file://{snap}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
        )  # fmt: skip
        os.close(slave)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if sock.exists() and Client(sock).info().state == "Paused":
                        break
                except Exception:  # not restored yet
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "no restored VM"
                time.sleep(0.05)
            shown[on_terminal] = drain(master, wait=0.3)
        finally:
            proc.terminate()
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.stdout.close()
            proc.wait(30)
            os.close(master)
        assert out == b""
    assert f"\rrestore from file://{snap}" in shown[True]
    assert shown[True].endswith("\r")  # cleared once restored
    assert shown[False] == ""
