"""``vmkit.Client``, the OpenAPI description and ``Vm.spawn`` (ch-reference §4).

The first part runs against a fake unix-socket server (the wire format, the
typed results, the errors); the OpenAPI part checks the shipped description
against vmkit's config classes; the last part boots the vmkit test guest in a
real ``vmkit --api-socket`` VMM (where /dev/kvm and the API server are there),
through ``Client``, ``vmkit remote`` and ``Vm.spawn``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import vmkit
from _fakeapi import (
    FakeApiServer,
    check_response,
    check_schema,
    request_bytes,
    response,
)
from _sockets import wait_listening
from _spawndirs import own_tempdir, spawn_dirs  # noqa: F401 (a fixture)
from vmkit import ApiError, Client, Vm, VmConfig, VmError, config, testguest
from vmkit.client import (
    ApiConnectionError,
    PciDeviceInfo,
    SpawnedVm,
    VmInfo,
    VmmPingResponse,
    openapi_spec,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(tmp_path / "api.sock") as fake:
        yield fake


def compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


PING = {"build_version": "v37.0.0", "version": "37.0.0", "pid": 1234, "features": ["kvm"]}


# -- the wire format --------------------------------------------------------------------------


def test_client_writes_what_ch_remote_writes(server: FakeApiServer) -> None:
    client = Client(server.path)
    disk = config.DiskConfig.parse("path=/d.img,id=d0")
    calls = [
        (client.boot, (), "PUT", "vm.boot", None),
        (client.shutdown, (), "PUT", "vm.shutdown", None),
        (client.reboot, (), "PUT", "vm.reboot", None),
        (client.pause, (), "PUT", "vm.pause", None),
        (client.resume, (), "PUT", "vm.resume", None),
        (client.power_button, (), "PUT", "vm.power-button", None),
        (client.delete, (), "PUT", "vm.delete", None),
        (client.shutdown_vmm, (), "PUT", "vmm.shutdown", None),
        (client.add_disk, (disk,), "PUT", "vm.add-disk", compact(disk.to_dict())),
        (client.add_disk, ("path=/d.img,id=d0",), "PUT", "vm.add-disk", compact(disk.to_dict())),
        (client.remove_device, ("d0",), "PUT", "vm.remove-device", b'{"id":"d0"}'),
        (
            client.resize_zone,
            ("z", "1G"),
            "PUT",
            "vm.resize-zone",
            b'{"id":"z","desired_ram":1073741824}',
        ),
        (client.snapshot, ("file:///s",), "PUT", "vm.snapshot", b'{"destination_url":"file:///s"}'),
        (client.coredump, ("file:///c",), "PUT", "vm.coredump", b'{"destination_url":"file:///c"}'),
        (
            client.restore,
            ("source_url=file:///s",),
            "PUT",
            "vm.restore",
            b'{"source_url":"file:///s","prefault":false}',
        ),
        (
            client.receive_migration,
            ("unix:/m",),
            "PUT",
            "vm.receive-migration",
            b'{"receiver_url":"unix:/m"}',
        ),
    ]
    for method, args, http_method, endpoint, body in calls:
        server.requests.clear()
        assert method(*args) is None  # type: ignore[operator]
        assert server.requests[0].raw == request_bytes(http_method, endpoint, body), endpoint
    server.requests.clear()
    client.send_migration("unix:/m", local=True)
    client.resize(cpus=2)
    client.resize(memory="1G", balloon=4096)
    assert [r.body for r in server.requests] == [
        b'{"destination_url":"unix:/m","local":true}',
        b'{"desired_vcpus":2,"desired_ram":null,"desired_balloon":null}',
        b'{"desired_vcpus":null,"desired_ram":1073741824,"desired_balloon":4096}',
    ]


def test_create_sends_the_config_json(server: FakeApiServer) -> None:
    cfg = VmConfig.from_cli(["--kernel", "/k", "--cpus", "boot=2", "--disk", "path=/d"])
    client = Client(server.path)
    client.create(cfg)
    client.create(cfg.to_dict())
    client.create('{"payload": {"kernel": "/k"}}')
    first, second, third = server.requests
    assert first.raw == request_bytes("PUT", "vm.create", compact(cfg.to_dict()))
    assert second.raw == first.raw
    assert third.body == b'{"payload": {"kernel": "/k"}}'


ADDS = ("add-disk", "add-vsock", "add-device", "add-user-device", "add-fs", "add-pmem", "add-vdpa")


def test_add_returns_the_pci_device_info_or_none(server: FakeApiServer) -> None:
    server.reply(response(200, '{"id":"_disk0","bdf":"0000:00:06.0"}'), response(204))
    client = Client(server.path)
    assert client.add_disk("path=/d") == PciDeviceInfo(id="_disk0", bdf="0000:00:06.0")
    assert client.add_vsock("cid=3,socket=/v") is None
    assert client.add_device("path=/dev/vfio/1") is None
    assert client.add_user_device("socket=/u") is None
    assert client.add_fs("tag=t,socket=/s") is None
    assert client.add_pmem("file=/p") is None
    assert client.add_vdpa("path=/dev/vhost-vdpa-0") is None
    assert [r.request_line for r in server.requests] == [
        f"PUT /api/v1/vm.{name} HTTP/1.1" for name in ADDS
    ]


def test_add_net_passes_fds(server: FakeApiServer) -> None:
    read_end, write_end = os.pipe()
    try:
        client = Client(server.path)
        client.add_net(config.NetConfig.parse(f"fd=[{write_end}],mac=2e:00:00:00:00:02"))
        client.add_net("id=n1", fds=[write_end, write_end])
        client.add_net("id=n2")
        first, second, third = server.requests
        assert first.json()["fds"] is None and len(first.fds) == 1
        assert len(second.fds) == 2 and second.json()["id"] == "n1"
        assert third.fds == [] and re.match(r"^2e:", third.json()["mac"])
        os.write(first.fds[0], b"z")
        assert os.read(read_end, 1) == b"z"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_typed_results(server: FakeApiServer) -> None:
    cfg = VmConfig.from_cli(["--kernel", "/k", "--memory", "size=256M"])
    info = {
        "config": cfg.to_dict(),
        "state": "Running",
        "memory_actual_size": 256 << 20,
        "device_tree": {
            "__rng": {
                "id": "__rng",
                "resources": [
                    {
                        "PciBar": {
                            "index": 0,
                            "base": 0xE0000000,
                            "size": 0x80000,
                            "type_": "Mmio64",
                            "prefetchable": False,
                        }
                    }
                ],
                "parent": None,
                "children": [],
                "pci_bdf": "0000:00:03.0",
            }
        },
    }
    counters = {"_disk0": {"read_bytes": 512, "write_bytes": 0}}
    server.reply(
        response(200, json.dumps(PING)),
        response(200, json.dumps(info)),
        response(200, json.dumps(counters)),
    )
    client = Client(server.path)
    ping = client.ping()
    assert ping == VmmPingResponse("v37.0.0", "37.0.0", 1234, ("kvm",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ping.pid = 1  # type: ignore[misc]
    got = client.info()
    assert isinstance(got, VmInfo) and isinstance(got.config, VmConfig)
    assert got.config == cfg and got.state == "Running"
    assert got.memory_actual_size == 256 << 20
    assert got.device_tree == info["device_tree"]
    assert got.to_dict() == info
    assert client.counters() == counters
    for name, value in (("VmmPingResponse", PING), ("VmInfo", info), ("VmCounters", counters)):
        check_schema(name, value)


# -- errors ---------------------------------------------------------------------------------------


def test_error_statuses_raise_api_error(server: FakeApiServer) -> None:
    server.reply(
        response(500, "invalid VM state transition: Running to Running"),
        response(400),
        response(404, "Not Found"),
        response(400, "missing field `size` at line 1 column 12"),
    )
    client = Client(server.path)
    with pytest.raises(ApiError) as raised:
        client.boot()
    assert raised.value.status == 500
    assert str(raised.value) == "invalid VM state transition: Running to Running"
    assert isinstance(raised.value, VmError) and raised.value.kind == "Api"
    with pytest.raises(ApiError) as raised:
        client.pause()
    assert (raised.value.status, str(raised.value), raised.value.body) == (
        400,
        "400 Bad Request",
        "",
    )
    with pytest.raises(ApiError) as raised:
        client.call("GET", "vm.nothing")
    assert (raised.value.status, str(raised.value)) == (404, "Not Found")
    with pytest.raises(ApiError, match=r"^missing field `size`") as raised:
        client.resize_zone("z", 1)
    assert raised.value.status == 400
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (type(copy), copy.status, str(copy)) == (ApiError, 400, str(raised.value))


def test_transport_errors_name_the_socket(tmp_path: Path, server: FakeApiServer) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(ApiConnectionError) as raised:
        Client(missing).ping()
    assert str(raised.value) == (
        f"Cannot connect to the VMM API socket {missing}: No such file or directory (os error 2)"
    )
    assert raised.value.status is None and raised.value.kind == "Connection"
    assert isinstance(raised.value, ApiError)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is ApiConnectionError and str(copy) == str(raised.value)
    server.reply(None, response(200, "not json"))
    with pytest.raises(ApiConnectionError, match=re.escape(str(server.path))) as raised:
        Client(server.path).ping()
    assert "HTTP output is missing protocol statement" in str(raised.value)
    with pytest.raises(ApiConnectionError, match="invalid JSON"):
        Client(server.path).ping()


def test_timeout(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(ApiConnectionError, match="timed out"):
            Client(path, timeout=0.3).info()
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_resize_refuses_bad_sizes(server: FakeApiServer) -> None:
    with pytest.raises(ValueError, match=r"InvalidValue\(\"1k\"\)"):
        Client(server.path).resize(memory="1k")
    assert server.requests == []


def test_public_api() -> None:
    assert vmkit.Client is Client and vmkit.ApiError is ApiError
    assert {"Client", "ApiError", "ApiConnectionError", "SpawnedVm", "spawn"} <= set(vmkit.__all__)
    assert callable(Vm.spawn)


# -- the OpenAPI description ------------------------------------------------------------------

ENDPOINTS = {
    "/vmm.ping": "get",
    "/vmm.shutdown": "put",
    "/vm.create": "put",
    "/vm.boot": "put",
    "/vm.delete": "put",
    "/vm.shutdown": "put",
    "/vm.reboot": "put",
    "/vm.pause": "put",
    "/vm.resume": "put",
    "/vm.power-button": "put",
    "/vm.info": "get",
    "/vm.counters": "get",
    "/vm.resize": "put",
    "/vm.resize-zone": "put",
    "/vm.add-device": "put",
    "/vm.add-user-device": "put",
    "/vm.add-disk": "put",
    "/vm.add-fs": "put",
    "/vm.add-pmem": "put",
    "/vm.add-net": "put",
    "/vm.add-vdpa": "put",
    "/vm.add-vsock": "put",
    "/vm.remove-device": "put",
    "/vm.snapshot": "put",
    "/vm.coredump": "put",
    "/vm.restore": "put",
    "/vm.send-migration": "put",
    "/vm.receive-migration": "put",
}

# OpenAPI schema name → vmkit config class (same fields, same order).
SCHEMA_CLASSES = {
    "VmConfig": config.VmConfig,
    "CpusConfig": config.CpusConfig,
    "CpuTopology": config.CpuTopology,
    "CpuAffinity": config.CpuAffinity,
    "CpuFeatures": config.CpuFeatures,
    "PlatformConfig": config.PlatformConfig,
    "MemoryConfig": config.MemoryConfig,
    "MemoryZoneConfig": config.MemoryZoneConfig,
    "PayloadConfig": config.PayloadConfig,
    "RateLimitGroupConfig": config.RateLimiterGroupConfig,
    "RateLimiterConfig": config.RateLimiterConfig,
    "TokenBucket": config.TokenBucketConfig,
    "DiskConfig": config.DiskConfig,
    "NetConfig": config.NetConfig,
    "RngConfig": config.RngConfig,
    "BalloonConfig": config.BalloonConfig,
    "FsConfig": config.FsConfig,
    "PmemConfig": config.PmemConfig,
    "ConsoleConfig": config.ConsoleConfig,
    "DeviceConfig": config.DeviceConfig,
    "UserDeviceConfig": config.UserDeviceConfig,
    "VdpaConfig": config.VdpaConfig,
    "VsockConfig": config.VsockConfig,
    "SgxEpcConfig": config.SgxEpcConfig,
    "NumaConfig": config.NumaConfig,
    "NumaDistance": config.NumaDistance,
    "TpmConfig": config.TpmConfig,
    "RestoreConfig": config.RestoreConfig,
}


def test_openapi_document() -> None:
    spec = openapi_spec()
    assert spec["servers"] == [{"url": "http://localhost/api/v1"}]
    assert spec["info"]["version"] == "0.3.0"
    assert {path: list(ops) for path, ops in spec["paths"].items()} == {
        path: [method] for path, method in ENDPOINTS.items()
    }
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


@pytest.mark.parametrize("name", sorted(SCHEMA_CLASSES))
def test_openapi_schemas_follow_the_config_classes(name: str) -> None:
    schema = openapi_spec()["components"]["schemas"][name]
    fields = [f.name for f in dataclasses.fields(SCHEMA_CLASSES[name])]
    assert list(schema["properties"]) == fields
    required = [
        f.name
        for f in dataclasses.fields(SCHEMA_CLASSES[name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if name in ("CpusConfig", "MemoryConfig", "RngConfig"):
        # Required in JSON although the Python classes give the CLI defaults.
        required = {"CpusConfig": ["boot_vcpus", "max_vcpus"], "MemoryConfig": ["size"]}.get(
            name, ["src"]
        )
    assert schema.get("required", []) == required


FULL_CLI = [
    "--kernel", "/k", "--cmdline", "console=ttyS0", "--initramfs", "/i",
    "--cpus", "boot=2,max=4,topology=1:2:1:2,affinity=[0@[0,1],1@[2]],kvm_hyperv=on",
    "--memory", "size=1G,hotplug_method=virtio-mem,hotplug_size=1G,shared=on",
    "--memory-zone", "id=z0,size=256M,host_numa_node=0",
    "--platform", "num_pci_segments=2,iommu_segments=[1],serial_number=s,oem_strings=[a,b]",
    "--rate-limit-group", "id=g0,bw_size=1000,bw_refill_time=100",
    "--disk", "path=/d,rate_limit_group=g0,serial=abc",
    "path=/e,ops_size=10,ops_refill_time=10,iommu=on,pci_segment=1",
    "--net", "tap=tap0,mtu=1500,host_mac=2e:00:00:00:00:01,num_queues=4,vhost_mode=server",
    "--rng", "src=/dev/random",
    "--balloon", "size=64M,deflate_on_oom=on",
    "--fs", "tag=t,socket=/s",
    "--pmem", "file=/p,size=2M",
    "--serial", "file=/tmp/serial",
    "--console", "off",
    "--device", "path=/dev/vfio/1",
    "--user-device", "socket=/u",
    "--vdpa", "path=/dev/vhost-vdpa-0",
    "--vsock", "cid=3,socket=/v",
    "--pvpanic", "--watchdog",
    "--numa", "guest_numa_id=0,cpus=[0-1],distances=[1@20],memory_zones=[z0]",
    "--tpm", "socket=/t",
]  # fmt: skip


def test_configs_validate_against_the_schema() -> None:
    check_schema("VmConfig", VmConfig().to_dict())
    check_schema("VmConfig", {})
    full = VmConfig.from_json(VmConfig.from_cli(FULL_CLI).to_json()).to_dict()
    check_schema("VmConfig", full)
    for bad in (
        {"cpus": {"boot_vcpus": 256, "max_vcpus": 1}},
        {"cpus": {"boot_vcpus": 1}},
        {"memory": {"size": -1}},
        {"serial": {"mode": "Loud"}},
        {"disks": [{"rate_limiter_config": {"bandwidth": None, "extra": 1}}]},
        {"net": [{"mac": "zz"}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            check_schema("VmConfig", bad)
    check_schema("VmResize", {"desired_vcpus": 2, "desired_ram": None, "desired_balloon": None})
    check_schema("VmResizeZone", {"id": "z", "desired_ram": 1})
    check_schema("PciDeviceInfo", {"id": "_disk0", "bdf": "0000:00:06.0"})
    with pytest.raises(jsonschema.ValidationError):
        check_schema("PciDeviceInfo", {"id": "_disk0", "bdf": "0:0:6.0"})


# -- against a real vmkit VMM -------------------------------------------------------------------

needs_vmm = pytest.mark.vmkit_kvm


def guest_config(ticks: int = 200, exit: str = "poweroff", **extra: str) -> VmConfig:
    argv = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], exit, ticks=ticks, tick_ms=20),
        "--cpus", "boot=1",
        "--memory", "size=128M",
        "--console", "off",
    ]  # fmt: skip
    for flag, value in extra.items():
        argv += [f"--{flag.replace('_', '-')}", value]
    return VmConfig.from_cli(argv)


@pytest.fixture
def vmm() -> Iterator[SpawnedVm]:
    """An idle ``vmkit --api-socket`` VMM without a VM."""
    with Vm.spawn(None) as spawned:
        yield spawned


def raw(client: Client, method: str, endpoint: str, body: bytes | None = None) -> tuple[int, bytes]:
    answer = client.request(method, endpoint, body)
    check_response(f"/{endpoint}", method, answer.status, answer.body)
    return answer.status, answer.body or b""


def error_text(call: Any, *args: Any) -> str:
    with pytest.raises(ApiError) as raised:
        call(*args)
    assert raised.value.status == 500, raised.value
    return str(raised.value)


@needs_vmm
def test_client_lifecycle_against_vmkit(vmm: SpawnedVm) -> None:
    client = vmm.client
    status, body = raw(client, "GET", "vmm.ping")
    assert status == 200 and json.loads(body)["pid"] == vmm.pid
    assert client.ping().pid == vmm.pid
    assert error_text(client.info) == "VM is not created"
    cfg = guest_config(ticks=1000)
    cfg.serial = config.ConsoleConfig(mode="File", file=str(vmm.tmpdir / "serial.log"))
    client.create(cfg)
    status, body = raw(client, "GET", "vm.info")
    info = client.info()
    assert status == 200 and info.state == "Created" and info.device_tree is None
    assert info.config.payload == cfg.payload
    assert info.memory_actual_size == 128 << 20
    assert raw(client, "PUT", "vm.boot") == (204, b"")
    assert client.info().state == "Running"
    status, body = raw(client, "GET", "vm.info")
    assert status == 200 and json.loads(body)["device_tree"] is not None
    status, body = raw(client, "GET", "vm.counters")
    assert status == 200
    assert raw(client, "PUT", "vm.pause") == (204, b"")
    assert client.info().state == "Paused"
    client.resume()
    assert client.info().state == "Running"
    client.shutdown()
    assert client.info().state == "Created"
    client.boot()
    assert client.info().state == "Running"
    client.reboot()
    assert client.info().state == "Running"
    client.delete()
    assert error_text(client.info) == "VM is not created"


@needs_vmm
def test_invalid_transitions_through_the_client(vmm: SpawnedVm) -> None:
    """Every refused action, with v37's text (ch-reference §4.4, §4.5)."""
    client = vmm.client
    # No config.
    assert error_text(client.boot) == "VM config is missing"
    for call in (client.pause, client.resume, client.counters, client.power_button):
        assert error_text(call) == "VM is not running"
    assert error_text(client.shutdown) == "VM is not running"
    assert error_text(client.reboot) == "VM is not created"
    assert error_text(client.info) == "VM is not created"
    assert error_text(client.add_disk, "path=/d") == "VM is not created"
    assert error_text(client.resize) == "VM is not created"
    client.delete()  # a no-op without a config
    # A config, no VM.
    client.create(guest_config(ticks=1000))
    assert error_text(client.create, guest_config()) == "VM is already created"
    assert error_text(client.restore, "source_url=file:///nowhere") == "VM is already created"
    for call in (client.pause, client.resume, client.counters, client.power_button):
        assert error_text(call) == "VM is not running"
    assert error_text(client.shutdown) == "VM is not running"
    assert error_text(client.reboot) == "VM is not created"
    assert error_text(client.remove_device, "nope") == 'No device with id "nope" to remove'
    assert error_text(client.resize_zone, "nope", "1M") == "Failed resizing a memory zone"
    # Running.
    client.boot()
    assert error_text(client.boot) == "invalid VM state transition: Running to Running"
    assert error_text(client.resume) == (
        "Cannot resume VM: Failed to resume migratable component: "
        "Invalid transition: InvalidStateTransition(Running, Running)"
    )
    assert error_text(client.snapshot, "file:///tmp/x") == (
        "Cannot snapshot VM: Failed to snapshot migratable component: "
        "Trying to snapshot while VM is running"
    )
    # Paused.
    client.pause()
    assert error_text(client.pause) == (
        "Cannot pause VM: Failed to pause migratable component: "
        "Invalid transition: InvalidStateTransition(Paused, Paused)"
    )
    client.boot()  # boot on a Paused VM resumes it
    assert client.info().state == "Running"
    client.shutdown()
    assert client.info().state == "Created"


@needs_vmm
def test_bad_requests_against_vmkit(vmm: SpawnedVm) -> None:
    client = vmm.client
    assert (
        client.request("GET", "vm.nothing").status,
        client.request("GET", "vm.nothing").body,
    ) == (
        404,
        b"Not Found",
    )
    assert client.request("GET", "vm.boot").status == 400
    assert client.request("PUT", "vm.info").status == 400
    assert client.request("PUT", "vm.pause", b"{}").status == 400
    assert raw(client, "PUT", "vm.create")[0] == 400
    status, body = raw(client, "PUT", "vm.create", b'{"memory": {}}')
    assert status == 400 and b"missing field `size`" in body


@needs_vmm
def test_cold_add_and_remove_edit_the_config(vmm: SpawnedVm, tmp_path: Path) -> None:
    client = vmm.client
    client.create(guest_config())
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    assert client.add_disk(f"path={disk},id=d0") is None
    client.resize(cpus=2, memory="256M")
    info = client.info()
    assert [d.id for d in info.config.disks or []] == ["d0"]
    assert info.config.cpus.boot_vcpus == 2 and info.config.memory.size == 256 << 20
    client.remove_device("d0")
    assert client.info().config.disks in (None, [])


@needs_vmm
def test_vmkit_remote_against_vmkit(vmm: SpawnedVm, tmp_path: Path) -> None:
    def remote(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(vmm.api_socket), *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT, input=stdin,
        )  # fmt: skip

    done = remote("ping")
    assert done.returncode == 0 and done.stderr == ""
    check_schema("VmmPingResponse", json.loads(done.stdout))
    assert done.stdout.endswith("}\n")
    done = remote("info")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "Error running command: Server responded with an error: "
        "InternalServerError: VM is not created\n"
    )
    (tmp_path / "vm.json").write_text(guest_config(ticks=1000).to_json())
    assert remote("create", str(tmp_path / "vm.json")).returncode == 0
    assert remote("create", stdin=guest_config().to_json()).stderr == (
        "Error running command: Server responded with an error: "
        "InternalServerError: VM is already created\n"
    )
    done = remote("boot")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    done = remote("info")
    info = json.loads(done.stdout)
    check_schema("VmInfo", info)
    assert info["state"] == "Running"
    done = remote("counters")
    assert done.returncode == 0
    check_schema("VmCounters", json.loads(done.stdout))
    assert remote("pause").returncode == 0
    done = remote("pause")
    assert done.returncode == 1 and "InvalidStateTransition(Paused, Paused)" in done.stderr
    assert remote("resume").returncode == 0
    assert remote("shutdown").returncode == 0
    assert json.loads(remote("info").stdout)["state"] == "Created"
    assert remote("delete").returncode == 0
    done = remote("shutdown-vmm")
    assert done.returncode == 0 and done.stderr == ""
    assert vmm.process.wait(30) == 0


@needs_vmm
def test_every_remote_subcommand_against_vmkit(vmm: SpawnedVm, tmp_path: Path) -> None:
    """Each ch-remote subcommand once against a real vmkit VMM: cold edits, the
    features vmkit refuses (with their texts), and the booted VM's actions."""

    def remote(*args: str) -> tuple[int, str, str]:
        done = subprocess.run(
            [sys.executable, "-m", "vmkit", "remote", "--api-socket", str(vmm.api_socket), *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    def refused(*args: str) -> str:
        code, out, err = remote(*args)
        assert (code, out) == (1, ""), (args, err)
        prefix = "Error running command: Server responded with an error: "
        assert err.startswith(prefix), err
        return err[len(prefix) :].strip()

    ok = (0, "", "")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    assert remote("create", "-") != ok  # nothing on stdin: not a config
    vm_json = tmp_path / "vm.json"
    cold = guest_config(ticks=5000)
    cold.cpus.max_vcpus = 2  # room for the resize below
    vm_json.write_text(cold.to_json())
    assert remote("create", str(vm_json)) == ok
    # Cold edits land in the config.
    assert remote("add-disk", f"path={disk},id=d1") == ok
    assert remote("add-net", "mac=12:34:56:78:9a:bc,id=n1") == ok
    assert remote("add-pmem", f"file={disk},size=1M,id=p1") == ok
    assert remote("add-vsock", "cid=3,socket=/tmp/vmkit-test-vsock.sock,id=v1") == ok
    assert refused("add-vsock", "cid=4,socket=/tmp/x.sock") == (
        "InternalServerError: Too many virtio-vsock devices"
    )
    assert remote("add-device", "path=/sys/bus/pci/devices/0000:00:01.0,id=f1") == ok
    assert remote("add-vdpa", "path=/dev/vhost-vdpa-0,id=a1") == ok
    assert "Failed to validate config" in refused("add-fs", "tag=t,socket=/tmp/fs.sock")
    assert "Failed to validate config" in refused("add-user-device", "socket=/tmp/u.sock")
    info = json.loads(remote("info")[1])
    assert [d["id"] for d in info["config"]["disks"]] == ["d1"]
    for device in ("d1", "n1", "p1", "v1", "f1", "a1"):
        assert remote("remove-device", device) == ok, device
    assert refused("remove-device", "d1") == (
        'InternalServerError: No device with id "d1" to remove'
    )
    assert remote("resize", "--cpus", "2", "--memory", "256M") == ok
    info = json.loads(remote("info")[1])
    assert info["config"]["cpus"]["boot_vcpus"] == 2
    assert info["config"]["memory"]["size"] == 256 << 20
    assert refused("resize-zone", "--id", "z0", "--size", "1G") == (
        "InternalServerError: Failed resizing a memory zone"
    )
    assert refused("restore", "source_url=file:///tmp/snap") == (
        "InternalServerError: VM is already created"
    )
    assert refused("coredump", "/tmp/core") == "NotFound: Not Found"
    # The booted VM.
    assert remote("boot") == ok
    assert remote("power-button") == ok  # the ticks step ignores it
    assert remote("reboot") == ok
    assert json.loads(remote("info")[1])["state"] == "Running"
    assert "snapshot" in refused("snapshot", "file:///tmp/snap").lower()
    # No VMM listens there, and there is no such directory to listen in.
    assert refused("send-migration", "unix:/nonexistent/m") == (
        "InternalServerError: Failed to send migratable component snapshot: Error connecting "
        "to UNIX socket: No such file or directory (os error 2)"
    )
    assert refused("receive-migration", "unix:/nonexistent/m") == (
        "InternalServerError: Failed to receive migratable component snapshot: Error binding "
        "to UNIX socket: No such file or directory (os error 2)"
    )
    info = remote("info")
    assert info[0] == 0, info
    assert json.loads(info[1])["state"] == "Running", info
    assert remote("shutdown-vmm") == ok
    assert vmm.process.wait(30) == 0


@needs_vmm
def test_spawn_boots_and_the_guest_powers_off() -> None:
    with Vm.spawn(guest_config(ticks=50)) as vm:
        tmpdir = vm.tmpdir
        assert tmpdir is not None and vm.api_socket.is_socket()
        assert vm.state == "Created"
        assert vm.wait(0) is None  # not booted yet
        vm.boot()
        assert vm.state in ("Running", "Shutdown")
        vm.serial.wait_for(r"tick \d+", timeout=20)
        exit_info = vm.wait(60)
        assert exit_info is not None and exit_info.reason == "poweroff", (exit_info, vm.log)
        assert vm.state == "Shutdown"
        assert "step ticks ok" in vm.serial.text
        with pytest.raises(VmError, match="stopped before") as raised:
            vm.serial.wait_for("never printed", timeout=5)
        assert raised.value.kind == "Stopped"
    assert vm.closed and vm.process.returncode == 0
    assert not tmpdir.exists() and not vm.api_socket.exists()
    assert "step ticks ok" in vm.serial.text  # still readable after close


@needs_vmm
def test_a_vm_run_through_the_spawned_vms_client_is_waited_for_as_one_run_through_it() -> None:
    """``wait`` knows a VM ran whichever object asked: a VM booted (or
    restored) with ``vm.client`` and then stopped is reported stopped, not
    never booted."""
    with Vm.spawn(None) as vm:
        vm.client.create(guest_config(ticks=2000))
        assert vm.wait(0) is None  # created, not booted
        vm.client.boot()
        assert vm.client.info().state == "Running"
        vm.client.shutdown()  # not through the SpawnedVm: as if another client did it
        exit_info = vm.wait(10)
        assert exit_info is not None and exit_info.reason == "shutdown", exit_info


@needs_vmm
def test_spawned_vm_methods() -> None:
    with Vm.spawn(guest_config(ticks=2000)) as vm:
        vm.boot()
        vm.serial.wait_for(r"tick \d+", timeout=20)
        vm.pause()
        assert vm.state == "Paused"
        vm.resume()
        assert isinstance(vm.info(), VmInfo)
        assert isinstance(vm.counters(), dict)
        vm.reboot()
        assert vm.state == "Running"
        vm.shutdown()
        exit_info = vm.wait(10)
        assert exit_info is not None and exit_info.reason == "shutdown"
        with pytest.raises(VmError, match="it was shut down") as raised:
            vm.serial.wait_for("never printed", timeout=10)
        assert raised.value.kind == "Stopped"
        pid = vm.pid
    assert vm.process.returncode == 0  # vmm.shutdown ended it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@needs_vmm
@pytest.mark.usefixtures("own_tempdir")
def test_spawned_vmm_killed_mid_run_leaves_nothing_behind() -> None:
    before = spawn_dirs()
    with Vm.spawn(guest_config(ticks=5000)) as vm:
        tmpdir = vm.tmpdir
        assert tmpdir is not None
        vm.boot()
        vm.serial.wait_for(r"tick \d+", timeout=20)
        os.kill(vm.pid, signal.SIGKILL)
        exit_info = vm.wait(30)
        assert exit_info is not None and exit_info.reason == "vmm-error"
        assert "SIGKILL" in exit_info.message
        assert vm.state == "Shutdown"
        with pytest.raises(ApiConnectionError, match=re.escape(str(vm.api_socket))):
            vm.client.ping()
    assert vm.process.returncode == -signal.SIGKILL
    assert not tmpdir.exists()
    assert not vm.api_socket.exists()
    assert spawn_dirs() - before == set()
    with pytest.raises(ProcessLookupError):
        os.kill(vm.pid, 0)


@needs_vmm
def test_a_killed_parent_takes_its_spawned_vmm_with_it(tmp_path: Path) -> None:
    """The spawning program dies by SIGKILL: its VMM notices and goes too."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import json, sys, time\n"
        "from vmkit import Vm, VmConfig\n"
        "vm = Vm.spawn(VmConfig.from_json(sys.argv[1]))\n"
        "vm.boot()\n"
        "vm.serial.wait_for(r'tick \\d+', timeout=20)\n"
        "print(json.dumps([vm.pid, str(vm.tmpdir), str(vm.api_socket)]), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script), guest_config(ticks=100_000).to_json()],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        pid, tmpdir, api_socket = json.loads(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the orphaned VMM kept running"
        time.sleep(0.05)
    assert not Path(api_socket).exists()
    assert not Path(tmpdir).exists()


@needs_vmm
def test_spawn_close_ends_an_unresponsive_vmm() -> None:
    vm = Vm.spawn(guest_config(ticks=5000), stop_timeout=1.0)
    tmpdir = vm.tmpdir
    assert tmpdir is not None
    vm.boot()
    os.kill(vm.pid, signal.SIGSTOP)  # answers nothing, ignores SIGTERM until continued
    started = time.monotonic()
    vm.close()
    assert time.monotonic() - started < 20
    assert vm.process.returncode == -signal.SIGKILL
    assert not tmpdir.exists()
    vm.close()  # again: nothing to do


@needs_vmm
def test_spawn_reports_a_vmm_that_does_not_start() -> None:
    with pytest.raises(VmError, match="ended before serving") as raised:
        Vm.spawn(guest_config(), vmm_args=["--no-such-flag"])
    assert raised.value.kind == "Spawn"
    assert "unexpected argument '--no-such-flag'" in str(raised.value)


@needs_vmm
@pytest.mark.usefixtures("own_tempdir")
def test_spawn_create_error_cleans_up() -> None:
    bad = guest_config()
    bad.memory.size = -1
    before = spawn_dirs()
    with pytest.raises(ApiError) as raised:
        Vm.spawn(bad)
    assert raised.value.status == 400
    assert spawn_dirs() - before == set()


# -- Vm.spawn never drives or removes what it did not create ----------------------------------


@pytest.fixture
def other_vmm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Another VMM, not started by Vm.spawn, serving on its own socket."""
    path = Path(tempfile.mkdtemp(prefix="vmkit-other-", dir="/tmp")) / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmkit", "--api-socket", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(path, timeout=30, process=proc)
        yield proc, path
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)


def assert_still_serving(proc: subprocess.Popen[bytes], path: Path) -> None:
    assert proc.poll() is None, "the other VMM was ended"
    assert path.is_socket(), "the other VMM's socket was removed"
    assert Client(path).ping().pid == proc.pid


@needs_vmm
def test_spawn_refuses_a_socket_path_that_exists(
    other_vmm: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, path = other_vmm
    for timeout in (30.0, 0.01):  # a short startup_timeout must not change anything
        with pytest.raises(VmError, match="the path exists") as raised:
            Vm.spawn(guest_config(), api_socket=path, startup_timeout=timeout)
        assert raised.value.kind == "Spawn"
        assert_still_serving(proc, path)


@needs_vmm
@pytest.mark.parametrize("fresh_interpreter", [False, True], ids=["vm-process", "python-vmm"])
def test_spawned_vm_talks_only_to_its_own_process(
    other_vmm: tuple[subprocess.Popen[bytes], Path], fresh_interpreter: bool
) -> None:
    """Another VMM's socket put where the child's was: no request reaches it, close()
    ends only the child and removes nothing of the other's."""
    proc, other_path = other_vmm
    own_path = other_path.with_name("own.sock")  # outside the directory spawn makes and removes
    vm = Vm.spawn(None, api_socket=own_path, fresh_interpreter=fresh_interpreter)
    try:
        assert vm.client.ping().pid == vm.pid
        os.rename(own_path, own_path.with_name("moved.sock"))
        os.rename(other_path, own_path)  # the other VMM now listens on the child's path
        if fresh_interpreter:
            # Requests go through the path: the peer is checked before each.
            with pytest.raises(ApiConnectionError, match=f"served by process {proc.pid}"):
                vm.info()
        else:
            # This program serves the VM process's API: its requests go to that
            # server here, never through the path.
            assert vm.client.ping().pid == vm.pid
        vm.close()
        assert vm.process.returncode is not None
        assert_still_serving(proc, own_path)
    finally:
        vm.close()
        if own_path.exists() and not other_path.exists():
            os.rename(own_path, other_path)  # give it back for the fixture's clean-up
        own_path.with_name("moved.sock").unlink(missing_ok=True)
