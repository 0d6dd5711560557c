"""Test helpers for the API client side: a fake API server and an OpenAPI checker.

``FakeApiServer`` listens on a unix socket in a thread, records each request's
raw bytes (and the file descriptors that came with it, SCM_RIGHTS) and answers
with the responses queued by the test (default: 204 without a body). It checks
the wire format of ``vmkit remote`` and ``vmkit.Client`` without a VMM.

``check_schema(name, value)`` validates a JSON value against a schema of the
shipped OpenAPI description (``vmkit.client.openapi_spec()``), and
``check_response(path, method, status, body)`` against the response that the
description gives for that path, method and status.
"""

from __future__ import annotations

import array
import json
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from vmkit.client import openapi_spec

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    418: "I'm a teapot",
    500: "Internal Server Error",
}


@dataclass
class Request:
    """One request as the fake server received it."""

    raw: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.raw.split(b"\r\n\r\n", 1)[0].decode()

    @property
    def request_line(self) -> str:
        return self.head.split("\r\n", 1)[0]

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1]

    def json(self) -> Any:
        return json.loads(self.body)


def response(
    status: int,
    body: bytes | str | None = None,
    *,
    content_length: bool | None = None,
    reason: str | None = None,
) -> bytes:
    """A response as Cloud Hypervisor's server writes it (Content-Length only with a body)."""
    data = body.encode() if isinstance(body, str) else body
    with_length = data is not None if content_length is None else content_length
    head = (
        f"HTTP/1.1 {status} {reason if reason is not None else REASONS.get(status, 'Unknown')}\r\n"
        "Server: Cloud Hypervisor API\r\n"
        "Connection: keep-alive\r\n"
        "Content-Type: application/json\r\n"
    )
    if with_length:
        head += f"Content-Length: {len(data or b'')}\r\n"
    return head.encode() + b"\r\n" + (data or b"")


class FakeApiServer:
    """A unix-socket server that records requests and plays back queued responses."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[Request] = []
        self.responses: deque[bytes | None] = deque()
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def reply(self, *responses: bytes | None) -> None:
        """Queues responses (raw bytes; None closes the connection without answering)."""
        self.responses.extend(responses)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for request in self.requests:
            for fd in request.fds:
                try:
                    socket.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> FakeApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    request = self._read(conn)
                except (OSError, ValueError):
                    continue
                if request is None:
                    continue
                self.requests.append(request)
                answer = self.responses.popleft() if self.responses else response(204)
                if answer is not None:
                    conn.sendall(answer)

    @staticmethod
    def _read(conn: socket.socket) -> Request | None:
        data = b""
        fds: list[int] = []
        fd_size = array.array("i").itemsize
        while True:
            chunk, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fd_size))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % fd_size])
                    fds.extend(received)
            if not chunk:
                return Request(data, fds) if data else None
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            length = 0
            for line in data[:end].decode().split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if len(data) >= end + 4 + length:
                return Request(data, fds)


def request_bytes(method: str, endpoint: str, body: bytes | None = None) -> bytes:
    """What ch-remote writes for one command (ch-reference §4.6), spelled out."""
    raw = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
    if body is not None:
        raw += f"Content-Length: {len(body)}\r\n"
    return raw.encode() + b"\r\n" + (body or b"")


@cache
def _registry() -> Registry:
    resource = Resource.from_contents(openapi_spec(), default_specification=DRAFT202012)
    return Registry().with_resource("urn:vmkit:openapi", resource)


@cache
def _validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"urn:vmkit:openapi#{pointer}"}, registry=_registry())


def check_schema(name: str, value: Any) -> None:
    """Validates ``value`` against ``components/schemas/<name>``; raises ValidationError."""
    _validator(f"/components/schemas/{name}").validate(value)


def check_response(path: str, method: str, status: int, body: bytes | None) -> None:
    """Checks a response against what the OpenAPI description declares for it.

    The status must be listed for ``path`` and ``method``; a declared JSON
    body must be present and valid, an undeclared one absent or empty.
    """
    spec = openapi_spec()
    operation = spec["paths"][path][method.lower()]
    declared = operation["responses"].get(str(status))
    assert declared is not None, f"{method} {path}: status {status} is not in the OpenAPI file"
    if "$ref" in declared:
        return  # the error responses: plain text
    content = declared.get("content")
    if content is None:
        assert not body, f"{method} {path} {status}: unexpected body {body!r}"
        return
    assert body, f"{method} {path} {status}: the body is missing"
    pointer = content["application/json"]["schema"]["$ref"].removeprefix("#")
    _validator(pointer).validate(json.loads(body))
