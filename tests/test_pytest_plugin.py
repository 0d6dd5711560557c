"""vmkit's pytest plugin (``vmkit.pytest_plugin``, the ``pytest11`` entry point
``vmkit``), run through pytester as a user's test file would use it: the VM
factory closes every VM, a failing test's report carries the guest's serial
output, the disk factory, and the markers skip with their reasons."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from vmkit import pytest_plugin

pytest_plugins = ["pytester"]


def test_the_plugin_is_registered_through_its_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(request):
            assert request.config.pluginmanager.has_plugin("vmkit")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.vmkit_kvm
def test_vms_are_closed_and_a_failure_shows_their_serial_output(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os

        from vmkit import testguest

        def args(guest, exit):
            return ["--kernel", str(guest), "--cmdline", testguest.cmdline(["hello"], exit),
                    "--serial", "tty", "--console", "off"]

        def test_boots(vmkit_vm, vmkit_test_guest):
            vm = vmkit_vm(args(vmkit_test_guest, "poweroff"))
            vm.boot()
            assert vm.wait(30).reason == "poweroff"

        def test_fails_while_running(vmkit_vm, vmkit_test_guest):
            vm = vmkit_vm(args(vmkit_test_guest, "halt"))
            vm.boot()
            vm.serial.wait_for("ready", timeout=30)
            assert False, "on purpose"

        def test_after(vmkit_vm):
            # The running VM of the failed test was closed: no vCPU thread is left.
            names = []
            for t in os.listdir("/proc/self/task"):
                try:
                    names.append(open(f"/proc/self/task/{t}/comm").read().strip())
                except (FileNotFoundError, ProcessLookupError):
                    pass  # a thread that ended meanwhile is no vCPU left running
            assert not [n for n in names if n.startswith("vcpu")], names
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*vmkit VM 0 serial*", "*vmkit-guest: ready*"])


def test_disk_factory_makes_images_of_the_size_with_the_fill(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_disks(vmkit_disk):
            a = vmkit_disk(1 << 20, b"hello")
            b = vmkit_disk(4096)
            assert a != b and a.stat().st_size == 1 << 20 and b.stat().st_size == 4096
            assert a.read_bytes()[:5] == b"hello" and a.read_bytes()[5:] == bytes((1 << 20) - 5)
            with pytest.raises(ValueError, match="larger than the image"):
                vmkit_disk(2, b"abc")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_markers_skip_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vmkit_kvm
        def test_kvm():
            pass

        @pytest.mark.vmkit_hardware_kvm
        def test_hardware():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rs")
    kvm, hardware = pytest_plugin.kvm_missing(), pytest_plugin.hardware_kvm_missing()
    result.assert_outcomes(
        passed=(kvm is None) + (hardware is None),
        skipped=(kvm is not None) + (hardware is not None),
    )
    for reason in (kvm, hardware):
        if reason is not None:
            result.stdout.fnmatch_lines([f"*{reason}*"])


# A test file's fixture that outlives vmkit_vm (requested first, so torn down
# last) and records, at its teardown, whether the VMs were gone by then.
TEARDOWN_PROBE = """
import json
import os
import signal
import time

import pytest
from vmkit import testguest

def args(guest):
    return ["--kernel", str(guest), "--cmdline", testguest.cmdline(["hello"], "halt"),
            "--serial", "tty", "--console", "off", "--memory", "size=64M"]

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

def vcpu_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread just ended (ENOENT or ESRCH)
    return [n for n in names if n.startswith("vcpu")]

@pytest.fixture
def probe(tmp_path_factory):
    seen = {}
    yield seen
    seen["vcpus_after"] = vcpu_threads()
    seen["vmm_alive_after"] = alive(seen["vmm"])
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.vmkit_kvm
@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGINT"])
def test_vms_are_closed_when_the_run_is_interrupted(
    pytester: pytest.Pytester, how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of a test: pytest stops, and the in-process VM and
    the spawned VMM are gone before the session ends."""
    interrupt = (
        "raise KeyboardInterrupt"
        if how == "KeyboardInterrupt"
        # A run started in the background inherits SIGINT ignored; a terminal's
        # Ctrl-C reaches Python's own handler.
        else "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)"
    )
    pytester.makepyfile(
        TEARDOWN_PROBE
        + f"""
def test_interrupted(probe, vmkit_vm, vmkit_test_guest):
    vm = vmkit_vm(args(vmkit_test_guest))
    vm.boot()
    spawned = vmkit_vm(args(vmkit_test_guest), spawn=True)
    spawned.boot()
    vm.serial.wait_for("ready", timeout=30)
    spawned.serial.wait_for("ready", timeout=30)
    probe["vmm"] = spawned.pid
    probe["vcpus_before"] = vcpu_threads()
    probe["vmm_alive_before"] = alive(spawned.pid)
    {interrupt}

def test_never_reached():
    pass
"""
    )
    out = tmp_path / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(out))
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    seen = json.loads(out.read_text())
    assert seen["vcpus_before"] and seen["vmm_alive_before"], seen
    assert seen["vcpus_after"] == [] and not seen["vmm_alive_after"], seen


def _vmm_processes() -> set[int]:
    """Live vmkit VMM processes (spawned VMMs run ``vmkit``'s CLI)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"--api-socket" in cmdline and any(b"vmkit" in a for a in cmdline):
            pids.add(int(entry.name))
    return pids


@pytest.mark.vmkit_kvm
@pytest.mark.skipif(
    importlib.util.find_spec("xdist") is None,
    reason="pytest-xdist (the test extra) is not installed",
)
def test_under_xdist_names_are_unique_and_a_crashed_worker_leaves_no_vmm(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pytest -n 2``: tests in different workers get different sockets and
    taps and their spawned VMs serve on them; a worker that dies (SIGKILL, no
    teardown at all) takes its spawned VMM with it."""
    pytester.makepyfile(
        """
import json
import os
import signal

import pytest
from vmkit import testguest

def args(guest, sock):
    return ["--kernel", str(guest), "--cmdline", testguest.cmdline(["hello"], "halt"),
            "--serial", "tty", "--console", "off", "--memory", "size=64M"]

@pytest.mark.parametrize("n", range(4))
def test_names(n, vmkit_paths, vmkit_vm, vmkit_test_guest):
    sock = vmkit_paths.socket()
    vm = vmkit_vm(args(vmkit_test_guest, sock), spawn=True, api_socket=sock)
    vm.boot()
    vm.serial.wait_for("ready", timeout=30)
    assert vm.info().state == "Running" and sock.is_socket()
    record = {"worker": vmkit_paths.worker, "socket": str(sock), "vmm": vm.pid,
              "taps": [vmkit_paths.tap(), vmkit_paths.tap()]}
    with open(os.path.join(os.environ["OUT"], f"names{n}.json"), "w") as f:
        json.dump(record, f)

def test_crash(vmkit_vm, vmkit_test_guest):
    vm = vmkit_vm(args(vmkit_test_guest, None), spawn=True)
    vm.boot()
    vm.serial.wait_for("ready", timeout=30)
    with open(os.path.join(os.environ["OUT"], "crashed.json"), "w") as f:
        json.dump({"vmm": vm.pid}, f)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    )
    monkeypatch.setenv("OUT", str(tmp_path))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*crashed*"])
    records = [json.loads((tmp_path / f"names{n}.json").read_text()) for n in range(4)]
    assert len({r["worker"] for r in records}) == 2, records
    sockets = [r["socket"] for r in records]
    taps = [t for r in records for t in r["taps"]]
    assert len(set(sockets)) == 4 and len(set(taps)) == 8, records
    assert all(len(t) <= 15 for t in taps)
    assert not any(Path(s).parent.exists() for s in sockets), "socket directories left behind"
    crashed = json.loads((tmp_path / "crashed.json").read_text())["vmm"]
    # Only this run's VMMs: the other workers of an outer `pytest -n` start
    # and stop theirs meanwhile.
    started = {r["vmm"] for r in records} | {crashed}
    deadline = time.monotonic() + 10
    while crashed in _vmm_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert crashed not in _vmm_processes(), "the crashed worker's VMM is still running"
    assert not started & _vmm_processes(), "a VMM of the run outlived it"


def test_paths_are_short_unique_and_removed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        SEEN = {}

        @pytest.mark.parametrize("n", range(2))
        def test_paths(n, vmkit_paths):
            sock = vmkit_paths.socket("a" * 20)
            assert len(str(sock)) <= 107 and not sock.exists()
            SEEN[n] = (sock, vmkit_paths.tap())
            with pytest.raises(ValueError, match="too long for a unix socket"):
                vmkit_paths.socket("b" * 120)

        def test_after():
            (a, tap_a), (b, tap_b) = SEEN[0], SEEN[1]
            assert a != b and tap_a != tap_b
            assert not a.parent.exists() and not b.parent.exists()
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=3)


def test_a_debian_guest_that_cannot_be_built_fails_its_tests_saying_why(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture does not skip: a broken build is an error, named."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("VMKIT_CACHE_DIR", str(blocker))
    pytester.makepyfile(
        """
        def test_one(vmkit_debian_guest):
            pass

        def test_two(vmkit_debian_guest):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [f"*building the Debian guest failed: cannot create the cache directory {blocker}*"]
    )
