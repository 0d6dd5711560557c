"""The `python -m vmkit` command line (ch-reference §3.1-3.3), run as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

import pytest
import vmkit
from _vcpus import quiet_vcpus, read_until, tgkill, vcpu_switches, vcpu_tids
from vmkit import ConfigError, UsageError
from vmkit.config import VmConfig

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["COLUMNS"] = "400"  # keep help lines unwrapped where possible
    return subprocess.run(
        [sys.executable, "-m", "vmkit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def squash(text: str) -> str:
    return " ".join(text.split())


BASE = ["--print-config", "--kernel", "./vmlinux"]
VALIDATION = "Error parsing config: Error validating configuration: "


def test_print_config() -> None:
    args = ["--print-config", "--kernel", "./vmlinux", "--cpus", "boot=2", "--disk", "path=a.img"]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cpus"]["boot_vcpus"] == 2
    assert data["cpus"]["max_vcpus"] == 2
    assert data["payload"]["kernel"] == "./vmlinux"
    assert [d["path"] for d in data["disks"]] == ["a.img"]
    assert data["disks"][0]["queue_size"] == 128
    assert data["console"]["mode"] == "Tty" and data["serial"]["mode"] == "Null"
    # same as the Python API
    assert data == VmConfig.from_cli(args[1:]).to_dict()
    # field order (ref §2.3)
    keys = list(json.loads(proc.stdout, object_pairs_hook=lambda p: dict(p)))
    assert keys[:3] == ["cpus", "memory", "payload"]


def test_print_config_sets_top_level_iommu() -> None:
    proc = run(*BASE, "--disk", "path=a.img,iommu=on")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["iommu"] is True


def test_several_values_after_one_flag() -> None:
    proc = run(
        *BASE,
        "--disk",
        "path=a.img",
        "path=b.img",
        "--net",
        "tap=t0",
        "tap=t1",
        "--memory",
        "size=0",
        "--memory-zone",
        "id=z0,size=1G",
        "id=z1,size=1G",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [d["path"] for d in data["disks"]] == ["a.img", "b.img"]
    assert [n["tap"] for n in data["net"]] == ["t0", "t1"]
    assert [z["id"] for z in data["memory"]["zones"]] == ["z0", "z1"]
    for n in data["net"]:
        assert n["mac"].startswith("2e:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--cpus", "boot=x"],
            "Error parsing config: Error parsing --cpus: unable to convert x for boot",
        ),
        (
            ["--memory", "size=1k"],
            "Error parsing config: Error parsing --memory: unable to convert 1k for size",
        ),
        (
            ["--disk", "path=a.img,foo=1"],
            "Error parsing config: Error parsing --disk: unknown option: foo",
        ),
        (
            ["--cpus", "boot=2,max=1"],
            "Error parsing config: Error validating configuration: Max CPUs lower than boot CPUs",
        ),
        (
            ["--cpus", "features=foo"],
            "Error parsing config: Invalid feature in --cpus features list: foo",
        ),
        (["--pmem", "size=128M"], "Error parsing config: Error parsing --pmem: file missing"),
        (
            ["--console", "file="],
            VALIDATION + "Path missing when using file console mode",
        ),
        (
            ["--serial", "bogus"],
            "Error parsing config: Error parsing --console: unknown option: bogus",
        ),
        (
            ["--memory", "size=17179869184G"],
            "Error parsing config: Error parsing --memory: unable to convert 17179869184G for size",
        ),
        (
            ["--numa", "cpus=[256]"],
            "Error parsing config: Error parsing --numa: unable to convert [256] for cpus",
        ),
        (
            ["--net", "num_queues=1"],
            VALIDATION + "Number of queues to virtio_net less than 2",
        ),
        (
            ["--balloon", "size=1G"],
            VALIDATION + "Balloon size (1073741824) greater than RAM (536870912)",
        ),
        (
            ["--memory", "size=1G", "--memory-zone", "size=1G"],
            "Error parsing config: Error parsing --memory-zone: id missing",
        ),
        # parse order (val §2): net is parsed before cpus
        (
            ["--disk", "path=a", "--cpus", "boot=x", "--net", "foo"],
            "Error parsing config: Error parsing --net: unknown option: foo",
        ),
    ],
)
def test_config_errors_exit_1(args: list[str], message: str) -> None:
    proc = run(*BASE, *args)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert message in proc.stderr.splitlines(), proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--disk", "path=a", "--disk", "path=b"],  # repeating a flag (ref §3.1)
        ["--cpus", "boot=1", "--cpus", "boot=2"],
        ["--kernel", "./other"],  # BASE already has --kernel
        ["--seccomp", "maybe"],
        ["--landlock"],  # not present at this revision (ref §3.1)
        ["--debug-console", "off"],
        ["--pci-segment", "pci_segment=0"],
        ["--cpus"],  # missing value
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = run(*BASE, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() != ""


@pytest.mark.parametrize("value", ["true", "false", "log"])
def test_seccomp_values_accepted(value: str) -> None:
    proc = run(*BASE, "--seccomp", value)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)


def test_flags_and_non_vm_options_accepted() -> None:
    proc = run(
        *BASE,
        "--pvpanic",
        "--watchdog",
        "-v",
        "-v",
        "--cmdline",
        "console=ttyS0 root=/dev/vda",
        "--initramfs",
        "./initrd",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["pvpanic"], data["watchdog"]) == (True, True)
    assert data["payload"]["cmdline"] == "console=ttyS0 root=/dev/vda"
    assert data["payload"]["initramfs"] == "./initrd"


HELP_TEXTS = [
    "Kernel command line",
    "Path to initramfs image",
    "Path to firmware that is loaded in an architectural specific way",
    "Path to kernel to load. This may be a kernel or firmware that supports a PVH entry point "
    "(e.g. vmlinux) "
    "or architecture equivalent",
    'Random number generator parameters "src=<entropy_source_path>,iommu=on|off"',
    'Memory parameters "size=<guest_memory_size>,mergeable=on|off,shared=on|off,hugepages=on|off,'
    "hugepage_size=<hugepage_size>,hotplug_method=acpi|virtio-mem,hotplug_size=<hotpluggable_memory_size>,"
    'hotplugged_size=<hotplugged_memory_size>,prefault=on|off,thp=on|off"',
    "Control serial port: off|null|pty|tty|file=</path/to/a/file>|socket=</path/to/a/file>",
    'Control (virtio) console: "off|null|pty|tty|file=</path/to/a/file>,iommu=on|off"',
    "Enable pvpanic device",
    "Enable virtio-watchdog",
    "Sets the level of debugging output",
    "Log file. Standard error is used if not specified",
    "HTTP API socket (UNIX domain socket): path=</path/to/a/file> or fd=<fd>.",
    "File to report events on: path=</path/to/a/file> or fd=<fd>",
    'Balloon parameters "size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off"',
    'Direct device assignment parameters "path=<device_path>,iommu=on|off,id=<device_id>,'
    'pci_segment=<segment_id>"',
    'TPM device "(UNIX Domain Socket from swtpm) socket=</path/to/a/socket>"',
    'virtio-fs parameters "tag=<tag_name>,socket=<socket_path>,num_queues=<number_of_queues>,'
    'queue_size=<size_of_each_queue>,id=<device_id>,pci_segment=<segment_id>"',
]


def test_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    out = squash(proc.stdout)
    for text in HELP_TEXTS:
        assert squash(text) in out, text
    for flag in [
        "--cpus",
        "--platform",
        "--memory",
        "--memory-zone",
        "--firmware",
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--rate-limit-group",
        "--disk",
        "--net",
        "--rng",
        "--balloon",
        "--fs",
        "--pmem",
        "--serial",
        "--console",
        "--device",
        "--user-device",
        "--vdpa",
        "--vsock",
        "--pvpanic",
        "--numa",
        "--watchdog",
        "--log-file",
        "--api-socket",
        "--event-monitor",
        "--restore",
        "--seccomp",
        "--tpm",
    ]:
        assert re.search(re.escape(flag) + r"(?![\w-])", proc.stdout), flag


def test_short_help() -> None:
    proc = run("-h")
    assert proc.returncode == 0
    assert "--kernel" in proc.stdout


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    proc = run(flag)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+\.\d+", proc.stdout), proc.stdout


# ---------------------------------------------------------------------------
# The same usage rules through the Python API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--kernel", "k", "--bogus"],
        ["--kernel", "k", "--disk", "path=a", "--disk", "path=b"],
        ["--kernel", "k", "--kernel", "j"],
        ["--kernel", "k", "--seccomp", "maybe"],
    ],
)
def test_from_cli_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        VmConfig.from_cli(argv)
    assert not isinstance(info.value, ConfigError)


# -- options vmkit cannot honour are refused, never silently left out -------------------------

GUEST = ["--kernel", "./absent-vmlinux", "--serial", "null", "--console", "off"]


@pytest.mark.parametrize("value", ["true", "false", "log"])
def test_every_seccomp_value_reaches_the_boot(value: str) -> None:
    # The filters are installed; the boot goes on (and fails on the absent kernel
    # with the error, not a seccomp violation: the refusal path is inside the filter).
    proc = run(*GUEST, "--seccomp", value)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error booting VM: Cannot open kernel"), proc.stderr


def test_restore_of_a_missing_snapshot() -> None:
    proc = run("--restore", "source_url=file:///tmp/absent")
    assert (proc.returncode, proc.stderr) == (
        1,
        "Error restoring VM: Cannot restore VM: Failed to send migratable component snapshot: "
        "Destination is not a directory\n",
    )


@pytest.mark.parametrize(
    ("args", "given"),
    [
        ([*GUEST], "--kernel, --serial, --console"),
        (["--memory", "size=64M", "--cpus", "boot=2"], "--cpus, --memory"),
    ],
)
def test_restore_refuses_vm_options_it_would_ignore(args: list[str], given: str) -> None:
    proc = run("--restore", "source_url=file:///tmp/absent", *args)
    assert (proc.returncode, proc.stderr) == (
        1,
        "Error restoring VM: --restore takes the VM's config from the snapshot; "
        f"{given} cannot be given with it\n",
    )


def test_restore_syntax_errors_come_first() -> None:
    proc = run("--restore", "bogus=1")
    assert (proc.returncode, proc.stderr) == (
        1,
        "Error parsing restore: Error parsing --restore: unknown option: bogus\n",
    )


@pytest.mark.vmkit_kvm
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serial", "null", "--console", "socket=/tmp/absent.sock"],
         "The virtio console cannot use a socket"),
        (["--memory", "size=1000000"], "--memory size 1000000 is not a multiple of the page size"),
        (
            ["--memory", "size=4M,hugepages=on,hugepage_size=2M", "--memory-zone",
             "id=z0,size=1M,hugepage_size=2M"],
            "--memory-zone z0 size 1048576 is not a multiple of the page size 2097152",
        ),
        (["--platform", "serial_number=x"], "--platform serial_number, uuid and oem_strings"),
        (["--platform", "uuid=1-2"], "--platform serial_number, uuid and oem_strings"),
        (["--platform", "oem_strings=[a]"], "--platform serial_number, uuid and oem_strings"),
        # v37 builds the VM at boot, so whatever the VMM refuses is a boot error
        (["--sgx-epc", "id=epc0,size=64M"], "--sgx-epc is not supported yet\n"),
    ],
)  # fmt: skip
def test_boot_refusals(args: list[str], message: str) -> None:
    from vmkit import testguest

    kernel = str(testguest.image_path("pvh"))
    defaults = [] if "--console" in args else ["--serial", "null", "--console", "off"]
    proc = run("--kernel", kernel, *defaults, *args)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error booting VM: {message}"), proc.stderr


# -- a running VMM: no watchdog by default, stops on SIGTERM whichever thread takes it ---------

needs_kvm = pytest.mark.vmkit_kvm


def halting_vmm(tmp_path: Path, api: bool, sigint_ignored: bool = False) -> subprocess.Popen[bytes]:
    """``vmkit`` booting the test guest, which halts with interrupts off once done
    (``sigint_ignored``: started with SIGINT ignored, as a script's background job)."""
    from vmkit import testguest

    argv = [
        sys.executable, "-m", "vmkit",
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "halt"),
        "--cpus", "boot=2", "--memory", "size=128M", "--serial", "tty", "--console", "off",
    ]  # fmt: skip
    if api:
        argv += ["--api-socket", str(tmp_path / "api.sock")]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )


def end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate()


@needs_kvm
@pytest.mark.parametrize("api", [False, True], ids=["boot", "api-socket"])
def test_no_watchdog_by_default_a_halted_guest_keeps_running(tmp_path: Path, api: bool) -> None:
    process = halting_vmm(tmp_path, api)
    try:
        assert process.stdout is not None
        read_until(process.stdout, b"vmkit-guest: exit halt", timeout=30)
        before = quiet_vcpus(process.pid)
        # A watchdog armed with the old 30 s default samples every vCPU each second.
        time.sleep(3.0)
        assert process.poll() is None, "the VMM ended a guest that halted with interrupts off"
        woken = vcpu_switches(process.pid) - before
        assert woken <= 1, f"the vCPU threads were woken {woken} times: a watchdog samples them"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        end(process)


@needs_kvm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("target", ["process", "vcpu-thread"])
@pytest.mark.parametrize("api", [False, True], ids=["boot", "api-socket"])
def test_signals_end_the_vmm_whichever_thread_takes_them(
    tmp_path: Path, api: bool, target: str, sig: signal.Signals
) -> None:
    # The main thread waits in poll(): a signal that a vCPU thread takes must still wake it.
    process = halting_vmm(tmp_path, api)
    try:
        assert process.stdout is not None
        printed = read_until(process.stdout, b"vmkit-guest: exit halt", timeout=30)
        if target == "process":
            process.send_signal(sig)
        else:
            tgkill(process.pid, vcpu_tids(process.pid)[0], sig)
        out, err = process.communicate(timeout=20)
    finally:
        end(process)
    assert process.returncode == 0, err.decode()
    assert err == b""
    assert (printed + out).count(b"vmkit-guest: ready") == 1
    assert not (tmp_path / "api.sock").exists()


@needs_kvm
@pytest.mark.parametrize("api", [False, True], ids=["boot", "api-socket"])
def test_sigint_ends_the_vmm_even_when_started_ignoring_it(tmp_path: Path, api: bool) -> None:
    """A shell starts a script's background jobs with SIGINT ignored; Cloud
    Hypervisor still ends cleanly on it (checked against the binary), so vmkit
    does too."""
    process = halting_vmm(tmp_path, api, sigint_ignored=True)
    try:
        assert process.stdout is not None
        read_until(process.stdout, b"vmkit-guest: exit halt", timeout=30)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        end(process)
    assert process.returncode == 0, err.decode()
    assert not (tmp_path / "api.sock").exists()


# -- the `vmkit` command's start-up ----------------------------------------------------------

#: What a boot through the command need not import (`signal` imports `enum`, with `functools` and
#: `collections`: ~7 ms of a ~25 ms start to the guest's first line).
NOT_AT_BOOT = ("enum", "re", "functools", "collections", "typing", "inspect", "dataclasses",
               "logging", "json", "threading", "socket", "subprocess")  # fmt: skip


def installed_command() -> Path:
    try:
        metadata.distribution("vmkit")
    except metadata.PackageNotFoundError:
        pytest.skip("vmkit is imported from a source tree, not installed: no `vmkit` command")
    return Path(sysconfig.get_path("scripts")) / "vmkit"


def test_the_installed_command_runs() -> None:
    command = installed_command()
    proc = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, run("--version").stdout, "")


def test_the_installed_command_imports_nothing_main_does_not() -> None:
    """pip's wrapper for an entry point imports `re` (with `enum`): as much
    again as vmkit's own start-up imports. The command is a script of ours."""
    command = installed_command()
    by_command = set(imports(str(command), "--version")) - set(imports("-c", "pass"))
    assert "vmkit.cli" in by_command
    assert [m for m in NOT_AT_BOOT if m in by_command] == []


def imports(*args: str) -> list[str]:
    """The modules ``python -S -X importtime *args`` imports, in order; vmkit from its
    directory (-S: no site-packages hooks, which in some environments import re, enum...)."""
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(vmkit.__file__ or "")))
    proc = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", *args],
        env={**os.environ, "PYTHONPATH": python_dir},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    timings = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return [line.rsplit("|", 1)[1].strip() for line in timings[1:]]


@needs_kvm
def test_a_boot_imports_only_what_it_uses() -> None:
    from vmkit import testguest

    # `main()` as the console script calls it (a `-m` run would add runpy's imports).
    booted = imports(
        "-c", "from vmkit.cli import main; main()",
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "poweroff"),
        "--cpus", "boot=1", "--memory", "size=128M", "--serial", "tty", "--console", "off",
    )  # fmt: skip
    by_command = set(booted) - set(imports("-c", "pass"))
    assert "vmkit.cli" in by_command
    assert [m for m in NOT_AT_BOOT if m in by_command] == []


def _run_observed_api_socket_vmm(
    patch: str, sock: Path, guest_exit: str, runtime: Path
) -> subprocess.CompletedProcess[str]:
    """`vmkit --api-socket path=SOCK` booting the test guest (which then
    does `guest_exit`) in a fresh interpreter that runs `patch` first: Python
    that wraps a vmkit function to look at, or interrupt, the VMM's start."""
    from vmkit import testguest

    argv = [
        "--api-socket", f"path={sock}", "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], guest_exit),
        "--cpus", "boot=1", "--memory", "size=128M", "--serial", "null", "--console", "off",
    ]  # fmt: skip
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(vmkit.__file__ or "")))
    return subprocess.run(
        [sys.executable, "-S", "-c", patch + "import vmkit.cli\nvmkit.cli.main()\n", *argv],
        env={**os.environ, "PYTHONPATH": python_dir, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_kvm
def test_a_sigint_as_the_api_server_takes_the_early_socket_ends_the_vmm_cleanly(
    tmp_path: Path,
) -> None:
    """`vmkit --api-socket PATH` binds early and hands the socket to the API
    server after the boot: a SIGINT at that moment (KeyboardInterrupt right
    after the hand-over) ends the VMM with status 0, its socket closed once
    and its file removed."""
    sock = tmp_path / "api.sock"
    patch = (
        "import vmkit.api as api\n"
        "adopt = api.ApiServer.adopt\n"
        "def interrupted(self, fd, inode):\n"
        "    adopt(self, fd, inode)\n"
        "    raise KeyboardInterrupt\n"
        "api.ApiServer.adopt = interrupted\n"
    )
    proc = _run_observed_api_socket_vmm(patch, sock, "halt", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not sock.exists()


@needs_kvm
def test_an_api_socket_vmm_boots_before_it_loads_the_api_server(tmp_path: Path) -> None:
    """`vmkit --api-socket PATH` with a VM to boot binds and lists the socket,
    boots, and only then loads the API server (`socket`, `selectors`) and
    `threading` (with `functools` and `collections`), which then load while
    the guest starts; the socket file goes when the VMM ends."""
    sock = tmp_path / "api.sock"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    patch = (
        "import os, stat, sys\n"
        "import vmkit.vm\n"
        "boot = vmkit.vm.Vm.boot\n"
        "def observed(vm):\n"
        f"    mode = os.stat({str(sock)!r}).st_mode\n"
        "    listed = os.listdir(os.path.join(os.environ['XDG_RUNTIME_DIR'], 'vmkit'))\n"
        "    print('at boot:', stat.S_ISSOCK(mode), oct(stat.S_IMODE(mode)), len(listed) > 0,\n"
        "          [m for m in ('vmkit.api', 'socket', 'selectors', 'threading',\n"
        "                       'functools', 'collections') if m in sys.modules],\n"
        "          flush=True)\n"
        "    return boot(vm)\n"
        "vmkit.vm.Vm.boot = observed\n"
    )
    proc = _run_observed_api_socket_vmm(patch, sock, "poweroff", runtime)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["at boot: True 0o600 True []"], proc.stdout
    assert not sock.exists()
