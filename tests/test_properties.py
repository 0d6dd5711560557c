"""Property tests (hypothesis): parsers and JSON loaders only ever raise vmkit.ConfigError,
and option strings / JSON round-trip for generated valid objects."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable
from typing import Any

import pytest
from _helpers import KEYS, OPTIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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

SETTINGS = settings(
    # VMKIT_HYPOTHESIS_EXAMPLES raises the example count for a deeper, slower search
    max_examples=int(os.environ.get("VMKIT_HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

OPTION_CLASSES: list[type] = sorted({cls for cls, _ in OPTIONS.values()}, key=lambda c: c.__name__)

# ---------------------------------------------------------------------------
# Leaf strategies
# ---------------------------------------------------------------------------

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 4096)

PLAIN = st.text(alphabet=string.ascii_letters + string.digits + "/._-", min_size=1, max_size=12)
# strings with the characters that matter to the option grammar (§1.2) and arbitrary unicode
WILD = st.text(
    alphabet=st.one_of(
        st.sampled_from(list('ab/ ,="[]@\t:-_.\u00e9\u2003')),
        st.characters(codec="utf-8"),
    ),
    max_size=8,
)

IPV4 = st.tuples(u8, u8, u8, u8).map(lambda t: ".".join(str(x) for x in t))
MAC = st.lists(u8, min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


def build(cls: Any, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


class Strategies:
    """Strategies for every config dataclass.

    plain=True: only objects that must be expressible as option strings (alphanumeric `/._-`
    strings, non-empty lists, buckets with non-zero size/refill and a numeric burst, consistent
    console modes).
    plain=False: any valid object (arbitrary strings, empty lists, any bucket); good for JSON,
    and for option strings where `to_option_string` may answer ConfigError(kind
    "Unrepresentable").
    """

    def __init__(self, plain: bool) -> None:
        text = PLAIN if plain else WILD
        lo = 1 if plain else 0

        def lists(s: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[list[Any]]:
            return st.lists(s, min_size=lo, max_size=max_size)

        self.topology = build(
            CpuTopology, threads_per_core=u8, cores_per_die=u8, dies_per_package=u8, packages=u8
        )
        self.affinity = build(CpuAffinity, vcpu=u8, host_cpus=lists(u64, 4))
        self.cpus = build(
            CpusConfig,
            boot_vcpus=u8,
            max_vcpus=u8,
            topology=opt(self.topology),
            kvm_hyperv=st.booleans(),
            max_phys_bits=u8,
            affinity=opt(lists(self.affinity)),
            features=build(CpuFeatures, amx=st.booleans()),
        )
        self.platform = build(
            PlatformConfig,
            num_pci_segments=u16,
            iommu_segments=opt(lists(u16, 4)),
            serial_number=opt(text),
            uuid=opt(text),
            oem_strings=opt(lists(text)),
        )
        self.zone = build(
            MemoryZoneConfig,
            id=text,
            size=u64,
            file=opt(text),
            shared=st.booleans(),
            hugepages=st.booleans(),
            hugepage_size=opt(u64),
            host_numa_node=opt(u32),
            hotplug_size=opt(u64),
            hotplugged_size=opt(u64),
            prefault=st.booleans(),
        )
        self.memory = build(
            MemoryConfig,
            size=u64,
            mergeable=st.booleans(),
            hotplug_method=st.sampled_from(["Acpi", "VirtioMem"]),
            hotplug_size=opt(u64),
            hotplugged_size=opt(u64),
            shared=st.booleans(),
            hugepages=st.booleans(),
            hugepage_size=opt(u64),
            prefault=st.booleans(),
            zones=opt(lists(self.zone)),
            thp=st.booleans(),
        )
        if plain:
            self.bucket = build(
                TokenBucketConfig,
                size=st.integers(1, 2**64 - 1),
                one_time_burst=u64,
                refill_time=st.integers(1, 2**64 - 1),
            )
            rlc_pairs = st.tuples(opt(self.bucket), opt(self.bucket)).filter(
                lambda p: p != (None, None)
            )
            self.device_rlc = rlc_pairs.map(lambda p: RateLimiterConfig(bandwidth=p[0], ops=p[1]))
        else:
            self.bucket = build(
                TokenBucketConfig, size=u64, one_time_burst=opt(u64), refill_time=u64
            )
            self.device_rlc = build(
                RateLimiterConfig, bandwidth=opt(self.bucket), ops=opt(self.bucket)
            )
        self.group = build(
            RateLimiterGroupConfig,
            id=text,
            rate_limiter_config=build(
                RateLimiterConfig, bandwidth=opt(self.bucket), ops=opt(self.bucket)
            ),
        )
        self.disk = build(
            DiskConfig,
            path=opt(text),
            readonly=st.booleans(),
            direct=st.booleans(),
            iommu=st.booleans(),
            num_queues=u64,
            queue_size=u16,
            vhost_user=st.booleans(),
            vhost_socket=opt(text),
            rate_limit_group=opt(text),
            rate_limiter_config=opt(self.device_rlc),
            id=opt(text),
            disable_io_uring=st.booleans(),
            disable_aio=st.booleans(),
            pci_segment=u16,
            serial=opt(text),
        )
        fd = st.integers(0, 2**31 - 1) if plain else st.integers(-(2**31), 2**31 - 1)
        self.net = build(
            NetConfig,
            tap=opt(text),
            ip=IPV4,
            mask=IPV4,
            mac=MAC,
            host_mac=opt(MAC),
            mtu=opt(u16),
            iommu=st.booleans(),
            num_queues=u64,
            queue_size=u16,
            vhost_user=st.booleans(),
            vhost_socket=opt(text),
            vhost_mode=st.sampled_from(["Client", "Server"]),
            id=opt(text),
            fds=opt(lists(fd, 4)),
            rate_limiter_config=opt(self.device_rlc),
            pci_segment=u16,
            offload_tso=st.booleans(),
            offload_ufo=st.booleans(),
            offload_csum=st.booleans(),
        )
        self.rng = build(RngConfig, src=text, iommu=st.booleans())
        self.balloon = build(
            BalloonConfig, size=u64, deflate_on_oom=st.booleans(), free_page_reporting=st.booleans()
        )
        self.fs = build(
            FsConfig,
            tag=text,
            socket=text,
            num_queues=u64,
            queue_size=u16,
            id=opt(text),
            pci_segment=u16,
        )
        self.pmem = build(
            PmemConfig,
            file=text,
            size=opt(u64),
            iommu=st.booleans(),
            discard_writes=st.booleans(),
            id=opt(text),
            pci_segment=u16,
        )
        if plain:
            self.console = st.one_of(
                build(
                    ConsoleConfig,
                    mode=st.sampled_from(["Off", "Pty", "Tty", "Null"]),
                    file=st.none(),
                    socket=st.none(),
                    iommu=st.booleans(),
                ),
                build(
                    ConsoleConfig,
                    mode=st.just("File"),
                    file=text,
                    socket=st.none(),
                    iommu=st.booleans(),
                ),
                build(
                    ConsoleConfig,
                    mode=st.just("Socket"),
                    file=st.none(),
                    socket=text,
                    iommu=st.booleans(),
                ),
            )
        else:
            self.console = build(
                ConsoleConfig,
                mode=st.sampled_from(["Off", "Pty", "Tty", "File", "Socket", "Null"]),
                file=opt(text),
                socket=opt(text),
                iommu=st.booleans(),
            )
        self.device = build(
            DeviceConfig, path=text, iommu=st.booleans(), id=opt(text), pci_segment=u16
        )
        self.user_device = build(UserDeviceConfig, socket=text, id=opt(text), pci_segment=u16)
        self.vdpa = build(
            VdpaConfig,
            path=text,
            num_queues=u64,
            iommu=st.booleans(),
            id=opt(text),
            pci_segment=u16,
        )
        self.vsock = build(
            VsockConfig, cid=u32, socket=text, iommu=st.booleans(), id=opt(text), pci_segment=u16
        )
        self.sgx_epc = build(SgxEpcConfig, id=text, size=u64, prefault=st.booleans())
        self.numa = build(
            NumaConfig,
            guest_numa_id=u32,
            cpus=opt(lists(u8, 4)),
            distances=opt(lists(build(NumaDistance, destination=u32, distance=u8))),
            memory_zones=opt(lists(text)),
            sgx_epc_sections=opt(lists(text)),
            pci_segments=opt(lists(u16)),
        )
        self.restore = build(RestoreConfig, source_url=text, prefault=st.booleans())
        self.tpm = build(TpmConfig, socket=text)
        self.payload = build(
            PayloadConfig,
            firmware=opt(text),
            kernel=opt(text),
            cmdline=opt(text),
            initramfs=opt(text),
        )

        def vlist(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
            return opt(st.lists(s, max_size=2))

        self.vm = build(
            VmConfig,
            cpus=self.cpus,
            memory=self.memory,
            payload=opt(self.payload),
            rate_limit_groups=vlist(self.group),
            disks=vlist(self.disk),
            net=vlist(self.net),
            rng=self.rng,
            balloon=opt(self.balloon),
            fs=vlist(self.fs),
            pmem=vlist(self.pmem),
            serial=self.console,
            console=self.console,
            devices=vlist(self.device),
            user_devices=vlist(self.user_device),
            vdpa=vlist(self.vdpa),
            vsock=opt(self.vsock),
            pvpanic=st.booleans(),
            iommu=st.booleans(),
            sgx_epc=vlist(self.sgx_epc),
            numa=vlist(self.numa),
            watchdog=st.booleans(),
            platform=opt(self.platform),
            tpm=opt(self.tpm),
        )

        self.by_class: dict[type, st.SearchStrategy[Any]] = {
            CpusConfig: self.cpus,
            PlatformConfig: self.platform,
            MemoryConfig: self.memory,
            MemoryZoneConfig: self.zone,
            RateLimiterGroupConfig: self.group,
            DiskConfig: self.disk,
            NetConfig: self.net,
            RngConfig: self.rng,
            BalloonConfig: self.balloon,
            FsConfig: self.fs,
            PmemConfig: self.pmem,
            ConsoleConfig: self.console,
            DeviceConfig: self.device,
            UserDeviceConfig: self.user_device,
            VdpaConfig: self.vdpa,
            VsockConfig: self.vsock,
            SgxEpcConfig: self.sgx_epc,
            NumaConfig: self.numa,
            RestoreConfig: self.restore,
            TpmConfig: self.tpm,
            CpuTopology: self.topology,
            CpuAffinity: self.affinity,
            TokenBucketConfig: self.bucket,
            PayloadConfig: self.payload,
            VmConfig: self.vm,
        }


PLAIN_S = Strategies(plain=True)
WILD_S = Strategies(plain=False)


def only_config_errors(fn: Callable[[], Any]) -> Any:
    """Run fn; anything but a vmkit.ConfigError escaping is a failure."""
    try:
        return fn()
    except ConfigError:
        return None


def reparse(x: Any) -> Any:
    if isinstance(x, MemoryConfig):
        # vmkit API: MemoryConfig.parse(m.to_option_string(), zones=[z.to_option_string() ...]) == m
        return MemoryConfig.parse(
            x.to_option_string(), zones=[z.to_option_string() for z in x.zones or []]
        )
    return type(x).parse(x.to_option_string())


# ---------------------------------------------------------------------------
# Robustness of the option parsers
# ---------------------------------------------------------------------------

VALUES = [
    "",
    "on",
    "off",
    "true",
    "ON",
    "yes",
    "0",
    "1",
    "2",
    "3",
    "255",
    "256",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "+1",
    "1K",
    "2M",
    "1G",
    "1T",
    "1k",
    "17179869184G",
    "KMG",
    "x",
    "[1,2]",
    "[0-3]",
    "[5-3]",
    "[]",
    "[256]",
    "[65536]",
    "[2147483648]",
    "[0@[1]]",
    "[0@1]",
    "[0@[1],1@[2]]",
    "[4294967296@256]",
    "[@]",
    "@",
    "1:1:1:1",
    "0:0:0:0",
    "1:1:1",
    "de:ad:be:ef:12:34",
    "DE:AD:BE:EF:12:3",
    "1.2.3.4",
    "01.2.3.4",
    "acpi",
    "virtio-mem",
    "client",
    "server",
    "amx",
    "[amx]",
    "[foo]",
    "/path",
    '"a,b"',
    '"',
    "[",
    "]",
    "=",
    ",",
    "__x",
]

ALL_KEYS = sorted({k for keys in KEYS.values() for k in keys} | {"bogus", "", " size"})


def option_strings(keys: list[str]) -> st.SearchStrategy[str]:
    key = st.sampled_from(keys) | st.sampled_from(ALL_KEYS)
    value = st.sampled_from(VALUES) | st.text(max_size=6)
    item = st.one_of(
        st.tuples(key, value).map(lambda kv: f"{kv[0]}={kv[1]}"),
        key,
        st.text(max_size=5),
    )
    sep = st.sampled_from([",", ",", ",", " ,", ", ", ",,"])
    return st.tuples(st.lists(item, max_size=6), sep).map(lambda t: t[1].join(t[0]))


FLAG_OF: dict[type, str] = {cls: flag for flag, (cls, _) in OPTIONS.items()}


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(text=st.text(max_size=40))
def test_parse_random_text_only_raises_config_error(cls: Any, text: str) -> None:
    only_config_errors(lambda: cls.parse(text))


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_parse_structured_strings_only_raises_config_error(cls: Any, data: st.DataObject) -> None:
    text = data.draw(option_strings(KEYS[FLAG_OF[cls]]))
    result = only_config_errors(lambda: cls.parse(text))
    if result is not None:
        assert isinstance(result, cls)


@SETTINGS
@given(
    memory=option_strings(KEYS["memory"]),
    zones=st.lists(option_strings(KEYS["memory-zone"]), max_size=3),
)
def test_memory_with_zones_only_raises_config_error(memory: str, zones: list[str]) -> None:
    result = only_config_errors(lambda: MemoryConfig.parse(memory, zones=zones))
    if result is not None and zones:
        assert result.zones is not None and len(result.zones) == len(zones)


@SETTINGS
@given(
    argv=st.lists(
        st.sampled_from(
            [
                "--kernel",
                "/k",
                "--cpus",
                "--memory",
                "--disk",
                "--net",
                "--numa",
                "--console",
                "--serial",
                "--platform",
                "--memory-zone",
                "boot=2",
                "size=1G",
                "path=/a",
                "tty",
                "--bogus",
                "iommu=on",
                "--pvpanic",
            ]
        )
        | st.text(max_size=8).filter(lambda s: not s.startswith("-")),
        max_size=8,
    )
)
def test_from_cli_only_raises_config_or_usage_errors(argv: list[str]) -> None:
    import vmkit

    try:
        VmConfig.from_cli(argv)
    except (ConfigError, vmkit.UsageError):
        pass


# ---------------------------------------------------------------------------
# Robustness of the JSON loaders
# ---------------------------------------------------------------------------

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            255,
            256,
            65535,
            65536,
            2**31,
            2**32 - 1,
            2**32,
            2**63,
            2**64 - 1,
            2**64,
            -1,
            "Tty",
            "Off",
            "Pty",
            "File",
            "Socket",
            "Null",
            "Acpi",
            "VirtioMem",
            "Client",
            "Server",
            "1.2.3.4",
            "2e:00:00:00:00:01",
            "zz:00:00:00:00:01",
            "/dev/urandom",
            "",
        ]
    ),
)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(value=JSON_ANY)
def test_from_json_random_only_raises_config_error(value: Any) -> None:
    only_config_errors(lambda: VmConfig.from_json(json.dumps(value)))
    if isinstance(value, dict):
        only_config_errors(lambda: VmConfig.from_dict(value))


@SETTINGS
@given(text=st.text(max_size=30))
def test_from_json_random_text_only_raises_config_error(text: str) -> None:
    only_config_errors(lambda: VmConfig.from_json(text))


L = object()  # leaf marker

BUCKET_SHAPE = {"size": L, "one_time_burst": L, "refill_time": L}
RLC_SHAPE = {"bandwidth": BUCKET_SHAPE, "ops": BUCKET_SHAPE}
SHAPE: dict[str, Any] = {
    "cpus": {
        "boot_vcpus": L,
        "max_vcpus": L,
        "kvm_hyperv": L,
        "max_phys_bits": L,
        "topology": {
            "threads_per_core": L,
            "cores_per_die": L,
            "dies_per_package": L,
            "packages": L,
        },
        "affinity": [{"vcpu": L, "host_cpus": [L]}],
        "features": {"amx": L},
    },
    "memory": {
        "size": L,
        "mergeable": L,
        "hotplug_method": L,
        "hotplug_size": L,
        "hotplugged_size": L,
        "shared": L,
        "hugepages": L,
        "hugepage_size": L,
        "prefault": L,
        "thp": L,
        "zones": [
            {
                "id": L,
                "size": L,
                "file": L,
                "shared": L,
                "hugepages": L,
                "hugepage_size": L,
                "host_numa_node": L,
                "hotplug_size": L,
                "hotplugged_size": L,
                "prefault": L,
            }
        ],
    },
    "payload": {"firmware": L, "kernel": L, "cmdline": L, "initramfs": L},
    "rate_limit_groups": [{"id": L, "rate_limiter_config": RLC_SHAPE}],
    "disks": [
        {
            "path": L,
            "readonly": L,
            "direct": L,
            "iommu": L,
            "num_queues": L,
            "queue_size": L,
            "vhost_user": L,
            "vhost_socket": L,
            "rate_limit_group": L,
            "rate_limiter_config": RLC_SHAPE,
            "id": L,
            "disable_io_uring": L,
            "disable_aio": L,
            "pci_segment": L,
            "serial": L,
        }
    ],
    "net": [
        {
            "tap": L,
            "ip": L,
            "mask": L,
            "mac": L,
            "host_mac": L,
            "mtu": L,
            "iommu": L,
            "num_queues": L,
            "queue_size": L,
            "vhost_user": L,
            "vhost_socket": L,
            "vhost_mode": L,
            "id": L,
            "fds": [L],
            "rate_limiter_config": RLC_SHAPE,
            "pci_segment": L,
            "offload_tso": L,
            "offload_ufo": L,
            "offload_csum": L,
        }
    ],
    "rng": {"src": L, "iommu": L},
    "balloon": {"size": L, "deflate_on_oom": L, "free_page_reporting": L},
    "fs": [{"tag": L, "socket": L, "num_queues": L, "queue_size": L, "id": L, "pci_segment": L}],
    "pmem": [{"file": L, "size": L, "iommu": L, "discard_writes": L, "id": L, "pci_segment": L}],
    "serial": {"file": L, "mode": L, "iommu": L, "socket": L},
    "console": {"file": L, "mode": L, "iommu": L, "socket": L},
    "devices": [{"path": L, "iommu": L, "id": L, "pci_segment": L}],
    "user_devices": [{"socket": L, "id": L, "pci_segment": L}],
    "vdpa": [{"path": L, "num_queues": L, "iommu": L, "id": L, "pci_segment": L}],
    "vsock": {"cid": L, "socket": L, "iommu": L, "id": L, "pci_segment": L},
    "pvpanic": L,
    "iommu": L,
    "sgx_epc": [{"id": L, "size": L, "prefault": L}],
    "numa": [
        {
            "guest_numa_id": L,
            "cpus": [L],
            "distances": [{"destination": L, "distance": L}],
            "memory_zones": [L],
            "sgx_epc_sections": [L],
            "pci_segments": [L],
        }
    ],
    "watchdog": L,
    "platform": {
        "num_pci_segments": L,
        "iommu_segments": [L],
        "serial_number": L,
        "uuid": L,
        "oem_strings": [L],
    },
    "tpm": {"socket": L},
}


def from_shape(shape: Any) -> st.SearchStrategy[Any]:
    if shape is L:
        return JSON_LEAF
    if isinstance(shape, list):
        return st.lists(from_shape(shape[0]), max_size=2) | JSON_LEAF
    children = {k: from_shape(v) for k, v in shape.items()}
    return st.fixed_dictionaries({}, optional=children) | JSON_LEAF


SHAPED = st.fixed_dictionaries({}, optional={k: from_shape(v) for k, v in SHAPE.items()})


@SETTINGS
@given(value=SHAPED)
def test_shaped_random_dicts_only_raise_config_error(value: dict[str, Any]) -> None:
    cfg = only_config_errors(lambda: VmConfig.from_dict(value))
    only_config_errors(lambda: VmConfig.from_json(json.dumps(value)))
    if cfg is not None:
        # whatever loads must serialise and load back to an equal config
        assert VmConfig.from_json(cfg.to_json()) == cfg
        only_config_errors(cfg.validate)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_plain_objects_roundtrip_through_option_strings(cls: Any, data: st.DataObject) -> None:
    x = data.draw(PLAIN_S.by_class[cls])
    assert reparse(x) == x


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_any_object_roundtrips_or_is_unrepresentable(cls: Any, data: st.DataObject) -> None:
    x = data.draw(WILD_S.by_class[cls])
    try:
        text = x.to_option_string()
        zones = (
            [z.to_option_string() for z in x.zones or []] if isinstance(x, MemoryConfig) else None
        )
    except ConfigError as e:
        assert e.kind == "Unrepresentable", (e.kind, str(e))
        return
    # a string was produced, so it must parse back to the same object
    again = (
        MemoryConfig.parse(text, zones=zones) if isinstance(x, MemoryConfig) else cls.parse(text)
    )
    assert again == x


@SETTINGS
@given(x=WILD_S.vm)
def test_vm_config_json_roundtrip(x: VmConfig) -> None:
    assert VmConfig.from_json(x.to_json()) == x
    assert VmConfig.from_dict(x.to_dict()) == x
    assert json.loads(x.to_json()) == x.to_dict()


@SETTINGS
@given(x=PLAIN_S.vm)
def test_plain_vm_config_json_roundtrip(x: VmConfig) -> None:
    assert VmConfig.from_json(x.to_json()) == x


@pytest.mark.parametrize(
    "cls",
    [
        CpusConfig,
        MemoryConfig,
        DiskConfig,
        NetConfig,
        ConsoleConfig,
        NumaConfig,
        RestoreConfig,
        TpmConfig,
        RateLimiterGroupConfig,
        TokenBucketConfig,
        PayloadConfig,
        CpuTopology,
        CpuAffinity,
    ],
    ids=lambda c: c.__name__,
)
@SETTINGS
@given(data=st.data())
def test_struct_dict_roundtrip(cls: Any, data: st.DataObject) -> None:
    x = data.draw(WILD_S.by_class[cls])
    assert cls.from_dict(x.to_dict()) == x
    assert cls.from_dict(json.loads(json.dumps(x.to_dict()))) == x


# ---------------------------------------------------------------------------
# Unrepresentable objects named by the vmkit API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        DiskConfig(path='a"b'),
        DiskConfig(path="a[b"),
        DiskConfig(path="a]b"),
        DiskConfig(path=" a"),
        DiskConfig(path="a "),
        DiskConfig(path=""),
        DiskConfig(
            path="/d",
            rate_limiter_config=RateLimiterConfig(
                bandwidth=TokenBucketConfig(size=1, one_time_burst=None, refill_time=1)
            ),
        ),
        ConsoleConfig(mode="Tty", file="/x"),
        PlatformConfig(oem_strings=["a,b"]),
        RngConfig(src=""),
    ],
    ids=lambda o: repr(o)[:60],
)
def test_unrepresentable(obj: Any) -> None:
    with pytest.raises(ConfigError) as info:
        obj.to_option_string()
    assert info.value.kind == "Unrepresentable"
