"""vmkit's pytest plugin: VMs as fixtures that always go away.

Installed with the package (the ``pytest11`` entry point ``vmkit``); nothing
runs unless a test asks for one of its fixtures or markers:

- ``vmkit_vm``: a factory. ``vmkit_vm(config_or_args, spawn=False)`` builds a
  ``Vm`` from a ``VmConfig`` or from command-line option strings (``["--kernel",
  ..., "--memory", "size=256M"]``), in this process or, with ``spawn=True``, in a
  VMM child process (``Vm.spawn``). Every VM it made is closed after the test,
  whatever happened (an exception, a failed assertion, KeyboardInterrupt).
- ``vmkit_test_guest``: the path of the built-in test guest (PVH ELF).
- ``vmkit_disk``: ``vmkit_disk(size, fill=b"")`` makes a raw image of ``size``
  bytes in the test's temporary directory, ``fill`` written at its start.
- ``vmkit_paths``: names that no other test, xdist worker or test session
  running at the same time uses: ``socket(name)`` a path short enough for a
  unix socket (in a private directory removed after the test), ``tap()`` a tap
  name of at most 15 characters.
- ``vmkit_debian_guest``: the Debian Linux guest (``vmkit.debian_guest``),
  built once into its cache (``$VMKIT_CACHE_DIR``) and shared by the session's
  tests and workers; a build that fails fails the test, naming why.
- ``@pytest.mark.vmkit_kvm``: skips the test, saying why, without read-write
  ``/dev/kvm``; ``@pytest.mark.vmkit_hardware_kvm`` also skips it on ``kvm_pvm``
  hosts (where stock Linux cannot boot to user space).
- When a test that used ``vmkit_vm`` fails, each VM's serial output (and, for a
  spawned VM, its VMM's log) is added to the report.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmkit.config import VmConfig

_SERIAL_SHOWN = 20_000  # characters of each VM's serial output in a failure report
_VMS = pytest.StashKey[list[Any]]()  # the VMs a test's vmkit_vm made
_TAPS = itertools.count()  # per process: tests of one worker never share a tap name


def kvm_missing() -> str | None:
    """Why VMs cannot run here, or None."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "vmkit needs read-write /dev/kvm (absent or not accessible here)"
    return None


def hardware_kvm_missing() -> str | None:
    """Why stock Linux cannot boot to user space here, or None."""
    missing = kvm_missing()
    if missing is not None:
        return missing
    if Path("/sys/module/kvm_pvm").exists():
        return "/dev/kvm is kvm_pvm here: stock Linux cannot boot to user space on it"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vmkit_kvm: skip (saying why) without read-write /dev/kvm")
    config.addinivalue_line(
        "markers",
        "vmkit_hardware_kvm: skip (saying why) without /dev/kvm or on kvm_pvm hosts",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("vmkit_hardware_kvm") is not None:
        why = hardware_kvm_missing()
    elif item.get_closest_marker("vmkit_kvm") is not None:
        why = kvm_missing()
    else:
        return
    if why is not None:
        pytest.skip(why)


VmFactory = Callable[..., Any]


@pytest.fixture
def vmkit_vm(request: pytest.FixtureRequest) -> Iterator[VmFactory]:
    """A factory of VMs, each closed after the test."""
    from vmkit.vm import Vm

    made: list[Any] = []
    request.node.stash[_VMS] = made

    def make(config: VmConfig | Sequence[str], *, spawn: bool = False, **options: Any) -> Any:
        if not isinstance(config, VmConfig):
            config = VmConfig.from_cli(list(config))
        vm = Vm.spawn(config, **options) if spawn else Vm(config, **options)
        made.append(vm)
        return vm

    try:
        yield make
    finally:
        errors = []
        for vm in reversed(made):
            try:
                vm.close()
            except Exception as e:  # every VM is closed, whatever one says
                errors.append(f"{vm!r}: {e}")
        if errors:
            raise RuntimeError("closing VMs failed: " + "; ".join(errors))


@pytest.fixture
def vmkit_test_guest() -> Path:
    """The built-in test guest's PVH ELF."""
    from vmkit import testguest

    return testguest.image_path("pvh")


@pytest.fixture
def vmkit_disk(tmp_path: Path) -> Callable[..., Path]:
    """A factory of raw disk images in the test's temporary directory."""
    count = 0

    def make(size: int, fill: bytes = b"") -> Path:
        nonlocal count
        if size < len(fill):
            raise ValueError(f"fill ({len(fill)} bytes) is larger than the image ({size})")
        path = tmp_path / f"vmkit-disk{count}.img"
        count += 1
        with path.open("wb") as f:
            f.truncate(size)
            f.write(fill)
        return path

    return make


class VmkitPaths:
    """Socket paths and tap names of one test, unique across concurrent runs."""

    def __init__(self) -> None:
        self._directory: Path | None = None
        # The worker's pid keeps tap names apart across workers and sessions.
        self._pid = os.getpid()
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")

    @property
    def directory(self) -> Path:
        """A private directory under the system's temporary directory."""
        if self._directory is None:
            # Not tmp_path: its depth can pass a unix socket's 107 bytes.
            self._directory = Path(tempfile.mkdtemp(prefix=f"vmkit-{self.worker}-"))
        return self._directory

    def socket(self, name: str = "api") -> Path:
        """A path for a unix socket named ``name`` (nothing is created there)."""
        path = self.directory / f"{name}.sock"
        if len(os.fsencode(path)) > 107:
            raise ValueError(f"socket name {name!r} is too long for a unix socket path")
        return path

    def tap(self) -> str:
        """A tap name no one else uses now (``vk`` + pid + a counter)."""
        name = f"vk{self._pid:x}t{next(_TAPS)}"
        if len(name) > 15:
            raise RuntimeError(f"tap name {name!r} is longer than IFNAMSIZ allows")
        return name

    def remove(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


@pytest.fixture
def vmkit_paths() -> Iterator[VmkitPaths]:
    """Unique socket paths and tap names for the test; its files go after it."""
    paths = VmkitPaths()
    try:
        yield paths
    finally:
        paths.remove()


@pytest.fixture(scope="session")
def vmkit_debian_guest() -> Any:
    """The Debian guest (``vmkit.debian_guest.DebianGuest``), built or found in its cache."""
    from vmkit.debian_guest import GuestBuildError, build_debian_guest

    try:
        return build_debian_guest(progress=False)
    except GuestBuildError as e:
        pytest.fail(f"building the Debian guest failed: {e}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    vms = item.stash.get(_VMS, None)
    if vms and report.failed:
        for index, vm in enumerate(vms):
            try:
                text = vm.serial.text
            except Exception as e:  # a report must not fail for its extras
                text = f"(serial output unavailable: {e})"
            report.sections.append((f"vmkit VM {index} serial", text[-_SERIAL_SHOWN:]))
            log = getattr(vm, "log", None)
            if isinstance(log, str) and log:
                report.sections.append((f"vmkit VM {index} VMM log", log[-_SERIAL_SHOWN:]))
