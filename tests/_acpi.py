"""The ACPI tables exactly as a guest finds them, checked with ACPICA.

``guest_tables(config, folder)`` boots the VM (the test guest, kept busy),
pauses it, snapshots it into ``folder`` and reads the tables out of the
snapshot's ``memory`` file, which is guest RAM from physical address 0: the
RSDP at 0xa0000, then the XSDT, every table it lists and the FADT's DSDT.
Every checksum is verified on the way.

``disassemble(path)`` runs ``iasl -d``, ``recompile(dsl, ...)`` compiles that
ASL again (the compiler checks what the disassembler does not), and
``acpiexec(tables, commands)`` loads the DSDT into ACPICA's interpreter (the
one Linux runs) and evaluates objects in batch mode; ``namespace(tables)``
lists what the tables define. Each returns what ACPICA said, parsed, so that
tests assert on errors and warnings by name.
``IASL``/``ACPIEXEC`` are None where acpica-tools is not installed (tests skip
with ``ACPICA_MISSING``).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vmkit import VmConfig
from vmkit.vm import Vm

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
ACPICA_MISSING = "iasl/acpiexec are not installed (Debian: apt-get install acpica-tools)"

RSDP_ADDRESS = 0xA0000  # layout::RSDP_POINTER, as in Cloud Hypervisor
RSDP_LENGTH = 36
HEADER_LENGTH = 36
FADT_X_DSDT = 140


class AcpiTableError(AssertionError):
    """A table the guest would reject: bad signature, length or checksum."""


def _checksum_ok(data: bytes) -> bool:
    return sum(data) % 256 == 0


@dataclass
class Tables:
    """The tables by signature (``DSDT`` included), in XSDT order, and
    where each was found."""

    by_signature: dict[str, bytes] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)

    def write(self, folder: Path) -> dict[str, Path]:
        """Writes each table to ``folder/<sig>.dat``; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for signature, data in self.by_signature.items():
            path = folder / f"{signature.lower()}.dat"
            path.write_bytes(data)
            paths[signature] = path
        return paths


def _table_at(memory: bytes, address: int) -> bytes:
    if address + HEADER_LENGTH > len(memory):
        raise AcpiTableError(f"table at {address:#x} is outside guest RAM")
    (length,) = struct.unpack_from("<I", memory, address + 4)
    if length < HEADER_LENGTH or address + length > len(memory):
        raise AcpiTableError(f"table at {address:#x} has a bad length {length}")
    data = memory[address : address + length]
    if not _checksum_ok(data):
        raise AcpiTableError(f"{data[:4]!r} at {address:#x}: bad checksum")
    return data


def parse_tables(memory: bytes) -> Tables:
    """RSDP → XSDT → each table, and the FADT's X_DSDT; every checksum checked."""
    rsdp = memory[RSDP_ADDRESS : RSDP_ADDRESS + RSDP_LENGTH]
    if rsdp[:8] != b"RSD PTR ":
        raise AcpiTableError(f"no RSDP at {RSDP_ADDRESS:#x}: {rsdp[:8]!r}")
    if not _checksum_ok(rsdp[:20]) or not _checksum_ok(rsdp):
        raise AcpiTableError("RSDP: bad checksum")
    (xsdt_address,) = struct.unpack_from("<Q", rsdp, 24)
    xsdt = _table_at(memory, xsdt_address)
    if xsdt[:4] != b"XSDT":
        raise AcpiTableError(f"XSDT pointer leads to {xsdt[:4]!r}")
    tables = Tables()
    tables.by_signature["XSDT"] = xsdt
    tables.addresses["XSDT"] = xsdt_address
    entries = struct.unpack_from(f"<{(len(xsdt) - HEADER_LENGTH) // 8}Q", xsdt, HEADER_LENGTH)
    for address in entries:
        data = _table_at(memory, address)
        signature = data[:4].decode("ascii")
        if signature in tables.by_signature:
            raise AcpiTableError(f"{signature} is listed twice in the XSDT")
        tables.by_signature[signature] = data
        tables.addresses[signature] = address
        if signature == "FACP":
            (dsdt_address,) = struct.unpack_from("<Q", data, FADT_X_DSDT)
            dsdt = _table_at(memory, dsdt_address)
            if dsdt[:4] != b"DSDT":
                raise AcpiTableError(f"X_DSDT leads to {dsdt[:4]!r}")
            tables.by_signature["DSDT"] = dsdt
            tables.addresses["DSDT"] = dsdt_address
    return tables


def guest_tables(config: VmConfig, folder: Path, ready: str = "^vmkit-guest: tick 1$") -> Tables:
    """Boots ``config``, waits for ``ready`` on its serial port, pauses and
    snapshots it into ``folder/snapshot``, and parses the tables from the
    snapshot's memory. The VM is gone when this returns."""
    snapshot = folder / "snapshot"
    snapshot.mkdir(parents=True)
    with Vm(config) as vm:
        vm.boot()
        assert vm.serial.wait_for(ready, timeout=30), vm.serial.text
        vm.pause()
        vm.snapshot(snapshot)
    # Only the first MiB holds tables: read no more of a large sparse file.
    with (snapshot / "memory").open("rb") as memory:
        low = memory.read(1 << 20)
    return parse_tables(low)


_DUMP_HEADER = re.compile(
    r"^vmkit-guest: acpidump (?P<sig>.{4}) addr=(?P<addr>0x[0-9a-f]+) len=(?P<len>\d+)$"
)
_DUMP_BYTES = re.compile(
    r"^vmkit-guest: acpidump (?P<sig>.{4}) (?P<off>[0-9a-f]{5}) (?P<hex>[0-9a-f]+)$"
)


def tables_from_dump(serial: str) -> Tables:
    """The tables the test guest's ``acpidump`` step printed (guest/README.md),
    put back where the guest found them and parsed as from a snapshot: for
    VMs that cannot be snapshotted (a TPM's) and for other VMMs."""
    memory = bytearray(1 << 20)
    lengths: dict[str, tuple[int, int]] = {}
    for line in serial.splitlines():
        if m := _DUMP_HEADER.match(line):
            lengths[m.group("sig")] = (int(m.group("addr"), 16), int(m.group("len")))
        elif m := _DUMP_BYTES.match(line):
            address, length = lengths[m.group("sig")]
            data = bytes.fromhex(m.group("hex"))
            start = address + int(m.group("off"), 16)
            assert start + len(data) <= address + length, line
            memory[start : start + len(data)] = data
    if lengths.get("RSDP", (None,))[0] != RSDP_ADDRESS:
        raise AcpiTableError(f"the guest found no RSDP at {RSDP_ADDRESS:#x}: {lengths}")
    tables = parse_tables(bytes(memory))
    dumped = {sig for sig in lengths if sig != "RSDP"}
    if dumped != set(tables.by_signature):
        raise AcpiTableError(f"the guest dumped {sorted(dumped)}, the XSDT leads to "
                             f"{sorted(tables.by_signature)}")  # fmt: skip
    return tables


def dumped_tables(config: VmConfig) -> Tables:
    """Boots ``config`` (the test guest running the ``acpidump`` step, then
    powering off) and returns the tables it printed."""
    with Vm(config) as vm:
        vm.boot()
        exit_info = vm.wait(timeout=60)
        text = vm.serial.text
    assert exit_info is not None and exit_info.reason == "poweroff", text
    assert "vmkit-guest: step acpidump ok" in text, text
    return tables_from_dump(text)


@dataclass
class Message:
    kind: str  # Error, Warning or Remark
    code: int
    text: str


@dataclass
class IaslResult:
    """What iasl said: its exit status, each error/warning/remark (kind,
    code, text), the output, and the disassembled ASL (for ``-d``)."""

    returncode: int
    messages: list[Message]
    output: str
    dsl: str = ""

    def of_kind(self, kind: str) -> list[Message]:
        return [m for m in self.messages if m.kind == kind]


_MESSAGE = re.compile(
    r"^(?P<kind>Error|Warning|Remark)\s+(?P<code>\d+)\s+-\s*(?P<text>.*)$", re.MULTILINE
)
_SUMMARY = re.compile(
    r"Compilation successful\. (?P<errors>\d+) Errors, (?P<warnings>\d+) Warnings"
)


def _iasl(argv: list[str], cwd: Path) -> tuple[int, str, list[Message]]:
    assert IASL is not None, ACPICA_MISSING
    result = subprocess.run(
        [IASL, *argv], capture_output=True, text=True, cwd=cwd, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = result.stdout + result.stderr
    messages = [
        Message(m.group("kind"), int(m.group("code")), m.group("text").strip())
        for m in _MESSAGE.finditer(output)
    ]
    # The disassembler reports bad AML as "ACPI Error"/"ACPI Exception" lines.
    messages += [
        Message("Error", 0, line.strip())
        for line in output.splitlines()
        if "ACPI Error" in line or "ACPI Exception" in line
    ]
    return result.returncode, output, messages


def disassemble(path: Path) -> IaslResult:
    """``iasl -d path``: the table disassembled to ``path.dsl``."""
    returncode, output, messages = _iasl(["-d", path.name], path.parent)
    dsl_path = path.with_suffix(".dsl")
    dsl = dsl_path.read_text() if dsl_path.exists() else ""
    if not dsl:
        messages.append(Message("Error", 0, f"no disassembly of {path.name}"))
    return IaslResult(returncode, messages, output, dsl)


def recompile(dsl: str, folder: Path, name: str) -> IaslResult:
    """Compiles disassembled ASL again (``iasl name.dsl`` in ``folder``): the
    compiler checks what the disassembler does not (names, types, the
    predefined objects' rules) and says so as errors, warnings and remarks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.dsl").write_text(dsl)
    returncode, output, messages = _iasl([f"{name}.dsl"], folder)
    summary = _SUMMARY.search(output)
    if summary is None:
        messages.append(Message("Error", 0, 'iasl printed no "Compilation successful" line'))
    elif int(summary.group("errors")) != len([m for m in messages if m.kind == "Error"]):
        messages.append(Message("Error", 0, f"iasl counted {summary.group(0)}, parsed otherwise"))
    return IaslResult(returncode, messages, output)


@dataclass
class Evaluation:
    """One ``evaluate`` in acpiexec: the path, what it returned (the text
    after "returned object ..."; empty when nothing was returned), the
    notifications the AML sent (device name, value) and the ACPI errors,
    exceptions and warnings it printed, "failed with status" included."""

    path: str
    returned: str
    notifies: list[tuple[str, int]]
    problems: list[str]


@dataclass
class AcpiExecRun:
    """A whole acpiexec run: problems while loading the tables, then each
    evaluation in order, and the output to show when an assertion fails."""

    load_problems: list[str]
    evaluations: list[Evaluation]
    output: str

    @property
    def notifies(self) -> list[tuple[str, int]]:
        """Every notification of the run, sorted: ACPICA hands each to a
        thread of its own, so they print in any order (and one can print
        after the next evaluation started)."""
        return sorted(
            (m.group("name"), int(m.group("value"), 16)) for m in _NOTIFY.finditer(self.output)
        )

    def __getitem__(self, path: str) -> Evaluation:
        matches = [e for e in self.evaluations if e.path == path]
        assert len(matches) == 1, f"{path} evaluated {len(matches)} times:\n{self.output}"
        return matches[0]


_EVALUATING = re.compile(r"^Evaluating (?P<path>\S+)$", re.MULTILINE)
_PROBLEM = re.compile(
    r"^.*(ACPI Error|ACPI Exception|ACPI Warning|failed with status|AE_[A-Z_]+).*$",
    re.MULTILINE,
)
_NOTIFY = re.compile(
    r"Received a \w+ Notify on \[(?P<name>\w+)\] \S+ Value (?P<value>0x[0-9A-Fa-f]+)"
)
_RETURNED = re.compile(r"^Evaluation of \S+ returned object .*$", re.MULTILINE)


def acpiexec_all(
    jobs: list[tuple[list[Path], list[str], int | None]],
) -> list[AcpiExecRun]:
    """``acpiexec(*job)`` for each job, at the same time: a run takes about a
    second of wall time here (acpiexec waits out a timeout at exit) but
    almost no CPU."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda job: acpiexec(*job), jobs))


def acpiexec(tables: list[Path], commands: list[str], fill: int | None = None) -> AcpiExecRun:
    """Loads ``tables`` (the DSDT first) into acpiexec and runs ``commands``
    (``"evaluate \\_SB_.PC00._CRS"``, ``"evaluate \\_SB_.GED_._EVT 8"``,
    ``"namespace"``) in batch mode. acpiexec simulates SystemMemory
    operation regions with a buffer: reads give what AML wrote there, else
    ``fill`` (``-fv``; zeros without it), so the value a VMM register would
    read can be set for a run."""
    assert ACPIEXEC is not None, ACPICA_MISSING
    # acpiexec takes at most 1023 characters of batch commands: more run in
    # several processes, one after the other.
    chunks: list[list[str]] = [[]]
    for command in commands:
        if chunks[-1] and len(";".join([*chunks[-1], command])) > 1000:
            chunks.append([])
        chunks[-1].append(command)
    if len(chunks) > 1:
        runs = acpiexec_all([(tables, chunk, fill) for chunk in chunks])
        return AcpiExecRun(
            [p for run in runs for p in run.load_problems],
            [e for run in runs for e in run.evaluations],
            "".join(run.output for run in runs),
        )
    # Unbuffered: acpiexec prints notifications as ACPICA dispatches them,
    # and "Evaluating" lines otherwise. -r: a hardware-reduced FADT, as
    # vmkit's (acpiexec builds its own FADT around the tables it loads).
    stdbuf = shutil.which("stdbuf")
    argv = [*([stdbuf, "-o0", "-e0"] if stdbuf else []), ACPIEXEC, "-r"]
    if fill is not None:
        argv += ["-fv", hex(fill)]
    argv += ["-b", ";".join(commands), *map(str, tables)]
    # One stream: the notifications and the "Evaluating" lines go to
    # different ones, and their order matters.
    result = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = result.stdout
    starts = list(_EVALUATING.finditer(output))
    preamble = output[: starts[0].start()] if starts else output
    load_problems = [m.group(0).strip() for m in _PROBLEM.finditer(preamble)]
    if result.returncode != 0:
        load_problems.append(f"acpiexec exited with status {result.returncode}")
    if "successfully acquired and loaded" not in preamble:
        load_problems.append("acpiexec did not load the tables")
    evaluations = []
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(output)
        text = output[start.end() : end]
        returned = _RETURNED.search(text)
        evaluations.append(
            Evaluation(
                path=start.group("path"),
                # The value ends at the first blank line.
                returned=text[returned.end() :].strip().split("\n\n")[0] if returned else "",
                notifies=[
                    (m.group("name"), int(m.group("value"), 16)) for m in _NOTIFY.finditer(text)
                ],
                problems=[m.group(0).strip() for m in _PROBLEM.finditer(text)],
            )
        )
    return AcpiExecRun(load_problems, evaluations, output)


_NAMESPACE_LINE = re.compile(r"^\s*(?P<depth>\d+)\s+(?P<name>[A-Z_][A-Z0-9_]{3})\s+(?P<type>\w+)")


def namespace(tables: list[Path]) -> dict[str, str]:
    """Every object the tables define, by full path (``\\_SB_.PC00._CRS``),
    with its type as acpiexec names it (Device, Method, Buffer, ...);
    ACPICA's predefined root objects left out."""
    run = acpiexec(tables, ["namespace"])
    assert not run.load_problems, run.output
    objects: dict[str, str] = {}
    stack: list[str] = []
    for line in run.output.splitlines():
        m = _NAMESPACE_LINE.match(line)
        if not m:
            continue
        depth = int(m.group("depth"))
        del stack[depth:]
        stack.append(m.group("name"))
        objects["\\" + ".".join(stack)] = m.group("type")
    for predefined in ("_GPE", "_PR_", "_SI_", "_TZ_", "_REV", "_OS_", "_GL_", "_OSI", "_TI_"):
        for path in [
            p for p in objects if p == "\\" + predefined or p.startswith(f"\\{predefined}.")
        ]:
            del objects[path]
    return objects
