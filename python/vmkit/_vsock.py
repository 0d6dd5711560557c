"""Host-side streams to a guest's vsock ports through Cloud Hypervisor's hybrid
vsock: the VMM listens on the ``--vsock socket=`` path; a client writes
``CONNECT <port>\\n`` and, once the guest accepts, reads ``OK <host port>\\n``
and then talks to the guest's program."""

from __future__ import annotations

import socket
import time

#: The longest answer line the VMM writes (``OK 4294967295\n``), with room.
_MAX_LINE = 32


def connect(path: str, port: int, timeout: float) -> socket.socket:
    """A stream connected to guest port ``port`` through the vsock socket at
    ``path``. Raises ``ConnectionRefusedError`` when the guest refuses (nothing
    listens on that port: the VMM closes the stream), ``TimeoutError`` when no
    answer comes within ``timeout`` seconds, ``OSError`` when ``path`` cannot be
    reached. The stream is blocking, with no timeout, and holds nothing of the
    guest's data yet."""
    if not 0 <= port <= 0xFFFF_FFFF:
        raise ValueError(f"vsock port {port} is not a 32-bit port number")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + timeout
        stream.settimeout(timeout)
        stream.connect(path)
        stream.sendall(f"CONNECT {port}\n".encode())
        line = b""
        # Byte by byte: what follows the line is the guest's and stays in the socket.
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"vsock port {port}: no answer within {timeout} s")
            stream.settimeout(remaining)
            try:
                byte = stream.recv(1)
            except TimeoutError:
                raise TimeoutError(f"vsock port {port}: no answer within {timeout} s") from None
            if not byte:
                raise ConnectionRefusedError(f"vsock port {port}: the guest refused the connection")
            line += byte
            if len(line) > _MAX_LINE:
                raise ConnectionError(f"vsock port {port}: unexpected answer {line!r}")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"vsock port {port}: unexpected answer {line!r}")
        stream.settimeout(None)
        return stream
    except BaseException:
        stream.close()
        raise
