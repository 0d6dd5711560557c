"""Draws benches/plots/*.png from the tables in benches/RESULTS.md, without running a
benchmark, so that the committed plots show the committed figures.

Run: ``python benches/plot_results.py`` (needs matplotlib: ``pip install
'vmkit[bench]'``). Each plot takes the newest section of RESULTS.md holding its
table (named in SOURCES below) and the machine that section names; the
benchmarks draw the same charts from their own runs (with the runs' spread).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import plots

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Table:
    caption: str  # the paragraph line just above the table
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int:
        return self.header.index(name)


@dataclass
class Section:
    title: str
    text: str
    tables: list[Table]

    @property
    def machine(self) -> str:
        """The machine the section names (CPU ... Python version), on one line."""
        flat = " ".join(self.text.replace("`", "").split())
        m = re.search(r"Machine: (.*?Python \d+\.\d+\.\d+)", flat) or re.search(
            r"((?:AMD|Intel)(?:[^;()]|\(R\))*?Python \d+\.\d+\.\d+)", flat
        )
        return m.group(1) if m else "machine not named in RESULTS.md"

    @property
    def date(self) -> str:
        m = re.search(r"\d{4}-\d{2}-\d{2}", self.title)
        return m.group(0) if m else ""


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def sections(markdown: str) -> list[Section]:
    """Every ``## `` section with its markdown tables, in file order."""
    found: list[Section] = []
    for chunk in re.split(r"^## ", markdown, flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        tables: list[Table] = []
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
                caption = next(
                    (lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), ""
                ).strip()
                header = _cells(lines[i])
                rows = []
                i += 2
                while i < len(lines) and lines[i].startswith("|"):
                    rows.append(_cells(lines[i]))
                    i += 1
                tables.append(Table(caption, header, rows))
            else:
                i += 1
        found.append(Section(title.strip(), body, tables))
    return found


def number(cell: str) -> float:
    """The figure a cell starts with (``10,356.3 MB/s``, ``39 ms``, a ratio with its
    range after it); NaN if none (``—``, empty)."""
    m = re.match(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)", cell)
    return float(m.group(1).replace(",", "")) if m else math.nan


def find(all_sections: list[Section], title_part: str) -> Section:
    for section in all_sections:
        if title_part in section.title:
            return section
    raise LookupError(f"RESULTS.md has no section titled with {title_part!r}")


def subtitle(section: Section, how: str) -> str:
    return f"{section.machine}\n{how}; from RESULTS.md, {section.date}"


# -- the plots -----------------------------------------------------------------------


def boot(all_sections: list[Section], out: Path) -> list[Path | None]:
    import bench_boot

    section = find(all_sections, "Boot after the split irqchip, with Cloud Hypervisor")
    stages, inproc, pio = section.tables[0], section.tables[1], section.tables[2]
    peers = [h[: -len(" ms")] for h in stages.header[1:] if h.endswith(" ms")]
    figures = {
        peer: [number(row[stages.column(f"{peer} ms")]) for row in stages.rows] for peer in peers
    }
    ready = [number(row[1]) for row in inproc.rows]
    pio_peers = [h[: -len(" µs")] for h in pio.header[1:] if h.endswith(" µs")]
    pio_us = {peer: number(pio.rows[0][pio.column(f"{peer} µs")]) for peer in pio_peers}
    return [
        bench_boot.plot(
            out / "boot.png",
            [row[0] for row in stages.rows],
            figures,
            {},
            ready,
            (),
            pio_us,
            {},
            subtitle(section, "medians of 15 interleaved runs; port I/O: medians of 5"),
        )
    ]


def io(all_sections: list[Section], out: Path) -> list[Path | None]:
    import bench_io

    section = find(all_sections, "Block IO under contention, third pass")
    modes = {
        "4 VMs per VMM": ("vms4", "4 VMs per VMM doing IO at once (aggregate)"),
        "busy loop": ("hog", "a busy loop on each of the 2 CPUs"),
        "Idle host": ("idle", "idle host, one VM"),
    }
    written = []
    for table in section.tables:
        mode = next((m for key, m in modes.items() if key in table.caption), None)
        if mode is None:
            continue
        vmms = [h for h in table.header[1:] if f"{h} CPU s/GiB" in table.header]
        if "host thread" in table.header:
            vmms.append("host thread")
        rows = [row[0] for row in table.rows]
        units = ["IOPS" if "IOPS" in row[1] else "MB/s" for row in table.rows]
        figures = {v: [number(row[table.column(v)]) for row in table.rows] for v in vmms}
        written.append(
            bench_io.plot(
                out / f"io-{mode[0]}.png",
                mode[1],
                rows,
                units,
                figures,
                {},
                subtitle(section, "medians of 3 runs per cell"),
            )
        )
    return written


def vhost_user(all_sections: list[Section], out: Path) -> list[Path | None]:
    import bench_vhost_user

    section = find(all_sections, "vhost-user-blk and virtio-fs beside Cloud Hypervisor")
    written = []
    for table in section.tables:
        if "vhost-user-blk" not in table.caption:
            continue
        hog = "--hog" in table.caption
        columns = [h for h in table.header[1:] if h in bench_vhost_user.NAMES.values()]
        figures = {c: [number(row[table.column(c)]) for row in table.rows] for c in columns}
        units = ["IOPS" if "IOPS" in row[1] else "MB/s" for row in table.rows]
        written.append(
            bench_vhost_user.plot(
                out / f"vhost_user-{'hog' if hog else 'idle'}.png",
                hog,
                [row[0] for row in table.rows],
                units,
                figures,
                {},
                subtitle(section, f"medians of {3 if hog else 5} runs per cell"),
            )
        )
    return written


def density(all_sections: list[Section], out: Path) -> list[Path | None]:
    import bench_density

    section = find(all_sections, "Fleet, second pass")
    table = section.tables[0]
    what = {"start": 2, "memory": 4, "stop": 6}
    points: dict[str, dict[str, list[tuple[float, float]]]] = {w: {} for w in what}
    for row in table.rows:
        count, mode = number(row[0]), row[1]
        for key, col in what.items():
            value = number(row[col])
            if key != "memory":
                value /= 1e3  # the table's ms; the plot takes seconds as the bench measures
            points[key].setdefault(mode, []).append((count, value))
    return [
        bench_density.plot(
            out / "density.png", points, {}, subtitle(section, "medians of 3 interleaved rounds")
        )
    ]


SOURCES: dict[str, Callable[[list[Section], Path], list[Path | None]]] = {
    "boot": boot,
    "io": io,
    "vhost_user": vhost_user,
    "density": density,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown to read")
    parser.add_argument("--out", type=Path, default=plots.PLOT_DIR, help="where the PNGs go")
    parser.add_argument("--only", action="append", choices=list(SOURCES), help="only these")
    args = parser.parse_args()
    if plots.pyplot() is None:
        return 1
    found = sections(args.results.read_text())
    for name in args.only or SOURCES:
        for path in SOURCES[name](found, args.out):
            if path is not None:
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
