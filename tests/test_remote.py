"""``vmkit remote``: Cloud Hypervisor v37's ch-remote (ch-reference §4.6).

Against a fake unix-socket server that records the raw request bytes, every
subcommand's request, output and exit status; then, where /dev/kvm and the
vmkit API server are there, against a real ``vmkit --api-socket`` VMM.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _fakeapi import FakeApiServer, Request, check_response, request_bytes, response
from vmkit import remote
from vmkit.config import (
    DeviceConfig,
    DiskConfig,
    FsConfig,
    PmemConfig,
    UserDeviceConfig,
    VdpaConfig,
    VsockConfig,
)

ROOT = Path(__file__).resolve().parent.parent
MAC_RE = re.compile(r"^2e(:[0-9a-f]{2}){5}$")
ERROR = "Error running command: "


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(tmp_path / "api.sock") as fake:
        yield fake


def run(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer | None, *args: str
) -> tuple[int, str, str]:
    argv = ["--api-socket", str(server.path), *args] if server is not None else list(args)
    code = remote.run(argv)
    out, err = capsys.readouterr()
    return code, out, err


def only_request(server: FakeApiServer) -> Request:
    assert len(server.requests) == 1, server.requests
    return server.requests[0]


def compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


# -- the request bytes ------------------------------------------------------------------------

NO_BODY = [
    ("info", "GET", "vm.info"),
    ("counters", "GET", "vm.counters"),
    ("pause", "PUT", "vm.pause"),
    ("resume", "PUT", "vm.resume"),
    ("reboot", "PUT", "vm.reboot"),
    ("power-button", "PUT", "vm.power-button"),
    ("boot", "PUT", "vm.boot"),
    ("delete", "PUT", "vm.delete"),
    ("shutdown", "PUT", "vm.shutdown"),
    ("ping", "GET", "vmm.ping"),
    ("shutdown-vmm", "PUT", "vmm.shutdown"),
]


@pytest.mark.parametrize(("command", "method", "endpoint"), NO_BODY)
def test_bodyless_commands(
    capsys: pytest.CaptureFixture[str],
    server: FakeApiServer,
    command: str,
    method: str,
    endpoint: str,
) -> None:
    code, out, err = run(capsys, server, command)
    assert (code, out, err) == (0, "", "")
    assert only_request(server).raw == request_bytes(method, endpoint)
    assert only_request(server).raw == (
        f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    ("command", "cls", "endpoint", "option"),
    [
        ("add-device", DeviceConfig, "vm.add-device", "path=/dev/vfio/12,id=vfio0"),
        ("add-disk", DiskConfig, "vm.add-disk", "path=/images/d.img,readonly=on,queue_size=64"),
        ("add-fs", FsConfig, "vm.add-fs", "tag=share,socket=/tmp/fs.sock,num_queues=2"),
        ("add-pmem", PmemConfig, "vm.add-pmem", "file=/tmp/pmem,size=2M,discard_writes=on"),
        ("add-user-device", UserDeviceConfig, "vm.add-user-device", "socket=/tmp/u.sock,id=u0"),
        ("add-vdpa", VdpaConfig, "vm.add-vdpa", "path=/dev/vhost-vdpa-0,num_queues=2"),
        ("add-vsock", VsockConfig, "vm.add-vsock", "cid=3,socket=/tmp/v.sock"),
    ],
)
def test_add_commands_send_the_parsed_config(
    capsys: pytest.CaptureFixture[str],
    server: FakeApiServer,
    command: str,
    cls: Any,
    endpoint: str,
    option: str,
) -> None:
    server.reply(response(204))
    code, out, err = run(capsys, server, command, option)
    assert (code, out, err) == (0, "", "")
    body = compact(cls.parse(option).to_dict())
    assert only_request(server).raw == request_bytes("PUT", endpoint, body)
    # Every field, in v37's order, defaults included.
    assert list(only_request(server).json()) == list(cls.parse(option).to_dict())


def test_add_disk_body_in_full(capsys: pytest.CaptureFixture[str], server: FakeApiServer) -> None:
    run(capsys, server, "add-disk", "path=/d.img,id=d0")
    body = (
        b'{"path":"/d.img","readonly":false,"direct":false,"iommu":false,"num_queues":1,'
        b'"queue_size":128,"vhost_user":false,"vhost_socket":null,"rate_limit_group":null,'
        b'"rate_limiter_config":null,"id":"d0","disable_io_uring":false,"disable_aio":false,'
        b'"pci_segment":0,"serial":null}'
    )
    assert only_request(server).raw == (
        b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_add_net_random_mac_and_defaults(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    run(capsys, server, "add-net", "tap=tap0")
    run(capsys, server, "add-net", "tap=tap0")
    first, second = (r.json() for r in server.requests)
    assert MAC_RE.match(first["mac"]) and MAC_RE.match(second["mac"])
    assert first["mac"] != second["mac"]
    assert first["num_queues"] == 2 and first["queue_size"] == 256
    assert first["ip"] == "192.168.249.1" and first["fds"] is None
    assert all(r.fds == [] for r in server.requests)


def test_add_net_sends_fds_with_scm_rights(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    read1, write1 = os.pipe()
    read2, write2 = os.pipe()
    try:
        code, _, err = run(
            capsys, server, "add-net", f"fd=[{write1},{write2}],mac=2e:00:00:00:00:01"
        )
        assert (code, err) == (0, "")
        request = only_request(server)
        assert request.json()["fds"] is None
        assert request.json()["mac"] == "2e:00:00:00:00:01"
        assert b'"fds"' in request.body and b"fd=" not in request.body
        assert len(request.fds) == 2
        # The descriptors that arrived are the pipes' write ends.
        os.write(request.fds[0], b"one")
        os.write(request.fds[1], b"two")
        assert os.read(read1, 3) == b"one" and os.read(read2, 3) == b"two"
        assert request.raw.startswith(b"PUT /api/v1/vm.add-net HTTP/1.1\r\n")
    finally:
        for fd in (read1, write1, read2, write2):
            os.close(fd)


@pytest.mark.parametrize(
    ("args", "body"),
    [
        (["remove-device", "_disk0"], {"id": "_disk0"}),
        (["snapshot", "file:///tmp/snap"], {"destination_url": "file:///tmp/snap"}),
        (["coredump", "file:///tmp/core"], {"destination_url": "file:///tmp/core"}),
        (["receive-migration", "unix:/tmp/m"], {"receiver_url": "unix:/tmp/m"}),
        (["send-migration", "unix:/tmp/m"], {"destination_url": "unix:/tmp/m", "local": False}),
        (
            ["send-migration", "--local", "unix:/tmp/m"],
            {"destination_url": "unix:/tmp/m", "local": True},
        ),
        (
            ["send-migration", "unix:/tmp/m", "--local"],
            {"destination_url": "unix:/tmp/m", "local": True},
        ),
        (["restore", "source_url=file:///s"], {"source_url": "file:///s", "prefault": False}),
        (
            ["restore", "source_url=file:///s,prefault=on"],
            {"source_url": "file:///s", "prefault": True},
        ),
        (
            ["resize", "--cpus", "4"],
            {"desired_vcpus": 4, "desired_ram": None, "desired_balloon": None},
        ),
        (
            ["resize", "--memory", "2G", "--balloon=512M"],
            {"desired_vcpus": None, "desired_ram": 2 << 30, "desired_balloon": 512 << 20},
        ),
        (
            ["resize", "--cpus=+2", "--memory", "1KM"],
            {"desired_vcpus": 2, "desired_ram": 1 << 20, "desired_balloon": None},
        ),
    ],
)
def test_commands_with_a_json_body(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, args: list[str], body: Any
) -> None:
    code, out, err = run(capsys, server, *args)
    assert (code, out, err) == (0, "", "")
    endpoint = {
        "remove-device": "vm.remove-device",
        "snapshot": "vm.snapshot",
        "coredump": "vm.coredump",
        "receive-migration": "vm.receive-migration",
        "send-migration": "vm.send-migration",
        "restore": "vm.restore",
        "resize": "vm.resize",
    }[args[0]]
    assert only_request(server).raw == request_bytes("PUT", endpoint, compact(body))


def test_resize_without_options_sends_nulls(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    run(capsys, server, "resize")
    assert only_request(server).body == (
        b'{"desired_vcpus":null,"desired_ram":null,"desired_balloon":null}'
    )


def test_resize_zone(capsys: pytest.CaptureFixture[str], server: FakeApiServer) -> None:
    code, _, _ = run(capsys, server, "resize-zone", "--id", "mem0", "--size", "1G")
    assert code == 0
    assert only_request(server).raw == request_bytes(
        "PUT", "vm.resize-zone", b'{"id":"mem0","desired_ram":1073741824}'
    )


def test_create_from_file_sends_it_unchecked(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, tmp_path: Path
) -> None:
    path = tmp_path / "vm.json"
    raw = b'{"cpus": {"boot_vcpus": 2, "max_vcpus": 2},\n "not": "checked", "caf\xc3\xa9": 1}\n'
    path.write_bytes(raw)
    code, out, err = run(capsys, server, "create", str(path))
    assert (code, out, err) == (0, "", "")
    assert only_request(server).raw == request_bytes("PUT", "vm.create", raw)


@pytest.mark.parametrize("args", [["create"], ["create", "-"]])
def test_create_from_stdin(
    capsys: pytest.CaptureFixture[str],
    server: FakeApiServer,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    raw = b'{"payload": {"kernel": "/k"}}'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    code, _, _ = run(capsys, server, *args)
    assert code == 0
    assert only_request(server).raw == request_bytes("PUT", "vm.create", raw)


def test_create_empty_file_sends_content_length_zero(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, tmp_path: Path
) -> None:
    (tmp_path / "empty.json").write_bytes(b"")
    run(capsys, server, "create", str(tmp_path / "empty.json"))
    assert only_request(server).raw == request_bytes("PUT", "vm.create", b"")
    assert b"Content-Length: 0\r\n" in only_request(server).raw


# -- output and exit status ---------------------------------------------------------------


def test_2xx_body_is_printed_with_a_newline(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    body = '{"build_version":"v37.0.0","version":"37.0.0","pid":1,"features":["kvm"]}'
    server.reply(response(200, body))
    assert run(capsys, server, "ping") == (0, body + "\n", "")
    check_response("/vmm.ping", "GET", 200, body.encode())


def test_2xx_without_a_body_prints_nothing(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    # No Content-Length: no body. vmkit also takes an empty body (Content-Length: 0)
    # for none, where ch-remote would print an empty line.
    server.reply(response(200, b"", content_length=True), response(204), response(200))
    assert run(capsys, server, "shutdown-vmm") == (0, "", "")
    assert run(capsys, server, "pause") == (0, "", "")
    assert run(capsys, server, "shutdown-vmm") == (0, "", "")


def test_add_on_a_booted_vm_prints_the_pci_device_info(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer
) -> None:
    body = '{"id":"_disk0","bdf":"0000:00:06.0"}'
    server.reply(response(200, body))
    assert run(capsys, server, "add-disk", "path=/d") == (0, body + "\n", "")
    check_response("/vm.add-disk", "PUT", 200, body.encode())


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            response(500, "VM is not created"),
            "Server responded with an error: InternalServerError: VM is not created",
        ),
        (
            response(500, "invalid VM state transition: Running to Running"),
            "Server responded with an error: InternalServerError: "
            "invalid VM state transition: Running to Running",
        ),
        (response(400, "Bad Request"), "Server responded with an error: BadRequest: Bad Request"),
        (response(400), "Server responded with an error: BadRequest"),
        (response(404, "Not Found"), "Server responded with an error: NotFound: Not Found"),
        (response(501, "x"), "Server responded with an error: NotImplemented: x"),
        (response(418, "tea"), "Server responded with an error: Unknown: tea"),
        (response(500, ""), "Server responded with an error: InternalServerError"),
        (
            response(400, b"", content_length=True),
            "Server responded with an error: BadRequest",
        ),
    ],
)
def test_error_statuses(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, reply: bytes, message: str
) -> None:
    server.reply(reply)
    assert run(capsys, server, "info") == (1, "", f"{ERROR}{message}\n")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (None, "HTTP output is missing protocol statement"),
        (b"garbage\r\n\r\n", "HTTP output is missing protocol statement"),
        (
            b"HTTP/1.1 abc Bad\r\n\r\n",
            "Error parsing HTTP status code: invalid digit found in string",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n",
            "Error parsing HTTP Content-Length field: invalid digit found in string",
        ),
    ],
)
def test_transport_errors(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, reply: bytes | None, message: str
) -> None:
    server.reply(reply)
    assert run(capsys, server, "ping") == (1, "", f"{ERROR}{message}\n")


def test_no_api_socket(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, None, "ping") == (
        1,
        "Please either provide the api-socket option or dbus-service-name and "
        "dbus-object-path options\n",
        "",
    )


def test_socket_that_cannot_be_opened(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    assert run(capsys, None, "--api-socket", str(missing), "ping") == (
        1,
        "",
        "Error opening HTTP socket: No such file or directory (os error 2)\n",
    )
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens
    assert run(capsys, None, "--api-socket", str(stale), "info") == (
        1,
        "",
        "Error opening HTTP socket: Connection refused (os error 111)\n",
    )


def test_socket_is_opened_before_the_arguments_are_parsed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, None, "--api-socket", str(tmp_path / "x"), "add-disk", "bad=1")
    assert code == 1 and err.startswith("Error opening HTTP socket: ")


# -- client-side errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["add-device", "iommu=on"],
            "Error parsing device syntax: Error parsing --device: path missing",
        ),
        (
            ["add-disk", "foo=bar"],
            "Error parsing disk syntax: Error parsing --disk: unknown option: foo",
        ),
        (
            ["add-disk", "path=/d,queue_size=x"],
            "Error parsing disk syntax: Error parsing --disk: unable to convert x for queue_size",
        ),
        (
            ["add-fs", "tag=x"],
            "Error parsing filesystem syntax: Error parsing --fs: socket missing",
        ),
        (
            ["add-pmem", "size=1M"],
            "Error parsing persistent memory syntax: Error parsing --pmem: file missing",
        ),
        (
            ["add-net", "mac=xx"],
            "Error parsing network syntax: Error parsing --net: unable to convert xx for mac",
        ),
        (
            ["add-net", "fd=[3,x]"],
            "Error parsing network syntax: Error parsing --net: unable to convert [3,x] for fd",
        ),
        (
            ["add-user-device", "id=u"],
            "Error parsing user device syntax: Error parsing --user-device: socket missing",
        ),
        (
            ["add-vdpa", "id=v"],
            "Error parsing vDPA device syntax: Error parsing --vdpa: path missing",
        ),
        (
            ["add-vsock", "cid=3"],
            "Error parsing vsock syntax: Error parsing --vsock: socket missing",
        ),
        (
            ["restore", "prefault=on"],
            "Error parsing restore syntax: Error parsing --restore: source_url missing",
        ),
        (["resize", "--cpus", "x"], "Error parsing CPU count: invalid digit found in string"),
        (
            ["resize", "--cpus", "256"],
            "Error parsing CPU count: number too large to fit in target type",
        ),
        (["resize", "--cpus="], "Error parsing CPU count: cannot parse integer from empty string"),
        (["resize", "--memory", "1k"], 'Error parsing memory size: InvalidValue("1k")'),
        (["resize", "--memory", "xyzK"], 'Error parsing memory size: InvalidValue("xyz")'),
        (["resize", "--memory", "2 M"], 'Error parsing memory size: InvalidValue("2 ")'),
        (["resize", "--balloon", "1T"], 'Error parsing balloon size: InvalidValue("1T")'),
        (
            ["resize", "--memory", "17179869184G"],
            'Error parsing memory size: InvalidValue("17179869184G")',
        ),
        (
            ["resize-zone", "--id", "z", "--size", "1m"],
            'Error parsing memory size: InvalidValue("1m")',
        ),
    ],
)
def test_client_side_parse_errors(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, args: list[str], message: str
) -> None:
    assert run(capsys, server, *args) == (1, "", f"{ERROR}{message}\n")
    assert server.requests == []


def test_create_from_a_missing_file(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, tmp_path: Path
) -> None:
    assert run(capsys, server, "create", str(tmp_path / "nope.json")) == (
        1,
        "",
        f"{ERROR}Error reading from file: No such file or directory (os error 2)\n",
    )
    assert run(capsys, server, "create", str(tmp_path)) == (
        1,
        "",
        f"{ERROR}Error reading from file: Is a directory (os error 21)\n",
    )


def test_create_refuses_non_utf8_input(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, tmp_path: Path
) -> None:
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    assert run(capsys, server, "create", str(tmp_path / "bad.json")) == (
        1,
        "",
        f"{ERROR}Error reading from file: stream did not contain valid UTF-8\n",
    )


# -- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add-disk"], "the following required arguments were not provided:\n  <disk_config>"),
        (["remove-device"], "the following required arguments were not provided:\n  <id>"),
        (["snapshot"], "the following required arguments were not provided:\n  <snapshot_config>"),
        (
            ["resize-zone", "--id", "z"],
            "the following required arguments were not provided:\n  --size <size>",
        ),
        (
            ["resize-zone"],
            "the following required arguments were not provided:\n  --id <id>\n  --size <size>",
        ),
        (["bogus"], "unrecognized subcommand 'bogus'"),
        (["info", "extra"], "unexpected argument 'extra' found"),
        (["add-disk", "a", "b"], "unexpected argument 'b' found"),
        (["resize", "--vcpus", "2"], "unexpected argument '--vcpus' found"),
        (["resize", "--cpus"], "a value is required for '--cpus <cpus>' but none was supplied"),
        (
            ["resize", "--cpus", "1", "--cpus", "2"],
            "the argument '--cpus <cpus>' cannot be used multiple times",
        ),
        (["send-migration", "u", "--local=yes"], "unexpected value 'yes' for '--local' found"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], server: FakeApiServer, args: list[str], message: str
) -> None:
    code, out, err = run(capsys, server, *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {message}\n\nUsage: vmkit remote"), err
    assert err.endswith("\n\nFor more information, try '--help'.\n")
    assert server.requests == []


def test_missing_argument_is_checked_after_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    # ch-remote complains about the missing target first (and panics later).
    code, out, _ = run(capsys, None, "add-disk")
    assert code == 1 and out.startswith("Please either provide the api-socket option")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, None, "--help")
    assert code == 0 and "Remotely control a cloud-hypervisor VMM." in out
    for name in ("add-net", "resize-zone", "send-migration", "shutdown-vmm", "coredump"):
        assert f"  {name} " in out
    code, out, _ = run(capsys, None, "help", "resize")
    assert code == 0 and "--memory <memory>" in out and "--balloon <balloon>" in out
    code, out, _ = run(capsys, None, "add-net", "--help")
    assert code == 0 and "fd=<fd1,fd2...>" in out
    code, out, _ = run(capsys, None, "-V")
    assert code == 0 and out.startswith("vmkit remote v")
    code, out, err = run(capsys, None)
    assert code == 2 and out == "" and "Usage: vmkit remote [OPTIONS] <COMMAND>" in err
    code, _, err = run(capsys, None, "--api-socket", "/x")
    assert code == 2 and "requires a subcommand" in err


def test_the_vmkit_command_dispatches_remote(server: FakeApiServer) -> None:
    """Through ``python -m vmkit remote`` in a child, with an inherited tap fd."""
    body = '{"id":"_net0","bdf":"0000:00:05.0"}'
    server.reply(response(200, body), response(500, "VM is not running"))
    read_end, write_end = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(server.path),
             "add-net", f"fd={write_end},id=net0"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, pass_fds=(write_end,),
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, body + "\n", "")
        request = only_request(server)
        assert request.json()["id"] == "net0" and request.json()["fds"] is None
        assert len(request.fds) == 1
        os.write(request.fds[0], b"x")
        assert os.read(read_end, 1) == b"x"
        done = subprocess.run(
            [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(server.path), "pause"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (
            "Error running command: Server responded with an error: "
            "InternalServerError: VM is not running\n"
        )
    finally:
        os.close(read_end)
        os.close(write_end)
