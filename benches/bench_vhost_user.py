"""vhost-user-blk: vmkit and Cloud Hypervisor with the same backend, beside vmkit's built-in
virtio-blk, same test guest, one run.

Run: ``python benches/bench_vhost_user.py`` (``--markdown`` prints the table for
RESULTS.md). Needs Cloud Hypervisor's ``cloud-hypervisor`` and ``vhost_user_block``
(``../shared/ch``).

The guest's ``blkbench`` step (see bench_io.py) drives one queue of 256 entries. The
columns:
- vmkit built-in: ``--disk path=IMG,num_queues=1,queue_size=256`` (its io_uring workers);
- vmkit vhost-user: ``--disk vhost_user=on,socket=S,num_queues=1,queue_size=256`` on
  Cloud Hypervisor's ``vhost_user_block --block-backend path=IMG,socket=S,num_queues=1,
  queue_size=256`` (its defaults: buffered IO, the backend polling its queue);
- Cloud Hypervisor vhost-user: the same option and the same backend;
- Cloud Hypervisor built-in: ``--disk path=IMG,...`` (io_uring).
``--hog`` runs a busy loop per CPU (normal priority) during each boot: the contended case.
Every VM has ``--memory size=512M,shared=on`` (vhost-user needs it; the built-in
columns get the same memory). A fresh backend serves each vhost-user boot (it ends
with its frontend). Each row boots the four in turn, ``--runs`` times, interleaved;
figures are medians, ratios are of medians of the same run. Cloud Hypervisor's guest
gets ``blkbench_lax_len=1`` (it reports a write's data length as its used length), as
does vmkit's vhost-user column (the backend writes that length, not the VMM).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import plots
from bench_io import QUEUE_SIZE, Row, cmdline, make_image, rate, run
from bench_io import plot as io_plot
from machine import CH, Hogs, Runs, machine, wait_listening
from vmkit import testguest

ROWS = [
    Row("read", 128 << 10, 32, 20000),
    Row("write", 128 << 10, 32, 20000),
    Row("randread", 4096, 1, 50000),
    Row("randread", 4096, 32, 150000),
]
COLUMNS = ("vmkit", "vmkit-vu", "ch-vu", "ch")
NAMES = {
    "vmkit": "vmkit built-in",
    "vmkit-vu": "vmkit vhost-user",
    "ch-vu": "Cloud Hypervisor vhost-user",
    "ch": "Cloud Hypervisor built-in",
}


def backend(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            str(CH.parent / "vhost_user_block"), "--block-backend",
            f"path={image},socket={sock},num_queues=1,queue_size={QUEUE_SIZE}",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_listening(sock, process=proc)
    return proc


def command(column: str, kernel: Path, image: Path, sock: Path, row: Row) -> list[str]:
    vhost_user = column.endswith("-vu")
    disk = (
        f"vhost_user=on,socket={sock},num_queues=1,queue_size={QUEUE_SIZE}"
        if vhost_user
        else f"path={image},num_queues=1,queue_size={QUEUE_SIZE}"
    )
    lax = column != "vmkit"
    head = [sys.executable, "-m", "vmkit"] if column.startswith("vmkit") else [str(CH)]
    return [
        *head,
        "--kernel", str(kernel), "--cmdline", cmdline(row, lax_len=lax),
        "--cpus", "boot=1", "--memory", "size=512M,shared=on",
        "--disk", disk, "--serial", "tty", "--console", "off",
    ]  # fmt: skip


#: Boots whose guest saw a request never complete, by column (each is retried, up to twice).
STALLS: dict[str, int] = dict.fromkeys(COLUMNS, 0)


def one_retried(column: str, kernel: Path, image: Path, sock: Path, row: Row) -> float:
    """`one`, again after a boot whose guest gave up on a request that never
    completed (Cloud Hypervisor v37's vhost-user devices lose the first kick
    now and then on a busy host); such boots are counted in STALLS."""
    for attempt in range(3):
        try:
            return one(column, kernel, image, sock, row)
        except RuntimeError as e:
            if "no completion for" not in str(e) or attempt == 2:
                raise
            STALLS[column] += 1
    raise AssertionError("unreachable")


def one(column: str, kernel: Path, image: Path, sock: Path, row: Row) -> float:
    proc = backend(image, sock) if column.endswith("-vu") else None
    try:
        requests, _ticks, ns = run(command(column, kernel, image, sock, row))
    finally:
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if ns is None:
        raise RuntimeError("the guest did not time its run in ns (no TSC frequency)")
    return rate(row, requests, ns / 1e9)


def plot(
    path: Path,
    hog: bool,
    rows: list[str],
    units: list[str],
    figures: dict[str, list[float]],
    spread: dict[str, list[tuple[float, float]]],
    subtitle: str,
) -> Path | None:
    """The vhost-user chart: bench_io's, a bar per column (same backend for both VMMs)."""
    mode = "a busy loop per CPU" if hog else "idle host"
    return io_plot(
        path, f"vhost-user-blk beside built-in, {mode}", rows, units, figures, spread, subtitle
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every request count")
    parser.add_argument("--hog", action="store_true", help="a busy loop per CPU during each boot")
    parser.add_argument(
        "--plot", type=Path, help="the chart (PNG) to write (default: plots/vhost_user-MODE.png)"
    )
    args = parser.parse_args()
    if not CH.is_file() or not (CH.parent / "vhost_user_block").is_file():
        print(f"needs {CH} and vhost_user_block beside it", file=sys.stderr)
        return 2
    kernel = testguest.image_path("pvh")
    table: list[tuple[Row, dict[str, list[float]]]] = []
    runs = Runs("bench_vhost_user", len(ROWS) * args.runs * len(COLUMNS))
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        sock = Path(tmp) / "blk.sock"
        make_image(image)
        with runs:
            for base in ROWS:
                row = Row(base.mode, base.size, base.depth, max(1, int(base.count * args.scale)))
                figures: dict[str, list[float]] = {c: [] for c in COLUMNS}
                for i in range(args.runs):
                    for column in COLUMNS:
                        runs.start(f"{row.label}, run {i + 1}/{args.runs}, {NAMES[column]}")
                        with Hogs(args.hog):
                            figures[column].append(one_retried(column, kernel, image, sock, row))
                table.append((row, figures))
                med = {c: statistics.median(v) for c, v in figures.items()}
                runs.print(
                    f"{row.label}: "
                    + ", ".join(f"{NAMES[c]} {med[c]:.0f} {row.unit}" for c in COLUMNS)
                    + f"; vmkit-vu/ch-vu {med['vmkit-vu'] / med['ch-vu']:.2f}x"
                    + f", vmkit-vu/vmkit {med['vmkit-vu'] / med['vmkit']:.2f}x"
                )
    if args.markdown:
        hog = ", a busy loop per CPU" if args.hog else ""
        print(f"\nMachine: {machine()}{hog}; {args.runs} runs per cell, medians.\n")
        print(
            "| row | " + " | ".join(NAMES[c] for c in COLUMNS)
            + " | vmkit vu / CH vu | vmkit vu / vmkit built-in |"
        )  # fmt: skip
        print("|---|" + "---:|" * (len(COLUMNS) + 2))
        for row, figures in table:
            med = {c: statistics.median(v) for c, v in figures.items()}
            cells = " | ".join(f"{med[c]:,.0f} {row.unit}" for c in COLUMNS)
            print(
                f"| {row.label} | {cells} | {med['vmkit-vu'] / med['ch-vu']:.2f}x "
                f"| {med['vmkit-vu'] / med['vmkit']:.2f}x |"
            )
    plots.wrote(
        plot(
            args.plot or plots.PLOT_DIR / f"vhost_user-{'hog' if args.hog else 'idle'}.png",
            args.hog,
            [row.label for row, _ in table],
            [row.unit for row, _ in table],
            {NAMES[c]: [statistics.median(f[c]) for _, f in table] for c in COLUMNS},
            {NAMES[c]: [plots.spread(f[c]) for _, f in table] for c in COLUMNS},
            f"{machine()}\nmedians of {args.runs} runs per cell; whiskers: lowest to highest run",
        )
    )
    stalls = ", ".join(f"{NAMES[c]} {n}" for c, n in STALLS.items() if n)
    if stalls:
        print(f"\nBoots retried after a request that never completed: {stalls}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
