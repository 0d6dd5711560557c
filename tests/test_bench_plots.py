"""The benchmarks' PNG plots (benches/plots.py and each bench's ``plot``), fed small
synthetic figures, and benches/plot_results.py reading RESULTS.md's tables; without
matplotlib the plots are skipped with a message and nothing fails.
"""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))

import plot_results  # noqa: E402
import plots  # noqa: E402

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

needs_matplotlib = pytest.mark.skipif(
    not HAVE_MATPLOTLIB, reason="matplotlib is not installed (pip install '.[bench]')"
)
MACHINE = "Test CPU, 2 CPUs, Linux 6.1, /dev/kvm: kvm_pvm, Python 3.11.7, vmkit 0.1.0"
LIMIT = 150_000  # bytes a committed plot may take


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; fails if the file is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) < LIMIT, f"{path} is {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@needs_matplotlib
def test_bench_boot_plot(tmp_path: Path) -> None:
    import bench_boot

    stages = ["process start → first guest instruction", "process start → guest ready line"]
    path = bench_boot.plot(
        tmp_path / "boot.png",
        stages,
        {"vmkit": [28.6, 32.1], "Cloud Hypervisor": [10.4, 13.8], "QEMU pc": [2710.9, 2714.2]},
        {"vmkit": [(27.0, 30.0), (31.0, 35.0)]},
        [1.9, 4.4],
        [(1.8, 2.0), (4.1, 4.9)],
        {"vmkit": 8.3, "Cloud Hypervisor": 8.5},
        {"vmkit": (8.1, 8.6)},
        MACHINE,
    )
    assert path == tmp_path / "boot.png"
    width, height = png_size(path)
    assert width > 800 and height > 500


@needs_matplotlib
def test_bench_io_and_vhost_user_plots_split_units_and_leave_missing_cells_empty(
    tmp_path: Path,
) -> None:
    import bench_io
    import bench_vhost_user

    rows = ["sequential read 128 KiB, depth 1", "random read 4 KiB, depth 1"]
    figures = {
        "vmkit": [10356.3, 358742.6],
        "QEMU q35": [3976.6, 42933.7],
        "host thread": [12306.6, math.nan],  # not measured for random rows
    }
    spread = {
        "vmkit": [(9000.0, 11000.0), (300000.0, 360000.0)],
        "host thread": [(1.0, 2.0), (math.nan, math.nan)],
    }
    path = bench_io.plot(
        tmp_path / "io.png", "idle host", rows, ["MB/s", "IOPS"], figures, spread, MACHINE
    )
    assert path is not None
    png_size(path)
    path = bench_vhost_user.plot(
        tmp_path / "vu.png", True, rows, ["MB/s", "IOPS"],
        {name: [1.0, 2.0] for name in bench_vhost_user.NAMES.values()}, {}, MACHINE,
    )  # fmt: skip
    assert path is not None
    png_size(path)


@needs_matplotlib
def test_bench_density_plot(tmp_path: Path) -> None:
    import bench_density

    points = {
        what: {"Vm.spawn": [(1, 0.01), (4, 0.03)], "Cloud Hypervisor": [(1, 0.014), (4, math.nan)]}
        for what in ("start", "memory", "stop")
    }
    spread = {"start": {"Vm.spawn": [(0.009, 0.012), (0.02, 0.04)]}}
    path = bench_density.plot(tmp_path / "density.png", points, spread, MACHINE)
    assert path is not None
    png_size(path)


def test_results_tables_are_read_with_their_figures_and_machine() -> None:
    found = plot_results.sections((BENCHES / "RESULTS.md").read_text())
    io = plot_results.find(found, "Block IO under contention, third pass")
    idle = next(t for t in io.tables if "Idle host" in t.caption)
    first = idle.rows[0]
    assert first[0] == "sequential read 128 KiB, depth 1"
    assert plot_results.number(first[idle.column("vmkit")]) == 10356.3
    assert plot_results.number(first[idle.column("QEMU q35")]) == 3976.6
    assert io.machine.startswith("AMD EPYC, 2 CPUs, Linux ") and io.machine.endswith("3.11.7")
    vu = plot_results.find(found, "vhost-user-blk and virtio-fs")
    assert vu.machine.startswith("Intel(R) Xeon(R) Processor, 2 CPUs")
    assert plot_results.number("2.80 \u00d7 (1.75\u20132.80)") == 2.80
    assert math.isnan(plot_results.number("—"))
    with pytest.raises(LookupError, match="no section titled with 'nothing like this'"):
        plot_results.find(found, "nothing like this")


@needs_matplotlib
def test_plot_results_draws_every_committed_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["plot_results.py", "--out", str(tmp_path)])
    assert plot_results.main() == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (BENCHES / "plots").glob("*.png"))
    assert capsys.readouterr().out.split() == [str(tmp_path / name) for name in [
        "boot.png", "io-vms4.png", "io-hog.png", "io-idle.png",
        "vhost_user-idle.png", "vhost_user-hog.png", "density.png",
    ]]  # fmt: skip
    for name in written:
        png_size(tmp_path / name)


def test_without_matplotlib_plots_are_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setattr(plots, "_warned", False)
    bars = plots.Bars("t", "ms", ["row"], {"vmkit": [1.0]})
    assert plots.bar_chart(tmp_path / "a.png", "title", MACHINE, [bars]) is None
    assert plots.bar_chart(tmp_path / "b.png", "title", MACHINE, [bars]) is None
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "matplotlib is not installed: plots skipped (pip install 'vmkit[bench]')\n"
    assert not list(tmp_path.iterdir())
