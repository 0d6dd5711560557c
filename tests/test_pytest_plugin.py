"""vmkit's pytest plugin (``vmkit.pytest_plugin``, the ``pytest11`` entry point
``vmkit``), run through pytester as a user's test file would use it: the VM
factory closes every VM, a failing test's report carries the guest's serial
output, the disk factory, and the markers skip with their reasons."""

from __future__ import annotations

import os

import pytest
from vmkit import pytest_plugin

pytest_plugins = ["pytester"]

KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def test_the_plugin_is_registered_through_its_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(request):
            assert request.config.pluginmanager.has_plugin("vmkit")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.skipif(not KVM, reason="needs read-write /dev/kvm")
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
            names = [open(f"/proc/self/task/{t}/comm").read().strip()
                     for t in os.listdir("/proc/self/task")]
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
