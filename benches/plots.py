"""PNG plots of what the benchmarks measure, beside RESULTS.md (``benches/plots/``).

matplotlib is optional (``pip install 'vmkit[bench]'``): without it the
benchmarks run as before and say, once, that plots were skipped. Each chart
names the machine, the unit on its axis and the VMMs in its legend; whiskers,
where drawn, span the runs' lowest to highest figure around the median.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

#: Where the benchmarks write their plots, and plot_results.py the committed ones.
PLOT_DIR = Path(__file__).resolve().parent / "plots"

#: One colour per VMM across every chart; others take matplotlib's cycle.
COLOURS = {
    "vmkit": "#1f77b4",
    "vmkit built-in": "#1f77b4",
    "vmkit vhost-user": "#6baed6",
    "vmkit --cpu-groups": "#6baed6",
    "vmkit CLI": "#9467bd",
    "Vm.spawn": "#1f77b4",
    "in process": "#17becf",
    "Cloud Hypervisor": "#ff7f0e",
    "Cloud Hypervisor built-in": "#ff7f0e",
    "Cloud Hypervisor vhost-user": "#fdae6b",
    "QEMU microvm": "#2ca02c",
    "QEMU q35": "#2ca02c",
    "QEMU pc": "#98df8a",
    "host thread": "#7f7f7f",
}

_warned = False


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend; None, said once on stderr,
    when matplotlib is not installed."""
    global _warned
    try:
        import matplotlib
    except ImportError:
        if not _warned:
            print(
                "matplotlib is not installed: plots skipped (pip install 'vmkit[bench]')",
                file=sys.stderr,
            )
            _warned = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Bars:
    """One panel of horizontal bars: a group per row, a bar per series."""

    title: str
    axis: str  # what the value axis shows, with its unit
    rows: list[str]
    series: dict[str, list[float]]  # series -> value per row (NaN: not measured)
    spread: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    log: bool = False


@dataclass
class Lines:
    """One panel of lines: a line per series over x."""

    title: str
    axis: str
    x_axis: str
    series: dict[str, list[tuple[float, float]]]  # series -> (x, y) points
    spread: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # per point


def _header(fig: Any, title: str, subtitle: str) -> None:
    """The title and, under it, the machine and how the figures were taken; the panels
    are laid out below them."""
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.06 / height, va="top")
    fig.text(0.5, 1 - 0.36 / height, subtitle, ha="center", va="top", fontsize=8, color="#444444")


def _whisker(length: float) -> float:
    return 0.0 if math.isnan(length) else max(length, 0.0)


def _label(value: float) -> str:
    if value >= 10000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _save(plt: ModuleType, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def bar_chart(path: Path, title: str, subtitle: str, panels: Sequence[Bars]) -> Path | None:
    """Writes the panels, one above the other, to the PNG ``path``; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    heights = [1.0 + 0.32 * len(p.rows) * max(len(p.series), 1) for p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11.5, 1.1 + sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        names = list(panel.series)
        width = 0.8 / max(len(names), 1)
        highs = [hi for got in panel.spread.values() for _, hi in got]
        top = max(
            (v for v in [*highs, *(v for vs in panel.series.values() for v in vs)] if v == v),
            default=1.0,
        )
        for i, name in enumerate(names):
            values = panel.series[name]
            ys = [r + (i - (len(names) - 1) / 2) * width for r in range(len(panel.rows))]
            xerr = None
            if name in panel.spread:
                pairs = list(zip(values, panel.spread[name], strict=True))
                xerr = [
                    [_whisker(v - lo) for v, (lo, _) in pairs],
                    [_whisker(hi - v) for v, (_, hi) in pairs],
                ]
            ax.barh(
                ys,
                [0.0 if math.isnan(v) else v for v in values],
                height=width * 0.92,
                color=COLOURS.get(name),
                label=name,
                xerr=xerr,
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"},
            )
            ends = [hi for _, hi in panel.spread.get(name, [])] or values
            for y, v, end in zip(ys, values, ends, strict=True):
                text = "n/a" if math.isnan(v) else _label(v)
                ax.annotate(
                    text,
                    (0 if math.isnan(v) else max(v, end if end == end else v), y),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                    color="#222222",
                )
        ax.set_yticks(range(len(panel.rows)))
        ax.set_yticklabels(panel.rows, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlabel(panel.axis, fontsize=9)
        if panel.log:
            ax.set_xscale("log")
            ax.set_xlim(right=top * 4)
        else:
            ax.set_xlim(0, top * 1.18)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), framealpha=0.9)
    _header(fig, title, subtitle)
    return _save(plt, fig, path)


def line_chart(path: Path, title: str, subtitle: str, panels: Sequence[Lines]) -> Path | None:
    """Writes the panels side by side to the PNG ``path``; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        xs_all: set[float] = set()
        for name, points in panel.series.items():
            points = sorted(p for p in points if not math.isnan(p[1]))
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [y for _, y in points]
            xs_all.update(xs)
            yerr = None
            if name in panel.spread:
                spread = dict(zip(xs, panel.spread[name], strict=False))
                yerr = [
                    [_whisker(y - spread.get(x, (y, y))[0]) for x, y in points],
                    [_whisker(spread.get(x, (y, y))[1] - y) for x, y in points],
                ]
            ax.errorbar(
                xs,
                ys,
                yerr=yerr,
                marker="o",
                markersize=4,
                linewidth=1.4,
                capsize=2,
                color=COLOURS.get(name),
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all))
        ax.set_xticklabels([f"{x:g}" for x in sorted(xs_all)], fontsize=8)
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlabel(panel.x_axis, fontsize=9)
        ax.set_ylabel(panel.axis, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(color="#dddddd", linewidth=0.6)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=7, framealpha=0.9)
    _header(fig, title, subtitle)
    return _save(plt, fig, path)


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(lowest, highest) of a cell's runs, for the whiskers."""
    finite = [v for v in values if not math.isnan(v)]
    return (min(finite), max(finite)) if finite else (math.nan, math.nan)


def wrote(path: Path | None) -> None:
    """Says on stderr where a plot went (stdout carries the tables)."""
    if path is not None:
        print(f"plot: {path}", file=sys.stderr)
