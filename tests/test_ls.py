"""``vmkit ls``, VM names and ``vmkit remote NAME``: the per-user registry of running VMMs.

VMMs run as the user runs them: ``vmkit --api-socket ... --name ...`` as a
process of its own, and ``Vm.spawn(name=...)``; ``vmkit ls`` and ``vmkit
remote`` run as commands. Each test has its own registry
(``$XDG_RUNTIME_DIR/vmkit`` in a temporary directory).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _spawndirs import own_tempdir  # noqa: F401 (a fixture)
from hypothesis import given
from hypothesis import strategies as st
from vmkit import Client, Vm, VmConfig, VmError, list_vms, registry, testguest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs read-write /dev/kvm")

KERNEL = str(testguest.image_path("pvh"))


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private XDG_RUNTIME_DIR, for this process and the commands it runs."""
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base


@pytest.fixture
def vmms() -> Iterator[list[subprocess.Popen[bytes]]]:
    """``vmkit`` VMM processes started by a test, all ended after it."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)


def vmkit(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmkit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ticking_guest(cpus: int = 1, memory: str = "128M") -> list[str]:
    """The test guest's command line: it counts ticks for minutes (until stopped)."""
    return [
        "--kernel", KERNEL,
        "--cmdline", testguest.cmdline(["ticks"], ticks=100_000, tick_ms=20),
        "--cpus", f"boot={cpus}",
        "--memory", f"size={memory}",
        "--serial", "null",
        "--console", "off",
    ]  # fmt: skip


def entry_file(runtime: Path, name: str) -> Path:
    return runtime / "vmkit" / f"{name}.json"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_vmm(
    vmms: list[subprocess.Popen[bytes]],
    runtime: Path,
    name: str,
    *guest: str,
) -> subprocess.Popen[bytes]:
    """``vmkit --api-socket <runtime>/<name>.sock --name <name> <guest>``, once it is listed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit", "--api-socket", str(runtime / f"{name}.sock"),
         "--name", name, *guest],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    vmms.append(proc)
    path = entry_file(runtime, name)
    wait_for(lambda: path.exists() or proc.poll() is not None, f"{name}'s registry entry")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def ls_json(timeout: float = 30) -> dict[str, dict[str, object]]:
    proc = vmkit("ls", "--json", timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return {vm["name"]: vm for vm in json.loads(proc.stdout)}


def write_entry(directory: Path, name: str, pid: int, pid_start: int, api_socket: str) -> None:
    """An entry as a VMM writes it."""
    entry = registry.Entry(name, pid, pid_start, api_socket, None, time.time())
    (directory / f"{name}.json").write_text(entry.to_json())


def ticking_config(cpus: int = 1, memory: str = "128M") -> VmConfig:
    return VmConfig.from_cli(ticking_guest(cpus, memory))


# -- listing -----------------------------------------------------------------------------


@needs_kvm
def test_ls_shows_each_vmm_with_its_state_vcpus_and_memory(
    runtime: Path, vmms: list[subprocess.Popen[bytes]]
) -> None:
    running = start_vmm(vmms, runtime, "web", *ticking_guest(cpus=2, memory="96M"))
    with (
        Vm.spawn(ticking_config(cpus=1, memory="64M"), name="paused") as paused,
        Vm.spawn(ticking_config(cpus=3, memory="32M"), name="created") as created,
        Vm.spawn(None) as idle,
    ):
        paused.boot()
        paused.pause()
        listed = ls_json()
        assert sorted(listed) == sorted(["web", "paused", "created", f"vm-{idle.pid}"])
        assert idle.name == f"vm-{idle.pid}"

        web = listed["web"]
        assert (web["pid"], web["state"], web["vcpus"], web["memory"]) == (
            running.pid, "Running", 2, 96 << 20,
        )  # fmt: skip
        assert web["api_socket"] == str(runtime / "web.sock")
        assert web["kernel"] == KERNEL
        assert isinstance(web["uptime"], float) and 0 < web["uptime"] < 120
        assert (listed["paused"]["pid"], listed["paused"]["state"]) == (paused.pid, "Paused")
        assert (listed["paused"]["vcpus"], listed["paused"]["memory"]) == (1, 64 << 20)
        assert (listed["created"]["state"], listed["created"]["vcpus"]) == ("Created", 3)
        assert listed["created"]["memory"] == 32 << 20
        assert listed["created"]["api_socket"] == str(created.api_socket)
        assert listed[idle.name]["state"] == "idle"
        assert listed[idle.name]["vcpus"] is None and listed[idle.name]["memory"] is None

        table = vmkit("ls")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == [
            "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME", "KERNEL", "SOCKET",
        ]  # fmt: skip
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert rows["web"][1:5] == [str(running.pid), "Running", "2", "96M"]
        assert rows["web"][6:] == [os.path.basename(KERNEL), str(runtime / "web.sock")]
        assert rows["paused"][2] == "Paused" and rows["created"][2] == "Created"

        quiet = vmkit("ls", "-q")
        assert quiet.returncode == 0, quiet.stderr
        assert sorted(quiet.stdout.split()) == sorted(listed)

        # The same, in Python.
        import vmkit as package

        by_name = {vm.name: vm for vm in package.list_vms()}
        assert by_name["web"].state == "Running" and by_name["web"].vcpus == 2
        assert by_name["paused"].state == "Paused"
    # Closed spawned VMs leave no entry.
    assert sorted(ls_json()) == ["web"]
    assert sorted(p.name for p in (runtime / "vmkit").glob("*.json")) == ["web.json"]


@needs_kvm
def test_a_killed_vmm_is_not_listed_and_its_entry_is_removed(
    runtime: Path, vmms: list[subprocess.Popen[bytes]]
) -> None:
    doomed = start_vmm(vmms, runtime, "doomed", *ticking_guest())
    start_vmm(vmms, runtime, "survivor", *ticking_guest())
    doomed.kill()
    doomed.wait(10)
    # SIGKILL leaves the entry; the next listing removes it.
    assert entry_file(runtime, "doomed").exists()
    assert sorted(ls_json()) == ["survivor"]
    assert not entry_file(runtime, "doomed").exists()

    # A spawned VM's process killed: its entry goes too (its spawner sees the end).
    with Vm.spawn(ticking_config(), name="spawned") as vm:
        vm.boot()
        path = entry_file(runtime, "spawned")
        assert path.exists()
        os.kill(vm.pid, signal.SIGKILL)
        wait_for(lambda: vm.process.poll() is not None, "the VM process to end")
        assert "spawned" not in ls_json()
        assert not path.exists()


@needs_kvm
def test_a_vmm_stopped_normally_leaves_no_entry(
    runtime: Path, vmms: list[subprocess.Popen[bytes]]
) -> None:
    by_api = start_vmm(vmms, runtime, "by-api", *ticking_guest())
    # vm.shutdown stops the VM, not the VMM: still listed, with the config kept
    # (v37 then reports the VM as Created: it can be booted again).
    assert vmkit("remote", "by-api", "shutdown").returncode == 0
    assert ls_json()["by-api"]["state"] == "Created"
    shutdown = vmkit("remote", "by-api", "shutdown-vmm")
    assert shutdown.returncode == 0, shutdown.stderr
    assert by_api.wait(10) == 0
    assert not entry_file(runtime, "by-api").exists()

    by_signal = start_vmm(vmms, runtime, "by-signal", *ticking_guest())
    by_signal.send_signal(signal.SIGTERM)
    assert by_signal.wait(10) == 0
    assert not entry_file(runtime, "by-signal").exists()

    # The guest powering off ends the VMM too (a few ticks, then poweroff).
    short = [*ticking_guest()]
    short[3] = testguest.cmdline(["ticks"], ticks=5, tick_ms=20)
    powered_off = start_vmm(vmms, runtime, "short", *short)
    assert powered_off.wait(20) == 0
    assert not entry_file(runtime, "short").exists()

    # An error after registering (the kernel cannot be loaded) removes it as well.
    broken = subprocess.run(
        [sys.executable, "-m", "vmkit", "--api-socket", str(runtime / "broken.sock"),
         "--name", "broken", "--kernel", str(runtime / "no-such-kernel")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert broken.returncode == 1, broken.stderr
    assert "Error booting VM" in broken.stderr
    assert os.listdir(runtime / "vmkit") == [".lock"]


# -- names --------------------------------------------------------------------------------


@needs_kvm
def test_a_second_vmm_with_a_taken_name_is_refused(
    runtime: Path, vmms: list[subprocess.Popen[bytes]]
) -> None:
    first = start_vmm(vmms, runtime, "db", *ticking_guest())
    second = vmkit("--api-socket", str(runtime / "db2.sock"), "--name", "db", *ticking_guest())
    assert second.returncode == 1
    assert f"a VM named 'db' is already running (VMM pid {first.pid})" in second.stderr
    assert not (runtime / "db2.sock").exists()
    with pytest.raises(VmError, match=rf"'db' is already running \(VMM pid {first.pid}\)"):
        Vm.spawn(ticking_config(), name="db")
    # The first one is untouched, and once it is gone the name is free again.
    assert ls_json()["db"]["pid"] == first.pid
    first.kill()
    first.wait(10)
    with Vm.spawn(None, name="db") as vm:
        assert ls_json()["db"]["pid"] == vm.pid == Client.for_vm("db").ping().pid


@needs_kvm
def test_a_spawned_python_vmm_registers_itself(runtime: Path) -> None:
    """vmm_args other than -v run the ``vmkit --api-socket`` command, which
    registers itself under the name it is given (or vm-<its pid>)."""
    with (
        Vm.spawn(ticking_config(cpus=2), name="py", vmm_args=["--seccomp", "true"]) as named,
        Vm.spawn(None, vmm_args=["--seccomp", "true"]) as unnamed,
    ):
        named.boot()
        listed = ls_json()
        assert (listed["py"]["pid"], listed["py"]["state"]) == (named.pid, "Running")
        assert listed["py"]["vcpus"] == 2
        assert unnamed.name == f"vm-{unnamed.pid}"
        assert listed[unnamed.name]["state"] == "idle"
        with pytest.raises(VmError, match=rf"'py' is already running \(VMM pid {named.pid}\)"):
            Vm.spawn(None, name="py", vmm_args=["--seccomp", "true"])
    assert os.listdir(runtime / "vmkit") == [".lock"]


@pytest.mark.parametrize("name", ["a b", "a/b", "-x", "12345", "", "x" * 64])
def test_invalid_names_are_refused(name: str, runtime: Path) -> None:
    proc = vmkit("--api-socket", str(runtime / "x.sock"), "--name", name, "--kernel", KERNEL)
    assert proc.returncode in (1, 2), proc.stderr
    if proc.returncode == 1:  # "-x" reads as a flag: clap's usage error
        assert proc.stderr.startswith(f"Error parsing --name: invalid VM name {name!r}")
    assert not (runtime / "x.sock").exists()
    with pytest.raises(ValueError, match="invalid VM name"):
        Vm.spawn(None, name=name)


def test_a_name_needs_an_api_socket() -> None:
    proc = vmkit("--name", "vm1", "--kernel", KERNEL)
    assert proc.returncode == 1
    assert "give --api-socket too" in proc.stderr


# -- vmkit remote NAME ---------------------------------------------------------------------


@needs_kvm
def test_remote_takes_a_name_or_a_pid(runtime: Path, vmms: list[subprocess.Popen[bytes]]) -> None:
    proc = start_vmm(vmms, runtime, "vm1", *ticking_guest(cpus=2))
    for target in (["vm1"], [str(proc.pid)], ["--api-socket", "vm1"]):
        info = vmkit("remote", *target, "info")
        assert info.returncode == 0, (target, info.stderr)
        data = json.loads(info.stdout)
        assert data["state"] == "Running" and data["config"]["cpus"]["boot_vcpus"] == 2
    # The socket's path works as it always did.
    ping = vmkit("remote", "--api-socket", str(runtime / "vm1.sock"), "ping")
    assert ping.returncode == 0 and json.loads(ping.stdout)["pid"] == proc.pid
    assert Client.for_vm("vm1").info().state == "Running"
    assert Client.for_vm(proc.pid).ping().pid == proc.pid

    missing = vmkit("remote", "nosuchvm", "info")
    assert missing.returncode == 1
    assert "no running VM named 'nosuchvm'" in missing.stderr
    # Not a name, not a file: ch-remote's error, as before.
    absent = vmkit("remote", "--api-socket", "nosuchvm", "info")
    assert absent.returncode == 1
    assert absent.stderr.startswith("Error opening HTTP socket: No such file or directory")
    both = vmkit("remote", "--api-socket", str(runtime / "vm1.sock"), "vm1", "info")
    assert both.returncode == 2 and "not both" in both.stderr
    with pytest.raises(LookupError, match="nosuchvm"):
        Client.for_vm("nosuchvm")


# -- a VMM that does not answer ------------------------------------------------------------


@needs_kvm
def test_a_stopped_vmm_is_unresponsive_without_holding_ls_up(
    runtime: Path, vmms: list[subprocess.Popen[bytes]]
) -> None:
    stuck = start_vmm(vmms, runtime, "stuck", *ticking_guest())
    start_vmm(vmms, runtime, "fine", *ticking_guest())
    os.kill(stuck.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = ls_json()
        took = time.monotonic() - started
    finally:
        os.kill(stuck.pid, signal.SIGCONT)
    assert listed["stuck"]["state"] == "unresponsive"
    assert listed["stuck"]["error"] == "no answer in time"
    assert listed["fine"]["state"] == "Running"
    assert took < 2.0, f"vmkit ls took {took:.2f} s with one VMM stopped"
    # Back from SIGSTOP, it answers again (and its entry was kept).
    assert ls_json()["stuck"]["state"] == "Running"


# -- the registry ---------------------------------------------------------------------------


@pytest.fixture
def planted(runtime: Path) -> Path:
    """The registry directory, holding a live entry (this process's)."""
    directory = runtime / "vmkit"
    directory.mkdir(mode=0o700)
    start = registry.process_start(os.getpid())
    assert start is not None
    write_entry(directory, "planted", os.getpid(), start, "/tmp/elsewhere.sock")
    assert [e.name for e in registry.entries()] == ["planted"]
    return directory


def test_a_registry_that_others_can_write_is_refused(runtime: Path, planted: Path) -> None:
    os.chmod(planted, 0o777)
    proc = vmkit("ls")
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"refusing the vmkit registry directory {planted}" in proc.stderr
    assert "writable by its group or by others (mode 0777)" in proc.stderr
    remote = vmkit("remote", "planted", "info")
    assert remote.returncode == 1 and "writable by its group" in remote.stderr
    os.chmod(planted, 0o720)
    assert "(mode 0720)" in vmkit("ls", "-q").stderr


def test_a_registry_that_is_a_symlink_is_refused(runtime: Path, planted: Path) -> None:
    planted.rename(runtime / "elsewhere")
    planted.symlink_to(runtime / "elsewhere")
    proc = vmkit("ls")
    assert proc.returncode == 1 and "it is not a directory" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_registry_of_another_user_is_refused(runtime: Path, planted: Path) -> None:
    os.chown(planted, 12345, 12345)
    proc = vmkit("ls", "-q")
    assert proc.returncode == 1
    assert f"owned by uid 12345, not by this user (uid {os.geteuid()})" in proc.stderr
    with pytest.raises(VmError, match="owned by uid 12345"):
        Vm.spawn(None, name="n")
    if not HAVE_KVM:
        return
    # A VMM given a name will not start unlisted; one without a name starts with a warning.
    named = vmkit("--api-socket", str(runtime / "n.sock"), "--name", "n", "--kernel", KERNEL)
    assert named.returncode == 1
    assert named.stderr.startswith("Error registering VM 'n': refusing the vmkit")
    assert not (runtime / "n.sock").exists()
    unnamed = vmkit(
        "--api-socket", str(runtime / "u.sock"), "--kernel", KERNEL,
        "--cmdline", testguest.cmdline(["hello"]), "--memory", "size=64M", "--console", "off",
    )  # fmt: skip
    assert unnamed.returncode == 0, unnamed.stderr
    assert "not listed in 'vmkit ls': refusing the vmkit registry directory" in unnamed.stderr
    assert os.listdir(planted) == ["planted.json"]


def test_the_registry_is_private_in_the_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = registry.registry_dir()
    assert path == str(tmp_path / "vmkit")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    # No runtime directory of this user's: /tmp/vmkit-<uid> instead.
    fallback = f"/tmp/vmkit-{os.geteuid()}"
    (tmp_path / "file").write_text("")
    for value in ("relative/dir", str(tmp_path / "absent"), str(tmp_path / "file")):
        monkeypatch.setenv("XDG_RUNTIME_DIR", value)
        assert registry.registry_path() == fallback
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert registry.registry_path() == fallback


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_runtime_dir_of_another_user_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 12345, 12345)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(other))
    assert registry.registry_path() == f"/tmp/vmkit-{os.geteuid()}"


def test_an_entry_of_a_reused_pid_is_stale(runtime: Path) -> None:
    """A pid now held by another process (its start time differs) is not that VMM."""
    directory = Path(registry.registry_dir())
    start = registry.process_start(os.getpid())
    assert start is not None
    write_entry(directory, "old", os.getpid(), start - 1, "/nonexistent.sock")
    assert registry.entries() == []
    assert not (directory / "old.json").exists()


def test_registering_a_taken_name_is_refused_and_a_stale_one_replaced(runtime: Path) -> None:
    """The check that counts: made under the registry's lock as the entry is written."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        mine = registry.register("x", os.getpid(), "/tmp/a.sock", None)
        with pytest.raises(
            registry.NameTaken, match=rf"'x' is already running \(VMM pid {os.getpid()}\)"
        ):
            registry.register("x", sleeper.pid, "/tmp/b.sock", None)
        other = registry.register(None, sleeper.pid, "b.sock", "vmlinux")
        assert other.entry.name == f"vm-{sleeper.pid}"
        assert other.entry.api_socket == os.path.abspath("b.sock")
        assert other.entry.kernel == os.path.abspath("vmlinux")
        assert [e.name for e in registry.entries()] == [f"vm-{sleeper.pid}", "x"]
        sleeper.kill()
        sleeper.wait()
        # The dead VMM's name is free: its entry is replaced.
        again = registry.register(f"vm-{sleeper.pid}", os.getpid(), "/tmp/c.sock", None)
        assert registry.find(f"vm-{sleeper.pid}").api_socket == "/tmp/c.sock"
        other.remove()  # not its entry any more: left alone
        assert registry.find(f"vm-{sleeper.pid}") == again.entry
        mine.remove()
        again.remove()
        assert registry.entries() == []
        assert sorted(os.listdir(runtime / "vmkit")) == [".lock"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_registering_reads_only_its_own_name_and_listing_cleans_the_rest(runtime: Path) -> None:
    """A fleet starting at once must not pay, per VM, for every entry already
    there: registration and the early name check look at their own name's
    entry only, and the stale entries of other names go with the next listing."""
    directory = Path(registry.registry_dir())
    start = registry.process_start(os.getpid())
    assert start is not None
    write_entry(directory, "dead", os.getpid(), start - 1, "/nonexistent.sock")
    registry.check_name_free("dead")  # stale: free
    mine = registry.register("mine", os.getpid(), "/tmp/a.sock", None)
    with pytest.raises(registry.NameTaken, match="'mine' is already running"):
        registry.check_name_free("mine")
    assert (directory / "dead.json").exists()
    assert [e.name for e in registry.entries()] == ["mine"]
    assert not (directory / "dead.json").exists()
    mine.remove()


@given(
    name=st.text(),
    api_socket=st.text(),
    kernel=st.none() | st.text(),
    started=st.floats(allow_nan=False, allow_infinity=False),
    spawn_dir=st.none() | st.text(),
)
def test_an_entry_is_written_as_json_dumps_writes_it(
    name: str, api_socket: str, kernel: str | None, started: float, spawn_dir: str | None
) -> None:
    """Entries are written without the json module, byte for byte as it
    would (listings of older and newer vmkits read each other's; a spawned
    VM's directory and spawning program are left out when there are none)."""
    owner = None if spawn_dir is None else (3, 4)
    entry = registry.Entry(name, 1, 2, api_socket, kernel, started, spawn_dir, owner)
    fields = ("name", "pid", "pid_start", "api_socket", "kernel", "started")
    written = {f: getattr(entry, f) for f in fields}
    if spawn_dir is not None:
        written |= {"spawn_dir": spawn_dir, "owner": [3, 4]}
    assert entry.to_json() == json.dumps(written)
    assert registry.Entry.from_json(entry.to_json()) == entry


def test_a_vmms_api_server_and_registration_start_without_json(tmp_path: Path) -> None:
    """`vmkit --api-socket` registers before it boots, and an idle one serves
    at once: json (and the re it imports) would add milliseconds to every start."""
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(registry.__file__)))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    code = (
        "import os, sys\n"
        "from vmkit import _reactor, registry\n"
        "from vmkit.api import ApiServer\n"
        "from vmkit.vmm import Vmm\n"
        "vmm = Vmm()\n"
        f"server = ApiServer(vmm, {str(tmp_path / 'api.sock')!r}, reactor=_reactor.shared())\n"
        "server.start()\n"
        "registry.check_name_free('web')\n"
        "entry = registry.register('web', os.getpid(), server.path, None)\n"
        "entry.remove()\n"
        "server.close()\n"
        "vmm.close()\n"
        "print(' '.join(m for m in ('json', 're') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": python_dir, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == [], f"loaded {result.stdout.strip()}"


def test_import_vmkit_does_not_load_the_registry() -> None:
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, vmkit; print(sorted(m for m in ('vmkit.ls', 'vmkit.registry') "
         "if m in sys.modules)); vmkit.list_vms; print('vmkit.ls' in sys.modules)"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert proc.stdout.split("\n")[:2] == ["[]", "True"]


@needs_kvm
@pytest.mark.usefixtures("runtime", "own_tempdir")
def test_a_listing_removes_the_directory_of_a_spawned_vm_killed_with_its_spawner() -> None:
    """A spawned VM process and the program that spawned it, both killed
    (as Ray SIGKILLs a dead worker's children), leave their directory (socket,
    serial output, log) to the listing that removes the stale entry. While the
    spawning program runs, the directory stays its own to read and remove."""
    tmp = tempfile.gettempdir()  # short: the API socket goes below it
    code = (
        "import time\n"
        "from vmkit import Vm, VmConfig, testguest\n"
        "config = VmConfig.from_cli([\n"
        f"    '--kernel', {KERNEL!r}, '--cmdline', testguest.cmdline(['ticks'], ticks=100_000),\n"
        "    '--memory', 'size=64M', '--console', 'off'])\n"
        "vm = Vm.spawn(config)\n"
        "vm.boot()\n"
        "vm.serial.wait_for('tick 1', timeout=30)\n"
        "print(vm.pid, vm.tmpdir, flush=True)\n"
        "time.sleep(120)\n"
    )
    spawners: list[subprocess.Popen[str]] = []

    def spawn() -> tuple[subprocess.Popen[str], int, Path]:
        spawner = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp)},  # what stays behind stays here
        )
        spawners.append(spawner)
        assert spawner.stdout is not None
        pid, directory = spawner.stdout.readline().split()
        assert (Path(directory) / "serial.log").exists()
        return spawner, int(pid), Path(directory)

    def gone(pid: int) -> None:
        deadline = time.monotonic() + 10
        while registry.process_start(pid) is not None:
            assert time.monotonic() < deadline, pid
            time.sleep(0.01)

    try:
        running, running_vm, kept = spawn()
        killed, killed_vm, orphaned = spawn()
        # Stopped, the VM process cannot clean up when its spawner goes.
        os.kill(killed_vm, signal.SIGSTOP)
        killed.kill()
        killed.wait(10)
        os.kill(killed_vm, signal.SIGKILL)
        os.kill(running_vm, signal.SIGKILL)
        gone(killed_vm)
        gone(running_vm)
        assert orphaned.exists() and kept.exists()
        assert registry.entries() == []
        assert not orphaned.exists()
        assert (kept / "serial.log").exists()
        assert running.poll() is None
    finally:
        for spawner in spawners:
            if spawner.poll() is None:
                spawner.kill()
            spawner.wait(10)
            if spawner.stdout is not None:
                spawner.stdout.close()


@needs_kvm
@pytest.mark.usefixtures("runtime", "own_tempdir")
def test_a_listing_removes_the_directory_of_a_vm_killed_before_it_was_listed() -> None:
    """A spawning program and its VM process killed together after the VM's
    directory was made but before its registry entry was written leave no
    entry to go by: the directory's name says whose it is, and a listing
    removes it once that program is gone. A live program's stays."""
    tmp = Path(tempfile.gettempdir())
    code = (
        "import time\n"
        "from vmkit import Vm, VmConfig, registry, testguest\n"
        "def stuck(name, pid, api_socket, kernel, spawn_dir=None):\n"
        "    print(pid, spawn_dir, flush=True)\n"
        "    time.sleep(120)\n"
        "registry.register = stuck\n"
        "Vm.spawn(VmConfig.from_cli([\n"
        f"    '--kernel', {KERNEL!r}, '--memory', 'size=64M', '--console', 'off']))\n"
    )
    spawner = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    live = Path(tempfile.mkdtemp(prefix=registry.spawn_dir_prefix(), dir=tmp))
    (live / "serial.log").write_bytes(b"")
    try:
        assert spawner.stdout is not None
        vm_pid, directory = spawner.stdout.readline().split()
        orphaned = Path(directory)
        assert orphaned.parent == tmp and (orphaned / "vmm.log").exists()
        assert orphaned.name.startswith(f"vmkit-vmm-{spawner.pid}-")
        # Stopped, the VM process cannot clean up when its spawner goes.
        os.kill(int(vm_pid), signal.SIGSTOP)
        spawner.kill()
        spawner.wait(10)
        os.kill(int(vm_pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while registry.process_start(int(vm_pid)) is not None:
            assert time.monotonic() < deadline, vm_pid
            time.sleep(0.01)
        assert orphaned.exists()
        assert list_vms() == []
        assert not orphaned.exists()
        assert (live / "serial.log").exists()
    finally:
        if spawner.poll() is None:
            spawner.kill()
        spawner.wait(10)
        if spawner.stdout is not None:
            spawner.stdout.close()
