#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/).

Each seed is a meaningful input in the target's own encoding (see the
decoders in fuzz/src/): valid option strings and command lines, real JSON
configs and API bodies, virtio requests laid out as a driver lays them out,
a virtio-pci driver's set-up sequence, and minimal kernels of each format.
Run it after changing a decoder: `python3 fuzz/seeds.py`.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"

# --- config -----------------------------------------------------------------

# The option kinds, in the order of OPTIONS in fuzz/src/config.rs.
OPTION_EXAMPLES: list[list[str]] = [
    ["boot=2,max=4", "boot=1,topology=1:1:1:1,max_phys_bits=40", "boot=2,affinity=[0@[0-3],1@[4]]"],
    [
        "size=1G",
        "size=512M,shared=on,hugepages=off",
        "size=0,hotplug_method=virtio-mem,hotplug_size=1G",
    ],
    ["id=mem0,size=1G,shared=on", "id=z1,size=256M,host_numa_node=0,hotplug_size=512M"],
    ["num_pci_segments=2", "num_pci_segments=4,iommu_segments=[2-3]"],
    [
        "id=group0,bw_size=1000,bw_refill_time=100",
        "id=g,ops_size=10,ops_refill_time=50,ops_one_time_burst=5",
    ],
    [
        "path=/var/disk.img",
        "path=/d.img,readonly=on,num_queues=4,queue_size=256,id=disk0,serial=abc",
        "path=/d.img,bw_size=1M,bw_refill_time=100,pci_segment=1",
        "vhost_user=true,socket=/tmp/sock",
    ],
    [
        "tap=tap0,mac=12:34:56:78:9a:bc",
        "ip=192.168.1.1,mask=255.255.255.0,num_queues=4,queue_size=128,mtu=1500",
        "fd=[3,4],num_queues=4,offload_tso=off",
        "vhost_user=true,socket=/tmp/sock,vhost_mode=server",
    ],
    ["src=/dev/urandom", "src=/dev/hwrng,iommu=on"],
    ["size=1G,deflate_on_oom=on,free_page_reporting=on"],
    ["tag=myfs,socket=/tmp/fs.sock,num_queues=1,queue_size=1024"],
    ["file=/tmp/pmem,size=128M,discard_writes=on"],
    ["off", "null", "tty", "pty", "file=/tmp/console.log", "socket=/tmp/console.sock"],
    ["path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on,id=vfio0"],
    ["socket=/tmp/user.sock,id=u0,pci_segment=1"],
    ["path=/dev/vhost-vdpa-0,num_queues=2"],
    ["cid=3,socket=/tmp/vsock"],
    ["id=epc0,size=64M,prefault=on"],
    [
        "guest_numa_id=0,cpus=[0-1],distances=[1@20],memory_zones=[mem0]",
        "guest_numa_id=1,cpus=[2,3],sgx_epc_sections=[epc0],pci_segments=[1]",
    ],
    ["source_url=file:///tmp/snapshot,prefault=on"],
    ["socket=/tmp/swtpm.sock"],
]

CLI_EXAMPLES: list[list[str]] = [
    [
        "--kernel",
        "/vmlinux",
        "--cmdline",
        "console=ttyS0",
        "--cpus",
        "boot=2",
        "--memory",
        "size=512M",
    ],
    [
        "--kernel",
        "/vmlinux",
        "--disk",
        "path=/a.img",
        "path=/b.img,readonly=on",
        "--net",
        "tap=tap0",
        "--rng",
        "src=/dev/urandom",
        "--serial",
        "tty",
        "--console",
        "off",
    ],
    [
        "--kernel",
        "/vmlinux",
        "--memory",
        "size=0",
        "--memory-zone",
        "id=mem0,size=1G",
        "id=mem1,size=1G",
        "--numa",
        "guest_numa_id=0,memory_zones=[mem0]",
        "guest_numa_id=1,memory_zones=[mem1]",
        "--cpus",
        "boot=2",
    ],
    [
        "--kernel",
        "/vmlinux",
        "--platform",
        "num_pci_segments=2",
        "--disk",
        "path=/a.img,pci_segment=1",
        "--rate-limit-group",
        "id=g0,bw_size=1000,bw_refill_time=100",
        "--pvpanic",
        "--watchdog",
    ],
    [
        "--firmware",
        "/fw.bin",
        "--fs",
        "tag=t,socket=/s",
        "--vsock",
        "cid=3,socket=/v",
        "--tpm",
        "socket=/t",
    ],
]

JSON_CONFIGS = [
    {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
        "memory": {"size": 1073741824},
        "payload": {"kernel": "/vmlinux", "cmdline": "console=ttyS0"},
        "disks": [{"path": "/d.img", "num_queues": 2}],
        "net": [{"tap": "tap0", "mac": "12:34:56:78:9a:bc"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    },
    {
        "cpus": {
            "boot_vcpus": 1,
            "max_vcpus": 1,
            "topology": {
                "threads_per_core": 1,
                "cores_per_die": 1,
                "dies_per_package": 1,
                "packages": 1,
            },
        },
        "memory": {"size": 0, "zones": [{"id": "mem0", "size": 536870912}]},
        "payload": {"kernel": "/vmlinux"},
        "numa": [{"guest_numa_id": 0, "cpus": [0], "memory_zones": ["mem0"]}],
        "platform": {"num_pci_segments": 2},
        "serial": {"mode": "Null"},
        "console": {"mode": "File", "file": "/tmp/c.log"},
    },
    {"payload": {"kernel": "/k"}},
]

API_BODIES: list[tuple[int, object]] = [
    (0, {"desired_vcpus": 2, "desired_ram": 1073741824}),
    (0, {"desired_balloon": 0}),
    (1, {"id": "mem0", "desired_ram": 2147483648}),
    (2, {"id": "disk0"}),
    (3, {"destination_url": "file:///tmp/snapshot"}),
    (4, {"receiver_url": "unix:/tmp/migration.sock"}),
    (5, {"destination_url": "unix:/tmp/migration.sock", "local": True}),
]

# --- virtio rings (fuzz/src/ring.rs) ----------------------------------------

DATA = 0x3_0000
NEXT, WRITE, INDIRECT = 1, 2, 4


class Ops:
    """The hostile driver's actions, encoded as fuzz/src/ring.rs decodes them."""

    def __init__(self) -> None:
        self.out = bytearray()

    def desc(self, ring: int, index: int, addr: int, length: int, flags: int) -> None:
        assert addr >= DATA and (addr - DATA) % 8 == 0
        self.out += bytes([ring << 4 | 0, index, 0]) + struct.pack("<H", (addr - DATA) // 8)
        self.out += bytes([4]) + struct.pack("<H", length)
        self.out += bytes([flags, 0])  # next: the following descriptor

    def indirect(self, ring: int, index: int, table: int) -> None:
        """Descriptor `index` points at indirect table `table` (fuzz TABLES)."""
        self.out += bytes([ring << 4 | 0, index, 10, table * 16])
        self.out += bytes([4]) + struct.pack("<H", 48) + bytes([INDIRECT, 0])

    def table_desc(
        self, ring: int, table: int, index: int, addr: int, length: int, flags: int
    ) -> None:
        self.out += bytes([ring << 4 | 10, table, index, 0]) + struct.pack("<H", (addr - DATA) // 8)
        self.out += bytes([4]) + struct.pack("<H", length) + bytes([flags, index + 1])

    def publish(self, ring: int, head: int) -> None:
        self.out += bytes([ring << 4 | 5, head])

    def data(self, ring: int, addr: int, payload: bytes) -> None:
        assert len(payload) < 256
        self.out += bytes([ring << 4 | 8]) + struct.pack("<H", (addr - DATA) // 8)
        self.out += bytes([len(payload)]) + payload

    def kick(self, ring: int) -> None:
        self.out += bytes([ring << 4 | 7])

    def action(self, payload: bytes) -> None:
        self.out += bytes([13]) + payload


def header(size_log2: int, options: int | None, features: int = (1 << 64) - 1) -> bytes:
    """Queue size, device options (block and net only) and the features the driver accepts."""
    options_byte = b"" if options is None else bytes([options])
    return bytes([size_log2]) + options_byte + struct.pack("<Q", features)


def block_request(kind: int, sector: int, data_len: int, *, indirect: bool = False) -> bytes:
    ops = Ops()
    ops.data(0, DATA, struct.pack("<IIQ", kind, 0, sector))
    if kind in (11, 13):  # discard / write zeroes: one segment
        ops.data(0, DATA + 0x100, struct.pack("<QII", 0, 8, 0))
    elif kind == 1:
        ops.data(0, DATA + 0x100, bytes(range(200)))
    parts = [(DATA, 16, 0)]
    if data_len:
        writable = WRITE if kind in (0, 8) else 0
        parts.append((DATA + 0x100, data_len, writable))
    parts.append((DATA + 0x2000, 1, WRITE))
    if indirect:
        for i, (addr, length, flags) in enumerate(parts):
            last = i == len(parts) - 1
            ops.table_desc(0, 0, i, addr, length, flags if last else flags | NEXT)
        ops.indirect(0, 0, 0)
    else:
        for i, (addr, length, flags) in enumerate(parts):
            last = i == len(parts) - 1
            ops.desc(0, i, addr, length, flags if last else flags | NEXT)
    ops.publish(0, 0)
    ops.kick(0)
    return bytes(ops.out)


def block_seeds() -> dict[str, bytes]:
    seeds = {}
    for name, kind, length in [
        ("read", 0, 512),
        ("write", 1, 512),
        ("flush", 4, 0),
        ("get_id", 8, 20),
        ("discard", 11, 16),
        ("write_zeroes", 13, 16),
        ("unsupported", 99, 0),
    ]:
        seeds[f"{name}-sync"] = header(4, 0) + block_request(kind, 0, length)
    seeds["read-io_uring"] = header(4, 2) + block_request(0, 8, 1024)
    seeds["write-io_uring"] = header(4, 2) + block_request(1, 1, 512)
    seeds["read-indirect"] = header(4, 0) + block_request(0, 2, 512, indirect=True)
    seeds["write-readonly"] = header(4, 1) + block_request(1, 0, 512)
    seeds["reads-rate-limited"] = header(4, 8) + block_request(0, 0, 512) * 4
    return seeds


VNET_HDR = bytes(12)
ETH_FRAME = bytes.fromhex("ffffffffffff123456789abc0806") + bytes(46)


def net_seeds() -> dict[str, bytes]:
    seeds = {}
    # Transmit one frame (queue 1), receive one (queue 0) from the network.
    ops = Ops()
    ops.data(1, DATA, VNET_HDR + ETH_FRAME)
    ops.desc(1, 0, DATA, len(VNET_HDR + ETH_FRAME), 0)
    ops.publish(1, 0)
    ops.kick(1)
    ops.desc(0, 0, DATA + 0x1000, 1526, WRITE)
    ops.publish(0, 0)
    ops.kick(0)
    frame = VNET_HDR + ETH_FRAME
    ops.action(bytes([0]) + struct.pack("<H", len(frame)) + frame)
    ops.kick(0)
    seeds["tx-rx"] = header(4, 0) + bytes(ops.out)
    seeds["tx-rx-rate-limited"] = header(4, 8) + bytes(ops.out) * 3
    # Mergeable receive buffers spread over small descriptors.
    ops = Ops()
    for i in range(4):
        ops.desc(0, i, DATA + 0x1000 + 0x100 * i, 64, WRITE)
        ops.publish(0, i)
    big = VNET_HDR + ETH_FRAME * 4
    ops.action(bytes([0]) + struct.pack("<H", len(big)) + big)
    ops.kick(0)
    seeds["rx-mergeable"] = header(4, 0) + bytes(ops.out)
    # Control queue (2 pairs: queue 4): VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2.
    ops = Ops()
    ops.data(4, DATA, bytes([4, 0]) + bytes(6) + struct.pack("<H", 2))
    ops.desc(4, 0, DATA, 2, NEXT)
    ops.desc(4, 1, DATA + 8, 2, NEXT)
    ops.desc(4, 2, DATA + 0x800, 1, WRITE)
    ops.publish(4, 0)
    ops.kick(4)
    seeds["ctrl-mq"] = header(4, 1) + bytes(ops.out)
    # Control queue (1 pair: queue 2): guest offloads set.
    ops = Ops()
    ops.data(2, DATA, bytes([5, 0]) + bytes(6) + struct.pack("<Q", 3))
    ops.desc(2, 0, DATA, 2, NEXT)
    ops.desc(2, 1, DATA + 8, 8, NEXT)
    ops.desc(2, 2, DATA + 0x800, 1, WRITE)
    ops.publish(2, 0)
    ops.kick(2)
    seeds["ctrl-offloads"] = header(4, 0) + bytes(ops.out)
    return seeds


def rng_seeds() -> dict[str, bytes]:
    ops = Ops()
    ops.desc(0, 0, DATA, 64, WRITE | NEXT)
    ops.desc(0, 1, DATA + 0x100, 512, WRITE)
    ops.publish(0, 0)
    ops.kick(0)
    plain = header(4, None) + bytes(ops.out)
    ops = Ops()
    ops.table_desc(0, 1, 0, DATA, 256, WRITE | NEXT)
    ops.table_desc(0, 1, 1, DATA + 0x200, 256, WRITE)
    ops.indirect(0, 0, 1)
    ops.publish(0, 0)
    ops.kick(0)
    return {"fill": plain, "indirect": header(3, None) + bytes(ops.out)}


def vsock_header(src_port: int, dst_port: int, op: int, length: int = 0) -> bytes:
    """A guest's packet header: CID 3 to the host (CID 2), a stream."""
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)


def vsock_seeds() -> dict[str, bytes]:
    # The guest connects to host port 1235 and sends 16 bytes.
    ops = Ops()
    ops.desc(0, 0, DATA + 0x1000, 4096, WRITE)
    ops.publish(0, 0)
    ops.kick(0)
    ops.data(1, DATA, vsock_header(0x10000, 1235, 1))
    ops.desc(1, 0, DATA, 44, 0)
    ops.publish(1, 0)
    ops.kick(1)
    ops.data(1, DATA + 0x200, vsock_header(0x10000, 1235, 5, 16) + bytes(range(16)))
    ops.desc(1, 1, DATA + 0x200, 60, 0)
    ops.publish(1, 1)
    ops.kick(1)
    guest = header(3, None) + bytes(ops.out)
    # A host program connects to guest port 1234; the guest accepts; data flows.
    ops = Ops()
    ops.desc(0, 0, DATA + 0x1000, 4096, WRITE)
    ops.desc(0, 1, DATA + 0x2000, 4096, WRITE)
    ops.publish(0, 0)
    ops.publish(0, 1)
    ops.kick(0)
    ops.action(bytes([0, 0, 4]))  # CONNECT 1234
    ops.kick(0)
    ops.data(1, DATA, vsock_header(1234, 1 << 30, 2))
    ops.desc(1, 0, DATA, 44, 0)
    ops.publish(1, 0)
    ops.kick(1)
    ops.action(bytes([1, 0]) + struct.pack("<H", 32) + bytes(range(32)))
    ops.kick(0)
    host = header(3, None) + bytes(ops.out)
    return {"guest-connects": guest, "host-connects": host}


def balloon_seeds() -> dict[str, bytes]:
    ops = Ops()
    ops.action(struct.pack("<I", 64))  # target: 64 pages
    pfns = struct.pack("<8I", *range(0x40, 0x48))  # pages inside the data area
    ops.data(0, DATA, pfns)
    ops.desc(0, 0, DATA, len(pfns), 0)
    ops.publish(0, 0)
    ops.kick(0)
    ops.data(1, DATA + 0x100, pfns)
    ops.desc(1, 0, DATA + 0x100, len(pfns), 0)
    ops.publish(1, 0)
    ops.kick(1)
    inflate = header(3, 0) + bytes(ops.out)
    ops = Ops()
    ops.desc(2, 0, DATA + 0x1000, 0x2000, WRITE)  # a free range reported
    ops.publish(2, 0)
    ops.kick(2)
    return {"inflate-deflate": inflate, "report": header(3, 2) + bytes(ops.out)}


VIRTIO_MEM_REGION = 128 << 20  # fuzz/src/virtio.rs


def virtio_mem_seeds() -> dict[str, bytes]:
    """PLUG two blocks, STATE, UNPLUG one, UNPLUG_ALL; then a host resize."""
    ops = Ops()
    for i, (kind, addr, blocks) in enumerate(
        [(0, VIRTIO_MEM_REGION, 2), (3, VIRTIO_MEM_REGION, 2), (1, VIRTIO_MEM_REGION, 1), (2, 0, 0)]
    ):
        request = struct.pack("<H6xQH6x", kind, addr, blocks)
        at = DATA + 0x100 * i
        ops.data(0, at, request)
        ops.desc(0, 2 * i, at, len(request), NEXT)
        ops.desc(0, 2 * i + 1, at + 0x40, 16, WRITE)
        ops.publish(0, 2 * i)
    ops.kick(0)
    ops.action(struct.pack("<I", 0x800))  # requested: 8 MiB
    # The first byte after the header: 4 blocks requested at start.
    return {"plug-state-unplug": header(3, 4) + bytes(ops.out)}


def pmem_seeds() -> dict[str, bytes]:
    ops = Ops()
    ops.data(0, DATA, struct.pack("<I", 0))  # FLUSH
    ops.desc(0, 0, DATA, 4, NEXT)
    ops.desc(0, 1, DATA + 0x100, 4, WRITE)
    ops.publish(0, 0)
    ops.kick(0)
    return {"flush": header(3, None) + bytes(ops.out)}


def watchdog_seeds() -> dict[str, bytes]:
    ops = Ops()
    for i in range(3):  # three pets, each a 1-byte device-writable buffer
        ops.desc(0, i, DATA + 8 * i, 1, WRITE)
        ops.publish(0, i)
        ops.kick(0)
    pets = header(3, None) + bytes(ops.out)
    ops = Ops()
    ops.desc(0, 0, DATA, 1, 0)  # read-only: not a pet
    ops.desc(0, 1, DATA, 0, WRITE)  # empty: not a pet
    ops.publish(0, 0)
    ops.publish(0, 1)
    ops.kick(0)
    return {"pets": pets, "not-pets": header(3, None) + bytes(ops.out)}


def console_seeds() -> dict[str, bytes]:
    ops = Ops()
    ops.data(1, DATA, b"hello\n")
    ops.desc(1, 0, DATA, 6, 0)
    ops.publish(1, 0)
    ops.kick(1)
    ops.desc(0, 0, DATA + 0x1000, 64, WRITE)
    ops.publish(0, 0)
    ops.action(bytes([5]) + b"typed")
    ops.kick(0)
    return {"tx-rx": header(4, None) + bytes(ops.out)}


# --- virtio-pci (fuzz/src/pci.rs) -------------------------------------------

LENS = {1: 0, 2: 1, 4: 2, 8: 3}
REGION = {"common": 0, "isr": 1, "device": 2, "notify": 3, "msix": 4, "pba": 5}


class Pci:
    """A virtio-pci driver's accesses, encoded as fuzz/src/pci.rs decodes them."""

    def __init__(self, device: int, bar32: bool = False) -> None:
        self.out = bytearray([device, 1 if bar32 else 0])

    def bar_write(self, region: str, offset: int, value: int, length: int) -> None:
        self.out += bytes([7, REGION[region]]) + struct.pack("<H", offset)
        self.out += bytes([LENS[length]]) + value.to_bytes(8, "little")[:length]

    def bar_read(self, region: str, offset: int, length: int) -> None:
        self.out += bytes([5, REGION[region]]) + struct.pack("<H", offset) + bytes([LENS[length]])

    def config_write(self, reg: int, offset: int, data: bytes) -> None:
        """ECAM write to slot 1 (the function)."""
        self.out += bytes([1, 1, 0]) + struct.pack("<H", 4 * reg + offset)
        self.out += bytes([LENS[len(data)]]) + data

    def config_read(self, reg: int, slot: int = 1) -> None:
        self.out += bytes([0, slot, 0]) + struct.pack("<H", 4 * reg) + bytes([LENS[4]])

    def port_read(self, slot: int, reg: int) -> None:
        """Configuration mechanism #1: address to 0xcf8, data from 0xcfc."""
        self.out += bytes([2]) + struct.pack("<I", 0x8000_0000 | slot << 11 | 4 * reg)
        self.out += bytes([3, 4, LENS[4]])

    def memory(self, addr: int, data: bytes) -> None:
        assert addr % 16 == 0 and len(data) < 256
        self.out += bytes([9]) + struct.pack("<H", addr // 16) + bytes([len(data)]) + data

    def run(self) -> None:
        self.out += bytes([10])


def pci_seed(device: int, queues: int, bar32: bool = False) -> bytes:
    p = Pci(device, bar32)
    for reg in range(0, 64):
        p.config_read(reg)
    for slot in (0, 1):
        p.port_read(slot, 0)
        p.port_read(slot, 2)
    # Memory space on, MSI-X enabled (capability at 0x40: control at +2).
    p.config_write(1, 0, bytes([0x06, 0]))
    p.config_write(0x40 // 4, 2, bytes([0, 0x80]))
    p.bar_write("common", 0x14, 0, 1)
    p.bar_write("common", 0x14, 3, 1)
    p.bar_write("common", 0x00, 0, 4)
    p.bar_read("common", 0x04, 4)
    p.bar_write("common", 0x00, 1, 4)
    p.bar_read("common", 0x04, 4)
    p.bar_write("common", 0x08, 0, 4)
    p.bar_write("common", 0x0C, 0x3000_0000, 4)
    p.bar_write("common", 0x08, 1, 4)
    p.bar_write("common", 0x0C, 1, 4)
    p.bar_write("common", 0x14, 0xB, 1)
    p.bar_read("common", 0x14, 1)
    p.bar_write("common", 0x10, 0, 2)  # config vector
    for q in range(queues):
        base = 0x1000 + 0x3000 * q
        p.bar_write("common", 0x16, q, 2)
        p.bar_write("common", 0x18, 16, 2)
        p.bar_write("common", 0x1A, q + 1, 2)
        p.bar_write("common", 0x20, base, 8)
        p.bar_write("common", 0x28, base + 0x1000, 4)
        p.bar_write("common", 0x2C, 0, 4)
        p.bar_write("common", 0x30, base + 0x2000, 8)
        p.bar_read("common", 0x1E, 2)
        p.bar_write("common", 0x1C, 1, 2)
        # MSI-X entry q + 1: address, data, unmasked.
        p.bar_write("msix", 16 * (q + 1), 0xFEE0_0000, 4)
        p.bar_write("msix", 16 * (q + 1) + 8, 0x40 + q, 4)
        p.bar_write("msix", 16 * (q + 1) + 12, 0, 4)
    p.bar_write("common", 0x14, 0xF, 1)
    # Queue 0: one writable 64-byte buffer at 0x10000.
    p.memory(0x1000, struct.pack("<QIHH", 0x10000, 64, 2, 0))
    p.memory(0x2000, struct.pack("<HHH", 0, 1, 0))
    p.bar_write("notify", 0, 0, 2)
    p.run()
    p.bar_read("isr", 0, 1)
    p.bar_read("device", 0, 4)
    p.bar_read("pba", 0, 8)
    p.bar_write("common", 0x14, 0, 1)
    return bytes(p.out)


# --- legacy devices (fuzz/src/legacy.rs) ------------------------------------

PORT_INDEX = {0x3F8: 0, 0x60: 1, 0x3C0: 2, 0x80: 3}


def port_write(port: int, offset: int, value: int) -> bytes:
    return bytes([2, PORT_INDEX[port], offset, value])


def port_read(port: int, offset: int) -> bytes:
    return bytes([0, PORT_INDEX[port], offset])


def legacy_seeds() -> dict[str, bytes]:
    uart = b"".join(
        [
            port_write(0x3F8, 3, 0x80),  # LCR: divisor latch
            port_write(0x3F8, 0, 0x01),
            port_write(0x3F8, 1, 0x00),
            port_write(0x3F8, 3, 0x03),  # 8N1
            port_write(0x3F8, 1, 0x0F),  # IER: every interrupt
            port_write(0x3F8, 4, 0x0B),  # MCR
            *[port_write(0x3F8, 0, c) for c in b"hello\n"],
            port_read(0x3F8, 5),  # LSR
            port_read(0x3F8, 2),  # IIR
            bytes([4, 0, 0, 5]) + b"typed",  # host input
            port_read(0x3F8, 5),
            *[port_read(0x3F8, 0) for _ in range(6)],
            port_write(0x3F8, 4, 0x10),  # loopback
            port_write(0x3F8, 0, 0x41),
            port_read(0x3F8, 0),
        ]
    )
    platform = b"".join(
        [
            *[port_write(0x80, 0, v) for v in (0x01, 0x7F)],
            port_read(0x60, 4),
            port_write(0x60, 4, 0x01),
            bytes([4, 0, 0, 0]),  # power button
            bytes([5, 0, 0, 0]),  # GED read
            port_write(0x3C0, 0, 5 << 2),
            port_write(0x3C0, 0, 5 << 2 | 1 << 5),  # S5: power off
            port_write(0x60, 4, 0xFE),  # i8042 reset
            port_write(0x3C0, 0, 1),  # ACPI reset
        ]
    )
    return {"uart": uart, "platform": platform}


# --- the TPM's CRB (fuzz/src/tpm.rs) -----------------------------------------

CRB_READ, CRB_WRITE, CRB_ANSWER = 0x41, 0x42, 0x40  # 4-byte accesses (op >> 5 == 2)
GET_RANDOM = bytes([0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16])


def crb_register(op: int, offset: int, value: int | None = None) -> bytes:
    data = b"" if value is None else struct.pack("<I", value)
    return bytes([op, 0, offset]) + data


def crb_buffer(op: int, offset: int, data: bytes = b"") -> bytes:
    return bytes([op, 2]) + struct.pack("<H", offset) + data


def tpm_seeds() -> dict[str, bytes]:
    def session(answer: bytes) -> bytes:
        return b"".join(
            [
                struct.pack("<H", 0xF80),  # the backend's limit
                crb_register(CRB_WRITE, 0x08, 1),  # request locality 0
                crb_register(CRB_WRITE, 0x40, 1),  # cmdReady
                *[crb_buffer(CRB_WRITE, i, GET_RANDOM[i : i + 4]) for i in range(0, 12, 4)],
                crb_register(CRB_WRITE, 0x4C, 1),  # START
                crb_register(CRB_READ, 0x4C),
                bytes([CRB_ANSWER, 0, 0]) + answer,
                *[crb_buffer(CRB_READ, i) for i in range(0, 28, 4)],
                crb_register(CRB_READ, 0x44),  # CTRL_STS
                crb_register(CRB_WRITE, 0x40, 2),  # goIdle
                crb_register(CRB_WRITE, 0x08, 2),  # relinquish
            ]
        )

    response = bytes([0x80, 0x01, 0, 0, 0, 28, 0, 0, 0, 0, 0, 16]) + bytes(range(16))
    return {
        "getrandom": session(bytes([0]) + struct.pack("<H", len(response)) + response),
        "failure": session(bytes([1])),
        "oversized-command": struct.pack("<H", 0xF80) + bytes([0x44, 0, 0]) + b"\xff\xff",
    }


# --- kernels (fuzz/src/boot.rs) ---------------------------------------------


def elf(pvh: bool) -> bytes:
    code = b"\xf4" * 16  # hlt
    phnum = 2 if pvh else 1
    phoff = 64
    note_off = phoff + 56 * phnum
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000 + 0x100)
    code_off = 0x100
    image = bytearray(code_off + len(code))
    entry = 0x100000 + code_off
    image[0:64] = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    )
    load = struct.pack(
        "<IIQQQQQQ", 1, 7, 0, 0x100000, 0x100000, len(image), len(image) + 0x1000, 0x1000
    )
    image[phoff : phoff + 56] = load
    if pvh:
        image[phoff + 56 : phoff + 112] = struct.pack(
            "<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4
        )
        image[note_off : note_off + len(note)] = note
    image[code_off:] = code
    return bytes(image)


def bzimage() -> bytes:
    setup_sects = 1
    payload = b"\xf4" * 0x200
    image = bytearray(512 * (setup_sects + 1)) + payload
    image[0x1F1] = setup_sects
    struct.pack_into("<I", image, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)  # version
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x230, 0x200000)  # kernel_alignment
    image[0x234] = 1  # relocatable
    struct.pack_into("<H", image, 0x236, 0x3)  # xloadflags: KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", image, 0x260, 0x10000)  # init_size
    return bytes(image)


def snapshot_seeds() -> dict[str, bytes] | None:
    """A real snapshot's vCPU and platform state, each behind its selector byte
    (0, 1); None without /dev/kvm or an installed vmkit to take one."""
    import os
    import tempfile

    try:
        from vmkit import Vm, VmConfig, testguest
    except ImportError:
        return None
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None
    with tempfile.TemporaryDirectory() as directory:
        vm = Vm(VmConfig.from_cli([
            "--kernel", str(testguest.image_path("pvh")),
            "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=100, tick_ms=10),
            "--cpus", "boot=2", "--memory", "size=64M", "--serial", "null", "--console", "off",
        ]))  # fmt: skip
        try:
            vm.boot()
            vm.serial.wait_for("tick 2", timeout=30)
            vm.pause()
            vm.snapshot(directory)
        finally:
            vm.close()
        folder = Path(directory)
        vcpus = [(folder / f"vcpu-{i}").read_bytes() for i in range(2)]
        platform = (folder / "platform").read_bytes()
        # A migration's STATE frame: "VKMS", the vCPU count, each vCPU's and
        # the platform's state as length-prefixed blobs.
        state = struct.pack("<II", 0x534D4B56, len(vcpus))
        for blob in (*vcpus, platform):
            state += struct.pack("<I", len(blob)) + blob
        return {
            "vcpu-0": b"\x00" + vcpus[0],
            "vcpu-1": b"\x00" + vcpus[1],
            "platform": b"\x01" + platform,
            "state": b"\x02" + state,
        }


def main() -> None:
    corpora: dict[str, dict[str, bytes]] = {}
    corpora["option_string"] = {
        f"{kind:02d}-{i}": bytes([kind]) + text.encode()
        for kind, texts in enumerate(OPTION_EXAMPLES)
        for i, text in enumerate(texts)
    }
    corpora["cli"] = {f"cli-{i}": "\0".join(args).encode() for i, args in enumerate(CLI_EXAMPLES)}
    corpora["json_config"] = {
        f"config-{i}": json.dumps(c).encode() for i, c in enumerate(JSON_CONFIGS)
    }
    corpora["api_body"] = {
        f"body-{i}": bytes([kind]) + json.dumps(body).encode()
        for i, (kind, body) in enumerate(API_BODIES)
    }
    corpora["virtio_block"] = block_seeds()
    corpora["virtio_net"] = net_seeds()
    corpora["virtio_rng"] = rng_seeds()
    corpora["virtio_console"] = console_seeds()
    corpora["virtio_balloon"] = balloon_seeds()
    corpora["virtio_mem"] = virtio_mem_seeds()
    corpora["virtio_pmem"] = pmem_seeds()
    corpora["virtio_vsock"] = vsock_seeds()
    corpora["virtio_watchdog"] = watchdog_seeds()
    corpora["virtio_pci"] = {
        "rng": pci_seed(0, 1),
        "console": pci_seed(1, 2),
        "block-bar32": pci_seed(2, 2, bar32=True),
        "net": pci_seed(3, 5),
    }
    corpora["legacy_io"] = legacy_seeds()
    corpora["tpm_crb"] = tpm_seeds()
    corpora["boot_loader"] = {"pvh-elf": elf(True), "elf64": elf(False), "bzimage": bzimage()}
    snapshot = snapshot_seeds()
    if snapshot is None:
        print("snapshot_state: left as it is (taking a snapshot needs /dev/kvm and vmkit)")
    else:
        corpora["snapshot_state"] = snapshot
    for target, seeds in corpora.items():
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
