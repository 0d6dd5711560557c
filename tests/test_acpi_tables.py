"""The ACPI tables as the guest finds them, checked by ACPICA (acpica-tools):
every table disassembles with ``iasl -d`` and compiles back without errors,
and ``acpiexec`` (the AML interpreter Linux uses) loads the DSDT and
evaluates every device's objects and the GED's ``_EVT`` without errors.

The tables come out of a snapshot of the running test guest (tests/_acpi.py),
so they are the bytes the guest reads, for each configuration below.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _acpi import (
    ACPICA_MISSING,
    ACPIEXEC,
    IASL,
    AcpiTableError,
    Tables,
    acpiexec,
    acpiexec_all,
    disassemble,
    dumped_tables,
    guest_tables,
    namespace,
    parse_tables,
    recompile,
    tables_from_dump,
)
from _chpeer import CH_DIR, CH_MISSING, ch_binary
from _swtpm import SWTPM, SWTPM_MISSING, Swtpm
from vmkit import VmConfig, testguest

pytestmark = [
    pytest.mark.vmkit_kvm,  # skips, saying why, without /dev/kvm
    pytest.mark.skipif(IASL is None or ACPIEXEC is None, reason=ACPICA_MISSING),
]

# Each configuration changes what the tables hold: the MADT's vCPUs, the
# host bridges and MCFG entries, the SRAT/SLIT and the bridges' _PXM, the
# TPM device and TPM2 table.
CONFIGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "cpus-boot2-max4": ("--cpus", "boot=2,max=4"),
    # The most vCPUs v37 takes: the largest CPU hot-plug AML.
    "cpus-max255": ("--cpus", "boot=1,max=255"),
    "two-pci-segments": ("--platform", "num_pci_segments=2"),
    "numa": (
        "--cpus", "boot=2",
        "--memory", "size=0",
        "--memory-zone", "id=a,size=64M", "id=b,size=64M",
        "--platform", "num_pci_segments=2",
        "--numa",
        "guest_numa_id=0,cpus=[0],distances=[1@15],memory_zones=[a]",
        "guest_numa_id=1,cpus=[1],distances=[0@25],memory_zones=[b],pci_segments=[1]",
    ),
    "tpm": ("--tpm", "socket={tpm}"),
    # ACPI memory hot-plug: the controller's region and methods, 8 slots.
    "memory-hotplug": ("--memory", "size=64M,hotplug_size=1G"),
}  # fmt: skip

SIGNATURES = {
    "default": ["XSDT", "FACP", "DSDT", "APIC", "MCFG"],
    "cpus-boot2-max4": ["XSDT", "FACP", "DSDT", "APIC", "MCFG"],
    "cpus-max255": ["XSDT", "FACP", "DSDT", "APIC", "MCFG"],
    "two-pci-segments": ["XSDT", "FACP", "DSDT", "APIC", "MCFG"],
    "numa": ["XSDT", "FACP", "DSDT", "APIC", "MCFG", "SRAT", "SLIT"],
    "tpm": ["XSDT", "FACP", "DSDT", "APIC", "MCFG", "TPM2"],
    "memory-hotplug": ["XSDT", "FACP", "DSDT", "APIC", "MCFG"],
}

# Configurations vmkit cannot snapshot: the guest prints its tables instead.
NOT_SNAPSHOTTED = ("tpm", "memory-hotplug")

# Warnings the ASL compiler gives for the disassembled DSDT that are not
# faults. 3073 "Multiple types": each PCI host bridge has both _HID and
# _ADR; Cloud Hypervisor v37's bridges have both too (Linux ignores the
# _ADR of a device with a _HID), so vmkit keeps them as v37 writes them.
HARMLESS_WARNINGS = {3073: "Device object requires either a _HID or _ADR, but not both"}
# Remarks that are not faults. 2173 "Creation of named objects within a
# method": v37's MCRS builds its MR64 template inside the method, and vmkit
# writes the memory hot-plug AML as v37 does (test_the_memory_hotplug_aml_is_
# cloud_hypervisor_s); only a hot-plug area's DSDT has it.
HARMLESS_REMARKS = {2173: "Creation of named objects within a method is highly inefficient"}

# The objects of a device that the OS evaluates while enumerating it.
MAX_VCPUS = {"cpus-boot2-max4": 4, "cpus-max255": 255, "numa": 2}

DEVICE_OBJECTS = ("_HID", "_CID", "_UID", "_ADR", "_SEG", "_BBN", "_STA", "_CRS", "_PXM", "_MAT")


@dataclasses.dataclass
class GuestTables:
    name: str
    tables: Tables
    paths: dict[str, Path]
    folder: Path


def _boot_args(options: tuple[str, ...], dump: bool = False) -> list[str]:
    # Without `dump`, ticks for far longer than a test: the guest is running
    # when paused.
    steps = ["acpidump"] if dump else ["ticks"]
    return [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(steps, "poweroff", ticks=100000, tick_ms=20),
        "--serial", "tty", "--console", "off",
        *(() if "--memory" in options else ("--memory", "size=64M")),
        *options,
    ]  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def guest(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestTables]:
    name: str = request.param
    folder = tmp_path_factory.mktemp(name)
    options = CONFIGS[name]
    if name == "tpm":
        if SWTPM is None:
            pytest.skip(SWTPM_MISSING)
        # vmkit cannot snapshot a VM with a TPM: the guest prints its tables.
        with Swtpm(folder / "swtpm") as tpm:
            options = tuple(o.format(tpm=tpm.socket) for o in options)
            tables = dumped_tables(VmConfig.from_cli(_boot_args(options, dump=True)))
    elif name in NOT_SNAPSHOTTED:
        tables = dumped_tables(VmConfig.from_cli(_boot_args(options, dump=True)))
    else:
        tables = guest_tables(VmConfig.from_cli(_boot_args(options)), folder)
    yield GuestTables(name, tables, tables.write(folder / "tables"), folder)


def test_the_tables_are_those_of_the_configuration(guest: GuestTables) -> None:
    # parse_tables already checked every checksum and pointer.
    assert list(guest.tables.by_signature) == SIGNATURES[guest.name]


# A VM with a TPM cannot be snapshotted: its tables come from the guest already.
@pytest.mark.parametrize(
    "guest", [name for name in CONFIGS if name not in NOT_SNAPSHOTTED], indirect=True
)
def test_the_guest_reads_the_tables_the_snapshot_holds(guest: GuestTables) -> None:
    dumped = dumped_tables(VmConfig.from_cli(_boot_args(CONFIGS[guest.name], dump=True)))
    assert dumped.addresses == guest.tables.addresses
    assert dumped.by_signature == guest.tables.by_signature


def test_every_table_disassembles_and_compiles_back_without_errors(guest: GuestTables) -> None:
    for signature, path in guest.paths.items():
        result = disassemble(path)
        assert result.returncode == 0 and not result.messages, (signature, result.output)
        assert f'"{signature}"' in result.dsl or f"[{signature}]" in result.dsl, signature
        compiled = recompile(result.dsl, guest.folder / "recompiled", signature.lower())
        assert compiled.returncode == 0 and not compiled.of_kind("Error"), compiled.output
        warnings = {m.code: m.text for m in compiled.of_kind("Warning")}
        if signature == "DSDT":
            unexpected = {c: t for c, t in warnings.items() if c not in HARMLESS_WARNINGS}
            assert not unexpected, compiled.output
        else:
            assert not warnings, compiled.output
        remarks = [m for m in compiled.of_kind("Remark") if m.code not in HARMLESS_REMARKS]
        assert not remarks, compiled.output


def test_the_madt_lists_every_possible_vcpu(guest: GuestTables) -> None:
    madt = disassemble(guest.paths["APIC"]).dsl
    enabled = re.findall(r"Processor Enabled : (\d)", madt)
    online_capable = re.findall(r"Runtime Online Capable : (\d)", madt)
    boot = {"cpus-boot2-max4": 2, "numa": 2}.get(guest.name, 1)
    possible = MAX_VCPUS.get(guest.name, 1)
    # The vCPUs not running at boot are the ones `vm.resize` can add.
    assert enabled == ["1"] * boot + ["0"] * (possible - boot), madt
    assert online_capable == ["0"] * boot + ["1"] * (possible - boot), madt


# The CPU hot-plug controller's status byte (devices/cpu_hotplug.rs, Cloud
# Hypervisor's bits): acpiexec reads the `fill` value from the register.
CPEN, CINS, CRMV = 0x01, 0x02, 0x04
DEVICE_CHECK, EJECT_REQUEST = 1, 3


def test_the_cpu_hotplug_methods_evaluate_as_cloud_hypervisor_s(guest: GuestTables) -> None:
    dsdt = [guest.paths["DSDT"]]
    possible = MAX_VCPUS.get(guest.name, 1)
    cpus = [f"C{i:03X}" for i in range(possible)]
    objects = namespace(dsdt)
    for method in ("CSTA", "CTFY", "CEJ0", "CSCN"):
        assert objects.get(f"\\_SB_.CPUS.{method}") == "Method", method
    for name in ("CPLK", "CSEL", "CPEN", "CINS", "CRMV", "CEJ0"):
        assert f"\\_SB_.PRES.{name}" in objects, name
    assert sorted(p for p, k in objects.items() if re.fullmatch(r"\\_SB_\.CPUS\.C...", p)
                  and k == "Device") == [f"\\_SB_.CPUS.{c}" for c in cpus]  # fmt: skip

    last = cpus[-1]
    # (register value the AML reads, the call), all run at once.
    jobs = [
        (CPEN, "\\_SB_.CPUS.CSCN"),
        (CPEN | CINS, "\\_SB_.CPUS.CSCN"),
        (CPEN | CRMV, "\\_SB_.CPUS.CSCN"),
        (CPEN | CINS | 0x01, "\\_SB_.GED_._EVT 5"),
        (0x08, "\\_SB_.GED_._EVT 5"),
        (CPEN, f"\\_SB_.CPUS.{last}._EJ0 1"),
        (CPEN, f"\\_SB_.CPUS.{last}._STA"),
        (0, f"\\_SB_.CPUS.{last}._STA"),
    ]
    runs = acpiexec_all([(dsdt, [f"evaluate {call}"], fill) for fill, call in jobs])
    for result in runs:
        assert not result.load_problems, result.output
        for evaluation in result.evaluations:
            assert not evaluation.problems, (evaluation, result.output)
    scan, inserting, removing, ged_cpu, ged_button, eject, enabled, absent = runs
    # A scan with nothing inserted or removed notifies nothing; one with
    # every vCPU inserting (or removing) notifies each, with 1 (or 3).
    assert scan.notifies == []
    assert inserting.notifies == [(c, DEVICE_CHECK) for c in cpus]
    assert removing.notifies == [(c, EJECT_REQUEST) for c in cpus]
    # The GED's CPU bit (bit 0) runs the scan; the power button's alone does not.
    # (The same fill sets the memory bit: with memory slots, they are notified too.)
    assert [n for n in ged_cpu.notifies if n[0][0] == "C"] == [(c, DEVICE_CHECK) for c in cpus]
    assert ged_button.notifies == [("PWRB", 0x80)]
    # _EJ0 runs; _STA is 0xF for an enabled vCPU, 0 otherwise.
    assert eject.notifies == []
    for result, sta in ((enabled, "000000000000000F"), (absent, "0000000000000000")):
        assert result[f"\\_SB_.CPUS.{last}._STA"].returned == f"[Integer] = {sta}", result.output


# GED bit 2 (Cloud Hypervisor's PCI_DEVICES_CHANGED) runs \_SB_.PHPR.PSCN.
GED_PCI = 0x04
SEGMENTS = {"two-pci-segments": 2, "numa": 2}


def test_the_pci_hotplug_methods_evaluate_as_cloud_hypervisor_s(guest: GuestTables) -> None:
    dsdt = [guest.paths["DSDT"]]
    bridges = [f"\\_SB_.PC{i:02X}" for i in range(SEGMENTS.get(guest.name, 1))]
    objects = namespace(dsdt)
    for name in ("BLCK", "PCIU", "PCID", "B0EJ", "PSEG"):
        assert f"\\_SB_.PHPR.{name}" in objects, name
    assert objects.get("\\_SB_.PHPR.PCEJ") == objects.get("\\_SB_.PHPR.PSCN") == "Method"
    for bridge in bridges:
        assert objects.get(f"{bridge}.PCNT") == objects.get(f"{bridge}.DVNT") == "Method"
        slot = re.compile(re.escape(bridge) + r"\.S\d{3}")
        slots = sorted(p for p, k in objects.items() if slot.fullmatch(p) and k == "Device")
        assert slots == [f"{bridge}.S{i:03}" for i in range(32)], slots
    # acpiexec backs every register with `fill` bytes: PCIU and PCID read
    # 0x04040404 with fill 4 (slots 2, 10, 18 and 26 added and to remove).
    first = bridges[0]
    jobs = [
        (GED_PCI, "\\_SB_.GED_._EVT 5"),
        (0x00, "\\_SB_.GED_._EVT 5"),
        (0x00, f"{first}.PCNT"),
        (0x00, f"{first}.S003._EJ0 1"),
        (0x00, f"{first}.S003._ADR"),
        (0x00, f"{first}.S031._SUN"),
    ]
    runs = acpiexec_all([(dsdt, [f"evaluate {call}"], fill) for fill, call in jobs])
    for result in runs:
        assert not result.load_problems, result.output
        for evaluation in result.evaluations:
            assert not evaluation.problems, (evaluation, result.output)
    scan, quiet, pcnt, eject, adr, sun = runs
    slots = [f"S{i:03}" for i in (2, 10, 18, 26)]
    per_segment = [(s, DEVICE_CHECK) for s in slots] + [(s, EJECT_REQUEST) for s in slots]
    # (Sorted: ACPICA delivers notifications on threads of its own.)
    assert scan.notifies == sorted(per_segment * len(bridges)), scan.output
    assert quiet.notifies == pcnt.notifies == eject.notifies == []
    assert adr[f"{first}.S003._ADR"].returned == "[Integer] = 0000000000030000", adr.output
    assert sun[f"{first}.S031._SUN"].returned == "[Integer] = 000000000000001F", sun.output


def test_each_vcpu_s_mat_is_its_madt_entry_enabled(guest: GuestTables) -> None:
    madt = guest.tables.by_signature["APIC"]
    entries = []
    at = 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        if kind in (0, 9):
            entries.append(bytearray(madt[at : at + length]))
        at += length
    calls = [f"evaluate \\_SB_.CPUS.C{i:03X}._MAT" for i in range(len(entries))]
    result = acpiexec([guest.paths["DSDT"]], calls)
    for index, entry in enumerate(entries):
        flags_at = 4 if entry[0] == 0 else 8
        entry[flags_at : flags_at + 4] = (1).to_bytes(4, "little")
        returned = result[f"\\_SB_.CPUS.C{index:03X}._MAT"].returned
        # "[Buffer] Length 08 =     0000: 00 08 01 01 01 00 00 00  // ..."
        hex_bytes = re.findall(r"\b[0-9A-F]{4}: ((?:[0-9A-F]{2} )+)", returned)
        assert bytes.fromhex("".join(hex_bytes)) == bytes(entry), result.output


def test_every_device_object_evaluates_without_errors(guest: GuestTables) -> None:
    dsdt = [guest.paths["DSDT"]]
    objects = namespace(dsdt)
    devices = [path for path, kind in objects.items() if kind == "Device" and path != "\\_SB_"]
    expected_devices = {"\\_SB_.COM1", "\\_SB_.PS2K", "\\_SB_.PC00", "\\_SB_.MBRD", "\\_SB_.GED_",
                        "\\_SB_.PWRB"}  # fmt: skip
    expected_devices |= {"\\_SB_.PRES", "\\_SB_.CPUS", "\\_SB_.MHPC", "\\_SB_.PHPR"}
    if guest.name == "memory-hotplug":
        expected_devices |= {f"\\_SB_.MHPC.M{i:03}" for i in range(8)}
    expected_devices |= {f"\\_SB_.CPUS.C{i:03X}" for i in range(MAX_VCPUS.get(guest.name, 1))}
    if guest.name in ("two-pci-segments", "numa"):
        expected_devices.add("\\_SB_.PC01")
    if guest.name == "tpm":
        expected_devices.add("\\TPM2")
    assert expected_devices <= set(devices), devices
    # The vCPU devices differ only in their index: with many, the first
    # few and the last stand for them (each acpiexec run takes ~1 s here).
    cpus = sorted(d for d in devices if re.fullmatch(r"\\_SB_\.CPUS\.C...", d))
    devices = [d for d in devices if d not in cpus[4:-1]]
    # So do the PCI hot-plug slots (S000..S031 of each bridge).
    slots = [d for d in devices if re.fullmatch(r"\\_SB_\.PC..\.S\d{3}", d)]
    devices = [d for d in devices if d not in slots or d.endswith(("S000", "S001", "S031"))]
    calls = [f"{d}.{o}" for d in devices for o in DEVICE_OBJECTS if f"{d}.{o}" in objects]
    run = acpiexec(dsdt, [f"evaluate {call}" for call in calls])
    assert not run.load_problems, run.output
    assert [e.path for e in run.evaluations] == calls, run.output
    for evaluation in run.evaluations:
        assert not evaluation.problems, (evaluation, run.output)
        assert evaluation.returned, (evaluation, run.output)
    if guest.name == "numa":
        assert run["\\_SB_.PC01._PXM"].returned == "[Integer] = 0000000000000001"
        assert run["\\_SB_.PC00._PXM"].returned == "[Integer] = 0000000000000000"
    if guest.name == "tpm":
        assert run["\\TPM2._STA"].returned == "[Integer] = 000000000000000F"
    if guest.name == "numa":
        # vCPU 1 is in node 1.
        assert run["\\_SB_.CPUS.C001._PXM"].returned == "[Integer] = 0000000000000001"
        assert run["\\_SB_.CPUS.C000._PXM"].returned == "[Integer] = 0000000000000000"


def test_the_ged_event_notifies_the_power_button_only_for_its_bit(guest: GuestTables) -> None:
    # acpiexec backs the GED's register with a buffer filled with `fill`:
    # the value the VMM's register would read.
    dsdt = [guest.paths["DSDT"]]
    call = ["evaluate \\_SB_.GED_._EVT 5"]
    # Bit 0 (vCPUs changed), bit 1 (memory changed) and bit 2 (PCI devices
    # changed) have their own tests; with no hot-plug area, bit 1's scan is a
    # stub that notifies nothing.
    fills = (0x08, 0x00, 0xF2) if guest.name != "memory-hotplug" else (0x08, 0x00, 0xF0)
    pressed, *quiet = acpiexec_all([(dsdt, call, fill) for fill in fills])
    assert not pressed.load_problems, pressed.output
    assert pressed["\\_SB_.GED_._EVT"].problems == [], pressed.output
    assert pressed.notifies == [("PWRB", 0x80)], pressed.output
    for run in quiet:
        assert run["\\_SB_.GED_._EVT"].problems == [], run.output
        assert run.notifies == [], run.output


@pytest.mark.parametrize("guest", ["default"], indirect=True)
def test_the_harness_reports_what_acpica_rejects(guest: GuestTables, tmp_path: Path) -> None:
    # The checks above can fail: a broken checksum, an undefined name, AML
    # that does not parse are each reported.
    dsdt = guest.paths["DSDT"]
    run = acpiexec([dsdt], ["evaluate \\_SB_.NONE", "evaluate \\_SB_.GED_._EVT"])
    assert any("AE_NOT_FOUND" in p for p in run["\\_SB_.NONE"].problems), run.output
    assert any("Insufficient arguments" in p for p in run["\\_SB_.GED_._EVT"].problems)
    memory = bytearray(0x100000)
    for signature, address in guest.tables.addresses.items():
        data = guest.tables.by_signature[signature]
        memory[address : address + len(data)] = data
    memory[0xA0000 : 0xA0000 + 36] = _rsdp(guest.tables.addresses["XSDT"])
    assert list(parse_tables(bytes(memory)).by_signature) == SIGNATURES["default"]
    broken = bytearray(memory)
    broken[guest.tables.addresses["DSDT"] + 40] ^= 1
    with pytest.raises(AcpiTableError, match=r"DSDT.* bad checksum"):
        parse_tables(bytes(broken))
    # A method whose body is cut short: the disassembler says so.
    cut = bytearray(guest.tables.by_signature["DSDT"])
    evt = cut.index(b"_EVT")
    cut[evt + 5 :] = b"\xff" * (len(cut) - evt - 5)
    cut[9] = 0
    cut[9] = (-sum(cut)) % 256
    (tmp_path / "cut.dat").write_bytes(bytes(cut))
    result = disassemble(tmp_path / "cut.dat")
    compiled = recompile(result.dsl, tmp_path / "recompiled", "cut")
    assert result.messages or compiled.of_kind("Error") or compiled.returncode != 0, (
        result.output + compiled.output
    )


def _rsdp(xsdt_address: int) -> bytes:
    rsdp = bytearray(36)
    rsdp[:8] = b"RSD PTR "
    rsdp[9:15] = b"VMKIT "
    rsdp[15] = 2
    rsdp[20:24] = (36).to_bytes(4, "little")
    rsdp[24:32] = xsdt_address.to_bytes(8, "little")
    rsdp[8] = (-sum(rsdp[:20])) % 256
    rsdp[32] = (-sum(rsdp)) % 256
    return bytes(rsdp)


def _asl_block(dsl: str, header: str) -> str:
    """The ASL from the line ``header`` starts on to its closing brace, with
    the indentation and comments iasl adds taken out."""
    lines = dsl.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == header)
    depth, block = 0, []
    for line in lines[start:]:
        text = line.split("//")[0].strip()
        block.append(text)
        depth += text.count("{") - text.count("}")
        if depth == 0 and "{" in "".join(block):
            break
    return "\n".join(block)


def test_the_cpu_hotplug_aml_is_cloud_hypervisor_s(tmp_path: Path) -> None:
    # The test guest prints the tables on both VMMs; the methods and the
    # vCPU devices must read the same (but the _MAT, whose entry follows
    # each VMM's MADT: v37 writes x2APIC entries, vmkit the MADT's own).
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["acpidump"], "poweroff"),
        "--cpus", "boot=2,max=4", "--memory", "size=64M", "--console", "off",
    ]  # fmt: skip
    ch = subprocess.run(
        [ch_binary("cloud-hypervisor"), *args, "--serial", "tty"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "step acpidump ok" in ch.stdout, ch.stdout + ch.stderr
    ch_tables = tables_from_dump(ch.stdout)
    ours = dumped_tables(VmConfig.from_cli([*args, "--serial", "tty"]))
    dsl = {}
    for name, tables in (("ch", ch_tables), ("vmkit", ours)):
        path = tmp_path / name / "dsdt.dat"
        path.parent.mkdir()
        path.write_bytes(tables.by_signature["DSDT"])
        dsl[name] = disassemble(path).dsl
    for header in ("Method (CSTA, 1, Serialized)", "Method (CTFY, 2, Serialized)",
                   "Method (CEJ0, 1, Serialized)", "Method (CSCN, 0, Serialized)"):  # fmt: skip
        assert _asl_block(dsl["vmkit"], header) == _asl_block(dsl["ch"], header), header
    for cpu in ("C000", "C003"):
        ch_device = _asl_block(dsl["ch"], f"Device ({cpu})")
        vmkit_device = _asl_block(dsl["vmkit"], f"Device ({cpu})")
        without_mat = [re.sub(r"Name \(_MAT.*?\}\)\n", "", d, flags=re.DOTALL)
                       for d in (ch_device, vmkit_device)]  # fmt: skip
        assert without_mat[0] == without_mat[1], cpu
    # The controller's fields: the same names, bits and offsets.
    for field in ("Field (PRST, ByteAcc, NoLock, WriteAsZeros)",
                  "Field (PRST, DWordAcc, NoLock, Preserve)"):  # fmt: skip
        assert _asl_block(dsl["vmkit"], field) == _asl_block(dsl["ch"], field), field


# The memory hot-plug controller's status byte (devices/memory_hotplug.rs,
# Cloud Hypervisor's bits): acpiexec reads the `fill` value from the register.
MEN, MINS, MRMV = 0x01, 0x02, 0x04


@pytest.mark.parametrize("guest", ["memory-hotplug", "default"], indirect=True)
def test_the_memory_hotplug_methods_evaluate_as_cloud_hypervisor_s(guest: GuestTables) -> None:
    dsdt = [guest.paths["DSDT"]]
    objects = namespace(dsdt)
    assert objects.get("\\_SB_.MHPC.MSCN") == "Method"
    if guest.name == "default":
        # Without hotplug_size, as v37: a stub whose MSCN (the GED calls it) does nothing.
        run = acpiexec(dsdt, ["evaluate \\_SB_.MHPC.MSCN", "evaluate \\_SB_.GED_._EVT 5"])
        assert not run.load_problems, run.output
        assert all(not e.problems for e in run.evaluations), run.output
        assert run.notifies == [], run.output
        assert not any(re.fullmatch(r"\\_SB_\.MHPC\.M\d{3}", p) for p in objects)
        return
    for method in ("MTFY", "MSCN", "MSTA", "MCRS"):
        assert objects.get(f"\\_SB_.MHPC.{method}") == "Method", method
    for name in ("MLCK", "MSEL", "MEN_", "MINS", "MRMV", "MEJ0", "MHBL", "MHBH", "MHLL", "MHLH"):
        assert f"\\_SB_.MHPC.{name}" in objects, name
    slots = [f"M{i:03}" for i in range(8)]
    jobs = [
        (MEN, "\\_SB_.MHPC.MSCN"),
        (MEN | MINS, "\\_SB_.MHPC.MSCN"),
        (MEN | MRMV, "\\_SB_.MHPC.MSCN"),
        (MEN | MINS, "\\_SB_.GED_._EVT 5"),
        (MEN, "\\_SB_.MHPC.M007._STA"),
        (0, "\\_SB_.MHPC.M000._STA"),
        (MEN, "\\_SB_.MHPC.M003._CRS"),
    ]
    runs = acpiexec_all([(dsdt, [f"evaluate {call}"], fill) for fill, call in jobs])
    for result in runs:
        assert not result.load_problems, result.output
        for evaluation in result.evaluations:
            assert not evaluation.problems, (evaluation, result.output)
    scan, inserting, removing, ged, enabled, absent, crs = runs
    assert scan.notifies == []
    assert inserting.notifies == [(m, DEVICE_CHECK) for m in slots]
    assert removing.notifies == [(m, EJECT_REQUEST) for m in slots]
    # The GED's memory bit (0x02 here, with the fill) runs MSCN (the fill's
    # bit 0 runs the CPU scan as well).
    assert [n for n in ged.notifies if n[0][0] == "M"] == [(m, DEVICE_CHECK) for m in slots]
    assert enabled["\\_SB_.MHPC.M007._STA"].returned == "[Integer] = 000000000000000F"
    assert absent["\\_SB_.MHPC.M000._STA"].returned == "[Integer] = 0000000000000000"
    # _CRS returns the QWordMemory template, filled from the registers.
    assert crs["\\_SB_.MHPC.M003._CRS"].returned.startswith("[Buffer]"), crs.output


def test_the_memory_hotplug_aml_is_cloud_hypervisor_s(tmp_path: Path) -> None:
    # The test guest prints the tables on both VMMs; the controller's
    # methods, fields and memory devices must read the same (its address,
    # in _CRS and the OperationRegion, is each VMM's own).
    if CH_DIR is None:
        pytest.skip(CH_MISSING)
    args = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["acpidump"], "poweroff"),
        "--memory", "size=64M,hotplug_size=1G", "--console", "off",
    ]  # fmt: skip
    ch = subprocess.run(
        [ch_binary("cloud-hypervisor"), *args, "--serial", "tty"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "step acpidump ok" in ch.stdout, ch.stdout + ch.stderr
    ours = dumped_tables(VmConfig.from_cli([*args, "--serial", "tty"]))
    dsl = {}
    for name, tables in (("ch", tables_from_dump(ch.stdout)), ("vmkit", ours)):
        path = tmp_path / name / "dsdt.dat"
        path.parent.mkdir()
        path.write_bytes(tables.by_signature["DSDT"])
        dsl[name] = disassemble(path).dsl
    headers = [
        "Method (MTFY, 2, Serialized)", "Method (MSCN, 0, Serialized)",
        "Method (MSTA, 1, Serialized)", "Method (MCRS, 1, Serialized)",
        "Field (MHPR, ByteAcc, NoLock, WriteAsZeros)",
        *(f"Device (M{i:03})" for i in range(8)),
    ]  # fmt: skip
    for header in headers:
        assert _asl_block(dsl["vmkit"], header) == _asl_block(dsl["ch"], header), header
    # The three DWord fields (range, PXM, selection) in v37's order.
    dword_fields = [
        re.findall(r"Field \(MHPR, DWordAcc, NoLock, Preserve\)\s*\{([^}]*)\}", dsl[name])
        for name in ("ch", "vmkit")
    ]
    assert dword_fields[0] == dword_fields[1] and len(dword_fields[0]) == 3
