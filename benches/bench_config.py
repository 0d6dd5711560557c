"""How long vmkit takes to turn a Cloud Hypervisor command line into a validated config.

Run: ``python benches/bench_config.py`` (``--markdown`` prints a table for RESULTS.md).

Each figure is the median over ``--repeats`` batches of the per-call time of a
batch of ``--number`` calls, measured from Python with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

from machine import machine
from vmkit import _native
from vmkit._flags import scan
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

# kernel, cmdline, 2 cpus, memory, 4 disks, 2 nets, rng, serial, console, platform, numa
REALISTIC_ARGV = [
    "--kernel", "/images/vmlinux",
    "--cmdline", "console=ttyS0 root=/dev/vda1 rw",
    "--cpus", "boot=2",
    "--memory", "size=1G",
    "--disk",
    "path=/images/root.img",
    "path=/images/data1.img,readonly=on",
    "path=/images/data2.img,num_queues=2,queue_size=256",
    "path=/images/data3.img,id=scratch",
    "--net",
    "tap=tap0,mac=12:34:56:78:9a:bc",
    "tap=tap1,ip=192.168.10.1,mask=255.255.255.0",
    "--rng", "src=/dev/urandom",
    "--serial", "tty",
    "--console", "off",
    "--platform", "num_pci_segments=2",
    "--numa", "guest_numa_id=0,cpus=[0,1]",
]  # fmt: skip

OPTION_STRINGS: list[tuple[type, str]] = [
    (CpusConfig, "boot=2,max=4,topology=1:2:1:2,affinity=[0@[0,2],1@[1,3]]"),
    (PlatformConfig, "num_pci_segments=2,iommu_segments=[1],serial_number=abc"),
    (MemoryConfig, "size=1G,shared=on,hugepages=on,hugepage_size=2M"),
    (MemoryZoneConfig, "id=mem0,size=1G,host_numa_node=0"),
    (RateLimiterGroupConfig, "id=group0,bw_size=1000,bw_refill_time=100"),
    (DiskConfig, "path=/images/data.img,readonly=on,num_queues=2,queue_size=256,id=data"),
    (NetConfig, "tap=tap0,mac=12:34:56:78:9a:bc,ip=192.168.10.1,mask=255.255.255.0"),
    (RngConfig, "src=/dev/urandom"),
    (BalloonConfig, "size=128M,deflate_on_oom=on"),
    (FsConfig, "tag=myfs,socket=/tmp/virtiofs.sock,num_queues=1,queue_size=512"),
    (PmemConfig, "file=/images/pmem.img,size=128M"),
    (ConsoleConfig, "file=/tmp/console.log"),
    (DeviceConfig, "path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on"),
    (UserDeviceConfig, "socket=/tmp/user.sock,id=user0"),
    (VdpaConfig, "path=/dev/vhost-vdpa-0,num_queues=2"),
    (VsockConfig, "cid=3,socket=/tmp/vsock.sock"),
    (SgxEpcConfig, "id=epc0,size=64M"),
    (NumaConfig, "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=[mem1]"),
    (RestoreConfig, "source_url=file:///snapshots/vm1,prefault=on"),
    (TpmConfig, "socket=/tmp/swtpm.sock"),
]


def median_us(call: Callable[[], object], number: int, repeats: int) -> float:
    """Median per-call time in microseconds over ``repeats`` batches of ``number`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            call()
        samples.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    n, r = args.number, args.repeats

    params = scan(REALISTIC_ARGV).vm_params
    config = VmConfig.from_cli(REALISTIC_ARGV)
    config_json = config.to_json()
    config_dict = config.to_dict()
    rows: list[tuple[str, float]] = [
        ("VmConfig.from_cli(argv): scan + parse + validate", median_us(
            lambda: VmConfig.from_cli(REALISTIC_ARGV), n, r)),
        ("  of which parse + validate in Rust (_native.parse_vm)", median_us(
            lambda: _native.parse_vm(params, True), n, r)),
        ("  of which argv scan (Python)", median_us(lambda: scan(REALISTIC_ARGV), n, r)),
        ("VmConfig.from_json(text)", median_us(lambda: VmConfig.from_json(config_json), n, r)),
        ("VmConfig.from_dict(dict)", median_us(lambda: VmConfig.from_dict(config_dict), n, r)),
        ("VmConfig.to_json()", median_us(config.to_json, n, r)),
        ("VmConfig.validate(): the objects read by Rust, then validated",
         median_us(config.validate, n, r)),
    ]  # fmt: skip
    for cls, text in OPTION_STRINGS:
        call = functools.partial(cls.parse, text)
        rows.append((f"{cls.__name__}.parse({text!r})", median_us(call, n, r)))

    if args.markdown:
        print(f"Machine: {machine(with_kvm=False)}\n")
        shown = " ".join(json.dumps(a) if " " in a else a for a in REALISTIC_ARGV)
        print(f"Command line: `vmkit {shown}`\n")
        print("| what | median µs per call |")
        print("|---|---|")
        for name, us in rows:
            print(f"| {name.replace('|', '/')} | {us:.2f} |")
    else:
        print(machine(with_kvm=False), file=sys.stderr)
        for name, us in rows:
            print(f"{us:9.2f} µs  {name}")


if __name__ == "__main__":
    main()
