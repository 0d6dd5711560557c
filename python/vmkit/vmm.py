"""The VMM: Cloud Hypervisor v37's API actions over one optional VM.

A ``Vmm`` holds what a v37 VMM holds: a VM config (``config``, set by
``create``) and a VM object (``vm``, built by ``boot``). Each method is one
HTTP API action (ch-reference §4.2) with v37's preconditions and error texts
(§4.4, §4.5); a failed action raises ``ApiError``, whose text is the body of
the HTTP 500 answer.

    >>> vmm = Vmm()
    >>> vmm.create(VmConfig.from_cli(["--kernel", "vmlinux"]))   # doctest: +SKIP
    >>> vmm.boot()                                                # doctest: +SKIP
    >>> vmm.info()["state"]                                       # doctest: +SKIP
    'Running'

Every action takes one lock, so actions from several API clients run one at a
time, as they do on v37's single VMM thread. A VM that stops by itself (the
guest powers off, or vmkit ends it) makes the VMM delete it and ask to exit
(``wait_exit``), as v37 does.
"""

from __future__ import annotations

import _thread
import copy
import os
import select
import time

from vmkit import __version__, _reactor
from vmkit._apiwire import io_error_text as _io_error_text
from vmkit._apiwire import rust_debug_str
from vmkit.config import (
    DeviceConfig,
    DiskConfig,
    FsConfig,
    NetConfig,
    PmemConfig,
    RestoreConfig,
    UserDeviceConfig,
    VdpaConfig,
    VmConfig,
    VsockConfig,
)
from vmkit.errors import ConfigError
from vmkit.logs import LazyLogger
from vmkit.vm import Vm, VmError, seccomp_value

__all__ = ["ApiError", "EventMonitor", "Vmm", "rust_debug_str"]

# Library use stays quiet (a NullHandler once logging is imported); the vmkit
# command sends these loggers to stderr or --log-file.
log = LazyLogger("vmkit.vmm")

#: The features vmkit reports in ``vmm.ping``: a default v37 build's, in its (sorted) order.
FEATURES = ("io_uring", "kvm")

VM_NOT_CREATED = "VM is not created"
VM_ALREADY_CREATED = "VM is already created"
VM_NOT_RUNNING = "VM is not running"
VM_CONFIG_MISSING = "VM config is missing"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    _T = TypeVar("_T")


def _url_path(url: str) -> str | None:
    """The path of a ``file://`` URL, as v37 takes it (no other scheme)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme != "file" or not parts.path:
        return None
    return parts.path


def _socket_path(url: str) -> str | None:
    """The path of a ``unix:<path>`` migration URL, as v37 takes it."""
    return url[len("unix:") :] if url.startswith("unix:") else None


def _shared_memory(config: VmConfig | None) -> bool:
    """v37's ``backed_by_shared_memory``, for its answer before a VM exists."""
    if config is None:
        return False
    memory = config.memory
    if memory.shared or memory.hugepages:
        return True
    zones = memory.zones or []
    return memory.size == 0 and all(z.shared or z.hugepages for z in zones)


class _Flag:
    """``threading.Event``'s ``set``, ``is_set`` and ``wait`` from a lock held
    until set: a VMM that boots with ``--api-socket`` starts its guest before
    it loads ``threading`` (with ``functools`` and ``collections``, ~5 ms)."""

    __slots__ = ("_gate", "_set")

    def __init__(self) -> None:
        self._gate = _thread.allocate_lock()
        self._gate.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._open()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._gate.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._open()  # for every other waiter
        return self._set

    def _open(self) -> None:
        # A second opener (a signal's handler setting it meanwhile, a waiter
        # passing through) may find it open already: the gate ends open.
        try:
            self._gate.release()
        except RuntimeError:
            pass


class ApiError(Exception):
    """An API action failed; ``str(error)`` is v37's error Display (the HTTP 500 body)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class EventMonitor:
    """v37's ``--event-monitor`` output: each event as pretty-printed JSON and a blank line.

    ``fd`` is written with plain ``write`` calls (no buffering); ``timestamp``
    is the time since the monitor was made. Thread-safe.

    On a non-blocking ``fd`` (``--event-monitor path=`` opens one) an event
    that a full pipe cannot take is dropped whole and counted in ``dropped``:
    events are written under the VMM's lock, which a reader that stalls must
    not hold. One that only partly fits is finished within
    ``PARTIAL_WRITE_TIMEOUT`` seconds (else the monitor fails as on any write
    error), so the stream never holds a torn event.
    """

    PARTIAL_WRITE_TIMEOUT = 1.0

    def __init__(self, fd: int, *, close: bool = True) -> None:
        self._fd = fd
        self._close = close
        self._start = time.monotonic()
        self._lock = _thread.allocate_lock()
        self._broken = False
        #: events dropped because the reader was not keeping up
        self.dropped = 0
        #: the first write error, as v37 prints it (``Error doing event monitor I/O: ...``)
        self.error: str | None = None
        #: whether a write error is logged (off while the caller reports it itself)
        self.log_errors = True

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        elapsed = time.monotonic() - self._start
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": None if properties is None else dict(properties),
        }
        import json  # here: a VMM without --event-monitor never needs it

        data = (json.dumps(record, indent=2) + "\n\n").encode()
        with self._lock:
            if self._broken:
                return
            try:
                view = memoryview(data)
                deadline = time.monotonic() + self.PARTIAL_WRITE_TIMEOUT
                while view:
                    try:
                        written = os.write(self._fd, view)
                    except BlockingIOError:
                        if len(view) == len(data):
                            self._drop_event()
                            return
                        if not _wait_writable(self._fd, deadline):
                            raise
                        continue
                    view = view[written:]
            except OSError as e:
                self._broken = True
                self.error = f"Error doing event monitor I/O: {_io_error_text(e)}"
                if self.log_errors:
                    log.error("%s", self.error)

    def _drop_event(self) -> None:
        if self.dropped == 0:
            log.warning("The event monitor's reader is not keeping up: dropping events")
        self.dropped += 1

    def close(self) -> None:
        with self._lock:
            if self._close and self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = -1
            self._broken = True


def _wait_writable(fd: int, deadline: float) -> bool:
    """Waits until ``fd`` takes more data or ``deadline`` passes; whether it does."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if poller.poll(remaining * 1000):
            return True


def _add_to_list(items: list[_T] | None, item: _T) -> list[_T]:
    return [item] if items is None else [*items, item]


def _memory_actual_size(config: VmConfig) -> int:
    memory = config.memory
    total = memory.size + (memory.hotplugged_size or 0)
    for zone in memory.zones or []:
        total += zone.size + (zone.hotplugged_size or 0)
    return total


def _device_manager_error(e: VmError) -> str:
    """A hot-plug's VmError as v37's API words it (its device manager's errors
    carry the prefix; those of the VM's own checks do not)."""
    text = str(e)
    if e.kind == "Device" and not text.startswith("Error from device manager"):
        return f"Error from device manager: {text}"
    return text


def _close_fds(fds: list[int] | None) -> None:
    for fd in fds or []:
        try:
            os.close(fd)
        except OSError:
            pass


class Vmm:
    """The API actions of one VMM (ch-reference §4.2), with v37's state rules (§4.5).

    ``events``: where to report events (``--event-monitor``), or None.
    ``watchdog_timeout`` (None: no hang detector, as in Cloud Hypervisor), ``lock_disks``,
    ``seccomp``, ``cpu_groups``: passed to each ``Vm``. ``vm_factory(config, watchdog_timeout,
    lock_disks, seccomp, cpu_groups)`` makes the ``Vm`` instead of ``Vm(...)`` (a VM process's,
    ``_vmproc``), ``vm_restorer(path, prefault, watchdog_timeout, lock_disks, seccomp, disks)``
    instead of ``Vm.restore``, ``vm_receiver(path, watchdog_timeout, lock_disks, seccomp)``
    instead of ``Vm.receive_migration``, and ``pid`` is the VMM process ``vmm.ping`` names
    (this one by default). The attributes
    ``config`` and ``vm`` are the VMM's two layers; read them under ``lock``.
    """

    def __init__(
        self,
        *,
        events: EventMonitor | None = None,
        watchdog_timeout: float | None = None,
        lock_disks: bool = True,
        seccomp: bool | str = True,
        cpu_groups: bool = False,
        vm_factory: Callable[[VmConfig, float | None, bool, str, bool], Vm] | None = None,
        vm_restorer: Callable[[str, bool, float | None, bool, str, Mapping[str, str]], Vm]
        | None = None,
        vm_receiver: Callable[[str, float | None, bool, str], Vm] | None = None,
        pid: int | None = None,
    ) -> None:
        self.vm_factory = vm_factory
        self.vm_restorer = vm_restorer
        self.vm_receiver = vm_receiver
        self.pid = pid
        self.config: VmConfig | None = None
        self.vm: Vm | None = None
        self.events = events
        self.watchdog_timeout = watchdog_timeout
        self.lock_disks = lock_disks
        self.seccomp = seccomp
        self.cpu_groups = cpu_groups
        self.lock = _thread.RLock()
        self._exit = _Flag()
        self._exit_code: int | None = None
        self._exit_message: str | None = None
        # Reentrant: request_exit also runs from a signal handler, which may
        # interrupt this thread while it holds the lock.
        self._exit_lock = _thread.RLock()
        self._exit_fd: int | None = None
        self._shut_down = False
        #: descriptors received through the API (add-net), closed when their device goes.
        self._owned_fds: set[int] = set()
        #: those of hot-plugged net devices, by device id.
        self._hotplugged_fds: dict[str, list[int]] = {}
        #: watching a booted VM (``_watch``): the descriptors the shared reactor
        #: waits on for it, and the threads that handle what they report.
        self._watch_lock = _thread.allocate_lock()
        self._watched_fds: tuple[int, ...] = ()
        self._watch_closed = False
        self._watchers: list[threading.Thread] = []
        #: ``close(vm_gone=True)``: the VM's stop is not an exit event.
        self._vm_gone = False

    # -- events and exit -------------------------------------------------------------------

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        """Reports an event on the event monitor, if there is one."""
        if self.events is not None:
            self.events.emit(source, event, properties)

    def request_exit(self, code: int, message: str | None = None) -> None:
        """Asks whoever runs this VMM (``wait_exit``) to end the process with ``code``."""
        with self._exit_lock:
            if self._exit_code is None:
                self._exit_code = code
                self._exit_message = message
            self._exit.set()
            if self._exit_fd is not None:
                os.eventfd_write(self._exit_fd, 1)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """Waits for an exit request; returns its code, or None on timeout."""
        if self._exit.wait(timeout):
            return self._exit_code
        return None

    def exit_fd(self) -> int:
        """A descriptor that polls readable once an exit is requested, to wait
        for it beside others; never read it. ``close()`` closes it."""
        with self._exit_lock:
            if self._exit_fd is None:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._exit_fd = fd
                if self._exit.is_set():
                    os.eventfd_write(fd, 1)
            return self._exit_fd

    @property
    def exit_message(self) -> str | None:
        """Why the VMM exits, when that is an error (e.g. ``VM stopped: ...``)."""
        return self._exit_message

    # -- vmm.* -------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """``vmm.ping``: VmmPingResponse with vmkit's own version."""
        return {
            "build_version": f"vmkit v{__version__}",
            "version": __version__,
            "pid": os.getpid() if self.pid is None else self.pid,
            "features": list(FEATURES),
        }

    def vmm_shutdown(self) -> None:
        """``vmm.shutdown``: deletes the VM (shutting it down if booted).

        The caller ends the process afterwards (``request_exit``), once the
        answer is sent. ``vmm shutdown`` is reported once.
        """
        with self.lock:
            self._delete_locked()
            if not self._shut_down:
                self._shut_down = True
                self.emit("vmm", "shutdown")

    def _unwatch(self) -> None:
        """Stops waiting for the current VM (replaced by another)."""
        with self._watch_lock:
            fds, self._watched_fds = self._watched_fds, ()
        for fd in fds:
            _reactor.shared().remove(fd)

    def stop_watching(self) -> None:
        """Stops waiting for the VM's stop and device events until ``close``
        (the VM is about to go: its end is not an event to handle)."""
        with self._watch_lock:
            self._watch_closed = True
            fds, self._watched_fds = self._watched_fds, ()
            watchers, self._watchers = self._watchers, []
        for fd in fds:
            _reactor.shared().remove(fd)
        current = _thread.get_ident()
        for watcher in watchers:
            if watcher.ident != current:
                watcher.join()

    def close(self, *, vm_gone: bool = False) -> None:
        """Shuts down and forgets any VM (``vmm_shutdown`` without exit);
        returns once the threads that waited for it are gone.

        ``vm_gone``: the VM ends with the process that runs it, which the
        caller ends next; it is forgotten without a request to it.
        """
        # First, while the VM's descriptors are open: no more watching.
        self.stop_watching()
        if vm_gone:
            with self.lock:
                self._vm_gone = True
                self.vm = None
        self.vmm_shutdown()
        with self._watch_lock:
            self._watch_closed = False  # a VM created after this is watched again
        with self._exit_lock:
            if self._exit_fd is not None:
                os.close(self._exit_fd)
                self._exit_fd = None

    # -- create / boot / delete / shutdown / reboot --------------------------------------

    def create(self, config: VmConfig) -> None:
        """``vm.create``: stores ``config`` without validating it; drops ``net[].fds``."""
        with self.lock:
            if self.config is not None:
                raise ApiError(VM_ALREADY_CREATED)
            config = copy.deepcopy(config)
            if config.net and any(net.fds is not None for net in config.net):
                log.warning("Ignoring FDs sent via the HTTP request body")
            for net in config.net or []:
                net.fds = None
            self.config = config

    def boot(self) -> None:
        """``vm.boot``: builds the VM from the config and boots it; resumes a Paused VM."""
        with self.lock:
            self.emit("vm", "booting")
            if self.config is None:
                raise ApiError(VM_CONFIG_MISSING)
            vm = self.vm
            if vm is not None and vm.state == "Paused":
                self._resume_locked(vm)
                self.emit("vm", "booted")
                return
            if vm is not None:
                try:
                    vm.boot()
                except VmError as e:
                    raise ApiError(str(e)) from None
                self._booted(vm)
                return
            config = copy.deepcopy(self.config)
            # Vm validates the config (ConfigError) and refuses what the VMM cannot do.
            try:
                if self.vm_factory is not None:
                    vm = self.vm_factory(
                        config,
                        self.watchdog_timeout,
                        self.lock_disks,
                        seccomp_value(self.seccomp),
                        self.cpu_groups,
                    )
                else:
                    vm = Vm(
                        config,
                        watchdog_timeout=self.watchdog_timeout,
                        lock_disks=self.lock_disks,
                        seccomp=self.seccomp,
                        cpu_groups=self.cpu_groups,
                    )
            except ConfigError as e:
                raise ApiError(f"Failed to validate config: {e}") from None
            except VmError as e:
                raise ApiError(str(e)) from None
            try:
                vm.boot()
            except VmError as e:
                # v37 keeps a VM object that failed to boot; vmkit drops it (and its
                # KVM resources): info still says Created, as it does in v37.
                vm.close()
                raise ApiError(str(e)) from None
            self.vm = vm
            self._booted(vm)
            self._watch(vm)

    def _booted(self, vm: Vm) -> None:
        cpus = vm.config.cpus.boot_vcpus
        for index in range(cpus):
            self.emit("cpu_manager", "create_vcpu", {"id": str(index)})
        self.emit("vm", "booted")

    def delete(self) -> None:
        """``vm.delete``: shuts down a VM if there is one, then forgets the config."""
        with self.lock:
            self._delete_locked()

    def _delete_locked(self) -> None:
        if self.config is None:
            return
        if self.vm is not None:
            self._shutdown_locked(keep_config=False)
        if self.config is not None:
            for net in self.config.net or []:
                self._release_fds(net.fds)
        self.config = None
        self.emit("vm", "deleted")

    def shutdown(self) -> None:
        """``vm.shutdown``: shuts the VM down and drops it; the config stays."""
        with self.lock:
            if self.vm is None:
                raise ApiError(VM_NOT_RUNNING)
            self._shutdown_locked()

    def _shutdown_locked(self, keep_config: bool = True) -> None:
        vm = self.vm
        assert vm is not None
        # The config as it ran (with the ids given at boot) stays for a next boot.
        live = self._live_config(vm) if keep_config else self.config
        self.vm = None
        try:
            vm.shutdown()
        except VmError as e:
            log.error("Error shutting down the VM: %s", e)
        vm.close()
        self.config = live
        self.emit("vm", "shutdown")

    def reboot(self) -> None:
        """``vm.reboot``: a running or paused VM stops and boots again (same PTYs)."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_CREATED)
            boots = vm.boots
            try:
                vm.reboot()
            except VmError as e:
                raise ApiError(str(e)) from None
            # v37 answers once the new boot runs; vmkit rebuilds in its VMM thread.
            deadline = time.monotonic() + 30
            while vm.boots <= boots:
                if vm.state == "Shutdown":
                    exit_info = vm.wait(0)
                    raise ApiError(exit_info.message if exit_info else VM_NOT_RUNNING)
                if time.monotonic() > deadline:
                    raise ApiError("The VM did not boot again within 30 s")
                time.sleep(0.002)
            self.emit("vm", "shutdown")
            self.emit("vm", "booting")
            self._booted(vm)

    # -- pause / resume / power button / counters / info -----------------------------------

    @staticmethod
    def _check_transition(state: str, to: str) -> bool:
        allowed = {
            "Created": ("Running", "Shutdown", "Paused", "BreakPoint"),
            "Running": ("Shutdown", "Paused", "BreakPoint"),
            "Shutdown": ("Running",),
            "Paused": ("Running", "Shutdown"),
            "BreakPoint": ("Created", "Running"),
        }
        return to in allowed.get(state, ())

    def pause(self) -> None:
        """``vm.pause``: Running → Paused."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_RUNNING)
            self.emit("vm", "pausing")
            state = vm.state
            prefix = "Cannot pause VM: Failed to pause migratable component: "
            if not self._check_transition(state, "Paused"):
                raise ApiError(
                    f"{prefix}Invalid transition: InvalidStateTransition({state}, Paused)"
                )
            try:
                vm.pause()
            except VmError as e:
                raise ApiError(f"{prefix}{e}") from None
            self.emit("vm", "paused")

    def resume(self) -> None:
        """``vm.resume``: Paused → Running."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_RUNNING)
            self._resume_locked(vm)

    def _resume_locked(self, vm: Vm) -> None:
        self.emit("vm", "resuming")
        state = vm.state
        prefix = "Cannot resume VM: Failed to resume migratable component: "
        if not self._check_transition(state, "Running"):
            raise ApiError(f"{prefix}Invalid transition: InvalidStateTransition({state}, Running)")
        try:
            vm.resume()
        except VmError as e:
            raise ApiError(f"{prefix}{e}") from None
        self.emit("vm", "resumed")

    def power_button(self) -> None:
        """``vm.power-button``: presses the guest's ACPI power button."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_RUNNING)
            try:
                vm.power_button()
            except VmError as e:
                raise ApiError(f"Error triggering power button: {e}") from None

    def counters(self) -> dict[str, dict[str, int]]:
        """``vm.counters``: VmCounters of the booted VM."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_RUNNING)
            try:
                return vm.counters()
            except VmError as e:
                raise ApiError(str(e)) from None

    def current_state(self) -> str | None:
        """``vm.info``'s state without taking the lock, which a migration's
        send or a snapshot holds for as long as it takes; None before
        ``vm.create`` (``info`` raises then)."""
        vm = self.vm
        if vm is not None:
            return vm.state
        return None if self.config is None else "Created"

    def info(self) -> dict[str, Any]:
        """``vm.info``: VmInfo (config, state, memory_actual_size, device_tree)."""
        with self.lock:
            if self.config is None:
                raise ApiError(VM_NOT_CREATED)
            vm = self.vm
            if vm is None:
                return {
                    "config": self.config.to_dict(),
                    "state": "Created",
                    "memory_actual_size": _memory_actual_size(self.config),
                    "device_tree": None,
                }
            info = vm.info().to_dict()
            if info["device_tree"] is None:
                info["device_tree"] = {}
            return info

    def _live_config(self, vm: Vm) -> VmConfig:
        """The VM's config as it stands (with the ids given at boot)."""
        try:
            return vm.info().config
        except (ConfigError, VmError):
            return copy.deepcopy(vm.config)

    # -- resize ------------------------------------------------------------------------------

    def resize(
        self,
        desired_vcpus: int | None = None,
        desired_ram: int | None = None,
        desired_balloon: int | None = None,
    ) -> None:
        """``vm.resize``: on a VM that is not booted, edits the config; on a
        booted one, hot-plugs or unplugs vCPUs, resizes RAM (an ACPI DIMM, or
        the default zone's virtio-mem device) and sets the balloon's target,
        in v37's order."""
        with self.lock:
            if self.config is None:
                raise ApiError(VM_NOT_CREATED)
            if self.vm is not None:
                if desired_vcpus is not None:
                    try:
                        self.vm.resize_vcpus(desired_vcpus)
                    except VmError as e:
                        raise ApiError(str(e)) from None
                if desired_ram is not None:
                    try:
                        self.vm.resize_memory(desired_ram)
                    except VmError as e:
                        raise ApiError(str(e)) from None
                if desired_balloon is not None:
                    try:
                        self.vm.resize_balloon(desired_balloon)
                    except VmError as e:
                        raise ApiError(str(e)) from None
                return
            config = self.config
            if desired_vcpus is not None:
                config.cpus.boot_vcpus = desired_vcpus
            if desired_ram is not None:
                config.memory.size = desired_ram
            if desired_balloon is not None and config.balloon is not None:
                config.balloon.size = desired_balloon

    def resize_zone(self, id: str, desired_ram: int) -> None:
        """``vm.resize-zone``: on a VM that is not booted, edits the zone's
        size; on a booted one, asks the zone's virtio-mem device for
        ``desired_ram`` less the zone's boot RAM (``Vm.resize_zone``)."""
        with self.lock:
            if self.config is None:
                raise ApiError(VM_NOT_CREATED)
            if self.vm is not None:
                try:
                    self.vm.resize_zone(id, desired_ram)
                except VmError as e:
                    raise ApiError(str(e)) from None
                return
            zones = [zone for zone in self.config.memory.zones or [] if zone.id == id]
            if not zones:
                # v37's answer for an unknown zone
                log.error("Could not find the memory zone %s for the resize", id)
                raise ApiError("Failed resizing a memory zone")
            zones[0].size = desired_ram

    # -- add / remove devices ----------------------------------------------------------------

    def _add(
        self, field: str, item: Any, what: str, *, check: Callable[[VmConfig], None] | None = None
    ) -> dict[str, Any] | None:
        with self.lock:
            if self.config is None:
                raise ApiError(VM_NOT_CREATED)
            base = self._live_config(self.vm) if self.vm is not None else self.config
            candidate = copy.deepcopy(base)
            if check is not None:
                check(candidate)
            if field == "vsock":
                candidate.vsock = copy.deepcopy(item)
            else:
                setattr(candidate, field, _add_to_list(getattr(candidate, field), item))
            try:
                candidate.validate()
            except ConfigError as e:
                raise ApiError(f"Failed to validate config: {e}") from None
            if self.vm is not None:
                try:
                    return self.vm._hotplug(field, item)
                except ConfigError as e:
                    raise ApiError(f"Failed to validate config: {e}") from None
                except VmError as e:
                    raise ApiError(_device_manager_error(e)) from None
            config = self.config
            if field == "vsock":
                config.vsock = item
            else:
                setattr(config, field, _add_to_list(getattr(config, field), item))
            return None

    def add_device(self, device: DeviceConfig) -> dict[str, Any] | None:
        """``vm.add-device``: cold: appends to the config (None = 204)."""
        return self._add("devices", device, "VFIO device")

    def add_user_device(self, device: UserDeviceConfig) -> dict[str, Any] | None:
        """``vm.add-user-device``."""
        return self._add("user_devices", device, "user device")

    def add_disk(self, disk: DiskConfig) -> dict[str, Any] | None:
        """``vm.add-disk``."""
        return self._add("disks", disk, "disk")

    def add_fs(self, fs: FsConfig) -> dict[str, Any] | None:
        """``vm.add-fs``."""
        return self._add("fs", fs, "virtio-fs device")

    def add_pmem(self, pmem: PmemConfig) -> dict[str, Any] | None:
        """``vm.add-pmem``."""
        return self._add("pmem", pmem, "persistent memory device")

    def add_net(self, net: NetConfig) -> dict[str, Any] | None:
        """``vm.add-net``; descriptors in ``net.fds`` become the VMM's (closed with the device)."""
        try:
            result = self._add("net", net, "network device")
        except ApiError:
            self._release_fds(net.fds, force=True)
            raise
        with self.lock:
            self._owned_fds.update(net.fds or [])
            if result is not None and net.fds:  # hot-plugged: released with the device
                self._hotplugged_fds[str(result["id"])] = list(net.fds)
        return result

    def add_vdpa(self, vdpa: VdpaConfig) -> dict[str, Any] | None:
        """``vm.add-vdpa``."""
        return self._add("vdpa", vdpa, "vDPA device")

    def add_vsock(self, vsock: VsockConfig) -> dict[str, Any] | None:
        """``vm.add-vsock``: ``Too many virtio-vsock devices`` when one exists."""

        def only_one(config: VmConfig) -> None:
            if config.vsock is not None:
                raise ApiError("Too many virtio-vsock devices")

        return self._add("vsock", vsock, "vsock device", check=only_one)

    def _release_fds(self, fds: list[int] | None, *, force: bool = False) -> None:
        for fd in fds or []:
            if force or fd in self._owned_fds:
                self._owned_fds.discard(fd)
                _close_fds([fd])

    def remove_device(self, id: str) -> None:
        """``vm.remove-device``: cold: removes the device with ``id`` from the config."""
        with self.lock:
            if self.vm is not None:
                try:
                    tree = self.vm.info().device_tree or {}
                except VmError:
                    tree = {}
                if id not in tree:  # v37's device manager looks the id up first
                    raise ApiError(
                        f"Error from device manager: UnknownDeviceId({rust_debug_str(id)})"
                    )
                try:
                    self.vm.remove_device(id)
                except VmError as e:
                    raise ApiError(str(e)) from None
                # Its tap descriptors, if add-net brought them (the device has its own).
                self._release_fds(self._hotplugged_fds.pop(id, None))
                return
            config = self.config
            if config is None:
                raise ApiError(VM_NOT_CREATED)
            removed = False
            for field in ("devices", "user_devices", "disks", "fs", "net", "pmem", "vdpa"):
                items: list[Any] | None = getattr(config, field)
                if items is None:
                    continue
                kept = [item for item in items if item.id != id]
                if len(kept) != len(items):
                    removed = True
                    if field == "net":
                        for item in items:
                            if item.id == id:
                                self._release_fds(item.fds)
                    setattr(config, field, kept)
            if config.vsock is not None and config.vsock.id == id:
                config.vsock = None
                removed = True
            if not removed:
                raise ApiError(f"No device with id {rust_debug_str(id)} to remove")

    # -- snapshot / restore / migration ------------------------------------------------------

    def snapshot(self, destination_url: str) -> None:
        """``vm.snapshot``: writes the Paused VM into the existing directory
        ``file://<path>`` names (``Vm.snapshot``)."""
        with self.lock:
            vm = self.vm
            if vm is None:
                raise ApiError(VM_NOT_RUNNING)
            taking = "Cannot snapshot VM: Failed to snapshot migratable component: "
            sending = "Cannot send VM snapshot: Failed to send migratable component snapshot: "
            if vm.state != "Paused":
                raise ApiError(f"{taking}Trying to snapshot while VM is running")
            # v37 takes the state ("snapshotting", "snapshotted"), then sends it
            # to the URL: what fails from there on fails as a send, after both events.
            self.emit("vm", "snapshotting")
            path = _url_path(destination_url)
            if path is None:
                self.emit("vm", "snapshotted")
                raise ApiError(f"{sending}Could not extract path from URL: {destination_url}")
            try:
                vm.snapshot(path)
            except VmError as e:
                if e.kind != "Snapshot":
                    raise ApiError(f"{taking}{e}") from None
                self.emit("vm", "snapshotted")
                raise ApiError(f"{sending}{e}") from None
            self.emit("vm", "snapshotted")

    def restore(self, config: RestoreConfig, disks: Mapping[str, str] | None = None) -> None:
        """``vm.restore``: only without config and VM; the VM of the snapshot
        directory ``file://<path>`` names, Paused (``Vm.restore``, with the
        clone's own ``disks`` by id: vmkit's addition to v37's body)."""
        with self.lock:
            if self.config is not None or self.vm is not None:
                raise ApiError(VM_ALREADY_CREATED)
            reading = "Cannot restore VM: Failed to send migratable component snapshot: "
            path = _url_path(config.source_url)
            if path is None:
                raise ApiError(f"{reading}Could not extract path from URL: {config.source_url}")
            try:
                if self.vm_restorer is not None:
                    vm = self.vm_restorer(
                        path,
                        bool(config.prefault),
                        self.watchdog_timeout,
                        self.lock_disks,
                        seccomp_value(self.seccomp),
                        dict(disks or {}),
                    )
                else:
                    vm = Vm.restore(
                        path,
                        prefault=bool(config.prefault),
                        disks=disks,
                        watchdog_timeout=self.watchdog_timeout,
                        lock_disks=self.lock_disks,
                        seccomp=self.seccomp,
                    )
            except VmError as e:
                prefix = reading if e.kind == "Snapshot" else "Cannot restore VM: "
                raise ApiError(f"{prefix}{e}") from None
            self.vm = vm
            self.config = copy.deepcopy(vm.config)
            self._watch(vm)
            # As v37: both once the snapshot has been read (none for a failed restore).
            self.emit("vm", "restoring")
            self.emit("vm", "restored")

    def send_migration(self, destination_url: str, local: bool = False) -> None:
        """``vm.send-migration``: moves the VM to the VMM receiving on
        ``unix:<path>`` (``Vm.migrate_to``); then, as v37, this VMM deletes the
        VM and the caller ends the process (``request_exit``) once the answer
        is sent. On failure the VM runs on here."""
        sending = "Failed to send migratable component snapshot: "
        with self.lock:
            vm = self.vm
            # v37 checks the memory before looking for a VM.
            if local and vm is None and not _shared_memory(self.config):
                raise ApiError(
                    f"{sending}Local migration requires shared memory or hugepages enabled"
                )
            if vm is None:
                raise ApiError(f"{sending}{VM_NOT_RUNNING}")
            path = _socket_path(destination_url)
            if path is None:
                raise ApiError(f"{sending}Could not extract path from URL: {destination_url}")
            try:
                vm.migrate_to(path, local=local)
            except VmError as e:
                raise ApiError(f"{sending}{e}") from None
            # v37 pauses and snapshots the VM on the way, then ends it.
            for event in ("pausing", "paused", "snapshotting", "snapshotted"):
                self.emit("vm", event)
            self._delete_locked()
            if not self._shut_down:
                self._shut_down = True
                self.emit("vmm", "shutdown")

    def receive_migration(self, receiver_url: str) -> None:
        """``vm.receive-migration``: waits on ``unix:<path>`` for a VM another
        VMM sends (``Vm.receive_migration``) and runs it. Answers once the VM
        runs here, or the migration failed."""
        with self.lock:
            path = _socket_path(receiver_url)
            if path is None:
                raise ApiError(
                    "Failed to send migratable component snapshot: Could not extract path "
                    f"from URL: {receiver_url}"
                )
            old = self.vm
            try:
                if self.vm_receiver is not None:
                    # The VM process replaces its VM (if any) once the new one runs.
                    vm = self.vm_receiver(
                        path, self.watchdog_timeout, self.lock_disks, seccomp_value(self.seccomp)
                    )
                else:
                    vm = Vm.receive_migration(
                        path,
                        watchdog_timeout=self.watchdog_timeout,
                        lock_disks=self.lock_disks,
                        seccomp=self.seccomp,
                    )
            except VmError as e:
                raise ApiError(f"Failed to receive migratable component snapshot: {e}") from None
            if old is not None:
                # v37 drops the VM it had for the one received, without events.
                self._unwatch()
                if self.vm_receiver is None:
                    try:
                        old.shutdown()
                    except VmError:
                        pass  # closed next all the same
                    old.close()
            self.vm = vm
            self.config = copy.deepcopy(vm.config)
            self._watch(vm)
            for event in ("restoring", "restored", "resuming", "resumed"):
                self.emit("vm", event)

    # -- the VM ending by itself ---------------------------------------------------------------

    def _watch(self, vm: Vm, seen: int = 0) -> None:
        """Has the shared reactor wait for ``vm`` to stop or report device
        events (``seen`` of them are reported): no thread waits per VM, and an
        idle VM costs nothing (a spawned VM's would otherwise cost requests to
        its process)."""
        try:
            fds = (vm.exit_fd, vm.device_events_fd)
        except (VmError, ValueError):  # the VM process is gone, or the API closed the VM
            return
        reactor = _reactor.shared()

        def ready(_fd: int) -> None:
            # On the reactor's thread: hand the work to a thread of its own.
            with self._watch_lock:
                for fd in fds:
                    reactor.remove(fd)
                self._watched_fds = ()
                if self._watch_closed:
                    return
                import threading  # loaded by now: the reactor's thread runs this

                thread = threading.Thread(
                    target=self._watch_step, args=(vm, seen), name="vmm-watch", daemon=True
                )
                self._watchers = [t for t in self._watchers if t.is_alive()] + [thread]
                thread.start()

        # The reactor's lock first, as when it calls ``ready``.
        with reactor.held(), self._watch_lock:
            if self._watch_closed:
                return
            self._watched_fds = fds
            for fd in fds:
                reactor.add(fd, select.EPOLLIN, ready)

    def _watch_step(self, vm: Vm, seen: int) -> None:
        """Reports ``vm``'s new device events; when the guest (not the API)
        stopped it, the VMM exits; otherwise it is watched again."""
        try:
            try:
                os.read(vm.device_events_fd, 8)
            except BlockingIOError:
                pass  # read by an earlier step
            events, seen = vm.device_events(seen)
            for event in events:
                self.emit(event.source, event.event, event.properties)
            exit_info = vm.wait(0)
        except (VmError, ValueError):  # ValueError: the API closed the VM meanwhile
            return
        if exit_info is None:
            self._watch(vm, seen)
            return
        if self._vm_gone:
            return  # close(vm_gone=True): the VM goes with the Vmm
        if exit_info.reason in ("shutdown", "migrated"):
            return  # the API asked for it and does what follows
        log.info("VM exit event: %s", exit_info.message)
        with self.lock:
            # v37's exit event: the VMM deletes the VM and exits.
            self._delete_locked()
            if not self._shut_down:
                self._shut_down = True
                self.emit("vmm", "shutdown")
        if exit_info.reason == "poweroff":
            self.request_exit(0)
        else:
            self.request_exit(1, f"VM stopped: {exit_info.message}")
