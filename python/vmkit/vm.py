"""Running VMs from Python.

    >>> from vmkit import Vm, VmConfig
    >>> config = VmConfig.from_cli(["--kernel", "vmlinux", "--cmdline", "console=ttyS0"])
    >>> with Vm(config) as vm:                    # doctest: +SKIP
    ...     vm.boot()
    ...     vm.serial.wait_for(r"login:", timeout=30)
    ...     vm.shutdown()

The VM runs in threads owned by the Rust extension; every blocking call here
releases the GIL. Leaving the ``with`` block always shuts the VM down and
releases what it holds (vCPU threads, guest memory, pty, socket).
"""

from __future__ import annotations

import os
import time

from vmkit import _native, logs
from vmkit._record import record
from vmkit.config import VmConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    import socket
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any

    from vmkit.client import SpawnedVm
    from vmkit.config import DiskConfig, FsConfig, NetConfig, PmemConfig, VsockConfig

__all__ = ["DebugPortWrite", "Migration", "SerialConsole", "Vm", "VmError", "VmExit", "VmInfo"]


class VmError(RuntimeError):
    """The VMM could not do what was asked.

    ``kind`` says which part failed: ``Unsupported``, ``Kernel``,
    ``Initramfs``, ``Memory``, ``Kvm``, ``Device``, ``Snapshot``, ``Migration``,
    ``Config`` (parts of a valid config that do not fit together, such as a
    ``--numa`` node naming an unknown memory zone), ``State`` (an invalid
    state transition, with Cloud Hypervisor's text), ``Stopped`` (the VM
    stopped while something waited on it) or ``CpuGroups`` (``cpu_groups``
    could not be set up).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return self.message


_native.register_vm_error(VmError)

#: How long ``Vm.wait`` blocks at most before Python checks for signals that
#: another thread received (one the main thread receives ends the wait at once).
_WAIT_SLICE = 0.25


@record(frozen=True)
class VmExit:
    """Why a VM stopped.

    ``reason`` is one of ``poweroff``, ``shutdown`` (asked for by the user),
    ``triple-fault``, ``internal-error`` (KVM could not run the guest; the
    message has RIP and the instruction bytes), ``hang`` (the watchdog saw no
    vCPU make progress), ``vmm-error`` or ``migrated`` (the VM moved to another
    VMM process, which runs it on).
    """

    reason: str
    message: str


@record(frozen=True)
class Migration:
    """What a live migration (``Vm.migrate_to``) did: ``total`` seconds from the
    call until the receiver ran the VM, of which ``downtime`` with the vCPUs
    stopped; ``rounds`` passes over guest memory before the stop (0 when it was
    handed over, ``local``), ``bytes`` of guest memory sent."""

    total: float
    downtime: float
    rounds: int
    bytes: int
    local: bool


@record(frozen=True)
class DebugPortWrite:
    """A write to port 0x80: ``value``, ``seconds`` since the VM was created,
    and ``monotonic`` (``time.monotonic()`` clock) when it happened."""

    value: int
    seconds: float
    monotonic: float


@record(frozen=True)
class DeviceEvent:
    """An event a device raised, as Cloud Hypervisor's event monitor reports
    it: ``source`` (``virtio-device``, ``guest``), ``event`` and its
    ``properties``."""

    source: str
    event: str
    properties: dict[str, str]


def _vsock_connect(config: VmConfig, port: int, timeout: float) -> socket.socket:
    """``vsock_connect`` of a VM with ``config``."""
    from vmkit import _vsock

    if config.vsock is None:
        raise VmError("The VM has no vsock device (--vsock)", "Device")
    return _vsock.connect(config.vsock.socket, port, timeout)


class SerialConsole:
    """The guest's serial port output, readable while the VM runs and after it closes.

    ``wait_for`` consumes output line by line: each call continues after the
    line the previous call matched.
    """

    def __init__(self, handle: _native.VmHandle) -> None:
        self._handle = handle
        self._closed = False  # set by Vm.close()
        self._cursor = 0

    def read(self) -> bytes:
        """Everything the guest has printed so far (the last 16 MiB)."""
        _start, data = self._handle.serial_read(0)
        result: bytes = data
        return result

    @property
    def text(self) -> str:
        """``read()`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.read().decode(errors="replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Waits for a whole output line matching ``pattern`` (``re.search``).

        Raises TimeoutError when no line matches in time, VmError (kind
        ``Stopped``) when the VM stops first, and ValueError once the VM is closed.
        """
        if self._closed:
            raise ValueError("I/O operation on closed VM")
        import re

        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            start, data = self._handle.serial_read(self._cursor)
            consumed = 0
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                consumed += len(line)
                match = regex.search(line.rstrip(b"\r\n").decode(errors="replace"))
                if match:
                    self._cursor = start + consumed
                    return match
            self._cursor = start + consumed
            if self._handle.state == "Shutdown":
                exit_info = self._handle.wait(0.0)
                why = exit_info[1] if exit_info else "it was shut down"
                raise VmError(
                    f"The VM stopped before printing a line matching {regex.pattern!r}: {why}",
                    "Stopped",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"No serial line matched {regex.pattern!r} within {timeout} s")
            self._handle.serial_wait(start + len(data), min(remaining, 0.5))


@record
class VmInfo:
    """``vm.info``: the live config, the state, the memory size and the device tree.

    ``state`` is ``Created`` (a config but no running VM), ``Running``,
    ``Paused``, ``Shutdown`` or ``BreakPoint``. ``device_tree`` maps device
    ids to DeviceNode objects (plain JSON), or is None without a VM.
    ``Vm.info()`` and ``SpawnedVm.info()`` both return one.
    """

    config: VmConfig
    state: str
    memory_actual_size: int
    device_tree: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmInfo:
        return cls(
            config=VmConfig.from_dict(data["config"]),
            state=str(data["state"]),
            memory_actual_size=int(data["memory_actual_size"]),
            device_tree=data.get("device_tree"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The VmInfo JSON object."""
        return {
            "config": self.config.to_dict(),
            "state": self.state,
            "memory_actual_size": self.memory_actual_size,
            "device_tree": self.device_tree,
        }


def seccomp_value(seccomp: bool | str) -> str:
    """``--seccomp``'s spelling of ``seccomp``: True/False become "true"/"false"."""
    if isinstance(seccomp, bool):
        return "true" if seccomp else "false"
    return seccomp


class Vm:
    """One virtual machine, with Cloud Hypervisor's states and transitions.

    ``Vm(config)`` validates the config (ConfigError), refuses what the VMM cannot
    do (VmError naming the option) and opens KVM and the serial backend;
    ``boot()`` builds and starts the VM. ``watchdog_timeout`` (seconds; None,
    the default, for none, as in Cloud Hypervisor) ends a VM in which no
    vCPU makes progress with interrupts disabled for that long (``hang``).
    ``lock_disks`` (default True) takes an advisory lock on each disk image
    while the VM runs (shared for ``readonly=on``, else exclusive) and
    refuses an image another VM or process holds; False skips it, for users
    who share images knowingly.
    ``seccomp`` (Cloud Hypervisor's ``--seccomp``: True, False or ``"log"``)
    confines each of the VM's own threads (vCPUs, device workers, serial
    input) to the system calls its job needs: a call outside them kills the
    process with SIGSYS after printing why (True), is let through and logged
    by the kernel (``"log"``), or nothing is installed (False). Your program's
    own threads are never filtered.
    ``cpu_groups`` (default False) gives the VM a cgroup of its own under this
    process's cpu cgroup, with its vCPU threads at an eighth of the CPU weight
    of its device threads: when the host's CPUs are contended (many VMs,
    busy hosts), a VM's IO is served before its vCPUs run. It needs a
    writable cpu cgroup (root, or a delegated cgroup v2); VmError (kind
    ``CpuGroups``) says why when there is none. The groups go with the VM.

    After ``close()`` every method but ``close()`` raises ValueError; ``state``,
    ``config``, ``boots``, ``kernel_format`` and the serial output
    (``serial.read()``, ``serial.text``) stay readable.
    """

    def __init__(
        self,
        config: VmConfig,
        *,
        watchdog_timeout: float | None = None,
        lock_disks: bool = True,
        seccomp: bool | str = True,
        cpu_groups: bool = False,
    ) -> None:
        logs.sync_level()
        groups = None
        if cpu_groups:
            from vmkit._cgroups import CpuGroups

            groups = CpuGroups.create(os.getpid(), config.cpus.boot_vcpus)
        try:
            self._handle = _native.VmHandle(
                config,
                watchdog_timeout,
                lock_disks,
                seccomp_value(seccomp),
                None if groups is None else groups.files(),
            )
        except BaseException:
            if groups is not None:
                groups.remove()
            raise
        self._release_groups: Callable[[], None] | None = None
        if groups is not None:
            groups.close_files()
            # Also when the Vm goes away unclosed (or at exit).
            import weakref

            self._release_groups = weakref.finalize(self, groups.remove)
        # Validation derives the top-level iommu, as VmConfig.validate() does.
        config.iommu = self._handle.iommu
        self.config = config
        self._closed = False
        self.serial = SerialConsole(self._handle)

    @classmethod
    def _adopt(cls, config: VmConfig, handle: Any) -> Vm:
        """A Vm around ``handle``, which behaves as ``_native.VmHandle`` (a VM
        in a VM process: ``_vmproc.RemoteVmHandle``) and has validated ``config``."""
        vm = cls.__new__(cls)
        config.iommu = handle.iommu
        vm._handle = handle
        vm._release_groups = None
        vm.config = config
        vm._closed = False
        vm.serial = SerialConsole(handle)
        return vm

    def _live(self) -> _native.VmHandle:
        if self._closed:
            raise ValueError("I/O operation on closed VM")
        return self._handle

    def boot(self) -> None:
        """Builds the VM and starts it (Created or Shutdown → Running)."""
        self._live().boot()

    def pause(self) -> None:
        """Takes every vCPU out of the guest (Running → Paused)."""
        self._live().pause()

    def resume(self) -> None:
        """Lets the vCPUs run again (Paused → Running)."""
        self._live().resume()

    def shutdown(self) -> None:
        """Stops the VM (→ Shutdown): returns once its vCPU and device threads
        have stopped, serial output and disk writes done.

        Closing the KVM VM and freeing guest memory (milliseconds for large,
        touched memory) goes on in the background; ``release()`` waits for it,
        and the Vm object does when it goes away.
        """
        self._live().shutdown()

    def reboot(self) -> None:
        """Resets the VM: the running boot stops and a fresh one starts."""
        self._live().reboot()

    def snapshot(self, path: str | os.PathLike[str], *, progress: bool = False) -> None:
        """Writes the Paused VM into the existing directory ``path``: its
        config, guest memory (a sparse file), each vCPU's state, the clock and
        the platform devices, in new files only its owner can read (an existing
        snapshot there is an error, as in Cloud Hypervisor). ``Vm.restore(path)``
        brings it back.

        Running virtio devices first finish the requests they have taken (disk
        IO in flight completes), then go on. A failed snapshot leaves no
        partial files.

        ``progress`` shows the snapshot running (bytes written so far, time)
        on stderr while it is a terminal; elsewhere it prints nothing.
        """
        vm = self._live()
        if not progress:
            vm.snapshot(path)
            return
        from vmkit import _progress

        label = f"snapshot to {os.fspath(path)}"
        probe = lambda: _progress.bytes_under(path)  # noqa: E731
        with _progress.Progress(label, unit="bytes", probe=probe):
            vm.snapshot(path)

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        *,
        prefault: bool = False,
        disks: Mapping[str, str | os.PathLike[str]] | None = None,
        watchdog_timeout: float | None = None,
        lock_disks: bool = True,
        seccomp: bool | str = True,
        progress: bool = False,
    ) -> Vm:
        """The VM saved in the snapshot directory ``path``, Paused (as Cloud
        Hypervisor leaves a restored VM): ``resume()`` runs it on.

        ``disks`` maps disk ids (``_disk0``, or the ``id=`` given) to the images
        this VM uses instead of those the snapshot's config names: clones of one
        snapshot each get their own copy (``cp --reflink=auto`` makes one in no
        time on btrfs or XFS, sharing the unchanged blocks). Each image must be
        the size the snapshot's was when it was taken; the guest's view of the
        disk (its page cache, its file system) is the snapshot's, so copy the
        image as the snapshot left it, before anything writes to it again.

        Guest memory is the snapshot's memory file mapped copy-on-write: pages
        come in as the guest touches them (``prefault`` reads them all up
        front), and the guest's writes never reach the snapshot, so one
        snapshot restores any number of times. Shared, huge-page or
        file-backed memory is made afresh as the config says and the file's
        data copied in. A missing, truncated, corrupt
        or foreign snapshot raises VmError (kind ``Snapshot``). ``progress``
        shows the restore running on stderr while it is a terminal. The other
        options are ``Vm()``'s.
        """
        logs.sync_level()
        args = (
            path,
            prefault,
            watchdog_timeout,
            lock_disks,
            seccomp_value(seccomp),
            [(id, os.fspath(image)) for id, image in (disks or {}).items()],
        )
        if progress:
            from vmkit import _progress

            with _progress.Progress(f"restore from {os.fspath(path)}"):
                handle = _native.VmHandle.restore(*args)
        else:
            handle = _native.VmHandle.restore(*args)
        return cls._adopt(handle.config(), handle)

    def migrate_to(self, socket: str | os.PathLike[str], *, local: bool = False) -> Migration:
        """Moves the running (or paused) VM to the VMM waiting for it on the unix
        socket ``socket`` (``Vm.receive_migration``, ``vmkit remote
        receive-migration`` or ``vm.receive-migration``, in another process).

        Guest memory goes over while the VM runs; then, round after round, the
        pages the guest and the devices wrote meanwhile (KVM's dirty-page log and
        the VMM's own), until few are left; then the vCPUs stop, the devices
        finish their IO in flight, and the last pages and the state go. With
        ``local`` (shared memory: ``shared=on`` or huge pages; a host-local
        upgrade) the memory is handed over as file descriptors instead of copied.
        Once the receiver runs the VM, this one stops (``wait()`` gives
        ``migrated``) and the disks are the receiver's.

        On failure (VmError, kind ``Migration`` for the connection and the other
        side's refusals, with its reason) the VM runs on here. Only when the
        connection breaks after the last step, when the receiver may already run
        the VM, does it stay paused here, and the error says so.

        While it sends, ``state`` and ``wait(timeout)`` answer from other threads
        as usual; ``info()`` and the calls that change the VM wait for the send
        to end, as Cloud Hypervisor's API requests do.
        """
        total, downtime, rounds, sent = self._live().send_migration(os.fspath(socket), local)
        return Migration(total, downtime, rounds, sent, local)

    @classmethod
    def receive_migration(
        cls,
        socket: str | os.PathLike[str],
        *,
        watchdog_timeout: float | None = None,
        lock_disks: bool = True,
        seccomp: bool | str = True,
    ) -> Vm:
        """Waits on the new unix socket ``socket`` for a VM that another VMM
        process migrates here (``Vm.migrate_to``, ``vm.send-migration``), builds it
        from what arrives and returns it Running. The socket is removed once the
        sender connects. Everything received is checked: a sender that is not
        vmkit, speaks another protocol version or sends a bad config or state
        gets the reason and VmError (kind ``Migration``) is raised here, with
        nothing left behind. The other options are ``Vm()``'s.
        """
        logs.sync_level()
        handle = _native.VmHandle.receive_migration(
            os.fspath(socket), watchdog_timeout, lock_disks, seccomp_value(seccomp)
        )
        return cls._adopt(handle.config(), handle)

    def device_events(self, since: int = 0) -> tuple[list[DeviceEvent], int]:
        """The events devices raised, from index ``since`` on, and the index to
        ask from next time. They are Cloud Hypervisor's event-monitor events:
        ``DeviceEvent("virtio-device", "activated" or "reset", {"id": ...})``
        when a driver starts or resets a virtio device, and
        ``DeviceEvent("guest", "panic", {"event": "panic" | "crash_loaded" |
        "unknown_event"})`` when the guest writes to the pvpanic device. The
        newest 4096 are kept: a reader that falls further behind skips the
        oldest."""
        events, next_index = self._live().device_events(since)
        return [
            DeviceEvent(source, event, dict(properties)) for source, event, properties in events
        ], next_index

    def resize_vcpus(self, vcpus: int) -> None:
        """Sets the running VM's vCPU count (``--cpus max=`` bounds it;
        ``vm.resize {"desired_vcpus": vcpus}``), as Cloud Hypervisor v37 does
        it: new vCPUs start at once and the guest hears of them through ACPI
        (the CPU hot-plug controller and a GED interrupt; it brings them online
        itself); fewer marks the highest vCPUs for removal, and each stops when
        the guest ejects it. ``info().config.cpus.boot_vcpus`` becomes
        ``vcpus``. Raises VmError ("Error from CPU manager: Requested vCPUs
        exceed maximum"; "... Still pending removed vcpu" while a removal
        waits for the guest), ("VM is not running") when no boot runs.
        """
        if not 0 <= vcpus <= 255:
            raise ValueError(f"vcpus={vcpus}: must be 0 to 255")
        self._live().resize_vcpus(vcpus)

    def _hotplug(self, field: str, item: Any) -> dict[str, str]:
        """Hot-plugs ``item`` into list ``field`` of the running VM's config."""
        import copy

        handle = self._live()
        live = handle.live_config()
        candidate = copy.deepcopy(self.config if live is None else live)
        if field == "vsock":
            if candidate.vsock is not None:
                raise VmError("Too many virtio-vsock devices", "Config")
            candidate.vsock = copy.deepcopy(item)
        else:
            items = getattr(candidate, field)
            setattr(candidate, field, [*(items or []), copy.deepcopy(item)])
        candidate.validate()
        id, bdf = handle.add_device(candidate, field)
        return {"id": id, "bdf": bdf}

    def add_disk(self, disk: DiskConfig) -> dict[str, str]:
        """Hot-plugs a virtio-blk device into the running VM (``vm.add-disk``),
        as Cloud Hypervisor v37 does: it takes the first free slot of its
        ``pci_segment`` and an automatic id (``_disk2``) unless it has one, and
        the guest hears of it through ACPI PCI hot-plug (a GED interrupt; the
        guest scans the slot). Returns ``{"id": ..., "bdf": "0000:00:03.0"}``.
        ``info().config`` lists it. Raises ConfigError for a config v37 refuses
        (a duplicate id, a segment out of range), VmError otherwise (a bad
        path; "VM is not running" when no boot runs)."""
        return self._hotplug("disks", disk)

    def add_net(self, net: NetConfig) -> dict[str, str]:
        """Hot-plugs a virtio-net device (``vm.add-net``); see ``add_disk``.
        Descriptors in ``net.fds`` stay the caller's."""
        return self._hotplug("net", net)

    def add_fs(self, fs: FsConfig) -> dict[str, str]:
        """Hot-plugs a virtio-fs device (``vm.add-fs``); see ``add_disk``."""
        return self._hotplug("fs", fs)

    def add_pmem(self, pmem: PmemConfig) -> dict[str, str]:
        """Hot-plugs a virtio-pmem device (``vm.add-pmem``); see ``add_disk``."""
        return self._hotplug("pmem", pmem)

    def add_vsock(self, vsock: VsockConfig) -> dict[str, str]:
        """Hot-plugs the virtio-vsock device (``vm.add-vsock``; one per VM:
        VmError "Too many virtio-vsock devices" for a second); see ``add_disk``."""
        return self._hotplug("vsock", vsock)

    def remove_device(self, id: str) -> None:
        """Unplugs device ``id`` from the running VM (``vm.remove-device``), as
        Cloud Hypervisor v37 does: it leaves the config at once, the guest is
        asked to eject it (ACPI, a GED interrupt) and it is torn down (its
        worker stopped, its files and taps closed, its slot free) when the
        guest does. Raises VmError "Error from device manager:
        UnknownDeviceId(...)" for an id the VM does not have,
        "RemovalNotAllowed(Rng)" for the devices v37 never removes."""
        self._live().remove_device(id)

    def resize_balloon(self, size: int) -> None:
        """Asks the guest to put ``size`` bytes in its balloon (``--balloon``;
        ``vm.resize {"desired_balloon": size}``): it inflates or deflates to
        that, and the pages it puts there go back to the host.
        ``info().memory_actual_size`` follows what the guest reports. Later boots
        keep the new size. Raises VmError ("Error from device manager:
        MissingVirtioBalloon") without a balloon, ("VM is not running") when no
        boot runs.
        """
        self._live().resize_balloon(size)

    def resize_memory(self, size: int) -> None:
        """Sets the running VM's RAM to ``size`` bytes (``vm.resize
        {"desired_ram": size}``), as Cloud Hypervisor v37 does it, by the
        ``--memory hotplug_method``:

        - ``acpi`` (the default; ``hotplug_size=`` reserves the area): more
          RAM than the guest has becomes one hot-added DIMM (a multiple of
          128 MiB, at most 8 of them) that the guest hears of through ACPI
          (the memory hot-plug controller and a GED interrupt; it onlines the
          memory itself); less changes nothing in the guest, since ACPI RAM is
          never taken back. Either way ``info().config.memory.size`` becomes
          ``size``, which later boots start with. Errors: "Memory manager
          error: InvalidSize", "... InsufficientHotplugRam", "...
          NoSlotAvailable", "... InvalidResizeWithMemoryZones".
        - ``virtio-mem``: the virtio-mem device asks the guest to plug
          ``size`` less boot RAM (a configuration change; the guest plugs or
          unplugs blocks itself). ``info().config.memory.hotplugged_size`` and
          ``info().memory_actual_size`` follow; less than boot RAM changes
          only the config. Errors: "Memory manager error:
          InvalidResizeWithMemoryZones" with ``--memory-zone``, "...
          VirtioMemResizeFail(...)" beyond ``hotplug_size``, not a multiple
          of 2 MiB or the size already asked for.

        Raises VmError with those texts, ("VM is not running") when no boot
        runs.
        """
        if size < 0:
            raise ValueError(f"size={size}: must not be negative")
        self._live().resize_memory(size)

    def resize_zone(self, zone: str, size: int) -> None:
        """Sets memory zone ``zone``'s RAM to ``size`` bytes with its
        virtio-mem device (``--memory-zone id=zone,hotplug_size=``;
        ``vm.resize-zone {"id": zone, "desired_ram": size}``), as Cloud
        Hypervisor v37 does it: the guest is asked to plug ``size`` less the
        zone's boot RAM. The zone's ``hotplugged_size`` in ``info().config``
        and ``info().memory_actual_size`` follow. Raises VmError with v37's
        texts ("Failed resizing a memory zone" for an unknown zone or less
        than its boot RAM, "Memory manager error: ..." as ``resize_memory``).
        """
        if size < 0:
            raise ValueError(f"size={size}: must not be negative")
        self._live().resize_zone(zone, size)

    def power_button(self) -> None:
        """Presses the ACPI power button (a Generic Event Device event).

        The guest decides what follows; Linux shuts down in an orderly way.
        Raises VmError ("VM is not running") when no boot is running.
        """
        self._live().power_button()

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Waits for the VM to stop; returns why, or None on timeout (or when
        it was never booted).

        Returns as soon as the VM stops. Ctrl-C (KeyboardInterrupt) ends the
        wait at once in the main thread, within ``_WAIT_SLICE`` when another
        thread received the signal.
        """
        import select

        handle = self._live()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(handle.exit_fd, select.POLLIN)
        # A VM never goes back to Created: one look is enough (and one
        # request for a spawned VM's handle, not one per slice).
        if handle.state == "Created":
            return None
        while True:
            result = handle.wait(0.0)
            if result is not None:
                return VmExit(result[0], result[1])
            remaining = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            poller.poll(min(remaining, _WAIT_SLICE) * 1000)

    @property
    def exit_fd(self) -> int:
        """A descriptor that polls readable while the VM is stopped (``Shutdown``).

        For waiting on the VM beside other descriptors (``select``,
        ``asyncio``'s ``add_reader``); never read or close it. Valid until
        the Vm object goes away.
        """
        return self._handle.exit_fd

    @property
    def device_events_fd(self) -> int:
        """A descriptor that polls readable after a device event (``device_events``).

        Whoever reports the events reads it (8 bytes) to wait for the next
        ones; never close it. Valid until the Vm object goes away.
        """
        return self._handle.device_events_fd

    def release(self) -> None:
        """Waits until a stopped VM's KVM VM and guest memory are released.

        ``shutdown()`` and ``close()`` return once the VM has stopped; the
        kernel's part of the teardown follows in the background. Does
        nothing while the VM runs.
        """
        self._handle.release()

    @property
    def state(self) -> str:
        """``Created``, ``Running``, ``Paused`` or ``Shutdown``."""
        return self._handle.state

    def debug_port_writes(self) -> list[DebugPortWrite]:
        """Each write to the debug port 0x80, in order (at most 4096)."""
        return [DebugPortWrite(*w) for w in self._live().debug_port_writes()]

    def info(self) -> VmInfo:
        """Cloud Hypervisor's VmInfo: config, state, memory_actual_size, device_tree.

        Once booted, ``config`` is the live one: with the ids given at boot
        and, as v37 writes it, the path of a pty the VM opened as ``file``.
        """
        handle = self._live()
        runtime = handle.runtime_info()
        config = handle.live_config()
        if config is None:
            import copy

            config = copy.deepcopy(self.config)
        else:
            ptys = (
                (config.serial, runtime["serial_pty"]),
                (config.console, runtime["console_pty"]),
            )
            for console, pty in ptys:
                if console.mode == "Pty" and pty:
                    console.file = pty
        return VmInfo(
            config=config,
            state=runtime["state"],
            memory_actual_size=runtime["memory_size"],
            device_tree=runtime["device_tree"],
        )

    @property
    def boots(self) -> int:
        """How many times the VM has been built (boot and each guest reset)."""
        return self._handle.runtime_info()["boots"]

    @property
    def kernel_format(self) -> str | None:
        """How the last boot loaded the kernel (``pvh``, ``elf``, ``bzimage``)."""
        return self._handle.runtime_info()["kernel_format"]

    @property
    def serial_pty(self) -> str | None:
        """The path of the serial port's pty (``--serial pty``), once opened."""
        return self._live().runtime_info()["serial_pty"]

    @property
    def console_pty(self) -> str | None:
        """The path of the virtio console's pty (``--console pty``), once opened."""
        return self._live().runtime_info()["console_pty"]

    def vsock_connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A stream to the guest program listening on vsock port ``port``,
        through the ``--vsock`` device's unix socket (Cloud Hypervisor's hybrid
        vsock: ``CONNECT <port>``, answered ``OK <host port>``). Returns a
        connected, blocking ``socket.socket``; closing it closes the guest's
        connection. Raises ``VmError`` (kind ``Device``) when the VM has no vsock
        device, ``ConnectionRefusedError`` when nothing in the guest listens on
        ``port``, ``TimeoutError`` when the guest does not answer within
        ``timeout`` seconds.

        Guest programs reach the host the other way: a connection to host
        port ``P`` (CID 2) reaches whatever listens on the unix socket
        ``<socket>_<P>``.
        """
        return _vsock_connect(self.config, port, timeout)

    def counters(self) -> dict[str, dict[str, int]]:
        """Cloud Hypervisor's device counters, ``{device id: {counter: value}}``.

        Raises VmError ("VM is not running") when no boot is running.
        """
        return self._live().counters()

    def close(self) -> None:
        """Shuts down and releases everything; the Vm cannot boot again.

        Closing again does nothing.
        """
        self._closed = self.serial._closed = True
        self._handle.close()
        if self._release_groups is not None:
            # Once released, the VM has no thread left to move out of its groups.
            self._handle.release()
            self._release_groups()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def spawn(
        cls,
        config: VmConfig | None,
        *,
        api_socket: str | Path | None = None,
        serial_log: bool = True,
        vmm_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        request_timeout: float | None = 60.0,
        stop_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
        fresh_interpreter: bool = False,
        cpu_groups: bool = False,
        restore: str | os.PathLike[str] | None = None,
        prefault: bool = False,
        disks: Mapping[str, str | os.PathLike[str]] | None = None,
        name: str | None = None,
    ) -> SpawnedVm:
        """Runs the VM in a ``vmkit --api-socket`` child process.

        See ``vmkit.client.spawn``: the process is forked from a pre-imported
        VMM server (or, with ``fresh_interpreter``, a new interpreter); the
        returned ``SpawnedVm`` has this class's methods, carried out over the
        HTTP API, and its ``with`` block always ends the process and removes
        its files. ``Vm.spawn(None, restore=path)`` restores a snapshot in the
        new process instead (Paused until ``resume()``; ``disks``: the clone's
        own images by disk id, as for ``Vm.restore``). ``name``: the VM's
        name in ``vmkit ls`` and for ``vmkit remote NAME`` (default
        ``vm-<pid>``); one a running VM has is refused.
        """
        from vmkit.client import spawn

        return spawn(
            config,
            api_socket=api_socket,
            serial_log=serial_log,
            vmm_args=vmm_args,
            startup_timeout=startup_timeout,
            request_timeout=request_timeout,
            stop_timeout=stop_timeout,
            env=env,
            fresh_interpreter=fresh_interpreter,
            cpu_groups=cpu_groups,
            restore=restore,
            prefault=prefault,
            disks=disks,
            name=name,
        )
