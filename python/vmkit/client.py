"""A client for Cloud Hypervisor v37's HTTP API, and VMMs in child processes.

``Client`` talks to any VMM that serves the v37 API on a unix socket
(``vmkit --api-socket PATH`` or ``cloud-hypervisor --api-socket PATH``)::

    >>> from vmkit import Client
    >>> client = Client("/tmp/vmm.sock")                     # doctest: +SKIP
    >>> client.create(config); client.boot()                 # doctest: +SKIP
    >>> client.info().state                                  # doctest: +SKIP
    'Running'

``spawn`` (also ``vmkit.Vm.spawn``) starts ``python -m vmkit --api-socket``
as a child process, creates the VM there and hands back a ``SpawnedVm``
with the in-process ``Vm``'s methods; leaving its ``with`` block always ends
the process and removes its socket and temporary directory::

    >>> with Vm.spawn(config) as vm:                         # doctest: +SKIP
    ...     vm.boot()
    ...     vm.serial.wait_for("login:", timeout=30)

Every call is one HTTP/1.1 request on a fresh connection, written as
ch-remote writes it. Errors: ``ApiError`` for an error status (``.status``
400, 404 or 500, the server's text as the message), ``ApiConnectionError``
(a subclass, ``.status`` None) when the socket cannot be reached or the
exchange breaks off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar

from vmkit import _apiwire, _forkserver, registry
from vmkit.config import (
    ConsoleConfig,
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
from vmkit.vm import Vm, VmError, VmExit, VmInfo

if TYPE_CHECKING:
    import queue

    from vmkit import _vmproc
    from vmkit.api import ApiServer

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "Client",
    "FileSerialConsole",
    "PciDeviceInfo",
    "SpawnedVm",
    "VmInfo",
    "VmmPingResponse",
    "close_all",
    "openapi_spec",
    "spawn",
]

_C = TypeVar("_C")


class _FreshProcess(subprocess.Popen[bytes]):
    """A VMM in a fresh interpreter (``spawn(fresh_interpreter=True)``).

    Its waits wake when it ends (a pidfd), as ``ForkedProcess``'s do:
    ``Popen.wait(timeout)`` polls with sleeps that double up to 50 ms, so it
    saw a stop or a power-off up to as late again as it had waited.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pidfd: int | None = None
        super().__init__(*args, **kwargs)
        with contextlib.suppress(OSError):  # Linux before 5.3: Popen's own waits
            self._pidfd = os.pidfd_open(self.pid)

    def exit_fd(self) -> int | None:
        """A new descriptor that becomes readable when the process ends (the
        caller closes it); None once it is reaped, or without pidfds."""
        pidfd = self._pidfd
        return None if pidfd is None or self.returncode is not None else os.dup(pidfd)

    def wait(self, timeout: float | None = None) -> int:
        pidfd = self._pidfd
        if timeout is not None and pidfd is not None and self.returncode is None:
            if not _forkserver.wait_ended(pidfd, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        returncode = super().wait(timeout)  # it has ended: reaped at once
        self._close_pidfd()
        return returncode

    def poll(self) -> int | None:
        returncode = super().poll()
        if returncode is not None:
            self._close_pidfd()
        return returncode

    def _close_pidfd(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def __del__(self) -> None:
        self._close_pidfd()
        super().__del__()


#: A spawned VMM's process: forked by the fork server, or a fresh interpreter.
VmmProcess = _forkserver.ForkedProcess | _FreshProcess

#: How long ``Client`` waits on the socket by default (seconds, per call).
DEFAULT_TIMEOUT = 60.0


class ApiError(VmError):
    """The VMM answered a request with an error status.

    ``status`` is the HTTP status (500 for every VMM error, 400 for a
    malformed request, 404 for an unknown path); the message is the
    server's text, e.g. ``invalid VM state transition: Running to Running``
    or ``VM is not created``. ``body`` is the raw body text ("" when none).
    ``kind`` is ``Api``.
    """

    def __init__(
        self, message: str, status: int | None, *, body: str = "", kind: str = "Api"
    ) -> None:
        super().__init__(message, kind)
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_api_error, (type(self), self.message, self.status, self.body, self.kind))


def _rebuild_api_error(
    cls: type[ApiError], message: str, status: int | None, body: str, kind: str
) -> ApiError:
    return cls(message, status, body=body, kind=kind)


class ApiConnectionError(ApiError):
    """The API socket could not be reached, or the exchange broke off.

    ``status`` is None and ``kind`` is ``Connection``; the message names the
    socket, e.g. ``Cannot connect to the VMM API socket /tmp/x.sock: No
    such file or directory (os error 2)``.
    """

    def __init__(self, message: str, status: int | None = None, *, body: str = "") -> None:
        super().__init__(message, status, body=body, kind="Connection")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.status), {"body": self.body})


@dataclass(frozen=True)
class VmmPingResponse:
    """``vmm.ping``: the VMM's version, process id and build features."""

    build_version: str
    version: str
    pid: int
    features: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmmPingResponse:
        return cls(
            build_version=str(data["build_version"]),
            version=str(data["version"]),
            pid=int(data["pid"]),
            features=tuple(str(f) for f in data.get("features") or ()),
        )


@dataclass(frozen=True)
class PciDeviceInfo:
    """What a hot-plug ``vm.add-*`` on a booted VM returns: the id and PCI address."""

    id: str
    bdf: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PciDeviceInfo:
        return cls(id=str(data["id"]), bdf=str(data["bdf"]))


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI description of the API as vmkit implements it (a JSON object)."""
    path = Path(__file__).with_name("openapi") / "cloud-hypervisor.json"
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def _compact(data: object) -> bytes:
    """JSON as serde_json writes it: no spaces, UTF-8, fields in order."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _size(value: int | str, what: str) -> int:
    if isinstance(value, str):
        try:
            return _apiwire.parse_byte_size(value)
        except ValueError as e:
            raise ValueError(f"Invalid {what} size {value!r}: {e}") from None
    return int(value)


def _as_config(value: _C | str, cls: type[_C]) -> _C:
    if isinstance(value, str):
        parsed: _C = cls.parse(value)  # type: ignore[attr-defined]
        return parsed
    return value


#: Requests after which a VM has run in the VMM (a guest may stop it at any time).
_RUNS_A_VM = frozenset({"vm.boot", "vm.restore", "vm.receive-migration"})


class _RunFlag:
    """Whether a VM has run in a spawned VMM. Its client sets it, so a VM
    booted or restored through ``SpawnedVm.client`` counts as well."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False


class Client:
    """A client for the Cloud Hypervisor v37 HTTP API served on ``api_socket``.

    ``timeout`` bounds each call (connecting, sending, waiting for the
    answer), in seconds; None waits forever. Methods raise ``ApiError`` for
    an error answer and ``ApiConnectionError`` when the VMM cannot be reached.
    """

    #: a spawned VM's: set by any request through this client that runs a VM
    _ran: _RunFlag | None = None

    def __init__(self, api_socket: str | Path, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.api_socket = Path(api_socket)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client({str(self.api_socket)!r})"

    @classmethod
    def for_vm(cls, name_or_pid: str | int, timeout: float | None = DEFAULT_TIMEOUT) -> Client:
        """A client for the running VM that vmkit started with this name or
        VMM pid (``vmkit ls`` lists them), which talks only to that VMM
        process (a socket someone else serves now is refused).

        Raises ``vmkit.registry.VmNotFound`` (a LookupError) when no running
        VM has that name or pid.
        """
        entry = registry.find(name_or_pid)
        return _ChildClient(entry.api_socket, entry.pid, timeout)

    # -- the transport ---------------------------------------------------------

    def request(
        self,
        method: str,
        endpoint: str,
        body: bytes | str | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> _apiwire.RawResponse:
        """Sends one request (``endpoint`` like ``vm.info``) and returns the raw answer.

        No status check: see ``call`` for that. ``fds`` are passed to the VMM
        with SCM_RIGHTS (``vm.add-net``).
        """
        data = body.encode() if isinstance(body, str) else body
        response = self._exchange(method, endpoint, data, fds)
        if self._ran is not None and response.ok and endpoint in _RUNS_A_VM:
            self._ran.value = True
        return response

    def _exchange(
        self, method: str, endpoint: str, data: bytes | None, fds: Sequence[int]
    ) -> _apiwire.RawResponse:
        """The transport: one connection to the socket per request."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(os.fspath(self.api_socket))
            except OSError as e:
                raise ApiConnectionError(
                    f"Cannot connect to the VMM API socket {self.api_socket}: "
                    f"{_apiwire.io_error_text(e)}"
                ) from None
            self._check_peer(sock)
            try:
                _apiwire.send_request(sock, method, endpoint, data, fds)
                return _apiwire.read_response(sock)
            except _apiwire.WireError as e:
                raise ApiConnectionError(
                    f"{method} {endpoint} on the VMM API socket {self.api_socket} failed: {e}"
                ) from None
        finally:
            sock.close()

    def _check_peer(self, sock: socket.socket) -> None:
        """Hook: refuse a connection before anything is sent (``_ChildClient``)."""

    def call(
        self,
        method: str,
        endpoint: str,
        body: bytes | str | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> bytes | None:
        """Sends one request; returns the body of a 2xx answer (None when it had none).

        Raises ApiError for any other status.
        """
        response = self.request(method, endpoint, body, fds=fds)
        if response.ok:
            return response.body
        text = (response.body or b"").decode(errors="replace")
        message = text or f"{response.status} {response.reason}".strip()
        raise ApiError(message, response.status, body=text)

    def _json(self, method: str, endpoint: str, body: bytes | None = None) -> Any:
        data = self.call(method, endpoint, body)
        if not data:
            raise ApiConnectionError(
                f"{method} {endpoint} on the VMM API socket {self.api_socket} "
                "answered without a body"
            )
        try:
            return json.loads(data)
        except ValueError as e:
            raise ApiConnectionError(
                f"{method} {endpoint} on the VMM API socket {self.api_socket} "
                f"answered with invalid JSON: {e}"
            ) from None

    def _put(self, endpoint: str, payload: object = None) -> None:
        self.call("PUT", endpoint, None if payload is None else _compact(payload))

    def _add(self, endpoint: str, config: Any, fds: Sequence[int] = ()) -> PciDeviceInfo | None:
        data = self.call("PUT", endpoint, _compact(config.to_dict()), fds=fds)
        if not data:
            return None
        try:
            return PciDeviceInfo.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError) as e:
            raise ApiConnectionError(
                f"PUT {endpoint} on the VMM API socket {self.api_socket} "
                f"answered with an invalid PciDeviceInfo: {e}"
            ) from None

    # -- the VMM ---------------------------------------------------------------

    def ping(self) -> VmmPingResponse:
        """``vmm.ping``: the VMM's version and process id."""
        return VmmPingResponse.from_dict(self._json("GET", "vmm.ping"))

    def shutdown_vmm(self) -> None:
        """``vmm.shutdown``: deletes the VM, then the VMM process exits."""
        self.call("PUT", "vmm.shutdown")

    # -- the VM's life -----------------------------------------------------------

    def create(self, config: VmConfig | Mapping[str, Any] | str) -> None:
        """``vm.create``: stores a config (a VmConfig, a JSON object or JSON text).

        The VMM does not validate it until ``boot``.
        """
        if isinstance(config, VmConfig):
            body = _compact(config.to_dict())
        elif isinstance(config, str):
            body = config.encode()
        else:
            body = _compact(dict(config))
        self.call("PUT", "vm.create", body)

    def boot(self) -> None:
        """``vm.boot``: validates the config, builds the VM and starts it (resumes a Paused VM)."""
        self._put("vm.boot")

    def shutdown(self) -> None:
        """``vm.shutdown``: stops the VM; the config stays (state ``Created``)."""
        self._put("vm.shutdown")

    def reboot(self) -> None:
        """``vm.reboot``: a shutdown and a fresh boot."""
        self._put("vm.reboot")

    def pause(self) -> None:
        """``vm.pause``: Running → Paused."""
        self._put("vm.pause")

    def resume(self) -> None:
        """``vm.resume``: Paused → Running."""
        self._put("vm.resume")

    def power_button(self) -> None:
        """``vm.power-button``: presses the guest's ACPI power button."""
        self._put("vm.power-button")

    def delete(self) -> None:
        """``vm.delete``: shuts the VM down if one runs and forgets the config."""
        self._put("vm.delete")

    def info(self) -> VmInfo:
        """``vm.info``: the live config, state, memory size and device tree."""
        data = self._json("GET", "vm.info")
        try:
            return VmInfo.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ApiConnectionError(
                f"GET vm.info on the VMM API socket {self.api_socket} "
                f"answered with an invalid VmInfo: {e}"
            ) from None

    def counters(self) -> dict[str, dict[str, int]]:
        """``vm.counters``: ``{device id: {counter: value}}``."""
        data: dict[str, dict[str, int]] = self._json("GET", "vm.counters")
        return data

    # -- sizes ---------------------------------------------------------------------

    def resize(
        self,
        *,
        cpus: int | None = None,
        memory: int | str | None = None,
        balloon: int | str | None = None,
    ) -> None:
        """``vm.resize``: new vCPU count, memory size or balloon size (bytes or ``"2G"``)."""
        self._put(
            "vm.resize",
            {
                "desired_vcpus": cpus,
                "desired_ram": None if memory is None else _size(memory, "memory"),
                "desired_balloon": None if balloon is None else _size(balloon, "balloon"),
            },
        )

    def resize_zone(self, id: str, size: int | str) -> None:
        """``vm.resize-zone``: a new size for the memory zone ``id`` (bytes or ``"1G"``)."""
        self._put("vm.resize-zone", {"id": id, "desired_ram": _size(size, "memory zone")})

    # -- devices --------------------------------------------------------------------
    # Each add_* takes the config object or its option string (parsed as the CLI
    # does). On a booted VM the device is hot-plugged and its PciDeviceInfo
    # returned; before the first boot it joins the config and None is returned.

    def add_device(self, config: DeviceConfig | str) -> PciDeviceInfo | None:
        """``vm.add-device``: a VFIO device."""
        return self._add("vm.add-device", _as_config(config, DeviceConfig))

    def add_user_device(self, config: UserDeviceConfig | str) -> PciDeviceInfo | None:
        """``vm.add-user-device``: a vfio-user device."""
        return self._add("vm.add-user-device", _as_config(config, UserDeviceConfig))

    def add_disk(self, config: DiskConfig | str) -> PciDeviceInfo | None:
        """``vm.add-disk``: a virtio-blk device."""
        return self._add("vm.add-disk", _as_config(config, DiskConfig))

    def add_fs(self, config: FsConfig | str) -> PciDeviceInfo | None:
        """``vm.add-fs``: a virtio-fs device."""
        return self._add("vm.add-fs", _as_config(config, FsConfig))

    def add_pmem(self, config: PmemConfig | str) -> PciDeviceInfo | None:
        """``vm.add-pmem``: a virtio-pmem device."""
        return self._add("vm.add-pmem", _as_config(config, PmemConfig))

    def add_net(
        self, config: NetConfig | str, fds: Sequence[int] | None = None
    ) -> PciDeviceInfo | None:
        """``vm.add-net``: a virtio-net device.

        Tap file descriptors (``fds``, else the config's ``fds``) are passed to
        the VMM with SCM_RIGHTS and left out of the JSON, as ch-remote does.
        """
        net = _as_config(config, NetConfig)
        send = list(fds) if fds is not None else list(net.fds or ())
        net = dataclasses.replace(net, fds=None)
        return self._add("vm.add-net", net, send)

    def add_vdpa(self, config: VdpaConfig | str) -> PciDeviceInfo | None:
        """``vm.add-vdpa``: a vDPA device."""
        return self._add("vm.add-vdpa", _as_config(config, VdpaConfig))

    def add_vsock(self, config: VsockConfig | str) -> PciDeviceInfo | None:
        """``vm.add-vsock``: a virtio-vsock device."""
        return self._add("vm.add-vsock", _as_config(config, VsockConfig))

    def remove_device(self, id: str) -> None:
        """``vm.remove-device``: unplugs (or, before boot, drops) the device ``id``."""
        self._put("vm.remove-device", {"id": id})

    # -- snapshots and migration ------------------------------------------------------

    def snapshot(self, destination_url: str) -> None:
        """``vm.snapshot``: snapshots a Paused VM to ``destination_url``."""
        self._put("vm.snapshot", {"destination_url": destination_url})

    def restore(
        self, config: RestoreConfig | str, disks: Mapping[str, str | os.PathLike[str]] | None = None
    ) -> None:
        """``vm.restore``: ``RestoreConfig`` or its option string ``source_url=...``.
        ``disks``: the clone's own images by disk id (see ``Vm.restore``), a
        field only vmkit reads (Cloud Hypervisor ignores it)."""
        body = _as_config(config, RestoreConfig).to_dict()
        if disks:
            body["disks"] = {id: os.path.abspath(image) for id, image in disks.items()}
        self._put("vm.restore", body)

    def coredump(self, destination_url: str) -> None:
        """``vm.coredump``: writes a guest core dump."""
        self._put("vm.coredump", {"destination_url": destination_url})

    def send_migration(self, destination_url: str, *, local: bool = False) -> None:
        """``vm.send-migration``."""
        self._put("vm.send-migration", {"destination_url": destination_url, "local": local})

    def receive_migration(self, receiver_url: str) -> None:
        """``vm.receive-migration``."""
        self._put("vm.receive-migration", {"receiver_url": receiver_url})


# ---------------------------------------------------------------------------
# VMMs in child processes
# ---------------------------------------------------------------------------


def _read_regular_file(path: Path, offset: int) -> bytes:
    """``path``'s bytes from ``offset``; nothing if it is missing or not a
    regular file: the serial port may go to a FIFO or a device, and reading
    one back would block, or take what a reader there waits for."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        f.seek(offset)
        return f.read()


#: How long a VMM whose guest stopped the VM gets to exit before ``wait``
#: calls the stop a shutdown (another API client's ``vm.shutdown``).
_EXIT_AFTER_POWEROFF = 1.0

#: How often a file is polled for new output: soon after output came, then
#: less often (a file gives no wake-up; a line is seen within ~1 ms while
#: the guest prints, within 20 ms after a quiet spell).
_FIRST_PAUSE = 0.001
_LONGEST_PAUSE = 0.02


class FileSerialConsole:
    """A spawned VM's serial output, read from the file the VMM writes.

    The same interface as ``vmkit.vm.SerialConsole``: ``read()``, ``text``
    and ``wait_for``, which consumes output line by line. After the
    SpawnedVm is closed the output read so far stays readable.
    """

    def __init__(self, path: Path | None, stopped: Callable[[], str | None]) -> None:
        self.path = path
        self._stopped = stopped
        self._cursor = 0
        self._frozen: bytes | None = None

    def read(self) -> bytes:
        """Everything the guest has printed so far."""
        if self._frozen is not None:
            return self._frozen
        if self.path is None:
            return b""
        return _read_regular_file(self.path, 0)

    def _read_from(self, offset: int) -> bytes:
        if self._frozen is not None or self.path is None:
            return self.read()[offset:]
        return _read_regular_file(self.path, offset)

    @property
    def text(self) -> str:
        """``read()`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.read().decode(errors="replace")

    def _freeze(self) -> None:
        if self._frozen is None:
            self._frozen = self.read()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Waits for a whole output line matching ``pattern`` (``re.search``).

        Raises TimeoutError when no line matches in time, and VmError (kind
        ``Stopped``) when the VM stops first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        if self.path is None:
            raise VmError("The serial output of this VM is not captured", "Unsupported")
        deadline = time.monotonic() + timeout
        pause = _FIRST_PAUSE
        while True:
            data = self._read_from(self._cursor)
            if data:
                pause = _FIRST_PAUSE  # output is coming: look again soon
            consumed = 0
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                consumed += len(line)
                match = regex.search(line.rstrip(b"\r\n").decode(errors="replace"))
                if match:
                    self._cursor += consumed
                    return match
            self._cursor += consumed
            why = self._stopped()
            if why is not None:
                # Output written just before the stop is still worth a last look.
                if len(self._read_from(self._cursor)) > len(data) - consumed:
                    continue
                raise VmError(
                    f"The VM stopped before printing a line matching {regex.pattern!r}: {why}",
                    "Stopped",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"No serial line matched {regex.pattern!r} within {timeout} s")
            time.sleep(min(remaining, pause))
            pause = min(pause * 2, _LONGEST_PAUSE)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the VMM process was killed by {name}"
    return f"the VMM process exited with status {returncode}"


class _ChildClient(Client):
    """A client that talks only to the VMM process ``pid``.

    Before each request it asks the kernel who listens on the other end
    (SO_PEERCRED): a path may name another VMM's socket (given by the
    caller, or put there since), and that VMM is not ours to drive or end.
    """

    def __init__(self, api_socket: str | Path, pid: int, timeout: float | None) -> None:
        super().__init__(api_socket, timeout)
        self.pid = pid

    def _check_peer(self, sock: socket.socket) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid = struct.unpack("3i", creds)[0]
        if peer_pid != self.pid:
            raise ApiConnectionError(
                f"The VMM API socket {self.api_socket} is served by process {peer_pid}, "
                f"not by the VMM process {self.pid} that vmkit started"
            )


def close_all(vms: Iterable[SpawnedVm | Vm]) -> None:
    """Closes every VM in ``vms``, as ``close()`` does each, in less time
    than one after the other: every spawned VM's process is told to end
    first, this program's side of each is closed while they end, and each
    is reaped and cleaned up as its process ends (a fleet's processes end in
    parallel). In-process VMs are closed in turn. Raises the first error
    once every VM has been closed."""
    vms = list(vms)
    spawned = [vm for vm in vms if isinstance(vm, SpawnedVm)]
    errors: list[BaseException] = []

    def each(vms: Iterable[SpawnedVm | Vm], step: Callable[[Any], None]) -> None:
        for vm in vms:
            try:
                step(vm)
            except Exception as e:  # still close it (and the others) below
                errors.append(e)

    each(spawned, SpawnedVm._begin_close)
    each(spawned, SpawnedVm._close_this_side)
    remover = _DirectoryRemover(errors)
    try:
        each(_in_exit_order(spawned), lambda vm: vm._close(remover.remove))
    finally:
        remover.join()
    each([vm for vm in vms if not isinstance(vm, SpawnedVm)], Vm.close)
    if errors:
        raise errors[0]


class _DirectoryRemover:
    """Removes spawn directories on a thread of its own, in the order given:
    where the temporary directory is on disk (ext4), each removal blocks
    for ~0.2 ms, which then overlaps the next VM's close instead of adding
    to it. ``join`` returns once all are gone; errors go to ``errors``."""

    def __init__(self, errors: list[BaseException]) -> None:
        import queue

        self._errors = errors
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def remove(self, tmpdir: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vmkit-remove-dirs", daemon=True)
            self._thread.start()
        self._queue.put(tmpdir)

    def _run(self) -> None:
        while (tmpdir := self._queue.get()) is not None:
            try:
                _remove_spawn_dir(tmpdir)
            except Exception as e:  # raised by close_all once every VM is closed
                self._errors.append(e)

    def join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


def _in_exit_order(vms: list[SpawnedVm]) -> Iterator[SpawnedVm]:
    """``vms`` as their processes end; those that cannot be waited for so
    (no pidfd, or none has ended within their stop timeout) in turn last."""
    waiting: dict[int, SpawnedVm] = {}
    rest: list[SpawnedVm] = []
    for vm in vms:
        process = vm.process
        fd = process.exit_fd()
        if fd is None:
            rest.append(vm)
        else:
            waiting[fd] = vm
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    try:
        while waiting:
            timeout = max(vm._stop_timeout for vm in waiting.values())
            ready = poller.poll(int(timeout * 1000))
            if not ready:
                break  # close() below signals and waits for each in turn
            for fd, _events in ready:
                poller.unregister(fd)
                os.close(fd)
                yield waiting.pop(fd)
    finally:
        for fd in waiting:
            os.close(fd)
    yield from waiting.values()
    yield from rest


class _LocalClient(Client):
    """The spawning program's client for a VM process whose API this program
    serves (``Vm.spawn``): each request goes to that server's router here, as
    a connection's would, without connecting to itself (no accept, thread or
    HTTP framing per request). Other programs use the socket. ``timeout`` is
    not applied: a request takes as long as the VMM's work."""

    def __init__(self, server: ApiServer, api_socket: str | Path, process: VmmProcess) -> None:
        super().__init__(api_socket, None)
        self._server = server
        self._process = process
        self.pid = process.pid

    def _exchange(
        self, method: str, endpoint: str, data: bytes | None, fds: Sequence[int]
    ) -> _apiwire.RawResponse:
        from vmkit.api import answer_here

        if self._server.closing or self._process.poll() is not None:
            raise ApiConnectionError(
                f"Cannot connect to the VMM API socket {self.api_socket}: the VMM has exited"
            )
        return answer_here(self._server, method, endpoint, data, fds)


def _socket_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the socket file at ``path``, or None."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def _stop_process(process: VmmProcess, timeout: float) -> None:
    """Ends the VMM process: SIGTERM, then SIGKILL.

    On SIGTERM the VMM does what ``vmm.shutdown`` makes it do (shuts the VM
    down, flushes its output, removes its socket, exits) without an HTTP
    exchange on either side; the signal reaches that process only (a pidfd
    for forked VMMs).
    """
    if process.poll() is not None:
        return
    for step in (process.terminate, process.kill):
        with contextlib.suppress(ProcessLookupError):
            step()
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _close_vm_process(vm_process: _vmproc.VmProcess, timeout: float) -> None:
    """Closes this side of a VM process, which then shuts its VM down and
    exits (``_stop_process`` signals it only if it has not in ``timeout``)."""
    vm_process.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        vm_process.process.wait(timeout)


def _end_process(
    process: VmmProcess,
    api_socket: Path,
    tmpdir: Path | None,
    timeout: float,
    lifeline: int | None = None,
    owned: list[tuple[int, int]] | None = None,
    vm_process: _vmproc.VmProcess | None = None,
    remove_dir: Callable[[Path], None] | None = None,
    keep_output: Callable[[], None] | None = None,
) -> None:
    """Ends the VMM process (see ``_stop_process``) and removes its files.

    The socket file goes only if it is the one the child was seen serving
    on (its identity is in ``owned``): a path vmkit did not create stays.
    ``remove_dir`` removes ``tmpdir`` (``_remove_spawn_dir`` if None);
    ``keep_output`` runs once the process has ended, before that.
    """
    try:
        if vm_process is not None:
            _close_vm_process(vm_process, timeout)
        _stop_process(process, timeout)
        if keep_output is not None:
            keep_output()
    finally:
        if vm_process is not None:
            vm_process.remove_registration()  # if the process did not
        if lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(lifeline)
        with contextlib.suppress(OSError):
            if owned and _socket_identity(api_socket) == owned[0]:
                api_socket.unlink()
        if tmpdir is not None:
            (remove_dir or _remove_spawn_dir)(tmpdir)


def _remove_unserved_socket(path: Path) -> None:
    """Removes the socket a VM process that failed to start made at ``path``
    (``spawn`` refuses a path that exists: a socket there now is its)."""
    if _socket_identity(path) is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_spawn_dir(tmpdir: Path) -> None:
    """Removes the directory ``spawn`` made: its known files, then itself
    (a directory walk only when something else is in it)."""
    if not registry.remove_spawn_dir(str(tmpdir)):
        shutil.rmtree(tmpdir, ignore_errors=True)


class SpawnedVm:
    """A VM in a VMM child process (see ``spawn``).

    Made by ``spawn`` / ``Vm.spawn``. It has the in-process ``Vm``'s methods
    (boot, pause, resume, shutdown, reboot, power_button, wait, state, info,
    counters, the hot-plug add_* and remove_device, close) carried out through
    the HTTP API (``client``), plus
    ``serial`` (a ``FileSerialConsole``), ``process``, ``pid`` and
    ``api_socket``. ``info()`` returns a ``VmInfo``.

    ``close()`` (and leaving the ``with`` block) always ends the process:
    a VM process shuts its VM down and exits as this program closes its
    control socket, a Python VMM on SIGTERM (as on ``vmm.shutdown``); SIGTERM,
    then SIGKILL, each after ``stop_timeout`` seconds without an exit; then
    removes the socket and the temporary directory. The same happens if the
    object is garbage-collected or at interpreter exit.
    """

    def __init__(
        self,
        process: VmmProcess,
        client: Client,
        tmpdir: Path | None,
        serial_path: Path | None,
        log_path: Path | None,
        stop_timeout: float,
        lifeline: int | None = None,
        vm_process: _vmproc.VmProcess | None = None,
    ) -> None:
        self.process = process
        self.client = client
        self.api_socket = client.api_socket
        #: the VM's name in ``vmkit ls`` (``vmkit remote NAME``)
        self.name = registry.default_name(process.pid)
        self.tmpdir = tmpdir
        self.log_path = log_path
        self._ran = client._ran = _RunFlag()
        self._stop_asked = False  # shutdown() or delete through this object
        self._state_checked = 0.0
        self._stop_timeout = stop_timeout
        self._log_text: str | None = None
        self.serial = FileSerialConsole(serial_path, self._stopped_reason)
        #: the socket file's identity once the child is seen serving on it (then it is ours)
        self._owned_socket: list[tuple[int, int]] = []
        self._vm_process = vm_process
        # What ends the process and removes its files: on close, or once this
        # object is garbage-collected or at interpreter exit.
        self._end_args = (
            process,
            client.api_socket,
            tmpdir,
            stop_timeout,
            lifeline,
            self._owned_socket,
            vm_process,
        )
        self._finalizer = weakref.finalize(self, _end_process, *self._end_args)

    @property
    def pid(self) -> int:
        """The VMM process id."""
        return self.process.pid

    def __repr__(self) -> str:
        return f"<SpawnedVm name={self.name!r} pid={self.pid} api_socket={str(self.api_socket)!r}>"

    def _current_state(self) -> str:
        """``vm.info``'s state; a VM process's (whose API this program serves)
        without waiting for a request in progress: a migration's send or a
        snapshot holds the API for as long as it takes."""
        vm_process = self._vm_process
        if vm_process is not None and not vm_process.server.closing:
            state = vm_process.vmm.current_state()
            if state is not None:
                return state
        return self.client.info().state

    def _stopped_reason(self) -> str | None:
        """Why the VM is no longer running, or None (for ``serial.wait_for``)."""
        returncode = self.process.poll()
        if returncode is not None:
            return _exit_text(returncode)
        if not self._ran.value:
            return None
        now = time.monotonic()
        if now - self._state_checked < 0.5:
            return None
        self._state_checked = now
        try:
            state = self._current_state()
        except ApiConnectionError:
            return None
        except ApiError:
            return "the VM was deleted"
        if state in ("Created", "Shutdown"):
            return "it was shut down"
        return None

    @property
    def log(self) -> str:
        """What the VMM process wrote to stdout and stderr."""
        if self._log_text is not None:
            return self._log_text
        if self.log_path is None:
            return ""
        try:
            if os.stat(self.log_path).st_size == 0:
                return ""  # as most are: no file to open and decode
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _exit(self, returncode: int) -> VmExit:
        if returncode == 0:
            return VmExit("poweroff", "The VMM process exited with status 0")
        message = _exit_text(returncode)
        tail = self.log.strip().splitlines()[-5:]
        if tail:
            message += ": " + " | ".join(tail)
        return VmExit("vmm-error", message[0].upper() + message[1:])

    def boot(self) -> None:
        """``vm.boot``: builds and starts the VM (Created → Running)."""
        self.client.boot()
        self._stop_asked = False

    def pause(self) -> None:
        """``vm.pause``: Running → Paused."""
        self.client.pause()

    def snapshot(self, path: str | os.PathLike[str], *, progress: bool = False) -> None:
        """``vm.snapshot`` of the Paused VM into the existing directory ``path``
        (see ``Vm.snapshot``, also for ``progress``); ``vm.restore`` in another VMM
        brings it back."""
        url = f"file://{os.path.abspath(path)}"
        if not progress:
            self.client.snapshot(url)
            return
        from vmkit import _progress

        probe = lambda: _progress.bytes_under(path)  # noqa: E731
        with _progress.Progress(f"snapshot to {url}", unit="bytes", probe=probe):
            self.client.snapshot(url)

    def resume(self) -> None:
        """``vm.resume``: Paused → Running."""
        self.client.resume()

    def migrate_to(self, socket: str | os.PathLike[str], *, local: bool = False) -> None:
        """``vm.send-migration`` to ``unix:<socket>`` (see ``Vm.migrate_to``): once
        the receiving VMM runs the VM, this VMM process deletes it and exits (as
        Cloud Hypervisor's does); on failure the VM runs on here. While it sends,
        the API's other requests wait for it, as Cloud Hypervisor's do, and so
        does ``info()``; ``state``, ``wait(timeout)`` and ``serial.wait_for``
        answer other threads at once, but for a VMM started with
        ``fresh_interpreter``, which answer through its API."""
        self._stop_asked = True
        try:
            self.client.send_migration(f"unix:{os.path.abspath(socket)}", local=local)
        except BaseException:
            self._stop_asked = False
            raise

    def receive_migration(self, socket: str | os.PathLike[str]) -> None:
        """``vm.receive-migration`` on ``unix:<socket>``: this VMM process (say,
        ``spawn(None)``) waits there for a VM another VMM migrates (see
        ``Vm.receive_migration``) and returns once it runs here. ``wait``,
        ``serial`` and the rest then follow the VM received."""
        self.client.receive_migration(f"unix:{os.path.abspath(socket)}")
        self._stop_asked = False
        serial = self.client.info().config.serial
        if serial.mode == "File" and serial.file:
            self.serial.path = Path(serial.file)

    def shutdown(self) -> None:
        """``vm.shutdown``: stops the VM (its config stays; state ``Created``)."""
        self._stop_asked = True
        self.client.shutdown()

    def reboot(self) -> None:
        """``vm.reboot``: the running boot stops and a fresh one starts."""
        self.client.reboot()

    def power_button(self) -> None:
        """``vm.power-button``: presses the guest's ACPI power button."""
        self.client.power_button()

    def resize_vcpus(self, vcpus: int) -> None:
        """``vm.resize {"desired_vcpus"}``: hot-plugs or unplugs vCPUs as
        ``Vm.resize_vcpus`` does."""
        self.client.resize(cpus=vcpus)

    def resize_memory(self, size: int | str) -> None:
        """``vm.resize {"desired_ram"}``: the VM's new RAM size (bytes or
        ``"1G"``): an ACPI DIMM or virtio-mem, as ``Vm.resize_memory`` does."""
        self.client.resize(memory=size)

    def resize_balloon(self, size: int | str) -> None:
        """``vm.resize {"desired_balloon"}``: the balloon's new target (bytes or ``"1G"``)."""
        self.client.resize(balloon=size)

    def resize_zone(self, zone: str, size: int | str) -> None:
        """``vm.resize-zone``: memory zone ``zone``'s new size, as ``Vm.resize_zone``."""
        self.client.resize_zone(zone, size)

    def _hot_added(self, info: PciDeviceInfo | None) -> dict[str, str]:
        if info is None:  # only a VM that is not booted answers 204
            raise VmError("VM is not running", "State")
        return {"id": info.id, "bdf": info.bdf}

    def add_disk(self, disk: DiskConfig | str) -> dict[str, str]:
        """``vm.add-disk`` on the running VM: as ``Vm.add_disk``."""
        return self._hot_added(self.client.add_disk(disk))

    def add_net(self, net: NetConfig | str) -> dict[str, str]:
        """``vm.add-net`` on the running VM: as ``Vm.add_net`` (``fds`` go with
        SCM_RIGHTS and become the VMM's)."""
        return self._hot_added(self.client.add_net(net))

    def add_fs(self, fs: FsConfig | str) -> dict[str, str]:
        """``vm.add-fs`` on the running VM: as ``Vm.add_fs``."""
        return self._hot_added(self.client.add_fs(fs))

    def add_pmem(self, pmem: PmemConfig | str) -> dict[str, str]:
        """``vm.add-pmem`` on the running VM: as ``Vm.add_pmem``."""
        return self._hot_added(self.client.add_pmem(pmem))

    def add_vsock(self, vsock: VsockConfig | str) -> dict[str, str]:
        """``vm.add-vsock`` on the running VM: as ``Vm.add_vsock``."""
        return self._hot_added(self.client.add_vsock(vsock))

    def remove_device(self, id: str) -> None:
        """``vm.remove-device``: as ``Vm.remove_device``."""
        self.client.remove_device(id)

    def info(self) -> VmInfo:
        """``vm.info``."""
        return self.client.info()

    def counters(self) -> dict[str, dict[str, int]]:
        """``vm.counters``."""
        return self.client.counters()

    def vsock_connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A stream to the guest's vsock port ``port``: as ``Vm.vsock_connect``."""
        from vmkit.vm import _vsock_connect

        return _vsock_connect(self.info().config, port, timeout)

    @property
    def state(self) -> str:
        """The VM's state from ``vm.info``; ``Shutdown`` once the VMM process is gone."""
        if self.process.poll() is not None:
            return "Shutdown"
        try:
            return self._current_state()
        except ApiConnectionError:
            if self.process.poll() is not None:
                return "Shutdown"
            raise

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Waits for the VM to stop; returns why, or None on timeout.

        The VM has stopped when the VMM process exits (reason ``poweroff``
        for status 0, else ``vmm-error``), or when ``vm.info`` says
        ``Created`` or ``Shutdown`` after a boot (reason ``shutdown``).
        Returns None at once when the VM was never booted.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                return self._exit(returncode)
            try:
                state: str | None = self._current_state()
            except ApiConnectionError:
                state = None  # the process may be on its way out
            except ApiError:
                state = "Created"  # no config any more (vm.delete)
            if state in ("Created", "Shutdown"):
                if not self._ran.value:
                    return None
                if not self._stop_asked:
                    # Not stopped through this object: the guest powered off, and
                    # the VMM process is on its way out; its status says how.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(_EXIT_AFTER_POWEROFF)
                    returncode = self.process.poll()
                    if returncode is not None:
                        return self._exit(returncode)
                return VmExit("shutdown", f"The VM is no longer running (state {state})")
            if deadline is not None and time.monotonic() >= deadline:
                return None
            pause = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            # Returns as soon as the process exits (a power-off ends it).
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(max(0.0, pause))

    def close(self) -> None:
        """Ends the VMM process and removes its socket and temporary files.

        The serial output and the VMM log stay readable afterwards.
        """
        self._close(_remove_spawn_dir)

    def _close(self, remove_dir: Callable[[Path], None]) -> None:
        # Taken from the finalizer first: it runs once, here or when collected.
        if self._finalizer.detach() is not None:
            _end_process(*self._end_args, remove_dir=remove_dir, keep_output=self._keep_output)
        elif self.process.returncode is None:
            self.process.wait()  # closed on another thread, which ends the process

    def _keep_output(self) -> None:
        """Reads the serial output and the log back before their files go."""
        self.serial._freeze()
        self._log_text = self.log

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _close_this_side(self) -> None:
        """After ``_begin_close``: closes this program's side of a VM
        process (its API server, registry entry and channel) without
        waiting for the process to end."""
        if self._finalizer.alive and self._vm_process is not None:
            self._vm_process.close()

    def _begin_close(self) -> None:
        """Starts ending the process without waiting (``close_all``): a VM
        process's control socket closes, a Python VMM gets SIGTERM."""
        if not self._finalizer.alive:
            return
        if self._vm_process is not None:
            self._vm_process.hang_up()
        elif self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def __enter__(self) -> SpawnedVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The VMM's entry point, as ``python -m vmkit`` but without the current
#: directory on ``sys.path`` (``-m`` and ``-c`` put it first, so a ``vmkit``
#: folder there would run instead); ``-P`` does that only from Python 3.11 on.
_VMM_MAIN = (
    "import sys\n"
    "if not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
    "from vmkit.cli import main\n"
    "main()\n"
)


@functools.cache
def _package_root() -> str:
    # Cached: resolving walks the path with a system call per component, at every spawn.
    return str(Path(__file__).resolve().parent.parent)


def _child_environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """What a spawned VMM runs with: ``env`` (this program's if None), and
    from a source tree or an editable install, this vmkit on its path."""
    child_env = dict(os.environ if env is None else env)
    root = _package_root()
    if Path(root).name not in ("site-packages", "dist-packages"):
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, child_env.get("PYTHONPATH", "")) if p
        )
    return child_env


_SpawnArgs = ParamSpec("_SpawnArgs")


def _explains_descriptor_limits(
    spawn: Callable[_SpawnArgs, SpawnedVm],
) -> Callable[_SpawnArgs, SpawnedVm]:
    """``spawn``, whose "too many open files" says which limit and what to do."""

    @functools.wraps(spawn)
    def spawn_explained(*args: _SpawnArgs.args, **kwargs: _SpawnArgs.kwargs) -> SpawnedVm:
        try:
            return spawn(*args, **kwargs)
        except OSError as e:
            if e.errno == errno.EMFILE:
                import resource

                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                why = (
                    f"this program has used up its file descriptors (RLIMIT_NOFILE is "
                    f"{limit}, and each spawned VM keeps several open here): raise the "
                    "limit (ulimit -n, or resource.setrlimit in the program)"
                )
            elif e.errno == errno.ENFILE:
                why = "the system's file table is full (fs.file-max)"
            else:
                raise
            raise VmError(f"Cannot start a VMM: {why}", "Spawn") from e

    return spawn_explained


@_explains_descriptor_limits
def spawn(
    config: VmConfig | None,
    *,
    api_socket: str | Path | None = None,
    serial_log: bool = True,
    vmm_args: Sequence[str] = (),
    startup_timeout: float = 30.0,
    request_timeout: float | None = DEFAULT_TIMEOUT,
    stop_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    fresh_interpreter: bool = False,
    cpu_groups: bool = False,
    restore: str | os.PathLike[str] | None = None,
    prefault: bool = False,
    disks: Mapping[str, str | os.PathLike[str]] | None = None,
    name: str | None = None,
) -> SpawnedVm:
    """Starts a VMM process serving the HTTP API on ``<path>`` and creates ``config`` there.

    The process is forked from this program's VMM fork server (started on the
    first spawn, once) straight into Rust: a VM process that runs the VM and
    no Python (``vmkit._vmproc``), so that it costs about what a Cloud
    Hypervisor process costs. It is this program's child, holds nothing of
    the server's or this program's but its log, /dev/null, its control
    socket and a signalfd, and takes this program's working directory, CPU affinity and
    niceness as they are now (umask 077, as v37). This program keeps the
    VMM's policy for it: the HTTP API on the socket the VM process made and
    listens on (so connections name the VM process), and Cloud Hypervisor's
    state rules; the VM process stops its VM and exits when this program
    goes away. ``vmm_args`` other than ``-v``, an ``env``, or
    ``fresh_interpreter=True`` run the ``vmkit --api-socket`` command instead
    (forked from the server as a pre-imported interpreter, or started fresh
    with ``fresh_interpreter`` or ``PYTHON*`` variables that differ from this
    program's), which serves the API itself.

    The VMM starts idle (no payload on its command line); once it answers
    ``vmm.ping``, ``vm.create`` sends ``config`` (``None`` skips that). The
    socket lives in a new temporary directory unless ``api_socket`` is given
    (a path that must not exist yet). Requests go only to the child process
    (checked with SO_PEERCRED on each connection), and only the socket file
    the child was seen serving on is removed at the end.
    With ``serial_log`` (the default) the serial port is written to
    ``<tmpdir>/serial.log`` (``--serial file=...``) so that ``serial`` can
    read it; a config whose serial already goes to a file keeps its file.
    The VMM's stdout and stderr go to ``<tmpdir>/vmm.log`` (``SpawnedVm.log``).
    ``vmm_args`` are extra command-line words for the VMM (``-v``).
    ``request_timeout`` bounds each request (seconds; None: no bound): for a
    VM process, each of its answers to this program, and one that does not
    answer in time is closed (it then exits).
    ``cpu_groups``: the VM's threads in CPU groups of their own (see ``Vm``),
    made under this program's cpu cgroup (``--cpu-groups true`` for the
    ``vmkit`` command).
    ``restore``: instead of a config, the snapshot directory to restore
    (``vm.restore``, with ``prefault``, and ``disks``: the clone's own images
    by disk id, as for ``Vm.restore``); the VM is Paused until ``resume()``,
    and ``serial`` reads the restored config's serial file when it has one.

    ``name``: the VM's name in ``vmkit ls`` and for ``vmkit remote NAME``
    (``vm-<pid>`` by default); a name that a running VM has is refused.

    Raises VmError (kind ``Spawn``) when the VMM does not come up in
    ``startup_timeout`` seconds or the name is taken, ApiError when
    ``vm.create`` fails; in both cases the process is ended and its files
    removed. ValueError for an invalid name.
    """
    if restore is not None and config is not None:
        raise ValueError("spawn takes a config or a snapshot to restore, not both")
    if disks and restore is None:
        raise ValueError("spawn's disks are a restored clone's images: give restore too")
    interpreter = sys.executable
    if not interpreter or not os.path.isabs(interpreter):
        # Never a PATH lookup: that could start another program than this Python.
        raise VmError(
            f"Cannot start a VMM: this Python's interpreter path is unknown or relative "
            f"(sys.executable is {interpreter!r})",
            "Spawn",
        )
    if name is not None:
        _check_name(name)
    if api_socket is not None and os.path.lexists(api_socket):
        # Perhaps another VMM's socket: never bind over it, talk to it or remove it.
        raise VmError(
            f"Cannot start a VMM on {api_socket}: the path exists (another VMM's socket?); "
            "give a path that does not exist yet",
            "Spawn",
        )
    tmpdir = Path(tempfile.mkdtemp(prefix=registry.spawn_dir_prefix()))
    try:
        socket_path = Path(api_socket) if api_socket is not None else tmpdir / "api.sock"
        serial_path: Path | None = None
        if config is not None and serial_log:
            if config.serial.mode == "File" and config.serial.file:
                serial_path = Path(config.serial.file)
            else:
                serial_path = tmpdir / "serial.log"
                config = dataclasses.replace(
                    config, serial=ConsoleConfig(mode="File", file=str(serial_path))
                )
        log_path = tmpdir / "vmm.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        log = open(os.open(log_path, flags, 0o600), "wb")  # closed once the child has it
    except BaseException:
        _remove_spawn_dir(tmpdir)
        raise
    child_env = _child_environment(env)
    # The shared fork server is started only for this program's own Python
    # start-up variables: one started for an `env` with others would turn
    # every later default spawn away to a fresh interpreter.
    startup = _forkserver.startup_environment
    may_start = env is None or startup(child_env) == startup(_child_environment(None))
    verbosity = _vm_process_verbosity(vmm_args)
    if not fresh_interpreter and env is None and verbosity is not None:
        try:
            vm_process = _start_vm_process(
                child_env,
                socket_path,
                tmpdir,
                log,
                verbosity,
                startup_timeout,
                request_timeout,
                cpu_groups,
            )
        except BaseException:
            log.close()
            _remove_unserved_socket(socket_path)
            _remove_spawn_dir(tmpdir)
            raise
        if vm_process is not None:
            log.close()  # the VM process has its own copy (see below)
            client: Client = _LocalClient(vm_process.server, socket_path, vm_process.process)
            vm = SpawnedVm(
                vm_process.process, client, tmpdir, serial_path, log_path, stop_timeout,
                vm_process=vm_process,
            )  # fmt: skip
            identity = _socket_identity(socket_path)
            if identity is not None:
                vm._owned_socket.append(identity)
            kernel = config.payload.kernel if config is not None and config.payload else None
            return _with_config(
                vm,
                config,
                lambda: _register(vm, vm_process, name, kernel),
                restore,
                prefault,
                disks,
            )
    # A lifeline: the child sees EOF on it when this process goes away, even
    # by SIGKILL, and then shuts its VM down and removes the directory.
    lifeline_read, lifeline = os.pipe()
    # The ready pipe: the child writes to it once its API socket listens.
    ready, ready_write = os.pipe()
    child_env["VMKIT_SPAWN_DIR"] = str(tmpdir)
    argv = ["--api-socket", str(socket_path), *vmm_args]
    if name is not None:
        argv += ["--name", name]
    if cpu_groups:
        argv += ["--cpu-groups", "true"]
    process: VmmProcess
    try:
        server = None if fresh_interpreter else _forkserver.shared_server(child_env, may_start)
        if server is not None:
            try:
                pid = server.fork(argv, child_env, log.fileno(), lifeline_read, ready_write)
            except _forkserver.ForkServerError:
                if server.alive:
                    raise
                # The server was gone (killed, or ended with its terminal): a new one.
                server = _forkserver.shared_server(child_env, may_start)
                if server is None:
                    raise
                pid = server.fork(argv, child_env, log.fileno(), lifeline_read, ready_write)
            process = _forkserver.ForkedProcess(pid, ["vmkit", *argv])
        else:
            child_env["VMKIT_LIFELINE_FD"] = str(lifeline_read)
            child_env["VMKIT_READY_FD"] = str(ready_write)
            process = _FreshProcess(
                [interpreter, "-c", _VMM_MAIN, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                close_fds=True,
                pass_fds=(lifeline_read, ready_write),
            )
    except BaseException as e:
        log.close()
        os.close(lifeline)
        os.close(ready)
        _remove_spawn_dir(tmpdir)
        if isinstance(e, _forkserver.ForkServerError):
            raise VmError(f"Cannot start a VMM: {e}", "Spawn") from e
        raise
    finally:
        os.close(lifeline_read)
        os.close(ready_write)
    # The child writes through its own copy. Ours goes now: a fleet costs this
    # program no descriptor per VM, and the file's last close (tens of
    # microseconds on some filesystems) happens as the VMM exits, not in close().
    log.close()
    client = _ChildClient(socket_path, process.pid, timeout=request_timeout)
    vm = SpawnedVm(process, client, tmpdir, serial_path, log_path, stop_timeout, lifeline)
    vm.name = name or registry.default_name(vm.pid)
    return _with_config(
        vm, config, lambda: _wait_until_up(vm, startup_timeout, ready), restore, prefault, disks
    )


def _check_name(name: str) -> None:
    """Refuses, before anything starts, an invalid name or one a running VM has."""
    registry.validate_name(name)
    try:
        registry.check_name_free(name)
    except registry.RegistryError as e:
        raise VmError(f"Cannot start a VMM named {name!r}: {e}", "Spawn") from None


def _register(
    vm: SpawnedVm, vm_process: _vmproc.VmProcess, name: str | None, kernel: str | None
) -> None:
    """Lists a VM process in the registry (``vmkit ls``), as ``vmkit
    --api-socket`` lists itself; its entry goes when the process ends."""
    vm.name = name or registry.default_name(vm.pid)
    try:
        spawn_dir = None if vm.tmpdir is None else str(vm.tmpdir)
        vm_process.registered(
            registry.register(name, vm.pid, str(vm.api_socket), kernel, spawn_dir)
        )
    except registry.RegistryError as e:
        if name is not None or isinstance(e, registry.NameTaken):
            raise VmError(f"Cannot start a VMM named {vm.name!r}: {e}", "Spawn") from None
        import logging

        logging.getLogger("vmkit.registry").warning(
            "VMM %d is not listed in 'vmkit ls': %s", vm.pid, e
        )
    except ProcessLookupError:
        pass  # it ended already: the next request says so
    if vm_process.process.poll() is not None or vm_process.server.closing:
        # Ended while registering: its close may have come first.
        vm_process.remove_registration()


def _with_config(
    vm: SpawnedVm,
    config: VmConfig | None,
    wait_up: Callable[[], None],
    restore: str | os.PathLike[str] | None = None,
    prefault: bool = False,
    disks: Mapping[str, str | os.PathLike[str]] | None = None,
) -> SpawnedVm:
    """``vm`` once ``wait_up()`` says its VMM serves and ``config`` is created
    there (or the snapshot ``restore`` restored); ends the process (and
    raises) if any of that fails."""
    try:
        wait_up()
        if config is not None:
            vm.client.create(config)
        if restore is not None:
            source = f"file://{os.path.abspath(restore)}"
            vm.client.restore(RestoreConfig(source_url=source, prefault=prefault), disks)
            serial = vm.client.info().config.serial
            if serial.mode == "File" and serial.file:
                vm.serial.path = Path(serial.file)
    except BaseException:
        vm.close()
        raise
    return vm


def _vm_process_verbosity(vmm_args: Sequence[str]) -> int | None:
    """The ``-v`` count when ``vmm_args`` holds nothing else (a VM process
    takes only that); None when another option needs the Python VMM."""
    count = 0
    for word in vmm_args:
        if word.startswith("-") and word[1:] and set(word[1:]) == {"v"}:
            count += len(word) - 1
        else:
            return None
    return count


def _start_vm_process(
    env: Mapping[str, str],
    socket_path: Path,
    tmpdir: Path,
    log: IO[bytes],
    verbosity: int,
    timeout: float,
    request_timeout: float | None,
    cpu_groups: bool,
) -> _vmproc.VmProcess | None:
    """A VM process from this program's fork server, or None when the server
    cannot start one (``env``'s PYTHON* differ from its own)."""
    from vmkit import _vmproc

    for attempt in (1, 2):
        server = _forkserver.shared_server(env)
        if server is None:
            return None
        try:
            return _vmproc.VmProcess(
                server,
                api_socket=str(socket_path),
                spawn_dir=str(tmpdir),
                log=log.fileno(),
                verbosity=verbosity,
                seccomp="true",
                timeout=timeout,
                request_timeout=request_timeout,
                cpu_groups=cpu_groups,
            )
        except _forkserver.ForkServerError as e:
            if server.alive or attempt == 2:
                raise VmError(f"Cannot start a VMM: {e}", "Spawn") from e
            # The server was gone (killed, or ended with its terminal): a new one.
    return None


def _wait_until_up(vm: SpawnedVm, timeout: float, ready: int) -> None:
    """Waits until the child serves its socket (it says so on the ``ready``
    pipe, which this closes) and answers ``vmm.ping`` as itself."""
    deadline = time.monotonic() + timeout
    probe = _ChildClient(vm.api_socket, vm.pid, timeout=max(1.0, min(5.0, timeout)))
    last = ""
    waiter = select.poll()
    waiter.register(ready, select.POLLIN)
    try:
        while True:
            returncode = vm.process.poll()
            if returncode is not None:
                log = vm.log.strip()
                raise VmError(
                    f"The VMM process ended before serving {vm.api_socket} "
                    f"({_exit_text(returncode)})" + (f": {log}" if log else ""),
                    "Spawn",
                )
            said_ready = False
            if ready >= 0 and waiter.poll(0):
                # b"r" once the socket listens; b"" when the child exited or did not say.
                said_ready = os.read(ready, 1) == b"r"
                waiter.unregister(ready)
                os.close(ready)
                ready = -1
            identity = _socket_identity(vm.api_socket) if ready < 0 else None
            if identity is not None and said_ready:
                # The child listens there now: no ping needed (each request
                # still checks who serves the socket, SO_PEERCRED).
                vm._owned_socket.append(identity)
                return
            if identity is not None:
                try:
                    pong = probe.ping()
                except ApiError as e:
                    last = str(e)
                else:
                    if pong.pid == vm.pid and _socket_identity(vm.api_socket) == identity:
                        vm._owned_socket.append(identity)
                        return
                    last = f"another VMM (pid {pong.pid}) answers on {vm.api_socket}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(
                    f"The VMM did not answer on {vm.api_socket} within {timeout} s"
                    + (f" ({last})" if last else ""),
                    "Spawn",
                )
            if ready >= 0:
                waiter.poll(max(1, int(min(remaining, 0.05) * 1000)))
            else:
                time.sleep(min(remaining, 0.02))
    finally:
        if ready >= 0:
            os.close(ready)
