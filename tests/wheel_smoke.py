"""Smoke test of an installed vmkit wheel: what a user who ran ``pip install
vmkit-*.whl`` (no Rust toolchain, no checkout) relies on.

.ci/run copies this file into an empty temporary directory and runs it there
with each CPython's fresh virtual environment, so that the checkout's
``python/vmkit`` cannot be imported::

    dir=$(mktemp -d) && cp tests/wheel_smoke.py "$dir/test_wheel_smoke.py" && cd "$dir"
    VENV/bin/python -m pytest -p no:cacheprovider -rs test_wheel_smoke.py

The main suite does not collect it (the name does not match ``test_*.py``):
there vmkit is usually the checkout itself, installed in editable mode.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import vmkit
from vmkit import _native, testguest

KVM_MISSING = (
    None
    if os.access("/dev/kvm", os.R_OK | os.W_OK)
    else "booting the test guest needs read-write /dev/kvm (absent or not accessible here)"
)
# The test guest's default steps in `vmkit demo`.
DEMO_STEPS = ("hello", "memmap", "acpi", "smp", "timer", "cpl3")


def scripts_dir() -> Path:
    return Path(sysconfig.get_path("scripts"))


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs a command of this environment in ``cwd``, with its own test-guest cache and
    no plugin or path settings inherited from the caller."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    }
    env["VMKIT_CACHE_DIR"] = str(cwd / "cache")
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_vmkit_is_imported_from_the_environments_site_packages() -> None:
    assert sys.prefix != sys.base_prefix, "not run from a virtual environment"
    site_packages = {Path(sysconfig.get_path(name)).resolve() for name in ("purelib", "platlib")}
    package = Path(vmkit.__file__).resolve().parent
    assert package.parent in site_packages, f"vmkit comes from {package}"
    native = Path(_native.__file__).resolve()
    assert native.parent == package
    assert native.name == "_native.abi3.so"


def test_it_was_installed_from_a_manylinux_abi3_wheel() -> None:
    dist = metadata.distribution("vmkit")
    origin = json.loads(dist.read_text("direct_url.json") or "{}")
    assert origin.get("url", "").endswith(".whl"), origin
    assert not origin.get("dir_info", {}).get("editable", False), origin
    wheel = dist.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag: (\S+)$", wheel, re.MULTILINE)
    assert len(tags) == 1 and re.fullmatch(r"cp310-abi3-manylinux_\d+_\d+_x86_64", tags[0]), wheel
    assert "Root-Is-Purelib: false" in wheel


def test_the_wheel_carries_the_typing_marker_and_the_openapi_spec() -> None:
    files = {str(f) for f in metadata.files("vmkit") or []}
    for name in (
        "vmkit/py.typed",
        "vmkit/_native.pyi",
        "vmkit/_native.abi3.so",
        "vmkit/openapi/cloud-hypervisor.json",
        "vmkit/pytest_plugin.py",
    ):
        assert name in files, f"{name} is not in the wheel's RECORD"
    package = Path(vmkit.__file__).parent
    assert (package / "py.typed").is_file()
    from vmkit.client import openapi_spec

    spec = openapi_spec()
    assert spec["openapi"].startswith("3.")
    assert "/vm.boot" in spec["paths"] and "/vmm.ping" in spec["paths"]


def test_vmkit_version() -> None:
    result = run([str(scripts_dir() / "vmkit"), "--version"], Path.cwd())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"vmkit v{metadata.version('vmkit')}\n"
    assert vmkit.__version__ == metadata.version("vmkit")


def test_the_test_guest_images_are_inside_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKIT_CACHE_DIR", str(tmp_path))
    for fmt in testguest.FORMATS:
        image = _native.test_guest_image(fmt)
        if fmt == "bzimage":
            assert image[0x202:0x206] == b"HdrS"
        else:
            assert image[:4] == b"\x7fELF"
        path = testguest.image_path(fmt)
        assert path.parent == tmp_path / "test-guest"
        assert path.read_bytes() == image


@pytest.mark.skipif(KVM_MISSING is not None, reason=str(KVM_MISSING))
def test_vmkit_demo_boots_the_test_guest(tmp_path: Path) -> None:
    result = run([str(scripts_dir() / "vmkit"), "demo"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    guest = testguest.parse_results(result.stdout)
    assert guest.protocol == "pvh" and guest.ready
    assert all(guest.ok(step) for step in DEMO_STEPS), guest.lines
    assert (guest.passed, guest.failed, guest.exit) == (len(DEMO_STEPS), 0, "poweroff")
    assert "vmkit-guest: summary passed=6 failed=0\n" in result.stdout
    assert re.search(r"^Stopped \(poweroff\) after \d+ ms in all$", result.stdout, re.MULTILINE)


def test_the_pytest_plugin_gives_its_fixtures_to_a_users_tests(tmp_path: Path) -> None:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="pytest11")}
    assert plugins.get("vmkit") == "vmkit.pytest_plugin"
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from vmkit import testguest

            def test_guest_and_disk_files(vmkit_test_guest, vmkit_disk):
                assert vmkit_test_guest.read_bytes()[:4] == b"\\x7fELF"
                assert vmkit_disk(4096, b"vmkit").read_bytes()[:6] == b"vmkit\\0"

            @pytest.mark.vmkit_kvm
            def test_boot(vmkit_vm, vmkit_test_guest):
                vm = vmkit_vm(["--kernel", str(vmkit_test_guest),
                               "--cmdline", testguest.cmdline(["hello"]),
                               "--memory", "size=256M", "--serial", "tty", "--console", "off"])
                vm.boot()
                assert vm.wait(30).reason == "poweroff"
                assert "vmkit-guest: step hello ok" in vm.serial.text
            """
        )
    )
    result = run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "test_user.py"], tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if KVM_MISSING is None:
        assert re.search(r"\b2 passed\b", result.stdout), result.stdout
    else:
        assert re.search(r"\b1 passed, 1 skipped\b", result.stdout), result.stdout
        assert "/dev/kvm" in result.stdout
