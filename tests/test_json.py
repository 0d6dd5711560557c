"""JSON shapes (ch-reference §2.2-2.3) and the CLI == JSON acceptance vectors (ref §5.3)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _helpers import KERNEL, MAC_RE, cli, from_json, some
from vmkit import ConfigError
from vmkit.config import (
    BalloonConfig,
    ConsoleConfig,
    CpuAffinity,
    CpuFeatures,
    CpusConfig,
    CpuTopology,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    MemoryConfig,
    MemoryZoneConfig,
    NetConfig,
    NumaConfig,
    NumaDistance,
    PayloadConfig,
    PlatformConfig,
    PmemConfig,
    RateLimiterConfig,
    RateLimiterGroupConfig,
    RestoreConfig,
    RngConfig,
    SgxEpcConfig,
    TokenBucketConfig,
    TpmConfig,
    UserDeviceConfig,
    VdpaConfig,
    VmConfig,
    VsockConfig,
)

# fields that exist only with a cargo feature (ref §2.2); they may or may not be emitted
FEATURE_ONLY = {"gdb", "tdx", "sev_snp", "igvm"}

FIELD_ORDER: dict[type, list[str]] = {
    VmConfig: [
        "cpus",
        "memory",
        "payload",
        "rate_limit_groups",
        "disks",
        "net",
        "rng",
        "balloon",
        "fs",
        "pmem",
        "serial",
        "console",
        "devices",
        "user_devices",
        "vdpa",
        "vsock",
        "pvpanic",
        "iommu",
        "sgx_epc",
        "numa",
        "watchdog",
        "platform",
        "tpm",
    ],
    CpusConfig: [
        "boot_vcpus",
        "max_vcpus",
        "topology",
        "kvm_hyperv",
        "max_phys_bits",
        "affinity",
        "features",
    ],
    CpuTopology: ["threads_per_core", "cores_per_die", "dies_per_package", "packages"],
    CpuAffinity: ["vcpu", "host_cpus"],
    CpuFeatures: ["amx"],
    PlatformConfig: ["num_pci_segments", "iommu_segments", "serial_number", "uuid", "oem_strings"],
    MemoryConfig: [
        "size",
        "mergeable",
        "hotplug_method",
        "hotplug_size",
        "hotplugged_size",
        "shared",
        "hugepages",
        "hugepage_size",
        "prefault",
        "zones",
        "thp",
    ],
    MemoryZoneConfig: [
        "id",
        "size",
        "file",
        "shared",
        "hugepages",
        "hugepage_size",
        "host_numa_node",
        "hotplug_size",
        "hotplugged_size",
        "prefault",
    ],
    RateLimiterGroupConfig: ["id", "rate_limiter_config"],
    RateLimiterConfig: ["bandwidth", "ops"],
    TokenBucketConfig: ["size", "one_time_burst", "refill_time"],
    DiskConfig: [
        "path",
        "readonly",
        "direct",
        "iommu",
        "num_queues",
        "queue_size",
        "vhost_user",
        "vhost_socket",
        "rate_limit_group",
        "rate_limiter_config",
        "id",
        "disable_io_uring",
        "disable_aio",
        "pci_segment",
        "serial",
    ],
    NetConfig: [
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "mtu",
        "iommu",
        "num_queues",
        "queue_size",
        "vhost_user",
        "vhost_socket",
        "vhost_mode",
        "id",
        "fds",
        "rate_limiter_config",
        "pci_segment",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
    ],
    RngConfig: ["src", "iommu"],
    BalloonConfig: ["size", "deflate_on_oom", "free_page_reporting"],
    FsConfig: ["tag", "socket", "num_queues", "queue_size", "id", "pci_segment"],
    PmemConfig: ["file", "size", "iommu", "discard_writes", "id", "pci_segment"],
    ConsoleConfig: ["file", "mode", "iommu", "socket"],
    DeviceConfig: ["path", "iommu", "id", "pci_segment"],
    UserDeviceConfig: ["socket", "id", "pci_segment"],
    VdpaConfig: ["path", "num_queues", "iommu", "id", "pci_segment"],
    VsockConfig: ["cid", "socket", "iommu", "id", "pci_segment"],
    SgxEpcConfig: ["id", "size", "prefault"],
    NumaConfig: [
        "guest_numa_id",
        "cpus",
        "distances",
        "memory_zones",
        "sgx_epc_sections",
        "pci_segments",
    ],
    NumaDistance: ["destination", "distance"],
    PayloadConfig: ["firmware", "kernel", "cmdline", "initramfs"],
    TpmConfig: ["socket"],
    RestoreConfig: ["source_url", "prefault"],
}

# minimal JSON objects (REQ fields only) for every struct
MINIMAL_JSON: dict[type, dict[str, Any]] = {
    VmConfig: {},
    CpusConfig: {"boot_vcpus": 1, "max_vcpus": 1},
    CpuTopology: {"threads_per_core": 1, "cores_per_die": 1, "dies_per_package": 1, "packages": 1},
    CpuAffinity: {"vcpu": 0, "host_cpus": [0]},
    CpuFeatures: {},
    PlatformConfig: {},
    MemoryConfig: {"size": 1},
    MemoryZoneConfig: {"id": "z", "size": 1},
    RateLimiterGroupConfig: {},
    RateLimiterConfig: {},
    TokenBucketConfig: {"size": 1, "refill_time": 1},
    DiskConfig: {},
    NetConfig: {},
    RngConfig: {"src": "/dev/urandom"},
    BalloonConfig: {"size": 0},
    FsConfig: {"tag": "t", "socket": "/s"},
    PmemConfig: {"file": "/p"},
    ConsoleConfig: {"mode": "Tty"},
    DeviceConfig: {"path": "/dev/x"},
    UserDeviceConfig: {"socket": "/u"},
    VdpaConfig: {"path": "/v"},
    VsockConfig: {"cid": 3, "socket": "/s"},
    SgxEpcConfig: {"id": "e"},
    NumaConfig: {},
    NumaDistance: {},
    PayloadConfig: {},
    TpmConfig: {"socket": "/t"},
    RestoreConfig: {"source_url": "/r"},
}


def keys_without_features(d: dict[str, Any]) -> list[str]:
    return [k for k in d if k not in FEATURE_ONLY]


def json_err(fn: Any, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn()
    err = info.value
    assert err.kind == "InvalidJson", (err.kind, str(err))
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
    return err


# ---------------------------------------------------------------------------
# Serialisation: declaration order, null for None (ref §2.2, §2.3)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(FIELD_ORDER), ids=lambda c: c.__name__)
def test_to_dict_field_order(cls: Any) -> None:
    obj = cls.from_dict(MINIMAL_JSON[cls])
    d = obj.to_dict()
    assert keys_without_features(d) == FIELD_ORDER[cls]
    assert set(d) - set(FIELD_ORDER[cls]) <= FEATURE_ONLY


def _ordered(value: Any) -> Any:
    """Normalise nested JSON so that key order is compared too."""
    if isinstance(value, dict):
        return [(k, _ordered(v)) for k, v in value.items()]
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return [(k, _ordered(v)) for k, v in value]
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


FULL_ARGS = [
    "--cpus",
    "boot=2,max=4,topology=1:2:1:2,affinity=[0@[0,1]],features=[amx]",
    "--platform",
    "num_pci_segments=2,iommu_segments=[1],serial_number=s,uuid=u,oem_strings=[a,b]",
    "--memory",
    "size=0,shared=on,hotplug_size=1G",
    "--memory-zone",
    "id=z0,size=1G,shared=on,host_numa_node=0",
    "--rate-limit-group",
    "id=g0,bw_size=1,bw_refill_time=1",
    "--disk",
    "path=/d,rate_limit_group=g0,id=d0",
    "path=/e,ops_size=1,ops_refill_time=2",
    "--net",
    "mac=12:34:56:78:90:ab,fd=[3],mtu=1500,bw_size=1,bw_refill_time=1",
    "--balloon",
    "size=1M",
    "--fs",
    "tag=t,socket=/s",
    "--pmem",
    "file=/p,size=1G",
    "--serial",
    "file=/tmp/serial",
    "--console",
    "pty",
    "--device",
    "path=/dev/x",
    "--user-device",
    "socket=/u",
    "--vdpa",
    "path=/v",
    "--vsock",
    "cid=3,socket=/vs",
    "--sgx-epc",
    "id=e0,size=1M",
    "--numa",
    "guest_numa_id=0,cpus=[0,1],distances=[1@20],memory_zones=[z0],pci_segments=[0]",
    "--tpm",
    "socket=/t",
    "--pvpanic",
    "--watchdog",
]


def test_to_json_order_matches_to_dict_and_roundtrips() -> None:
    cfg = cli(*FULL_ARGS)
    text = cfg.to_json()
    pairs = json.loads(text, object_pairs_hook=lambda p: p)
    assert [k for k, _ in pairs if k not in FEATURE_ONLY] == FIELD_ORDER[VmConfig]
    assert _ordered(pairs) == _ordered(cfg.to_dict())
    assert json.loads(text) == cfg.to_dict()
    assert VmConfig.from_json(text) == cfg
    assert VmConfig.from_dict(cfg.to_dict()) == cfg


def test_nested_field_order_in_full_config() -> None:
    d = cli(*FULL_ARGS).to_dict()
    checks: list[tuple[type, Any]] = [
        (CpusConfig, d["cpus"]),
        (CpuTopology, d["cpus"]["topology"]),
        (CpuAffinity, d["cpus"]["affinity"][0]),
        (PlatformConfig, d["platform"]),
        (MemoryConfig, d["memory"]),
        (MemoryZoneConfig, d["memory"]["zones"][0]),
        (RateLimiterGroupConfig, d["rate_limit_groups"][0]),
        (RateLimiterConfig, d["rate_limit_groups"][0]["rate_limiter_config"]),
        (TokenBucketConfig, d["disks"][1]["rate_limiter_config"]["ops"]),
        (DiskConfig, d["disks"][0]),
        (NetConfig, d["net"][0]),
        (RngConfig, d["rng"]),
        (BalloonConfig, d["balloon"]),
        (FsConfig, d["fs"][0]),
        (PmemConfig, d["pmem"][0]),
        (ConsoleConfig, d["serial"]),
        (DeviceConfig, d["devices"][0]),
        (UserDeviceConfig, d["user_devices"][0]),
        (VdpaConfig, d["vdpa"][0]),
        (VsockConfig, d["vsock"]),
        (SgxEpcConfig, d["sgx_epc"][0]),
        (NumaConfig, d["numa"][0]),
        (NumaDistance, d["numa"][0]["distances"][0]),
        (PayloadConfig, d["payload"]),
        (TpmConfig, d["tpm"]),
    ]
    for cls, sub in checks:
        assert keys_without_features(sub) == FIELD_ORDER[cls], cls.__name__
    assert d["disks"][1]["rate_limiter_config"] == {
        "bandwidth": None,
        "ops": {"size": 1, "one_time_burst": 0, "refill_time": 2},
    }
    assert d["disks"][0]["rate_limiter_config"] is None
    assert d["net"][0]["fds"] == [3]
    assert d["serial"] == {"file": "/tmp/serial", "mode": "File", "iommu": False, "socket": None}


DEFAULT_VM: dict[str, Any] = {
    "cpus": {
        "boot_vcpus": 1,
        "max_vcpus": 1,
        "topology": None,
        "kvm_hyperv": False,
        "max_phys_bits": 46,
        "affinity": None,
        "features": {"amx": False},
    },
    "memory": {
        "size": 536870912,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "hotplug_size": None,
        "hotplugged_size": None,
        "shared": False,
        "hugepages": False,
        "hugepage_size": None,
        "prefault": False,
        "zones": None,
        "thp": True,
    },
    "payload": {"firmware": None, "kernel": KERNEL, "cmdline": None, "initramfs": None},
    "rate_limit_groups": None,
    "disks": None,
    "net": None,
    "rng": {"src": "/dev/urandom", "iommu": False},
    "balloon": None,
    "fs": None,
    "pmem": None,
    "serial": {"file": None, "mode": "Null", "iommu": False, "socket": None},
    "console": {"file": None, "mode": "Tty", "iommu": False, "socket": None},
    "devices": None,
    "user_devices": None,
    "vdpa": None,
    "vsock": None,
    "pvpanic": False,
    "iommu": False,
    "sgx_epc": None,
    "numa": None,
    "watchdog": False,
    "platform": None,
    "tpm": None,
}


def strip_features(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: strip_features(v) for k, v in d.items() if k not in FEATURE_ONLY}
    if isinstance(d, list):
        return [strip_features(v) for v in d]
    return d


def test_default_config_json() -> None:
    # ref §5.3 "Defaults", §2.1
    assert strip_features(from_json({}).to_dict()) == DEFAULT_VM
    assert strip_features(cli().to_dict()) == DEFAULT_VM
    assert strip_features(json.loads(cli().to_json())) == DEFAULT_VM


def test_preserved_fds_never_written_or_read() -> None:
    assert "preserved_fds" not in from_json({}).to_dict()
    assert from_json({"preserved_fds": [3, 4]}) == from_json({})


@pytest.mark.parametrize(
    ("obj", "field", "spelling"),
    [
        (ConsoleConfig.parse("off"), "mode", "Off"),
        (ConsoleConfig.parse("pty"), "mode", "Pty"),
        (ConsoleConfig.parse("tty"), "mode", "Tty"),
        (ConsoleConfig.parse("null"), "mode", "Null"),
        (ConsoleConfig.parse("file=/f"), "mode", "File"),
        (ConsoleConfig.parse("socket=/s"), "mode", "Socket"),
        (MemoryConfig.parse("hotplug_method=acpi"), "hotplug_method", "Acpi"),
        (MemoryConfig.parse("hotplug_method=virtio-mem"), "hotplug_method", "VirtioMem"),
        (NetConfig.parse("vhost_mode=client"), "vhost_mode", "Client"),
        (NetConfig.parse("vhost_mode=server"), "vhost_mode", "Server"),
    ],
)
def test_enum_spellings(obj: Any, field: str, spelling: str) -> None:
    assert obj.to_dict()[field] == spelling
    assert json.loads(json.dumps(obj.to_dict()))[field] == spelling
    assert type(obj).from_dict(obj.to_dict()) == obj


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (ConsoleConfig, {"mode": "tty"}, "mode"),
        (ConsoleConfig, {"mode": "TTY"}, "mode"),
        (MemoryConfig, {"size": 1, "hotplug_method": "virtio-mem"}, "hotplug_method"),
        (NetConfig, {"vhost_mode": "client"}, "vhost_mode"),
    ],
)
def test_enum_spellings_are_exact(cls: Any, data: dict[str, Any], field: str) -> None:
    json_err(lambda: cls.from_dict(data), field)


def test_nested_objects_are_plain_data() -> None:
    c = CpusConfig.parse("topology=1:2:1:1,affinity=[0@[1,2]]")
    d = c.to_dict()
    assert d["topology"] == {
        "threads_per_core": 1,
        "cores_per_die": 2,
        "dies_per_package": 1,
        "packages": 1,
    }
    assert d["affinity"] == [{"vcpu": 0, "host_cpus": [1, 2]}]
    n = NetConfig.parse(
        "mac=DE:AD:BE:EF:00:01,host_mac=02:00:00:00:00:0A,fd=[3,4],bw_size=5,bw_refill_time=6"
    )
    nd = n.to_dict()
    assert (nd["mac"], nd["host_mac"], nd["fds"]) == (
        "de:ad:be:ef:00:01",
        "02:00:00:00:00:0a",
        [3, 4],
    )
    assert (nd["ip"], nd["mask"]) == ("192.168.249.1", "255.255.255.0")
    assert nd["rate_limiter_config"] == {
        "bandwidth": {"size": 5, "one_time_burst": 0, "refill_time": 6},
        "ops": None,
    }


# ---------------------------------------------------------------------------
# Deserialisation defaults (ref §2.3)
# ---------------------------------------------------------------------------


def test_from_dict_defaults() -> None:
    assert DiskConfig.from_dict({}).to_dict() == {
        "path": None,
        "readonly": False,
        "direct": False,
        "iommu": False,
        "num_queues": 1,
        "queue_size": 128,
        "vhost_user": False,
        "vhost_socket": None,
        "rate_limit_group": None,
        "rate_limiter_config": None,
        "id": None,
        "disable_io_uring": False,
        "disable_aio": False,
        "pci_segment": 0,
        "serial": None,
    }
    net = NetConfig.from_dict({}).to_dict()
    assert MAC_RE.match(net.pop("mac"))
    assert net == {
        "tap": None,
        "ip": "192.168.249.1",
        "mask": "255.255.255.0",
        "host_mac": None,
        "mtu": None,
        "iommu": False,
        "num_queues": 2,
        "queue_size": 256,
        "vhost_user": False,
        "vhost_socket": None,
        "vhost_mode": "Client",
        "id": None,
        "fds": None,
        "rate_limiter_config": None,
        "pci_segment": 0,
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }
    assert FsConfig.from_dict({"tag": "t", "socket": "/s"}).to_dict() == {
        "tag": "t",
        "socket": "/s",
        "num_queues": 1,
        "queue_size": 1024,
        "id": None,
        "pci_segment": 0,
    }
    assert PmemConfig.from_dict({"file": "/p"}).to_dict() == {
        "file": "/p",
        "size": None,
        "iommu": False,
        "discard_writes": False,
        "id": None,
        "pci_segment": 0,
    }
    assert VdpaConfig.from_dict({"path": "/v"}).num_queues == 1
    assert RateLimiterGroupConfig.from_dict({}).to_dict() == {
        "id": "",
        "rate_limiter_config": {"bandwidth": None, "ops": None},
    }
    assert TokenBucketConfig.from_dict({"size": 1, "refill_time": 2}).one_time_burst is None
    assert NumaDistance.from_dict({}) == NumaDistance(destination=0, distance=0)
    assert strip_features(PlatformConfig.from_dict({}).to_dict()) == {
        "num_pci_segments": 1,
        "iommu_segments": None,
        "serial_number": None,
        "uuid": None,
        "oem_strings": None,
    }
    assert SgxEpcConfig.from_dict({"id": "e"}).to_dict() == {
        "id": "e",
        "size": 0,
        "prefault": False,
    }
    assert ConsoleConfig.from_dict({"mode": "Pty"}).to_dict() == {
        "file": None,
        "mode": "Pty",
        "iommu": False,
        "socket": None,
    }
    assert MemoryConfig.from_dict({"size": 5}).thp is True
    assert CpusConfig.from_dict({"boot_vcpus": 2, "max_vcpus": 3}).max_phys_bits == 46
    assert RestoreConfig.from_dict({"source_url": "/r"}).prefault is False


def test_python_constructor_defaults() -> None:
    # vmkit API: CpusConfig, MemoryConfig and RngConfig default to v37's Default values
    assert CpusConfig() == CpusConfig.from_dict({"boot_vcpus": 1, "max_vcpus": 1})
    assert MemoryConfig() == MemoryConfig.from_dict({"size": 536870912})
    assert RngConfig() == RngConfig.from_dict({"src": "/dev/urandom"})
    assert DiskConfig() == DiskConfig.from_dict({})
    with pytest.raises(TypeError):
        FsConfig()  # type: ignore[call-arg]  # JSON-required fields have no default


def test_optional_fields_accept_null() -> None:
    cfg = from_json(
        {"disks": None, "balloon": None, "payload": {"kernel": KERNEL, "cmdline": None}}
    )
    assert cfg.disks is None and cfg.balloon is None and some(cfg.payload).cmdline is None
    assert DiskConfig.from_dict({"path": None, "id": None}).path is None


def test_net_mac_random_when_missing_from_json() -> None:
    a = some(from_json({"net": [{}]}).net)[0].mac
    b = some(from_json({"net": [{}]}).net)[0].mac
    assert a.startswith("2e:") and b.startswith("2e:")
    assert MAC_RE.match(a) and a != b


def test_mac_is_lowercased() -> None:
    n = NetConfig.from_dict({"mac": "DE:AD:BE:EF:12:34", "host_mac": "Aa:bB:cc:dd:ee:ff"})
    assert (n.mac, n.host_mac) == ("de:ad:be:ef:12:34", "aa:bb:cc:dd:ee:ff")


# ---------------------------------------------------------------------------
# REQ fields enforced; type errors; unknown fields (ref §2.2, §2.3)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cpus": {"boot_vcpus": 1}}, "max_vcpus"),
        ({"cpus": {"max_vcpus": 1}}, "boot_vcpus"),
        (
            {
                "cpus": {
                    "boot_vcpus": 1,
                    "max_vcpus": 1,
                    "topology": {"threads_per_core": 1, "cores_per_die": 1, "dies_per_package": 1},
                }
            },
            "packages",
        ),
        ({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 0}]}}, "host_cpus"),
        ({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"host_cpus": [0]}]}}, "vcpu"),
        ({"memory": {}}, "size"),
        ({"memory": {"size": 0, "zones": [{"size": 1}]}}, "id"),
        ({"memory": {"size": 0, "zones": [{"id": "z"}]}}, "size"),
        (
            {"rate_limit_groups": [{"id": "g", "rate_limiter_config": {"bandwidth": {"size": 1}}}]},
            "refill_time",
        ),
        ({"disks": [{"rate_limiter_config": {"ops": {"refill_time": 1}}}]}, "size"),
        ({"rng": {}}, "src"),
        ({"rng": {"iommu": True}}, "src"),
        ({"balloon": {}}, "size"),
        ({"fs": [{"tag": "t"}]}, "socket"),
        ({"fs": [{"socket": "/s"}]}, "tag"),
        ({"pmem": [{}]}, "file"),
        ({"serial": {}}, "mode"),
        ({"console": {"file": "/x"}}, "mode"),
        ({"devices": [{}]}, "path"),
        ({"user_devices": [{}]}, "socket"),
        ({"vdpa": [{"num_queues": 1}]}, "path"),
        ({"vsock": {"cid": 3}}, "socket"),
        ({"vsock": {"socket": "/s"}}, "cid"),
        ({"sgx_epc": [{}]}, "id"),
        ({"tpm": {}}, "socket"),
    ],
)
def test_required_fields(data: dict[str, Any], field: str) -> None:
    json_err(lambda: from_json(data), field)
    body = {"payload": {"kernel": KERNEL}, **data}
    json_err(lambda: VmConfig.from_dict(body), field)


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (CpusConfig, "boot_vcpus"),
        (MemoryConfig, "size"),
        (RngConfig, "src"),
        (RestoreConfig, "source_url"),
        (TokenBucketConfig, "size"),
        (CpuTopology, "threads_per_core"),
        (ConsoleConfig, "mode"),
    ],
)
def test_required_fields_direct(cls: Any, field: str) -> None:
    json_err(lambda: cls.from_dict({}), field)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cpus": {"boot_vcpus": 256, "max_vcpus": 1}}, "boot_vcpus"),
        ({"cpus": {"boot_vcpus": -1, "max_vcpus": 1}}, "boot_vcpus"),
        ({"cpus": {"boot_vcpus": "1", "max_vcpus": 1}}, "boot_vcpus"),
        ({"cpus": {"boot_vcpus": 1.5, "max_vcpus": 1}}, "boot_vcpus"),
        ({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": "on"}}, "kvm_hyperv"),
        ({"memory": {"size": -1}}, "size"),
        ({"memory": {"size": 18446744073709551616}}, "size"),
        ({"memory": {"size": 1, "mergeable": "on"}}, "mergeable"),
        ({"memory": {"size": 1, "thp": 1}}, "thp"),
        ({"disks": [{"path": 5}]}, "path"),
        ({"disks": [{"queue_size": 65536}]}, "queue_size"),
        ({"disks": [{"readonly": "true"}]}, "readonly"),
        ({"net": [{"ip": "1.2.3"}]}, "ip"),
        ({"net": [{"mask": 5}]}, "mask"),
        ({"net": [{"fds": [2147483648]}]}, "fds"),
        ({"net": [{"mtu": 65536}]}, "mtu"),
        ({"vsock": {"cid": 4294967296, "socket": "/s"}}, "cid"),
        ({"vsock": {"cid": 3, "socket": ["/s"]}}, "socket"),
        ({"fs": [{"tag": 1, "socket": "/s"}]}, "tag"),
        ({"numa": [{"distances": [{"destination": 0, "distance": 256}]}]}, "distance"),
        ({"numa": [{"cpus": [256]}]}, "cpus"),
        ({"platform": {"iommu_segments": [65536]}}, "iommu_segments"),
        ({"pvpanic": None}, "pvpanic"),
        ({"pvpanic": "on"}, "pvpanic"),
        ({"iommu": 1}, "iommu"),
        ({"payload": {"kernel": 5}}, "kernel"),
        ({"disks": {"path": "/d"}}, "disks"),
        ({"cpus": [1]}, "cpus"),
    ],
)
def test_type_errors(data: dict[str, Any], field: str) -> None:
    json_err(lambda: from_json(data), field)


@pytest.mark.parametrize("text", ["{", "", "1", "null", '"x"', "{}{}", '{"cpus": }'])
def test_invalid_json_documents(text: str) -> None:
    json_err(lambda: VmConfig.from_json(text))


def test_bytes_are_read_as_v37_reads_a_request_body() -> None:
    body = b'{"payload":{"kernel":"\xff"}}'
    with pytest.raises(ConfigError) as info:
        VmConfig.from_json(body)
    assert (info.value.kind, info.value.path) == ("InvalidJson", "payload.kernel")
    # v37 (serde_json 1.0.109) places it at the string's closing quote
    assert str(info.value) == "payload.kernel: invalid unicode code point at line 1 column 24"
    text = b'{"payload":{"kernel":"\xc3\xa9"}}'
    assert VmConfig.from_json(bytearray(text)).payload == VmConfig.from_json(text.decode()).payload


@pytest.mark.parametrize(
    "data",
    [
        {"bogus": 1},
        {"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "core_scheduling": "vm"}},
        {
            "memory": {"size": 0, "zones": [{"id": "z", "size": 1, "mergeable": True}]}
        },  # OpenAPI-only field
        {"disks": [{"path": "/d", "lock_granularity": "full", "pci_device_id": 3}]},
        {"net": [{"mac": "12:34:56:78:90:ab", "queue_affinity": []}]},
        {
            "rate_limit_groups": [
                {
                    "id": "g",
                    "extra": 1,
                    "rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1, "extra": 2}},
                }
            ]
        },
        {"payload": {"kernel": KERNEL, "fw_cfg": {}}},
    ],
)
def test_unknown_fields_ignored(data: dict[str, Any]) -> None:
    cfg = from_json(data)
    assert cfg == VmConfig.from_dict(cfg.to_dict())


def test_unknown_fields_ignored_values_kept() -> None:
    cfg = from_json({"disks": [{"path": "/d", "lock_granularity": "full"}]})
    assert cfg.disks == [DiskConfig(path="/d")]


@pytest.mark.parametrize(
    "data",
    [
        {"disks": [{"path": "/d", "rate_limiter_config": {"bandwidth": None, "foo": 1}}]},
        {"net": [{"rate_limiter_config": {"foo": {}}}]},
        {"rate_limit_groups": [{"id": "g", "rate_limiter_config": {"ops": None, "foo": 1}}]},
    ],
)
def test_rate_limiter_config_denies_unknown_fields(data: dict[str, Any]) -> None:
    json_err(lambda: from_json(data), "foo")


def test_rate_limiter_config_direct() -> None:
    json_err(lambda: RateLimiterConfig.from_dict({"foo": 1}), "foo")
    assert RateLimiterConfig.from_dict({}) == RateLimiterConfig(bandwidth=None, ops=None)


@pytest.mark.parametrize(
    ("mac", "suffix_required"),
    [
        ("zz:zz:zz:zz:zz:zz", True),
        ("12:34:56", False),
        ("12:34:56:78:90:ab:cd", False),
        ("123:4:56:78:90:ab", False),
        ("", False),
    ],
)
def test_bad_mac_text(mac: str, suffix_required: bool) -> None:
    prefix = f"The provided MAC address is invalid: parsing of {mac} into a MAC address failed"
    err = json_err(lambda: from_json({"net": [{"mac": mac}]}), prefix)
    if suffix_required:
        assert prefix + ": " in str(err)  # bad hex gets ": <reason>" (ref §2.2)
    json_err(lambda: NetConfig.from_dict({"host_mac": mac}), prefix)


# ---------------------------------------------------------------------------
# §5.3: CLI == JSON equivalences
# ---------------------------------------------------------------------------

EQUAL: list[tuple[list[str], dict[str, Any]]] = [
    ([], {}),
    ([], {"serial": {"mode": "Null"}, "console": {"mode": "Tty"}}),
    (["--cpus", "boot=1"], {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}),
    (["--cpus", "boot=1,max=3"], {"cpus": {"boot_vcpus": 1, "max_vcpus": 3}}),
    (["--memory", "size=1073741824"], {"memory": {"size": 1073741824}}),
    (["--memory", "size=1G"], {"memory": {"size": 1073741824}}),
    (["--memory", "size=1G,mergeable=on"], {"memory": {"size": 1073741824, "mergeable": True}}),
    (
        ["--memory", "size=1G,hotplug_size=1G"],
        {"memory": {"size": 1073741824, "hotplug_method": "Acpi", "hotplug_size": 1073741824}},
    ),
    (
        ["--memory", "size=1G,hotplug_method=virtio-mem"],
        {"memory": {"size": 1073741824, "hotplug_method": "VirtioMem"}},
    ),
    (
        ["--cmdline", "arg1=foo arg2=bar"],
        {"payload": {"kernel": KERNEL, "cmdline": "arg1=foo arg2=bar"}},
    ),
    (
        ["--disk", "path=/path/to/disk/1", "path=/path/to/disk/2"],
        {"disks": [{"path": "/path/to/disk/1"}, {"path": "/path/to/disk/2"}]},
    ),
    (
        ["--memory", "shared=true", "--disk", "vhost_user=true,socket=/tmp/sock1"],
        {
            "memory": {"shared": True, "size": 536870912},
            "disks": [{"vhost_user": True, "vhost_socket": "/tmp/sock1"}],
        },
    ),
    (
        [
            "--disk",
            "path=/path/to/disk/1,rate_limit_group=group0",
            "--rate-limit-group",
            "id=group0,bw_size=1000,bw_refill_time=100",
        ],
        {
            "disks": [{"path": "/path/to/disk/1", "rate_limit_group": "group0"}],
            "rate_limit_groups": [
                {
                    "id": "group0",
                    "rate_limiter_config": {
                        "bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100}
                    },
                }
            ],
        },
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd"],
        {"net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd"}]},
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,tap=tap0"],
        {"net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd", "tap": "tap0"}]},
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,tap=tap0,ip=1.2.3.4"],
        {
            "net": [
                {
                    "mac": "12:34:56:78:90:ab",
                    "host_mac": "34:56:78:90:ab:cd",
                    "tap": "tap0",
                    "ip": "1.2.3.4",
                }
            ]
        },
    ),
    (
        [
            "--net",
            "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,tap=tap0,ip=1.2.3.4,mask=5.6.7.8",
        ],
        {
            "net": [
                {
                    "mac": "12:34:56:78:90:ab",
                    "host_mac": "34:56:78:90:ab:cd",
                    "tap": "tap0",
                    "ip": "1.2.3.4",
                    "mask": "5.6.7.8",
                }
            ]
        },
    ),
    (
        [
            "--cpus",
            "boot=2",
            "--net",
            "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,tap=tap0,ip=1.2.3.4,mask=5.6.7.8,num_queues=4",
        ],
        {
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "net": [
                {
                    "mac": "12:34:56:78:90:ab",
                    "host_mac": "34:56:78:90:ab:cd",
                    "tap": "tap0",
                    "ip": "1.2.3.4",
                    "mask": "5.6.7.8",
                    "num_queues": 4,
                }
            ],
        },
    ),
    (
        [
            "--cpus",
            "boot=2",
            "--net",
            "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,tap=tap0,ip=1.2.3.4,mask=5.6.7.8,num_queues=4,queue_size=128",
        ],
        {
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "net": [
                {
                    "mac": "12:34:56:78:90:ab",
                    "host_mac": "34:56:78:90:ab:cd",
                    "tap": "tap0",
                    "ip": "1.2.3.4",
                    "mask": "5.6.7.8",
                    "num_queues": 4,
                    "queue_size": 128,
                }
            ],
        },
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,num_queues=2,queue_size=256"],
        {"net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd"}]},
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,iommu=on"],
        {
            "net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd", "iommu": True}],
            "iommu": True,
        },
    ),
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,iommu=off"],
        {"net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd", "iommu": False}]},
    ),
    (
        [
            "--memory",
            "shared=true",
            "--net",
            "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,vhost_user=true,socket=/tmp/sock",
        ],
        {
            "memory": {"shared": True, "size": 536870912},
            "net": [
                {
                    "mac": "12:34:56:78:90:ab",
                    "host_mac": "34:56:78:90:ab:cd",
                    "vhost_user": True,
                    "vhost_socket": "/tmp/sock",
                }
            ],
        },
    ),
    (["--rng", "src=/path/to/entropy/source"], {"rng": {"src": "/path/to/entropy/source"}}),
    (
        [
            "--memory",
            "shared=true",
            "--fs",
            "tag=virtiofs1,socket=/path/to/sock1",
            "tag=virtiofs2,socket=/path/to/sock2",
        ],
        {
            "memory": {"shared": True, "size": 536870912},
            "fs": [
                {"tag": "virtiofs1", "socket": "/path/to/sock1"},
                {"tag": "virtiofs2", "socket": "/path/to/sock2"},
            ],
        },
    ),
    (
        [
            "--memory",
            "shared=true",
            "--cpus",
            "boot=4",
            "--fs",
            "tag=virtiofs1,socket=/path/to/sock1,num_queues=4",
        ],
        {
            "memory": {"shared": True, "size": 536870912},
            "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
            "fs": [{"tag": "virtiofs1", "socket": "/path/to/sock1", "num_queues": 4}],
        },
    ),
    (
        [
            "--memory",
            "shared=true",
            "--cpus",
            "boot=4",
            "--fs",
            "tag=virtiofs1,socket=/path/to/sock1,num_queues=4,queue_size=128",
        ],
        {
            "memory": {"shared": True, "size": 536870912},
            "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
            "fs": [
                {"tag": "virtiofs1", "socket": "/path/to/sock1", "num_queues": 4, "queue_size": 128}
            ],
        },
    ),
    (
        ["--pmem", "file=/path/to/img/1,size=1G", "file=/path/to/img/2,size=2G"],
        {
            "pmem": [
                {"file": "/path/to/img/1", "size": 1073741824},
                {"file": "/path/to/img/2", "size": 2147483648},
            ]
        },
    ),
    (
        ["--pmem", "file=/path/to/img/1,size=1G,iommu=on"],
        {"pmem": [{"file": "/path/to/img/1", "size": 1073741824, "iommu": True}], "iommu": True},
    ),
    (
        ["--serial", "tty", "--console", "off"],
        {"serial": {"mode": "Tty"}, "console": {"mode": "Off"}},
    ),
    (
        ["--serial", "pty", "--console", "pty"],
        {"serial": {"mode": "Pty"}, "console": {"mode": "Pty"}},
    ),
    (
        ["--device", "path=/path/to/device/1", "path=/path/to/device/2"],
        {"devices": [{"path": "/path/to/device/1"}, {"path": "/path/to/device/2"}]},
    ),
    (
        ["--device", "path=/path/to/device/1,iommu=on"],
        {"devices": [{"path": "/path/to/device/1", "iommu": True}], "iommu": True},
    ),
    (
        ["--vdpa", "path=/path/to/device/1", "path=/path/to/device/2,num_queues=2"],
        {
            "vdpa": [
                {"path": "/path/to/device/1", "num_queues": 1},
                {"path": "/path/to/device/2", "num_queues": 2},
            ]
        },
    ),
    (
        ["--vsock", "cid=123,socket=/path/to/sock/1"],
        {"vsock": {"cid": 123, "socket": "/path/to/sock/1"}},
    ),
    (
        ["--vsock", "cid=123,socket=/path/to/sock/1,iommu=on"],
        {"vsock": {"cid": 123, "socket": "/path/to/sock/1", "iommu": True}, "iommu": True},
    ),
    (["--tpm", "socket=/path/to/tpm/sock"], {"tpm": {"socket": "/path/to/tpm/sock"}}),
]


@pytest.mark.parametrize(("args", "data"), EQUAL, ids=[" ".join(a) or "defaults" for a, _ in EQUAL])
def test_cli_equals_json(args: list[str], data: dict[str, Any]) -> None:
    assert cli(*args) == from_json(data)


UNEQUAL: list[tuple[list[str], dict[str, Any]]] = [
    (["--cpus", "boot=2,max=4"], {"cpus": {"boot_vcpus": 1, "max_vcpus": 3}}),
    (["--memory", "size=1G,mergeable=on"], {"memory": {"size": 1073741824, "mergeable": False}}),
    (
        ["--disk", "path=/path/to/disk/1", "path=/path/to/disk/2"],
        {"disks": [{"path": "/path/to/disk/1"}]},
    ),
    (["--net", "mac="], {"net": []}),
    (["--net", "mac="], {"net": [{}]}),  # the MAC is random on both sides
    (
        ["--net", "mac=12:34:56:78:90:ab,host_mac=34:56:78:90:ab:cd,iommu=on"],
        {"net": [{"mac": "12:34:56:78:90:ab", "host_mac": "34:56:78:90:ab:cd", "iommu": True}]},
    ),
    (
        ["--pmem", "file=/path/to/img/1,size=1G,iommu=on"],
        {"pmem": [{"file": "/path/to/img/1", "size": 1073741824, "iommu": True}]},
    ),
    (
        ["--device", "path=/path/to/device/1,iommu=on"],
        {"devices": [{"path": "/path/to/device/1", "iommu": True}]},
    ),
    (
        ["--vsock", "cid=123,socket=/path/to/sock/1"],
        {"vsock": {"cid": 124, "socket": "/path/to/sock/1"}},
    ),
    (
        ["--vsock", "cid=123,socket=/path/to/sock/1,iommu=on"],
        {"vsock": {"cid": 123, "socket": "/path/to/sock/1", "iommu": True}},
    ),
]


@pytest.mark.parametrize(("args", "data"), UNEQUAL, ids=[" ".join(a) for a, _ in UNEQUAL])
def test_cli_not_equal_json(args: list[str], data: dict[str, Any]) -> None:
    assert cli(*args) != from_json(data)


def test_json_validate_sets_iommu_to_match_cli() -> None:
    args = ["--pmem", "file=/path/to/img/1,size=1G,iommu=on"]
    cfg = from_json({"pmem": [{"file": "/path/to/img/1", "size": 1073741824, "iommu": True}]})
    assert cfg != cli(*args)
    cfg.validate()
    assert cfg == cli(*args)


# ---------------------------------------------------------------------------
# from_dict reads Python objects directly (no JSON text in between)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [[], [1], (), "{}", 5, None, {1, 2}])
def test_from_dict_refuses_what_is_not_an_object(data: Any) -> None:
    err = json_err(lambda: VmConfig.from_dict(data))
    assert "VmConfig" in str(err) or "JSON value" in str(err), str(err)


def test_from_dict_refuses_an_array_for_a_nested_object() -> None:
    err = json_err(lambda: VmConfig.from_dict({"cpus": []}), "cpus")
    assert str(err) == "cpus: invalid type: sequence, expected struct CpusConfig"


@pytest.mark.parametrize("big", [2**64, 2**70, -(2**70)])
def test_from_dict_names_a_huge_integer_as_an_integer(big: int) -> None:
    err = json_err(lambda: VmConfig.from_dict({"memory": {"size": big}}), "memory.size")
    assert f"integer `{big}`" in str(err), str(err)
    assert "floating point" not in str(err)


def test_from_dict_errors_match_json_text_errors() -> None:
    for data in (
        {"disks": [{"queue_size": "x"}]},
        {"cpus": {"boot_vcpus": 256, "max_vcpus": 1}},
        {"cpus": {"boot_vcpus": 1.5, "max_vcpus": 1}},
        {"net": [{"mac": "zz:zz:zz:zz:zz:zz"}]},
        {"serial": {"mode": "Loud"}},
        {"memory": {}},
        {"pvpanic": None},
        {"cpus": None},
        {"disks": {"path": "/d"}},
        {"disks": [None]},
        {"payload": {"kernel": 5}},
        {"memory": {"size": True}},
        {"rate_limit_groups": [{"id": "g", "rate_limiter_config": {"foo": 1}}]},
    ):
        from_text = json_err(lambda d=data: VmConfig.from_json(json.dumps(d)))  # type: ignore[misc]
        from_object = json_err(lambda d=data: VmConfig.from_dict(d))  # type: ignore[misc]
        assert str(from_object) == from_text.message.rsplit(" at line ", 1)[0]
        assert from_object.path == from_text.path


def test_from_dict_reads_config_objects_tuples_and_non_json_values() -> None:
    disk = DiskConfig(path="/d", readonly=True)
    cfg = VmConfig.from_dict({"disks": (disk,), "cpus": CpusConfig(boot_vcpus=2, max_vcpus=2)})
    assert cfg.disks == [disk] and cfg.disks[0] is not disk
    assert cfg.cpus.boot_vcpus == 2
    json_err(lambda: VmConfig.from_dict({"disks": [{"path": object()}]}), "disks[0].path")
    json_err(lambda: VmConfig.from_dict({"memory": {"size": float("nan")}}), "memory.size")
    json_err(lambda: VmConfig.from_dict({1: 2}), "keys must be strings")


def test_validate_and_to_option_string_read_the_objects() -> None:
    cfg = cli("--disk", "path=/d,readonly=on")
    assert cfg.disks is not None
    cfg.disks[0].queue_size = 70000  # not a u16
    json_err(cfg.validate, "disks[0].queue_size")
    json_err(cfg.disks[0].to_option_string, "queue_size")
    cfg.disks[0].queue_size = 64
    assert cfg.validate() == set()
    assert DiskConfig.parse(cfg.disks[0].to_option_string()) == cfg.disks[0]


def test_a_config_object_of_another_class_is_refused() -> None:
    cfg = cli("--disk", "path=/d")
    cfg.disks = [NetConfig(tap="tap0")]  # type: ignore[list-item]
    err = json_err(cfg.validate, "disks[0]")
    assert str(err) == "disks[0]: invalid type: NetConfig object, expected struct DiskConfig"

    class MyDisk(DiskConfig):
        pass

    cfg.disks = [MyDisk(path="/d", readonly=True)]
    assert cfg.validate() == set()
    assert VmConfig.from_dict({"disks": cfg.disks}).disks == [DiskConfig(path="/d", readonly=True)]
