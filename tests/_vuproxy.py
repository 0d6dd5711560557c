"""A vhost-user relay that hides protocol features from the frontend.

Cloud Hypervisor v37 (rust-vmm ``vhost`` 0.10) refuses a backend whose
GET_PROTOCOL_FEATURES answer has a bit it does not know: virtiofsd 1.11 and
later offer DEVICE_STATE (bit 19), and v37 stops at
``VhostUserGetProtocolFeatures(VhostUserProtocol(InvalidMessage))``. This
relay sits between the two: every message goes through unchanged, file
descriptors included, except that answer, whose ``hide`` bits are cleared. A
frontend that does not see DEVICE_STATE never asks for it, so the rest of the
conversation is what it would be with an older virtiofsd.

The relay serves one frontend; when either side closes, it closes the other
(virtiofsd ends when its frontend goes), and ``close()`` joins its threads.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from pathlib import Path

GET_PROTOCOL_FEATURES = 15
REPLY_FLAG = 0x4
DEVICE_STATE = 1 << 19
_HEADER = struct.Struct("<III")  # request, flags, size
_MAX_FDS = 8


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    """n bytes (None at a clean end), collecting any descriptors that came with them."""
    data = b""
    while len(data) < n:
        chunk, ancillary, _flags, _addr = sock.recvmsg(
            n - len(data), socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        if not chunk:
            if data:
                raise ConnectionError("a vhost-user message was cut short")
            return None
        data += chunk
    return data


class ProtocolFeatureMask:
    """Listens on ``path`` and relays its one frontend to the backend at ``backend``."""

    def __init__(self, path: Path, backend: Path, hide: int = DEVICE_STATE) -> None:
        self.path = path
        self.backend = backend
        self.hide = hide
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(path))
        self._listener.listen(1)
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, name="vu-proxy", daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        try:
            frontend, _ = self._listener.accept()
        except OSError:
            return  # closed before a frontend came
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sockets += [frontend, backend]
        try:
            backend.connect(os.fspath(self.backend))
        except OSError as e:
            self.error = e
            frontend.close()
            return
        answers = threading.Thread(
            target=self._pump, args=(backend, frontend, True), name="vu-proxy-answers"
        )
        self._threads.append(answers)
        answers.start()
        self._pump(frontend, backend, False)

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while True:
                fds: list[int] = []
                header = _recv_exact(source, _HEADER.size, fds)
                if header is None:
                    break
                request, flags, size = _HEADER.unpack(header)
                body = _recv_exact(source, size, fds) if size else b""
                if body is None:
                    raise ConnectionError("a vhost-user message was cut short")
                if (
                    answers
                    and request == GET_PROTOCOL_FEATURES
                    and flags & REPLY_FLAG
                    and size == 8
                ):
                    (features,) = struct.unpack("<Q", body)
                    body = struct.pack("<Q", features & ~self.hide)
                ancillary = (
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    if fds
                    else []
                )
                try:
                    sink.sendmsg([header + body], ancillary)
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError as e:
            if not isinstance(e, ConnectionResetError | BrokenPipeError):
                self.error = e
        finally:
            # Either side going ends the other: the backend sees its frontend go.
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stops listening, ends both connections and joins the relay's threads."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._threads[0].join(10)  # it started the other one, if any
        for thread in self._threads[1:]:
            thread.join(10)
        for sock in self._sockets:
            sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ProtocolFeatureMask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
