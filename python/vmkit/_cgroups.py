"""CPU groups for a VM's threads (``cpu_groups=True``).

A VM gets a cgroup of its own under this process's cpu cgroup, split in two:
``vcpu`` (its vCPU threads) and ``device`` (every other VM thread: virtio
queue workers, the VMM thread, serial input), the vCPU group at an eighth of
the device group's CPU weight. When the host's CPUs are contended, a VM's
device threads then run before its vCPUs, whose guests may only be spinning,
so that IO keeps flowing; with idle CPUs the weights change nothing. The VM's
group weighs as much as one thread per boot vCPU and one for its devices,
as the busy threads of a VMM process that is not split weigh together.

cgroup v1 (the ``cpu`` controller's hierarchy)::

    <cgroup>/vmkit-<pid>-<n>/          cpu.shares 1024 * (vCPUs + 1)
    <cgroup>/vmkit-<pid>-<n>/vcpu/     cpu.shares 128
    <cgroup>/vmkit-<pid>-<n>/device/   cpu.shares 1024

cgroup v2: the same groups, threaded (``<cgroup>`` becomes their threaded
domain and gets ``+cpu`` in its ``cgroup.subtree_control``), with
``cpu.weight`` 100 * (vCPUs + 1), 12 and 100. ``<cgroup>`` must be writable (root,
or a delegated cgroup) and, for v2, have the cpu controller available and no
domain controllers enabled below it.

Each VM thread moves itself into its group (it writes ``0`` to the group's
``tasks`` or ``cgroup.threads``, opened here) before it starts its work. When
the VM is closed and released, the groups are removed (a thread still in them
goes back to ``<cgroup>`` first). ``<pid>`` names the process whose
VM threads they hold (a VM process's for ``Vm.spawn``), so that groups left by
a process that died are removed the next time groups are made beside them.
"""

from __future__ import annotations

import errno
import itertools
import os
import time

from vmkit import _native
from vmkit.vm import VmError

#: cgroup v1 ``cpu.shares`` and v2 ``cpu.weight`` of the groups.
_V1_SHARES = {"vm_per_thread": 1024, "vcpu": 128, "device": 1024}
_V2_WEIGHTS = {"vm_per_thread": 100, "vcpu": 12, "device": 100}
#: How long ``remove`` retries a group whose last thread is still exiting.
_REMOVE_PATIENCE = 1.0

_serial = itertools.count(1)


def _error(message: str) -> VmError:
    return VmError(f"cpu_groups: {message}", "CpuGroups")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def own_cpu_cgroup() -> tuple[int, str]:
    """(cgroup version, directory) of this process's cpu cgroup."""
    return find_cpu_cgroup(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))


def find_cpu_cgroup(cgroups: str, mountinfo: str) -> tuple[int, str]:
    """(cgroup version, directory) of the cpu cgroup that ``cgroups`` (a
    ``/proc/<pid>/cgroup``) names, in the hierarchies ``mountinfo`` mounts;
    the v1 cpu hierarchy wins over v2 where both are there."""
    found = _native.cpu_cgroup_dir(cgroups, mountinfo)
    if found is None:
        raise _error("this host has no cgroup hierarchy with the cpu controller mounted")
    version, directory = found
    if version == 2:
        controllers = os.path.join(directory, "cgroup.controllers")
        try:
            available = _read(controllers).split()
        except OSError as e:
            raise _error(f"cannot read {controllers}: {e.strerror}") from None
        if "cpu" not in available:
            raise _error(
                f"the cpu controller is not available in this process's cgroup {directory} "
                f"(its cgroup.controllers: {' '.join(available) or 'none'})"
            )
    return version, directory


class CpuGroups:
    """A VM's vCPU and device groups: ``files()`` gives their thread files
    for the Rust VM (``_native.VmHandle``'s ``thread_groups``); ``remove()``
    deletes the groups once the VM's threads are gone."""

    def __init__(self, version: int, parent: str, path: str, vcpu_fd: int, device_fd: int) -> None:
        self.version = version
        self.parent = parent
        self.path = path
        self._fds: list[int] = [vcpu_fd, device_fd]

    @classmethod
    def create(cls, owner: int, vcpus: int) -> CpuGroups:
        """Groups for a VM with ``vcpus`` boot vCPUs whose threads run in
        process ``owner``, named ``vmkit-<owner>-<serial number>``."""
        version, parent = own_cpu_cgroup()
        _sweep(parent)
        name = f"vmkit-{owner}-{next(_serial)}"
        path = os.path.join(parent, name)
        try:
            os.mkdir(path, 0o755)
        except OSError as e:
            raise _error(f"cannot create the VM's cgroup {path}: {e.strerror}") from None
        try:
            fds = _set_up(version, parent, path, vcpus)
        except OSError as e:
            _remove_tree(path, patience=0.0)
            where = f" {e.filename}" if e.filename else ""
            raise _error(f"cannot set up the VM's cgroup {path}:{where} {e.strerror}") from None
        return cls(version, parent, path, *fds)

    def files(self) -> tuple[int, int]:
        """The vCPU and device groups' thread files, open for writing."""
        return self._fds[0], self._fds[1]

    def close_files(self) -> None:
        """Closes this side's thread files (the VM keeps its own copies)."""
        fds, self._fds = self._fds, [-1, -1]
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def remove(self) -> None:
        """Closes the files, moves the threads still in the groups back to
        this process's cgroup and deletes the groups (a thread that has just
        ended leaves its group a moment later: up to a second of retries). A
        group that stays busy is left for the next sweep."""
        self.close_files()
        threads_file = "tasks" if self.version == 1 else "cgroup.threads"
        back = os.path.join(self.parent, threads_file)
        for group in ("vcpu", "device"):
            try:
                tids = _read(os.path.join(self.path, group, threads_file)).split()
            except OSError:
                continue
            for tid in tids:
                try:
                    _write(back, tid)
                except OSError:
                    pass  # ended meanwhile
        _remove_tree(self.path, patience=_REMOVE_PATIENCE)

    def __del__(self) -> None:
        self.close_files()


def _set_up(version: int, parent: str, path: str, vcpus: int) -> tuple[int, int]:
    """Makes the VM's ``vcpu`` and ``device`` groups in ``path`` with their
    weights; their thread files, opened for writing."""
    if version == 1:
        weights, weight_file, threads_file, cap = _V1_SHARES, "cpu.shares", "tasks", 262144
    else:
        weights, weight_file, threads_file = _V2_WEIGHTS, "cpu.weight", "cgroup.threads"
        cap = 10000
        # Threads of one process may sit in different cgroups only inside one
        # threaded subtree: the VM's group is threaded, and its parent (this
        # process's cgroup) becomes their threaded domain.
        _write(os.path.join(path, "cgroup.type"), "threaded")
        if "cpu" not in _read(os.path.join(parent, "cgroup.subtree_control")).split():
            _write(os.path.join(parent, "cgroup.subtree_control"), "+cpu")
    vm_weight = min(cap, weights["vm_per_thread"] * (max(1, vcpus) + 1))
    _write(os.path.join(path, weight_file), str(vm_weight))
    vcpu, device = os.path.join(path, "vcpu"), os.path.join(path, "device")
    for group in (vcpu, device):
        os.mkdir(group, 0o755)
        if version == 2:
            _write(os.path.join(group, "cgroup.type"), "threaded")
    if version == 2:
        _write(os.path.join(path, "cgroup.subtree_control"), "+cpu")
    _write(os.path.join(vcpu, weight_file), str(weights["vcpu"]))
    _write(os.path.join(device, weight_file), str(weights["device"]))
    vcpu_fd = os.open(os.path.join(vcpu, threads_file), os.O_WRONLY | os.O_CLOEXEC)
    try:
        device_fd = os.open(os.path.join(device, threads_file), os.O_WRONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(vcpu_fd)
        raise
    return vcpu_fd, device_fd


def _remove_tree(path: str, patience: float) -> bool:
    """Deletes the VM's group and its two children; True when gone."""
    deadline = time.monotonic() + patience
    delay = 0.001
    while True:
        busy = False
        for group in ("vcpu", "device", ""):
            try:
                os.rmdir(os.path.join(path, group) if group else path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return False
                busy = True
                break
        if not busy:
            return True
        # A joined thread leaves its cgroup a moment after the join returns.
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _sweep(parent: str) -> None:
    """Removes groups whose owner process is gone (it died before it could)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith("vmkit-"):
            continue
        owner = name[len("vmkit-") :].split("-", 1)[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _remove_tree(os.path.join(parent, name), patience=0.0)
