"""Boot time and port-I/O exit cost: vmkit against Cloud Hypervisor and QEMU,
same test guest, one run.

Run: ``python benches/bench_boot.py`` (``--markdown`` prints tables for
RESULTS.md). Needs ``qemu-system-x86_64`` (Debian: qemu-system-x86); Cloud
Hypervisor (``../shared/ch/cloud-hypervisor``) is left out, with a note, where
it is missing.

Every VMM boots the vmkit test guest's PVH ELF with 1 vCPU and 256 MiB, the
runs interleaved. QEMU runs its fastest-booting machine, ``microvm`` (with
ACPI, so the guest powers it off), with ``-cpu host,-arch-capabilities``.

Measured from process start (the benchmark's ``time.monotonic()`` just before
spawning the VMM):
- first guest instruction: the guest's first write to debug port 0x80. vmkit
  stamps it with CLOCK_MONOTONIC (printed with ``-v``); QEMU's isa-debugcon at
  0x80 writes it to a pipe, and Cloud Hypervisor logs it on stderr (``Firmware
  code 0x1``), which the benchmark timestamps on arrival.
- ready: arrival of the guest's ``vmkit-guest: ready`` line on the serial pipe.
- exit: the VMM process has exited after the guest powered off.

Also, in-process: ``Vm.boot()`` to first instruction and to ready (vmkit only),
and the guest-measured cost of one port-I/O exit round trip (``pio`` step).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plots
from machine import CH, Runs, machine, qemu_binary, reap
from vmkit import VmConfig, testguest
from vmkit.vm import Vm

READY = b"vmkit-guest: ready"
MEMORY_MIB = 256


@dataclass
class Sample:
    first: float | None = None
    ready: float | None = None
    exit: float | None = None


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) * 1e3 if values else float("nan")

    def spread(self, name: str) -> tuple[float, float]:
        """(lowest, highest) in ms."""
        return plots.spread(
            [getattr(s, name) * 1e3 for s in self.samples if getattr(s, name) is not None]
        )


def vmkit_command(kernel: Path, cmdline: str) -> list[str]:
    return [
        sys.executable, "-m", "vmkit", "-v",
        "--kernel", str(kernel), "--cmdline", cmdline,
        "--cpus", "boot=1", "--memory", f"size={MEMORY_MIB}M",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


def qemu_command(
    qemu: str, kernel: Path, cmdline: str, machine: str = "microvm,acpi=on"
) -> list[str]:
    return [
        qemu, "-M", machine, "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", f"{MEMORY_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-debugcon", "file:/dev/stderr", "-global", "isa-debugcon.iobase=0x80",
        "-kernel", str(kernel), "-append", cmdline,
    ]  # fmt: skip


def ch_command(kernel: Path, cmdline: str) -> list[str]:
    return [
        str(CH), "--kernel", str(kernel), "--cmdline", cmdline,
        "--cpus", "boot=1", "--memory", f"size={MEMORY_MIB}M",
        "--serial", "tty", "--console", "off",
    ]  # fmt: skip


#: How each peer reports the guest's first debug-port write on stderr.
FIRST_WRITE = {"qemu": b"\x01", "ch": b"Firmware code 0x1]"}


def timed_run(command: list[str], kind: str) -> tuple[Sample, bytes, bytes]:
    sample = Sample()
    out = bytearray()
    err = bytearray()
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None

    def read_err() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)
            marker = FIRST_WRITE.get(kind)
            if marker is not None and sample.first is None and marker in err:
                sample.first = time.monotonic() - start

    reader = threading.Thread(target=read_err)
    reader.start()
    while chunk := os.read(proc.stdout.fileno(), 4096):
        out.extend(chunk)
        if sample.ready is None and READY in out:
            sample.ready = time.monotonic() - start
    reap(proc, 60)
    sample.exit = time.monotonic() - start
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{command[0]} exited with {proc.returncode}: {err.decode(errors='replace')}"
        )
    if kind == "vmkit":
        m = re.search(rb"Debug I/O port: 0x01 at [0-9.]+ ms \(monotonic ([0-9.]+)\)", bytes(err))
        if m:
            sample.first = float(m.group(1)) - start
    return sample, bytes(out), bytes(err)


def in_process(kernel: Path, cmdline: str) -> Sample:
    cfg = VmConfig.from_cli(
        ["--kernel", str(kernel), "--cmdline", cmdline, "--cpus", "boot=1",
         "--memory", f"size={MEMORY_MIB}M", "--serial", "null", "--console", "off"]
    )  # fmt: skip
    with Vm(cfg) as vm:
        start = time.monotonic()
        vm.boot()
        vm.wait(30)
        writes = {w.value: w.monotonic for w in vm.debug_port_writes()}
    return Sample(first=writes.get(0x01, start) - start, ready=writes.get(0x7F, start) - start)


def pio_ns(output: bytes, tsc_khz: float) -> float:
    m = re.search(rb"step pio ok rounds=\d+ tsc_per_round=(\d+)", output)
    if not m:
        raise RuntimeError(f"no pio result in: {output.decode(errors='replace')}")
    return int(m.group(1)) * 1e6 / tsc_khz


def host_tsc_khz(output: bytes) -> float:
    m = re.search(rb"tsc_per_round=(\d+) ns_per_round=(\d+)", output)
    if not m:
        raise RuntimeError("vmkit's guest did not report ns (no TSC leaf?)")
    return int(m.group(1)) * 1e6 / int(m.group(2))


def plot(
    path: Path,
    stages: list[str],
    figures: dict[str, list[float]],
    spread: dict[str, list[tuple[float, float]]],
    in_process: list[float],
    in_process_spread: Sequence[tuple[float, float]],
    pio_us: dict[str, float],
    pio_spread: dict[str, tuple[float, float]],
    subtitle: str,
) -> Path | None:
    """The boot chart: each VMM's stages from process start (ms, log scale: QEMU pc
    runs firmware first), vmkit's in-process ``Vm.boot()`` (ms) and the port-I/O
    round trip (µs)."""
    return plots.bar_chart(
        path,
        "Boot time and port-I/O exits: vmkit, Cloud Hypervisor, QEMU (test guest, 1 vCPU, 256 MiB)",
        subtitle,
        [
            plots.Bars("From process start", "ms (log scale)", stages, figures, spread, log=True),
            plots.Bars(
                "In process: Vm.boot() →",
                "ms",
                ["first guest instruction", "guest ready (debug port 0x7f)"],
                {"vmkit": in_process},
                {"vmkit": list(in_process_spread)} if in_process_spread else {},
            ),
            plots.Bars(
                "Port-I/O exit round trip, guest-measured",
                "µs per outb → user-space exit → back",
                ["outb round trip"],
                {name: [us] for name, us in pio_us.items()},
                {name: [s] for name, s in pio_spread.items()},
            ),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--pio-rounds", type=int, default=20000)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--plot", type=Path, default=plots.PLOT_DIR / "boot.png", help="the chart (PNG) to write"
    )
    args = parser.parse_args()
    qemu = qemu_binary()
    if qemu is None:
        return 1
    kernel = testguest.image_path("pvh")
    boot_cmdline = testguest.cmdline(["hello"])
    pio_cmdline = testguest.cmdline(["pio"], pio_rounds=args.pio_rounds)

    kinds = ["vmkit", "ch", "qemu", "qemu pc"] if CH.exists() else ["vmkit", "qemu", "qemu pc"]
    commands = {
        "vmkit": lambda c: vmkit_command(kernel, c),
        "ch": lambda c: ch_command(kernel, c),
        "qemu": lambda c: qemu_command(qemu, kernel, c),
        "qemu pc": lambda c: qemu_command(qemu, kernel, c, machine="pc"),
    }
    series = {kind: Series() for kind in [*kinds, "vmkit in-process"]}
    names = {
        "vmkit": "vmkit",
        "ch": "Cloud Hypervisor",
        "qemu": "QEMU microvm",
        "qemu pc": "QEMU pc",
    }
    pio: dict[str, list[float]] = {kind: [] for kind in kinds[:-1]}
    total = len(kinds) - 1 + args.runs * (len(kinds) + 1) + 5 * (len(kinds) - 1)
    with Runs("bench_boot", total) as runs:
        for kind in kinds[:-1]:
            runs.start(f"warm-up, {names[kind]}")
            timed_run(commands[kind](boot_cmdline), kind.split()[0])  # warm caches
        for i in range(args.runs):
            for kind in kinds:
                runs.start(f"boot run {i + 1}/{args.runs}, {names[kind]}")
                run = timed_run(commands[kind](boot_cmdline), kind.split()[0])
                series[kind].samples.append(run[0])
            runs.start(f"boot run {i + 1}/{args.runs}, vmkit in process")
            series["vmkit in-process"].samples.append(in_process(kernel, boot_cmdline))

        for i in range(5):
            runs.start(f"port-I/O run {i + 1}/5, vmkit")
            _, out, _ = timed_run(vmkit_command(kernel, pio_cmdline), "vmkit")
            khz = host_tsc_khz(out)
            pio["vmkit"].append(pio_ns(out, khz))
            for kind in kinds[1:-1]:
                runs.start(f"port-I/O run {i + 1}/5, {names[kind]}")
                _, out, _ = timed_run(commands[kind](pio_cmdline), kind)
                pio[kind].append(pio_ns(out, khz))

    stages = [
        ("process start → first guest instruction", "first"),
        ("process start → guest ready line", "ready"),
        ("process start → VMM exited after power-off", "exit"),
    ]
    peers = kinds[1:]
    ip = series["vmkit in-process"]
    pio_us = {kind: statistics.median(values) / 1e3 for kind, values in pio.items()}
    if args.markdown:
        print(f"Machine: {machine()}\n")
        print(f"vmkit: `{' '.join(vmkit_command(kernel, boot_cmdline))}`\n")
        if "ch" in peers:
            print(f"Cloud Hypervisor: `{' '.join(ch_command(kernel, boot_cmdline))}`\n")
        else:
            print(f"Cloud Hypervisor left out: {CH} is missing.\n")
        print(f"QEMU microvm: `{' '.join(qemu_command(qemu, kernel, boot_cmdline))}`\n")
        print("QEMU pc: the same with `-M pc` (QEMU's default machine, with its firmware)\n")
        print(f"Medians of {args.runs} interleaved runs each:\n")
        head = "".join(f" {names[p]} ms | vmkit / {names[p]} |" for p in peers)
        print(f"| from process start | vmkit ms |{head}")
        print("|---|---|" + "---|---|" * len(peers))
        for label, stage in stages:
            a = series["vmkit"].median(stage)
            cells = "".join(
                f" {series[p].median(stage):.1f} | {a / series[p].median(stage):.2f} |"
                for p in peers
            )
            print(f"| {label} | {a:.1f} |{cells}")
        print()
        print("| in-process (`Vm.boot()`) | vmkit ms |")
        print("|---|---|")
        print(f"| `Vm.boot()` → first guest instruction | {ip.median('first'):.2f} |")
        print(f"| `Vm.boot()` → guest ready (debug port 0x7f) | {ip.median('ready'):.2f} |")
        print()
        print(f"Port-I/O exit round trip, guest-measured (`pio` step, {args.pio_rounds} `outb`, "
              "median of 5 runs each):\n")  # fmt: skip
        pio_peers = [p for p in peers if p in pio_us]
        head = "".join(f" {names[p]} µs | vmkit / {names[p]} |" for p in pio_peers)
        print(f"| | vmkit µs |{head}")
        print("|---|---|" + "---|---|" * len(pio_peers))
        pv = pio_us["vmkit"]
        cells = "".join(f" {pio_us[p]:.2f} | {pv / pio_us[p]:.2f} |" for p in pio_peers)
        print(f"| `outb` → user-space exit → back | {pv:.2f} |{cells}")
    else:
        print(machine())
        for label, stage in stages:
            a = series["vmkit"].median(stage)
            line = f"{label:45s} vmkit {a:8.1f} ms"
            for p in peers:
                b = series[p].median(stage)
                line += f"   {names[p]} {b:8.1f} ms ({a / b:.2f})"
            print(line)
        print(f"{'Vm.boot() → first instruction (vmkit)':45s} {ip.median('first'):8.2f} ms")
        print(f"{'Vm.boot() → ready (vmkit)':45s} {ip.median('ready'):8.2f} ms")
        line = f"{'PIO exit round trip':45s} vmkit {pio_us['vmkit']:8.2f} µs"
        for p in peers:
            if p in pio_us:
                line += f"   {names[p]} {pio_us[p]:8.2f} µs"
        print(line)
    ms = [s for _, s in stages]
    plots.wrote(
        plot(
            args.plot,
            [label for label, _ in stages],
            {names[k]: [series[k].median(s) for s in ms] for k in kinds},
            {names[k]: [series[k].spread(s) for s in ms] for k in kinds},
            [ip.median("first"), ip.median("ready")],
            [ip.spread("first"), ip.spread("ready")],
            {names[k]: us for k, us in pio_us.items()},
            {names[k]: plots.spread([v / 1e3 for v in pio[k]]) for k in pio},
            f"{machine()}\nmedians of {args.runs} interleaved runs (port I/O: of 5); "
            "whiskers: lowest to highest run",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
