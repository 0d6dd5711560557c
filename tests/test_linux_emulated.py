"""Stock Linux on a standard KVM, in an emulated host (tests/_emulated_host.py).

tests/test_linux.py boots Debian's cloud kernel to user space, which needs a KVM that runs
guest kernels natively; on this machine's kvm_pvm its full-boot tests skip. This test runs
that file again inside QEMU TCG, whose emulated AMD SVM gives the guest kernel a standard
``kvm_amd``: vmkit there boots the Debian guest through the same CPUID, LAPIC timer, ACPI,
virtio and reboot paths a hardware host takes (slowly: ~20 s a boot). A host with a standard
KVM runs tests/test_linux.py itself, and this test skips there. The Debian guest is built on
this machine first (tests/test_debian_guest.py's builder) and copied into the emulated
host's tmpfs, since its root is read-only.

It runs only with ``VMKIT_EMULATED_LINUX=1``: it takes 4-5 minutes, and QEMU 7.2's emulated
SVM now and then stops the emulated host itself (no console output, no panic) a few Linux
boots in, which would fail unrelated CI runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import _emulated_host
import pytest
from vmkit.debian_guest import GuestBuildError, build_debian_guest
from vmkit.pytest_plugin import hardware_kvm_missing

TESTS = Path(__file__).resolve().parent
LINUX_TESTS = TESTS / "test_linux.py"
#: Two TCG levels deep every boot takes ~20 s; the whole file ~3 minutes alone.
TIMEOUT = 900

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("VMKIT_EMULATED_LINUX") != "1",
        reason="opt-in (VMKIT_EMULATED_LINUX=1): minutes long, and QEMU's emulated SVM "
        "sometimes stops the emulated host",
    ),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed (the emulated host runs on QEMU TCG)",
    ),
    pytest.mark.skipif(
        hardware_kvm_missing() is None,
        reason="this host has a standard KVM: tests/test_linux.py boots Linux here natively",
    ),
]


def test_stock_linux_boots_on_a_standard_kvm_in_an_emulated_host() -> None:
    try:
        guest = build_debian_guest(progress=False)
        _emulated_host.build()
    except GuestBuildError as e:
        pytest.fail(
            f"building the guest or the emulated host failed "
            f"(is the Debian archive reachable with apt?): {e}",
            pytrace=False,
        )
    every = _emulated_host.collected(LINUX_TESTS)
    python = shlex.quote(sys.executable)
    # The Debian guest's build directory, copied whole: the builder checks its manifest.
    build = guest.vmlinux.resolve().parent
    script = f"""
mkdir -p $VMKIT_CACHE_DIR/debian-guest || exit 3
cp -a {shlex.quote(str(build))} $VMKIT_CACHE_DIR/debian-guest/ || exit 3
ln -s {shlex.quote(build.name)} $VMKIT_CACHE_DIR/debian-guest/current || exit 3
echo "kvm: $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null) pvm: $(ls -d /sys/module/kvm_pvm 2>/dev/null)"
{python} -m pytest -q -rsfE -p no:cacheprovider {shlex.quote(str(LINUX_TESTS))}
"""  # noqa: E501
    run = _emulated_host.run_in_emulated_host(
        script, kvm=True, timeout=TIMEOUT, smp=2, keep=[TESTS.parent]
    )
    console, rc = run.console, run.rc
    tail = "\n".join(console.splitlines()[-60:])
    where = f"(emulated host, {run.seconds:.0f} s; console tail:)\n{tail}"

    assert not run.timed_out, f"the emulated host ran past {TIMEOUT} s {where}"
    assert "kvm: 1 pvm: \n" in console, f"not on a standard nested KVM {where}"
    assert rc == 0, f"exit status {rc} {where}"
    counts = _emulated_host.pytest_summary(console)
    assert counts.get("failed", 0) == 0 and counts.get("error", 0) == 0, f"{counts} {where}"
    # Every full-boot test ran: none skipped for want of a standard KVM.
    assert counts.get("passed", 0) == len(every), f"{counts}, {len(every)} collected {where}"
