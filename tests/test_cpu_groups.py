"""``cpu_groups``: a VM's vCPU threads and device threads in cgroups of their
own, the vCPUs at an eighth of the devices' CPU weight, for the VM's life only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmkit import Vm, VmConfig, VmError, testguest
from vmkit import _cgroups as cgroups
from vmkit.pytest_plugin import VmFactory

needs_kvm = pytest.mark.vmkit_kvm


def _usable_cpu_cgroup() -> tuple[int, str] | str:
    """(version, directory) of this process's cpu cgroup, or why there is none to write in."""
    try:
        version, directory = cgroups.own_cpu_cgroup()
    except (VmError, OSError) as e:
        return str(e)
    if not os.access(directory, os.W_OK):
        return f"this process's cpu cgroup {directory} is not writable (root or a delegated cgroup)"
    return version, directory


USABLE = _usable_cpu_cgroup()
needs_cpu_groups = pytest.mark.skipif(
    isinstance(USABLE, str), reason=f"no cpu cgroup to make groups in: {USABLE}"
)


def cgroup_dir() -> tuple[int, str]:
    assert not isinstance(USABLE, str)
    return USABLE


def thread_cgroup(pid: int, tid: str, version: int) -> str:
    """The cpu cgroup path (in its hierarchy) that thread ``tid`` of ``pid`` is in."""
    for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
        _number, controllers, path = line.split(":", 2)
        if (version == 1 and "cpu" in controllers.split(",")) or (
            version == 2 and _number == "0" and controllers == ""
        ):
            return path
    raise AssertionError(f"thread {tid} of {pid} has no cpu cgroup")


def threads(pid: int, version: int) -> list[tuple[str, str, str]]:
    """(tid, name, cpu cgroup path) of each thread of ``pid``."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            found.append((tid, name, thread_cgroup(pid, tid, version)))
    return found


def vm_groups(owner: int) -> list[str]:
    _version, parent = cgroup_dir()
    return sorted(n for n in os.listdir(parent) if n.startswith(f"vmkit-{owner}-"))


def cgroup_files_open() -> list[str]:
    _version, parent = cgroup_dir()
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [t for t in targets if t.startswith(parent.rstrip("/") + "/vmkit-")]


def weight(path: str, version: int) -> int:
    return int(Path(path, "cpu.shares" if version == 1 else "cpu.weight").read_text())


def guest(tmp_path: Path, *extra: str) -> VmConfig:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(1 << 20)
    return VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         # Long enough for the disk's queue worker to be seen at work.
         "--cmdline", testguest.cmdline(
             ["blkbench", "ticks"], "halt", ticks=100_000, tick_ms=10, blkbench_mode="randread",
             blkbench_size=4096, blkbench_depth=1, blkbench_count=2_000_000),
         "--cpus", "boot=2", "--memory", "size=64M", "--disk", f"path={disk}", *extra]
    )  # fmt: skip


@contextlib.contextmanager
def in_process(config: VmConfig) -> Iterator[int]:
    with Vm(config, cpu_groups=True) as vm:
        vm.boot()
        yield os.getpid()


@contextlib.contextmanager
def spawned(config: VmConfig, vmm_args: list[str]) -> Iterator[int]:
    with Vm.spawn(config, cpu_groups=True, vmm_args=vmm_args) as vm:
        vm.boot()
        yield vm.process.pid


@needs_kvm
@needs_cpu_groups
@pytest.mark.parametrize("mode", ["in-process", "vm-process", "python-vmm"])
def test_vcpus_and_devices_run_in_their_groups_for_the_vm_life_only(
    tmp_path: Path, mode: str
) -> None:
    version, parent = cgroup_dir()
    config = guest(tmp_path)
    runs = {
        "in-process": lambda: in_process(config),
        "vm-process": lambda: spawned(config, []),
        # Any other VMM word runs the `vmkit` command (confined by --seccomp).
        "python-vmm": lambda: spawned(config, ["--seccomp", "true"]),
    }
    with runs[mode]() as pid:
        (name,) = vm_groups(pid)
        group = os.path.join(parent, name)
        # The disk's queue worker starts when the guest's driver sets it up.
        deadline = time.monotonic() + 30
        seen = threads(pid, version)
        while "_disk0-q0" not in {n for _t, n, _p in seen} and time.monotonic() < deadline:
            time.sleep(0.005)
            seen = threads(pid, version)
        by_name = {n: path.rsplit("/", 1)[-1] for _t, n, path in seen if f"/{name}/" in path}
        # Every vCPU thread in the vCPU group, every other VM thread in the device group.
        vcpus = [path for _t, n, path in seen if n.startswith("vcpu")]
        assert len(vcpus) == 2, seen
        assert all(path.endswith(f"/{name}/vcpu") for path in vcpus), seen
        for thread in ("vmm", "vmkit-spawner", "_disk0-q0"):
            assert by_name.get(thread) == "device", (thread, by_name, seen)
        # The process's own threads (the interpreter's) stay where they were.
        main = next(path for t, _n, path in seen if t == str(pid))
        assert f"/{name}" not in main
        # vCPUs at an eighth of the devices; the VM as heavy as a thread per
        # vCPU and one for the devices.
        assert weight(os.path.join(group, "vcpu"), version) * 8 == pytest.approx(
            weight(os.path.join(group, "device"), version), rel=0.05
        )
        per_thread = 1024 if version == 1 else 100
        assert weight(group, version) == (2 + 1) * per_thread
    assert vm_groups(pid) == []
    if mode == "in-process":
        assert not any("/vmkit-" in path for _t, _n, path in threads(pid, version))
    # No group file stays open here (the VM's copies close as its last thread ends).
    deadline = time.monotonic() + 5
    while cgroup_files_open() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cgroup_files_open() == []


@needs_kvm
@needs_cpu_groups
def test_groups_left_by_a_process_that_died_are_removed_by_the_next_vm(tmp_path: Path) -> None:
    _version, parent = cgroup_dir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = os.path.join(parent, f"vmkit-{int(dead.stdout)}-1")
    os.mkdir(stale)
    os.mkdir(os.path.join(stale, "vcpu"))
    os.mkdir(os.path.join(stale, "device"))
    try:
        with Vm(guest(tmp_path), cpu_groups=True):
            assert not os.path.exists(stale)
    finally:
        cgroups._remove_tree(stale, patience=0.0)


@needs_kvm
def test_a_cpu_cgroup_that_cannot_be_made_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-cgroup"
    monkeypatch.setattr(cgroups, "own_cpu_cgroup", lambda: (1, str(missing)))
    with pytest.raises(VmError) as caught:
        Vm(guest(tmp_path), cpu_groups=True)
    assert caught.value.kind == "CpuGroups"
    assert str(caught.value).startswith(
        f"cpu_groups: cannot create the VM's cgroup {missing}/vmkit-{os.getpid()}-"
    )
    assert str(caught.value).endswith(": No such file or directory")
    assert not missing.exists()


def test_a_cgroup_v2_without_the_cpu_controller_is_refused() -> None:
    # This host's own unified hierarchy, where the cpu controller may be
    # bound to cgroup v1 instead.
    mounts = Path("/proc/self/mountinfo").read_text()
    unified = [line for line in mounts.splitlines() if " - cgroup2 " in line]
    if not unified:
        pytest.skip("no cgroup v2 hierarchy mounted here")
    mount_point = unified[0].split()[4]
    available = Path(mount_point, "cgroup.controllers").read_text().split()
    if "cpu" in available:
        pytest.skip(f"the cpu controller is available in {mount_point}")
    with pytest.raises(VmError) as caught:
        cgroups.find_cpu_cgroup("0::/\n", unified[0] + "\n")
    assert str(caught.value) == (
        f"cpu_groups: the cpu controller is not available in this process's cgroup "
        f"{mount_point} (its cgroup.controllers: {' '.join(available) or 'none'})"
    )
    assert caught.value.kind == "CpuGroups"


V1_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n"
    "31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct\n"
    "40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:20 - cgroup2 cgroup2 rw\n"
)


@pytest.mark.parametrize(
    ("cgroups_text", "mountinfo", "expected"),
    [
        # cgroup v1 beside an empty v2 hierarchy (this kind of host): v1 wins.
        ("2:cpuacct:/a\n1:cpu:/ci/job7\n0::/\n", V1_MOUNTS, (1, "/sys/fs/cgroup/cpu/ci/job7")),
        # cpu and cpuacct co-mounted.
        (
            "3:cpu,cpuacct:/x\n",
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
            (1, "/sys/fs/cgroup/cpu,cpuacct/x"),
        ),
        # A container that sees its own cgroup as the mount's root.
        (
            "1:cpu:/docker/abc/inner\n",
            "30 25 0:26 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n",
            (1, "/sys/fs/cgroup/cpu/inner"),
        ),
        # Mounted where mountinfo escapes a space; the cpuacct line is not
        # the cpu controller's.
        (
            "2:cpuacct:/a\n1:cpu:/ci/job 7\n",
            "30 25 0:26 / /mnt/cpu\\040v1 rw - cgroup cgroup rw,cpu\n",
            (1, "/mnt/cpu v1/ci/job 7"),
        ),
    ],
)
def test_the_cpu_cgroup_is_found_where_the_hierarchy_is_mounted(
    cgroups_text: str, mountinfo: str, expected: tuple[int, str]
) -> None:
    assert cgroups.find_cpu_cgroup(cgroups_text, mountinfo) == expected


def test_a_cgroup_v2_is_taken_where_its_cpu_controller_is_available(tmp_path: Path) -> None:
    # A stand-in hierarchy: the directory the mount shows, with the
    # controllers file the kernel would put there.
    mount = tmp_path / "cgroup v2"
    (mount / "ci").mkdir(parents=True)
    (mount / "ci" / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    mountinfo = f"40 25 0:35 / {str(mount).replace(' ', chr(92) + '040')} rw - cgroup2 cgroup2 rw\n"
    assert cgroups.find_cpu_cgroup("0::/ci\n", mountinfo) == (2, str(mount / "ci"))

    with pytest.raises(VmError) as caught:
        cgroups.find_cpu_cgroup("0::/gone\n", mountinfo)
    assert str(caught.value) == (
        f"cpu_groups: cannot read {mount / 'gone' / 'cgroup.controllers'}: "
        "No such file or directory"
    )
    assert caught.value.kind == "CpuGroups"


def test_a_host_without_a_cpu_hierarchy_is_refused() -> None:
    mounts = "40 25 0:35 / /sys/fs/cgroup/unified rw - tmpfs tmpfs rw\n"
    with pytest.raises(VmError) as caught:
        cgroups.find_cpu_cgroup("1:cpu:/\n", mounts)
    assert str(caught.value) == (
        "cpu_groups: this host has no cgroup hierarchy with the cpu controller mounted"
    )


@needs_kvm
@needs_cpu_groups
def test_vcpu_threads_of_a_reboot_join_the_vcpu_group_again(
    tmp_path: Path, vmkit_vm: VmFactory
) -> None:
    version, _parent = cgroup_dir()
    config = VmConfig.from_cli(
        ["--kernel", str(testguest.image_path("pvh")),
         "--cmdline", testguest.cmdline(["ticks"], "halt", ticks=100_000, tick_ms=10),
         "--cpus", "boot=2", "--memory", "size=64M"]
    )  # fmt: skip
    vm = vmkit_vm(config, cpu_groups=True)
    vm.boot()
    vm.serial.wait_for("tick 1", timeout=30)
    first = {t for t, n, _p in threads(os.getpid(), version) if n.startswith("vcpu")}
    vm.reboot()
    deadline = time.monotonic() + 30
    while True:
        seen = threads(os.getpid(), version)
        vcpus = [(t, path) for t, n, path in seen if n.startswith("vcpu") and t not in first]
        if len(vcpus) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    (name,) = vm_groups(os.getpid())
    assert len(vcpus) == 2, seen
    assert all(path.endswith(f"/{name}/vcpu") for _t, path in vcpus), seen
