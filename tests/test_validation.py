"""VM config validation rules of ch-validation §3, in order, with the texts of §4."""

from __future__ import annotations

from typing import Any

import pytest
from _helpers import KERNEL, cli, expect
from vmkit import ConfigError, ParseError, ValidationError
from vmkit.config import VmConfig

SHARED = ["--memory", "shared=on"]
SEG2 = ["--platform", "num_pci_segments=2"]
IOMMU_SEG1 = ["--platform", "num_pci_segments=2,iommu_segments=[1]"]
BUCKET = "bw_size=1,bw_refill_time=1"


def fails(args: list[str], kind: str, text: str) -> None:
    """The CLI path validates (ref §2.2): from_cli must raise the ValidationError."""
    err = expect(lambda: cli(*args), kind, text, ValidationError)
    assert not isinstance(err, ParseError)


def passes(args: list[str]) -> VmConfig:
    cfg = cli(*args)
    assert isinstance(cfg.validate(), set)
    return cfg


def json_vm(extra: dict[str, Any]) -> VmConfig:
    body: dict[str, Any] = {"payload": {"kernel": KERNEL}}
    body.update(extra)
    return VmConfig.from_dict(body)


def json_fails(extra: dict[str, Any], kind: str, text: str) -> None:
    cfg = json_vm(extra)  # JSON creation does not validate (ref §2.2)
    expect(cfg.validate, kind, text, ValidationError)


# ---------------------------------------------------------------------------
# Rule 1: payload
# ---------------------------------------------------------------------------


def test_rule1_kernel_missing() -> None:
    expect(VmConfig.from_dict({}).validate, "KernelMissing", "No kernel specified", ValidationError)
    expect(lambda: VmConfig.from_cli([]), "KernelMissing", "No kernel specified", ValidationError)


def test_rule1_kernel_or_firmware_passes() -> None:
    assert json_vm({}).validate() == set()
    VmConfig.from_dict({"payload": {"firmware": "/fw"}}).validate()
    VmConfig.from_cli(["--firmware", "/fw"])


def test_validation_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        VmConfig.from_dict({}).validate()


# ---------------------------------------------------------------------------
# Rules 2-3: console / serial
# ---------------------------------------------------------------------------


def test_rule2_tty_console_and_serial_allowed() -> None:
    cfg = passes(["--serial", "tty", "--console", "tty"])
    assert (cfg.serial.mode, cfg.console.mode) == ("Tty", "Tty")


@pytest.mark.parametrize("which", ["console", "serial"])
def test_rule3_file_mode_without_file(which: str) -> None:
    json_fails(
        {which: {"mode": "File"}}, "ConsoleFileMissing", "Path missing when using file console mode"
    )
    json_vm({which: {"mode": "File", "file": "/tmp/out"}}).validate()


# ---------------------------------------------------------------------------
# Rule 4: max < boot
# ---------------------------------------------------------------------------


def test_rule4_max_lower_than_boot() -> None:
    fails(["--cpus", "boot=2,max=1"], "CpusMaxLowerThanBoot", "Max CPUs lower than boot CPUs")
    json_fails(
        {"cpus": {"boot_vcpus": 4, "max_vcpus": 3}},
        "CpusMaxLowerThanBoot",
        "Max CPUs lower than boot CPUs",
    )
    passes(["--cpus", "boot=2,max=2"])
    passes(["--cpus", "boot=2,max=8"])


def test_rule3_before_rule4() -> None:
    json_fails(
        {"console": {"mode": "File"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 1}},
        "ConsoleFileMissing",
        "Path missing when using file console mode",
    )


# ---------------------------------------------------------------------------
# Rule 5: rate-limit groups
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "kind", "text"),
    [
        ("id=g0", "InvalidRateLimiterGroup", "Invalid rate-limiter group"),  # no bucket
        (
            "id=g0,bw_size=1",
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),  # still no bucket
        (BUCKET, "InvalidRateLimiterGroup", "Invalid rate-limiter group"),  # empty id
        (f"id=__g,{BUCKET}", "InvalidIdentifier", "Identifier __g is invalid"),
    ],
)
def test_rule5_rate_limit_group(group: str, kind: str, text: str) -> None:
    fails(["--rate-limit-group", group], kind, text)


def test_rule5_duplicate_group_ids() -> None:
    fails(
        ["--rate-limit-group", f"id=g0,{BUCKET}", "id=g0,ops_size=1,ops_refill_time=1"],
        "IdentifierNotUnique",
        "Identifier g0 is not unique",
    )


def test_rule5_passes() -> None:
    assert passes(
        ["--rate-limit-group", f"id=g0,{BUCKET}", "id=g1,ops_size=1,ops_refill_time=1"]
    ).validate() == {"g0", "g1"}


def test_rule4_before_rule5() -> None:
    fails(
        ["--cpus", "boot=2,max=1", "--rate-limit-group", "id=g0"],
        "CpusMaxLowerThanBoot",
        "Max CPUs lower than boot CPUs",
    )


# ---------------------------------------------------------------------------
# Rule 6: disks
# ---------------------------------------------------------------------------

VHOST_SHM = "Using vhost-user requires using shared memory or huge pages"


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            ["--disk", "path=/d,socket=/s"],
            "DiskSocketAndPath",
            "Disk path and vhost socket both provided",
        ),
        (["--disk", "vhost_user=on,socket=/s"], "VhostUserRequiresSharedMemory", VHOST_SHM),
        (
            [*SHARED, "--disk", "vhost_user=on"],
            "VhostUserMissingSocket",
            "No socket provided when using vhost-user",
        ),
        (
            ["--disk", "path=/d,rate_limit_group=g0"],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
        (
            ["--rate-limit-group", f"id=g1,{BUCKET}", "--disk", "path=/d,rate_limit_group=g0"],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
        (
            ["--disk", "path=/d,num_queues=2"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        (
            [*SHARED, "--disk", "vhost_user=on,socket=/s,iommu=on"],
            "IommuNotSupported",
            "Device does not support being placed behind IOMMU",
        ),
        (
            [*SEG2, "--disk", "path=/d,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*IOMMU_SEG1, "--disk", "path=/d,pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (
            [
                "--rate-limit-group",
                f"id=g0,{BUCKET}",
                "--disk",
                f"path=/d,rate_limit_group=g0,{BUCKET}",
            ],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
        (["--disk", "path=/d,id=__d"], "InvalidIdentifier", "Identifier __d is invalid"),
        (
            ["--disk", "path=/a,id=d", "path=/b,id=d"],
            "IdentifierNotUnique",
            "Identifier d is not unique",
        ),
        (
            ["--rate-limit-group", f"id=x,{BUCKET}", "--disk", "path=/a,id=x"],
            "IdentifierNotUnique",
            "Identifier x is not unique",
        ),
        # memory size 0: every zone must be shared or use huge pages
        (
            [
                "--memory",
                "size=0",
                "--memory-zone",
                "id=z0,size=1G",
                "--disk",
                "vhost_user=on,socket=/s",
            ],
            "VhostUserRequiresSharedMemory",
            VHOST_SHM,
        ),
        (
            [
                "--memory",
                "size=0",
                "--memory-zone",
                "id=z0,size=1G,shared=on",
                "id=z1,size=1G",
                "--disk",
                "vhost_user=on,socket=/s",
            ],
            "VhostUserRequiresSharedMemory",
            VHOST_SHM,
        ),
    ],
)
def test_rule6_disk_failures(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


@pytest.mark.parametrize(
    "args",
    [
        [*SHARED, "--disk", "vhost_user=on,socket=/s"],
        ["--memory", "hugepages=on", "--disk", "vhost_user=on,socket=/s"],
        [
            "--memory",
            "size=0",
            "--memory-zone",
            "id=z0,size=1G,shared=on",
            "id=z1,size=1G,hugepages=on",
            "--disk",
            "vhost_user=on,socket=/s",
        ],
        ["--rate-limit-group", f"id=g0,{BUCKET}", "--disk", "path=/d,rate_limit_group=g0"],
        ["--cpus", "boot=2", "--disk", "path=/d,num_queues=2"],
        [*SEG2, "--disk", "path=/d,pci_segment=1"],
        [*IOMMU_SEG1, "--disk", "path=/d,pci_segment=1,iommu=on"],
        ["--disk", "path=/d,pci_segment=5"],  # segment checks only when a platform config exists
        ["--disk", f"path=/d,{BUCKET}"],
        ["--disk", "path=/a,id=a", "path=/b,id=b"],
    ],
)
def test_rule6_disk_passes(args: list[str]) -> None:
    passes(args)


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        # socket+path before shared memory
        (
            ["--disk", "path=/d,socket=/s,vhost_user=on"],
            "DiskSocketAndPath",
            "Disk path and vhost socket both provided",
        ),
        # shared memory before missing socket
        (["--disk", "vhost_user=on"], "VhostUserRequiresSharedMemory", VHOST_SHM),
        # unknown group before too many queues
        (
            ["--disk", "path=/d,rate_limit_group=g0,num_queues=2"],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
        # too many queues before iommu unsupported
        (
            [*SHARED, "--disk", "vhost_user=on,socket=/s,iommu=on,num_queues=2"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        # iommu unsupported before segment checks
        (
            [*SHARED, *SEG2, "--disk", "vhost_user=on,socket=/s,iommu=on,pci_segment=2"],
            "IommuNotSupported",
            "Device does not support being placed behind IOMMU",
        ),
        # segment checks before "group and own limiter"
        (
            [
                *SEG2,
                "--rate-limit-group",
                f"id=g0,{BUCKET}",
                "--disk",
                f"path=/d,pci_segment=2,rate_limit_group=g0,{BUCKET}",
            ],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        # group and own limiter before identifier rule
        (
            [
                "--rate-limit-group",
                f"id=g0,{BUCKET}",
                "--disk",
                f"path=/d,id=__d,rate_limit_group=g0,{BUCKET}",
            ],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
        # too many queues before identifier rule
        (
            ["--disk", "path=/d,num_queues=2,id=__d"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        # rule 5 before rule 6
        (
            ["--rate-limit-group", "id=g0", "--disk", "path=/d,socket=/s"],
            "InvalidRateLimiterGroup",
            "Invalid rate-limiter group",
        ),
    ],
)
def test_rule6_order(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule6_second_disk_checked() -> None:
    fails(
        ["--disk", "path=/a", "path=/b,num_queues=2"],
        "TooManyQueues",
        "Number of vCPUs is insufficient for number of queues",
    )


# ---------------------------------------------------------------------------
# Rule 7: net
# ---------------------------------------------------------------------------

CSUM = '"offload_tso" and "offload_ufo" depend on "offload_csum"'


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (["--net", "vhost_user=on,socket=/s"], "VhostUserRequiresSharedMemory", VHOST_SHM),
        (
            ["--net", "num_queues=1"],
            "VnetQueueLowerThan2",
            "Number of queues to virtio_net less than 2",
        ),
        (
            ["--net", "num_queues=0"],
            "VnetQueueLowerThan2",
            "Number of queues to virtio_net less than 2",
        ),
        (
            ["--cpus", "boot=2", "--net", "fd=[3],num_queues=4"],
            "VnetQueueFdMismatch",
            "Number of queues to virtio_net does not match the number of input FDs",
        ),
        (
            ["--net", "fd=[3,4]"],
            "VnetQueueFdMismatch",
            "Number of queues to virtio_net does not match the number of input FDs",
        ),
        (["--net", "fd=[2]"], "VnetReservedFd", "Reserved fd number (<= 2)"),
        (["--net", "fd=[0]"], "VnetReservedFd", "Reserved fd number (<= 2)"),
        (
            ["--cpus", "boot=2", "--net", "fd=[5,1],num_queues=4"],
            "VnetReservedFd",
            "Reserved fd number (<= 2)",
        ),
        (
            ["--net", "num_queues=4"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        (
            [*SHARED, "--net", "vhost_user=on,socket=/s,iommu=on"],
            "IommuNotSupported",
            "Device does not support being placed behind IOMMU",
        ),
        ([*SEG2, "--net", "pci_segment=2"], "InvalidPciSegment", "Invalid PCI segment id: 2"),
        (
            [*IOMMU_SEG1, "--net", "pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (
            ["--net", "mtu=1279"],
            "InvalidMtu",
            "Provided MTU 1279 is lower than 1280 (expected by VIRTIO specification)",
        ),
        (
            ["--net", "mtu=0"],
            "InvalidMtu",
            "Provided MTU 0 is lower than 1280 (expected by VIRTIO specification)",
        ),
        (["--net", "offload_csum=off"], "NoHardwareChecksumOffload", CSUM),
        (["--net", "offload_csum=off,offload_tso=off"], "NoHardwareChecksumOffload", CSUM),
        (["--net", "offload_csum=off,offload_ufo=off"], "NoHardwareChecksumOffload", CSUM),
        (["--net", "id=__n"], "InvalidIdentifier", "Identifier __n is invalid"),
        (["--net", "id=n", "id=n"], "IdentifierNotUnique", "Identifier n is not unique"),
        (
            ["--disk", "path=/d,id=x", "--net", "id=x"],
            "IdentifierNotUnique",
            "Identifier x is not unique",
        ),
    ],
)
def test_rule7_net_failures(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


@pytest.mark.parametrize(
    "args",
    [
        [*SHARED, "--net", "vhost_user=on,socket=/s"],
        ["--net", "num_queues=2"],
        ["--cpus", "boot=2", "--net", "fd=[3,4],num_queues=4"],
        ["--net", "fd=[3]"],
        ["--cpus", "boot=2", "--net", "num_queues=4"],
        [*IOMMU_SEG1, "--net", "pci_segment=1,iommu=on"],
        ["--net", "mtu=1280"],
        ["--net", "offload_csum=off,offload_tso=off,offload_ufo=off"],
        ["--net", "offload_tso=off,offload_ufo=off"],
        ["--net", "id=a", "id=b"],
    ],
)
def test_rule7_net_passes(args: list[str]) -> None:
    passes(args)


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            ["--net", "num_queues=1,vhost_user=on,socket=/s"],
            "VhostUserRequiresSharedMemory",
            VHOST_SHM,
        ),
        (
            ["--net", "num_queues=1,fd=[3]"],
            "VnetQueueLowerThan2",
            "Number of queues to virtio_net less than 2",
        ),
        (
            ["--net", "fd=[1],num_queues=4"],
            "VnetQueueFdMismatch",
            "Number of queues to virtio_net does not match the number of input FDs",
        ),
        (["--net", "fd=[1,2],num_queues=4"], "VnetReservedFd", "Reserved fd number (<= 2)"),
        (
            [*SHARED, "--net", "vhost_user=on,socket=/s,iommu=on,num_queues=4"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        (
            [*SEG2, "--net", "pci_segment=2,mtu=1000"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            ["--net", "mtu=1000,offload_csum=off"],
            "InvalidMtu",
            "Provided MTU 1000 is lower than 1280 (expected by VIRTIO specification)",
        ),
        (["--net", "offload_csum=off,id=__n"], "NoHardwareChecksumOffload", CSUM),
        # rule 6 before rule 7
        (
            ["--disk", "path=/d,num_queues=2", "--net", "num_queues=1"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
    ],
)
def test_rule7_order(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


# ---------------------------------------------------------------------------
# Rule 8: fs
# ---------------------------------------------------------------------------

FS = "tag=t,socket=/s"


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (["--fs", FS], "VhostUserRequiresSharedMemory", VHOST_SHM),
        (
            [*SHARED, "--fs", f"{FS},num_queues=2"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        (
            [*SHARED, *IOMMU_SEG1, "--fs", f"{FS},pci_segment=1"],
            "IommuNotSupportedOnSegment",
            "Device is on an IOMMU PCI segment (1) but does not support being placed behind IOMMU",
        ),
        (
            [*SHARED, *SEG2, "--fs", f"{FS},pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        ([*SHARED, "--fs", f"{FS},id=__f"], "InvalidIdentifier", "Identifier __f is invalid"),
        (
            [*SHARED, "--fs", f"{FS},id=f", "tag=u,socket=/u,id=f"],
            "IdentifierNotUnique",
            "Identifier f is not unique",
        ),
        # order: shared memory for all fs before the per-fs checks
        (["--fs", f"{FS},num_queues=2"], "VhostUserRequiresSharedMemory", VHOST_SHM),
        # order: too many queues before segment checks
        (
            [*SHARED, *SEG2, "--fs", f"{FS},num_queues=2,pci_segment=2"],
            "TooManyQueues",
            "Number of vCPUs is insufficient for number of queues",
        ),
        # rule 7 before rule 8
        (
            ["--net", "mtu=1000", "--fs", FS],
            "InvalidMtu",
            "Provided MTU 1000 is lower than 1280 (expected by VIRTIO specification)",
        ),
    ],
)
def test_rule8_fs_failures(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


@pytest.mark.parametrize(
    "args",
    [
        [*SHARED, "--fs", FS],
        ["--memory", "hugepages=on", "--fs", FS],
        ["--cpus", "boot=2", *SHARED, "--fs", f"{FS},num_queues=2"],
        [*SHARED, *IOMMU_SEG1, "--fs", f"{FS},pci_segment=0"],
    ],
)
def test_rule8_fs_passes(args: list[str]) -> None:
    passes(args)


# ---------------------------------------------------------------------------
# Rule 9: pmem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            [*SEG2, "--pmem", "file=/p,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*IOMMU_SEG1, "--pmem", "file=/p,pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (["--pmem", "file=/p,id=__p"], "InvalidIdentifier", "Identifier __p is invalid"),
        (
            ["--pmem", "file=/a,id=p", "file=/b,id=p"],
            "IdentifierNotUnique",
            "Identifier p is not unique",
        ),
        (
            [*SEG2, "--pmem", "file=/p,pci_segment=2,id=__p"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
    ],
)
def test_rule9_pmem(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule9_pmem_passes() -> None:
    passes([*IOMMU_SEG1, "--pmem", "file=/p,pci_segment=1,iommu=on"])


# ---------------------------------------------------------------------------
# Rule 10: topology
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "kind", "text"),
    [
        (
            "boot=2,topology=0:1:1:2",
            "CpuTopologyZeroPart",
            "No part of the CPU topology can be zero",
        ),
        (
            "boot=1,topology=1:1:1:0",
            "CpuTopologyZeroPart",
            "No part of the CPU topology can be zero",
        ),
        (
            "boot=8,topology=2:2:1:1",
            "CpuTopologyCount",
            "Product of CPU topology parts does not match maximum vCPUs",
        ),
        (
            "boot=2,max=4,topology=1:1:1:2",
            "CpuTopologyCount",
            "Product of CPU topology parts does not match maximum vCPUs",
        ),
        (
            "boot=2,max=1,topology=1:1:1:1",
            "CpusMaxLowerThanBoot",
            "Max CPUs lower than boot CPUs",
        ),  # rule 4 first
    ],
)
def test_rule10_topology(cpus: str, kind: str, text: str) -> None:
    fails(["--cpus", cpus], kind, text)


@pytest.mark.parametrize(
    "cpus", ["boot=8,topology=2:2:1:2", "boot=4,max=8,topology=2:2:1:2", "boot=1,topology=1:1:1:1"]
)
def test_rule10_topology_passes(cpus: str) -> None:
    passes(["--cpus", cpus])


def test_rule9_before_rule10() -> None:
    fails(
        ["--cpus", "boot=1,topology=1:1:1:2", *SEG2, "--pmem", "file=/p,pci_segment=2"],
        "InvalidPciSegment",
        "Invalid PCI segment id: 2",
    )


# ---------------------------------------------------------------------------
# Rule 11: huge page size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "kind", "text"),
    [
        (
            "hugepage_size=2M",
            "HugePageSizeWithoutHugePages",
            "Huge page size specified but huge pages not enabled",
        ),
        (
            "hugepage_size=3M",
            "HugePageSizeWithoutHugePages",
            "Huge page size specified but huge pages not enabled",
        ),
        (
            "hugepages=on,hugepage_size=3M",
            "InvalidHugePageSize",
            "Huge page size is not power of 2: 3145728",
        ),
        (
            "hugepages=on,hugepage_size=1536K",
            "InvalidHugePageSize",
            "Huge page size is not power of 2: 1572864",
        ),
    ],
)
def test_rule11_hugepages(memory: str, kind: str, text: str) -> None:
    fails(["--memory", memory], kind, text)


@pytest.mark.parametrize(
    "memory", ["hugepages=on,hugepage_size=2M", "hugepages=on,hugepage_size=1G", "hugepages=on"]
)
def test_rule11_hugepages_passes(memory: str) -> None:
    passes(["--memory", memory])


def test_rule10_before_rule11() -> None:
    fails(
        ["--cpus", "boot=2,topology=1:1:1:1", "--memory", "hugepage_size=2M"],
        "CpuTopologyCount",
        "Product of CPU topology parts does not match maximum vCPUs",
    )


# ---------------------------------------------------------------------------
# Rule 12: user devices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            ["--user-device", "socket=/u"],
            "UserDevicesRequireSharedMemory",
            "Using user devices requires using shared memory or huge pages",
        ),
        (
            [*SHARED, *IOMMU_SEG1, "--user-device", "socket=/u,pci_segment=1"],
            "IommuNotSupportedOnSegment",
            "Device is on an IOMMU PCI segment (1) but does not support being placed behind IOMMU",
        ),
        (
            [*SHARED, *SEG2, "--user-device", "socket=/u,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*SHARED, "--user-device", "socket=/u,id=__u"],
            "InvalidIdentifier",
            "Identifier __u is invalid",
        ),
        (
            [*SHARED, "--disk", "path=/d,id=u", "--user-device", "socket=/u,id=u"],
            "IdentifierNotUnique",
            "Identifier u is not unique",
        ),
        # rule 11 before rule 12
        (
            ["--memory", "hugepage_size=2M", "--user-device", "socket=/u"],
            "HugePageSizeWithoutHugePages",
            "Huge page size specified but huge pages not enabled",
        ),
    ],
)
def test_rule12_user_devices(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule12_user_devices_pass() -> None:
    passes([*SHARED, "--user-device", "socket=/u", "socket=/v,id=v"])
    passes(["--memory", "hugepages=on", "--user-device", "socket=/u"])


# ---------------------------------------------------------------------------
# Rule 13: vdpa
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            [*SEG2, "--vdpa", "path=/v,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*IOMMU_SEG1, "--vdpa", "path=/v,pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (["--vdpa", "path=/v,id=__v"], "InvalidIdentifier", "Identifier __v is invalid"),
        (
            ["--vdpa", "path=/v,id=v", "path=/w,id=v"],
            "IdentifierNotUnique",
            "Identifier v is not unique",
        ),
    ],
)
def test_rule13_vdpa(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule13_vdpa_passes() -> None:
    passes([*IOMMU_SEG1, "--vdpa", "path=/v,pci_segment=1,iommu=on"])


# ---------------------------------------------------------------------------
# Rule 14: vsock CID
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cid", [0, 1, 2, 4294967295])
def test_rule14_special_cid(cid: int) -> None:
    fails(["--vsock", f"cid={cid},socket=/s"], "VsockSpecialCid", f"{cid} is a special VSOCK CID")


@pytest.mark.parametrize("cid", [3, 4294967294])
def test_rule14_cid_passes(cid: int) -> None:
    passes(["--vsock", f"cid={cid},socket=/s"])


def test_rule13_before_rule14() -> None:
    fails(
        ["--vdpa", "path=/v,id=__v", "--vsock", "cid=2,socket=/s"],
        "InvalidIdentifier",
        "Identifier __v is invalid",
    )


def test_rule14_before_rule17() -> None:
    fails(["--vsock", "cid=2,socket=/s,id=__v"], "VsockSpecialCid", "2 is a special VSOCK CID")


# ---------------------------------------------------------------------------
# Rule 15: balloon
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--balloon", "size=512M"], "Balloon size (536870912) greater than RAM (536870912)"),
        (["--balloon", "size=1G"], "Balloon size (1073741824) greater than RAM (536870912)"),
        (
            ["--memory", "size=0", "--memory-zone", "id=z,size=1G", "--balloon", "size=1G"],
            "Balloon size (1073741824) greater than RAM (1073741824)",
        ),
        (
            [
                "--memory",
                "size=1G",
                "--memory-zone",
                "id=z,size=1G",
                "id=y,size=1G",
                "--balloon",
                "size=4G",
            ],
            "Balloon size (4294967296) greater than RAM (3221225472)",
        ),
        # hotplug memory does not count
        (
            ["--memory", "size=512M,hotplug_size=1G", "--balloon", "size=512M"],
            "Balloon size (536870912) greater than RAM (536870912)",
        ),
    ],
)
def test_rule15_balloon(args: list[str], text: str) -> None:
    fails(args, "BalloonLargerThanRam", text)


@pytest.mark.parametrize(
    "args",
    [
        ["--balloon", "size=511M"],
        ["--balloon", "size=0"],
        ["--memory", "size=1G", "--memory-zone", "id=z,size=1G", "--balloon", "size=1G"],
        ["--memory", "size=0", "--memory-zone", "id=z,size=1G", "--balloon", "size=512M"],
    ],
)
def test_rule15_balloon_passes(args: list[str]) -> None:
    passes(args)


def test_rule14_before_rule15() -> None:
    fails(
        ["--vsock", "cid=1,socket=/s", "--balloon", "size=1G"],
        "VsockSpecialCid",
        "1 is a special VSOCK CID",
    )


# ---------------------------------------------------------------------------
# Rule 16: VFIO devices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            ["--device", "path=/dev/a", "path=/dev/a"],
            "DuplicateDevicePath",
            "Duplicated device path: /dev/a",
        ),
        (
            ["--device", "path=/dev/a,id=x", "path=/dev/b", "path=/dev/a,id=y"],
            "DuplicateDevicePath",
            "Duplicated device path: /dev/a",
        ),
        (
            [*SEG2, "--device", "path=/dev/a,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*IOMMU_SEG1, "--device", "path=/dev/a,pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (["--device", "path=/dev/a,id=__x"], "InvalidIdentifier", "Identifier __x is invalid"),
        (
            ["--device", "path=/dev/a,id=x", "path=/dev/b,id=x"],
            "IdentifierNotUnique",
            "Identifier x is not unique",
        ),
        # duplicate path before identifier rule
        (
            ["--device", "path=/dev/a,id=x", "path=/dev/a,id=x"],
            "DuplicateDevicePath",
            "Duplicated device path: /dev/a",
        ),
        # rule 15 before rule 16
        (
            ["--balloon", "size=1G", "--device", "path=/dev/a", "path=/dev/a"],
            "BalloonLargerThanRam",
            "Balloon size (1073741824) greater than RAM (536870912)",
        ),
    ],
)
def test_rule16_devices(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule16_devices_pass() -> None:
    passes(["--device", "path=/dev/a", "path=/dev/b"])
    passes([*IOMMU_SEG1, "--device", "path=/dev/a,pci_segment=1,iommu=on"])


# ---------------------------------------------------------------------------
# Rule 17: vsock segment and identifier
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            [*SEG2, "--vsock", "cid=3,socket=/s,pci_segment=2"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            [*IOMMU_SEG1, "--vsock", "cid=3,socket=/s,pci_segment=1"],
            "OnIommuSegment",
            "Device is on an IOMMU PCI segment (1) but not placed behind IOMMU",
        ),
        (["--vsock", "cid=3,socket=/s,id=__v"], "InvalidIdentifier", "Identifier __v is invalid"),
        (
            ["--disk", "path=/d,id=v", "--vsock", "cid=3,socket=/s,id=v"],
            "IdentifierNotUnique",
            "Identifier v is not unique",
        ),
        # rule 16 before rule 17
        (
            ["--device", "path=/dev/a", "path=/dev/a", "--vsock", "cid=3,socket=/s,id=__v"],
            "DuplicateDevicePath",
            "Duplicated device path: /dev/a",
        ),
    ],
)
def test_rule17_vsock(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


def test_rule17_vsock_passes() -> None:
    passes([*IOMMU_SEG1, "--vsock", "cid=3,socket=/s,pci_segment=1,iommu=on"])


# ---------------------------------------------------------------------------
# Rule 18: NUMA
# ---------------------------------------------------------------------------

ZONES = ["--memory", "size=0", "--memory-zone", "id=z0,size=1G", "id=z1,size=1G"]


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            [
                *ZONES,
                "--numa",
                "guest_numa_id=0,memory_zones=[z0]",
                "guest_numa_id=1,memory_zones=[z0]",
            ],
            "MemoryZoneReused",
            "Memory zone: z0 belongs to multiple NUMA nodes 0 and 1",
        ),
        (
            [
                *ZONES,
                "--numa",
                "guest_numa_id=3,memory_zones=[z0,z1]",
                "guest_numa_id=5,memory_zones=[z1]",
            ],
            "MemoryZoneReused",
            "Memory zone: z1 belongs to multiple NUMA nodes 3 and 5",
        ),
        (
            ["--numa", "guest_numa_id=0,pci_segments=[1]"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 1",
        ),
        (
            [*SEG2, "--numa", "guest_numa_id=0,pci_segments=[2]"],
            "InvalidPciSegment",
            "Invalid PCI segment id: 2",
        ),
        (
            ["--numa", "guest_numa_id=1,pci_segments=[0]"],
            "DefaultPciSegmentInvalidNode",
            "Default PCI segment assigned to non-zero NUMA node 1",
        ),
        (
            [
                "--platform",
                "num_pci_segments=3",
                "--numa",
                "guest_numa_id=0,pci_segments=[1]",
                "guest_numa_id=2,pci_segments=[1]",
            ],
            "PciSegmentReused",
            "PCI segment: 1 belongs to multiple NUMA nodes 0 and 2",
        ),
        # zone reuse is found before the pci segment of the same node
        (
            [
                *ZONES,
                "--numa",
                "guest_numa_id=0,memory_zones=[z0]",
                "guest_numa_id=1,memory_zones=[z0],pci_segments=[5]",
            ],
            "MemoryZoneReused",
            "Memory zone: z0 belongs to multiple NUMA nodes 0 and 1",
        ),
        # rule 17 before rule 18
        (
            ["--vsock", "cid=3,socket=/s,id=__v", "--numa", "guest_numa_id=1,pci_segments=[0]"],
            "InvalidIdentifier",
            "Identifier __v is invalid",
        ),
    ],
)
def test_rule18_numa(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


@pytest.mark.parametrize(
    "args",
    [
        [
            *ZONES,
            "--numa",
            "guest_numa_id=0,memory_zones=[z0]",
            "guest_numa_id=1,memory_zones=[z1]",
        ],
        ["--numa", "guest_numa_id=0,pci_segments=[0]"],
        [*SEG2, "--numa", "guest_numa_id=0,pci_segments=[0]", "guest_numa_id=1,pci_segments=[1]"],
        ["--numa", "guest_numa_id=0,cpus=[0],distances=[1@20]", "guest_numa_id=1,distances=[0@20]"],
    ],
)
def test_rule18_numa_passes(args: list[str]) -> None:
    passes(args)


# ---------------------------------------------------------------------------
# Rule 19: memory zone and sgx-epc identifiers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind", "text"),
    [
        (
            ["--memory", "size=0", "--memory-zone", "id=__z,size=1G"],
            "InvalidIdentifier",
            "Identifier __z is invalid",
        ),
        (
            ["--memory", "size=0", "--memory-zone", "id=z,size=1G", "id=z,size=1G"],
            "IdentifierNotUnique",
            "Identifier z is not unique",
        ),
        (
            ["--disk", "path=/d,id=z", "--memory", "size=0", "--memory-zone", "id=z,size=1G"],
            "IdentifierNotUnique",
            "Identifier z is not unique",
        ),
        (["--sgx-epc", "id=__e"], "InvalidIdentifier", "Identifier __e is invalid"),
        (
            ["--memory", "size=0", "--memory-zone", "id=e,size=1G", "--sgx-epc", "id=e"],
            "IdentifierNotUnique",
            "Identifier e is not unique",
        ),
        # zones before sgx-epc
        (
            ["--memory", "size=0", "--memory-zone", "id=__z,size=1G", "--sgx-epc", "id=__e"],
            "InvalidIdentifier",
            "Identifier __z is invalid",
        ),
        # rule 18 before rule 19
        (
            [
                "--memory",
                "size=0",
                "--memory-zone",
                "id=__z,size=1G",
                "--numa",
                "guest_numa_id=1,pci_segments=[0]",
            ],
            "DefaultPciSegmentInvalidNode",
            "Default PCI segment assigned to non-zero NUMA node 1",
        ),
    ],
)
def test_rule19_zone_and_sgx_ids(args: list[str], kind: str, text: str) -> None:
    fails(args, kind, text)


# ---------------------------------------------------------------------------
# Rule 20: platform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "kind", "text"),
    [
        (
            "num_pci_segments=0",
            "InvalidNumPciSegments",
            "Number of PCI segments (0) not in range of 1 to 96",
        ),
        (
            "num_pci_segments=97",
            "InvalidNumPciSegments",
            "Number of PCI segments (97) not in range of 1 to 96",
        ),
        (
            "num_pci_segments=65535",
            "InvalidNumPciSegments",
            "Number of PCI segments (65535) not in range of 1 to 96",
        ),
        ("num_pci_segments=2,iommu_segments=[2]", "InvalidPciSegment", "Invalid PCI segment id: 2"),
        ("iommu_segments=[0,1]", "InvalidPciSegment", "Invalid PCI segment id: 1"),
    ],
)
def test_rule20_platform(platform: str, kind: str, text: str) -> None:
    fails(["--platform", platform], kind, text)


@pytest.mark.parametrize(
    "platform",
    ["num_pci_segments=1", "num_pci_segments=96", "num_pci_segments=96,iommu_segments=[0,95]"],
)
def test_rule20_platform_passes(platform: str) -> None:
    passes(["--platform", platform])


def test_device_segment_checks_come_before_rule20() -> None:
    # with num_pci_segments=0, a disk on segment 0 already fails its segment check (rule 6)
    fails(
        ["--platform", "num_pci_segments=0", "--disk", "path=/d"],
        "InvalidPciSegment",
        "Invalid PCI segment id: 0",
    )


def test_rule19_before_rule20() -> None:
    fails(
        ["--sgx-epc", "id=__e", "--platform", "num_pci_segments=0"],
        "InvalidIdentifier",
        "Identifier __e is invalid",
    )


# ---------------------------------------------------------------------------
# Rule 21: top-level iommu, and the returned id set
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"disks": [{"path": "/d", "iommu": True}]},
        {"net": [{"iommu": True}]},
        {"pmem": [{"file": "/p", "iommu": True}]},
        {"vdpa": [{"path": "/v", "iommu": True}]},
        {"devices": [{"path": "/dev/a", "iommu": True}]},
        {"vsock": {"cid": 3, "socket": "/s", "iommu": True}},
        {"rng": {"src": "/dev/urandom", "iommu": True}},
        {"console": {"mode": "Tty", "iommu": True}},
        {"platform": {"num_pci_segments": 1, "iommu_segments": [0]}},
    ],
)
def test_rule21_iommu_filled(extra: dict[str, Any]) -> None:
    cfg = json_vm(extra)
    assert cfg.iommu is False  # JSON creation does not validate (ref §2.2)
    cfg.validate()
    assert cfg.iommu is True


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"disks": [{"path": "/d"}], "net": [{}], "pmem": [{"file": "/p"}]},
        {"platform": {"num_pci_segments": 2}},
        {"vsock": {"cid": 3, "socket": "/s"}},
    ],
)
def test_rule21_iommu_stays_false(extra: dict[str, Any]) -> None:
    cfg = json_vm(extra)
    cfg.validate()
    assert cfg.iommu is False


@pytest.mark.parametrize(
    "args",
    [
        ["--disk", "path=/d,iommu=on"],
        ["--net", "iommu=on"],
        ["--rng", "iommu=on"],
        ["--console", "tty,iommu=on"],
        ["--platform", "iommu_segments=[0]"],
        ["--vdpa", "path=/v,iommu=on"],
    ],
)
def test_rule21_cli_sets_iommu(args: list[str]) -> None:
    assert cli(*args).iommu is True


def test_cli_without_iommu_devices() -> None:
    assert cli("--disk", "path=/d").iommu is False


def test_validate_returns_all_ids() -> None:
    cfg = cli(
        "--rate-limit-group",
        f"id=g0,{BUCKET}",
        "--disk",
        "path=/d,id=d0",
        "path=/e",
        "--net",
        "id=n0",
        "--memory",
        "size=0,shared=on",
        "--memory-zone",
        "id=z0,size=1G,shared=on",
        "--fs",
        "tag=t,socket=/s,id=f0",
        "--pmem",
        "file=/p,id=p0",
        "--vdpa",
        "path=/v,id=v0",
        "--device",
        "path=/dev/x,id=x0",
        "--user-device",
        "socket=/u,id=u0",
        "--vsock",
        "cid=3,socket=/s,id=s0",
        "--sgx-epc",
        "id=e0",
    )
    expected = {"g0", "d0", "n0", "z0", "f0", "p0", "v0", "x0", "u0", "s0", "e0"}
    assert cfg.validate() == expected
    assert cfg.validate() == expected  # validation is repeatable


def test_validate_returns_empty_set_without_ids() -> None:
    assert cli("--disk", "path=/d", "--net", "tap=t").validate() == set()
