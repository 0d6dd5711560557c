"""The API's own cost: one request on a new connection, as ``ch-remote`` makes
it, from connect to the whole answer, vmkit against Cloud Hypervisor.

Run: ``python benches/bench_api.py`` (``--requests N`` per round, ``--rounds N``,
``--hog`` for a busy loop per CPU, ``--markdown`` for RESULTS.md). Needs
/dev/kvm and ``../shared/ch/cloud-hypervisor``.

Each VMM (vmkit: ``python -m vmkit``; Cloud Hypervisor: the v37 binary,
``--seccomp false``) runs the test guest, ticking. The rounds alternate
between the two; each round sends every request kind ``--requests`` times,
one connection each: ``vmm.ping``, ``vm.info`` (the config and device tree
as JSON), ``vm.counters`` and a ``vm.resize`` to the vCPU count the VM has
(a request that reaches the VM and changes nothing). Medians and 90th
percentiles of all the rounds' requests, ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import CH, Hogs, Runs, machine, stop_process
from vmkit import testguest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _http import request as http_request

TIMES = "\N{MULTIPLICATION SIGN}"

#: (label, method, endpoint, body)
REQUESTS: list[tuple[str, str, str, dict[str, int] | None]] = [
    ("vmm.ping", "GET", "vmm.ping", None),
    ("vm.info", "GET", "vm.info", None),
    ("vm.counters", "GET", "vm.counters", None),
    ("vm.resize (no change)", "PUT", "vm.resize", {"desired_vcpus": 1}),
]


def request(
    path: str, method: str, endpoint: str, body: dict[str, int] | None = None
) -> tuple[int, bytes]:
    """One request on a new connection: its status and body once the whole answer is in."""
    reply = http_request(path, method, endpoint, None if body is None else json.dumps(body))
    return reply.status, reply.body


def start(kind: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(workdir / f"{kind}.sock")
    guest = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", testguest.cmdline(["ticks"], "poweroff", ticks=10**7, tick_ms=20),
        "--cpus", "boot=1,max=2", "--memory", "size=64M",
        "--serial", "null", "--console", "off",
    ]  # fmt: skip
    if kind == "ch":
        argv = [str(CH), "--seccomp", "false", "--api-socket", sock, *guest]
    else:
        argv = [sys.executable, "-m", "vmkit", "--api-socket", sock, *guest]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if os.path.exists(sock):
                status, info = request(sock, "GET", "vm.info")
                if status == 200 and json.loads(info)["state"] == "Running":
                    return proc, sock
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{kind} did not run the guest")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during the runs")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not CH.is_file():
        sys.exit(f"Cloud Hypervisor is needed at {CH}")
    print(f"Machine: {machine()}")
    print(f"Load: {'a busy loop per CPU' if args.hog else 'idle host'}")
    samples: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-api-", dir="/tmp") as tmp:
        vmms = {kind: start(kind, Path(tmp)) for kind in ("vmkit", "ch")}
        try:
            time.sleep(0.5)  # past the guest's start-up
            with Runs("bench_api", total=args.rounds * 2) as runs, Hogs(args.hog):
                for round_ in range(args.rounds):
                    for kind, (_proc, sock) in vmms.items():
                        runs.start(f"round {round_ + 1}/{args.rounds}, {kind}")
                        for label, method, endpoint, body in REQUESTS:
                            times = samples.setdefault((label, kind), [])
                            for _ in range(args.requests):
                                started = time.perf_counter()
                                status, _ = request(sock, method, endpoint, body)
                                times.append(time.perf_counter() - started)
                                assert status in (200, 204), (kind, label, status)
        finally:
            for proc, _sock in vmms.values():
                stop_process(proc)

    def figures(label: str, kind: str) -> tuple[float, float]:
        times = sorted(samples[(label, kind)])
        return statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3

    rows = []
    for label, *_ in REQUESTS:
        (vm, vp), (cm, cp) = figures(label, "vmkit"), figures(label, "ch")
        rows.append((label, vm, cm, vm / cm, vp, cp))
    if args.markdown:
        print(
            "| request | vmkit median ms | CH median ms | vmkit / CH | vmkit p90 ms | CH p90 ms |"
            "\n|---|---|---|---|---|---|"
        )
        for label, vm, cm, ratio, vp, cp in rows:
            print(f"| {label} | {vm:.3f} | {cm:.3f} | {ratio:.2f} {TIMES} | {vp:.3f} | {cp:.3f} |")
    else:
        for label, vm, cm, ratio, vp, cp in rows:
            print(
                f"{label:24} vmkit {vm:7.3f} ms  CH {cm:7.3f} ms  {ratio:5.2f} {TIMES}"
                f"   p90 {vp:7.3f} / {cp:7.3f}"
            )


if __name__ == "__main__":
    main()
