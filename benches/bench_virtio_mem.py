"""virtio-mem: time from the API call to the guest using the new memory, and
until the memory is back with the host, vmkit against Cloud Hypervisor, same
test guest, runs interleaved.

Run: ``python benches/bench_virtio_mem.py`` (``--runs N``, ``--mib M``;
``--markdown`` prints the table for RESULTS.md). Needs /dev/kvm and
``../shared/ch/cloud-hypervisor`` (``ch-remote`` beside it).

Each run boots a fresh VMM process with the test guest (1 vCPU, ``--memory
size=64M,hotplug_method=virtio-mem,hotplug_size=<M + 2 MiB rounded up to
128 MiB>``),
whose ``virtiomem`` step waits for a config interrupt. The bench asks for
``ch-remote resize --memory <64 + M>M`` (both VMMs get the real
``ch-remote``) and times the request until the guest reports every block
plugged, read as zeros, written and checked (``virtiomem plugged=...
verified=1`` on its serial file, polled every millisecond): *plug*, in MiB/s
of guest memory the guest can use; the VMM process's resident memory (VmRSS)
grows by what it wrote. Then ``resize --memory 64M`` and the time until the
guest reports all of it unplugged (``step virtiomem ok``): *unplug*, and the
resident memory the host got back (the guest then prints ticks for 2 s, so
that the VM is still up while the bench reads it). The guest sends one PLUG
or UNPLUG request per 2 MiB block and waits for each, so both rates include
its driver; on kvm_pvm its CPL0 code is emulated, so compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import CH, machine, settled_rss, stop_process, wait_serial_line
from vmkit import testguest

TIMES = "\u00d7"
BOOT_MIB = 64


def vmm_argv(kind: str, api: Path, serial: Path, mib: int) -> list[str]:
    # A block to spare: v37 refuses to plug the region's last block (its
    # range check is off by one), which the guest would ask for otherwise.
    region = -(-(mib + 2) // 128) * 128
    cmdline = testguest.cmdline(
        ["virtiomem", "ticks"], "poweroff", virtiomem_timeout_ms=300_000, ticks=100, tick_ms=20
    )
    common = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", cmdline,
        "--memory", f"size={BOOT_MIB}M,hotplug_method=virtio-mem,hotplug_size={region}M",
        "--serial", f"file={serial}", "--console", "off",
    ]  # fmt: skip
    if kind == "ch":
        assert CH is not None
        return [str(CH), "--api-socket", f"path={api}", "--seccomp", "false", *common]
    return [sys.executable, "-m", "vmkit", "--api-socket", str(api), *common]


def one_run(kind: str, mib: int) -> dict[str, float]:
    ch_remote = str(Path(str(CH)).with_name("ch-remote"))
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-virtio-mem-") as tmp:
        api, serial = Path(tmp) / "api.sock", Path(tmp) / "serial.txt"
        proc = subprocess.Popen(
            vmm_argv(kind, api, serial, mib),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_serial_line(serial, r"virtiomem waiting requested=0x0$")
            empty = settled_rss(proc.pid)

            def resize(size_mib: int) -> float:
                started = time.monotonic()
                subprocess.run(
                    [ch_remote, "--api-socket", str(api), "resize", "--memory", f"{size_mib}M"],
                    check=True,
                    capture_output=True,
                )
                return started

            started = resize(BOOT_MIB + mib)
            plugged, _ = wait_serial_line(
                serial, rf"virtiomem plugged={mib << 20:#x} .*verified=1$"
            )
            full = settled_rss(proc.pid)
            started_back = resize(BOOT_MIB)
            unplugged, _ = wait_serial_line(serial, r"step virtiomem ok")
            returned = settled_rss(proc.pid)
            proc.wait(60)
            return {
                "plug": mib / (plugged - started),
                "backed": full - empty,
                "unplug": mib / (unplugged - started_back),
                "returned": full - returned,
            }
        finally:
            stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="MiB plugged (a multiple of 2)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if CH is None:
        sys.exit("Cloud Hypervisor is not at ../shared/ch: nothing to compare with")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("needs read-write /dev/kvm")
    if args.mib <= 0 or args.mib % 2:
        sys.exit(f"--mib {args.mib}: must be a positive multiple of 2 (the block size)")
    samples: dict[str, list[dict[str, float]]] = {"vmkit": [], "ch": []}
    for _ in range(args.runs):
        for kind in ("vmkit", "ch"):
            samples[kind].append(one_run(kind, args.mib))
    rows = [
        ("plug (MiB/s the guest plugs, writes and checks)", "plug"),
        ("MiB the host backs (VmRSS)", "backed"),
        ("unplug (MiB/s the guest returns)", "unplug"),
        ("MiB returned to the host (VmRSS)", "returned"),
    ]
    print(f"Machine: {machine()}")
    print(f"{args.runs} runs per VMM, interleaved; {args.mib} MiB plugged; medians.\n")
    if args.markdown:
        print("| | vmkit | Cloud Hypervisor | vmkit / CH |\n|---|---|---|---|")
    for label, key in rows:
        ours = statistics.median(s[key] for s in samples["vmkit"])
        theirs = statistics.median(s[key] for s in samples["ch"])
        ratio = ours / theirs if theirs else float("nan")
        if args.markdown:
            print(f"| {label} | {ours:.1f} | {theirs:.1f} | {ratio:.2f} {TIMES} |")
        else:
            print(f"{label:48} vmkit {ours:9.1f}  ch {theirs:9.1f}  vmkit/ch {ratio:.2f}")


if __name__ == "__main__":
    main()
