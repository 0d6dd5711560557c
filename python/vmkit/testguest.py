"""The vmkit test guest: a tiny freestanding guest built from ``guest/`` and
shipped inside the extension, that tests a VMM from the inside.

``image_path(fmt)`` gives a file to pass as ``--kernel``; ``cmdline(...)``
builds its command line; ``parse_results(text)`` reads what it printed.
See guest/README.md for the steps and the output format.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vmkit import _native

__all__ = ["FORMATS", "GuestResults", "cmdline", "image_path", "parse_results"]

Format = Literal["pvh", "elf", "bzimage"]
FORMATS: tuple[Format, ...] = ("pvh", "elf", "bzimage")
_SUFFIX = {"pvh": ".elf", "elf": "-nopvh.elf", "bzimage": ".bzImage"}


def _cache_dir() -> Path:
    root = os.environ.get("VMKIT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "vmkit"
    return base / "test-guest"


def image_path(fmt: Format = "pvh") -> Path:
    """A file holding the test guest image (written once per build of vmkit)."""
    data: bytes = _native.test_guest_image(fmt)
    digest = hashlib.sha256(data).hexdigest()[:16]
    directory = _cache_dir()
    path = directory / f"vmkit-guest-{digest}{_SUFFIX[fmt]}"
    if path.exists() and path.stat().st_size == len(data):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def cmdline(
    steps: list[str] | tuple[str, ...] = ("hello",),
    exit: str = "poweroff",
    **options: int | str,
) -> str:
    """The guest's command line: ``steps=a,b exit=... key=value``."""
    words = [f"steps={','.join(steps)}", f"exit={exit}"]
    words += [f"{key}={value}" for key, value in options.items()]
    return " ".join(words)


_STEP = re.compile(r"^vmkit-guest: step (\S+) (ok|fail)(?: (.*))?$")
_SUMMARY = re.compile(r"^vmkit-guest: summary passed=(\d+) failed=(\d+)$")


@dataclass
class GuestResults:
    """What the test guest reported."""

    protocol: str | None = None
    ready: bool = False
    steps: dict[str, tuple[bool, dict[str, str], str]] = field(default_factory=dict)
    passed: int | None = None
    failed: int | None = None
    exit: str | None = None
    lines: list[str] = field(default_factory=list)

    def ok(self, step: str) -> bool:
        return step in self.steps and self.steps[step][0]

    def values(self, step: str) -> dict[str, str]:
        return self.steps[step][1]


def parse_results(text: str) -> GuestResults:
    """Parses the guest's serial output (see guest/README.md)."""
    results = GuestResults()
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line.startswith("vmkit-guest: "):
            continue
        results.lines.append(line)
        if line.startswith("vmkit-guest: boot protocol="):
            results.protocol = line.split("protocol=", 1)[1].split()[0]
        elif line == "vmkit-guest: ready":
            results.ready = True
        elif m := _STEP.match(line):
            detail = m.group(3) or ""
            values = (
                dict(word.split("=", 1) for word in detail.split() if "=" in word)
                if m.group(2) == "ok"
                else {}
            )
            results.steps[m.group(1)] = (m.group(2) == "ok", values, detail)
        elif m := _SUMMARY.match(line):
            results.passed, results.failed = int(m.group(1)), int(m.group(2))
        elif line.startswith("vmkit-guest: exit "):
            results.exit = line.split("exit ", 1)[1]
    return results
