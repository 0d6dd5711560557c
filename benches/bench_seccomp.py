"""What seccomp costs: the same boots, exits and IO with ``--seccomp true`` and ``false``.

Run: ``python benches/bench_seccomp.py`` (``--markdown`` prints the tables for
RESULTS.md). Cloud Hypervisor (``../shared/ch/cloud-hypervisor``, when present)
runs the same boot and port-I/O rows with its own filters on and off, in the same
interleaved run: its on/off ratio is the reference for vmkit's. The IO rows are
vmkit's alone (Cloud Hypervisor runs ``blkbench`` only with the guest's
``blkbench_lax_len=1``: see benches/bench_io.py).

Rows (medians of ``--runs`` interleaved runs each):
- process start → guest ready line, and → VMM exited after power-off;
- in-process ``Vm.boot()`` → guest ready (debug port 0x7f);
- the guest-measured port-I/O exit round trip (every exit is a ``KVM_RUN``
  ioctl through the vCPU thread's filters: in the ``vmkit`` process the
  process, VMM and vCPU filters are stacked);
- ``blkbench`` rows of benches/bench_io.py (block worker and io_uring).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_boot
import bench_io
from machine import CH, machine
from vmkit import VmConfig, testguest
from vmkit.vm import Vm

MODES = ("true", "false")
IO_ROWS = [
    bench_io.Row("read", 128 << 10, 32, 40000),
    bench_io.Row("write", 128 << 10, 32, 40000),
    bench_io.Row("randread", 4096, 1, 100000),
    bench_io.Row("randread", 4096, 32, 300000),
]


def vmkit_boot(kernel: Path, cmdline: str, mode: str) -> list[str]:
    return [*bench_boot.vmkit_command(kernel, cmdline), "--seccomp", mode]


def ch_boot(kernel: Path, cmdline: str, mode: str) -> list[str]:
    return [
        str(CH), "--kernel", str(kernel), "--cmdline", cmdline,
        "--cpus", "boot=1", "--memory", f"size={bench_boot.MEMORY_MIB}M",
        "--serial", "tty", "--console", "off", "--seccomp", mode,
    ]  # fmt: skip


def in_process_ready(kernel: Path, cmdline: str, seccomp: bool) -> float:
    config = VmConfig.from_cli(
        ["--kernel", str(kernel), "--cmdline", cmdline, "--cpus", "boot=1",
         "--memory", f"size={bench_boot.MEMORY_MIB}M", "--serial", "null", "--console", "off"]
    )  # fmt: skip
    with Vm(config, seccomp=seccomp) as vm:
        start = time.monotonic()
        vm.boot()
        vm.wait(30)
        writes = {w.value: w.monotonic for w in vm.debug_port_writes()}
    return (writes[0x7F] - start) * 1e3


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--pio-rounds", type=int, default=20000)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    kernel = testguest.image_path("pvh")
    boot = testguest.cmdline(["hello"])
    pio = testguest.cmdline(["pio"], pio_rounds=args.pio_rounds)
    have_ch = CH.exists()

    # (row, vmm, mode) -> samples
    samples: dict[tuple[str, str, str], list[float]] = {}

    def add(row: str, vmm: str, mode: str, value: float) -> None:
        samples.setdefault((row, vmm, mode), []).append(value)

    vmms = [("vmkit", vmkit_boot)] + ([("ch", ch_boot)] if have_ch else [])
    for _, command in vmms:  # warm caches
        bench_boot.timed_run(command(kernel, boot, "true"), "vmkit")
    for _ in range(args.runs):
        for vmm, command in vmms:
            for mode in MODES:
                sample, _, _ = bench_boot.timed_run(command(kernel, boot, mode), "vmkit")
                assert sample.ready is not None and sample.exit is not None
                add("process start → guest ready", vmm, mode, sample.ready * 1e3)
                add("process start → VMM exited after power-off", vmm, mode, sample.exit * 1e3)
                _, out, _ = bench_boot.timed_run(command(kernel, pio, mode), "vmkit")
                khz = bench_boot.host_tsc_khz(out)
                add("port-I/O exit round trip (µs)", vmm, mode, bench_boot.pio_ns(out, khz) / 1e3)
        for mode in MODES:
            ready = in_process_ready(kernel, boot, mode == "true")
            add("`Vm.boot()` → guest ready", "vmkit", mode, ready)

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(bench_io.IMAGE_SIZE)
            f.write(b"\1" * bench_io.IMAGE_SIZE)
        for _ in range(max(3, args.runs // 2)):
            for row in IO_ROWS:
                for mode in MODES:
                    command = [*bench_io.vmkit_command(kernel, image, row), "--seccomp", mode]
                    requests, _, ns = bench_io.run(command)
                    assert ns is not None
                    speed = bench_io.rate(row, requests, ns / 1e9)
                    add(f"{row.label} ({row.unit})", "vmkit", mode, speed)

    rows = list(dict.fromkeys(row for row, _, _ in samples))

    def figure(row: str, vmm: str, mode: str) -> float:
        return median(samples.get((row, vmm, mode), []))

    if args.markdown:
        print(f"Machine: {machine()}\n")
        print(f"Medians of {args.runs} interleaved runs (IO rows: {max(3, args.runs // 2)}); "
              "ms unless the row says otherwise.\n")  # fmt: skip
        print("| | vmkit, seccomp on | off | on / off | Cloud Hypervisor on | off | on / off |")
        print("|---|---|---|---|---|---|---|")
    else:
        print(machine())
    for row in rows:
        cells = []
        for vmm in ("vmkit", "ch"):
            on, off = figure(row, vmm, "true"), figure(row, vmm, "false")
            cells += ["n/a"] * 3 if on != on else [f"{on:.2f}", f"{off:.2f}", f"{on / off:.3f}"]
        if args.markdown:
            print(f"| {row} | {' | '.join(cells)} |")
        else:
            print(f"{row:48s} vmkit on {cells[0]:>9s} off {cells[1]:>9s} ({cells[2]})   "
                  f"CH on {cells[3]:>8s} off {cells[4]:>8s} ({cells[5]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
