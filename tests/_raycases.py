"""The bodies of tests/test_ray.py's Ray tests, run in a driver process of
their own (``python tests/_raycases.py RESPONSE_FD``; see ``RayDriver``
there): only that process imports Ray and joins the cluster, so that Ray's
threads, descriptors and signal handlers never reach the pytest process,
whose other tests count theirs. Requests come on stdin, one JSON line each
(``[function, args]``); each answer is one JSON line on RESPONSE_FD
(``{"value": ...}`` or ``{"error": traceback}``): stdout and stderr stay
free for Ray's and the VMs' own output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

import pytest
import ray
from vmkit import _raycluster
from vmkit._raycluster import process_running
from vmkit.ray import (
    KVM_RESOURCE,
    RestartPolicy,
    SerialOutput,
    VmFinished,
    VmLostError,
    VmPool,
    VmPoolError,
    VmRestarted,
    VmStarted,
    builtin_guest,
    node_resources,
)

HEAD, WORKER1, WORKER2 = "127.0.0.10", "127.0.0.11", "127.0.0.12"
SLOTS = 4
_keeper = 0


def connect(address: str, keeper: int) -> None:
    """Joins the cluster as its driver (once per process)."""
    global _keeper
    _keeper = keeper
    ray.init(address=address, _node_ip_address=HEAD, logging_level="warning")


def disconnect() -> None:
    ray.shutdown()


def node_ips() -> dict[str, str]:
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The processes among ``pids`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if process_running(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def pids_of(placements: Any) -> list[int]:
    """The VMM and actor processes of these placements (``VmStarted``)."""
    return [p.vmm_pid for p in placements] + [p.actor_pid for p in placements]


def restart_policy_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="max_restarts must be a non-negative integer, not -1"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="on_exhausted must be 'raise' or 'give_up', not 'retry'"):
        RestartPolicy(on_exhausted="retry")  # type: ignore[arg-type]


def pool_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count must be a positive integer, not 0"):
        VmPool(builtin_guest(), 0)
    with pytest.raises(ValueError, match="count=3 but 2 configs were given"):
        VmPool([builtin_guest(), builtin_guest()], 3)
    with pytest.raises(TypeError, match=r"config must be a VmConfig, .* not str"):
        VmPool('{"payload": {}}', 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"until='\(' is not a regular expression"):
        VmPool(builtin_guest(), 1).run(until="(")
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, not 0"):
        VmPool(builtin_guest(), 1).run(timeout=0)


def resources_command(kvm_usable: bool) -> None:
    run = [sys.executable, "-m", "vmkit.ray", "resources"]
    out = subprocess.run([*run, "--slots", "3"], capture_output=True, text=True)
    if kvm_usable:
        assert (out.returncode, out.stdout.strip()) == (0, '{"vmkit_kvm": 3.0}'), out
        assert node_resources() == {KVM_RESOURCE: float(os.cpu_count() or 1)}
    else:
        assert (out.returncode, out.stdout.strip()) == (0, "{}"), out
        assert "cannot run VMs" in out.stderr, out.stderr
    bad = subprocess.run([*run, "--slots", "0"], capture_output=True, text=True)
    assert bad.returncode == 2, bad
    assert "--slots: slots must be a positive integer, not 0" in bad.stderr, bad.stderr


def pool_spreads_vms_runs_their_workload_and_streams_serial() -> None:
    ips = node_ips()
    events: list[tuple[float, Any]] = []
    with VmPool(builtin_guest(["hello", "ticks"], ticks=8, tick_ms=100), 6) as pool:
        placements = pool.start()
        results = pool.run(timeout=30, on_event=lambda e: events.append((time.monotonic(), e)))
    # Spread: every node holds VMs, none more than its slots.
    per_node = [ips[p.node_id] for p in placements]
    assert sorted(set(per_node)) == [HEAD, WORKER1, WORKER2], per_node
    assert max(per_node.count(ip) for ip in set(per_node)) <= SLOTS, per_node
    assert [r.index for r in results] == list(range(6))
    for result, placement in zip(results, placements, strict=True):
        assert (result.outcome, result.restarts) == ("poweroff", 0), result
        assert result.nodes == (placement.node_id,) and result.node_id == placement.node_id
        guest = result.guest()
        assert guest.ok("ticks") and guest.values("ticks") == {"ticks": "8"}, result.serial
        assert (guest.failed, guest.exit) == (0, "poweroff"), result.serial
        # Streamed: the chunks make up the whole output, in whole lines, and the
        # first tick came well before the end (the guest ticks for 0.8 s).
        chunks = [
            (t, e.text)
            for t, e in events
            if isinstance(e, SerialOutput) and e.index == result.index
        ]
        assert "".join(text for _, text in chunks) == result.serial, chunks
        assert all(text.endswith("\n") for _, text in chunks[:-1]), chunks
        finished = next(
            t for t, e in events if isinstance(e, VmFinished) and e.result.index == result.index
        )
        first_tick = next(t for t, text in chunks if "tick 0" in text)
        assert finished - first_tick > 0.4, (finished, first_tick)
    # Closed: no VMM process, no actor process.
    assert wait_gone(pids_of(placements)) == []


def pool_refuses_more_vms_than_the_cluster_has_slots() -> None:
    with (
        VmPool(builtin_guest(), 3 * SLOTS + 1) as pool,
        pytest.raises(
            VmPoolError,
            match=f"13 VMs need 13 units of 'vmkit_kvm'; the cluster's nodes have {3 * SLOTS}",
        ),
    ):
        pool.start()


def vm_that_fails_to_start() -> None:
    """A VM whose actor fails in its constructor: the pool says which and why,
    and closes the others."""
    guest = builtin_guest()

    def config(index: int) -> Any:
        if index == 1:
            raise ValueError("no config for VM 1")
        return guest(index)

    pool = VmPool(config, 3, restart=RestartPolicy(3))
    with pytest.raises(VmPoolError, match=r"VM 1 failed to start: (?s:.)*no config for VM 1"):
        pool.start()
    placed = [p for p in pool.placements if p is not None]
    assert wait_gone(pids_of(placed)) == []


def interrupted_driver_leaves_no_vm() -> None:
    placements: list[VmStarted] = []

    def interrupt(event: Any) -> None:
        if isinstance(event, VmStarted):
            placements.append(event)
        if isinstance(event, SerialOutput) and "tick 1" in event.text:
            raise KeyboardInterrupt

    pool = VmPool(builtin_guest(["ticks"], ticks=100, tick_ms=100), 3)
    with pytest.raises(KeyboardInterrupt):
        pool.run(timeout=30, on_event=interrupt)
    assert len(placements) == 3
    assert wait_gone(pids_of(placements)) == []


def killed_driver_leaves_no_vm(address: str) -> None:
    code = (
        "import ray\n"
        "from vmkit.ray import VmPool, builtin_guest\n"
        f"ray.init(address={address!r}, _node_ip_address={HEAD!r}, logging_level='warning')\n"
        "pool = VmPool(builtin_guest(['ticks'], ticks=1000, tick_ms=100), 3)\n"
        "for p in pool.start():\n"
        "    print(p.vmm_pid, p.actor_pid, flush=True)\n"
        "for event in pool.events(timeout=120):\n"
        "    pass\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        pids = [int(pid) for _ in range(3) for pid in driver.stdout.readline().split()]
        assert len(pids) == 6 and all(process_running(pid) for pid in pids), pids
    finally:
        driver.kill()
        driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
    assert wait_gone(pids, timeout=30) == []


def restart_policy_when_an_actor_dies() -> None:
    # max_restarts=0, give_up: the VM whose actor is killed is reported lost,
    # the other finishes.
    config = builtin_guest(["ticks"], ticks=15, tick_ms=100)
    events: list[Any] = []
    with VmPool(config, 2, restart=RestartPolicy(0, "give_up")) as pool:
        for event in pool.events(timeout=30):
            events.append(event)
            if isinstance(event, SerialOutput) and event.index == 0 and "tick 1" in event.text:
                victim = pool.placements[0]
                assert victim is not None
                os.kill(victim.actor_pid, signal.SIGKILL)
        results = [e.result for e in events if isinstance(e, VmFinished)]
    by_index = {r.index: r for r in results}
    assert by_index[0].outcome == "lost" and by_index[0].restarts == 0, by_index[0]
    assert by_index[0].nodes == (victim.node_id,)
    assert by_index[1].outcome == "poweroff" and by_index[1].restarts == 0, by_index[1]
    assert wait_gone([victim.vmm_pid]) == []
    # raise: the error names the VM and the policy, and every VM is closed.
    placements: dict[int, VmStarted] = {}
    with VmPool(config, 2, restart=RestartPolicy(0, "raise")) as pool:
        with pytest.raises(
            VmLostError,
            match=r"VM 1 was lost with no restart left \(RestartPolicy.max_restarts=0\)",
        ):
            for event in pool.events(timeout=30):
                if isinstance(event, VmStarted):
                    placements[event.index] = event
                if isinstance(event, SerialOutput) and event.index == 1 and "tick 1" in event.text:
                    os.kill(placements[1].actor_pid, signal.SIGKILL)
        assert wait_gone(pids_of(placements.values())) == []


def node_death_restarts_its_vms_on_the_other_nodes() -> str:
    """Kills a worker node (its raylet and Ray processes) while every VM runs."""
    ips = node_ips()
    assert sorted(ips.values()) == [HEAD, WORKER1, WORKER2], ips
    dead_node = next(node for node, ip in ips.items() if ip == WORKER2)
    events: list[tuple[float, Any]] = []
    ticked: set[int] = set()
    killed_at = 0.0
    victims: list[VmStarted] = []
    with VmPool(builtin_guest(["hello", "ticks"], ticks=20, tick_ms=100), 6) as pool:
        for event in pool.events(timeout=30):
            events.append((time.monotonic(), event))
            if isinstance(event, SerialOutput) and "tick 1" in event.text:
                ticked.add(event.index)
            if not killed_at and len(ticked) == 6:
                victims = [p for p in pool.placements if p is not None and p.node_id == dead_node]
                assert victims, "SPREAD placed no VM on the node to kill"
                _raycluster.kill_node(_keeper, WORKER2)
                killed_at = time.monotonic()
        # The dead node's VMM processes ended with their actors.
        assert wait_gone(pids_of(victims)) == []
        results = [e.result for _, e in events if isinstance(e, VmFinished)]
        placements = [e for _, e in events if isinstance(e, VmStarted)]
    assert killed_at, "the VMs never all ticked"
    victim_indexes = sorted(v.index for v in victims)
    # Every VM accounted for, each done, the victims once more on a live node.
    assert sorted(r.index for r in results) == list(range(6)), results
    for result in results:
        assert result.outcome == "poweroff", result
        assert result.guest().values("ticks") == {"ticks": "20"}, result.serial
        if result.index in victim_indexes:
            assert result.restarts == 1, result
            assert result.nodes[0] == dead_node and result.node_id != dead_node, result
        else:
            assert result.restarts == 0 and result.nodes == (result.node_id,), result
    restarted = [e for _, e in events if isinstance(e, VmRestarted)]
    assert sorted(e.index for e in restarted) == victim_indexes, restarted
    assert all(e.node_id == dead_node and e.restarts == 1 for e in restarted), restarted
    recovered = max(
        t
        for t, e in events
        if isinstance(e, VmStarted) and e.index in victim_indexes and e.restarts
    )
    assert wait_gone(pids_of(placements)) == []
    return (
        f"{len(victims)} VMs running again elsewhere {recovered - killed_at:.2f} s after the kill"
    )


def serve(response_fd: int) -> None:
    with open(response_fd, "w") as answers:
        for request in sys.stdin:
            name, args = json.loads(request)
            try:
                answer = {"value": globals()[name](*args)}
            except BaseException:
                answer = {"error": traceback.format_exc()}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
