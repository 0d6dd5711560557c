"""Fleets on Ray: 24 VMs booted across three local Ray nodes, against bare ``Vm.spawn``.

A Ray cluster on this machine (``vmkit._raycluster``: a head and two worker
nodes, each a real ``ray start`` with its own loopback address, one CPU and
``--slots`` ``vmkit_kvm`` slots). Each VM: the test guest's PVH image, 1 vCPU,
64 MiB, ``steps=hello exit=halt`` (it prints its ``ready`` line, then idles).

Run: ``python benches/bench_ray.py`` (prints a markdown table for RESULTS.md;
``--vms``, ``--runs`` change the sweep). Needs ``pip install 'vmkit[ray]'``.
Figures per mode, medians over ``--runs`` interleaved rounds, same cluster:

- one VM: from asking for one VM until its ``ready`` line arrived: bare,
  ``Vm.spawn`` + ``boot`` + ``serial.wait_for`` in this program; actor, a
  ``VmPool`` of one (``start`` + ``run(until=ready)``).
- N VMs: the same for N at once (bare: one thread per VM).
- per-VM overhead: (actor - bare) / N, and the ratio of the medians.
- close: ``vmkit.close_all`` against ``VmPool.close`` (every VMM and actor gone).

Then, once, N VMs that tick for ``--tick-seconds`` while the second worker
node is killed (its raylet and Ray processes, SIGKILL) after every VM's first
tick: every VM accounted for, and the time from the kill until Ray reported
the node's VMs lost, until they ran again on the other nodes, and until every
workload was done. The cluster runs Ray's failure detector at a 0.5 s period
and 3 misses (``--default-detector``: Ray's own settings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import vmkit
from machine import machine
from vmkit import Vm, VmConfig, testguest
from vmkit._raycluster import LocalCluster, NodeSpec, process_running
from vmkit.ray import (
    KVM_RESOURCE,
    SerialOutput,
    VmFinished,
    VmPool,
    VmRestarted,
    VmStarted,
    builtin_guest,
)

READY = r"vmkit-guest: ready"
IPS = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
FAST_DETECTOR = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


def bare_config() -> VmConfig:
    return VmConfig.from_cli(
        [
            "--kernel",
            str(testguest.image_path("pvh")),
            "--cmdline",
            testguest.cmdline(["hello"], exit="halt"),
            "--cpus",
            "boot=1",
            "--memory",
            "size=64M",
            "--console",
            "off",
        ]
    )


def in_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def bare(count: int) -> tuple[float, float]:
    """N ``Vm.spawn`` VMs to ready, then ``close_all``: (start s, close s)."""
    config = bare_config()
    vms: list[Any] = [None] * count

    def one(index: int) -> None:
        vm = vms[index] = Vm.spawn(config)
        vm.boot()
        vm.serial.wait_for(READY, timeout=60)

    started = time.monotonic()
    try:
        in_threads(count, one)
        ready = time.monotonic() - started
    finally:
        stopping = time.monotonic()
        vmkit.close_all([vm for vm in vms if vm is not None])
    return ready, time.monotonic() - stopping


def actors(count: int) -> tuple[float, float, float]:
    """A ``VmPool`` of N to ready, then ``close``: (start s, of which placing, close s)."""
    started = time.monotonic()
    pool = VmPool(builtin_guest(["hello"], "halt"), count)
    try:
        placements = pool.start()
        placed = time.monotonic() - started
        results = pool.run(until=READY, timeout=60)
        ready = time.monotonic() - started
        bad = [r for r in results if r.outcome != "matched"]
        assert not bad, bad[0].message
    finally:
        stopping = time.monotonic()
        pool.close()
    closed = time.monotonic() - stopping
    left = [p.vmm_pid for p in placements if process_running(p.vmm_pid)]
    assert not left, f"VMM processes left after close: {left}"
    return ready, placed, closed


def kill_run(cluster: LocalCluster, count: int, tick_seconds: float) -> dict[str, Any]:
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    dead = next(node for node, ip in ips.items() if ip == IPS[2])
    ticks = max(1, round(tick_seconds / 0.1))
    ticked: set[int] = set()
    killed_at = 0.0
    times: dict[str, list[float]] = {"lost": [], "started": [], "done": []}
    victims: list[VmStarted] = []
    results = []
    started = time.monotonic()
    with VmPool(builtin_guest(["hello", "ticks"], ticks=ticks, tick_ms=100), count) as pool:
        for event in pool.events(timeout=120):
            now = time.monotonic()
            if isinstance(event, SerialOutput) and "tick 0" in event.text:
                ticked.add(event.index)
            elif isinstance(event, VmRestarted):
                times["lost"].append(now)
            elif isinstance(event, VmStarted) and event.restarts:
                times["started"].append(now)
            elif isinstance(event, VmFinished):
                results.append(event.result)
                if event.result.restarts:
                    times["done"].append(now)
            if not killed_at and len(ticked) == count:
                victims = [p for p in pool.placements if p is not None and p.node_id == dead]
                cluster.kill_node(IPS[2])
                killed_at = time.monotonic()
        total = time.monotonic() - started
    victim_pids = [v.vmm_pid for v in victims]
    deadline = time.monotonic() + 10
    while any(process_running(pid) for pid in victim_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "victims": len(victims),
        "results": len(results),
        "done": sum(r.outcome == "poweroff" for r in results),
        "restarts": sum(r.restarts for r in results),
        "moved": sum(1 for r in results if r.restarts and r.node_id != dead),
        "left": sum(process_running(pid) for pid in victim_pids),
        "lost": max(times["lost"]) - killed_at if times["lost"] else float("nan"),
        "started": max(times["started"]) - killed_at if times["started"] else float("nan"),
        "finished": max(times["done"]) - killed_at if times["done"] else float("nan"),
        "total": total,
        "ticks": ticks,
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f} \u00d7"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=12, help="vmkit_kvm slots per node")
    parser.add_argument("--tick-seconds", type=float, default=4.0)
    parser.add_argument("--default-detector", action="store_true")
    args = parser.parse_args()
    if args.slots * 2 < args.vms:
        parser.error(f"--slots {args.slots}: two nodes must hold --vms {args.vms} after the kill")
    env = {} if args.default_detector else FAST_DETECTOR
    nodes = [NodeSpec(ip, 1, ((KVM_RESOURCE, float(args.slots)),)) for ip in IPS]
    cluster = LocalCluster(nodes, env=env)
    begun = time.monotonic()
    cluster.start()
    cluster_start = time.monotonic() - begun
    try:
        ray.init(address=cluster.address, _node_ip_address=IPS[0], logging_level="warning")
        Vm.spawn(None).close()  # the fork server, once, outside the figures
        figures: dict[str, list[float]] = {
            k: [] for k in ("bare1", "actor1", "bareN", "actorN", "placedN", "closeB", "closeA")
        }
        for run in range(args.runs):
            figures["bare1"].append(bare(1)[0])
            figures["actor1"].append(actors(1)[0])
            ready, closed = bare(args.vms)
            figures["bareN"].append(ready)
            figures["closeB"].append(closed)
            ready, placed, closed = actors(args.vms)
            figures["actorN"].append(ready)
            figures["placedN"].append(placed)
            figures["closeA"].append(closed)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in figures.items()))
        kill = kill_run(cluster, args.vms, args.tick_seconds)
    finally:
        ray.shutdown()
        cluster.stop()
    n = args.vms
    print()
    print(
        f"Machine: {machine()}, Ray {ray.__version__}; cluster of 3 nodes started in "
        f"{cluster_start:.1f} s; medians of {args.runs} runs\n"
    )
    detector = "Ray's default" if args.default_detector else "0.5 s \u00d7 3"
    print(
        f"Node killed ({detector} failure detector, {kill['ticks']} ticks of 0.1 s): "
        f"{kill['victims']} of {n} VMs on it; {kill['results']} results, {kill['done']} "
        f"powered off, {kill['restarts']} restarts, {kill['moved']} moved, "
        f"{kill['left']} of its VMMs left; lost reported after {ms(kill['lost'])}, "
        f"running again after {ms(kill['started'])}, workloads done after "
        f"{ms(kill['finished'])}; whole run {ms(kill['total'])}"
    )
    if args.runs == 0:
        return 0
    med = {k: statistics.median(v) for k, v in figures.items()}
    print()
    print(
        "| VMs | bare `Vm.spawn` → ready | `VmPool` → ready | of which placing | "
        "ratio | per-VM overhead | close bare | close pool |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| 1 | {ms(med['bare1'])} | {ms(med['actor1'])} | | "
        f"{ratio(med['actor1'], med['bare1'])} | {ms(med['actor1'] - med['bare1'])} | | |"
    )
    print(
        f"| {n} | {ms(med['bareN'])} | {ms(med['actorN'])} | {ms(med['placedN'])} | "
        f"{ratio(med['actorN'], med['bareN'])} | {ms((med['actorN'] - med['bareN']) / n)} | "
        f"{ms(med['closeB'])} | {ms(med['closeA'])} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
