"""Fuzz target of the API server's request reader and router (python/vmkit/api.py).

Each input is the byte stream of one client connection: it is written into
one end of a socketpair (then shut for writing) and a real ``_Connection``
serves the other end, with the real router in front of a real ``Vmm`` that
only refuses to boot VMs (a fuzzer must not start guests). The harness
checks that serving never raises, never answers "Internal error" (an
unexpected exception in the router) and that every answer is framed as
micro_http frames it.

    python fuzz/http/fuzz_api.py fuzz/corpus/http_api          # fuzz (libFuzzer flags work)
    python fuzz/http/fuzz_api.py FILE...                       # replay inputs

Driven by atheris (coverage-guided, libFuzzer) on CPython.
"""

from __future__ import annotations

import re
import socket
import sys
from typing import NoReturn

import atheris

with atheris.instrument_imports(include=["vmkit"]):
    from vmkit import api
    from vmkit.vmm import ApiError, Vmm

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) \r\n")


class NoBootVmm(Vmm):
    """The real VMM state machine, without guests (booted or migrated in)."""

    def boot(self) -> NoReturn:
        raise ApiError("booting is disabled in the fuzz harness")

    def receive_migration(self, receiver_url: str) -> NoReturn:
        # It would listen at a path the input names and wait for a sender.
        raise ApiError("receiving a migration is disabled in the fuzz harness")


class Server:
    """What ``_Connection`` needs of ``ApiServer``: limits, the router, no eviction."""

    def __init__(self) -> None:
        self.vmm = NoBootVmm(watchdog_timeout=None)
        self.router = api._Router(self.vmm)
        self.max_body = 4096
        self.request_timeout = 1.0
        self.header_timeout = 1.0
        self.idle_timeout = 1.0
        self.closing = False

    def _mark_busy(self, conn: socket.socket, busy: bool) -> bool:
        return True


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Splits what the server wrote into (status, body), checking the framing."""
    answers = []
    while data:
        match = _STATUS.match(data)
        assert match, f"not a status line: {data[:40]!r}"
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"unterminated head: {head!r}"
        lines = head.split(b"\r\n")[1:]
        assert lines[0] in (b"Server: Cloud Hypervisor API", b"Server: Firecracker API"), lines
        assert lines[1] in (b"Connection: keep-alive", b"Connection: close"), lines
        length = 0
        for line in lines[2:]:
            name, _, value = line.partition(b": ")
            if name == b"Content-Length":
                length = int(value)
            else:
                assert name == b"Content-Type" and value == b"application/json", line
        assert len(rest) >= length, "short body"
        answers.append((int(match.group(1)), rest[:length]))
        data = rest[length:]
    return answers


def test_one_input(data: bytes) -> None:
    server = Server()
    client, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(5)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        connection = api._Connection(served, server)  # type: ignore[arg-type]
        connection.serve()
        served.shutdown(socket.SHUT_WR)
        written = b""
        while chunk := client.recv(65536):
            written += chunk
    finally:
        client.close()
        served.close()
    for status, body in responses(written):
        assert status in (100, 200, 204, 400, 404, 500), status
        assert not body.startswith(b"Internal error"), body


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
