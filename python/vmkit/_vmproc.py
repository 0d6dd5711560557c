"""VM processes without Python: what ``Vm.spawn`` runs.

A VM process is forked from the fork server straight into Rust
(``rust/vmkit-py/src/child.rs``) and runs one VM; a forked interpreter would
write megabytes of the server's pages as it runs, a process that runs no
Python writes almost none. This program keeps the VMM's policy: a ``Vmm``
(Cloud Hypervisor's rules and states) whose ``Vm`` objects drive the VM
process over its control socket (``RemoteVmHandle``), and the HTTP API served
on the socket the VM process listens on. The VM process made and listens on
that socket, so connections to it name the VM process (SO_PEERCRED), and
``ch-remote``, ``vmkit remote`` and ``SpawnedVm`` talk to it as to any VMM.

The VM process shuts its VM down and exits when this program says so (the
``Vmm`` asked to exit: ``vmm.shutdown``, the guest powering off), on SIGTERM
or SIGINT, or when the control socket closes (this program is gone; it then
removes the spawn directory too).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import threading
import weakref

from vmkit import _reactor
from vmkit.vm import Vm, VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from vmkit._cgroups import CpuGroups
    from vmkit._forkserver import ForkedProcess, ForkServer
    from vmkit.api import ApiServer
    from vmkit.config import VmConfig
    from vmkit.registry import Registration
    from vmkit.vmm import Vmm

__all__ = ["RemoteVmHandle", "VmProcess"]

_MAX_MESSAGE = 1 << 20


class _Gone(VmError):
    def __init__(self, detail: str = "") -> None:
        super().__init__("The VM process is gone" + (f": {detail}" if detail else ""), "Stopped")


#: ``exit`` with status 0, as ``ControlChannel.exit`` sends it.
_ORDERLY_END = b'{"op": "exit", "code": 0}'


class ControlChannel:
    """Requests to a VM process, one at a time: ``call`` returns the answer
    (and a descriptor it carried) or raises the VM's VmError."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._lock = threading.Lock()
        self._end_said = False
        #: what ``_say_orderly_end`` sends (see ``remove_at_end``)
        self._orderly_end = _ORDERLY_END

    def fileno(self) -> int:
        return self._socket.fileno()

    def call(self, op: str, attach: Sequence[int] = (), **fields: Any) -> tuple[Any, int | None]:
        """``attach``: descriptors that go with the request (SCM_RIGHTS)."""
        message = json.dumps({"op": op, **fields}).encode()
        with self._lock:
            try:
                if attach:
                    socket.send_fds(self._socket, [message], list(attach))
                else:
                    self._socket.send(message)
                data, fds, _flags, _address = socket.recv_fds(self._socket, _MAX_MESSAGE, 1)
            except TimeoutError:
                # Its late answer would be taken for the next request's: a VM
                # process that does not answer is closed (it then exits).
                timeout = self._socket.gettimeout()
                self._socket.shutdown(socket.SHUT_RDWR)
                raise _Gone(f"it did not answer {op!r} within {timeout} s") from None
            except OSError as e:
                raise _Gone(str(e)) from None
        if not data:
            for received in fds:
                os.close(received)
            raise _Gone()
        reply = json.loads(data)
        fd = fds[0] if fds else None
        if "error" in reply:
            if fd is not None:
                os.close(fd)
            error = reply["error"]
            raise VmError(str(error["message"]), str(error["kind"]))
        return reply["ok"], fd

    def value(self, op: str, **fields: Any) -> Any:
        return self.call(op, **fields)[0]

    def exit(self, code: int) -> None:
        """Tells the VM process to end with status ``code`` (no answer comes)."""
        with self._lock:
            self._end_said = True
            try:
                self._socket.send(json.dumps({"op": "exit", "code": code}).encode())
            except OSError:
                pass  # gone already

    def hang_up(self) -> None:
        """Ends the channel for both sides at once, without waiting for a
        request in flight (it fails: the VM process is gone): the VM process
        starts shutting its VM down."""
        self._say_orderly_end()
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._say_orderly_end()
            self._socket.close()

    def remove_at_end(self, file: str) -> None:
        """Has the VM process remove ``file`` (its registry entry) as it ends
        in order (``hang_up``, ``close``): a fleet's processes remove theirs
        in parallel, not one after another here."""
        self._orderly_end = json.dumps({"op": "exit", "code": 0, "remove_file": file}).encode()

    def _say_orderly_end(self) -> None:
        """Tells the VM process, once and without waiting, that this program
        ends it. A control socket that just closes means this program died:
        the VM process then removes its directory itself, with the serial
        output and log that this program reads after the exit."""
        if self._end_said:
            return  # said by hang_up or exit, which close follows
        self._end_said = True
        with contextlib.suppress(OSError):
            self._socket.send(self._orderly_end, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


class RemoteVmHandle:
    """``_native.VmHandle``'s interface, carried out in a VM process.

    Waits happen here, on the VM's exit eventfd (received with ``new``), so
    that the VM process answers every request at once. The serial capture
    stays in the VM process: a spawned VM's serial output goes to its file.
    """

    def __init__(
        self,
        channel: ControlChannel,
        config: VmConfig,
        watchdog_timeout: float | None,
        lock_disks: bool,
        seccomp: str,
        cpu_groups_of: int | None = None,
    ) -> None:
        """``cpu_groups_of``: the VM process's pid, to give the VM CPU groups
        (``Vm``'s ``cpu_groups``), made here and removed when the VM is closed."""
        self._channel = channel
        self._cpu_groups: CpuGroups | None = None
        self._state_during_long_call: str | None = None
        # Validation errors as Vm(config) raises them, from Rust in this process.
        config.validate()
        if cpu_groups_of is not None:
            from vmkit._cgroups import CpuGroups

            self._cpu_groups = CpuGroups.create(cpu_groups_of, config.cpus.boot_vcpus)
        try:
            _ok, fd = channel.call(
                "new",
                attach=() if self._cpu_groups is None else self._cpu_groups.files(),
                config=config.to_dict(),
                watchdog_timeout=watchdog_timeout,
                lock_disks=lock_disks,
                seccomp=seccomp,
                thread_groups=self._cpu_groups is not None,
            )
        except BaseException:
            self.remove_cpu_groups()
            raise
        if self._cpu_groups is not None:
            self._cpu_groups.close_files()
        self._attach(fd)

    @classmethod
    def restored(
        cls,
        channel: ControlChannel,
        path: str | os.PathLike[str],
        prefault: bool,
        watchdog_timeout: float | None,
        lock_disks: bool,
        seccomp: str,
        *,
        op: str = "restore",
        disks: Mapping[str, str] | None = None,
    ) -> tuple[RemoteVmHandle, VmConfig]:
        """The VM process's VM from the snapshot directory ``path`` (Paused;
        ``disks``: a clone's own images by disk id), or
        (``op="receive_migration"``) migrated to the unix socket ``path``
        (Running), and its config."""
        from vmkit.config import VmConfig

        config_dict, fd = channel.call(
            op,
            path=os.fspath(path),
            prefault=prefault,
            watchdog_timeout=watchdog_timeout,
            lock_disks=lock_disks,
            seccomp=seccomp,
            disks=dict(disks or {}),
        )
        handle = cls.__new__(cls)
        handle._channel = channel
        handle._cpu_groups = None
        handle._state_during_long_call = None
        handle._attach(fd)
        return handle, VmConfig.from_dict(config_dict)

    def _attach(self, exit_fd: int | None) -> None:
        """Takes the VM process's answer to ``new`` or ``restore``: its VM's exit eventfd."""
        if exit_fd is None:
            self.remove_cpu_groups()
            raise VmError("The VM process sent no exit descriptor", "Device")
        self._exit_fd = exit_fd
        self._events_fd = -1
        self.iommu: bool = bool(self._channel.value("iommu"))
        self._closed = False

    def remove_cpu_groups(self) -> None:
        groups, self._cpu_groups = self._cpu_groups, None
        if groups is not None:
            groups.remove()

    def __del__(self) -> None:
        self.remove_cpu_groups()
        for name in ("_exit_fd", "_events_fd"):
            fd = getattr(self, name, -1)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)

    @property
    def exit_fd(self) -> int:
        return self._exit_fd

    @property
    def device_events_fd(self) -> int:
        if self._events_fd < 0:
            _ok, fd = self._channel.call("device_events_fd")
            if fd is None:
                raise VmError("The VM process sent no device event descriptor", "Device")
            self._events_fd = fd
        return self._events_fd

    def boot(self) -> None:
        self._channel.call("boot")

    def pause(self) -> None:
        self._channel.call("pause")

    def snapshot(self, path: str | os.PathLike[str]) -> None:
        self._long_call("snapshot", path=os.fspath(path))

    def send_migration(
        self, path: str | os.PathLike[str], local: bool
    ) -> tuple[float, float, int, int]:
        total, downtime, rounds, sent = self._long_call(
            "send_migration", path=os.fspath(path), local=local
        )
        return float(total), float(downtime), int(rounds), int(sent)

    def _long_call(self, op: str, **fields: Any) -> Any:
        """``op``, which holds the channel for as long as it takes (a snapshot,
        a migration's send): meanwhile ``state`` answers the state it began
        in (the VM runs on, or stays paused) instead of waiting."""
        self._state_during_long_call = self.state
        try:
            return self._channel.value(op, **fields)
        finally:
            self._state_during_long_call = None

    def resume(self) -> None:
        self._channel.call("resume")

    def shutdown(self) -> None:
        try:
            self._channel.call("shutdown")
        except _Gone:
            pass  # the process ended, and its VM with it: stopped either way

    def reboot(self) -> None:
        self._channel.call("reboot")

    def power_button(self) -> None:
        self._channel.call("power_button")

    def resize_vcpus(self, vcpus: int) -> None:
        self._channel.call("resize_vcpus", vcpus=vcpus)

    def resize_memory(self, bytes: int) -> None:
        self._channel.call("resize_memory", bytes=bytes)

    def add_device(self, config: VmConfig, field: str) -> tuple[str, str]:
        # A new net device's tap descriptors go along: the VM process has its own numbers.
        nets = (config.net or []) if field == "net" else []
        attach = list(nets[-1].fds or []) if nets else []
        answer, _fd = self._channel.call(
            "add_device", attach=attach, config=config.to_dict(), field=field
        )
        id, bdf = answer
        return str(id), str(bdf)

    def remove_device(self, id: str) -> None:
        self._channel.call("remove_device", id=id)

    def resize_balloon(self, bytes: int) -> None:
        self._channel.call("resize_balloon", bytes=bytes)

    def resize_zone(self, zone: str, bytes: int) -> None:
        self._channel.call("resize_zone", zone=zone, bytes=bytes)

    def device_events(self, since: int) -> tuple[list[tuple[str, str, list[tuple[str, str]]]], int]:
        """As the native handle's: ([(source, event, [(key, value)])], next index)."""
        try:
            events, next_index = self._channel.value("device_events", since=since)
        except _Gone:
            return [], since
        return [
            (str(source), str(event), [(str(k), str(v)) for k, v in properties])
            for source, event, properties in events
        ], int(next_index)

    def detach(self) -> None:
        """Forgets the VM process's VM, which another replaced: ``close`` then
        sends nothing."""
        self._closed = True
        self.remove_cpu_groups()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._channel.call("close")
            if self._cpu_groups is not None:
                # Once released, the VM has no thread left to move out of its groups.
                self._channel.call("release")
        except _Gone:
            pass  # the process took its VM with it
        finally:
            self.remove_cpu_groups()

    def release(self) -> None:
        try:
            self._channel.call("release")
        except _Gone:
            pass

    def wait(self, timeout: float | None = None) -> tuple[str, str] | None:
        poller = select.poll()
        poller.register(self._exit_fd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return None
        try:
            result = self._channel.value("wait")
        except _Gone as e:
            return ("vmm-error", str(e))
        return None if result is None else (str(result[0]), str(result[1]))

    @property
    def state(self) -> str:
        during = self._state_during_long_call
        if during is not None:
            return during
        try:
            return str(self._channel.value("state"))
        except _Gone:
            return "Shutdown"

    def serial_read(self, offset: int) -> tuple[int, bytes]:
        raise VmError(
            "A spawned VM's serial output is in its file (SpawnedVm.serial)", "Unsupported"
        )

    def serial_wait(self, offset: int, timeout: float) -> bool:
        return False

    def debug_port_writes(self) -> list[tuple[int, float, float]]:
        writes = self._channel.value("debug_port_writes")
        return [(int(v), float(s), float(m)) for v, s, m in writes]

    def runtime_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._channel.value("runtime_info")
        return info

    def live_config(self) -> VmConfig | None:
        from vmkit.config import VmConfig

        data = self._channel.value("live_config")
        return None if data is None else VmConfig.from_dict(data)

    def counters(self) -> dict[str, dict[str, int]]:
        counters: dict[str, dict[str, int]] = self._channel.value("counters")
        return counters


class VmProcess:
    """This program's side of one VM process: the control channel, the
    ``Vmm`` whose VMs run there, and the HTTP API on its socket. The shared
    reactor ends the process when the ``Vmm`` asks to exit, and closes this
    side when the process ends by itself."""

    def __init__(
        self,
        server: ForkServer,
        *,
        api_socket: str,
        spawn_dir: str | None,
        log: int,
        verbosity: int,
        seccomp: str,
        timeout: float,
        request_timeout: float | None = None,
        cpu_groups: bool = False,
    ) -> None:
        from vmkit._forkserver import ForkedProcess
        from vmkit.api import ApiServer
        from vmkit.vmm import Vmm

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = server.fork_vm(theirs.fileno(), log, api_socket, spawn_dir, verbosity, seccomp)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.process: ForkedProcess = ForkedProcess(pid, ["vmkit", "--api-socket", api_socket])
        try:
            ours.settimeout(timeout)
            data, fds, flags, _address = socket.recv_fds(ours, _MAX_MESSAGE, 1)
            ours.settimeout(request_timeout)
        except OSError as e:
            ours.close()
            self.process.kill()
            self.process.wait()
            raise VmError(f"The VM process did not start in {timeout} s: {e}", "Spawn") from e
        reply = json.loads(data) if data else {}
        if "ready" not in reply or not fds:
            for fd in fds:
                os.close(fd)
            ours.close()
            if flags & socket.MSG_CTRUNC:
                # The listening socket came, but no descriptor was free here for it.
                self.process.kill()
                self.process.wait()
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            status = self.process.wait()
            detail = reply.get("error") or f"it exited with status {status}"
            raise VmError(f"The VM process did not start: {detail}", "Spawn")
        self.channel = ControlChannel(ours)
        #: the latest VM's handle (while it lives), whose CPU groups go when the process does.
        self._handle: weakref.ref[RemoteVmHandle] | None = None
        #: its entry in the registry (``vmkit ls``), removed when it ends
        self.registration: Registration | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._ending: threading.Thread | None = None
        self._watched: tuple[int, ...] = ()
        vmm: Vmm | None = None
        api_server: ApiServer | None = None
        try:
            vmm = self.vmm = Vmm(
                seccomp=seccomp,
                cpu_groups=cpu_groups,
                vm_factory=self._new_vm,
                vm_restorer=self._restore_vm,
                vm_receiver=self._receive_vm,
                pid=pid,
            )
            api_server = self.server = ApiServer(vmm, fd=fds[0], reactor=_reactor.shared())
            api_server.start()
            # The shared reactor waits for the process to end (its control socket
            # hangs up) or the Vmm to ask to exit: no thread of its own per VM.
            reactor = _reactor.shared()
            self._watched = (vmm.exit_fd(), self.channel.fileno())
            with reactor.held():
                reactor.add(self._watched[0], select.EPOLLIN, self._ended)
                reactor.add(self._watched[1], 0, self._ended)
        except BaseException:
            # Out of descriptors, say: nothing of this VM process stays.
            self._forget()
            if api_server is not None:
                api_server.close()
            else:
                os.close(fds[0])
            if vmm is not None:
                vmm.close(vm_gone=True)
            self.channel.close()
            self.process.kill()
            self.process.wait()
            raise

    def _new_vm(
        self,
        config: VmConfig,
        watchdog_timeout: float | None,
        lock_disks: bool,
        seccomp: str,
        cpu_groups: bool,
    ) -> Vm:
        handle = RemoteVmHandle(
            self.channel,
            config,
            watchdog_timeout,
            lock_disks,
            seccomp,
            cpu_groups_of=self.process.pid if cpu_groups else None,
        )
        self._handle = weakref.ref(handle)
        return Vm._adopt(config, handle)

    def _restore_vm(
        self,
        path: str,
        prefault: bool,
        watchdog_timeout: float | None,
        lock_disks: bool,
        seccomp: str,
        disks: Mapping[str, str],
    ) -> Vm:
        handle, config = RemoteVmHandle.restored(
            self.channel, path, prefault, watchdog_timeout, lock_disks, seccomp, disks=disks
        )
        self._handle = weakref.ref(handle)
        return Vm._adopt(config, handle)

    def _receive_vm(
        self, path: str, watchdog_timeout: float | None, lock_disks: bool, seccomp: str
    ) -> Vm:
        handle, config = RemoteVmHandle.restored(
            self.channel, path, False, watchdog_timeout, lock_disks, seccomp,
            op="receive_migration",
        )  # fmt: skip
        # The process dropped the VM it had: requests through the old handle
        # would reach the new VM.
        old = self._handle() if self._handle is not None else None
        if old is not None:
            old.detach()
        self._handle = weakref.ref(handle)
        return Vm._adopt(config, handle)

    def _forget(self) -> None:
        """After this, the descriptors may close: no event of theirs reaches
        ``_ended`` any more."""
        reactor = _reactor.shared()
        for fd in self._watched:
            reactor.remove(fd)

    def _ended(self, _fd: int) -> None:
        """On the reactor's thread: the Vmm asked to exit, or the process
        ended. Closes this side on a thread of its own (it may block)."""
        self._forget()
        self._ending = threading.Thread(
            target=lambda: self._close(self.vmm.wait_exit(0)),
            name=f"vm-process-{self.process.pid}",
            daemon=True,
        )
        self._ending.start()

    def _close(self, code: int | None) -> None:
        # Held throughout: a second caller returns once everything is closed.
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._forget()
            if code is not None:
                # Else the VM process removes its entry as it ends (what
                # is left is removed after the exit: ``remove_registration``).
                self.remove_registration()
            self.server.close()
            if code is None:
                # Not the Vmm's own exit: the VM process shuts its VM down and
                # exits as its control socket closes, which ends every request.
                self.vmm.close(vm_gone=True)
                self.channel.close()
            else:
                self.vmm.close()
                self.channel.exit(code)
                self.channel.close()
            handle = self._handle() if self._handle is not None else None
            if handle is not None:
                handle.remove_cpu_groups()

    def registered(self, registration: Registration) -> None:
        """Keeps the VM process's registry entry (``vmkit ls``), which the
        process removes as it ends in order; ``remove_registration`` after
        its exit removes it if it did not."""
        self.registration = registration
        self.channel.remove_at_end(registration.path)

    def remove_registration(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.remove()

    def hang_up(self) -> None:
        """Tells the VM process to end (its control socket closes) and
        returns; the caller's ``close`` then cleans up this side while it
        ends (the reactor no longer watches it: no thread per ending VM)."""
        with self._close_lock:
            if not self._closed:
                self._forget()
                self.vmm.stop_watching()
                self.channel.hang_up()

    def close(self) -> None:
        """Closes this side (the process, if still running, sees its control
        socket close and shuts its VM down); returns once its threads are gone."""
        self._close(None)
        ending = self._ending
        if ending is not None and ending is not threading.current_thread():
            ending.join()
