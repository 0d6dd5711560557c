"""virtio-balloon: how fast memory goes back to the host, vmkit against Cloud
Hypervisor, same test guest, runs interleaved.

Run: ``python benches/bench_balloon.py`` (``--runs N``, ``--mib M``;
``--markdown`` prints the table for RESULTS.md). Needs /dev/kvm and
``../shared/ch/cloud-hypervisor`` (``ch-remote`` beside it).

Each run boots a fresh VMM process with the test guest (1 vCPU, ``--memory
size=<M + 256 MiB>``, ``--balloon size=0``), whose ``balloon`` step takes ``M``
MiB and writes every page of it (the host then backs it: the VMM's resident
memory grows by ``M``), prints ``balloon ready`` and follows the target. The
bench then asks for ``ch-remote resize --balloon <M>M`` (both VMMs get the
real ``ch-remote``) and times the request until the guest reports the whole
balloon inflated (``balloon actual=<pages>`` on its serial file, polled every
millisecond): *inflate*, in MiB/s of guest memory put in the balloon; the
VMM process's resident memory (VmRSS) before and after gives the MiB the host
got back. Then ``resize --balloon 0`` and the time until the guest reports
it empty and wrote its pages again: *deflate*, and the resident memory the
host backs again (the guest then prints ticks for 2 s, so that the VM is still
up while the bench reads it). The guest sends 256 page
numbers per request and waits for each, so both rates include the guest's
driver; on kvm_pvm its CPL0 code is emulated, so compare the ratios.

QEMU is not in this table: its balloon is driven over QMP (``balloon``) with
a different completion signal, and the comparison Cloud Hypervisor's users
ask for is with Cloud Hypervisor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import CH, machine, settled_rss, stop_process, wait_serial_line
from vmkit import testguest

TIMES = "\u00d7"


def vmm_argv(kind: str, api: Path, serial: Path, mib: int) -> list[str]:
    # ticks: the VM stays up (and its memory resident) while the bench reads VmRSS.
    cmdline = testguest.cmdline(
        ["balloon", "ticks"], "poweroff", balloon_mib=mib, balloon_timeout_ms=300_000,
        balloon_lax_len=int(kind == "ch"), ticks=100, tick_ms=20,
    )  # fmt: skip
    common = [
        "--kernel", str(testguest.image_path("pvh")),
        "--cmdline", cmdline,
        "--memory", f"size={mib + 256}M",
        "--serial", f"file={serial}", "--console", "off",
        "--balloon", "size=0",
    ]  # fmt: skip
    if kind == "ch":
        assert CH is not None
        return [str(CH), "--api-socket", f"path={api}", "--seccomp", "false", *common]
    return [sys.executable, "-m", "vmkit", "--api-socket", str(api), *common]


def one_run(kind: str, mib: int) -> dict[str, float]:
    ch_remote = str(Path(str(CH)).with_name("ch-remote"))
    with tempfile.TemporaryDirectory(prefix="vmkit-bench-balloon-") as tmp:
        api, serial = Path(tmp) / "api.sock", Path(tmp) / "serial.txt"
        proc = subprocess.Popen(
            vmm_argv(kind, api, serial, mib),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_serial_line(serial, r"balloon ready")
            full = settled_rss(proc.pid)
            pages = mib * 256

            def resize(size: str) -> float:
                started = time.monotonic()
                subprocess.run(
                    [ch_remote, "--api-socket", str(api), "resize", "--balloon", size],
                    check=True,
                    capture_output=True,
                )
                return started

            started = resize(f"{mib}M")
            inflated, _ = wait_serial_line(serial, rf"balloon actual={pages}$")
            emptied = settled_rss(proc.pid)
            started_back = resize("0")
            deflated, _ = wait_serial_line(
                serial, rf"(?s)balloon actual={pages}\n.*balloon actual=0$"
            )
            refilled = settled_rss(proc.pid)
            proc.wait(60)
            return {
                "inflate": mib / (inflated - started),
                "returned": full - emptied,
                "deflate": mib / (deflated - started_back),
                "taken_back": refilled - emptied,
            }
        finally:
            stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=512, help="MiB put in the balloon")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if CH is None:
        sys.exit("Cloud Hypervisor is not at ../shared/ch: nothing to compare with")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("needs read-write /dev/kvm")
    samples: dict[str, list[dict[str, float]]] = {"vmkit": [], "ch": []}
    for _ in range(args.runs):
        for kind in ("vmkit", "ch"):
            samples[kind].append(one_run(kind, args.mib))
    rows = [
        ("inflate (MiB/s put in the balloon)", "inflate"),
        ("MiB returned to the host (VmRSS)", "returned"),
        ("deflate (MiB/s taken back and written)", "deflate"),
        ("MiB the host backs again (VmRSS)", "taken_back"),
    ]
    print(f"Machine: {machine()}")
    print(f"{args.runs} runs per VMM, interleaved; {args.mib} MiB in the balloon; medians.\n")
    if args.markdown:
        print("| | vmkit | Cloud Hypervisor | vmkit / CH |\n|---|---|---|---|")
    for label, key in rows:
        ours = statistics.median(s[key] for s in samples["vmkit"])
        theirs = statistics.median(s[key] for s in samples["ch"])
        ratio = ours / theirs if theirs else float("nan")
        if args.markdown:
            print(f"| {label} | {ours:.1f} | {theirs:.1f} | {ratio:.2f} {TIMES} |")
        else:
            print(f"{label:42} vmkit {ours:9.1f}  ch {theirs:9.1f}  vmkit/ch {ratio:.2f}")


if __name__ == "__main__":
    main()
