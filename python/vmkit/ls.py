"""``vmkit ls``: the running VMMs of this user, as ``docker ps`` lists containers.

    vmkit ls [--json] [-q] [--timeout SECONDS]

Each VMM in the registry (``vmkit.registry``) is asked for ``vm.info`` on
its API socket, all at once, each within the timeout: a VMM that does not
answer in time is listed as ``unresponsive`` and does not hold up the rest.
Entries of VMMs that are gone are removed, not listed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time

from vmkit import registry
from vmkit._record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["VmListing", "list_vms", "run"]

#: How long ``ls`` waits for the VMMs' answers (seconds).
DEFAULT_TIMEOUT = 1.0

#: STATE of a VMM that serves its API but holds no VM (none created yet, or deleted).
IDLE = "idle"
#: STATE of a VMM that did not answer in time (stopped, hung, or its socket gone).
UNRESPONSIVE = "unresponsive"


@record(frozen=True)
class VmListing:
    """One running VMM, as ``vmkit ls`` shows it.

    ``state`` is the VM's (``Created``, ``Running``, ``Paused``,
    ``Shutdown``), ``idle`` for a VMM without a VM, or ``unresponsive``
    (``error`` says why). ``vcpus`` and ``memory`` (bytes) are the VM's, None
    when there is no VM or no answer. ``uptime`` is the VMM process's age in
    seconds. ``kernel`` is the VM's kernel (as the VMM reports it, else as it
    was registered).
    """

    name: str
    pid: int
    state: str
    vcpus: int | None
    memory: int | None
    uptime: float
    kernel: str | None
    api_socket: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "state": self.state,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "uptime": round(self.uptime, 3),
            "kernel": self.kernel,
            "api_socket": self.api_socket,
            "error": self.error,
        }


def _ask(entry: registry.Entry, timeout: float) -> VmListing:
    """``entry``'s VMM's answer to ``vm.info``, as a listing."""
    from vmkit import _apiwire

    def listing(state: str, **fields: Any) -> VmListing:
        values: dict[str, Any] = {"vcpus": None, "memory": None, "kernel": entry.kernel}
        values.update(fields)
        return VmListing(
            name=entry.name,
            pid=entry.pid,
            state=state,
            uptime=entry.uptime(),
            api_socket=entry.api_socket,
            **values,
        )

    began = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(entry.api_socket)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = struct.unpack("3i", creds)[0]
        if peer != entry.pid:
            # Not this VMM's socket any more: its answer would describe another VMM.
            return listing(UNRESPONSIVE, error=f"its socket is served by process {peer}")
        _apiwire.send_request(sock, "GET", "vm.info")
        response = _apiwire.read_response(sock)
    except (OSError, _apiwire.WireError) as e:
        if isinstance(e, TimeoutError) or time.monotonic() - began >= timeout:
            error = "no answer in time"  # the wire layer words a timeout its own way
        elif isinstance(e, OSError):
            error = _apiwire.io_error_text(e)
        else:
            error = str(e)
        return listing(UNRESPONSIVE, error=error)
    finally:
        sock.close()
    if not response.ok:
        # v37 answers vm.info with an error while no VM is created.
        return listing(IDLE)
    try:
        info = json.loads(response.body or b"")
        config = info["config"]
        state = str(info["state"])
        vcpus = int(config["cpus"]["boot_vcpus"])
        memory = info.get("memory_actual_size")
        if memory is None:
            memory = config["memory"]["size"]
        payload = config.get("payload") or {}
        kernel = payload.get("kernel") or entry.kernel
    except (ValueError, KeyError, TypeError) as e:
        return listing(UNRESPONSIVE, error=f"invalid vm.info answer: {e}")
    return listing(state, vcpus=vcpus, memory=int(memory), kernel=kernel)


def list_vms(timeout: float = DEFAULT_TIMEOUT) -> list[VmListing]:
    """The running VMMs registered by this user (``vmkit ls``), by name.

    Every VMM is asked at once; one that has not answered within
    ``timeout`` seconds is listed as ``unresponsive``, so the call returns
    in about ``timeout`` at most however many VMMs hang. Entries of VMMs
    that are gone are removed, and so are the directories (in this
    program's temporary directory) of ``Vm.spawn`` VMs whose spawning program
    is gone. Raises ``vmkit.registry.RegistryError`` when
    the registry directory is unsafe (owned by another user, writable by
    others).
    """
    found = registry.entries()
    results: list[VmListing | None] = [None] * len(found)

    def ask(index: int, entry: registry.Entry) -> None:
        results[index] = _ask(entry, timeout)

    # A thread each (daemons: one stuck past the deadline is abandoned,
    # and its socket's timeout ends it soon after).
    threads = [
        threading.Thread(target=ask, args=(i, entry), name=f"ls-{entry.pid}", daemon=True)
        for i, entry in enumerate(found)
    ]
    for thread in threads:
        thread.start()
    registry.remove_orphaned_spawn_dirs(
        tempfile.gettempdir(), {entry.spawn_dir for entry in found if entry.spawn_dir is not None}
    )
    deadline = time.monotonic() + timeout + 0.2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    listings = []
    for entry, result in zip(found, results, strict=True):
        if result is None:
            result = VmListing(
                name=entry.name,
                pid=entry.pid,
                state=UNRESPONSIVE,
                vcpus=None,
                memory=None,
                uptime=entry.uptime(),
                kernel=entry.kernel,
                api_socket=entry.api_socket,
                error="no answer in time",
            )
        listings.append(result)
    return listings


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(listings: Sequence[VmListing]) -> str:
    """The listings as ``vmkit ls`` prints them."""
    header = ("NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME", "KERNEL", "SOCKET")
    rows = [header]
    for vm in listings:
        rows.append(
            (
                vm.name,
                str(vm.pid),
                vm.state,
                "-" if vm.vcpus is None else str(vm.vcpus),
                _size(vm.memory),
                _duration(vm.uptime),
                os.path.basename(vm.kernel) if vm.kernel else "-",
                vm.api_socket,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def run(argv: Sequence[str]) -> int:
    """``vmkit ls``: 0, or 1 when the registry cannot be read (2: usage)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vmkit ls",
        description="List the VMMs this user runs with an API socket (vmkit --api-socket, "
        "Vm.spawn), with their VM's state, vCPUs and memory.",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON array of objects")
    output.add_argument("-q", "--quiet", action="store_true", help="print only the names")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the VMMs' answers (default {DEFAULT_TIMEOUT})",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    if not args.timeout > 0:
        print(f"vmkit ls: error: --timeout {args.timeout}: must be above 0", file=sys.stderr)
        return 2
    try:
        listings = list_vms(args.timeout) if not args.quiet else None
        names = (
            [entry.name for entry in registry.entries()]
            if listings is None
            else [vm.name for vm in listings]
        )
    except registry.RegistryError as e:
        print(f"vmkit ls: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        assert listings is not None
        print(json.dumps([vm.to_dict() for vm in listings], indent=2))
    elif args.quiet:
        if names:
            print("\n".join(names))
    else:
        assert listings is not None
        print(table(listings))
    return 0
