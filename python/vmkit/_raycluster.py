"""A Ray cluster of several nodes on this one machine, for tests and benchmarks.

Each node is a real ``ray start`` (its own raylet, workers and object store)
with its own loopback address (127.0.0.N) and port ranges. Every process of
the cluster descends from one keeper process (this module run as a program)
that is a child subreaper: daemons that ``ray start`` leaves behind, workers
whose raylet died and VMM processes whose actor died are re-parented to it
rather than to PID 1 (which need not reap them), so that they are reaped,
and stopping the cluster ends exactly the keeper's descendants, found by
process id, whatever happened to them.

Not part of vmkit's API; ``vmkit.ray`` does not need it (a real cluster's
nodes run ``ray start`` themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalCluster", "NodeSpec", "descendants", "kill_node", "process_running", "processes"]

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class NodeSpec:
    """One node: its loopback address, CPUs and custom resources."""

    ip: str
    num_cpus: int = 1
    resources: tuple[tuple[str, float], ...] = ()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), from /proc."""
    children = _children_map()
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


class LocalCluster:
    """``len(nodes)`` Ray nodes on this machine, the first one the head.

    ``start()`` returns once every node has joined (``ray start`` returned);
    ``kill_node(ip)`` kills that node's raylet and its Ray processes with
    SIGKILL (not what those processes started: they must notice by
    themselves); ``stop()`` kills every process of the cluster and removes its
    temporary directory. ``env`` adds variables for every Ray process (say,
    ``RAY_health_check_period_ms``).
    """

    def __init__(self, nodes: list[NodeSpec], env: dict[str, str] | None = None) -> None:
        if not nodes:
            raise ValueError("nodes must name at least one node (the head)")
        self.nodes = nodes
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Short: Ray's unix socket paths live below it (at most 107 bytes).
        self.temp_dir = Path(
            subprocess.check_output(["mktemp", "-d", "/tmp/vmkit-ray-XXXXXX"], text=True).strip()
        )
        self.port = _free_port(nodes[0].ip)
        self.address = f"{nodes[0].ip}:{self.port}"
        self._keeper: subprocess.Popen[str] | None = None

    def _commands(self) -> list[list[str]]:
        ray = str(Path(sys.executable).with_name("ray"))
        commands = []
        for number, node in enumerate(self.nodes):
            base = 20000 + number * 1000
            command = [
                ray,
                "start",
                f"--node-ip-address={node.ip}",
                f"--num-cpus={node.num_cpus}",
                f"--resources={json.dumps(dict(node.resources))}",
                f"--min-worker-port={base}",
                f"--max-worker-port={base + 899}",
                f"--dashboard-agent-listen-port={base + 900}",
                "--disable-usage-stats",
                "--include-log-monitor=false",
            ]
            if number == 0:
                command += [
                    "--head",
                    f"--port={self.port}",
                    f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=false",
                ]
            else:
                command.append(f"--address={self.address}")
            commands.append(command)
        return commands

    def start(self, timeout: float = 120.0) -> None:
        self._keeper = subprocess.Popen(
            [sys.executable, "-m", "vmkit._raycluster", json.dumps(self._commands())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.temp_dir,
        )
        assert self._keeper.stdout is not None
        ready, _, _ = select.select([self._keeper.stdout], [], [], timeout)
        line = self._keeper.stdout.readline().strip() if ready else "no answer in time"
        if line != "ready":
            self.stop()
            raise RuntimeError(f"The local Ray cluster did not start: {line}")

    @property
    def keeper_pid(self) -> int | None:
        return None if self._keeper is None else self._keeper.pid

    def processes(self) -> list[int]:
        """Every running process of the cluster (VMMs included)."""
        return [] if self._keeper is None else processes(self._keeper.pid)

    def kill_node(self, ip: str) -> list[int]:
        """See ``kill_node``."""
        if self._keeper is None:
            raise LookupError("the cluster is not running")
        return kill_node(self._keeper.pid, ip)

    def stop(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert keeper.stdin is not None
                keeper.stdin.close()
            try:
                keeper.wait(60)
            except subprocess.TimeoutExpired:
                for pid in descendants(keeper.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                keeper.kill()
                keeper.wait()
            if keeper.stdout is not None:
                keeper.stdout.close()
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


def processes(keeper: int) -> list[int]:
    """Every running process below the keeper ``keeper`` (VMMs included)."""
    return [pid for pid in descendants(keeper) if process_running(pid)]


def raylet_pid(keeper: int, ip: str) -> int:
    for pid in processes(keeper):
        args = cmdline(pid)
        if args and args[0].endswith("/raylet") and f"--node_ip_address={ip}" in args:
            return pid
    raise LookupError(f"no raylet for node {ip}")


def kill_node(keeper: int, ip: str) -> list[int]:
    """SIGKILLs node ``ip``'s raylet and the Ray processes it started (its
    workers and agents), not what those started (they must notice by
    themselves); returns their ids."""
    raylet = raylet_pid(keeper, ip)
    victims = [raylet, *_children_map().get(raylet, [])]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_all() -> None:
    """SIGKILLs every descendant until none is left, reaping them."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = descendants(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        _reap()


def _keep(commands: list[list[str]]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for command in commands:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = done.stdout.decode(errors="replace").strip().splitlines()[-3:]
                print(f"{' '.join(command[:3])} failed: {' | '.join(tail)}", flush=True)
                return
        print("ready", flush=True)
        # Until the parent closes stdin (or dies): reap whatever ends below us.
        while True:
            readable, _, _ = select.select([sys.stdin], [], [], 0.2)
            _reap()
            if readable and not sys.stdin.readline():
                return
    finally:
        _kill_all()


if __name__ == "__main__":
    _keep(json.loads(sys.argv[1]))
