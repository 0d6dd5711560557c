"""The temporary directories ``Vm.spawn`` makes, watched by one test process.

Under pytest-xdist the other workers spawn VMs into the same /tmp at the same
time: a test that checks that nothing is left behind gives its own process a
temporary directory of its own (``own_tempdir``) and looks only there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def own_tempdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short: the VMs' API sockets go below it (108 bytes at most).
    path = Path(tempfile.mkdtemp(prefix="vk-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spawn_dirs() -> set[str]:
    """Vm.spawn's directories in this process's temporary directory."""
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("vmkit-vmm-")}
