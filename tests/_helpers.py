"""Shared helpers for the vmkit config-layer tests.

Every expectation in the test files comes from /work/shared/ch-reference.md ("ref") and
/work/shared/ch-validation.md ("val").
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from vmkit import ConfigError, ParseError
from vmkit.config import (
    BalloonConfig,
    ConsoleConfig,
    CpusConfig,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    MemoryConfig,
    MemoryZoneConfig,
    NetConfig,
    NumaConfig,
    PlatformConfig,
    PmemConfig,
    RateLimiterGroupConfig,
    RestoreConfig,
    RngConfig,
    SgxEpcConfig,
    TpmConfig,
    UserDeviceConfig,
    VdpaConfig,
    VmConfig,
    VsockConfig,
)

if TYPE_CHECKING:
    from vmkit.vm import VmError

T = TypeVar("T")

KERNEL = "/path/to/kernel"

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# flag name -> (option class, ParseError kind for option-parser errors); val §4
OPTIONS: dict[str, tuple[type, str]] = {
    "cpus": (CpusConfig, "ParseCpus"),
    "platform": (PlatformConfig, "ParsePlatform"),
    "memory": (MemoryConfig, "ParseMemory"),
    "memory-zone": (MemoryZoneConfig, "ParseMemoryZone"),
    "rate-limit-group": (RateLimiterGroupConfig, "ParseRateLimiterGroup"),
    "disk": (DiskConfig, "ParseDisk"),
    "net": (NetConfig, "ParseNetwork"),
    "rng": (RngConfig, "ParseRng"),
    "balloon": (BalloonConfig, "ParseBalloon"),
    "fs": (FsConfig, "ParseFileSystem"),
    "pmem": (PmemConfig, "ParsePersistentMemory"),
    "console": (ConsoleConfig, "ParseConsole"),
    "device": (DeviceConfig, "ParseDevice"),
    "user-device": (UserDeviceConfig, "ParseUserDevice"),
    "vdpa": (VdpaConfig, "ParseVdpa"),
    "vsock": (VsockConfig, "ParseVsock"),
    "sgx-epc": (SgxEpcConfig, "ParseSgxEpc"),
    "numa": (NumaConfig, "ParseNuma"),
    "restore": (RestoreConfig, "ParseRestore"),
    "tpm": (TpmConfig, "ParseTpm"),
}

# A minimal valid option string for every option (its REQ keys only); val §1
MINIMAL: dict[str, str] = {
    "cpus": "",
    "platform": "",
    "memory": "",
    "memory-zone": "id=z",
    "rate-limit-group": "",
    "disk": "path=/d",
    "net": "",
    "rng": "",
    "balloon": "",
    "fs": "tag=t,socket=/s",
    "pmem": "file=/p",
    "console": "tty",
    "device": "path=/dev/x",
    "user-device": "socket=/u",
    "vdpa": "path=/v",
    "vsock": "cid=3,socket=/s",
    "sgx-epc": "id=e",
    "numa": "",
    "restore": "source_url=/r",
    "tpm": "socket=/t",
}

# Keys accepted by each option string, val §1
KEYS: dict[str, list[str]] = {
    "cpus": ["boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features"],
    "platform": ["num_pci_segments", "iommu_segments", "serial_number", "uuid", "oem_strings"],
    "memory": [
        "size",
        "file",
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
    "memory-zone": [
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
    "rate-limit-group": [
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
        "id",
    ],
    "disk": [
        "path",
        "readonly",
        "direct",
        "iommu",
        "queue_size",
        "num_queues",
        "vhost_user",
        "socket",
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
        "id",
        "_disable_io_uring",
        "_disable_aio",
        "pci_segment",
        "serial",
        "rate_limit_group",
    ],
    "net": [
        "tap",
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
        "socket",
        "vhost_mode",
        "id",
        "fd",
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
        "pci_segment",
    ],
    "rng": ["src", "iommu"],
    "balloon": ["size", "deflate_on_oom", "free_page_reporting"],
    "fs": ["tag", "queue_size", "num_queues", "socket", "id", "pci_segment"],
    "pmem": ["size", "file", "iommu", "discard_writes", "id", "pci_segment"],
    "console": ["off", "pty", "tty", "null", "file", "socket", "iommu"],
    "device": ["path", "id", "iommu", "pci_segment"],
    "user-device": ["socket", "id", "pci_segment"],
    "vdpa": ["path", "num_queues", "iommu", "id", "pci_segment"],
    "vsock": ["socket", "cid", "iommu", "id", "pci_segment"],
    "sgx-epc": ["id", "size", "prefault"],
    "numa": [
        "guest_numa_id",
        "cpus",
        "distances",
        "memory_zones",
        "sgx_epc_sections",
        "pci_segments",
    ],
    "restore": ["source_url", "prefault"],
    "tpm": ["socket"],
}


def parse(flag: str, text: str) -> Any:
    cls: Any = OPTIONS[flag][0]
    return cls.parse(text)


def expect(
    fn: Callable[[], object],
    kind: str,
    text: str,
    cls: type[ConfigError] = ParseError,
) -> ConfigError:
    """Run fn, require it to raise `cls` with the given `.kind` and exact `str()`."""
    with pytest.raises(cls) as info:
        fn()
    err = info.value
    assert err.kind == kind, f"kind {err.kind!r} != {kind!r} (message {str(err)!r})"
    assert str(err) == text
    return err


def expect_parse(flag: str, text: str, kind: str, message: str) -> ConfigError:
    return expect(lambda: parse(flag, text), kind, message)


def cli(*args: str) -> VmConfig:
    """VmConfig from Cloud Hypervisor arguments, always with a kernel (val §3 rule 1)."""
    return VmConfig.from_cli(["--kernel", KERNEL, *args])


def from_json(extra: dict[str, Any]) -> VmConfig:
    body: dict[str, Any] = {"payload": {"kernel": KERNEL}}
    body.update(extra)
    return VmConfig.from_json(json.dumps(body))


def some(value: T | None) -> T:
    """Narrow an optional value that the test requires to be present."""
    assert value is not None
    return value


def monitor_events(path: Path) -> list[dict[str, Any]]:
    """The events an event-monitor file holds, in order."""
    decoder, text, found, at = json.JSONDecoder(), path.read_text(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return found
        event, at = decoder.raw_decode(text, at)
        found.append(event)


def event_names(path: Path) -> list[str]:
    """``source event`` of each event an event-monitor file holds (its
    properties left out)."""
    return [f"{event['source']} {event['event']}" for event in monitor_events(path)]


def move_spawned_vm(sender: Any, receiver: Any, sock: Path) -> None:
    """Migrates ``sender``'s VM (a ``SpawnedVm``) to ``receiver`` (another) over
    the unix socket ``sock``; returns once the sender's process has exited 0."""
    import threading

    from _sockets import wait_listening

    waiting = threading.Thread(target=receiver.receive_migration, args=(sock,))
    waiting.start()
    wait_listening(sock)
    sender.migrate_to(sock)
    waiting.join(30)
    assert sender.process.wait(10) == 0


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64, the hash the test guest prints of what it reads."""
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def sector_pattern(first_sector: int, length: int) -> bytes:
    """What the guest's blk, pmem and fs steps write: qword j of 512-byte sector s
    is 0x564d4b4954000000 ^ (s << 16) ^ j, little-endian (guest/README.md)."""
    return b"".join(
        struct.pack("<Q", 0x564D4B4954000000 ^ (sector << 16) ^ j)
        for sector in range(first_sector, first_sector + length // 512)
        for j in range(64)
    )


def restore_refused(snapshot: Path) -> VmError:
    """Restores ``snapshot``, which must fail with a ``Snapshot`` VmError and
    leave no thread or descriptor behind; returns the error."""
    from vmkit.vm import Vm, VmError

    gc.collect()  # earlier tests' garbage must not close descriptors meanwhile
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    with pytest.raises(VmError) as raised:
        Vm.restore(snapshot)
    assert raised.value.kind == "Snapshot", (raised.value.kind, str(raised.value))
    assert threading.active_count() == threads, "a thread was left running"
    assert len(os.listdir("/proc/self/fd")) == fds, "a descriptor was left open"
    return raised.value
