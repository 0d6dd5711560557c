"""Cloud Hypervisor v37's HTTP API on a UNIX socket (ch-reference §4).

    >>> from vmkit.vmm import Vmm
    >>> server = ApiServer(Vmm(), "/tmp/vmkit.sock")   # doctest: +SKIP
    >>> server.start()                                  # doctest: +SKIP
    >>> ...
    >>> server.close()                                  # doctest: +SKIP

HTTP/1.1 with keep-alive, a thread per open connection (kept for the next one). Routes are
``/api/v1/<action>``; the methods, status codes and bodies follow v37 (§4.1).
Answers are written byte for byte as v37's server (micro_http) writes them,
because ch-remote reads them strictly: the status line has no reason phrase
(``HTTP/1.1 204 \r\n``; ch-remote parses everything up to ``\r`` as the
code), then ``Server: Cloud Hypervisor API``, ``Connection: keep-alive`` and,
only when there is a body, ``Content-Type: application/json`` and
``Content-Length``. An unknown path gets 404 ``Not Found``; a wrong method or
a missing or unexpected body 400; a body that is not the expected JSON 400
with serde_json's error text; a failed action 500 with its error text.
Descriptors passed with SCM_RIGHTS on ``vm.add-net`` become the device's
``fds``.

A request micro_http cannot read gets its 400 (``Server: Firecracker API``
and ``{ "error": "<why>\nAll previous unanswered requests will be dropped."
}``); vmkit then closes the connection, where v37 reads on from wherever it
stopped. Unlike v37, vmkit reads chunked bodies (``Transfer-Encoding:
chunked``, which Python's http.client and Go's net/http send for bodies of
unknown length) and honours ``Connection: close`` and HTTP/1.0. A request
must arrive whole within ``request_timeout`` seconds once it has started,
and bodies are capped at ``max_body`` bytes. A request head must arrive
within ``header_timeout`` seconds (of the connect, or of its first byte on a
reused connection), a kept-alive connection is closed after ``idle_timeout``
seconds without a request, and when ``max_connections`` are open a new
client takes the place of the one idle longest.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence

from vmkit import _apiwire, _native
from vmkit._reactor import Reactor
from vmkit._record import field, record
from vmkit._unixsocket import listen_private, remove_if_same
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
from vmkit.vm import VmError
from vmkit.vmm import ApiError, Vmm

__all__ = ["API_ROOT", "ApiServer", "BodyError"]

log = LazyLogger("vmkit.api")

API_ROOT = "/api/v1/"
SERVER = "Cloud Hypervisor API"
#: micro_http's own answers (request errors, 100 Continue) name Firecracker, as in v37
HTTP_LAYER_SERVER = "Firecracker API"
MAX_BODY = 1 << 20
MAX_HEAD = 64 << 10
MAX_FDS = 64
#: accept() errors that last until some descriptor or memory is freed
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _C = TypeVar("_C")
    _B = TypeVar("_B")


class BodyError(ValueError):
    """A request body that is not the JSON the action takes (400; the text is serde_json-like)."""


@record
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes | None
    fds: list[int] = field(default_factory=list)

    @property
    def path(self) -> str:
        target = self.target
        if target.startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        return target


@record
class Response:
    status: int
    body: bytes = b""
    #: called once the answer is written (``vmm.shutdown`` ends the process then)
    after: Callable[[], None] | None = None
    server: str = SERVER


def response_headers(response: Response, close: bool) -> list[tuple[str, str]]:
    """micro_http's framing: no reason phrase, and no Content-Type or
    Content-Length on an answer without a body."""
    headers = [("Server", response.server), ("Connection", "close" if close else "keep-alive")]
    if response.body:
        headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(response.body))))
    return headers


def response_bytes(response: Response, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} "]
    lines += [f"{name}: {value}" for name, value in response_headers(response, close)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + response.body


def answer(router: _Router, request: Request) -> Response:
    """The router's answer to ``request``; closes the descriptors it carried
    (what the VMM keeps, it has duplicated)."""
    log.info("API request event: %s %s", request.method, request.path)
    try:
        return router.dispatch(request)
    except Exception as e:  # a bug: answer it, keep serving
        log.exception("Internal error handling %s %s", request.method, request.path)
        return _error(500, f"Internal error: {e}")
    finally:
        for fd in request.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def answer_here(
    server: ApiServer, method: str, endpoint: str, body: bytes | None, fds: Sequence[int]
) -> _apiwire.RawResponse:
    """``server``'s answer to a request made in this program, as a client on
    a connection would read it (the same router, the descriptors received as
    copies); runs the answer's ``after`` step before returning."""
    request = Request(method, API_ROOT + endpoint, "HTTP/1.1", {}, body, [os.dup(fd) for fd in fds])
    response = answer(server.router, request)
    close = response.after is not None
    try:
        return _apiwire.RawResponse(
            response.status,
            "",
            tuple(response_headers(response, close)),
            response.body or None,
            response_bytes(response, close),
        )
    finally:
        if response.after is not None:
            response.after()


def _bad_request() -> Response:
    return Response(400, b"Bad Request")


def _error(status: int, message: str) -> Response:
    return Response(status, message.encode())


# -- request bodies --------------------------------------------------------------------------


def _json_error_text(e: ConfigError) -> str:
    message = str(e)
    if e.path and message.startswith(f"{e.path}: "):
        message = message[len(e.path) + 2 :]
    return message


def _config_from_body(cls: type[_C], body: bytes) -> _C:
    try:
        return cls.from_json(body)  # type: ignore[attr-defined, no-any-return]
    except ConfigError as e:
        raise BodyError(_json_error_text(e)) from None


def _restore_disks(body: bytes) -> dict[str, str] | None:
    """``vm.restore``'s ``disks`` (vmkit's addition; v37 ignores unknown
    fields): a clone's own disk images, ``{"<disk id>": "<image path>"}``."""
    import json

    disks = json.loads(body).get("disks")
    if disks is None:
        return None
    if not isinstance(disks, dict) or not all(isinstance(v, str) for v in disks.values()):
        raise BodyError(
            f"disks: expected an object of disk ids to image paths, got {json.dumps(disks)}"
        )
    return disks


def _action_body(read: Callable[[], _B]) -> _B:
    """Runs ``read`` (a ``_native.parse_api_body`` call: serde_json reading
    one of v37's action structs); its error text becomes the BodyError."""
    try:
        return read()
    except ConfigError as e:
        raise BodyError(str(e)) from None


# -- routes ----------------------------------------------------------------------------------

#: actions v37 routes to its generic VM action handler, and whether they take a body
_BODYLESS = ("vm.boot", "vm.delete", "vm.shutdown", "vm.reboot", "vm.pause", "vm.resume")
_BODYLESS_ALL = (*_BODYLESS, "vm.power-button")
_WITH_BODY = (
    "vm.add-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-net",
    "vm.add-pmem",
    "vm.add-user-device",
    "vm.add-vdpa",
    "vm.add-vsock",
    "vm.remove-device",
    "vm.resize",
    "vm.resize-zone",
    "vm.restore",
    "vm.snapshot",
    "vm.send-migration",
    "vm.receive-migration",
)
ACTIONS = frozenset(
    ("vm.create", "vm.info", "vmm.ping", "vmm.shutdown", "vm.counters", *_BODYLESS_ALL, *_WITH_BODY)
)


class _Router:
    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def dispatch(self, request: Request) -> Response:
        path = request.path
        if not path.startswith(API_ROOT) or path[len(API_ROOT) :] not in ACTIONS:
            return _error(404, "Not Found")
        action = path[len(API_ROOT) :]
        method = request.method
        body = request.body
        try:
            if action in ("vm.info", "vmm.ping"):
                if method != "GET":
                    return _bad_request()
                result = self.vmm.info() if action == "vm.info" else self.vmm.ping()
                return self._json(200, result)
            if action == "vm.create":
                if method != "PUT":
                    return _bad_request()
                if body is None:
                    return Response(400)
                self.vmm.create(_config_from_body(VmConfig, body))
                return Response(204)
            if action == "vmm.shutdown":
                if method != "PUT":
                    return _bad_request()
                self.vmm.vmm_shutdown()
                return Response(200, after=lambda: self.vmm.request_exit(0))
            # v37's generic VM action handler
            if method == "PATCH":
                return Response(400)
            if method == "GET":
                if action != "vm.counters":
                    return _bad_request()
                return self._json(200, self.vmm.counters())
            if body is None:
                if action not in _BODYLESS_ALL:
                    return _bad_request()
                self._bodyless(action)
                return Response(204)
            if action not in _WITH_BODY:
                return _bad_request()
            added = self._with_body(action, body, request)
            if added is None:
                return Response(204)
            return self._json(200, added)
        except _ExitAfter as done:
            code = done.code
            return Response(204, after=lambda: self.vmm.request_exit(code))
        except BodyError as e:
            return _error(400, str(e))
        except ApiError as e:
            return _error(500, str(e))
        except VmError as e:  # e.g. a VM process that ended during the request
            return _error(500, str(e))

    @staticmethod
    def _json(status: int, value: object) -> Response:
        # Imported here: a VMM's start does not need json (nor the re it loads).
        import json

        return Response(status, json.dumps(value, separators=(",", ":")).encode())

    def _bodyless(self, action: str) -> None:
        vmm = self.vmm
        calls: dict[str, Callable[[], None]] = {
            "vm.boot": vmm.boot,
            "vm.delete": vmm.delete,
            "vm.shutdown": vmm.shutdown,
            "vm.reboot": vmm.reboot,
            "vm.pause": vmm.pause,
            "vm.resume": vmm.resume,
            "vm.power-button": vmm.power_button,
        }
        calls[action]()

    def _with_body(self, action: str, body: bytes, request: Request) -> dict[str, Any] | None:
        vmm = self.vmm
        if action == "vm.add-device":
            return vmm.add_device(_config_from_body(DeviceConfig, body))
        if action == "vm.add-disk":
            return vmm.add_disk(_config_from_body(DiskConfig, body))
        if action == "vm.add-fs":
            return vmm.add_fs(_config_from_body(FsConfig, body))
        if action == "vm.add-pmem":
            return vmm.add_pmem(_config_from_body(PmemConfig, body))
        if action == "vm.add-user-device":
            return vmm.add_user_device(_config_from_body(UserDeviceConfig, body))
        if action == "vm.add-vdpa":
            return vmm.add_vdpa(_config_from_body(VdpaConfig, body))
        if action == "vm.add-vsock":
            return vmm.add_vsock(_config_from_body(VsockConfig, body))
        if action == "vm.add-net":
            net = _config_from_body(NetConfig, body)
            if net.fds is not None:
                log.warning("Ignoring FDs sent via the HTTP request body")
                net.fds = None
            if request.fds:
                net.fds = list(request.fds)
                request.fds = []  # the VMM owns them now
            return vmm.add_net(net)
        if action == "vm.remove-device":
            removal = _action_body(lambda: _native.parse_api_body("VmRemoveDeviceData", body))
            vmm.remove_device(removal["id"])
        elif action == "vm.resize":
            resize = _action_body(lambda: _native.parse_api_body("VmResizeData", body))
            vmm.resize(resize["desired_vcpus"], resize["desired_ram"], resize["desired_balloon"])
        elif action == "vm.resize-zone":
            zone = _action_body(lambda: _native.parse_api_body("VmResizeZoneData", body))
            vmm.resize_zone(zone["id"], zone["desired_ram"])
        elif action == "vm.snapshot":
            snapshot = _action_body(lambda: _native.parse_api_body("VmSnapshotConfig", body))
            vmm.snapshot(snapshot["destination_url"])
        elif action == "vm.restore":
            vmm.restore(_config_from_body(RestoreConfig, body), _restore_disks(body))
        elif action == "vm.send-migration":
            send = _action_body(lambda: _native.parse_api_body("VmSendMigrationData", body))
            vmm.send_migration(send["destination_url"], send["local"])
            # v37's VMM exits once the VM runs elsewhere.
            raise _ExitAfter(0)
        elif action == "vm.receive-migration":
            receive = _action_body(lambda: _native.parse_api_body("VmReceiveMigrationData", body))
            vmm.receive_migration(receive["receiver_url"])
        return None


# -- the wire --------------------------------------------------------------------------------


class _ExitAfter(Exception):
    """The action succeeded; answer 204, then end the VMM process with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Malformed(Exception):
    """The request cannot be read: answer micro_http's 400 with this text and close."""

    def response(self) -> Response:
        body = f'{{ "error": "{self}\nAll previous unanswered requests will be dropped." }}'
        return Response(400, body.encode(), server=HTTP_LAYER_SERVER)


def _invalid_value(name: str, value: str) -> str:
    return f"Invalid header. Reason: Invalid value. Key:{name}; Value: {value}"


_HEX = frozenset(b"0123456789abcdefABCDEF")


class _Gone(Exception):
    """The client went away (or never finished): close without answering."""


_METHODS = ("GET", "PUT", "PATCH")


class _Connection:
    def __init__(self, sock: socket.socket, server: ApiServer) -> None:
        self.sock = sock
        self.server = server
        self.buffer = bytearray()
        self.fds: list[int] = []
        self.eof = False

    def _recv(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Gone("timed out")
            self.sock.settimeout(remaining)
        try:
            # MSG_CMSG_CLOEXEC: descriptors a client sends are the VMM's, not its children's.
            data, fds, _flags, _addr = socket.recv_fds(
                self.sock, 65536, MAX_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError:
            raise _Gone("timed out") from None
        except OSError as e:
            raise _Gone(str(e)) from None
        for fd in fds:
            if len(self.fds) >= MAX_FDS:  # more than one request may carry: drop the rest
                os.close(fd)
                continue
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
            self.fds.append(fd)
        if not data:
            self.eof = True
        self.buffer += data

    def read_request(self, first: bool) -> Request | None:
        """The next request; None at a clean end of the connection.

        The first request's head must arrive within ``header_timeout`` of the
        connect; a later one may wait ``idle_timeout`` for its first byte,
        then has ``header_timeout`` for its head. Silent or trickling clients
        cannot hold a connection (and its thread) for long.
        """
        deadline: float | None = None
        timeout = self.server.request_timeout
        started = time.monotonic()
        head_deadline = started + self.server.header_timeout
        wait_deadline = head_deadline if first else started + self.server.idle_timeout
        # Tolerate empty lines before a request line (RFC 9112 §2.2).
        while True:
            while self.buffer[:2] == b"\r\n" or self.buffer[:1] == b"\n":
                del self.buffer[: 2 if self.buffer[:1] == b"\r" else 1]
            end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end >= 0:
                break
            if len(self.buffer) > MAX_HEAD:
                raise _Malformed("Invalid request.")
            if self.eof:
                if self.buffer:
                    raise _Gone("incomplete request")
                return None
            if self.buffer and deadline is None:  # the request has begun
                deadline = time.monotonic() + timeout
                if not first:
                    head_deadline = time.monotonic() + self.server.header_timeout
            self._recv(wait_deadline if deadline is None else min(deadline, head_deadline))
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        lines = head.split(b"\r\n")
        request_line = lines[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) < 3 or not all(parts[:2]):
            raise _Malformed("Invalid request.")
        method, target, version = parts[0], parts[1], " ".join(parts[2:])
        if method not in _METHODS:
            raise _Malformed("Invalid HTTP Method: Unsupported HTTP method.")
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Malformed("Invalid HTTP Version: Unsupported HTTP version.")
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in target):
            raise _Malformed("Invalid URI.")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            line = raw.decode("latin-1")
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or any(c in name for c in " \t"):
                raise _Malformed(
                    f"Invalid header. Reason: Header is incorrectly formatted. Key: {line}"
                )
            if any(ord(c) < 0x20 and c != "\t" for c in value):
                raise _Malformed(
                    f"Invalid header. Reason: Header is incorrectly formatted. Key: {name}"
                )
            key = name.lower()
            value = value.strip(" \t")
            if key == "content-length" and key in headers and headers[key] != value:
                raise _Malformed(_invalid_value("Content-Length", value))
            if key == "transfer-encoding" and key in headers:
                value = f"{headers[key]}, {value}"
            headers[key] = value
        chunked = False
        if "transfer-encoding" in headers:
            # Only chunked alone, and never with Content-Length: anything else
            # would let a proxy and vmkit disagree where the request ends.
            if headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers:
                raise _Malformed(_invalid_value("Transfer-Encoding", headers["transfer-encoding"]))
            chunked = True
        length = 0
        if "content-length" in headers:
            text = headers["content-length"]
            if not text.isascii() or not text.isdigit() or len(text) > 20:
                raise _Malformed(_invalid_value("Content-Length", text))
            length = int(text)
        if length > self.server.max_body:
            raise _Malformed(self._too_large(length))
        if (length or chunked) and headers.get("expect", "").lower() == "100-continue":
            self.send(Response(100, server=HTTP_LAYER_SERVER), close=False)
        if deadline is None:
            deadline = time.monotonic() + timeout
        body: bytes | None
        if chunked:
            body = self._read_chunked(deadline) or None
        else:
            self._fill(length, deadline)
            body = bytes(self.buffer[:length]) if length else None
            del self.buffer[:length]
        fds, self.fds = self.fds, []
        return Request(method, target, version, headers, body, fds)

    def _too_large(self, length: int) -> str:
        return (
            f"Request payload with size {length} is larger than the limit of "
            f"{self.server.max_body} allowed by server."
        )

    def _fill(self, length: int, deadline: float) -> None:
        """Reads until the buffer holds ``length`` bytes."""
        while len(self.buffer) < length:
            if self.eof:
                raise _Gone("incomplete body")
            self._recv(deadline)

    def _line(self, deadline: float) -> bytes:
        """The next CRLF-terminated line of a chunked body (without the CRLF)."""
        while True:
            end = self.buffer.find(b"\r\n", 0, MAX_HEAD)
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) >= MAX_HEAD:
                raise _Malformed("Invalid request.")
            if self.eof:
                raise _Gone("incomplete body")
            self._recv(deadline)

    def _read_chunked(self, deadline: float) -> bytes:
        """A ``Transfer-Encoding: chunked`` body (RFC 9112 §7.1); trailers are dropped."""
        body = bytearray()
        while True:
            size_text = self._line(deadline).split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or any(c not in _HEX for c in size_text):
                raise _Malformed("Invalid request.")
            size = int(size_text, 16)
            if size == 0:
                while self._line(deadline):
                    pass
                return bytes(body)
            if len(body) + size > self.server.max_body:
                raise _Malformed(self._too_large(len(body) + size))
            self._fill(size + 2, deadline)
            if self.buffer[size : size + 2] != b"\r\n":
                raise _Malformed("Invalid request.")
            body += self.buffer[:size]
            del self.buffer[: size + 2]

    def send(self, response: Response, *, close: bool) -> None:
        data = response_bytes(response, close)
        self.sock.settimeout(self.server.request_timeout)
        try:
            self.sock.sendall(data)
        except (OSError, TimeoutError) as e:
            raise _Gone(str(e)) from None

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def serve(self) -> None:
        router = self.server.router
        first = True
        try:
            while not self.server.closing:
                try:
                    request = self.read_request(first)
                except _Malformed as e:
                    log.debug("Bad request: %s", e)
                    self.send(e.response(), close=True)
                    return
                if request is None:
                    return
                first = False
                if not self.server._mark_busy(self.sock, True):  # evicted meanwhile
                    for fd in request.fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                    return
                response = answer(router, request)
                close = (
                    request.headers.get("connection", "").lower() == "close"
                    or (
                        request.version == "HTTP/1.0"
                        and request.headers.get("connection", "").lower() != "keep-alive"
                    )
                    or response.after is not None
                )
                try:
                    self.send(response, close=close)
                finally:
                    if response.after is not None:
                        response.after()
                if close:
                    return
                self.server._mark_busy(self.sock, False)
        except _Gone:
            return
        finally:
            self.close_fds()


#: How long closing the server waits for requests being answered (seconds).
ANSWER_GRACE = 2.0
#: Connection threads kept waiting for the next connection, and for how long (seconds).
IDLE_WORKERS = 4
WORKER_IDLE = 30.0


class ApiServer:
    """v37's HTTP API for ``vmm`` on a UNIX socket at ``path``, or on the listening socket ``fd``.

    ``start()`` binds (the socket file gets mode 0600) and serves from
    background threads; ``close()`` stops serving, ends open connections and
    removes the socket file it created. Also a context manager.
    """

    def __init__(
        self,
        vmm: Vmm,
        path: str | os.PathLike[str] | None = None,
        *,
        fd: int | None = None,
        max_body: int = MAX_BODY,
        request_timeout: float = 10.0,
        header_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_connections: int = 256,
        reactor: Reactor | None = None,
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("give exactly one of path and fd")
        self.vmm = vmm
        self.router = _Router(vmm)
        self.path = None if path is None else os.fspath(path)
        self.fd = fd
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.closing = False
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        # open connection -> (busy with a request, when it last became idle)
        self._connections: dict[socket.socket, tuple[bool, float]] = {}
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # a connection went idle or away
        self._handlers: dict[socket.socket, threading.Thread] = {}
        # Connection threads outlive their connection, waiting for the next
        # one: starting a thread per connection costs a start-up handshake (a
        # switch to the new thread and back), which on a busy host is a wait
        # for a CPU each time. Accepted connections no thread has taken yet:
        self._unclaimed: collections.deque[socket.socket] = collections.deque()
        self._work = threading.Condition(self._lock)  # a connection to take, or closing
        self._idle_workers = 0  # threads waiting in _work_loop, less those already claimed
        self._workers: set[threading.Thread] = set()
        #: accepts on this reactor's thread instead of a thread of its own
        self._reactor = reactor
        self._backoff = 0.0

    def bind(self) -> None:
        """Creates (or adopts) the listening socket; raises OSError as ``bind`` does."""
        if self.fd is not None:
            sock = socket.socket(fileno=self.fd)
            if sock.family != socket.AF_UNIX:
                sock.detach()
                raise OSError(f"fd {self.fd} is not a UNIX domain socket")
            # listen() again would also make this process the one clients'
            # SO_PEERCRED names: a socket a VM process listens on stays its.
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.listen(128)
        else:
            assert self.path is not None
            fd, self._inode = listen_private(self.path)
            sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        self._listener = sock

    def adopt(self, listening_fd: int, inode: tuple[int, int]) -> None:
        """Instead of ``bind``: takes over a socket already bound to ``path``
        and listening, whose file is ``inode`` (st_dev, st_ino), removed on
        ``close`` as a socket ``bind`` made (the ``vmkit`` command binds
        before it loads this module)."""
        assert self.path is not None and self._listener is None
        sock = socket.socket(fileno=listening_fd)
        sock.set_inheritable(False)
        self._inode = inode
        self._listener = sock

    @property
    def listening(self) -> bool:
        """Holds its listening socket (bound or adopted), until ``close``."""
        return self._listener is not None

    def socket_path(self) -> str | None:
        """The listening socket's path (absolute), None for an unnamed or
        abstract socket (``fd=``): where clients connect."""
        if self.path is not None:
            return os.path.abspath(self.path)
        if self._listener is None:
            return None
        name = self._listener.getsockname()
        if not isinstance(name, str) or not name or name.startswith("\0"):
            return None
        return os.path.abspath(name)

    def start(self) -> None:
        """Binds if needed, then serves in a thread named ``http-server`` (or
        on the reactor's thread, given one)."""
        if self._listener is None:
            self.bind()
        if self._reactor is not None:
            assert self._listener is not None
            self._listener.setblocking(False)
            self._reactor.add(self._listener.fileno(), select.EPOLLIN, self._accept_one)
            return
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="http-server", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        poller = select.poll()  # not select(): fds above 1023 must work too
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wake_only = select.poll()
        wake_only.register(self._wake_r, select.POLLIN)
        backoff = 0.0
        while not self.closing:
            try:
                events = poller.poll()
                if any(fd == self._wake_r for fd, _ in events) or self.closing:  # close()
                    return
                conn, _addr = listener.accept()
            except OSError as e:
                if e.errno == errno.EBADF:
                    return
                if e.errno not in _OUT_OF_RESOURCES:
                    continue
                # The client stays queued and the listener stays readable:
                # retrying at once would spin. Wait (growing to 100 ms) for an
                # fd to come free, waking early only for close().
                backoff = min(max(backoff * 2, 0.001), 0.1)
                try:
                    wake_only.poll(backoff * 1000)
                except OSError:
                    return
                continue
            backoff = 0.0
            self._start_connection(conn)

    def _accept_one(self, _fd: int) -> None:
        """On the reactor's thread: one connection is waiting (the reactor
        calls again while more are)."""
        listener = self._listener
        if listener is None or self.closing:
            return
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            return  # another accept took it
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                self._pause_accepting()
            return
        self._backoff = 0.0
        self._start_connection(conn)

    def _pause_accepting(self) -> None:
        """Out of descriptors: the client stays queued and the listener stays
        readable, so accepting again at once would spin. Waits (growing to
        100 ms) before it looks again."""
        reactor, listener = self._reactor, self._listener
        assert reactor is not None and listener is not None
        fd = listener.fileno()
        reactor.remove(fd)
        self._backoff = min(max(self._backoff * 2, 0.001), 0.1)

        def resume() -> None:
            with reactor.held():
                if not self.closing and self._listener is listener:
                    reactor.add(fd, select.EPOLLIN, self._accept_one)

        timer = threading.Timer(self._backoff, resume)
        timer.daemon = True
        timer.start()

    def _start_connection(self, conn: socket.socket) -> None:
        if not self._admit(conn):
            conn.close()
            return
        with self._lock:
            if self._idle_workers > 0:
                self._idle_workers -= 1
                self._unclaimed.append(conn)
                self._work.notify()
                return
        thread = threading.Thread(
            target=self._work_loop, args=(conn,), name="http-client", daemon=True
        )
        with self._lock:
            self._workers.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._workers.discard(thread)
            self._drop(conn)

    def _work_loop(self, conn: socket.socket) -> None:
        """Serves ``conn``, then the connections handed to this thread while
        it waits (at most IDLE_WORKERS threads wait, each for WORKER_IDLE s)."""
        try:
            while True:
                self._serve_connection(conn)
                with self._lock:
                    if self.closing or self._idle_workers >= IDLE_WORKERS:
                        return
                    self._idle_workers += 1
                    deadline = time.monotonic() + WORKER_IDLE
                    # _start_connection counts a thread out of the idle ones
                    # as it queues a connection for it, so a thread that
                    # wakes to an empty queue is still counted idle.
                    while not self._unclaimed and not self.closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._work.wait(remaining)
                    if not self._unclaimed:
                        self._idle_workers -= 1
                        return
                    conn = self._unclaimed.popleft()
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _admit(self, conn: socket.socket) -> bool:
        """Registers ``conn``; when full, makes room by ending the connection idle longest.

        Connections not yet handling a request give way, so clients that hold
        connections open cannot lock the owner out; those handling one (each
        bounded by ``request_timeout``) are never ended early.
        """
        with self._lock:
            if len(self._connections) >= self.max_connections:
                idle = [(since, c) for c, (busy, since) in self._connections.items() if not busy]
                if not idle:
                    return False
                _since, victim = min(idle, key=lambda item: item[0])
                del self._connections[victim]
                try:  # its thread sees EOF and closes it
                    victim.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections[conn] = (False, time.monotonic())
        return True

    def _mark_busy(self, conn: socket.socket, busy: bool) -> bool:
        """Marks ``conn`` busy or idle; False when it was evicted (or the server closed)."""
        with self._lock:
            if conn not in self._connections:
                return False
            self._connections[conn] = (busy, time.monotonic())
            self._settled.notify_all()
        return True

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)
            self._handlers.pop(conn, None)
            self._settled.notify_all()
        try:
            conn.close()
        except OSError:
            pass

    def _serve_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._handlers[conn] = threading.current_thread()
        try:
            _Connection(conn, self).serve()
        except Exception:
            log.exception("API connection failed")
        finally:
            self._drop(conn)

    def close(self) -> None:
        """Stops serving and removes the socket file this server created."""
        if self.closing:
            return
        with self._lock:
            self.closing = True
            self._work.notify_all()  # idle connection threads end
        if self._reactor is not None and self._listener is not None:
            self._reactor.remove(self._listener.fileno())
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        # A request being answered gets its answer out first (a guest that powers
        # off right after vm.boot must not cost the client the boot's reply); one
        # that takes longer than ANSWER_GRACE is cut like the idle ones.
        deadline = time.monotonic() + ANSWER_GRACE
        with self._lock:
            while True:
                busy = [c for c, (is_busy, _since) in self._connections.items() if is_busy]
                current = [c for c in busy if self._handlers.get(c) is threading.current_thread()]
                remaining = deadline - time.monotonic()
                if len(busy) == len(current) or remaining <= 0:
                    break
                self._settled.wait(remaining)
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._listener is not None:
            if self.fd is not None:
                self._listener.detach()
                try:
                    os.close(self.fd)
                except OSError:
                    pass
            else:
                self._listener.close()
            self._listener = None
        if self.path is not None and self._inode is not None:
            remove_if_same(self.path, self._inode)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        # Connection threads end once their connection is shut (idle ones on
        # the notify above): none outlives close(). Bounded, as one may be in
        # a request that waits for the caller.
        with self._lock:
            workers = [t for t in self._workers if t is not threading.current_thread()]
        for worker in workers:
            worker.join(ANSWER_GRACE)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
