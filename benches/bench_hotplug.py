"""Hot-plug: the time from the API request to the guest seeing the change,
vmkit against Cloud Hypervisor, same test guest, runs interleaved.

Run: ``python benches/bench_hotplug.py`` (``--runs N``, ``--hog`` for a busy
loop per CPU during the runs, ``--vms N`` for N-1 other VMs of the same VMM
ticking beside the measured one, ``--markdown`` prints the table for
RESULTS.md). Needs /dev/kvm and ``../shared/ch/cloud-hypervisor``.

Each run boots a fresh VMM process with the test guest, whose hot-plug steps
find the GED and the hot-plug controllers through the DSDT (the two VMMs
place them differently), route the GED's interrupt, print ``... waiting`` and
halt. The bench then sends the API request itself (one HTTP request on the
API socket, as ``ch-remote`` would, without a process start in the figure)
and polls the guest's serial file every millisecond:

- *answered*: the API's response has arrived;
- *seen*: the guest has taken the GED interrupt and found the change in the
  controller's registers (its first ``inserted``/``ejected`` line);
- *done*: the guest's step has finished (new vCPUs started with INIT-SIPI
  and running; removed ones ejected; new RAM mapped and pattern-tested at
  CPL3: its first and last 64 KiB, a qword per 64 KiB between; a new disk
  probed, its virtio queue set up and its first sectors read; a removed
  disk ejected and gone from config space).

On kvm_pvm the guest's CPL0 code is emulated (~0.55 µs an instruction), which
weighs on *seen* and *done* alike for both VMMs: compare the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import CH, Hogs, Runs, machine, stop_process, wait_serial_line
from vmkit import testguest

TIMES = "\u00d7"


@dataclass(frozen=True)
class Change:
    """One API request and the guest lines that show it arrived."""

    label: str
    endpoint: str
    body: dict[str, object]
    seen: str
    done: str


@dataclass(frozen=True)
class Case:
    name: str
    vmm_args: tuple[str, ...]
    steps: tuple[str, ...]
    waiting: str  # the line the guest prints before the first change
    changes: tuple[Change, ...]


CASES = {
    "vcpu": Case(
        name="vCPUs 1 \u2192 3 \u2192 1",
        vmm_args=("--cpus", "boot=1,max=3", "--memory", "size=64M"),
        steps=("cpuhotplug", "cpuunplug"),
        waiting="cpuhotplug waiting",
        changes=(
            Change(
                "add 2 vCPUs",
                "vm.resize",
                {"desired_vcpus": 3},
                r"^vmkit-guest: cpuhotplug inserted ",
                r"^vmkit-guest: step cpuhotplug ok ",
            ),
            Change(
                "remove 2 vCPUs",
                "vm.resize",
                {"desired_vcpus": 1},
                r"^vmkit-guest: cpuunplug ejected ",
                r"^vmkit-guest: step cpuunplug ok ",
            ),
        ),
    ),
    "disk": Case(
        name="a virtio-blk disk added and removed",
        vmm_args=("--cpus", "boot=1", "--memory", "size=64M"),
        steps=("pcihotplug", "blk", "pciunplug"),
        waiting="pcihotplug waiting",
        changes=(
            Change(
                "add a disk",
                "vm.add-disk",
                {"path": "{tmp}/disk.img", "readonly": True},
                r"^vmkit-guest: pcihotplug added ",
                r"^vmkit-guest: step blk ok ",
            ),
            Change(
                "remove the disk",
                "vm.remove-device",
                {"id": "{added}"},
                r"^vmkit-guest: pciunplug ejected ",
                r"^vmkit-guest: step pciunplug ok ",
            ),
        ),
    ),
    "memory": Case(
        name="RAM 64 MiB → 320 MiB (ACPI)",
        vmm_args=("--cpus", "boot=1", "--memory", "size=64M,hotplug_size=1G"),
        steps=("memhotplug",),
        waiting="memhotplug waiting",
        changes=(
            Change(
                "add 256 MiB (ACPI DIMM)",
                "vm.resize",
                {"desired_ram": 320 << 20},
                r"^vmkit-guest: memhotplug inserted ",
                r"^vmkit-guest: step memhotplug ok ",
            ),
        ),
    ),
}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.fspath(self.path))


def api_put(api: Path, endpoint: str, body: dict[str, object]) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(api)
    try:
        conn.request(
            "PUT",
            f"/api/v1/{endpoint}",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def vmm_argv(kind: str, api: Path, serial: Path, case: Case, ticking: bool) -> list[str]:
    if ticking:  # a neighbour: it runs the guest's tick loop throughout
        cmdline = testguest.cmdline(["ticks"], "poweroff", ticks=1_000_000, tick_ms=10)
    else:
        cmdline = testguest.cmdline([*case.steps, "ticks"], "poweroff", ticks=100, tick_ms=20)
    common = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", cmdline,
        *case.vmm_args,
        "--serial", f"file={serial}", "--console", "off",
    ]  # fmt: skip
    if kind == "ch":
        assert CH is not None
        return [str(CH), "--api-socket", f"path={api}", "--seccomp", "false", *common]
    return [sys.executable, "-m", "vmkit", "--api-socket", str(api), *common]


def one_run(kind: str, case: Case, neighbours: int) -> dict[str, float]:
    """Milliseconds from the request to each mark, per change."""
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-hotplug-") as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for n in range(neighbours):
                argv = vmm_argv(kind, Path(tmp) / f"n{n}.sock", Path(tmp) / f"n{n}.txt", case, True)
                procs.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            api, serial = Path(tmp) / "api.sock", Path(tmp) / "serial.txt"
            proc = subprocess.Popen(
                vmm_argv(kind, api, serial, case, False),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            _, offset = wait_serial_line(serial, rf"^vmkit-guest: {case.waiting}$")
            (Path(tmp) / "disk.img").write_bytes(bytes(1 << 20))
            names = {"tmp": tmp, "added": ""}
            times: dict[str, float] = {}
            for index, change in enumerate(case.changes):
                if index:  # the next step's waiting line
                    _, offset = wait_serial_line(serial, r" waiting$", offset)
                body = {
                    key: value.format(**names) if isinstance(value, str) else value
                    for key, value in change.body.items()
                }
                started = time.monotonic()
                status, answer = api_put(api, change.endpoint, body)
                answered = time.monotonic()
                if status // 100 != 2:
                    raise RuntimeError(f"{kind}: {change.endpoint} {body} answered {status}")
                if answer:  # an add-* names what it added
                    names["added"] = json.loads(answer).get("id", "")
                seen, _ = wait_serial_line(serial, change.seen, offset)
                done, offset = wait_serial_line(serial, change.done, offset)
                times[f"{index}.answered"] = (answered - started) * 1000
                times[f"{index}.seen"] = (seen - started) * 1000
                times[f"{index}.done"] = (done - started) * 1000
            return times
        finally:
            for p in procs:
                stop_process(p)


def row(markdown: bool, label: str, mark: str, ours: float, theirs: float) -> str:
    ratio = ours / theirs if theirs else float("nan")
    if markdown:
        return f"| {label} | {mark} | {ours:.2f} | {theirs:.2f} | {ratio:.2f} {TIMES} |"
    return f"{label:24} {mark:9} vmkit {ours:8.2f}  ch {theirs:8.2f}  vmkit/ch {ratio:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during the runs")
    parser.add_argument("--vms", type=int, default=1, help="VMs per VMM (the others tick)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if CH is None:
        sys.exit("Cloud Hypervisor is not at ../shared/ch: nothing to compare with")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("needs read-write /dev/kvm")
    cases = [CASES[name] for name in (args.case or sorted(CASES))]
    load = ("a busy loop per CPU" if args.hog else "idle host") + (
        f", {args.vms - 1} other VMs ticking" if args.vms > 1 else ""
    )
    print(f"Machine: {machine()}")
    print(f"{args.runs} runs per VMM, interleaved; {load}; medians in ms from the API request.\n")
    if args.markdown:
        print(
            "| change | mark | vmkit ms | Cloud Hypervisor ms | vmkit / CH |\n|---|---|---|---|---|"
        )
    with Runs("bench_hotplug", total=len(cases) * args.runs * 2) as runs, Hogs(args.hog):
        for case in cases:
            samples: dict[str, list[dict[str, float]]] = {"vmkit": [], "ch": []}
            for run in range(args.runs):
                for kind in ("vmkit", "ch"):
                    runs.start(f"{case.name}: run {run + 1}/{args.runs}, {kind}")
                    samples[kind].append(one_run(kind, case, args.vms - 1))
            for index, change in enumerate(case.changes):
                for mark in ("answered", "seen", "done"):
                    key = f"{index}.{mark}"
                    ours = statistics.median(s[key] for s in samples["vmkit"])
                    theirs = statistics.median(s[key] for s in samples["ch"])
                    runs.print(row(args.markdown, change.label, mark, ours, theirs))


if __name__ == "__main__":
    main()
