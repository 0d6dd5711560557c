"""virtio-fs throughput: vmkit and Cloud Hypervisor on the same virtiofsd, same test guest,
one run.

Run: ``python benches/bench_fs.py`` (``--markdown`` prints the table for RESULTS.md).
Needs ``virtiofsd`` on PATH (``cargo install virtiofsd``) and Cloud Hypervisor
(``../shared/ch/cloud-hypervisor``).

The guest's ``fs`` step with ``fs_rounds=N`` reads a 1 MiB host file N times and writes
its own 1 MiB file N times, one FUSE request of 64 KiB at a time on request queue 0
(polled), and reports how long its READ and WRITE loops took (rdtsc). Each boot gets a
fresh ``virtiofsd --cache=never --sandbox=none`` on a folder of its own (the host file
is in the page cache). Cloud Hypervisor v37 refuses virtiofsd 1.11+'s protocol
features, so it talks to virtiofsd through ``tests/_vuproxy.py``, which relays the
vhost-user socket and hides one feature bit; the data path (guest memory and the
queues' eventfds) does not go through it. The VMMs' boots interleave; figures are
medians, ratios are of medians of the same run. ``--hog`` runs a busy loop per CPU during
each boot (the contended case).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import CH, Hogs, Runs, machine, wait_listening
from vmkit import testguest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _vuproxy import ProtocolFeatureMask

FILE_BYTES = 1 << 20
BENCH = re.compile(
    r"fs bench rounds=\d+ chunk=(\d+) read_bytes=(\d+) read_tsc=\d+ write_bytes=(\d+) "
    r"write_tsc=\d+ read_ns=(\d+) write_ns=(\d+)"
)
COLUMNS = ("vmkit", "ch")
NAMES = {"vmkit": "vmkit", "ch": "Cloud Hypervisor"}


def virtiofsd(share: Path, sock: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("virtiofsd")
    assert binary is not None
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [binary, f"--socket-path={sock}", f"--shared-dir={share}", "--cache=never",
         "--sandbox=none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_listening(sock, process=proc)
    return proc


def one(column: str, tmp: Path, rounds: int) -> tuple[float, float, int]:
    """(read MB/s, write MB/s, bytes per request) of one boot."""
    share = tmp / "share"
    share.mkdir(exist_ok=True)
    (share / "host.txt").write_bytes(os.urandom(FILE_BYTES))
    daemon = virtiofsd(share, tmp / "fs.sock")
    try:
        cmdline = testguest.cmdline(["fs"], "poweroff", fs_rounds=rounds, fs_bytes=FILE_BYTES)
        args = [
            "--kernel", str(testguest.image_path("pvh")), "--cmdline", cmdline,
            "--cpus", "boot=1", "--memory", "size=512M,shared=on",
            "--serial", "tty", "--console", "off",
        ]  # fmt: skip
        if column == "vmkit":
            argv = [sys.executable, "-m", "vmkit", *args, "--fs", f"tag=b,socket={tmp}/fs.sock"]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        else:
            with ProtocolFeatureMask(tmp / "relay.sock", tmp / "fs.sock") as relay:
                argv = [str(CH), *args, "--fs", f"tag=b,socket={relay.path}"]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    finally:
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    m = BENCH.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"{column} exited with {out.returncode}:\n{out.stdout[-2000:]}")
    chunk, read_bytes, write_bytes, read_ns, write_ns = (int(g) for g in m.groups())
    return read_bytes / read_ns * 1e3, write_bytes / write_ns * 1e3, chunk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50, help="1 MiB reads and writes per boot")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during each boot")
    args = parser.parse_args()
    if shutil.which("virtiofsd") is None or not CH.is_file():
        print(f"needs virtiofsd on PATH and {CH}", file=sys.stderr)
        return 2
    reads: dict[str, list[float]] = {c: [] for c in COLUMNS}
    writes: dict[str, list[float]] = {c: [] for c in COLUMNS}
    chunk = 0
    runs = Runs("bench_fs", args.runs * len(COLUMNS))
    with tempfile.TemporaryDirectory() as tmp, runs:
        for i in range(args.runs):
            for column in COLUMNS:
                runs.start(f"run {i + 1}/{args.runs}, {column}")
                with Hogs(args.hog):
                    read, write, chunk = one(column, Path(tmp), args.rounds)
                reads[column].append(read)
                writes[column].append(write)
    rows = [("read", reads), ("write", writes)]
    for label, figures in rows:
        med = {c: statistics.median(v) for c, v in figures.items()}
        print(
            f"{label} {chunk // 1024} KiB requests: vmkit {med['vmkit']:.0f} MB/s, "
            f"Cloud Hypervisor {med['ch']:.0f} MB/s, {med['vmkit'] / med['ch']:.2f}x"
        )
    if args.markdown:
        hog = ", a busy loop per CPU" if args.hog else ""
        print(
            f"\nMachine: {machine()}{hog}; {args.runs} boots per VMM, {args.rounds} MiB each way.\n"
        )
        print("| row | vmkit | Cloud Hypervisor | vmkit / CH |")
        print("|---|---:|---:|---:|")
        for label, figures in rows:
            med = {c: statistics.median(v) for c, v in figures.items()}
            print(
                f"| {label}, {chunk // 1024} KiB requests, one in flight | {med['vmkit']:.0f} MB/s "
                f"| {med['ch']:.0f} MB/s | {med['vmkit'] / med['ch']:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
