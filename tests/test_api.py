"""The HTTP API (ch-reference §3.2, §3.3 and §4), driven with raw HTTP over the UNIX socket.

Requests are written exactly as ch-remote writes them (ref §4.6). Most tests run an
in-process server (``vmkit.api.ApiServer`` over a ``vmkit.vmm.Vmm``); the process-level
behaviour (start-up order, flags, exit, the socket file) runs ``python -m vmkit`` as a
subprocess. Tests that boot the test guest need read-write /dev/kvm.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _http import Reply, read_reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmkit import VmConfig, testguest
from vmkit.api import ACTIONS, ApiServer
from vmkit.cli import api_socket_option, rust_duration
from vmkit.pytest_plugin import kvm_missing
from vmkit.vmm import EventMonitor, Vmm, rust_debug_str

ROOT = Path(__file__).resolve().parent.parent
needs_kvm = pytest.mark.vmkit_kvm

NOT_CREATED = "VM is not created"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
CONFIG_MISSING = "VM config is missing"
PAUSE_PAUSED = (
    "Cannot pause VM: Failed to pause migratable component: "
    "Invalid transition: InvalidStateTransition(Paused, Paused)"
)
RESUME_RUNNING = (
    "Cannot resume VM: Failed to resume migratable component: "
    "Invalid transition: InvalidStateTransition(Running, Running)"
)
SNAPSHOT_RUNNING = (
    "Cannot snapshot VM: Failed to snapshot migratable component: "
    "Trying to snapshot while VM is running"
)


# -- a raw HTTP client ---------------------------------------------------------------------


Body = bytes | str | dict[str, Any] | None


def encode(body: Body) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def ch_request(method: str, action: str, body: bytes | None) -> bytes:
    """The request as ch-remote's api_client writes it (ref §4.6)."""
    head = f"{method} /api/v1/{action} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


class Client:
    """One keep-alive connection."""

    def __init__(self, path: str | Path, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))

    def send(self, method: str, action: str, body: Body = None, fds: Sequence[int] = ()) -> Reply:
        data = ch_request(method, action, encode(body))
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)
        return read_reply(self.sock)

    def raw(self, data: bytes) -> Reply:
        self.sock.sendall(data)
        return read_reply(self.sock)

    def closed_by_server(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(
    path: str | Path, method: str, action: str, body: Body = None, fds: Sequence[int] = ()
) -> Reply:
    with Client(path) as client:
        return client.send(method, action, body, fds)


def assert_reply(reply: Reply, status: int, body: str | bytes | None = None) -> None:
    assert reply.headers["server"] == "Cloud Hypervisor API"
    assert reply.status == status, reply
    if reply.body:
        assert reply.headers["content-type"] == "application/json"
    else:  # v37 sends neither header with an empty answer
        assert "content-type" not in reply.headers, reply
        assert "content-length" not in reply.headers, reply
    if body is not None:
        expected = body.encode() if isinstance(body, str) else body
        assert reply.body == expected, reply


def assert_http_error(reply: Reply, message: str) -> None:
    """micro_http's own 400 for a request it cannot read (bytes as v37 sends them)."""
    assert reply.status == 400, reply
    assert reply.headers["server"] == "Firecracker API"
    assert reply.headers["content-type"] == "application/json"
    expected = f'{{ "error": "{message}\nAll previous unanswered requests will be dropped." }}'
    assert reply.text == expected


def parse_events(text: str) -> list[dict[str, Any]]:
    """The event monitor's output: pretty JSON objects, each followed by a blank line.

    Stops at the first text that is not an event (old file content after the events).
    """
    decoder = json.JSONDecoder()
    events = []
    pos = 0
    while text.startswith("{", pos):
        event, end = decoder.raw_decode(text, pos)
        assert text[end : end + 2] == "\n\n", text[end : end + 20]
        events.append(event)
        pos = end + 2
    return events


def names(events: list[dict[str, Any]]) -> list[str]:
    result = []
    for e in events:
        name = f"{e['source']} {e['event']}"
        if e["properties"]:
            name += " " + ",".join(f"{k}={v}" for k, v in sorted(e["properties"].items()))
        result.append(name)
    return result


# -- configs -------------------------------------------------------------------------------


def guest_config(
    *extra: str,
    ticks: int = 100_000,
    tick_ms: int = 10,
    cpus: str = "boot=2",
    memory: str = "size=256M",
) -> dict[str, Any]:
    """A test-guest config that stays up for ticks * tick_ms milliseconds, then powers off."""
    argv = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=ticks, tick_ms=tick_ms),
        "--cpus", cpus, "--memory", memory, "--serial", "null", "--console", "off",
        *extra,
    ]  # fmt: skip
    return VmConfig.from_cli(argv).to_dict()


def cold_config(*extra: str) -> dict[str, Any]:
    """A config that is never booted (the kernel need not exist)."""
    argv = ["--kernel", "/nonexistent/vmlinux", "--cpus", "boot=2", *extra]
    return VmConfig.from_cli(argv).to_dict()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary directory (UNIX socket paths are limited to 107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="vmkit-api-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Api:
    path: Path
    vmm: Vmm
    server: ApiServer
    events_path: Path

    def __call__(
        self, method: str, action: str, body: Body = None, fds: Sequence[int] = ()
    ) -> Reply:
        return call(self.path, method, action, body, fds)

    def put(self, action: str, body: Body = None, fds: Sequence[int] = ()) -> Reply:
        return self("PUT", action, body, fds)

    def get(self, action: str) -> Reply:
        return self("GET", action)

    def info(self) -> dict[str, Any]:
        reply = self.get("vm.info")
        assert reply.status == 200, reply
        result: dict[str, Any] = reply.json()
        return result

    def state(self) -> str:
        state: str = self.info()["state"]
        return state

    def events(self) -> list[str]:
        return names(parse_events(self.events_path.read_text()))


def start_api(workdir: Path, **options: Any) -> Api:
    events_path = workdir / "events.json"
    monitor = EventMonitor(os.open(events_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    vmm = Vmm(events=monitor)
    server = ApiServer(vmm, workdir / "api.sock", **options)
    server.start()
    return Api(workdir / "api.sock", vmm, server, events_path)


def stop_api(api: Api) -> None:
    api.server.close()
    api.vmm.close()
    assert api.vmm.events is not None
    api.vmm.events.close()


@pytest.fixture
def api(workdir: Path) -> Iterator[Api]:
    """An in-process API server with an event monitor."""
    server = start_api(workdir)
    try:
        yield server
    finally:
        stop_api(server)


class Vmkit:
    """``python -m vmkit ...`` as a subprocess; output goes to files in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        pass_fds: Sequence[int] = (),
        python_code: bool = False,
    ) -> None:
        self.workdir = workdir
        self.out = open(workdir / "stdout", "wb")
        self.err = open(workdir / "stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, *(["-c"] if python_code else ["-m", "vmkit"]), *args],
            stdin=subprocess.DEVNULL,
            stdout=self.out,
            stderr=self.err,
            cwd=ROOT,
            pass_fds=tuple(pass_fds),
        )

    def wait_ready(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vmkit exited with {self.proc.returncode}: {self.stderr}")
            try:
                if call(path, "GET", "vmm.ping").status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the API did not come up: {self.stderr}")
            time.sleep(0.05)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    @property
    def stderr(self) -> str:
        self.err.flush()
        return (self.workdir / "stderr").read_bytes().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()
        self.err.close()


@pytest.fixture
def vmkit(workdir: Path) -> Iterator[Callable[..., Vmkit]]:
    """Starts vmkit processes; kills whatever is still running afterwards."""
    started: list[Vmkit] = []

    def start(*args: str, pass_fds: Sequence[int] = (), python_code: bool = False) -> Vmkit:
        process = Vmkit(workdir, args, pass_fds, python_code)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def run_vmkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmkit", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


# == transport (ref §4.1) ====================================================================


def test_ping(api: Api) -> None:
    reply = api.get("vmm.ping")
    assert_reply(reply, 200)
    assert reply.reason == ""  # micro_http writes no reason phrase; ch-remote relies on it
    data = reply.json()
    assert list(data) == ["build_version", "version", "pid", "features"]
    assert data["pid"] == os.getpid()
    assert data["features"] == ["io_uring", "kvm"]  # as a default v37 build lists them
    assert data["build_version"] == f"vmkit v{data['version']}"
    assert data["version"] != "37.0.0"
    assert int(reply.headers["content-length"]) == len(reply.body)


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/vm.nothing",
        "/api/v1/",
        "/",
        "/api/v1",
        "/api/v1/vmm.ping?x=1",  # no query handling
        "/api/v1/vmm.ping/",
        "/api/v2/vmm.ping",
        "/api/v1/VMM.PING",
        "/api/v1/vm.coredump",  # feature guest_debug is not built (ref §4.1)
        "/api/v1/vm.info#x",
        "/api/v1/../v1/vmm.ping",
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
def test_unknown_paths_are_404(api: Api, target: str, method: str) -> None:
    with Client(api.path) as client:
        reply = client.raw(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert_reply(reply, 404, "Not Found")
    assert reply.reason == ""


def test_absolute_form_target_is_routed(api: Api) -> None:
    with Client(api.path) as client:
        reply = client.raw(b"GET http://localhost/api/v1/vmm.ping HTTP/1.1\r\n\r\n")
    assert_reply(reply, 200)


BAD = "Bad Request"


@pytest.mark.parametrize(
    ("method", "action", "body", "status", "expected"),
    [
        # wrong method on the special routes: 400 "Bad Request"
        ("PUT", "vm.info", None, 400, BAD),
        ("PATCH", "vm.info", None, 400, BAD),
        ("PUT", "vmm.ping", None, 400, BAD),
        ("PATCH", "vmm.ping", None, 400, BAD),
        ("GET", "vm.create", None, 400, BAD),
        ("PATCH", "vm.create", "{}", 400, BAD),
        ("GET", "vmm.shutdown", None, 400, BAD),
        ("PATCH", "vmm.shutdown", None, 400, BAD),
        # the generic action routes: GET on a PUT action is "Bad Request", PATCH an empty 400
        ("GET", "vm.boot", None, 400, BAD),
        ("GET", "vm.add-disk", None, 400, BAD),
        ("GET", "vm.resize", None, 400, BAD),
        ("PATCH", "vm.boot", None, 400, ""),
        ("PATCH", "vm.add-disk", '{"path":"/x"}', 400, ""),
        ("PATCH", "vm.counters", None, 400, ""),
        ("PUT", "vm.counters", None, 400, BAD),
        ("PUT", "vm.counters", "{}", 400, BAD),
        # a body given to a body-less action, or a required body missing
        ("PUT", "vm.boot", "{}", 400, BAD),
        ("PUT", "vm.pause", "x", 400, BAD),
        ("PUT", "vm.power-button", "{}", 400, BAD),
        ("PUT", "vm.add-disk", None, 400, BAD),
        ("PUT", "vm.add-net", None, 400, BAD),
        ("PUT", "vm.remove-device", None, 400, BAD),
        ("PUT", "vm.resize", None, 400, BAD),
        ("PUT", "vm.resize-zone", None, 400, BAD),
        ("PUT", "vm.snapshot", None, 400, BAD),
        ("PUT", "vm.restore", None, 400, BAD),
        ("PUT", "vm.send-migration", None, 400, BAD),
        ("PUT", "vm.receive-migration", None, 400, BAD),
        ("PUT", "vm.create", None, 400, ""),  # vm.create's 400 has no body
        # bodies the GET routes and vmm.shutdown ignore
        ("GET", "vm.info", "{}", 500, NOT_CREATED),
        ("GET", "vm.counters", "{}", 500, NOT_RUNNING),
        ("GET", "vmm.ping", "xyz", 200, None),
    ],
)
def test_method_and_body_rules(
    api: Api, method: str, action: str, body: str | None, status: int, expected: str | None
) -> None:
    reply = api(method, action, body)
    assert_reply(reply, status, expected)


def test_content_length_zero_means_no_body(api: Api) -> None:
    with Client(api.path) as client:
        reply = client.raw(b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert_reply(reply, 500, CONFIG_MISSING)
        reply = client.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert_reply(reply, 400, "")


@pytest.mark.parametrize("method", ["POST", "DELETE", "HEAD", "OPTIONS", "get", "CONNECT"])
def test_methods_other_than_get_put_patch_are_refused(api: Api, method: str) -> None:
    with Client(api.path) as client:
        reply = client.raw(f"{method} /api/v1/vmm.ping HTTP/1.1\r\n\r\n".encode())
        assert_http_error(reply, BAD_METHOD)
        assert client.closed_by_server()


@pytest.mark.parametrize(
    ("action", "body", "message"),
    [
        ("vm.create", "{", "EOF while parsing an object at line 1 column 1"),
        ("vm.create", '{"memory":{}}', "missing field `size` at line 1 column 12"),
        ("vm.create", "null", "invalid type: null, expected struct VmConfig at line 1 column 4"),
        ("vm.create", '{"cpus":{"boot_vcpus":"x"}}', 'invalid type: string "x", expected u8'),
        ("vm.create", "{} x", "trailing characters at line 1 column 4"),
        ("vm.add-disk", '{"path":1}', "invalid type: integer `1`, expected a string"),
        ("vm.add-net", '{"num_queues":-1}', "invalid value: integer `-1`, expected usize"),
        ("vm.add-fs", '{"tag":"x"}', "missing field `socket`"),
        ("vm.add-pmem", "[]", "invalid length 0, expected struct PmemConfig with 6 elements"),
            ("vm.add-pmem", "1", "invalid type: integer `1`, expected struct PmemConfig"),
        ("vm.add-device", "{}", "missing field `path`"),
        ("vm.add-user-device", "{}", "missing field `socket`"),
        ("vm.add-vdpa", "{}", "missing field `path`"),
        ("vm.add-vsock", '{"cid":3}', "missing field `socket`"),
        ("vm.resize", '{"desired_vcpus":"x"}', 'invalid type: string "x", expected u8'),
        ("vm.resize", '{"desired_vcpus":256}', "invalid value: integer `256`, expected u8"),
        ("vm.resize", '{"desired_ram":1.5}', "invalid type: floating point `1.5`, expected u64"),
        ("vm.resize", "[1]", "invalid length 1, expected struct VmResizeData with 3 elements"),
            ("vm.resize", "[1, 2, 3, 4]", "trailing characters at line 1 column 11"),
            ("vm.resize", "true", "invalid type: boolean `true`, expected struct VmResizeData"),
        ("vm.resize", '{"desired_ram":1,"desired_ram":2}', "duplicate field `desired_ram`"),
        ("vm.resize-zone", '{"id":"z"}', "missing field `desired_ram`"),
        ("vm.resize-zone", '{"id":1,"desired_ram":1}',
         "invalid type: integer `1`, expected a string"),
        ("vm.remove-device", "{}", "missing field `id`"),
        ("vm.remove-device", '{"id":null}', "invalid type: null, expected a string"),
        ("vm.remove-device", "nope", "expected ident at line 1 column 2"),
        # serde_json's limits (texts from v37): no 4,300-digit Python ints, no lone surrogates
        ("vm.resize", '{"desired_ram":' + "1" * 4380 + "}",
         "number out of range at line 1 column 4395"),
        ("vm.resize", '{"desired_ram":' + "9" * 5000 + "}",
         "number out of range at line 1 column 5015"),
        ("vm.resize", '{"desired_ram":' + "1" * 100 + "}",
         "invalid type: floating point `1111111111111111" + "0" * 84 + "`, expected u64 at "
         "line 1 column 115"),
        ("vm.remove-device", '{"id":"\\ud800"}',
         "unexpected end of hex escape at line 1 column 14"),
        ("vm.remove-device", '{"id":"\\udc00x"}',
         "lone leading surrogate in hex escape at line 1 column 13"),
        ("vm.remove-device", '{"id":"\\ud800\\u0041"}',
         "lone leading surrogate in hex escape at line 1 column 19"),
        ("vm.remove-device", '{"x":' + "[" * 5000,
         "EOF while parsing a list at line 1 column 5005"),
        ("vm.snapshot", '"x"', 'invalid type: string "x", expected struct VmSnapshotConfig'),
        ("vm.restore", "{}", "missing field `source_url`"),
        # vmkit's own field: a clone's disk images by id.
        ("vm.restore", '{"source_url":"file:///x","disks":["a"]}',
         'disks: expected an object of disk ids to image paths, got ["a"]'),
        ("vm.restore", '{"source_url":"file:///x","disks":{"_disk0":1}}',
         'disks: expected an object of disk ids to image paths, got {"_disk0": 1}'),
        ("vm.send-migration", '{"destination_url":"x","local":1}',
         "invalid type: integer `1`, expected a boolean"),
        ("vm.receive-migration", "{}", "missing field `receiver_url`"),
    ],
)  # fmt: skip
def test_json_errors_are_400_with_the_parse_error(
    api: Api, action: str, body: str, message: str
) -> None:
    reply = api.put(action, body)
    assert_reply(reply, 400)
    assert reply.text.startswith(message), reply.text


def test_keep_alive(api: Api) -> None:
    with Client(api.path) as client:
        for _ in range(50):
            reply = client.send("GET", "vmm.ping")
            assert_reply(reply, 200)
            assert reply.headers["connection"] == "keep-alive"
        assert_reply(client.send("PUT", "vm.create", cold_config()), 204)
        assert client.send("GET", "vm.info").json()["state"] == "Created"
        assert_reply(client.send("PUT", "vm.create"), 400, "")
        assert_reply(client.send("GET", "vmm.ping"), 200)


def test_connection_close_is_honoured(api: Api) -> None:
    with Client(api.path) as client:
        reply = client.raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert reply.headers["connection"] == "close"
        assert client.closed_by_server()
    with Client(api.path) as client:
        client.raw(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
        assert client.closed_by_server()


def test_expect_100_continue(api: Api) -> None:
    body = json.dumps(cold_config()).encode()
    with Client(api.path) as client:
        client.sock.sendall(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += client.sock.recv(1)
        assert interim == (
            b"HTTP/1.1 100 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
        )
        assert_reply(client.raw(body), 204)


def test_many_concurrent_clients(api: Api) -> None:
    api.put("vm.create", cold_config())
    failures: list[str] = []

    def worker(n: int) -> None:
        try:
            with Client(api.path) as client:
                for i in range(20):
                    if (n + i) % 2:
                        reply = client.send("GET", "vmm.ping")
                        ok = reply.status == 200
                    else:
                        reply = client.send("GET", "vm.info")
                        ok = reply.status == 200 and reply.json()["state"] == "Created"
                    if not ok:
                        failures.append(repr(reply))
        except Exception as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"clients still waiting for answers after 60 s: {stuck}"
    assert not failures


INVALID_REQUEST = "Invalid request."
BAD_METHOD = "Invalid HTTP Method: Unsupported HTTP method."
BAD_VERSION = "Invalid HTTP Version: Unsupported HTTP version."
BAD_HEADER = "Invalid header. Reason: Header is incorrectly formatted. Key: "
BAD_VALUE = "Invalid header. Reason: Invalid value. Key:"


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        # the texts are those v37's cloud-hypervisor answers (checked against it)
        (b"GET /api/v1/vmm.ping\r\n\r\n", INVALID_REQUEST),  # two parts
        (b"GARBAGE\r\n\r\n", INVALID_REQUEST),
        (b"GET  /api/v1/vmm.ping HTTP/1.1\r\n\r\n", INVALID_REQUEST),
        (b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", BAD_VERSION),
        (b"GET /api/v1/vmm.ping HTTP/1.1 x\r\n\r\n", BAD_VERSION),
        (b"POST /api/v1/vm.delete HTTP/1.1\r\n\r\n", BAD_METHOD),
        (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", BAD_METHOD),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nBadheader\r\n\r\n", BAD_HEADER + "Badheader"),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\n: empty name\r\n\r\n", BAD_HEADER + ": empty name"),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nBad Name: x\r\n\r\n", BAD_HEADER + "Bad Name: x"),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\n folded: x\r\n\r\n", BAD_HEADER + " folded: x"),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            BAD_VALUE + "Content-Length; Value: abc",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            BAD_VALUE + "Content-Length; Value: -1",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            BAD_VALUE + "Content-Length; Value: +5",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            BAD_VALUE + "Content-Length; Value: 3",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            BAD_VALUE + "Content-Length; Value: 99999999999999999999999",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n{}",
            BAD_VALUE + "Transfer-Encoding; Value: gzip",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            BAD_VALUE + "Transfer-Encoding; Value: chunked",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n",
            INVALID_REQUEST,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}xx",
            INVALID_REQUEST,
        ),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", INVALID_REQUEST),
    ],
)
def test_malformed_requests_get_400_and_a_closed_connection(
    api: Api, request_bytes: bytes, message: str
) -> None:
    with Client(api.path) as client:
        try:
            reply = client.raw(request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent
        else:
            assert_http_error(reply, message)
            # v37 reads on after such an error; vmkit closes, as the framing is lost
            assert client.closed_by_server()
    assert_reply(api.get("vmm.ping"), 200)


def test_origin_form_without_slash_is_404_as_in_v37(api: Api) -> None:
    with Client(api.path) as client:
        assert_reply(client.raw(b"GET api/v1/vmm.ping HTTP/1.1\r\n\r\n"), 404, "Not Found")


@pytest.mark.parametrize(
    "chunks",
    [
        [b"2\r\n{}\r\n", b"0\r\n\r\n"],
        [b"1\r\n{\r\n", b"1;ext=1\r\n}\r\n", b"0\r\nTrailer: x\r\n\r\n"],
        [b"0000000000000001\r\n{\r\n1\r\n}\r\n0\r\n\r\n"],
    ],
)
def test_chunked_bodies_are_read(api: Api, chunks: list[bytes]) -> None:
    """HTTP/1.1 clients send chunked bodies when they do not know the length up front."""
    with Client(api.path) as client:
        client.sock.sendall(b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            client.sock.sendall(chunk)
        assert_reply(read_reply(client.sock), 204)
        assert client.send("GET", "vm.info").json()["state"] == "Created"  # still in step
        # the body was `{}` exactly: a second one is refused for the VM that exists
        reply = client.raw(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\n[\r\n0\r\n\r\n"
        )
        assert_reply(reply, 400, "EOF while parsing a list at line 1 column 1")


def test_go_net_http_chunked_put(api: Api) -> None:
    """Go's net/http sends a body of unknown length (an io.Reader that is not a bytes or
    strings reader, such as a pipe) chunked, with its own headers; v37 refuses that
    ("Invalid request."), vmkit reads it."""
    body = json.dumps(cold_config()).encode()
    with Client(api.path) as client:
        client.sock.sendall(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\n"
            b"User-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Accept-Encoding: gzip\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body) + b"0\r\n\r\n"
        )
        assert_reply(read_reply(client.sock), 204)
        assert client.send("GET", "vm.info").json()["config"] == cold_config()


def test_http_client_and_curl_bodies(api: Api) -> None:
    """Python's http.client (chunked for an iterable) and curl (Content-Length, Expect)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(os.fspath(api.path))

    body = json.dumps(cold_config()).encode()
    conn = UnixConnection("localhost")
    try:
        conn.request("PUT", "/api/v1/vm.create", body=iter([body[:10], body[10:]]))
        response = conn.getresponse()
        assert (response.status, response.read()) == (204, b"")
        conn.request("GET", "/api/v1/vm.info")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["state"] == "Created"
        conn.request("PUT", "/api/v1/vm.delete")
        assert conn.getresponse().status == 204
    finally:
        conn.close()
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    big = json.dumps(cold_config("--cmdline", "x" * 2000)).encode()  # curl: Expect over 1 KiB
    result = subprocess.run(
        [curl, "-sS", "--unix-socket", str(api.path), "-X", "PUT", "--data-binary", "@-",
         "-w", "%{http_code}", "http://localhost/api/v1/vm.create"],
        input=big, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, b"204"), result.stderr
    assert api.state() == "Created"


def test_oversized_body_is_refused_unread(api: Api) -> None:
    with Client(api.path) as client:
        reply = client.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n{")
        assert_http_error(
            reply,
            "Request payload with size 2097152 is larger than the limit of 1048576 "
            "allowed by server.",
        )
        assert client.closed_by_server()
    # a body just under the cap is read (and is bad JSON)
    body = b"[" * 10 + b" " * (1048576 - 10)
    reply = api.put("vm.create", body)
    assert_reply(reply, 400)


def test_truncated_requests_time_out_and_the_server_goes_on(workdir: Path) -> None:
    api = start_api(workdir, request_timeout=0.3)
    try:
        slow = [Client(api.path) for _ in range(5)]
        slow[0].sock.sendall(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        slow[1].sock.sendall(b"GET /api/v1/vmm.pi")
        slow[2].sock.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for client in slow[:3]:
            assert client.closed_by_server(timeout=5)
        assert time.monotonic() - started < 3
        # an idle keep-alive connection is not a truncated request: it stays usable
        time.sleep(0.5)
        assert_reply(slow[3].send("GET", "vmm.ping"), 200)
        for client in slow:
            client.close()
        assert_reply(api.get("vmm.ping"), 200)
    finally:
        stop_api(api)


def test_clients_that_vanish_mid_request_do_not_hurt(api: Api) -> None:
    for n in range(50):
        client = Client(api.path)
        data = ch_request("PUT", "vm.create", json.dumps(cold_config()).encode())
        client.sock.sendall(data[: n * 7 % len(data)])
        if n % 3 == 0:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
    # a client that goes before reading a long answer
    api.put("vm.create", cold_config())
    for _ in range(20):
        client = Client(api.path)
        client.sock.sendall(ch_request("GET", "vm.info", None))
        client.close()
    assert_reply(api.get("vmm.ping"), 200)
    assert api.state() == "Created"


def test_socket_file_is_private_and_removed(workdir: Path) -> None:
    api = start_api(workdir)
    mode = api.path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    stop_api(api)
    assert not api.path.exists()


def test_descriptors_sent_to_other_actions_are_closed(api: Api) -> None:
    read_end, write_end = os.pipe()
    try:
        before = set(os.listdir("/proc/self/fd"))
        reply = api("GET", "vmm.ping", fds=[read_end])
        assert_reply(reply, 200)
        time.sleep(0.1)
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        os.close(read_end)
        os.close(write_end)


# == the existence layer and the state machine (ref §4.5) ===================================

DISK = {"path": "/tmp/vmkit-api-disk.img"}
ADD_BODIES: dict[str, dict[str, Any]] = {
    "vm.add-device": {"path": "/sys/bus/pci/devices/0000:00:01.0/"},
    "vm.add-disk": DISK,
    "vm.add-fs": {"tag": "t", "socket": "/tmp/fs.sock"},
    "vm.add-pmem": {"file": "/tmp/pmem", "size": 1 << 20},
    "vm.add-net": {"tap": "tap9"},
    "vm.add-user-device": {"socket": "/tmp/ud.sock"},
    "vm.add-vdpa": {"path": "/dev/vhost-vdpa-0"},
    "vm.add-vsock": {"cid": 3, "socket": "/tmp/vsock.sock"},
}
RESIZES: dict[str, dict[str, Any]] = {
    "vm.resize": {"desired_vcpus": 1},
}


def test_row_no_config(api: Api) -> None:
    """ref §4.5, first row: nothing created."""
    assert_reply(api.get("vm.info"), 500, NOT_CREATED)
    assert_reply(api.put("vm.boot"), 500, CONFIG_MISSING)
    for action in ("vm.pause", "vm.resume", "vm.power-button", "vm.shutdown"):
        assert_reply(api.put(action), 500, NOT_RUNNING)
    assert_reply(api.put("vm.snapshot", {"destination_url": "file:///tmp/s"}), 500, NOT_RUNNING)
    assert_reply(api.get("vm.counters"), 500, NOT_RUNNING)
    assert_reply(api.put("vm.reboot"), 500, NOT_CREATED)
    for action, body in {**ADD_BODIES, **RESIZES}.items():
        assert_reply(api.put(action, body), 500, NOT_CREATED)
    assert_reply(api.put("vm.remove-device", {"id": "x"}), 500, NOT_CREATED)
    assert_reply(api.put("vm.delete"), 204, "")  # a no-op
    # restore is accepted here: this one fails reading the snapshot, without events (as v37)
    reply = api.put("vm.restore", {"source_url": "file:///tmp/vmkit-absent-snapshot"})
    assert_reply(
        reply,
        500,
        "Cannot restore VM: Failed to send migratable component snapshot: "
        "Destination is not a directory",
    )
    assert_reply(api.put("vm.create", cold_config()), 204, "")
    assert api.events() == ["vm booting"]  # v37 reports the boot attempt before its checks


def test_row_config_without_vm(api: Api) -> None:
    """ref §4.5, second row: a config, no VM object."""
    config = cold_config()
    assert_reply(api.put("vm.create", config), 204)
    info = api.info()
    assert info["state"] == "Created"
    assert info["device_tree"] is None
    assert info["config"] == config
    for action in ("vm.pause", "vm.resume", "vm.power-button", "vm.shutdown"):
        assert_reply(api.put(action), 500, NOT_RUNNING)
    assert_reply(api.put("vm.snapshot", {"destination_url": "file:///tmp/s"}), 500, NOT_RUNNING)
    assert_reply(api.get("vm.counters"), 500, NOT_RUNNING)
    assert_reply(api.put("vm.reboot"), 500, NOT_CREATED)
    assert_reply(api.put("vm.restore", {"source_url": "file:///tmp/snap"}), 500, ALREADY_CREATED)
    assert_reply(api.put("vm.create", config), 500, ALREADY_CREATED)
    assert_reply(api.put("vm.resize", {"desired_vcpus": 1}), 204, "")
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 1
    # delete forgets the config
    assert_reply(api.put("vm.delete"), 204, "")
    assert_reply(api.get("vm.info"), 500, NOT_CREATED)
    assert api.events() == ["vm deleted"]


@needs_kvm
def test_row_vm_present(api: Api) -> None:
    """ref §4.5, third row: a booted VM."""
    assert_reply(api.put("vm.create", guest_config()), 204)
    assert_reply(api.put("vm.boot"), 204, "")
    info = api.info()
    assert info["state"] == "Running"
    assert isinstance(info["device_tree"], dict)
    assert info["memory_actual_size"] == 256 << 20
    assert_reply(api.put("vm.create", guest_config()), 500, ALREADY_CREATED)
    assert_reply(api.put("vm.restore", {"source_url": "file:///tmp/snap"}), 500, ALREADY_CREATED)
    counters = api.get("vm.counters")
    assert_reply(counters, 200)
    assert isinstance(counters.json(), dict)
    # Hot-plug (tests/test_pci_hotplug.py): the same validation as a cold add
    # first, then the device manager's errors; kinds vmkit refuses at boot
    # are refused alike.
    refusals = {
        "vm.add-device": "--device (VFIO) is not supported yet",
        "vm.add-disk": "Error from device manager: Cannot create virtio-blk device _disk0: "
        "Cannot open disk image /tmp/vmkit-api-disk.img: No such file or directory (os error 2)",
        "vm.add-fs": "Failed to validate config: Using vhost-user requires using shared memory "
        "or huge pages",
        "vm.add-pmem": "Error from device manager: Error creating pmem device: cannot open "
        "/tmp/pmem: No such file or directory (os error 2)",
        "vm.add-user-device": "Failed to validate config: Using user devices requires using "
        "shared memory or huge pages",
        "vm.add-vdpa": "--vdpa is not supported yet",
    }
    for action, text in refusals.items():
        assert_reply(api.put(action, ADD_BODIES[action]), 500, text)
    reply = api.put("vm.add-disk", {"path": "/x", "num_queues": 4})
    assert_reply(
        reply,
        500,
        "Failed to validate config: Number of vCPUs is insufficient for number of queues",
    )
    # A failed hot-plug took its automatic id, as in v37 (the counter moved on).
    reply = api.put("vm.add-disk", {"path": "/x"})
    failed = "Error from device manager: Cannot create virtio-blk device _disk2: "
    assert reply.text.startswith(failed), reply.text
    # RAM as v37 without hotplug_size: no room to hot-add (tests/test_memory_hotplug.py).
    reply = api.put("vm.resize", {"desired_ram": 512 << 20})
    assert_reply(reply, 500, "Memory manager error: InsufficientHotplugRam")
    # vCPUs as v37: one fewer is marked for removal (204), and no other
    # count is taken until the guest ejects it (tests/test_cpu_hotplug.py).
    assert_reply(api.put("vm.resize", {"desired_vcpus": 1}), 204, "")
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 1
    reply = api.put("vm.resize", {"desired_vcpus": 0})
    assert_reply(reply, 500, "Error from CPU manager: Still pending removed vcpu")
    reply = api.put("vm.resize", {"desired_vcpus": 3})
    assert_reply(reply, 500, "Error from CPU manager: Still pending removed vcpu")
    reply = api.put("vm.resize-zone", {"id": "z0", "desired_ram": 1 << 30})
    assert_reply(reply, 500, "Failed resizing a memory zone")  # v37's text: no such zone
    # v37 looks the id up before anything else
    reply = api.put("vm.remove-device", {"id": "__rng"})
    assert_reply(reply, 500, "Error from device manager: RemovalNotAllowed(Rng)")
    reply = api.put("vm.remove-device", {"id": "nope"})
    assert_reply(reply, 500, 'Error from device manager: UnknownDeviceId("nope")')
    # the power button reaches the guest (test_power_button_powers_the_guest_off)
    assert_reply(api.put("vm.power-button"), 204, "")
    # v37's text when no VMM listens there; the VM runs on
    reply = api.put("vm.send-migration", {"destination_url": "unix:/nonexistent/m"})
    assert_reply(
        reply,
        500,
        "Failed to send migratable component snapshot: Error connecting to UNIX socket: "
        "No such file or directory (os error 2)",
    )
    assert api.info()["state"] == "Running"
    # shutdown: back to "config, no VM"
    assert_reply(api.put("vm.shutdown"), 204, "")
    info = api.info()
    assert info["state"] == "Created"
    assert info["device_tree"] is None
    assert_reply(api.put("vm.shutdown"), 500, NOT_RUNNING)
    assert_reply(api.put("vm.reboot"), 500, NOT_CREATED)


@needs_kvm
def test_state_transitions_and_their_texts(api: Api) -> None:
    """ref §4.4 and §4.5: every transition the API can ask for, valid or not."""
    api.put("vm.create", guest_config())
    assert_reply(api.put("vm.boot"), 204)
    assert api.state() == "Running"
    assert_reply(api.put("vm.boot"), 500, "invalid VM state transition: Running to Running")
    assert_reply(api.put("vm.resume"), 500, RESUME_RUNNING)
    assert_reply(
        api.put("vm.snapshot", {"destination_url": "file:///tmp/s"}), 500, SNAPSHOT_RUNNING
    )
    assert_reply(api.put("vm.pause"), 204, "")
    assert api.state() == "Paused"
    assert_reply(api.put("vm.pause"), 500, PAUSE_PAUSED)
    # Taken, then not sent to a directory that does not exist (v37's answer).
    reply = api.put("vm.snapshot", {"destination_url": "file:///tmp/vmkit-absent-snapshot"})
    assert_reply(
        reply,
        500,
        "Cannot send VM snapshot: Failed to send migratable component snapshot: "
        "Destination is not a directory",
    )
    assert_reply(api.put("vm.resume"), 204, "")
    assert api.state() == "Running"
    # boot on a Paused VM resumes it
    assert_reply(api.put("vm.pause"), 204)
    assert_reply(api.put("vm.boot"), 204)
    assert api.state() == "Running"
    # reboot keeps it running; from Paused too
    assert_reply(api.put("vm.reboot"), 204, "")
    assert api.state() == "Running"
    assert_reply(api.put("vm.pause"), 204)
    assert_reply(api.put("vm.reboot"), 204)
    deadline = time.monotonic() + 10
    while api.state() != "Running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.state() == "Running"
    # shutdown from Paused, then boot again
    assert_reply(api.put("vm.pause"), 204)
    assert_reply(api.put("vm.shutdown"), 204)
    assert api.state() == "Created"
    assert_reply(api.put("vm.pause"), 500, NOT_RUNNING)
    assert_reply(api.put("vm.resume"), 500, NOT_RUNNING)
    assert_reply(api.put("vm.boot"), 204)
    assert api.state() == "Running"
    # delete shuts the VM down and forgets the config
    assert_reply(api.put("vm.delete"), 204)
    assert_reply(api.get("vm.info"), 500, NOT_CREATED)
    assert_reply(api.put("vm.boot"), 500, CONFIG_MISSING)
    boot = ["vm booting", "cpu_manager create_vcpu id=0", "cpu_manager create_vcpu id=1"]
    assert api.events() == [
        *boot, "vm booted",
        "vm booting",  # boot on Running
        "vm resuming",  # resume on Running
        "vm pausing", "vm paused",
        "vm pausing",  # pause on Paused
        "vm snapshotting", "vm snapshotted",  # taken, then not sent
        "vm resuming", "vm resumed",
        "vm pausing", "vm paused",
        "vm booting", "vm resuming", "vm resumed", "vm booted",  # boot on Paused
        "vm shutdown", *boot, "vm booted",  # reboot
        "vm pausing", "vm paused",
        "vm shutdown", *boot, "vm booted",  # reboot from Paused
        "vm pausing", "vm paused",
        "vm shutdown",
        *boot, "vm booted",
        "vm shutdown", "vm deleted",
        "vm booting",  # boot without a config
    ]  # fmt: skip


@needs_kvm
def test_concurrent_state_changes(api: Api) -> None:
    """Clients racing pause/resume/boot/reboot/info/counters all get v37 answers; nothing wedges."""
    api.put("vm.create", guest_config())
    assert_reply(api.put("vm.boot"), 204)
    allowed = {
        NOT_RUNNING,
        PAUSE_PAUSED,
        RESUME_RUNNING,
        "invalid VM state transition: Running to Running",
    }
    failures: list[str] = []
    ops = [
        ("PUT", "vm.pause"), ("PUT", "vm.resume"), ("PUT", "vm.boot"), ("PUT", "vm.reboot"),
        ("GET", "vm.info"), ("GET", "vm.counters"), ("GET", "vmm.ping"),
    ]  # fmt: skip

    def worker(n: int) -> None:
        try:
            with Client(api.path) as client:
                for i in range(25):
                    method, action = ops[(n * 7 + i * 3) % len(ops)]
                    reply = client.send(method, action)
                    if reply.status not in (200, 204) and reply.text not in allowed:
                        failures.append(f"{action}: {reply.status} {reply.text}")
        except Exception as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"clients still waiting for answers after 120 s: {stuck}"
    assert not failures
    assert api.state() in ("Running", "Paused")
    assert_reply(api.put("vm.shutdown"), 204)
    assert api.state() == "Created"


@needs_kvm
def test_shutdown_keeps_the_config_with_its_ids(api: Api, workdir: Path) -> None:
    disk = workdir / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    api.put("vm.create", guest_config("--disk", f"path={disk}"))
    assert api.info()["config"]["disks"][0]["id"] is None  # ids are given when the VM is built
    assert_reply(api.put("vm.boot"), 204)
    info = api.info()
    assert info["config"]["disks"][0]["id"] == "_disk0"
    assert info["device_tree"]["_disk0"]["parent"] == "_virtio-pci-_disk0"
    node = info["device_tree"]["_virtio-pci-_disk0"]
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", node["pci_bdf"])
    counters = api.get("vm.counters").json()
    assert set(counters["_disk0"]) >= {"read_bytes", "write_bytes", "read_ops", "write_ops"}
    assert_reply(api.put("vm.shutdown"), 204)
    info = api.info()
    assert (info["state"], info["config"]["disks"][0]["id"]) == ("Created", "_disk0")
    assert_reply(api.put("vm.boot"), 204)
    assert api.info()["config"]["disks"][0]["id"] == "_disk0"


def test_boot_validates_the_config(api: Api) -> None:
    config = cold_config()
    config["cpus"]["max_vcpus"] = 1
    api.put("vm.create", config)
    reply = api.put("vm.boot")
    assert_reply(reply, 500, "Failed to validate config: Max CPUs lower than boot CPUs")
    assert api.state() == "Created"
    config = cold_config()
    config["payload"] = None
    api.put("vm.delete")
    api.put("vm.create", config)
    assert_reply(api.put("vm.boot"), 500, "Failed to validate config: No kernel specified")


@needs_kvm
def test_a_failed_boot_leaves_the_config(api: Api, workdir: Path) -> None:
    config = guest_config()
    config["payload"]["kernel"] = str(workdir / "missing")
    api.put("vm.create", config)
    reply = api.put("vm.boot")
    assert_reply(reply, 500)
    assert reply.text.startswith("Cannot open kernel")
    assert api.state() == "Created"
    assert_reply(api.put("vm.pause"), 500, NOT_RUNNING)


@needs_kvm
def test_unsupported_devices_are_refused_at_boot(api: Api) -> None:
    config = guest_config("--sgx-epc", "id=epc0,size=64M")
    api.put("vm.create", config)
    reply = api.put("vm.boot")
    assert_reply(reply, 500)
    assert "--sgx-epc is not supported yet" in reply.text
    assert api.state() == "Created"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--console", "socket=/tmp/absent.sock"), "The virtio console cannot use a socket"),
        (("--platform", "uuid=1-2"), "--platform serial_number, uuid and oem_strings"),
    ],
)
def test_boot_refuses_what_v37_refuses_when_it_builds_the_vm(
    api: Api, extra: tuple[str, ...], message: str
) -> None:
    config = guest_config()
    config.update(VmConfig.from_cli(["--kernel", "k", *extra]).to_dict())
    for key in ("payload", "cpus", "memory"):
        config[key] = guest_config()[key]
    assert_reply(api.put("vm.create", config), 204)
    reply = api.put("vm.boot")
    assert_reply(reply, 500)
    assert reply.text.startswith(message), reply.text
    assert api.state() == "Created"


def test_create_drops_net_fds(api: Api) -> None:
    config = cold_config("--net", "fd=[5,6],num_queues=4")
    assert config["net"][0]["fds"] == [5, 6]
    assert_reply(api.put("vm.create", config), 204)
    assert api.info()["config"]["net"][0]["fds"] is None


# == cold edits: add-*, remove-device, resize (ref §4.2) ====================================


def test_cold_adds_edit_the_config(api: Api) -> None:
    api.put("vm.create", cold_config("--memory", "size=512M,shared=on"))
    adds = [
        ("vm.add-disk", "disks", {"path": "/tmp/a.img", "id": "disk1"}),
        ("vm.add-disk", "disks", {"path": "/tmp/b.img"}),
        ("vm.add-net", "net", {"tap": "tap1", "id": "net1"}),
        ("vm.add-fs", "fs", {"tag": "t", "socket": "/tmp/fs.sock", "id": "fs1"}),
        ("vm.add-pmem", "pmem", {"file": "/tmp/pmem", "size": 1 << 21, "id": "pmem1"}),
        ("vm.add-device", "devices", {"path": "/sys/bus/pci/devices/0000:00:01.0/", "id": "dev1"}),
        ("vm.add-user-device", "user_devices", {"socket": "/tmp/ud.sock", "id": "ud1"}),
        ("vm.add-vdpa", "vdpa", {"path": "/dev/vhost-vdpa-0", "id": "vdpa1"}),
    ]
    for action, field, body in adds:
        reply = api.put(action, body)
        assert_reply(reply, 204, "")
        added = api.info()["config"][field][-1]
        assert {k: added[k] for k in body} == body
    assert [d["path"] for d in api.info()["config"]["disks"]] == ["/tmp/a.img", "/tmp/b.img"]
    assert api.info()["config"]["disks"][1]["id"] is None
    assert_reply(api.put("vm.add-vsock", {"cid": 3, "socket": "/tmp/v.sock", "id": "vsock1"}), 204)
    assert api.info()["config"]["vsock"]["cid"] == 3
    assert_reply(
        api.put("vm.add-vsock", {"cid": 4, "socket": "/tmp/w.sock"}),
        500,
        "Too many virtio-vsock devices",
    )
    # validation of the config with the device added
    before = api.info()["config"]
    failures = [
        ("vm.add-disk", {"path": "/tmp/c.img", "num_queues": 4},
         "Number of vCPUs is insufficient for number of queues"),
        ("vm.add-disk", {"path": "/tmp/c.img", "id": "disk1"}, "Identifier disk1 is not unique"),
        ("vm.add-disk", {"path": "/tmp/c.img", "id": "__x"}, "Identifier __x is invalid"),
        ("vm.add-net", {"num_queues": 1}, "Number of queues to virtio_net less than 2"),
        ("vm.add-device", {"path": "/sys/bus/pci/devices/0000:00:01.0/"},
         "Duplicated device path: /sys/bus/pci/devices/0000:00:01.0/"),
        ("vm.add-pmem", {"file": "/tmp/p2", "id": "net1"}, "Identifier net1 is not unique"),
    ]  # fmt: skip
    for action, body, message in failures:
        assert_reply(api.put(action, body), 500, f"Failed to validate config: {message}")
    assert api.info()["config"] == before


def test_cold_add_without_shared_memory_fails_validation(api: Api) -> None:
    api.put("vm.create", cold_config())
    reply = api.put("vm.add-fs", {"tag": "t", "socket": "/tmp/fs.sock"})
    assert_reply(
        reply,
        500,
        "Failed to validate config: Using vhost-user requires using shared memory or huge pages",
    )
    assert api.info()["config"]["fs"] is None
    reply = api.put("vm.add-vsock", {"cid": 2, "socket": "/tmp/v.sock"})
    assert_reply(reply, 500, "Failed to validate config: 2 is a special VSOCK CID")
    assert api.info()["config"]["vsock"] is None
    api.put("vm.delete")
    config = cold_config()
    config["payload"] = None
    api.put("vm.create", config)
    reply = api.put("vm.add-disk", {"path": "/x"})
    assert_reply(reply, 500, "Failed to validate config: No kernel specified")


def test_cold_remove_device(api: Api) -> None:
    api.put(
        "vm.create",
        cold_config(
            "--memory", "size=512M,shared=on",
            "--disk", "path=/a,id=d1", "path=/b,id=d2",
            "--net", "tap=t0,id=n1",
            "--fs", "tag=t,socket=/s,id=f1",
            "--pmem", "file=/p,size=2M,id=p1",
            "--device", "path=/sys/x,id=v1",
            "--user-device", "socket=/u,id=u1",
            "--vdpa", "path=/dev/vd,id=vd1",
            "--vsock", "cid=3,socket=/v,id=vs1",
        ),
    )  # fmt: skip
    fields = {
        "d1": "disks", "n1": "net", "f1": "fs", "p1": "pmem", "v1": "devices",
        "u1": "user_devices", "vd1": "vdpa",
    }  # fmt: skip
    for device_id, field in fields.items():
        assert_reply(api.put("vm.remove-device", {"id": device_id}), 204, "")
        remaining = api.info()["config"][field]
        assert device_id not in [d["id"] for d in remaining]
    config = api.info()["config"]
    assert [d["id"] for d in config["disks"]] == ["d2"]
    assert config["net"] == []  # the list stays, empty
    assert_reply(api.put("vm.remove-device", {"id": "vs1"}), 204)
    assert api.info()["config"]["vsock"] is None
    assert_reply(api.put("vm.remove-device", {"id": "d1"}), 500, 'No device with id "d1" to remove')
    assert_reply(
        api.put("vm.remove-device", {"id": 'a"b\\c'}),
        500,
        'No device with id "a\\"b\\\\c" to remove',
    )
    assert_reply(
        api.put("vm.remove-device", {"id": "x\ny"}), 500, 'No device with id "x\\ny" to remove'
    )
    # the automatic ids are not in a cold config, so they cannot be removed by them
    assert_reply(
        api.put("vm.remove-device", {"id": "_disk0"}), 500, 'No device with id "_disk0" to remove'
    )


def test_rust_debug_quoting() -> None:
    assert rust_debug_str("plain") == '"plain"'
    assert rust_debug_str("it's") == '"it\'s"'
    assert rust_debug_str('"\\\t\r\n\0') == '"\\"\\\\\\t\\r\\n\\0"'
    assert rust_debug_str("\x7f\u200b") == '"\\u{7f}\\u{200b}"'
    assert rust_debug_str("é ü") == '"é ü"'


def test_cold_resize(api: Api) -> None:
    api.put("vm.create", cold_config("--memory", "size=512M,hotplugged_size=0"))
    info = api.info()
    assert info["memory_actual_size"] == 512 << 20
    assert_reply(api.put("vm.resize", {"desired_vcpus": 3, "desired_ram": 1 << 30}), 204, "")
    config = api.info()["config"]
    # not validated: boot_vcpus may go above max_vcpus in a cold config, as in v37
    assert (config["cpus"]["boot_vcpus"], config["cpus"]["max_vcpus"]) == (3, 2)
    assert config["memory"]["size"] == 1 << 30
    assert api.info()["memory_actual_size"] == 1 << 30
    # desired_balloon only edits an existing balloon
    assert_reply(api.put("vm.resize", {"desired_balloon": 1 << 20}), 204)
    assert api.info()["config"]["balloon"] is None
    assert_reply(api.put("vm.resize", {}), 204)
    assert_reply(api.put("vm.resize", {"desired_vcpus": None, "desired_ram": None}), 204)
    assert api.info()["config"] == config
    assert_reply(
        api.put("vm.resize-zone", {"id": "z0", "desired_ram": 1 << 30}),
        500,
        "Failed resizing a memory zone",
    )
    api.put("vm.delete")
    api.put("vm.create", cold_config("--balloon", "size=64M"))
    assert_reply(api.put("vm.resize", {"desired_balloon": 128 << 20}), 204)
    assert api.info()["config"]["balloon"]["size"] == 128 << 20


def test_cold_resize_zone(api: Api) -> None:
    config = cold_config("--memory", "size=0")
    config["memory"]["zones"] = [
        {"id": "z0", "size": 256 << 20},
        {"id": "z1", "size": 128 << 20, "hotplugged_size": 64 << 20},
    ]
    config = VmConfig.from_dict(config).to_dict()
    api.put("vm.create", config)
    assert api.info()["memory_actual_size"] == (256 + 128 + 64) << 20
    assert_reply(api.put("vm.resize-zone", {"id": "z1", "desired_ram": 512 << 20}), 204, "")
    zones = api.info()["config"]["memory"]["zones"]
    assert [z["size"] for z in zones] == [256 << 20, 512 << 20]
    assert api.info()["memory_actual_size"] == (256 + 512 + 64) << 20
    assert_reply(
        api.put("vm.resize-zone", {"id": "z9", "desired_ram": 1}),
        500,
        "Failed resizing a memory zone",
    )


def holds(fd: int, sock: socket.socket) -> bool:
    """Whether descriptor ``fd`` refers to ``sock``'s file. The server runs in
    this process, so a closed number may already be reused by another thread."""
    try:
        return os.path.samestat(os.fstat(fd), os.fstat(sock.fileno()))
    except OSError:
        return False


def test_add_net_takes_scm_rights_descriptors(api: Api) -> None:
    api.put("vm.create", cold_config())
    ours = socket.socketpair()
    try:
        reply = api.put("vm.add-net", {"id": "net9", "fds": [7, 8]}, fds=[ours[0].fileno()])
        assert_reply(reply, 204, "")
        net = api.info()["config"]["net"][-1]
        assert net["id"] == "net9"
        (received,) = net["fds"]  # the descriptor as the VMM holds it; body fds are ignored
        assert received > 2 and received not in (ours[0].fileno(), ours[1].fileno())
        assert os.path.samestat(os.fstat(received), os.fstat(ours[0].fileno()))
        # removing the device closes the VMM's descriptor
        assert_reply(api.put("vm.remove-device", {"id": "net9"}), 204)
        assert not holds(received, ours[0])
        # fds only in the body are dropped
        assert_reply(api.put("vm.add-net", {"id": "net8", "fds": [7, 8]}), 204)
        assert api.info()["config"]["net"][-1]["fds"] is None
        # two descriptors do not match two queues: refused, and the descriptors closed
        before = set(os.listdir("/proc/self/fd"))
        reply = api.put("vm.add-net", {"id": "net7"}, fds=[ours[0].fileno(), ours[1].fileno()])
        assert_reply(
            reply,
            500,
            "Failed to validate config: Number of queues to virtio_net does not match the "
            "number of input FDs",
        )

        # The server runs in this process, whose other threads may open
        # descriptors meanwhile: what must be gone is every copy of the two
        # sent (closed by the server's thread once the client has gone).
        def copies() -> list[str]:
            new = set(os.listdir("/proc/self/fd")) - before
            return [fd for fd in new for sock in ours if holds(int(fd), sock)]

        deadline = time.monotonic() + 5
        while copies() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert copies() == []
        # a delete closes what the VMM holds
        api.put("vm.add-net", {"id": "net6"}, fds=[ours[1].fileno()])
        (held,) = api.info()["config"]["net"][-1]["fds"]
        assert holds(held, ours[1])
        api.put("vm.delete")
        assert not holds(held, ours[1])
    finally:
        ours[0].close()
        ours[1].close()


# == events, exit and the command line (ref §3.2, §3.3) ======================================


def test_event_monitor_format(workdir: Path) -> None:
    events_path = workdir / "events"
    monitor = EventMonitor(os.open(events_path, os.O_WRONLY | os.O_CREAT, 0o600))
    monitor.emit("vmm", "starting")
    monitor.emit("cpu_manager", "create_vcpu", {"id": "0"})
    monitor.close()
    text = events_path.read_text()
    chunks = text.split("\n\n")
    assert chunks[-1] == "" and len(chunks) == 3
    first = chunks[0].splitlines()
    assert first[:3] == ["{", '  "timestamp": {', first[2]]
    assert re.fullmatch(r'    "secs": 0,', first[2])
    assert re.fullmatch(r'    "nanos": \d+', first[3])
    assert first[4:] == [
        "  },",
        '  "source": "vmm",',
        '  "event": "starting",',
        '  "properties": null',
        "}",
    ]
    second = json.loads(chunks[1])
    assert list(second) == ["timestamp", "source", "event", "properties"]
    assert second["properties"] == {"id": "0"}


@needs_kvm
def test_idle_vmm_serves_until_vmm_shutdown(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    events = workdir / "events"
    process = vmkit("--api-socket", f"path={sock}", "--event-monitor", f"path={events}")
    process.wait_ready(sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert call(sock, "GET", "vmm.ping").json()["pid"] == process.proc.pid
    assert_reply(call(sock, "GET", "vm.info"), 500, NOT_CREATED)
    assert_reply(call(sock, "PUT", "vm.create", cold_config()), 204)
    reply = call(sock, "PUT", "vmm.shutdown", "ignored body")
    assert_reply(reply, 200, "")  # no Content-Length: ch-remote then prints nothing
    assert process.wait(20) == 0
    assert not sock.exists()
    assert names(parse_events(events.read_text())) == ["vmm starting", "vm deleted", "vmm shutdown"]
    assert process.stderr == ""


@needs_kvm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_the_vmm_cleanly(workdir: Path, vmkit: Callable[..., Vmkit], sig: int) -> None:
    sock = workdir / "api.sock"
    process = vmkit("--api-socket", str(sock))  # a bare path works for --api-socket
    process.wait_ready(sock)
    process.proc.send_signal(sig)
    assert process.wait(20) == 0
    assert not sock.exists()


def test_exit_fd_turns_readable_on_an_exit_request() -> None:
    # The vmkit command polls it beside its signal wake-up pipe.
    vmm = Vmm()
    try:
        fd = vmm.exit_fd()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(0) == []
        assert vmm.wait_exit(0) is None
        vmm.request_exit(3, "why")
        assert poller.poll(0) == [(fd, select.POLLIN)]
        assert (vmm.wait_exit(0), vmm.exit_message) == (3, "why")
        assert vmm.exit_fd() == fd
    finally:
        vmm.close()
    late = Vmm()  # asked for after the request: readable at once
    try:
        late.request_exit(0)
        poller = select.poll()
        poller.register(late.exit_fd(), select.POLLIN)
        assert poller.poll(0) == [(late.exit_fd(), select.POLLIN)]
    finally:
        late.close()
    late.request_exit(1)  # after close: nothing to wake, no error


@needs_kvm
def test_cli_boots_through_the_vmm(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    events = workdir / "events"
    events.write_text("x" * 5000)  # opened without truncation, written from the start
    config = VmConfig.from_dict(guest_config())
    assert config.payload is not None and config.payload.kernel and config.payload.cmdline
    process = vmkit(
        "--kernel", config.payload.kernel, "--cmdline", config.payload.cmdline,
        "--cpus", "boot=2", "--memory", "size=256M", "--serial", "null", "--console", "off",
        "--api-socket", f"path={sock},bogus=1",  # parse errors are ignored, path is kept
        "--event-monitor", f"path={events}",
    )  # fmt: skip
    process.wait_ready(sock)
    # The API serves before the command line's VM exists (as in v37): wait for it.
    deadline = time.monotonic() + 20
    reply = call(sock, "GET", "vm.info")
    while reply.status != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
        reply = call(sock, "GET", "vm.info")
    info = reply.json()
    assert info["state"] == "Running"
    assert info["config"]["payload"]["kernel"] == config.payload.kernel
    assert_reply(call(sock, "PUT", "vm.create", guest_config()), 500, ALREADY_CREATED)
    assert_reply(call(sock, "PUT", "vm.pause"), 204)
    assert_reply(call(sock, "PUT", "vmm.shutdown"), 200, "")
    assert process.wait(20) == 0
    assert not sock.exists()
    text = events.read_text()
    assert text.endswith("x" * 100)
    assert names(parse_events(text)) == [
        "vmm starting",
        "vm booting",
        "cpu_manager create_vcpu id=0",
        "cpu_manager create_vcpu id=1",
        "vm booted",
        "vm pausing",
        "vm paused",
        "vm shutdown",
        "vm deleted",
        "vmm shutdown",
    ]


@needs_kvm
def test_virtio_device_events(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    events = workdir / "events"
    process = vmkit("--api-socket", f"path={sock}", "--event-monitor", f"path={events}")
    process.wait_ready(sock)
    config = guest_config()
    # The guest drives the rng (DRIVER_OK), then resets it, then powers off.
    config["payload"]["cmdline"] = testguest.cmdline(["rng"], "poweroff")
    assert_reply(call(sock, "PUT", "vm.create", config), 204)
    assert_reply(call(sock, "PUT", "vm.boot"), 204)
    assert process.wait(30) == 0
    got = names(parse_events(events.read_text()))
    assert got[got.index("vm booted") + 1 :] == [
        "virtio-device activated id=__rng",
        "virtio-device reset id=__rng",
        "vm shutdown",
        "vm deleted",
        "vmm shutdown",
    ]


@needs_kvm
def test_guest_power_off_ends_the_vmm(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    events = workdir / "events"
    process = vmkit("--api-socket", f"path={sock}", "--event-monitor", f"path={events}")
    process.wait_ready(sock)
    assert_reply(call(sock, "PUT", "vm.create", guest_config(ticks=30, tick_ms=10)), 204)
    assert_reply(call(sock, "PUT", "vm.boot"), 204)
    assert process.wait(30) == 0
    assert not sock.exists()
    assert names(parse_events(events.read_text()))[-3:] == [
        "vm shutdown",
        "vm deleted",
        "vmm shutdown",
    ]


@needs_kvm
def test_power_button_powers_the_guest_off(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    serial = workdir / "serial.txt"
    process = vmkit("--api-socket", f"path={sock}")
    process.wait_ready(sock)
    config = guest_config(ticks=1, tick_ms=10)
    config["payload"]["cmdline"] = testguest.cmdline(["powerbutton"], "poweroff")
    config["serial"] = {"mode": "File", "file": str(serial)}
    assert_reply(call(sock, "PUT", "vm.create", config), 204)
    assert_reply(call(sock, "PUT", "vm.boot"), 204)
    deadline = time.monotonic() + 30
    while "powerbutton waiting" not in serial.read_text(errors="replace"):
        assert time.monotonic() < deadline, serial.read_text(errors="replace")
        time.sleep(0.02)
    assert_reply(call(sock, "PUT", "vm.power-button"), 204, "")
    # The guest saw the press and powered off, which ends the VMM.
    assert process.wait(30) == 0
    assert "step powerbutton ok event=0x8" in serial.read_text()


@needs_kvm
def test_guest_power_off_ends_a_vmm_started_with_a_kernel(
    workdir: Path, vmkit: Callable[..., Vmkit]
) -> None:
    sock = workdir / "api.sock"
    config = VmConfig.from_dict(guest_config(ticks=30, tick_ms=10))
    assert config.payload is not None and config.payload.kernel and config.payload.cmdline
    process = vmkit(
        "--kernel", config.payload.kernel, "--cmdline", config.payload.cmdline,
        "--serial", "null", "--console", "off", "--api-socket", str(sock),
    )  # fmt: skip
    assert process.wait(30) == 0, process.stderr
    assert not sock.exists()


@needs_kvm
def test_a_faulting_guest_ends_the_vmm_with_1(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    process = vmkit(
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "triple-fault"),
        "--serial", "null", "--console", "off", "--api-socket", str(sock),
    )  # fmt: skip
    assert process.wait(30) == 1
    assert "VM stopped: vCPU 0 triple-faulted" in process.stderr


@needs_kvm
def test_api_socket_fd(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "given.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(sock))
        listener.listen()
        process = vmkit("--api-socket", f"fd={listener.fileno()}", pass_fds=[listener.fileno()])
        process.wait_ready(sock)
        assert_reply(call(sock, "PUT", "vmm.shutdown"), 200)
        assert process.wait(20) == 0
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fd=abc", "invalid digit found in string"),
        ("fd=-", "invalid digit found in string"),
        ("fd=99999999999", "number too large to fit in target type"),
        ("path=/x,fd=1x", "invalid digit found in string"),
    ],
)
def test_api_socket_fd_errors(value: str, message: str) -> None:
    proc = run_vmkit("--api-socket", value)
    assert proc.returncode == 1
    assert proc.stderr == f"Error parsing --api-socket: {message}\n"


@needs_kvm
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{dir}/events", "Error parsing --event-monitor: unknown option: {dir}/events"),
        ("events", "Error parsing --event-monitor: unknown option: events"),
        ("", "Error parsing --event-monitor: path or fd required"),
        ("path={dir}/e,foo=1", "Error parsing --event-monitor: unknown option: foo"),
        ("fd=x", "Error parsing --event-monitor: unable to convert x for fd"),
        ("path=[", "Error parsing --event-monitor: invalid syntax:path=["),
        (
            "path={dir}/missing/e",
            "Error doing event monitor I/O: No such file or directory (os error 2)",
        ),
        # a descriptor that is not open: v37 exits when the first event cannot be written
        ("fd=987", "Error doing event monitor I/O: Bad file descriptor (os error 9)"),
    ],
)
def test_event_monitor_errors(workdir: Path, value: str, message: str) -> None:
    proc = run_vmkit("--event-monitor", value.format(dir=workdir))
    assert proc.returncode == 1
    assert proc.stderr == message.format(dir=workdir) + "\n"


@needs_kvm
def test_event_monitor_fd(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    read_end, write_end = os.pipe()
    try:
        process = vmkit(
            "--api-socket", str(sock), "--event-monitor", f"fd={write_end}", pass_fds=[write_end]
        )
        os.close(write_end)
        write_end = -1
        process.wait_ready(sock)
        call(sock, "PUT", "vmm.shutdown")
        assert process.wait(20) == 0
        with os.fdopen(read_end, "r") as f:
            read_end = -1
            assert names(parse_events(f.read())) == ["vmm starting", "vmm shutdown"]
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_rust_duration_format() -> None:
    assert rust_duration(0) == "0.000000ns"
    assert rust_duration(500e-9) == "500.000000ns"
    assert rust_duration(12.5e-6) == "12.500000\u00b5s"
    assert rust_duration(1.5e-3) == "1.500000ms"
    assert rust_duration(2.25) == "2.250000s"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/tmp/a.sock", ("/tmp/a.sock", None)),
        ("path=/tmp/a.sock", ("/tmp/a.sock", None)),
        ("path=/tmp/a.sock,bogus=1", ("/tmp/a.sock", None)),  # stored before the error
        ("bogus=1,path=/tmp/a.sock", ("bogus=1,path=/tmp/a.sock", None)),  # never stored
        ("path=", ("path=", None)),  # an empty value reads as absent
        ('path="/a,b"', ("/a,b", None)),
        ("fd=3", (None, 3)),
        ("fd=+3,path=/x", (None, 3)),
        ("path=/x,fd=-1", (None, -1)),
    ],
)
def test_api_socket_option(value: str, expected: tuple[str | None, int | None]) -> None:
    assert api_socket_option(value) == expected


LOG_LINE = re.compile(
    r"vmkit: \d+\.\d{6}(s|ms|µs|ns): <[\w-]+> (ERROR|WARN|INFO|DEBUG|TRACE):"
    r"(vmkit/\w+\.py:\d+|[\w.]+) -- .*"
)


@needs_kvm
def test_log_file_and_verbosity(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    log = workdir / "vmkit.log"
    log.write_text("old content\n" * 100)
    process = vmkit("--api-socket", str(sock), "--log-file", str(log), "-v")
    process.wait_ready(sock)
    call(sock, "PUT", "vm.create", cold_config("--net", "fd=[5],num_queues=2"))
    call(sock, "PUT", "vmm.shutdown")
    assert process.wait(20) == 0
    text = log.read_bytes().decode()
    assert "old content" not in text
    lines = text.split("\r\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert LOG_LINE.fullmatch(line), line
    assert any(
        re.search(
            r"<http-client> INFO:vmkit/api\.py:\d+ -- API request event: GET /api/v1/vmm.ping", line
        )
        for line in lines
    )
    assert any(
        re.search(r" WARN:vmkit/vmm\.py:\d+ -- Ignoring FDs sent via the HTTP request body$", line)
        for line in lines
    )
    assert process.stderr == ""


@needs_kvm
def test_default_log_level_is_warn(workdir: Path, vmkit: Callable[..., Vmkit]) -> None:
    sock = workdir / "api.sock"
    process = vmkit("--api-socket", str(sock))
    process.wait_ready(sock)
    call(sock, "PUT", "vm.create", cold_config("--net", "fd=[5],num_queues=2"))
    call(sock, "PUT", "vmm.shutdown")
    assert process.wait(20) == 0
    (line,) = process.stderr.split("\r\n")[:-1]
    assert LOG_LINE.fullmatch(line)
    assert "WARN" in line and line.endswith("-- Ignoring FDs sent via the HTTP request body")


def test_log_file_error(workdir: Path) -> None:
    proc = run_vmkit("--api-socket", str(workdir / "s"), "--log-file", str(workdir / "no" / "log"))
    assert proc.returncode == 1
    assert proc.stderr == "Error creating log file: No such file or directory (os error 2)\n"
    assert not (workdir / "s").exists()  # the logger comes before the API socket


@needs_kvm
def test_bind_failure(workdir: Path) -> None:
    taken = workdir / "taken"
    taken.write_text("")
    proc = run_vmkit("--api-socket", f"path={taken}")
    assert proc.returncode == 1
    assert proc.stderr == (
        "Failed to start the VMM thread: Error creation API server's socket "
        'Os { code: 98, kind: AddrInUse, message: "Address already in use" }\n'
    )
    proc = run_vmkit("--api-socket", f"path={workdir}/missing/sock")
    assert proc.returncode == 1
    assert proc.stderr.endswith(
        'Os { code: 2, kind: NotFound, message: "No such file or directory" }\n'
    )
    # With a VM to boot the socket is bound before the boot too (as Cloud
    # Hypervisor's binary answers the same command line): no guest runs.
    proc = run_vmkit(
        "--api-socket", f"path={taken}", "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["hello"], "poweroff"), "--memory", "size=64M",
        "--serial", "tty", "--console", "off",
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "Failed to start the VMM thread: Error creation API server's socket "
        'Os { code: 98, kind: AddrInUse, message: "Address already in use" }\n'
    )


@needs_kvm
def test_config_errors_come_after_the_api_socket(workdir: Path) -> None:
    sock = workdir / "api.sock"
    proc = run_vmkit("--kernel", "/x", "--cpus", "boot=x", "--api-socket", str(sock))
    assert proc.returncode == 1
    assert (
        proc.stderr == "Error parsing config: Error parsing --cpus: unable to convert x for boot\n"
    )
    assert sock.exists()  # v37 leaves the socket file on the error path
    sock.unlink()


@needs_kvm
def test_without_kernel_the_config_is_not_parsed(
    workdir: Path, vmkit: Callable[..., Vmkit]
) -> None:
    sock = workdir / "api.sock"
    # --cmdline alone and a bad --cpus are ignored: no payload, so the VMM waits for the API
    process = vmkit("--api-socket", str(sock), "--cmdline", "x", "--cpus", "boot=x")
    process.wait_ready(sock)
    assert_reply(call(sock, "GET", "vm.info"), 500, NOT_CREATED)
    call(sock, "PUT", "vmm.shutdown")
    assert process.wait(20) == 0


@needs_kvm
def test_restore_on_the_command_line(workdir: Path) -> None:
    sock = workdir / "api.sock"
    proc = run_vmkit("--api-socket", str(sock), "--restore", "bogus=1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error parsing restore: ")
    proc = run_vmkit("--api-socket", str(sock) + "2", "--restore", "source_url=file:///tmp/x")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error restoring VM: ")
    for leftover in (sock, Path(str(sock) + "2")):
        leftover.unlink(missing_ok=True)


# == robustness under random input ===========================================================

FUZZ_ACTIONS = sorted(
    ACTIONS - {"vmm.shutdown", "vm.boot", "vm.reboot", "vm.shutdown", "vm.delete"}
)
_token = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=20)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["id", "path", "size", "desired_vcpus", "desired_ram", "desired_balloon", "source_url",
     "destination_url", "receiver_url", "local", "cpus", "memory", "payload", "socket", "cid",
     "tap", "num_queues", "fds", "net", "disks"]
)  # fmt: skip
_objects = st.dictionaries(_field_names, _json_values, max_size=5)
_bodies = st.one_of(
    _json_values.map(lambda v: json.dumps(v).encode()),
    _objects.map(lambda v: json.dumps(v).encode()),
    _objects.map(lambda v: json.dumps(v).encode()[:-1]),
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
)


def _request(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


_broken_lines = st.builds(
    lambda m, t, v, tail: f"{m} {t} {v}{tail}\r\n\r\n".encode("latin-1"),
    st.sampled_from(["GET", "PUT", "PATCH", "POST", "get", ""]) | _token,
    st.sampled_from(["/api/v1/vmm.ping", "/api/v1/vm.info", "*", ""]) | _token,
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]) | _token,
    st.sampled_from(["", " ", " x", "\t"]),
)
_bad_headers = st.builds(
    lambda lines: b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"".join(lines) + b"\r\n",
    st.lists(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r\n", b"") + b"\r\n")
        | st.builds(lambda k, v: f"{k}: {v}\r\n".encode("latin-1"), _token, _token)
        | st.sampled_from(
            [
                b"Content-Length: x\r\n",
                b"Content-Length: -5\r\n",
                b" x: y\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"Expect: 100-continue\r\n",
                b"Content-Length: 18446744073709551616\r\n",
            ]
        ),
        max_size=8,
    ),
)
_wrong_lengths = st.builds(
    lambda m, a, body, delta: _request(
        m, f"/api/v1/{a}", [("Content-Length", str(max(0, len(body) + delta)))], body
    ),
    st.sampled_from(["GET", "PUT", "PATCH"]),
    st.sampled_from(FUZZ_ACTIONS),
    _bodies,
    st.integers(-40, 40) | st.sampled_from([10**7, 2**31]),
)
_bad_json = st.builds(
    lambda m, a, body: _request(m, f"/api/v1/{a}", [("Content-Length", str(len(body)))], body),
    st.sampled_from(["PUT", "PUT", "PUT", "GET", "PATCH"]),
    st.sampled_from(FUZZ_ACTIONS),
    _bodies,
)
_malformed = st.one_of(
    st.binary(max_size=2000), _broken_lines, _bad_headers, _wrong_lengths, _bad_json
)


SERVER_ONLY = """
import sys
from vmkit.api import ApiServer
from vmkit.vmm import Vmm
vmm = Vmm()
server = ApiServer(vmm, sys.argv[1])
server.start()
code = vmm.wait_exit()
vmm.close()
server.close()
sys.exit(code)
"""


def test_malformed_requests_never_hurt_the_server(
    workdir: Path, vmkit: Callable[..., Vmkit]
) -> None:
    """1,000 malformed requests to one server; it still answers and stays up."""
    sock_path = workdir / "api.sock"
    if kvm_missing() is None:
        process = vmkit("--api-socket", str(sock_path))
    else:  # `vmkit` opens /dev/kvm at start-up (ref §3.3); serve the same API without it
        process = vmkit(SERVER_ONLY, str(sock_path), python_code=True)
    process.wait_ready(sock_path)

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=_malformed)
    def send(data: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(os.fspath(sock_path))
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert process.proc.poll() is None

    send()
    reply = call(sock_path, "GET", "vmm.ping")
    assert_reply(reply, 200)
    assert reply.json()["pid"] == process.proc.pid
    assert process.proc.poll() is None
    assert_reply(call(sock_path, "PUT", "vmm.shutdown"), 200)
    assert process.wait(20) == 0
    assert not sock_path.exists()
    # nothing went wrong inside (no internal errors, no tracebacks)
    assert "Traceback" not in process.stderr and " ERROR:" not in process.stderr
