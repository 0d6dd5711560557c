"""Every option of ch-validation §1: keys, defaults, REQ errors, conversion order, the §6 examples,
the ch-reference §5.2 "rev" expectations, rate-limiter buckets, net random MAC, console precedence,
and the whole-config parse order of ch-validation §2."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from _helpers import KERNEL, MAC_RE, MINIMAL, OPTIONS, cli, expect, expect_parse, parse, some
from vmkit import ParseError, ValidationError
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

G = 1073741824
M512 = 536870912


def _get(obj: Any, attr: str) -> Any:
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------
# Defaults of every option (ref §2.3, val §1)
# ---------------------------------------------------------------------------


def test_cpus_defaults() -> None:
    c = CpusConfig.parse("")
    assert c == CpusConfig(
        boot_vcpus=1,
        max_vcpus=1,
        topology=None,
        kvm_hyperv=False,
        max_phys_bits=46,
        affinity=None,
        features=CpuFeatures(amx=False),
    )


def test_platform_defaults() -> None:
    # ref §5.2 #23 (A*)
    p = PlatformConfig.parse("")
    assert (p.num_pci_segments, p.iommu_segments, p.serial_number, p.uuid, p.oem_strings) == (
        1,
        None,
        None,
        None,
        None,
    )


def test_memory_defaults() -> None:
    m = MemoryConfig.parse("")
    assert m == MemoryConfig(
        size=M512,
        mergeable=False,
        hotplug_method="Acpi",
        hotplug_size=None,
        hotplugged_size=None,
        shared=False,
        hugepages=False,
        hugepage_size=None,
        prefault=False,
        zones=None,
        thp=True,
    )


def test_memory_zone_defaults() -> None:
    z = MemoryZoneConfig.parse("id=z")
    assert z == MemoryZoneConfig(
        id="z",
        size=M512,
        file=None,
        shared=False,
        hugepages=False,
        hugepage_size=None,
        host_numa_node=None,
        hotplug_size=None,
        hotplugged_size=None,
        prefault=False,
    )


def test_rate_limit_group_defaults() -> None:
    # val §1: "a rate-limit group always has a rate_limiter_config object (its buckets
    # possibly null)"
    g = RateLimiterGroupConfig.parse("")
    assert g == RateLimiterGroupConfig(
        id="", rate_limiter_config=RateLimiterConfig(bandwidth=None, ops=None)
    )


def test_disk_defaults() -> None:
    d = DiskConfig.parse("")
    assert d == DiskConfig(
        path=None,
        readonly=False,
        direct=False,
        iommu=False,
        num_queues=1,
        queue_size=128,
        vhost_user=False,
        vhost_socket=None,
        rate_limit_group=None,
        rate_limiter_config=None,
        id=None,
        disable_io_uring=False,
        disable_aio=False,
        pci_segment=0,
        serial=None,
    )


def test_net_defaults() -> None:
    n = NetConfig.parse("")
    assert MAC_RE.match(n.mac)
    assert n == NetConfig(
        tap=None,
        ip="192.168.249.1",
        mask="255.255.255.0",
        mac=n.mac,
        host_mac=None,
        mtu=None,
        iommu=False,
        num_queues=2,
        queue_size=256,
        vhost_user=False,
        vhost_socket=None,
        vhost_mode="Client",
        id=None,
        fds=None,
        rate_limiter_config=None,
        pci_segment=0,
        offload_tso=True,
        offload_ufo=True,
        offload_csum=True,
    )


def test_simple_option_defaults() -> None:
    assert RngConfig.parse("") == RngConfig(src="/dev/urandom", iommu=False)
    assert RngConfig.parse("src=") == RngConfig(src="/dev/urandom", iommu=False)
    assert BalloonConfig.parse("") == BalloonConfig(
        size=0, deflate_on_oom=False, free_page_reporting=False
    )
    assert FsConfig.parse("tag=t,socket=/s") == FsConfig(
        tag="t", socket="/s", num_queues=1, queue_size=1024, id=None, pci_segment=0
    )
    assert PmemConfig.parse("file=/p") == PmemConfig(
        file="/p", size=None, iommu=False, discard_writes=False, id=None, pci_segment=0
    )
    assert DeviceConfig.parse("path=/dev/x") == DeviceConfig(
        path="/dev/x", iommu=False, id=None, pci_segment=0
    )
    assert UserDeviceConfig.parse("socket=/u") == UserDeviceConfig(
        socket="/u", id=None, pci_segment=0
    )
    assert VdpaConfig.parse("path=/v") == VdpaConfig(
        path="/v", num_queues=1, iommu=False, id=None, pci_segment=0
    )
    assert VsockConfig.parse("cid=3,socket=/s") == VsockConfig(
        cid=3, socket="/s", iommu=False, id=None, pci_segment=0
    )
    assert SgxEpcConfig.parse("id=e") == SgxEpcConfig(id="e", size=0, prefault=False)
    assert TpmConfig.parse("socket=/t") == TpmConfig(socket="/t")
    # ref §5.2 #27 (A*)
    assert RestoreConfig.parse("source_url=/path/to/snapshot") == RestoreConfig(
        source_url="/path/to/snapshot", prefault=False
    )


def test_numa_defaults() -> None:
    n = NumaConfig.parse("")
    assert (
        n.guest_numa_id,
        n.cpus,
        n.distances,
        n.memory_zones,
        n.sgx_epc_sections,
        n.pci_segments,
    ) == (
        0,
        None,
        None,
        None,
        None,
        None,
    )


# ---------------------------------------------------------------------------
# Every key of every option (val §1)
# ---------------------------------------------------------------------------

KEY_CASES: list[tuple[str, str, str, Any]] = [
    # cpus
    ("cpus", "boot=2", "boot_vcpus", 2),
    ("cpus", "boot=2", "max_vcpus", 2),  # max defaults to boot
    ("cpus", "boot=2,max=4", "max_vcpus", 4),
    ("cpus", "max=3", "boot_vcpus", 1),
    (
        "cpus",
        "topology=1:2:3:4",
        "topology",
        CpuTopology(threads_per_core=1, cores_per_die=2, dies_per_package=3, packages=4),
    ),
    ("cpus", "kvm_hyperv=on", "kvm_hyperv", True),
    ("cpus", "max_phys_bits=40", "max_phys_bits", 40),
    (
        "cpus",
        "affinity=[0@[0,2],1@[1,3]]",
        "affinity",
        [CpuAffinity(vcpu=0, host_cpus=[0, 2]), CpuAffinity(vcpu=1, host_cpus=[1, 3])],
    ),
    ("cpus", "features=[amx]", "features", CpuFeatures(amx=True)),
    # platform
    ("platform", "num_pci_segments=4", "num_pci_segments", 4),
    ("platform", "iommu_segments=[1,2-3]", "iommu_segments", [1, 2, 3]),
    ("platform", "serial_number=abc", "serial_number", "abc"),
    ("platform", "uuid=1234-5678", "uuid", "1234-5678"),
    ("platform", "oem_strings=[a,b]", "oem_strings", ["a", "b"]),
    # memory
    ("memory", "size=1G", "size", G),
    ("memory", "mergeable=on", "mergeable", True),
    ("memory", "hotplug_method=virtio-mem", "hotplug_method", "VirtioMem"),
    ("memory", "hotplug_size=1G", "hotplug_size", G),
    ("memory", "hotplugged_size=1G", "hotplugged_size", G),
    ("memory", "shared=on", "shared", True),
    ("memory", "hugepages=on", "hugepages", True),
    ("memory", "hugepage_size=2M", "hugepage_size", 2097152),
    ("memory", "prefault=on", "prefault", True),
    ("memory", "thp=off", "thp", False),
    # memory zone
    ("memory-zone", "id=z,size=1G", "size", G),
    ("memory-zone", "id=z,file=/f", "file", "/f"),
    ("memory-zone", "id=z,shared=on", "shared", True),
    ("memory-zone", "id=z,hugepages=on", "hugepages", True),
    ("memory-zone", "id=z,hugepage_size=2M", "hugepage_size", 2097152),
    ("memory-zone", "id=z,host_numa_node=1", "host_numa_node", 1),
    ("memory-zone", "id=z,hotplug_size=1G", "hotplug_size", G),
    ("memory-zone", "id=z,hotplugged_size=1G", "hotplugged_size", G),
    ("memory-zone", "id=z,prefault=on", "prefault", True),
    # rate-limit group
    ("rate-limit-group", "id=g0", "id", "g0"),
    # disk
    ("disk", "path=/d", "path", "/d"),
    ("disk", "readonly=on", "readonly", True),
    ("disk", "direct=on", "direct", True),
    ("disk", "iommu=on", "iommu", True),
    ("disk", "queue_size=256", "queue_size", 256),
    ("disk", "num_queues=4", "num_queues", 4),
    ("disk", "vhost_user=on", "vhost_user", True),
    ("disk", "socket=/s", "vhost_socket", "/s"),
    ("disk", "id=d0", "id", "d0"),
    ("disk", "_disable_io_uring=on", "disable_io_uring", True),
    ("disk", "_disable_aio=on", "disable_aio", True),
    ("disk", "pci_segment=1", "pci_segment", 1),
    ("disk", "serial=SER1", "serial", "SER1"),
    ("disk", "rate_limit_group=g0", "rate_limit_group", "g0"),
    # net
    ("net", "tap=tap0", "tap", "tap0"),
    ("net", "ip=1.2.3.4", "ip", "1.2.3.4"),
    ("net", "mask=255.0.0.0", "mask", "255.0.0.0"),
    ("net", "mac=de:ad:be:ef:12:34", "mac", "de:ad:be:ef:12:34"),
    ("net", "host_mac=de:ad:be:ef:12:35", "host_mac", "de:ad:be:ef:12:35"),
    ("net", "offload_tso=off", "offload_tso", False),
    ("net", "offload_ufo=off", "offload_ufo", False),
    ("net", "offload_csum=off", "offload_csum", False),
    ("net", "mtu=1500", "mtu", 1500),
    ("net", "iommu=on", "iommu", True),
    ("net", "queue_size=512", "queue_size", 512),
    ("net", "num_queues=4", "num_queues", 4),
    ("net", "vhost_user=on", "vhost_user", True),
    ("net", "socket=/s", "vhost_socket", "/s"),
    ("net", "vhost_mode=server", "vhost_mode", "Server"),
    ("net", "id=n0", "id", "n0"),
    ("net", "fd=[3,7]", "fds", [3, 7]),
    ("net", "fd=3", "fds", [3]),
    ("net", "pci_segment=1", "pci_segment", 1),
    # rng, balloon
    ("rng", "src=/dev/random", "src", "/dev/random"),
    ("rng", "iommu=on", "iommu", True),
    ("balloon", "size=128M", "size", 134217728),
    ("balloon", "deflate_on_oom=on", "deflate_on_oom", True),
    ("balloon", "free_page_reporting=on", "free_page_reporting", True),
    # fs
    ("fs", "tag=t,socket=/s", "tag", "t"),
    ("fs", "tag=t,socket=/s", "socket", "/s"),
    ("fs", "tag=t,socket=/s,num_queues=2", "num_queues", 2),
    ("fs", "tag=t,socket=/s,queue_size=512", "queue_size", 512),
    ("fs", "tag=t,socket=/s,id=f0", "id", "f0"),
    ("fs", "tag=t,socket=/s,pci_segment=1", "pci_segment", 1),
    # pmem
    ("pmem", "file=/p,size=1G", "size", G),
    ("pmem", "file=/p", "file", "/p"),
    ("pmem", "file=/p,iommu=on", "iommu", True),
    ("pmem", "file=/p,discard_writes=on", "discard_writes", True),
    ("pmem", "file=/p,id=p0", "id", "p0"),
    ("pmem", "file=/p,pci_segment=1", "pci_segment", 1),
    # console
    ("console", "off", "mode", "Off"),
    ("console", "pty", "mode", "Pty"),
    ("console", "tty", "mode", "Tty"),
    ("console", "null", "mode", "Null"),
    ("console", "file=/f", "mode", "File"),
    ("console", "file=/f", "file", "/f"),
    ("console", "socket=/s", "mode", "Socket"),
    ("console", "socket=/s", "socket", "/s"),
    ("console", "tty,iommu=on", "iommu", True),
    # device, user device, vdpa
    ("device", "path=/dev/x", "path", "/dev/x"),
    ("device", "path=/dev/x,id=x0", "id", "x0"),
    ("device", "path=/dev/x,iommu=on", "iommu", True),
    ("device", "path=/dev/x,pci_segment=1", "pci_segment", 1),
    ("user-device", "socket=/u", "socket", "/u"),
    ("user-device", "socket=/u,id=u0", "id", "u0"),
    ("user-device", "socket=/u,pci_segment=1", "pci_segment", 1),
    ("vdpa", "path=/v", "path", "/v"),
    ("vdpa", "path=/v,num_queues=2", "num_queues", 2),
    ("vdpa", "path=/v,iommu=on", "iommu", True),
    ("vdpa", "path=/v,id=v0", "id", "v0"),
    ("vdpa", "path=/v,pci_segment=1", "pci_segment", 1),
    # vsock
    ("vsock", "cid=3,socket=/s", "cid", 3),
    ("vsock", "cid=3,socket=/s", "socket", "/s"),
    ("vsock", "cid=3,socket=/s,iommu=on", "iommu", True),
    ("vsock", "cid=3,socket=/s,id=s0", "id", "s0"),
    ("vsock", "cid=3,socket=/s,pci_segment=1", "pci_segment", 1),
    # sgx-epc
    ("sgx-epc", "id=e", "id", "e"),
    ("sgx-epc", "id=e,size=1G", "size", G),
    ("sgx-epc", "id=e,prefault=on", "prefault", True),
    # numa
    ("numa", "guest_numa_id=1", "guest_numa_id", 1),
    ("numa", "cpus=[0-2]", "cpus", [0, 1, 2]),
    ("numa", "distances=[0@20]", "distances", [NumaDistance(destination=0, distance=20)]),
    ("numa", "memory_zones=[z0,z1]", "memory_zones", ["z0", "z1"]),
    ("numa", "sgx_epc_sections=[e0]", "sgx_epc_sections", ["e0"]),
    ("numa", "pci_segments=[1]", "pci_segments", [1]),
    # restore, tpm
    ("restore", "source_url=/r", "source_url", "/r"),
    ("restore", "source_url=/r,prefault=on", "prefault", True),
    ("tpm", "socket=/t", "socket", "/t"),
]


@pytest.mark.parametrize(("flag", "text", "attr", "expected"), KEY_CASES)
def test_option_keys(flag: str, text: str, attr: str, expected: Any) -> None:
    assert _get(parse(flag, text), attr) == expected


def test_memory_file_key_accepted_and_ignored() -> None:
    # ref §2.3 MemoryConfig: "The --memory parser also registers the key file. It is accepted
    # and ignored."
    assert MemoryConfig.parse("size=1G,file=/some/file") == MemoryConfig.parse("size=1G")


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_unknown_key_rejected_for_every_option(flag: str) -> None:
    _, kind = OPTIONS[flag]
    base = MINIMAL[flag]
    text = f"{base},bogus=1" if base else "bogus=1"
    shown = "console" if flag == "console" else flag
    expect_parse(flag, text, kind, f"Error parsing --{shown}: unknown option: bogus")


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("disk", "vhost_socket"),  # CLI key is `socket`
        ("disk", "disable_io_uring"),  # CLI key is `_disable_io_uring`
        ("disk", "disable_aio"),
        ("net", "fds"),  # CLI key is `fd`
        ("net", "vhost_socket"),
        ("cpus", "boot_vcpus"),
        ("tpm", "path"),  # the tpm key is `socket` even though the error says "path missing"
        ("memory-zone", "mergeable"),  # ref §5.2 #4 (B)
        ("memory-zone", "reserve"),  # ref §5.2 #7 (B)
        ("memory", "reserve"),  # ref §5.2 #8 (B)
        ("cpus", "core_scheduling"),  # ref §5.2 #1-2
        ("disk", "lock_granularity"),  # ref §5.2 #10
        ("disk", "queue_affinity"),  # ref §5.2 #11
        ("rng", "pci_segment"),  # ref §5.2 #13
        ("balloon", "pci_segment"),  # ref §5.2 #14
        ("balloon", "iommu"),  # ref §5.2 #15
        ("device", "x_exclude_mmap_bars"),  # ref §5.2 #18
        ("device", "fd"),  # ref §5.2 #19-20
        ("platform", "iommufd_fd"),  # ref §5.2 #22
        ("platform", "iommufd"),
        ("numa", "device_id"),  # ref §5.2 #24, #26
        ("restore", "net_fds"),  # ref §5.2 #28
        ("restore", "memory_restore_mode"),  # ref §5.2 #29, #33
        ("restore", "resume"),  # ref §5.2 #30
        ("restore", "vfio_fds"),  # ref §5.2 #31
    ],
)
def test_keys_not_present_at_v37(flag: str, key: str) -> None:
    _, kind = OPTIONS[flag]
    base = MINIMAL[flag]
    text = f"{base},{key}=1" if base else f"{key}=1"
    expect_parse(flag, text, kind, f"Error parsing --{flag}: unknown option: {key}")


# ---------------------------------------------------------------------------
# REQ keys (val §1, §4)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "text", "kind", "message"),
    [
        (
            "memory-zone",
            "size=1G",
            "ParseMemoryZoneIdMissing",
            "Error parsing --memory-zone: id missing",
        ),
        (
            "memory-zone",
            "id=,size=1G",
            "ParseMemoryZoneIdMissing",
            "Error parsing --memory-zone: id missing",
        ),
        ("fs", "socket=/s", "ParseFsTagMissing", "Error parsing --fs: tag missing"),
        ("fs", "tag=t", "ParseFsSockMissing", "Error parsing --fs: socket missing"),
        ("fs", "", "ParseFsTagMissing", "Error parsing --fs: tag missing"),
        (
            "pmem",
            "size=128M",
            "ParsePmemFileMissing",
            "Error parsing --pmem: file missing",
        ),  # val §6
        ("pmem", "file=", "ParsePmemFileMissing", "Error parsing --pmem: file missing"),
        (
            "device",
            "",
            "ParseDevicePathMissing",
            "Error parsing --device: path missing",
        ),  # ref §5.2 #21 (C)
        ("device", "id=x", "ParseDevicePathMissing", "Error parsing --device: path missing"),
        (
            "user-device",
            "id=u",
            "ParseUserDeviceSocketMissing",
            "Error parsing --user-device: socket missing",
        ),
        ("vdpa", "num_queues=2", "ParseVdpaPathMissing", "Error parsing --vdpa: path missing"),
        ("vsock", "cid=3", "ParseVsockSockMissing", "Error parsing --vsock: socket missing"),
        ("vsock", "socket=/s", "ParseVsockCidMissing", "Error parsing --vsock: cid missing"),
        ("vsock", "", "ParseVsockSockMissing", "Error parsing --vsock: socket missing"),
        ("sgx-epc", "size=1G", "ParseSgxEpcIdMissing", "Error parsing --sgx-epc: id missing"),
        (
            "restore",
            "prefault=off",
            "ParseRestoreSourceUrlMissing",
            "Error parsing --restore: source_url missing",
        ),  # ref §5.2 #32
        ("tpm", "", "ParseTpmPathMissing", "Error parsing --tpm: path missing"),
        ("tpm", "socket=", "ParseTpmPathMissing", "Error parsing --tpm: path missing"),
    ],
)
def test_required_keys(flag: str, text: str, kind: str, message: str) -> None:
    expect_parse(flag, text, kind, message)


# ---------------------------------------------------------------------------
# Conversion order: the first failing key in table order is reported (val §1)
# ---------------------------------------------------------------------------

ORDER_CHAINS: dict[str, tuple[str, list[str]]] = {
    "cpus": ("", ["boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity"]),
    "platform": ("", ["num_pci_segments", "iommu_segments"]),
    "memory": (
        "",
        [
            "size",
            "mergeable",
            "hotplug_method",
            "hotplug_size",
            "hotplugged_size",
            "shared",
            "hugepages",
            "hugepage_size",
            "prefault",
            "thp",
        ],
    ),
    "memory-zone": (
        "id=z",
        [
            "size",
            "shared",
            "hugepages",
            "hugepage_size",
            "host_numa_node",
            "hotplug_size",
            "hotplugged_size",
            "prefault",
        ],
    ),
    "rate-limit-group": (
        "",
        [
            "bw_size",
            "bw_one_time_burst",
            "bw_refill_time",
            "ops_size",
            "ops_one_time_burst",
            "ops_refill_time",
        ],
    ),
    "disk": ("", ["readonly", "direct", "iommu", "queue_size", "num_queues", "vhost_user"]),
    "net": (
        "",
        [
            "ip",
            "mask",
            "mac",
            "host_mac",
            "offload_tso",
            "offload_ufo",
            "offload_csum",
            "mtu",
            "iommu",
            "queue_size",
            "num_queues",
            "vhost_user",
            "vhost_mode",
        ],
    ),
    "balloon": ("", ["size", "deflate_on_oom", "free_page_reporting"]),
    "fs": ("tag=t,socket=/s", ["queue_size", "num_queues"]),
    "pmem": ("file=/p", ["size", "iommu", "discard_writes"]),
    "vdpa": ("path=/v", ["num_queues", "iommu"]),
    "sgx-epc": ("id=e", ["size", "prefault"]),
    "numa": ("", ["guest_numa_id", "cpus", "distances"]),
}

ORDER_PAIRS = [
    (flag, base, a, b)
    for flag, (base, keys) in ORDER_CHAINS.items()
    for a, b in itertools.pairwise(keys)
]


@pytest.mark.parametrize(("flag", "base", "first", "second"), ORDER_PAIRS)
def test_conversion_order(flag: str, base: str, first: str, second: str) -> None:
    _, kind = OPTIONS[flag]
    # the later key comes first in the string: table order, not string order, decides
    items = [f"{second}=x!", f"{first}=x!"]
    text = ",".join(([base] if base else []) + items)
    expect_parse(flag, text, kind, f"Error parsing --{flag}: unable to convert x! for {first}")


def test_cpu_features_checked_after_other_conversions() -> None:
    expect(
        lambda: CpusConfig.parse("features=[foo],max_phys_bits=x"),
        "ParseCpus",
        "Error parsing --cpus: unable to convert x for max_phys_bits",
    )


@pytest.mark.parametrize(
    ("flag", "text", "kind", "message"),
    [
        # REQ keys listed first are checked before conversions of later keys
        (
            "memory-zone",
            "size=x",
            "ParseMemoryZoneIdMissing",
            "Error parsing --memory-zone: id missing",
        ),
        ("fs", "queue_size=x,socket=/s", "ParseFsTagMissing", "Error parsing --fs: tag missing"),
        ("device", "iommu=x", "ParseDevicePathMissing", "Error parsing --device: path missing"),
        (
            "user-device",
            "pci_segment=x",
            "ParseUserDeviceSocketMissing",
            "Error parsing --user-device: socket missing",
        ),
        ("vdpa", "num_queues=x", "ParseVdpaPathMissing", "Error parsing --vdpa: path missing"),
        ("vsock", "cid=x", "ParseVsockSockMissing", "Error parsing --vsock: socket missing"),
        (
            "vsock",
            "socket=/s,cid=x",
            "ParseVsock",
            "Error parsing --vsock: unable to convert x for cid",
        ),
        ("sgx-epc", "size=x", "ParseSgxEpcIdMissing", "Error parsing --sgx-epc: id missing"),
        (
            "restore",
            "prefault=x",
            "ParseRestoreSourceUrlMissing",
            "Error parsing --restore: source_url missing",
        ),
        (
            "restore",
            "source_url=/r,prefault=x",
            "ParseRestore",
            "Error parsing --restore: unable to convert x for prefault",
        ),
    ],
)
def test_required_vs_conversion_order(flag: str, text: str, kind: str, message: str) -> None:
    expect_parse(flag, text, kind, message)


# ---------------------------------------------------------------------------
# CPU features (ref §2.3 CpusConfig; val §1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("features=foo", "foo"),
        ("features=[amx,foo]", "foo"),
        ("features=[foo,bar]", "foo"),
        ("features=[]", ""),
        ("features=AMX", "AMX"),
    ],
)
def test_invalid_cpu_features(text: str, name: str) -> None:
    expect(
        lambda: CpusConfig.parse(text),
        "InvalidCpuFeatures",
        f"Invalid feature in --cpus features list: {name}",
    )


# ---------------------------------------------------------------------------
# val §6 examples
# ---------------------------------------------------------------------------


def test_examples_section_6() -> None:
    c = CpusConfig.parse("boot=8,topology=2:2:1:2")
    assert (c.boot_vcpus, c.max_vcpus) == (8, 8)
    assert c.topology == CpuTopology(
        threads_per_core=2, cores_per_die=2, dies_per_package=1, packages=2
    )
    expect(
        lambda: CpusConfig.parse("boot=8,topology=2:2:1"),
        "ParseCpus",
        "Error parsing --cpus: unable to convert 2:2:1 for topology",
    )

    m = MemoryConfig.parse("hugepages=on,size=1G,hugepage_size=2M")
    assert (m.size, m.hugepages, m.hugepage_size) == (G, True, 2097152)

    d = DiskConfig.parse("path=/path/to_file,iommu=on,queue_size=256,num_queues=4")
    assert d == DiskConfig(path="/path/to_file", iommu=True, queue_size=256, num_queues=4)

    n = NetConfig.parse("mac=de:ad:be:ef:12:34,fd=[3,7],num_queues=4")
    assert n.fds == [3, 7]
    assert n.num_queues == 4
    assert n.host_mac is None
    assert (n.ip, n.mask) == ("192.168.249.1", "255.255.255.0")

    expect(
        lambda: ConsoleConfig.parse(""),
        "ParseConsoleInvalidModeGiven",
        "Error parsing --console: invalid console mode given",
    )
    expect(
        lambda: ConsoleConfig.parse("badmode"),
        "ParseConsole",
        "Error parsing --console: unknown option: badmode",
    )
    expect(
        lambda: PmemConfig.parse("size=128M"),
        "ParsePmemFileMissing",
        "Error parsing --pmem: file missing",
    )


# ---------------------------------------------------------------------------
# ref §5.2 rev expectations (class A / A* / C rows)
# ---------------------------------------------------------------------------


def test_rev_memory_zone_defaults() -> None:
    # §5.2 #3 (A*)
    m = MemoryConfig.parse("size=0", zones=["id=mem0,size=1G"])
    assert m.size == 0
    assert m.zones == [MemoryZoneConfig(id="mem0", size=G)]
    z = m.zones[0]
    assert (z.file, z.shared, z.hugepages, z.prefault) == (None, False, False, False)
    assert (z.hugepage_size, z.host_numa_node, z.hotplug_size, z.hotplugged_size) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize("zone", ["id=mem0,size=1G,mergeable=on", "id=mem0,size=1G,mergeable=off"])
def test_rev_zone_mergeable_unknown(zone: str) -> None:
    # §5.2 #4 (B)
    expect(
        lambda: MemoryConfig.parse("size=0", zones=[zone]),
        "ParseMemoryZone",
        "Error parsing --memory-zone: unknown option: mergeable",
    )


def test_rev_zone_mergeable_with_hotplug_unknown() -> None:
    # §5.2 #5 (B)
    expect(
        lambda: MemoryConfig.parse(
            "size=1G,mergeable=off", zones=["id=hotplug,size=0,hotplug_size=4G,mergeable=on"]
        ),
        "ParseMemoryZone",
        "Error parsing --memory-zone: unknown option: mergeable",
    )


def test_rev_top_level_mergeable() -> None:
    # §5.2 #6 (A*)
    m = MemoryConfig.parse("size=0,mergeable=on", zones=["id=mem0,size=1G"])
    assert m.mergeable is True
    assert m.zones == [MemoryZoneConfig(id="mem0", size=G)]


def test_rev_reserve_unknown() -> None:
    # §5.2 #7, #8 (B)
    expect(
        lambda: MemoryConfig.parse("size=0", zones=["id=mem0,size=1G,reserve=on"]),
        "ParseMemoryZone",
        "Error parsing --memory-zone: unknown option: reserve",
    )
    expect(
        lambda: MemoryConfig.parse("size=1G,hugepages=on,reserve=on"),
        "ParseMemory",
        "Error parsing --memory: unknown option: reserve",
    )


@pytest.mark.parametrize("mode", ["vm", "vcpu", "off", "invalid"])
def test_rev_core_scheduling_unknown(mode: str) -> None:
    # §5.2 #1, #2
    expect(
        lambda: CpusConfig.parse(f"boot=1,core_scheduling={mode}"),
        "ParseCpus",
        "Error parsing --cpus: unknown option: core_scheduling",
    )


def test_rev_net_mac_and_mask() -> None:
    # §5.2 #12 (C): ip keeps its default at the revision
    n = NetConfig.parse("mac=de:ad:be:ef:12:34,mask=255.255.255.0")
    assert n == NetConfig(
        mac="de:ad:be:ef:12:34",
        ip="192.168.249.1",
        mask="255.255.255.0",
        host_mac=None,
        tap=None,
        num_queues=2,
        queue_size=256,
        offload_tso=True,
        offload_ufo=True,
        offload_csum=True,
    )


def test_rev_rng_and_balloon() -> None:
    # §5.2 #13-15
    expect(
        lambda: RngConfig.parse("src=/dev/random,iommu=on,pci_segment=1,pci_device_id=7"),
        "ParseRng",
        "Error parsing --rng: unknown option: pci_segment",
    )
    expect(
        lambda: BalloonConfig.parse(
            "size=128M,deflate_on_oom=on,free_page_reporting=on,pci_segment=1,pci_device_id=7"
        ),
        "ParseBalloon",
        "Error parsing --balloon: unknown option: pci_segment",
    )
    assert BalloonConfig.parse(
        "size=128M,deflate_on_oom=on,free_page_reporting=on"
    ) == BalloonConfig(size=134217728, deflate_on_oom=True, free_page_reporting=True)
    expect(
        lambda: BalloonConfig.parse("size=0,iommu=on"),
        "ParseBalloon",
        "Error parsing --balloon: unknown option: iommu",
    )


@pytest.mark.parametrize(
    "text",
    [
        "path=/path/to/device,x_exclude_mmap_bars=[2]",
        "path=/path/to/device,x_exclude_mmap_bars=[0,2,5]",
    ],
)
def test_rev_device_exclude_bars(text: str) -> None:
    # §5.2 #18
    expect(
        lambda: DeviceConfig.parse(text),
        "ParseDevice",
        "Error parsing --device: unknown option: x_exclude_mmap_bars",
    )


@pytest.mark.parametrize("text", ["fd=7", "path=/path/to/device,fd=7", "fd=notanint"])
def test_rev_device_fd(text: str) -> None:
    # §5.2 #19, #20
    expect(
        lambda: DeviceConfig.parse(text),
        "ParseDevice",
        "Error parsing --device: unknown option: fd",
    )


def test_rev_platform_iommufd() -> None:
    # §5.2 #22
    expect(
        lambda: PlatformConfig.parse("iommufd_fd=42"),
        "ParsePlatform",
        "Error parsing --platform: unknown option: iommufd_fd",
    )
    expect(
        lambda: PlatformConfig.parse("iommufd=on,iommufd_fd=42"),
        "ParsePlatform",
        "Error parsing --platform: unknown option: iommufd",
    )


def test_rev_numa() -> None:
    # §5.2 #24 (A error), #25 (A), #26 (B)
    expect(
        lambda: NumaConfig.parse(
            "guest_numa_id=0,cpus=[0,1],distances=[0@25,1@20],device_id=vfio0,memory_zones=[mem1],pci_segments=[0]"
        ),
        "ParseNuma",
        "Error parsing --numa: unknown option: device_id",
    )
    n = NumaConfig.parse(
        "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=[mem0],pci_segments=[0]"
    )
    assert n == NumaConfig(
        guest_numa_id=1,
        cpus=[2, 3],
        distances=[NumaDistance(destination=0, distance=20)],
        memory_zones=["mem0"],
        sgx_epc_sections=None,
        pci_segments=[0],
    )
    expect(
        lambda: NumaConfig.parse(
            "guest_numa_id=2,device_id=vfio1,distances=[0@30],pci_segments=[1]"
        ),
        "ParseNuma",
        "Error parsing --numa: unknown option: device_id",
    )


@pytest.mark.parametrize(
    ("suffix", "key"),
    [
        ("prefault=off,net_fds=[net0@[3,4],net1@[5,6,7,8]]", "net_fds"),
        ("memory_restore_mode=ondemand", "memory_restore_mode"),
        ("memory_restore_mode=bogus", "memory_restore_mode"),
        ("resume=on,zone_updates=[zone1@1]", "resume"),
        ("resume=on,zone_updates=[@1]", "resume"),
        ("resume=on,zone_updates=[id1 1]", "resume"),
        ("vfio_fds=[vfio0@5,vfio1@6],iommufd_fd=7", "vfio_fds"),
    ],
)
def test_rev_restore_unknown(suffix: str, key: str) -> None:
    # §5.2 #28-31, #33
    expect(
        lambda: RestoreConfig.parse(f"source_url=/path/to/snapshot,{suffix}"),
        "ParseRestore",
        f"Error parsing --restore: unknown option: {key}",
    )


# ---------------------------------------------------------------------------
# Rate limiter buckets (ref §2.3, val §1)
# ---------------------------------------------------------------------------


def bucket(size: int, refill: int, burst: int = 0) -> TokenBucketConfig:
    return TokenBucketConfig(size=size, one_time_burst=burst, refill_time=refill)


@pytest.mark.parametrize(
    ("text", "bandwidth", "ops"),
    [
        ("bw_size=1000,bw_refill_time=100", bucket(1000, 100), None),
        ("bw_size=1000,bw_refill_time=100,bw_one_time_burst=5", bucket(1000, 100, 5), None),
        ("ops_size=10,ops_refill_time=1", None, bucket(10, 1)),
        ("ops_size=10,ops_refill_time=1,ops_one_time_burst=7", None, bucket(10, 1, 7)),
        ("bw_size=1,bw_refill_time=2,ops_size=3,ops_refill_time=4", bucket(1, 2), bucket(3, 4)),
        ("bw_size=1000", None, None),
        ("bw_refill_time=100", None, None),
        ("bw_size=0,bw_refill_time=100", None, None),
        ("bw_size=1000,bw_refill_time=0,bw_one_time_burst=9", None, None),
        ("ops_one_time_burst=7", None, None),
    ],
)
def test_rate_limiter_buckets(
    text: str, bandwidth: TokenBucketConfig | None, ops: TokenBucketConfig | None
) -> None:
    group = RateLimiterGroupConfig.parse(f"id=g,{text}")
    assert group.rate_limiter_config == RateLimiterConfig(bandwidth=bandwidth, ops=ops)
    expected = (
        None
        if bandwidth is None and ops is None
        else RateLimiterConfig(bandwidth=bandwidth, ops=ops)
    )
    assert DiskConfig.parse(f"path=/d,{text}").rate_limiter_config == expected
    assert NetConfig.parse(text).rate_limiter_config == expected


def test_bucket_one_time_burst_is_a_number() -> None:
    b = some(some(DiskConfig.parse("bw_size=1,bw_refill_time=1").rate_limiter_config).bandwidth)
    assert b.one_time_burst == 0
    assert b.to_dict() == {"size": 1, "one_time_burst": 0, "refill_time": 1}


@pytest.mark.parametrize(
    "key",
    [
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
    ],
)
def test_bucket_keys_are_u64(key: str) -> None:
    assert DiskConfig.parse(f"{key}=18446744073709551615") is not None
    expect(
        lambda: DiskConfig.parse(f"{key}=-1"),
        "ParseDisk",
        f"Error parsing --disk: unable to convert -1 for {key}",
    )
    expect(
        lambda: RateLimiterGroupConfig.parse(f"{key}=1K"),
        "ParseRateLimiterGroup",
        f"Error parsing --rate-limit-group: unable to convert 1K for {key}",
    )


# ---------------------------------------------------------------------------
# Net random MAC (ref §2.1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "mac=", "tap=tap0"])
def test_net_random_mac(text: str) -> None:
    a = NetConfig.parse(text).mac
    b = NetConfig.parse(text).mac
    for mac in (a, b):
        assert MAC_RE.match(mac)
        assert mac.startswith("2e:")
    assert a != b


def test_net_random_mac_via_cli() -> None:
    a = some(cli("--net", "tap=tap0").net)[0].mac
    b = some(cli("--net", "tap=tap0").net)[0].mac
    assert a.startswith("2e:") and b.startswith("2e:")
    assert a != b


# ---------------------------------------------------------------------------
# Console / serial precedence and errors (ref §2.3 ConsoleConfig)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "file", "socket"),
    [
        ("file=/x,tty", "Tty", None, None),
        ("tty,file=/x", "Tty", None, None),
        ("off,pty,tty,null", "Off", None, None),
        ("null,tty,pty", "Pty", None, None),
        ("null,tty", "Tty", None, None),
        ("file=/f,null", "Null", None, None),
        ("socket=/s,file=/f", "File", "/f", None),
        ("socket=/s,null", "Null", None, None),
        ("socket=/s", "Socket", None, "/s"),
        ("file=/f", "File", "/f", None),
        ("tty,file=", "Tty", None, None),  # file= is never looked at
        ("off,socket=", "Off", None, None),
        ("socket=,file=/f", "File", "/f", None),
    ],
)
def test_console_precedence(text: str, mode: str, file: str | None, socket: str | None) -> None:
    c = ConsoleConfig.parse(text)
    assert (c.mode, c.file, c.socket, c.iommu) == (mode, file, socket, False)


def test_console_errors() -> None:
    expect(
        lambda: ConsoleConfig.parse("iommu=on"),
        "ParseConsoleInvalidModeGiven",
        "Error parsing --console: invalid console mode given",
    )
    expect(
        lambda: ConsoleConfig.parse("tty,iommu=x"),
        "ParseConsole",
        "Error parsing --console: unable to convert x for iommu",
    )
    expect(
        lambda: ConsoleConfig.parse("file="),
        "ConsoleFileMissing",
        "Path missing when using file console mode",
        ValidationError,
    )
    expect(
        lambda: ConsoleConfig.parse("socket="),
        "ConsoleSocketPathMissing",
        "Path missing when using socket console mode",
        ValidationError,
    )
    expect(
        lambda: ConsoleConfig.parse("iommu=on,file="),
        "ConsoleFileMissing",
        "Path missing when using file console mode",
        ValidationError,
    )


def test_serial_errors_say_console() -> None:
    expect(
        lambda: cli("--serial", "badmode"),
        "ParseConsole",
        "Error parsing --console: unknown option: badmode",
    )
    expect(
        lambda: cli("--serial", ""),
        "ParseConsoleInvalidModeGiven",
        "Error parsing --console: invalid console mode given",
    )
    expect(
        lambda: cli("--serial", "file="),
        "ConsoleFileMissing",
        "Path missing when using file console mode",
        ValidationError,
    )


def test_serial_and_console_defaults_and_overrides() -> None:
    c = cli()
    assert (c.serial.mode, c.console.mode) == ("Null", "Tty")
    c = cli("--serial", "tty", "--console", "off")
    assert (c.serial.mode, c.console.mode) == ("Tty", "Off")
    c = cli("--serial", "socket=/tmp/s", "--console", "file=/tmp/c,iommu=on")
    assert (c.serial.mode, c.serial.socket) == ("Socket", "/tmp/s")
    assert (c.console.mode, c.console.file, c.console.iommu) == ("File", "/tmp/c", True)


# ---------------------------------------------------------------------------
# CLI defaults and user strings replacing defaults (ref §3.1)
# ---------------------------------------------------------------------------


def test_cli_defaults() -> None:
    c = cli()
    assert (c.cpus.boot_vcpus, c.cpus.max_vcpus, c.cpus.max_phys_bits) == (1, 1, 46)
    assert c.memory.size == M512
    assert c.rng.src == "/dev/urandom"
    assert some(c.payload).kernel == KERNEL


def test_cli_user_string_replaces_default() -> None:
    c = cli("--cpus", "max_phys_bits=40")
    assert (c.cpus.boot_vcpus, c.cpus.max_vcpus, c.cpus.max_phys_bits) == (1, 1, 40)
    c = cli("--memory", "mergeable=on")
    assert (c.memory.size, c.memory.mergeable) == (M512, True)
    c = cli("--rng", "iommu=on")
    assert (c.rng.src, c.rng.iommu) == ("/dev/urandom", True)


def test_cli_payload() -> None:
    argv = ["--kernel", "/k", "--initramfs", "/i", "--cmdline", "a=b c"]
    p = some(VmConfig.from_cli(argv).payload)
    assert (p.kernel, p.initramfs, p.cmdline, p.firmware) == ("/k", "/i", "a=b c", None)
    p = some(VmConfig.from_cli(["--firmware", "/fw"]).payload)
    assert (p.firmware, p.kernel) == ("/fw", None)


def test_cli_payload_needs_kernel_or_firmware() -> None:
    # val §1 "Payload": initramfs and cmdline alone produce none -> rule 1 KernelMissing
    expect(
        lambda: VmConfig.from_cli(["--initramfs", "/i", "--cmdline", "x"]),
        "KernelMissing",
        "No kernel specified",
        ValidationError,
    )


def test_cli_memory_zones() -> None:
    c = cli("--memory", "size=0", "--memory-zone", "id=z0,size=1G", "id=z1,size=2G")
    assert c.memory.zones == [
        MemoryZoneConfig(id="z0", size=G),
        MemoryZoneConfig(id="z1", size=2 * G),
    ]


def test_cli_multiple_values() -> None:
    c = cli("--disk", "path=/a", "path=/b", "--pmem", "file=/p1", "file=/p2,size=1G")
    assert [d.path for d in some(c.disks)] == ["/a", "/b"]
    assert [(p.file, p.size) for p in some(c.pmem)] == [("/p1", None), ("/p2", G)]


def test_cli_flags() -> None:
    c = cli("--pvpanic", "--watchdog")
    assert (c.pvpanic, c.watchdog) == (True, True)
    c = cli()
    assert (c.pvpanic, c.watchdog) == (False, False)


# ---------------------------------------------------------------------------
# Parse order of a whole VM config (val §2, ref §3.3)
# ---------------------------------------------------------------------------

# (flag args, expected message) in parse order; each has an error.
ORDERED_FAILURES: list[tuple[list[str], str, str]] = [
    (
        ["--rate-limit-group", "a1=1"],
        "ParseRateLimiterGroup",
        "Error parsing --rate-limit-group: unknown option: a1",
    ),
    (["--disk", "a2=1"], "ParseDisk", "Error parsing --disk: unknown option: a2"),
    (["--net", "a3=1"], "ParseNetwork", "Error parsing --net: unknown option: a3"),
    (["--rng", "a4=1"], "ParseRng", "Error parsing --rng: unknown option: a4"),
    (["--balloon", "a5=1"], "ParseBalloon", "Error parsing --balloon: unknown option: a5"),
    (["--fs", "a6=1"], "ParseFileSystem", "Error parsing --fs: unknown option: a6"),
    (["--pmem", "a7=1"], "ParsePersistentMemory", "Error parsing --pmem: unknown option: a7"),
    (["--console", "a8=1"], "ParseConsole", "Error parsing --console: unknown option: a8"),
    (["--serial", "a9=1"], "ParseConsole", "Error parsing --console: unknown option: a9"),
    (["--device", "b1=1"], "ParseDevice", "Error parsing --device: unknown option: b1"),
    (
        ["--user-device", "b2=1"],
        "ParseUserDevice",
        "Error parsing --user-device: unknown option: b2",
    ),
    (["--vdpa", "b3=1"], "ParseVdpa", "Error parsing --vdpa: unknown option: b3"),
    (["--vsock", "b4=1"], "ParseVsock", "Error parsing --vsock: unknown option: b4"),
    (["--platform", "b5=1"], "ParsePlatform", "Error parsing --platform: unknown option: b5"),
    (["--sgx-epc", "b6=1"], "ParseSgxEpc", "Error parsing --sgx-epc: unknown option: b6"),
    (["--numa", "b7=1"], "ParseNuma", "Error parsing --numa: unknown option: b7"),
    (["--tpm", "b8=1"], "ParseTpm", "Error parsing --tpm: unknown option: b8"),
    (["--cpus", "b9=1"], "ParseCpus", "Error parsing --cpus: unknown option: b9"),
    (["--memory", "c1=1"], "ParseMemory", "Error parsing --memory: unknown option: c1"),
    (
        ["--memory-zone", "c2=1"],
        "ParseMemoryZone",
        "Error parsing --memory-zone: unknown option: c2",
    ),
]


@pytest.mark.parametrize("index", range(len(ORDERED_FAILURES) - 1))
def test_parse_order(index: int) -> None:
    first_args, kind, message = ORDERED_FAILURES[index]
    later_args = ORDERED_FAILURES[index + 1][0]
    # the later option is written first on the command line: the parse order decides
    expect(lambda: cli(*later_args, *first_args), kind, message)


def test_memory_errors_come_before_zone_errors() -> None:
    expect(
        lambda: MemoryConfig.parse("size=x", zones=["size=1G"]),
        "ParseMemory",
        "Error parsing --memory: unable to convert x for size",
    )
    expect(
        lambda: MemoryConfig.parse("size=0", zones=["id=a,size=1G", "id=b,size=x", "size=1G"]),
        "ParseMemoryZone",
        "Error parsing --memory-zone: unable to convert x for size",
    )


def test_parse_errors_come_before_validation() -> None:
    expect(
        lambda: cli("--cpus", "boot=2,max=1", "--memory", "size=x"),
        "ParseMemory",
        "Error parsing --memory: unable to convert x for size",
    )


def test_console_validation_error_is_reported_before_serial_parse_error() -> None:
    # console is parsed before serial; `file=` fails at parse time with a ValidationError (val §1)
    expect(
        lambda: cli("--serial", "bogus", "--console", "file="),
        "ConsoleFileMissing",
        "Path missing when using file console mode",
        ValidationError,
    )


def test_cli_parse_errors_are_parse_errors() -> None:
    with pytest.raises(ParseError):
        cli("--cpus", "boot=x")
