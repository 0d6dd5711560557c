"""Guest NUMA (``--numa``): the ACPI SRAT and SLIT, and each PCI host bridge's
``_PXM``, as the guest finds them, beside the real Cloud Hypervisor where it is
at hand.

The guest's ``numa`` step prints every SRAT entry (``srat cpu ...``,
``srat mem ...``), every SLIT row (``slit <i>: ...``) and each host bridge's
``_PXM`` (``dsdt pxm dev=PCxx node=<n>``); see guest/README.md.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _chpeer import CH_DIR, CH_MISSING, ch_binary
from vmkit import VmConfig, testguest
from vmkit.pytest_plugin import VmFactory
from vmkit.vm import Vm, VmError

pytestmark = pytest.mark.vmkit_kvm  # skips, saying why, without /dev/kvm

MIB = 1 << 20
GIB = 1 << 30

# Two nodes: zone b reaches the 32-bit MMIO hole at 3 GiB (so it is split
# around it), the distances differ each way (a transposed SLIT shows), and
# PCI segment 1 belongs to node 1.
TWO_NODES = (
    "--cpus", "boot=4",
    "--memory", "size=0",
    "--memory-zone", "id=a,size=64M", "id=b,size=3G",
    "--platform", "num_pci_segments=2",
    "--numa",
    "guest_numa_id=0,cpus=[0,1],distances=[1@15],memory_zones=[a]",
    "guest_numa_id=1,cpus=[2,3],distances=[0@25],memory_zones=[b],pci_segments=[1]",
)  # fmt: skip

# What the guest must report for TWO_NODES, worked out from the ACPI spec and
# the layout (RAM from 0, zones in turn, the hole [3 GiB, 4 GiB) skipped).
TWO_NODES_SEEN = [
    f"srat mem base=0x0 len={64 * MIB:#x} node=0 flags=0x1",
    "srat cpu type=2 apic=0 node=0 flags=0x1",
    "srat cpu type=2 apic=1 node=0 flags=0x1",
    f"srat mem base={64 * MIB:#x} len={3 * GIB - 64 * MIB:#x} node=1 flags=0x1",
    f"srat mem base={4 * GIB:#x} len={64 * MIB:#x} node=1 flags=0x1",
    "srat cpu type=2 apic=2 node=1 flags=0x1",
    "srat cpu type=2 apic=3 node=1 flags=0x1",
    "slit 0: 10 15",
    "slit 1: 25 10",
    "dsdt pxm dev=PC00 node=0",
    "dsdt pxm dev=PC01 node=1",
    "step numa ok cpus=4 mems=3 localities=2 bridges=2",
]

# Three nodes, ids out of order: the `--memory size=` RAM as v37's "mem0", a
# node without memory, a vCPU listed twice and one the VM does not have,
# distances left out (20) and one to the node itself (the SLIT keeps 10).
THREE_NODES = (
    "--cpus", "boot=2",
    "--memory", "size=128M",
    "--numa",
    "guest_numa_id=2,cpus=[1,1,7],distances=[0@40]",
    "guest_numa_id=0,cpus=[0],memory_zones=[mem0],distances=[2@30]",
    "guest_numa_id=1,distances=[1@50]",
)  # fmt: skip

THREE_NODES_SEEN = [
    f"srat mem base=0x0 len={128 * MIB:#x} node=0 flags=0x1",
    "srat cpu type=2 apic=0 node=0 flags=0x1",
    "srat cpu type=2 apic=1 node=2 flags=0x1",
    "srat cpu type=2 apic=1 node=2 flags=0x1",
    "srat cpu type=2 apic=7 node=2 flags=0x1",
    "slit 0: 10 20 30",
    "slit 1: 20 10 20",
    "slit 2: 40 20 10",
    "dsdt pxm dev=PC00 node=0",
    "step numa ok cpus=4 mems=1 localities=3 bridges=1",
]

SHOWN = ("vmkit-guest: srat ", "vmkit-guest: slit ", "vmkit-guest: dsdt ", "vmkit-guest: step numa")


def guest_args(steps: list[str], *options: str) -> list[str]:
    return [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff"),
        "--serial", "tty", "--console", "off",
        *options,
    ]  # fmt: skip


def numa_lines(text: str) -> list[str]:
    return [
        line.removeprefix("vmkit-guest: ") for line in text.splitlines() if line.startswith(SHOWN)
    ]


def run_vmm(kind: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs ``cloud-hypervisor`` or ``python -m vmkit`` with ``args`` to its end."""
    argv = [ch_binary("cloud-hypervisor")] if kind == "ch" else [sys.executable, "-m", "vmkit"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("options", "seen"), [(TWO_NODES, TWO_NODES_SEEN), (THREE_NODES, THREE_NODES_SEEN)]
)
def test_the_guest_finds_the_configured_topology(
    options: tuple[str, ...], seen: list[str], vmkit_vm: VmFactory
) -> None:
    config = VmConfig.from_cli(guest_args(["acpi", "numa"], *options))
    vm = vmkit_vm(config)
    vm.boot()
    exit_info = vm.wait(30)
    text = vm.serial.text
    vm.close()
    assert exit_info is not None and exit_info.reason == "poweroff", text
    assert "tables=XSDT,FACP,APIC,MCFG,SRAT,SLIT,DSDT " in text, text
    assert numa_lines(text) == seen


def test_srat_apic_ids_are_the_vcpus_apic_ids(vmkit_vm: VmFactory) -> None:
    # 3 cores need 2 bits of the APIC id, so the second package starts at 4:
    # the SRAT must name the ids the vCPUs really have (the smp step starts them).
    config = VmConfig.from_cli(
        guest_args(
            ["smp", "numa"],
            "--cpus", "boot=6,topology=1:3:1:2",
            "--memory", "size=0",
            "--memory-zone", "id=a,size=64M", "id=b,size=64M",
            "--numa",
            "guest_numa_id=0,cpus=[0-2],memory_zones=[a]",
            "guest_numa_id=1,cpus=[3-5],memory_zones=[b]",
        )
    )  # fmt: skip
    vm = vmkit_vm(config)
    vm.boot()
    exit_info = vm.wait(30)
    text = vm.serial.text
    vm.close()
    assert exit_info is not None and exit_info.reason == "poweroff", text
    assert "step smp ok cpus=6" in text, text
    started = sorted(
        int(line.split("apic_id=")[1].split()[0]) for line in text.splitlines() if " up" in line
    )
    cpus = [line.split()[3:5] for line in numa_lines(text) if line.startswith("srat cpu")]
    assert cpus == [
        ["apic=0", "node=0"],
        ["apic=1", "node=0"],
        ["apic=2", "node=0"],
        ["apic=4", "node=1"],
        ["apic=5", "node=1"],
        ["apic=6", "node=1"],
    ]
    assert started == [1, 2, 4, 5, 6], "the APs the SRAT names are the ones that came up"


def test_without_numa_there_is_no_srat_or_slit(vmkit_vm: VmFactory) -> None:
    config = VmConfig.from_cli(guest_args(["acpi", "numa"], "--memory", "size=64M"))
    vm = vmkit_vm(config)
    vm.boot()
    vm.wait(30)
    text = vm.serial.text
    vm.close()
    assert "tables=XSDT,FACP,APIC,MCFG,DSDT " in text, text
    assert "step numa fail no SRAT" in text, text


@pytest.mark.parametrize(
    ("numa", "reason"),
    [
        (["guest_numa_id=0", "guest_numa_id=0"], "NUMA node 0 is defined twice"),
        (["guest_numa_id=0,memory_zones=[b]"], "NUMA node 0: unknown memory zone 'b'"),
        (["guest_numa_id=0,distances=[3@20]"], "NUMA node 0: unknown destination NUMA node 3"),
        (
            ["guest_numa_id=0,distances=[1@20,1@30]", "guest_numa_id=1"],
            "NUMA node 0: the distance to NUMA node 1 is given twice",
        ),
    ],
)
def test_what_v37_refuses_at_boot_is_refused_with_its_reason(numa: list[str], reason: str) -> None:
    config = VmConfig.from_cli(guest_args(["numa"], "--memory", "size=64M", "--numa", *numa))
    with pytest.raises(VmError) as caught:
        Vm(config)
    assert caught.value.kind == "Config"
    assert str(caught.value) == f"--numa: {reason} (InvalidNumaConfig)"


def test_sgx_epc_sections_are_refused_as_not_supported() -> None:
    config = VmConfig.from_cli(
        guest_args(["numa"], "--numa", "guest_numa_id=0,sgx_epc_sections=[epc0]")
    )
    with pytest.raises(VmError) as caught:
        Vm(config)
    assert caught.value.kind == "Unsupported"
    assert str(caught.value) == "--numa sgx_epc_sections is not supported yet"


def test_tables_too_large_for_the_acpi_area_fail_the_boot_clearly() -> None:
    # 80 nodes listing 255 vCPUs each: an SRAT of 48 + 80 * 255 * 24 bytes,
    # more than the 384 KiB from 0xa0000 to 1 MiB.
    nodes = [f"guest_numa_id={n},cpus=[0-254]" for n in range(80)]
    config = VmConfig.from_cli(guest_args(["numa"], "--memory", "size=64M", "--numa", *nodes))
    with Vm(config) as vm, pytest.raises(VmError) as caught:
        vm.boot()
    assert caught.value.kind == "Memory"
    message = str(caught.value)
    assert message.startswith(
        "The ACPI tables do not fit below 1 MiB: the SRAT (489648 bytes) would end at 0x"
    ), message
    assert message.endswith(", past 0x100000"), message


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
@pytest.mark.parametrize("options", [TWO_NODES, THREE_NODES], ids=["two-nodes", "three-nodes"])
def test_cloud_hypervisor_gives_the_guest_the_same_tables(options: tuple[str, ...]) -> None:
    outputs = {}
    for kind in ("ch", "vmkit"):
        result = run_vmm(kind, guest_args(["acpi", "numa"], *options))
        assert result.returncode == 0, (kind, result.stdout, result.stderr)
        outputs[kind] = numa_lines(result.stdout)
        tables = [line for line in result.stdout.splitlines() if "step acpi ok" in line]
        assert len(tables) == 1 and "tables=XSDT,FACP,APIC,MCFG,SRAT,SLIT,DSDT " in tables[0]
    assert outputs["vmkit"] == outputs["ch"]
    assert outputs["vmkit"] == (TWO_NODES_SEEN if options == TWO_NODES else THREE_NODES_SEEN)


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
def test_cloud_hypervisor_writes_no_srat_without_numa_either() -> None:
    outputs = {}
    for kind in ("ch", "vmkit"):
        result = run_vmm(kind, guest_args(["acpi", "numa"], "--memory", "size=64M"))
        assert result.returncode == 0, (kind, result.stderr)
        outputs[kind] = [
            line.removeprefix("vmkit-guest: ")
            for line in result.stdout.splitlines()
            if line.startswith("vmkit-guest: step ")
        ]
    assert outputs["vmkit"] == outputs["ch"]
    assert outputs["vmkit"] == [
        "step acpi ok rsdp=0xa0000 tables=XSDT,FACP,APIC,MCFG,DSDT cpus=1 max_cpus=1",
        "step numa fail no SRAT",
    ]


@pytest.mark.skipif(CH_DIR is None, reason=CH_MISSING)
@pytest.mark.parametrize(
    "numa",
    [
        ["guest_numa_id=0", "guest_numa_id=0"],
        ["guest_numa_id=0,memory_zones=[b]"],
        ["guest_numa_id=0,distances=[3@20]"],
        ["guest_numa_id=0,distances=[1@20,1@30]", "guest_numa_id=1"],
        ["guest_numa_id=0,sgx_epc_sections=[epc0]"],
    ],
)
def test_cloud_hypervisor_refuses_the_same_configs(numa: list[str]) -> None:
    args = guest_args(["numa"], "--memory", "size=64M", "--numa", *numa)
    ch, vmkit = run_vmm("ch", args), run_vmm("vmkit", args)
    assert ch.returncode == vmkit.returncode == 1, (ch.stderr, vmkit.stderr)
    assert "Error booting VM: VmBoot(InvalidNumaConfig)" in ch.stderr
    assert "vmkit-guest" not in ch.stdout + vmkit.stdout, "neither VMM started the guest"
    last = vmkit.stderr.strip().splitlines()[-1]
    assert last.startswith("Error booting VM: --numa")
    assert last.endswith(("(InvalidNumaConfig)", "--numa sgx_epc_sections is not supported yet"))
