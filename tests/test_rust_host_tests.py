"""The Rust tests that need the host: each ``#[ignore]``d test as its own case.

``cargo test`` skips Rust tests that need something of the host (they are
``#[ignore = "needs ..."]``, inside modules named ``needs_kvm`` or
``needs_net_admin``), so they never pass by finding nothing to test. Here each is
listed (``cargo test --workspace -- --list --ignored``, which also builds them)
and run by its exact name from its test binary; a case skips, saying why, where
the host lacks what its module names, and fails when the Rust test fails.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: cargo's line before a test binary's own output.
RUNNING = re.compile(r"^\s*Running (?:unittests )?\S+ \((?P<binary>[^)]+)\)$")
DOC_TESTS = re.compile(r"^\s*Doc-tests ")
LISTED = re.compile(r"^(?P<name>\S+): test$")
CAP_NET_ADMIN = 12


@dataclass(frozen=True)
class RustTest:
    binary: Path
    name: str

    @property
    def crate(self) -> str:
        return re.sub(r"-[0-9a-f]+$", "", self.binary.name)

    def __str__(self) -> str:
        return f"{self.crate}::{self.name}"


def why_not_here() -> str | None:
    """Why the Rust tests cannot run from here, or None."""
    if shutil.which("cargo") is None:
        return "needs cargo (Rust toolchain) on PATH"
    manifest = REPO / "Cargo.toml"
    if not manifest.exists() or "[workspace]" not in manifest.read_text():
        return "needs vmkit's source tree (an installed package has no Cargo workspace)"
    return None


@functools.cache
def list_ignored() -> tuple[list[RustTest], str | None]:
    """The ignored tests of the workspace, and cargo's output if listing failed."""
    process = subprocess.run(
        ["cargo", "test", "--workspace", "--", "--list", "--ignored"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
    )
    if process.returncode != 0:
        return [], process.stdout[-4000:]
    tests = []
    binary: Path | None = None
    for line in process.stdout.splitlines():
        if running := RUNNING.match(line):
            binary = REPO / running["binary"]
        elif DOC_TESTS.match(line):
            binary = None
        elif (listed := LISTED.match(line)) and binary is not None:
            tests.append(RustTest(binary, listed["name"]))
    return tests, None


def has_cap_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def missing_requirement(test: RustTest) -> str | None:
    """What the host lacks for `test` (from its module's name), or None."""
    modules = test.name.split("::")
    if "needs_kvm" in modules and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "needs read-write /dev/kvm"
    if "needs_net_admin" in modules:
        if not has_cap_net_admin():
            return "needs CAP_NET_ADMIN (tap devices)"
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            return "needs read-write /dev/net/tun"
    return None


def package_dir(test: RustTest) -> Path:
    """The crate's directory (cargo runs tests there), else the repository."""
    for manifest in REPO.glob("rust/*/Cargo.toml"):
        if manifest.parent.name.replace("-", "_") == test.crate:
            return manifest.parent
    return REPO


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rust_test" not in metafunc.fixturenames:
        return
    reason = why_not_here()
    if reason is not None:
        metafunc.parametrize(
            "rust_test", [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
        )
        return
    tests, failure = list_ignored()
    if failure is not None:
        metafunc.parametrize("rust_test", [pytest.param(failure, id="cargo-list")])
        return
    metafunc.parametrize("rust_test", tests, ids=[str(t) for t in tests])


def test_rust_host_test(rust_test: RustTest | str) -> None:
    if isinstance(rust_test, str):
        pytest.fail(f"cargo could not build or list the Rust tests:\n{rust_test}")
    reason = missing_requirement(rust_test)
    if reason is not None:
        pytest.skip(reason)
    process = subprocess.run(
        [str(rust_test.binary), "--exact", "--ignored", rust_test.name],
        cwd=package_dir(rust_test),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    output = process.stdout[-4000:]
    assert process.returncode == 0, f"{rust_test} failed:\n{output}"
    assert "test result: ok. 1 passed" in process.stdout, f"{rust_test} did not run:\n{output}"


def test_every_ignored_rust_test_says_what_it_needs() -> None:
    """An ignored test outside the needs_* modules would never run anywhere."""
    reason = why_not_here()
    if reason is not None:
        pytest.skip(reason)
    tests, failure = list_ignored()
    assert failure is None, failure
    assert tests, "no host tests listed: the needs_kvm tests are gone"
    stray = [
        str(t) for t in tests if not {"needs_kvm", "needs_net_admin"} & set(t.name.split("::"))
    ]
    assert not stray, f"ignored tests outside needs_kvm/needs_net_admin: {stray}"
