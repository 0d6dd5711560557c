"""What vmkit creates is its owner's alone, whatever the umask.

Each check runs in a child process with ``umask(0)``, where a careless
``open``/``bind`` leaves a world-writable file or a socket anyone can connect
to: the API socket, the serial and console ``socket=`` sockets, ``file=``
outputs, the event monitor and the log file. Sockets get 0600 before their
file exists (set on the socket before ``bind``), so there is no window in
which another user can connect. Cloud Hypervisor gets 0600 files and 0700
sockets by setting umask 077 for its whole process; an in-process ``Vm``
cannot change its host program's umask, so vmkit sets each mode itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vmkit import testguest

ROOT = Path(__file__).resolve().parent.parent
OWNER_ONLY = 0o600


def run_with_umask_0(code: str, timeout: float = 60) -> dict[str, int]:
    """Runs `code` (which fills ``modes``: name -> st_mode) in a child under
    umask 0; returns the permission bits it saw."""
    script = (
        "import json, os, stat, sys\n"
        "os.umask(0)\n"
        "modes = {}\n" + textwrap.dedent(code) + "\n"
        "print(json.dumps({k: stat.S_IMODE(v) for k, v in modes.items()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    modes: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return modes


def test_the_umask_0_child_would_create_world_writable_files(tmp_path: Path) -> None:
    """The control: under umask 0 a plain open() makes a 0666 file."""
    modes = run_with_umask_0(f"""
        path = {str(tmp_path / "plain")!r}
        open(path, "w").close()
        modes["plain"] = os.stat(path).st_mode
    """)
    assert modes == {"plain": 0o666}


def test_the_api_socket_is_owner_only_from_the_moment_it_exists(tmp_path: Path) -> None:
    """``bind`` is watched: the socket file's mode is read the instant it is
    created, before anything could change it. (The socket is made with
    ``_socket``, the C module under ``socket``.)"""
    modes = run_with_umask_0(f"""
        import _socket
        from vmkit.api import ApiServer
        from vmkit.vmm import Vmm

        class Watched(_socket.socket):
            def bind(self, address):
                super().bind(address)
                modes["at bind"] = os.stat(address).st_mode

        _socket.socket = Watched
        server = ApiServer(Vmm(), {str(tmp_path / "api.sock")!r})
        server.start()
        modes["serving"] = os.stat(server.path).st_mode
        server.close()
    """)
    assert modes == {"at bind": OWNER_ONLY, "serving": OWNER_ONLY}


@pytest.mark.vmkit_kvm
def test_in_process_vm_outputs_and_sockets_are_owner_only(tmp_path: Path) -> None:
    kernel = testguest.image_path("pvh")
    cmdline = testguest.cmdline(["ticks"], "poweroff", ticks=100_000, tick_ms=10)
    for what in ("serial", "console"):
        for mode in ("file", "socket"):
            if what == "console" and mode == "socket":
                continue  # v37 refuses a console socket
            path = tmp_path / f"{what}-{mode}"
            other = "console" if what == "serial" else "serial"
            modes = run_with_umask_0(f"""
                from vmkit import Vm, VmConfig
                config = VmConfig.from_cli([
                    "--kernel", {str(kernel)!r}, "--cmdline", {cmdline!r},
                    "--memory", "size=128M", "--{what}", "{mode}={path}", "--{other}", "null",
                ])
                with Vm(config) as vm:
                    vm.boot()
                    modes["{what} {mode}"] = os.stat({str(path)!r}).st_mode
            """)
            assert modes == {f"{what} {mode}": OWNER_ONLY}


@pytest.mark.vmkit_kvm
def test_cli_outputs_are_owner_only(tmp_path: Path) -> None:
    """A plain boot from the command line: the log file and the serial file."""
    log, serial = tmp_path / "vmkit.log", tmp_path / "serial.out"
    argv = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "poweroff"),
        "--memory", "size=128M", "--console", "off",
        "--serial", f"file={serial}", "--log-file", str(log),
    ]  # fmt: skip
    modes = run_with_umask_0(f"""
        import subprocess
        result = subprocess.run([sys.executable, "-m", "vmkit", *{argv!r}], timeout=60)
        assert result.returncode == 0, result.returncode
        modes["log"] = os.stat({str(log)!r}).st_mode
        modes["serial"] = os.stat({str(serial)!r}).st_mode
    """)
    assert modes == {"log": OWNER_ONLY, "serial": OWNER_ONLY}


def test_served_vmm_files_and_sockets_are_owner_only(tmp_path: Path) -> None:
    """``vmkit --api-socket ... --event-monitor path=...``, as Cloud Hypervisor runs."""
    api, events = tmp_path / "api.sock", tmp_path / "events.json"
    modes = run_with_umask_0(f"""
        import subprocess, time
        process = subprocess.Popen([
            sys.executable, "-m", "vmkit",
            "--api-socket", {str(api)!r}, "--event-monitor", "path={events}",
        ])
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists({str(api)!r}):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.02)
            modes["api"] = os.stat({str(api)!r}).st_mode
            modes["events"] = os.stat({str(events)!r}).st_mode
        finally:
            process.terminate()
            process.wait(30)
    """)
    assert modes == {"api": OWNER_ONLY, "events": OWNER_ONLY}
