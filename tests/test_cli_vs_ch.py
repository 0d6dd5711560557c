"""The ``vmkit`` command against ``cloud-hypervisor`` for command lines that fail at boot.

Each case runs both with the same arguments and asserts the same exit status
and the same first words of the error (the text before the first ``: ``, e.g.
``Error booting VM``). After that prefix Cloud Hypervisor prints its internal
Rust error chain (``VmBoot(KernelFile(Os { code: 2, ... }))``) where vmkit
prints a sentence. Cloud Hypervisor's log lines (``cloud-hypervisor: <time>:
...``) are not part of the error.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, ch_binary
from vmkit import testguest

pytestmark = [
    pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING),
    pytest.mark.vmkit_kvm,
]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmkit-cli-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_both(*args: str, timeout: float = 30) -> dict[str, tuple[int, str]]:
    """{"ch"|"vmkit": (exit status, the first line of the error)}."""
    results = {}
    for kind, program in (
        ("ch", [ch_binary("cloud-hypervisor")]),
        ("vmkit", [sys.executable, "-m", "vmkit"]),
    ):
        proc = subprocess.run(
            [*program, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        lines = [
            line
            for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith("cloud-hypervisor: ")
        ]
        results[kind] = (proc.returncode, lines[0] if lines else "")
    return results


def first_words(line: str) -> str:
    return line.split(": ", 1)[0]


def assert_same_start(results: dict[str, tuple[int, str]], prefix: str) -> None:
    (ch_status, ch_line), (vmkit_status, vmkit_line) = results["ch"], results["vmkit"]
    assert vmkit_status == ch_status, results
    assert first_words(vmkit_line) == first_words(ch_line) == prefix, results


def guest(**options: str) -> list[str]:
    """The test guest's command line; ``options`` replace or add flags (``disk=...``)."""
    flags = {
        "kernel": str(testguest.image_path("pvh")),
        "cmdline": testguest.cmdline(["hello"]),
        "memory": "size=64M",
        "serial": "null",
        "console": "off",
    }
    flags.update(options)
    return [word for name, value in flags.items() for word in (f"--{name}", value)]


def test_console_socket_is_refused_at_boot(workdir: Path) -> None:
    args = guest(console=f"socket={workdir / 'console.sock'}")
    results = run_both(*args)
    assert_same_start(results, "Error booting VM")
    assert results["ch"][0] == 1
    assert "NoSocketOptionSupportForConsoleDevice" in results["ch"][1]
    assert "cannot use a socket" in results["vmkit"][1]


def test_missing_kernel(workdir: Path) -> None:
    results = run_both("--kernel", str(workdir / "vmlinux"), "--memory", "size=64M")
    assert_same_start(results, "Error booting VM")
    assert results["vmkit"][1].endswith("No such file or directory (os error 2)")


def test_missing_disk_file(workdir: Path) -> None:
    results = run_both(*guest(disk=f"path={workdir / 'absent.img'}"))
    assert_same_start(results, "Error booting VM")
    assert "absent.img" in results["vmkit"][1]


@pytest.mark.parametrize(
    ("size", "vmkit_says"),
    [
        ("0", "memory size is 0 and no memory zone is given"),
        ("1000000", "--memory size 1000000 is not a multiple of the page size 4096"),
    ],
)
def test_memory_sizes_refused_at_boot(size: str, vmkit_says: str) -> None:
    results = run_both(*guest(memory=f"size={size}"))
    assert_same_start(results, "Error booting VM")
    assert results["ch"][0] == 1
    assert vmkit_says in results["vmkit"][1]


def test_restore_alone(workdir: Path) -> None:
    results = run_both("--restore", f"source_url=file://{workdir / 'absent'}")
    assert_same_start(results, "Error restoring VM")
    # v37 prints the error's Debug form with a backtrace; the cause is the same.
    assert "Destination is not a directory" in results["ch"][1]
    assert results["vmkit"][1].endswith("Destination is not a directory")


def test_restore_with_a_kernel_is_refused_where_ch_ignores_it(workdir: Path) -> None:
    """A deliberate difference: v37 boots the kernel and ignores --restore (it exits 0
    when the guest powers off); vmkit refuses what it would otherwise leave out."""
    results = run_both(*guest(restore=f"source_url=file://{workdir / 'absent'}"))
    assert results["ch"] == (0, ""), results
    assert results["vmkit"][0] == 1
    assert first_words(results["vmkit"][1]) == "Error restoring VM"


@pytest.mark.parametrize("flag", ["--landlock", "--gdb", "--debug-console"])
def test_flags_of_later_versions_are_unknown(flag: str) -> None:
    results = run_both(*guest(), flag, "x")
    assert results["vmkit"] == results["ch"], results
    assert results["ch"] == (2, f"error: unexpected argument '{flag}' found")


@pytest.mark.parametrize(("flag", "value"), [("--memory", "size=64M"), ("--kernel", "/x")])
def test_a_flag_given_twice(flag: str, value: str) -> None:
    results = run_both(*guest(), flag, value)
    assert results["vmkit"] == results["ch"], results
    assert results["ch"][0] == 2


def test_no_payload_without_api_socket() -> None:
    """v37 idles forever with nothing to boot and no API to receive a VM; vmkit says why."""
    ch = subprocess.Popen(
        [ch_binary("cloud-hypervisor"), "--memory", "size=64M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            ch.wait(1.5)
    finally:
        ch.kill()
        ch.wait()
    proc = subprocess.run(
        [sys.executable, "-m", "vmkit", "--memory", "size=64M"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "No kernel specified" in proc.stderr
