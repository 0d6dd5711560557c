"""Fleets of VMs on a Ray cluster (``pip install 'vmkit[ray]'``).

Each VM is a Ray actor (``VmActor``) that owns a ``Vm.spawn`` VMM process on
the node that runs it. ``VmPool`` boots N of them across the cluster, runs
each one's workload (what its guest does by itself: the test guest's steps,
an init script), streams their serial output back, gathers their results and,
when a VM's node (or actor) dies, boots that VM afresh on another node as its
``RestartPolicy`` allows.

Nodes that can run VMs advertise the custom resource ``vmkit_kvm``
(``KVM_RESOURCE``), one unit per VM they may hold, and every VM actor needs
one: ``ray start --resources="$(python -m vmkit.ray resources)"`` (see
``node_resources``). An actor whose node cannot open ``/dev/kvm`` read-write
fails at start, saying so.
"""

from __future__ import annotations

try:
    import ray
    import ray.exceptions
except ImportError as error:
    raise ImportError(
        f"vmkit.ray needs Ray ({error}): pip install 'vmkit[ray]'", name=error.name
    ) from error

import argparse
import contextlib
import functools
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from vmkit import testguest
from vmkit.config import VmConfig
from vmkit.vm import Vm, VmError

__all__ = [
    "KVM_RESOURCE",
    "Event",
    "RestartPolicy",
    "SerialOutput",
    "VmActor",
    "VmFinished",
    "VmLostError",
    "VmPool",
    "VmPoolError",
    "VmRestarted",
    "VmResult",
    "VmStarted",
    "builtin_guest",
    "kvm_problem",
    "node_resources",
]

#: The custom resource of nodes that can run VMs: one unit per VM.
KVM_RESOURCE = "vmkit_kvm"

#: How long one ``serial_from`` call waits for new output before answering
#: empty (a long poll: output reaches the driver as soon as it is written).
_SERIAL_POLL = 1.0
#: How long to wait before asking an unreachable actor again whether it lives.
_PROBE_PAUSE = 0.1
#: The most one serial chunk carries: small objects travel inline with the
#: reply instead of through the node's object store (which dies with it).
_SERIAL_CHUNK = 64 * 1024

#: A VM's configuration: a ``VmConfig`` (its paths must exist on every node),
#: or a function of the VM's index called on the node that runs it.
ConfigSource = VmConfig | Callable[[int], VmConfig]


def kvm_problem(path: str = "/dev/kvm") -> str | None:
    """Why this machine cannot run VMs (``path`` does not open read-write), or None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path} does not open read-write: {e.strerror}"
    os.close(fd)
    return None


def node_resources(slots: int | None = None) -> dict[str, float]:
    """The resources this node should advertise to Ray (``ray start
    --resources``): ``{"vmkit_kvm": slots}`` when /dev/kvm opens read-write
    here, else ``{}``. ``slots`` (the VMs the node may hold at once) defaults
    to the CPU count."""
    if slots is None:
        slots = os.cpu_count() or 1
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer, not {slots!r}")
    return {} if kvm_problem() is not None else {KVM_RESOURCE: float(slots)}


def _build_builtin_guest(
    steps: tuple[str, ...],
    exit: str,
    memory: str,
    cpus: int,
    options: Mapping[str, int | str],
    index: int,
) -> VmConfig:
    return VmConfig.from_cli(
        [
            "--kernel",
            str(testguest.image_path("pvh")),
            "--cmdline",
            testguest.cmdline(list(steps), exit, **options),
            "--cpus",
            f"boot={cpus}",
            "--memory",
            f"size={memory}",
            "--console",
            "off",
        ]
    )


def builtin_guest(
    steps: Sequence[str] = ("hello",),
    exit: str = "poweroff",
    *,
    memory: str = "64M",
    cpus: int = 1,
    **options: int | str,
) -> Callable[[int], VmConfig]:
    """A ``ConfigSource`` for the built-in test guest (``vmkit.testguest``):
    each node writes the guest image from its own vmkit and builds the config
    there. ``VmResult.guest()`` reads what the guest reported."""
    return functools.partial(_build_builtin_guest, tuple(steps), exit, memory, cpus, dict(options))


class VmActor:
    """One VM on the node that runs this actor: a ``Vm.spawn`` VMM process,
    the actor process's child, which ends with the actor (closed, killed, or
    its node's Ray gone). ``VmPool`` makes these; its methods are what the
    pool calls remotely."""

    def __init__(
        self, index: int, config: ConfigSource | str, spawn_options: Mapping[str, Any]
    ) -> None:
        problem = kvm_problem()
        if problem is not None:
            raise VmError(
                f"Node {ray.get_runtime_context().get_node_id()[:12]} ({socket.gethostname()}) "
                f"cannot run VMs: {problem}; start only nodes with a usable /dev/kvm with the "
                f"{KVM_RESOURCE!r} resource",
                "Kvm",
            )
        if isinstance(config, str):
            vm_config = VmConfig.from_json(config)
        elif isinstance(config, VmConfig):
            vm_config = config
        else:
            vm_config = config(index)
        self._vm = Vm.spawn(vm_config, **spawn_options)
        self._lock = threading.Lock()

    def where(self) -> dict[str, Any]:
        """The node, host, actor process and VMM process of this VM."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "actor_pid": os.getpid(),
            "vmm_pid": self._vm.pid,
        }

    def run(self, until: str | None, timeout: float) -> dict[str, Any]:
        """Boots the VM and waits until it stops (``until`` None) or prints a
        line matching ``until``; at most ``timeout`` seconds."""
        with self._lock:
            start = time.monotonic()
            self._vm.boot()
            if until is None:
                stop = self._vm.wait(timeout)
                if stop is None:
                    outcome, message = "timeout", f"The VM was still running after {timeout} s"
                else:
                    outcome, message = stop.reason, stop.message
            else:
                try:
                    match = self._vm.serial.wait_for(until, timeout)
                    outcome, message = "matched", match.string
                except TimeoutError as e:
                    outcome, message = "timeout", str(e)
                except VmError as e:
                    stop = self._vm.wait(1.0)
                    outcome = stop.reason if stop is not None else "stopped"
                    message = str(e)
            seconds = time.monotonic() - start
            return {
                **self.where(),
                "outcome": outcome,
                "message": message,
                "seconds": seconds,
                "serial": self._vm.serial.read(),
            }

    def serial_from(self, offset: int, wait: float) -> bytes:
        """The serial output from byte ``offset`` on (at most 64 KiB), waiting
        up to ``wait`` seconds for some to come."""
        deadline = time.monotonic() + wait
        while True:
            data = b""
            path = self._vm.serial.path
            if path is not None:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(_SERIAL_CHUNK)
            if data or time.monotonic() >= deadline or self._vm.closed:
                return data
            time.sleep(0.02)

    def close(self) -> None:
        """Ends the VMM process (see ``SpawnedVm.close``)."""
        self._vm.close()


_RemoteVmActor: Any = ray.remote(VmActor)


class VmPoolError(RuntimeError):
    """The pool could not start or run its VMs (no node has the resource, a
    VM failed to start, the cluster did not answer)."""


class VmLostError(VmPoolError):
    """A VM's node (or actor) died once more than its ``RestartPolicy`` allows
    (``restarts``: the restarts it had)."""

    def __init__(self, index: int, restarts: int, reason: str) -> None:
        super().__init__(
            f"VM {index} was lost with no restart left "
            f"(RestartPolicy.max_restarts={restarts}): {reason}"
        )
        self.index = index
        self.restarts = restarts


@dataclass(frozen=True)
class RestartPolicy:
    """What ``VmPool`` does when a VM's node or actor dies before its workload
    ends: the VM is booted afresh (a new actor, its VMM on another node, the
    workload from the start) up to ``max_restarts`` times; after that,
    ``on_exhausted``: ``"raise"`` (``VmLostError``, every VM closed) or
    ``"give_up"`` (that VM's result has outcome ``lost``; the others go on).
    The guest's own failures (a triple fault, a timeout) are results, not
    restarts."""

    max_restarts: int = 3
    on_exhausted: Literal["raise", "give_up"] = "raise"

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_restarts, bool)
            or not isinstance(self.max_restarts, int)
            or self.max_restarts < 0
        ):
            raise ValueError(
                f"max_restarts must be a non-negative integer, not {self.max_restarts!r}"
            )
        if self.on_exhausted not in ("raise", "give_up"):
            raise ValueError(
                f"on_exhausted must be 'raise' or 'give_up', not {self.on_exhausted!r}"
            )


@dataclass(frozen=True)
class VmResult:
    """How one VM's workload ended.

    ``outcome``: the ``VmExit`` reason (``poweroff``, ``shutdown``,
    ``triple-fault``, ``vmm-error``, ...), ``matched`` (the ``until`` line
    came), ``timeout``, or ``lost`` (``RestartPolicy`` gave up). ``serial``
    is the last boot's serial output; ``nodes`` every node the VM ran on,
    first to last; ``seconds`` from the last boot to the end."""

    index: int
    outcome: str
    message: str
    serial: str
    node_id: str | None
    nodes: tuple[str, ...]
    restarts: int
    seconds: float

    def guest(self) -> testguest.GuestResults:
        """What the test guest reported (``vmkit.testguest.parse_results``)."""
        return testguest.parse_results(self.serial)


@dataclass(frozen=True)
class VmStarted:
    """VM ``index`` has a VMM process (``vmm_pid``) on ``node_id``; ``restarts`` so far."""

    index: int
    node_id: str
    hostname: str
    vmm_pid: int
    actor_pid: int
    restarts: int


@dataclass(frozen=True)
class SerialOutput:
    """Serial output of VM ``index`` (its boot after ``restarts`` restarts), in
    order: whole lines (output that never got its newline comes last)."""

    index: int
    text: str
    restarts: int


@dataclass(frozen=True)
class VmRestarted:
    """VM ``index`` was lost on ``node_id`` (``reason``) and is booting again elsewhere."""

    index: int
    node_id: str | None
    reason: str
    restarts: int


@dataclass(frozen=True)
class VmFinished:
    """VM ``index``'s workload ended (``result``)."""

    result: VmResult


Event = VmStarted | SerialOutput | VmRestarted | VmFinished


@dataclass
class _Slot:
    """The driver's view of one VM."""

    index: int
    config: ConfigSource | str
    actor: Any = None
    restarts: int = 0
    placement: VmStarted | None = None
    nodes: list[str] = field(default_factory=list)
    where_ref: Any = None
    run_ref: Any = None
    serial_ref: Any = None
    offset: int = 0
    partial: bytes = b""  # output after its last newline, not yet passed on
    result: VmResult | None = None
    deadline: float = 0.0
    #: the error that made the actor look unreachable, while it is probed
    suspect: BaseException | None = None
    probe_ref: Any = None
    probe_at: float = 0.0


#: Errors that say the actor or its node is gone (so: boot again elsewhere).
_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
)


#: An actor Ray could not reach but does not know dead yet (older Rays lack
#: the class; an empty tuple catches nothing).
_UNAVAILABLE: Any = getattr(ray.exceptions, "ActorUnavailableError", ())


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class VmPool:
    """N VMs across a Ray cluster, each a ``VmActor`` on a node with the
    ``vmkit_kvm`` resource (spread over the nodes by default).

    ``config``: one ``ConfigSource`` for ``count`` VMs, or a list of them
    (one VM each). ``start()`` places every VM and starts its VMM (not
    booted); ``events()`` boots them all and yields ``VmStarted``,
    ``SerialOutput``, ``VmRestarted`` and ``VmFinished`` events as they come;
    ``run()`` does the same and returns the ``VmResult``s by index, handing
    each event to ``on_event``. ``close()`` (and leaving the ``with`` block,
    however it is left) ends every VMM and actor. A pool runs its workload
    once. Without ``ray.init()`` first, ``start`` calls it (which joins the
    cluster this machine belongs to, if any).

    Each VM's actor asks for ``kvm_per_vm`` units of ``vmkit_kvm``,
    ``num_cpus`` CPUs (0: the VM's vCPUs are not Ray's to count) and
    ``resources``; ``spread`` places actors with Ray's SPREAD strategy.
    ``start_timeout``: how long an actor may take to start its VMM;
    ``stop_timeout``: how long ``close`` waits for the actors to close their
    VMs, then to die; ``spawn_options``: keywords for ``Vm.spawn``.
    """

    def __init__(
        self,
        config: ConfigSource | Sequence[ConfigSource],
        count: int | None = None,
        *,
        restart: RestartPolicy | None = None,
        kvm_per_vm: float = 1.0,
        num_cpus: float = 0.0,
        resources: Mapping[str, float] | None = None,
        spread: bool = True,
        start_timeout: float = 120.0,
        stop_timeout: float = 10.0,
        spawn_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(config, (str, bytes)):
            raise TypeError(
                "config must be a VmConfig, a function of the VM's index that returns one, "
                f"or a list of them, not {type(config).__name__}"
            )
        if isinstance(config, Sequence):
            configs = list(config)
            if count is not None and count != len(configs):
                raise ValueError(f"count={count} but {len(configs)} configs were given")
        else:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"count must be a positive integer, not {count!r}")
            configs = [config] * count
        if not configs:
            raise ValueError("config must hold at least one VM's config")
        if kvm_per_vm <= 0:
            raise ValueError(f"kvm_per_vm must be positive, not {kvm_per_vm!r}")
        self.restart = restart if restart is not None else RestartPolicy()
        self._kvm_per_vm = float(kvm_per_vm)
        self._options: dict[str, Any] = {
            "num_cpus": num_cpus,
            "resources": {**(resources or {}), KVM_RESOURCE: self._kvm_per_vm},
            # run() blocks one thread; serial_from, where and close need others.
            "max_concurrency": 4,
            "max_restarts": 0,
        }
        if spread:
            self._options["scheduling_strategy"] = "SPREAD"
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._spawn_options = dict(spawn_options or {})
        self._slots = [
            _Slot(i, c.to_json() if isinstance(c, VmConfig) else c) for i, c in enumerate(configs)
        ]
        self._started = False
        self._ran = False
        self._closed = False
        self._pending_events: list[Event] = []

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def placements(self) -> list[VmStarted | None]:
        """Where each VM runs now (None while its actor is starting)."""
        return [slot.placement for slot in self._slots]

    @property
    def restarts(self) -> list[int]:
        """How many times each VM was booted again after its node died."""
        return [slot.restarts for slot in self._slots]

    def _launch(self, slot: _Slot) -> None:
        slot.actor = _RemoteVmActor.options(**self._options).remote(
            slot.index, slot.config, self._spawn_options
        )
        slot.placement = None
        slot.where_ref = slot.actor.where.remote()
        slot.run_ref = slot.serial_ref = slot.probe_ref = slot.suspect = None
        slot.offset = 0
        slot.partial = b""
        slot.deadline = time.monotonic() + self._start_timeout

    def _check_capacity(self) -> None:
        if not ray.is_initialized():
            ray.init()
        # cast: Ray leaves cluster_resources untyped.
        total = float(cast(Any, ray).cluster_resources().get(KVM_RESOURCE, 0.0))
        needed = self._kvm_per_vm * len(self._slots)
        if total == 0:
            raise VmPoolError(
                f"No node of this Ray cluster has the {KVM_RESOURCE!r} resource: start the "
                f'nodes that have /dev/kvm with ray start --resources="$(python -m vmkit.ray '
                f'resources)"'
            )
        if total < needed:
            raise VmPoolError(
                f"{len(self._slots)} VMs need {needed:g} units of {KVM_RESOURCE!r}; "
                f"the cluster's nodes have {total:g}"
            )

    def start(self) -> list[VmStarted]:
        """Places every VM and starts its VMM process; returns where each runs."""
        if self._closed:
            raise ValueError("This VmPool is closed")
        if self._started:
            return [p for p in self.placements if p is not None]
        self._started = True
        try:
            self._check_capacity()
            for slot in self._slots:
                self._launch(slot)
            while any(slot.placement is None and slot.result is None for slot in self._slots):
                self._pending_events.extend(self._step(None, None))
        except BaseException:
            self.close()
            raise
        return [slot.placement for slot in self._slots if slot.placement is not None]

    def _begin_run(self, slot: _Slot, until: str | None, timeout: float) -> None:
        slot.run_ref = slot.actor.run.remote(until, timeout)
        slot.serial_ref = slot.actor.serial_from.remote(0, _SERIAL_POLL)
        slot.deadline = time.monotonic() + self._start_timeout + timeout

    def _lost(
        self, slot: _Slot, error: BaseException, until: str | None, timeout: float | None
    ) -> Iterator[Event]:
        if isinstance(error, ray.exceptions.RayActorError) and getattr(
            error, "actor_init_failed", False
        ):
            raise VmPoolError(f"VM {slot.index} failed to start: {error}") from error
        reason = _first_line(error)
        lost_node = slot.placement.node_id if slot.placement is not None else None
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        if slot.restarts >= self.restart.max_restarts:
            if self.restart.on_exhausted == "raise":
                raise VmLostError(slot.index, slot.restarts, reason) from error
            slot.result = VmResult(
                slot.index, "lost", reason, "", lost_node, tuple(slot.nodes), slot.restarts, 0.0
            )
            yield VmFinished(slot.result)
            return
        slot.restarts += 1
        yield VmRestarted(slot.index, lost_node, reason, slot.restarts)
        self._launch(slot)
        if timeout is not None:
            self._begin_run(slot, until, timeout)

    def _step(self, until: str | None, timeout: float | None) -> Iterator[Event]:
        """Waits for the next answers from the actors and turns them into events.
        ``timeout`` None: only placing (``start``); else running."""
        refs: dict[Any, tuple[_Slot, str, int]] = {}
        now = time.monotonic()
        for slot in self._slots:
            if slot.result is not None:
                continue
            if slot.suspect is not None and slot.probe_ref is None and now >= slot.probe_at:
                slot.probe_ref = slot.actor.where.remote()
            for kind in ("where", "run", "serial", "probe"):
                ref = getattr(slot, f"{kind}_ref")
                if ref is not None:
                    refs[ref] = (slot, kind, slot.restarts)
        if not refs:
            time.sleep(_PROBE_PAUSE)
            return
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=0.5)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            slot, kind, restarts = refs[ref]
            if slot.restarts != restarts or slot.result is not None:
                continue  # an answer from an actor already replaced, or a VM done
            setattr(slot, f"{kind}_ref", None)
            try:
                value = ray.get(ref)
            except _UNAVAILABLE as error:
                # Not known dead yet (its node may be dying, and still be a
                # place for the new actor): ask it again until Ray knows.
                slot.where_ref = slot.run_ref = slot.serial_ref = None
                slot.suspect = error
                slot.probe_at = time.monotonic() + _PROBE_PAUSE
                continue
            except _LOST as error:
                yield from self._lost(slot, error, until, timeout)
                continue
            if kind == "probe":
                # Alive after all, but its run's answer is lost: boot it again.
                assert slot.suspect is not None
                yield from self._lost(slot, slot.suspect, until, timeout)
            elif kind == "where":
                slot.placement = VmStarted(
                    slot.index,
                    value["node_id"],
                    value["hostname"],
                    value["vmm_pid"],
                    value["actor_pid"],
                    slot.restarts,
                )
                slot.nodes.append(value["node_id"])
                yield slot.placement
            elif kind == "serial":
                if value:
                    slot.offset += len(value)
                    yield from self._serial(slot, value)
                slot.serial_ref = slot.actor.serial_from.remote(slot.offset, _SERIAL_POLL)
            else:
                # The rest of the output (the run's copy is complete).
                tail = value["serial"][slot.offset :]
                if tail:
                    yield from self._serial(slot, tail, final=True)
                slot.serial_ref = None
                slot.result = VmResult(
                    slot.index,
                    value["outcome"],
                    value["message"],
                    value["serial"].decode(errors="replace"),
                    value["node_id"],
                    tuple(slot.nodes),
                    slot.restarts,
                    value["seconds"],
                )
                yield VmFinished(slot.result)
        now = time.monotonic()
        for slot in self._slots:
            if slot.result is None and slot.deadline and now > slot.deadline:
                state = "start" if slot.placement is None else "finish"
                raise VmPoolError(
                    f"VM {slot.index} did not {state} in time (its actor does not answer)"
                )

    def _serial(self, slot: _Slot, data: bytes, final: bool = False) -> Iterator[SerialOutput]:
        # Whole lines only (a line's bytes may come in two chunks); the rest at the end.
        buffered = slot.partial + data
        cut = len(buffered) if final else buffered.rfind(b"\n") + 1
        slot.partial = buffered[cut:]
        if cut:
            yield SerialOutput(slot.index, buffered[:cut].decode(errors="replace"), slot.restarts)

    def events(self, *, until: str | None = None, timeout: float = 60.0) -> Iterator[Event]:
        """Boots every VM and yields what happens, until every VM's workload
        has ended: it stops by itself (``until`` None) or prints a line
        matching the regular expression ``until``; each boot may take
        ``timeout`` seconds. On an error (or KeyboardInterrupt) every VM is
        closed before it propagates."""
        if self._ran:
            raise ValueError("This VmPool has run its workload already (make a new one)")
        if until is not None:
            try:
                re.compile(until)
            except re.error as e:
                raise ValueError(f"until={until!r} is not a regular expression: {e}") from None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        try:
            yield from self._start_events()
            self._ran = True
            for slot in self._slots:
                if slot.result is None:  # not given up while it was placed
                    self._begin_run(slot, until, timeout)
            while any(slot.result is None for slot in self._slots):
                yield from self._step(until, timeout)
        except GeneratorExit:
            raise
        except BaseException:
            self.close()
            raise

    def _start_events(self) -> Iterator[Event]:
        self.start()
        pending, self._pending_events = self._pending_events, []
        yield from pending

    def run(
        self,
        *,
        until: str | None = None,
        timeout: float = 60.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> list[VmResult]:
        """``events()`` to the end; returns every VM's result, by index."""
        try:
            for event in self.events(until=until, timeout=timeout):
                if on_event is not None:
                    on_event(event)
        except BaseException:
            self.close()  # on_event's exceptions (KeyboardInterrupt) too
            raise
        return [slot.result for slot in self._slots if slot.result is not None]

    def close(self) -> None:
        """Ends every VMM process (each actor closes its VM), then every actor;
        returns once the actors are gone (or ``stop_timeout`` passed)."""
        if self._closed:
            return
        self._closed = True
        actors = [slot.actor for slot in self._slots if slot.actor is not None]
        if not actors:
            return
        closing = []
        for actor in actors:
            with contextlib.suppress(Exception):
                closing.append(actor.close.remote())
        with contextlib.suppress(Exception):
            ray.wait(closing, num_returns=len(closing), timeout=self._stop_timeout)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        # A call to a killed actor fails once Ray has seen it die.
        probes = []
        for actor in actors:
            with contextlib.suppress(Exception):
                probes.append(actor.where.remote())
        with contextlib.suppress(Exception):
            ray.wait(probes, num_returns=len(probes), timeout=self._stop_timeout)
        for slot in self._slots:
            slot.actor = slot.where_ref = slot.run_ref = slot.serial_ref = slot.probe_ref = None

    def __enter__(self) -> VmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmkit.ray resources [--slots N]``: the ``--resources``
    value for this node's ``ray start`` (``{}`` without a usable /dev/kvm,
    with the reason on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m vmkit.ray")
    commands = parser.add_subparsers(dest="command", required=True)
    resources = commands.add_parser(
        "resources", help="print this node's resources for ray start --resources"
    )
    resources.add_argument(
        "--slots", type=int, default=None, help="VMs this node may hold (default: its CPU count)"
    )
    args = parser.parse_args(argv)
    try:
        value = node_resources(args.slots)
    except ValueError as e:
        parser.error(f"--slots: {e}")
    if not value:
        print(f"vmkit.ray: this node cannot run VMs: {kvm_problem()}", file=sys.stderr)
    print(json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
