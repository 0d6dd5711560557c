"""What listing a VM in the registry (``vmkit ls``) costs a VMM's start, with N VMs already listed.

Run: ``python benches/bench_registry.py`` (``--counts 0,32,128,512``,
``--rounds R``, ``--markdown``). Every VMM with an API socket (``vmkit
--api-socket``, ``Vm.spawn``) checks its name and writes its entry as it starts,
and removes the entry as it ends; a fleet started at once does that N times.
The registry is a fresh one in a temporary ``XDG_RUNTIME_DIR``, filled with N
entries of this (live) process. Figures: medians over ``--rounds`` of one
``check_name_free`` + ``register``, of one ``Registration.remove``, and of
``entries()`` (what ``vmkit ls`` reads), each with N entries there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from machine import machine
from vmkit import registry


def measure(count: int, rounds: int) -> dict[str, float]:
    """Medians in microseconds, with ``count`` live entries in the registry."""
    pid = os.getpid()
    listed = [registry.register(f"listed-{i}", pid, "/tmp/a.sock", None) for i in range(count)]
    starts, removes, listings = [], [], []
    try:
        for i in range(rounds):
            name = f"new-{i}"
            begun = time.perf_counter()
            registry.check_name_free(name)
            entry = registry.register(name, pid, "/tmp/b.sock", None)
            registered = time.perf_counter()
            entry.remove()
            removed = time.perf_counter()
            registry.entries()
            listings.append(time.perf_counter() - removed)
            starts.append(registered - begun)
            removes.append(removed - registered)
    finally:
        for entry in listed:
            entry.remove()
    return {
        "name check + register": statistics.median(starts) * 1e6,
        "remove": statistics.median(removes) * 1e6,
        "entries() (vmkit ls)": statistics.median(listings) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="0,32,128,512")
    parser.add_argument("--rounds", type=int, default=51)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as runtime:
        os.chmod(runtime, 0o700)
        os.environ["XDG_RUNTIME_DIR"] = runtime
        results = {count: measure(count, args.rounds) for count in counts}
    print(f"Machine: {machine(with_kvm=False)}")
    rows = list(next(iter(results.values())))
    if args.markdown:
        print("| VMs listed | " + " | ".join(rows) + " |")
        print("|---|" + "---|" * len(rows))
        for count, figures in results.items():
            print(f"| {count} | " + " | ".join(f"{figures[r]:.0f} µs" for r in rows) + " |")
        return
    for count, figures in results.items():
        print(f"{count:5} listed: " + ", ".join(f"{r} {figures[r]:.0f} µs" for r in rows))


if __name__ == "__main__":
    main()
