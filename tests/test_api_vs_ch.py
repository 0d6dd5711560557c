"""vmkit's API server against cloud-hypervisor's, byte for byte, on raw requests.

Both VMMs run idle (no VM); each request goes on a fresh connection to
each, and the answers must be the same bytes: the status line without a
reason phrase, the headers (no Content-Type or Content-Length without a
body), the bodies, including serde_json's texts and positions for bodies
that are not the JSON an action takes, and micro_http's own 400s.

One difference is deliberate and normalised: after a request micro_http
cannot read, v37 says ``Connection: keep-alive`` and reads on from wherever
it stopped; vmkit says ``Connection: close`` and closes (the framing is lost).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _chpeer import CH_DIR, CH_MISSING, VmmProcess

pytestmark = [
    pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING),
    pytest.mark.vmkit_kvm,
]


def put(action: str, body: bytes) -> bytes:
    return b"PUT /api/v1/%s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
        action.encode(),
        len(body),
        body,
    )


REQUESTS: list[bytes] = [
    b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n",
    b"PUT /api/v1/vm.delete HTTP/1.1\r\n\r\n",
    b"GET /api/v1/vm.counters HTTP/1.1\r\n\r\n",
    b"GET /api/v1/nope HTTP/1.1\r\n\r\n",
    b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\n\r\n",
    b"GET api/v1/vmm.ping HTTP/1.1\r\n\r\n",
    b"PATCH /api/v1/vm.boot HTTP/1.1\r\n\r\n",
    b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n",
    b"PUT /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
    b"PUT /api/v1/vm.snapshot HTTP/1.1\r\n\r\n",
    b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n{",
    put("vm.boot", b"{}"),
    put("vm.create", b"{"),
    put("vm.create", b'{"cpus":{"boot_vcpus":' + b"1" * 4380 + b"}}"),
    put("vm.create", b'{"payload":{"kernel":"\\ud800"}}'),
    # micro_http's own answers
    b"POST /api/v1/vm.delete HTTP/1.1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n",
    b"GET /api/v1/vmm.ping HTTP/1.1\r\nBadheader\r\n\r\n",
    b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
]

# Bodies that are not the JSON the action takes: serde_json's text and position.
BAD_BODIES: list[tuple[str, bytes]] = [
    ("vm.remove-device", body)
    for body in [
        b'{"id":"\\ud800"}', b'{"id":"\\udc00x"}', b'{"id":"\\ud800x"}',
        b'{"id":"\\ud800\\u0041"}', b'{"id":"\\ud800\\n"}', b'{"id":"\\u12"}',
        b'{"id":"\\u12G4"}', b'{"id":"\\x"}', b'{"id":"a\x01"}', b'{"id":"a\xff"}',
        b'{"id":"a', b'{"id":', b'{"id"', b'{"id" 1}', b'{"id":1}', b'{"id":1.5}',
        b'{"id":-1}', b'{"id":true}', b'{"id":null}', b'{"id":[1]}', b'{"id":{"a":1}}',
        b'{"id":"a","id":"b"}', b'{"x":1}', b'{"x":[1,{"y":nul}],"id":"a"}', b"{}", b"{,}",
        b'{"id":"a",}', b"{1:2}", b"nope", b"x", b"  \n  x", b"tru", b"true", b'"s"', b"1",
        b"[]", b'["a","b"]', b'["a"', b"[1]", b'{"id":"a"} x', b'{"id":"a"}\n\n  x',
        b'{"id":"a"', b'{"id":"a"]', b"[" * 200, b'{"x":' + b"[" * 200,
        b'\xef\xbb\xbf{"id":"a"}',
    ]
] + [
    ("vm.resize", body)
    for body in [
        b'{"desired_ram":' + b"1" * 4380 + b"}", b'{"desired_ram":' + b"1" * 100 + b"}",
        b'{"desired_ram":-' + b"1" * 400 + b"}", b'{"desired_ram":1e5}',
        b'{"desired_ram":1.0}', b'{"desired_ram":1.5e300}', b'{"desired_ram":1e400}',
        b'{"desired_ram":1e-400}', b'{"desired_ram":0.1}', b'{"desired_ram":123456789.123}',
        b'{"desired_ram":-0}', b'{"desired_ram":-0.0}', b'{"desired_ram":-5}',
        b'{"desired_ram":-9223372036854775809}', b'{"desired_ram":18446744073709551616}',
        b'{"desired_ram":01}', b'{"desired_ram":1.}', b'{"desired_ram":1e}',
        b'{"desired_ram":.5}', b'{"desired_ram":-}', b'{"desired_ram":+1}',
        b'{"desired_ram":NaN}', b'{"desired_ram":Infinity}', b'{"desired_vcpus":256}',
        b'{"desired_vcpus":"2"}', b'{"desired_vcpus":2,"desired_vcpus":3}', b"[1]",
        b"[1,2,3,4]", b'[1,"x",3]', b"[]", b'{"desired_ram":\n1x}',
    ]
] + [
    ("vm.resize-zone", b'{"id":"z"}'),
    ("vm.resize-zone", b'{"desired_ram":1}'),
    ("vm.send-migration", b'{"destination_url":"x","local":1}'),
    ("vm.send-migration", b'{"destination_url":"x","local":"yes"}'),
    ("vm.snapshot", b'"x"'),
    ("vm.snapshot", b'{"destination_url":5}'),
]  # fmt: skip


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="vmkit-wire-", dir="/tmp"))
    peers: list[VmmProcess] = []
    try:
        for kind in ("ch", "vmkit"):
            peers.append(VmmProcess(kind, workdir / f"{kind}.sock", workdir / f"{kind}.log"))
        yield {peer.kind: peer.socket_path for peer in peers}
    finally:
        for peer in peers:
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def exchange(path: Path, request: bytes) -> bytes:
    """Sends ``request`` on a fresh connection; returns the answer's bytes (an interim
    100 Continue and the final answer), read by their framing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(request)
        answer = b""
        start = 0  # where the answer being read begins
        while True:
            end = answer.find(b"\r\n\r\n", start)
            if end >= 0:
                head = answer[start:end].decode("latin-1").lower()
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name == "content-length":
                        length = int(value)
                if len(answer) >= end + 4 + length:
                    if head.startswith("http/1.1 100 "):
                        start = end + 4
                        continue
                    return answer
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def compare(servers: dict[str, Path], request: bytes) -> None:
    answers = {kind: exchange(path, request) for kind, path in servers.items()}
    ch, vmkit = answers["ch"], answers["vmkit"]
    assert ch.startswith(b"HTTP/1.1 "), answers
    if b"Server: Firecracker API" in ch and b" 100 " not in ch[:13]:
        vmkit = vmkit.replace(b"Connection: close\r\n", b"Connection: keep-alive\r\n", 1)
    assert vmkit == ch


@pytest.mark.parametrize("request_bytes", REQUESTS)
def test_answers_are_v37s_bytes(servers: dict[str, Path], request_bytes: bytes) -> None:
    compare(servers, request_bytes)


@pytest.mark.parametrize(("action", "body"), BAD_BODIES)
def test_bad_bodies_get_serde_json_texts(
    servers: dict[str, Path], action: str, body: bytes
) -> None:
    compare(servers, put(action, body))
