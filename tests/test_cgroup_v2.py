"""``cpu_groups`` on cgroup v2, in an emulated host (tests/_emulated_host.py).

This machine binds the cpu controller to cgroup v1, so tests/test_cpu_groups.py takes the v1
path here. This test runs that file again inside QEMU TCG on Debian's generic kernel, as root
in a leaf cgroup of a cgroup v2 hierarchy with the cpu controller enabled down to it, with
this machine's root filesystem shared read-only over 9p and nested KVM (TCG emulates AMD SVM)
for its real VMs. Building the emulated host downloads Debian's generic kernel (about 70 MB)
once; if the Debian archive cannot be reached the test fails naming the error: it does not
skip. A host whose own cpu controller is on cgroup v2 runs the v2 path in
tests/test_cpu_groups.py itself, and this test skips there.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import _emulated_host
import pytest
from vmkit import VmError
from vmkit import _cgroups as cgroups
from vmkit.debian_guest import GuestBuildError

TESTS = Path(__file__).resolve().parent
CPU_GROUPS_TESTS = TESTS / "test_cpu_groups.py"
#: The only skip expected inside (the test of a v2 hierarchy *without* the cpu controller).
EXPECTED_SKIP = "the cpu controller is available in "
#: TCG with nested KVM: ~40 s alone, more beside other tests on a busy machine.
TIMEOUT = 900


def _host_cpu_cgroup_version() -> int | None:
    try:
        return cgroups.own_cpu_cgroup()[0]
    except (VmError, OSError):
        return None


pytestmark = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed (the emulated host runs on QEMU TCG)",
    ),
    pytest.mark.skipif(
        _host_cpu_cgroup_version() == 2,
        reason="this host's cpu controller is on cgroup v2 already: "
        "tests/test_cpu_groups.py covers the v2 path natively",
    ),
]


def test_cpu_groups_on_cgroup_v2_in_an_emulated_host() -> None:
    try:
        _emulated_host.build()
    except GuestBuildError as e:
        pytest.fail(
            f"building the emulated host failed (is the Debian archive reachable with apt?): {e}",
            pytrace=False,
        )
    every = _emulated_host.collected(CPU_GROUPS_TESTS)
    with_vms = _emulated_host.collected(CPU_GROUPS_TESTS, "-m", "vmkit_kvm")
    python = shlex.quote(sys.executable)
    leaf = _emulated_host.LEAF
    script = f"""
{python} -c 'from vmkit import _cgroups as c; v, d = c.own_cpu_cgroup(); print(f"cpu cgroup: version {{v}} at {{d}}")' || exit 3
{python} -m pytest -q -rsfE -p no:cacheprovider {shlex.quote(str(CPU_GROUPS_TESTS))}
rc=$?
echo "groups left: $(ls {leaf} | grep vmkit- | tr '\\n' ' ' || true)"
exit $rc
"""  # noqa: E501
    run = _emulated_host.run_in_emulated_host(
        script, kvm=True, timeout=TIMEOUT, keep=[TESTS.parent]
    )
    console, rc = run.console, run.rc
    tail = "\n".join(console.splitlines()[-60:])
    where = f"(emulated host, {run.seconds:.0f} s; console tail:)\n{tail}"

    assert not run.timed_out, f"the emulated host ran past {TIMEOUT} s {where}"
    version_line = f"cpu cgroup: version 2 at {leaf}\n"
    assert version_line in console, f"not on cgroup v2 {where}"
    assert rc == 0, f"exit status {rc} {where}"
    counts = _emulated_host.pytest_summary(console)
    # Every test collected here ran there: those with real VMs passed, and only the
    # one that needs a v2 hierarchy without the cpu controller skipped.
    assert counts.get("failed", 0) == 0 and counts.get("error", 0) == 0, f"{counts} {where}"
    assert counts.get("passed", 0) >= len(with_vms), (
        f"{counts}, but {len(with_vms)} tests need real VMs {where}"
    )
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(every), (
        f"{counts}, but {len(every)} tests are collected here {where}"
    )
    # -rsfE: the skips' reasons, and the failures' names when there are some.
    skips = re.findall(r"^SKIPPED \[\d+\] \S+:\d+: (.*)$", console, re.MULTILINE)
    assert len(skips) == counts.get("skipped", 0), f"{skips} {where}"
    assert all(reason.startswith(EXPECTED_SKIP) for reason in skips), f"{skips} {where}"
    assert "groups left: \n" in console, f"VM groups were left in {leaf} {where}"
