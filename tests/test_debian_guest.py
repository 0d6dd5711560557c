"""Tests of the Debian Linux guest builder (vmkit.debian_guest), on real Debian packages.

The module builds the real guest once (downloading about 28 MB with apt-get) into a temporary
cache shared by the tests; a few tests build again into other temporary caches. The files are
checked with parsers written here, independent of the builder's own helpers. If the Debian
archive cannot be reached the tests fail, naming the builder's error: they do not skip.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vmkit import debian_guest
from vmkit.debian_guest import DebianGuest, GuestBuildError, build_debian_guest, main

# Module names as modinfo spells them; virtio_rng is the file virtio-rng.ko.
LISTED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "failover",
    "net_failover",
    "virtio_console",
    "virtio_rng",
    "virtio_mmio",
)


@dataclass
class Build:
    guest: DebianGuest
    cache: Path
    lines: list[str]
    seconds: float


def _build_or_fail(cache: Path, **kwargs: object) -> Build:
    lines: list[str] = []
    start = time.monotonic()
    try:
        guest = build_debian_guest(cache, progress=lines.append, **kwargs)  # type: ignore[arg-type]
    except GuestBuildError as e:
        pytest.fail(
            f"building the Debian guest failed (is the Debian archive reachable with apt?): {e}",
            pytrace=False,
        )
    return Build(guest, cache, lines, time.monotonic() - start)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return _build_or_fail(tmp_path_factory.mktemp("debian-guest"))


# --------------------------------------------------------------------------------------------
# Independent parsers


def pvh_notes(path: Path) -> tuple[int, list[int]]:
    """(ELF class, values of every Xen note of type 0x12) of the ELF file at ``path``."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    elf_class, endian = data[4], data[5]
    assert (elf_class, endian) == (2, 1), "not a little-endian ELF64 file"
    assert struct.unpack_from("<H", data, 18)[0] == 62, "not x86-64"
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    values = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        notes = data[p_offset : p_offset + p_filesz]
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
            name = notes[pos + 12 : pos + 12 + namesz]
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            desc = notes[desc_at : desc_at + descsz]
            pos = desc_at + ((descsz + 3) & ~3)
            if name.rstrip(b"\0") == b"Xen" and ntype == 0x12:
                values.append(int.from_bytes(desc, "little"))
    return elf_class, values


@dataclass
class CpioEntry:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: bytes) -> list[CpioEntry]:
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad newc magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _chk = fields
        name_at = pos + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        assert archive[name_at + namesize - 1] == 0
        data_at = (name_at + namesize + 3) & ~3
        data = archive[data_at : data_at + size]
        pos = (data_at + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, ino, mode, uid, gid, mtime, (rmaj, rmin), data))


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, str]]:
    """(inode, mtime_ns, size, sha256) of every file and link under ``directory``."""
    result = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            digest = os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir"
        result[str(path.relative_to(directory))] = (st.st_ino, st.st_mtime_ns, st.st_size, digest)
    return result


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".tmp"))


# --------------------------------------------------------------------------------------------
# The files


def test_result_paths(built: Build) -> None:
    g = built.guest
    assert g.directory.parent == built.cache
    for path in (g.vmlinux, g.vmlinuz, g.initramfs):
        assert path.parent == g.directory and path.is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", g.kernel_version), g.kernel_version
    assert leftovers(built.cache) == []
    assert any(line.startswith("[2/6] downloading linux-image-") for line in built.lines)


def test_vmlinux_is_elf64_with_pvh_note(built: Build) -> None:
    elf_class, entries = pvh_notes(built.guest.vmlinux)
    assert elf_class == 2
    assert len(entries) == 1, "expected one XEN_ELFNOTE_PHYS32_ENTRY note"
    # A 32-bit physical entry inside the kernel's first 16 MiB after its 16 MiB load address.
    assert 0x1000000 <= entries[0] < 0x2000000
    assert built.guest.pvh_entry == entries[0]


def test_vmlinuz_is_a_bzimage(built: Build) -> None:
    data = built.guest.vmlinuz.read_bytes()
    assert data[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", data, 0x1FE)[0] == 0xAA55
    # The vmlinux was recovered from this bzImage: its size is the payload's trailer.
    setup_sects = data[0x1F1]
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    assert payload[:4] == b"\x02\x21\x4c\x18"
    assert struct.unpack("<I", payload[-4:])[0] == built.guest.vmlinux.stat().st_size


def test_initramfs_contents(built: Build) -> None:
    raw = built.guest.initramfs.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert struct.unpack_from("<I", raw, 4)[0] == 0, "gzip mtime must be 0"
    entries = read_newc(gzip.decompress(raw))
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == sorted(
        (e.name for e in entries), key=lambda n: n.split("/")
    )
    assert len(by_name) == len(entries)
    assert all(e.mtime == 0 and e.uid == 0 and e.gid == 0 for e in entries)

    init = by_name["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data.startswith(b"#!/bin/busybox sh\n")
    busybox = by_name["bin/busybox"]
    assert stat.S_ISREG(busybox.mode) and busybox.mode & 0o111
    assert busybox.data[:4] == b"\x7fELF"
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    sh = by_name["bin/sh"]
    assert stat.S_ISLNK(sh.mode) and sh.data == b"/bin/busybox"

    prefix = f"lib/modules/{built.guest.kernel_version}/"
    modules = {
        Path(e.name).name.split(".ko")[0].replace("-", "_"): e
        for e in entries
        if e.name.startswith(prefix) and e.name.endswith(".ko")
    }
    for name in LISTED_MODULES:
        assert name in modules, f"module {name} missing from the initramfs"
        assert modules[name].data[:4] == b"\x7fELF"
        assert f"vermagic={built.guest.kernel_version} ".encode() in modules[name].data


def test_init_loads_modules_in_dependency_order(built: Build) -> None:
    raw = gzip.decompress(built.guest.initramfs.read_bytes())
    by_name = {e.name: e for e in read_newc(raw)}
    script = by_name["init"].data.decode()
    m = re.search(r"^for m in (.*); do$", script, re.M)
    assert m, script
    paths = m.group(1).split()
    order = [Path(p).name.split(".ko")[0].replace("-", "_") for p in paths]
    assert sorted(order) == sorted(LISTED_MODULES)
    for path in paths:
        assert f"lib/modules/{built.guest.kernel_version}/{path}" in by_name
    # Every module comes after everything its modinfo depends= names.
    for path, name in zip(paths, order, strict=True):
        data = by_name[f"lib/modules/{built.guest.kernel_version}/{path}"].data
        dep = re.search(rb"\0depends=([^\0]*)\0", data)
        assert dep is not None, name
        for d in filter(None, dep.group(1).decode().split(",")):
            assert order.index(d.replace("-", "_")) < order.index(name), (d, name)
    for word in ("VMKIT-GUEST-READY uptime=", "VMKIT-GUEST cpus=", "VMKIT-GUEST cmdline="):
        assert word in script
    for word in ("poweroff -f", "reboot -f", "vmkit.exit="):
        assert word in script
    assert built.guest.modules == tuple(paths)


def test_manifest_records_packages_and_hashes(built: Build) -> None:
    manifest = json.loads((built.guest.directory / "manifest.json").read_text())
    packages = manifest["packages"]
    kernel_pkg = f"linux-image-{built.guest.kernel_version}"
    assert set(packages) >= {kernel_pkg, "busybox-static"}
    assert dict(built.guest.packages) == packages
    for path in (built.guest.vmlinux, built.guest.vmlinuz, built.guest.initramfs):
        info = manifest["files"][path.name]
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert info["size"] == path.stat().st_size


# --------------------------------------------------------------------------------------------
# The cache


def test_rebuild_is_a_fast_no_op(built: Build) -> None:
    before = snapshot(built.cache)
    again = _build_or_fail(built.cache)
    assert again.guest == built.guest
    assert snapshot(built.cache) == before
    assert not any("downloading" in line for line in again.lines), again.lines
    assert again.seconds < 15, f"the up-to-date check took {again.seconds:.1f} s"


def test_progress_false_is_silent_and_true_prints_to_stderr(
    built: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    build_debian_guest(built.cache, progress=False)
    assert capsys.readouterr() == ("", "")
    build_debian_guest(built.cache)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("[1/6] resolving packages\n")


def test_cached_build_is_used_when_apt_is_unavailable(
    built: Build, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, apt-cache, dpkg-deb
    assert build_debian_guest(built.cache, progress=False) == built.guest
    with pytest.raises(GuestBuildError, match="apt-get, apt-cache, dpkg-deb not found"):
        build_debian_guest(tmp_path / "empty", progress=False)


def test_missing_lists_trigger_one_apt_get_update(
    built: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = debian_guest._resolve_packages
    calls: list[str] = []

    def resolve_once_stale() -> object:
        calls.append("resolve")
        if len(calls) == 1:
            raise debian_guest._NoCandidate("resolving packages: no candidate (simulated)")
        return real()

    def fake_update(say: object, label: str, step: str) -> str:
        calls.append("update")
        return ""

    monkeypatch.setattr(debian_guest, "_resolve_packages", resolve_once_stale)
    monkeypatch.setattr(debian_guest, "_apt_update", fake_update)
    assert build_debian_guest(built.cache, progress=False) == built.guest
    assert calls == ["resolve", "update", "resolve"]


def test_missing_lists_without_root_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_candidate() -> object:
        raise debian_guest._NoCandidate("resolving packages: no candidate (simulated)")

    monkeypatch.setattr(debian_guest, "_resolve_packages", no_candidate)
    monkeypatch.setattr(debian_guest, "_is_root", lambda: False)
    with pytest.raises(GuestBuildError, match=r"needs root; run `sudo apt-get update`"):
        build_debian_guest(tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_builds_are_reproducible(built: Build, tmp_path: Path) -> None:
    other = _build_or_fail(tmp_path / "other")
    assert other.guest.directory.name == built.guest.directory.name
    for a, b in (
        (built.guest.initramfs, other.guest.initramfs),
        (built.guest.vmlinux, other.guest.vmlinux),
        (built.guest.vmlinuz, other.guest.vmlinuz),
    ):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert leftovers(tmp_path / "other") == []


def test_corrupt_cache_is_rebuilt(built: Build, tmp_path: Path) -> None:
    cache = tmp_path / "corrupt"
    shutil.copytree(built.cache, cache, symlinks=True)
    directory = cache / built.guest.directory.name
    with (directory / "initramfs.cpio.gz").open("r+b") as f:
        f.seek(100)
        f.write(b"X")
    (directory / "vmlinux").unlink()
    again = _build_or_fail(cache)
    assert again.guest.directory == directory
    assert any("downloading" in line for line in again.lines)
    for name in ("initramfs.cpio.gz", "vmlinux", "vmlinuz"):
        assert (directory / name).read_bytes() == (built.guest.directory / name).read_bytes()
    assert leftovers(cache) == []


@pytest.fixture
def fresh_cache(tmp_path: Path) -> Iterator[Path]:
    cache = tmp_path / "interrupted"
    yield cache


@pytest.mark.parametrize(
    ("step", "error"),
    [("_build_initramfs", RuntimeError), ("_recover_vmlinux", KeyboardInterrupt)],
)
def test_interrupted_build_leaves_nothing(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch, step: str, error: type[BaseException]
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        # The temp build dir exists and holds the unpacked packages at this point.
        assert any(p.name.startswith(".tmp-build-") for p in fresh_cache.iterdir())
        raise error("simulated interruption")

    monkeypatch.setattr(debian_guest, step, boom)
    with pytest.raises(error, match="simulated interruption"):
        build_debian_guest(fresh_cache, progress=False)
    assert leftovers(fresh_cache) == []
    assert list(fresh_cache.rglob("manifest.json")) == []
    assert [p.name for p in fresh_cache.iterdir()] == [".lock"]


# --------------------------------------------------------------------------------------------
# The command line


def test_main_prints_paths(built: Build, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(built.cache), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    values = dict(line.split("=", 1) for line in out.splitlines())
    assert values == {
        "vmlinux": str(built.guest.vmlinux),
        "vmlinuz": str(built.guest.vmlinuz),
        "initramfs": str(built.guest.initramfs),
        "kernel_version": built.guest.kernel_version,
        "directory": str(built.guest.directory),
    }


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["--cache-dir", str(blocker / "cache"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: building the Debian guest failed: cannot create the cache")
    assert err.count("\n") == 1

    assert main(["--bogus"]) == 2
    assert "unexpected argument '--bogus'" in capsys.readouterr().err
    assert main(["--cache-dir"]) == 2
    assert main(["--help"]) == 0
    assert "vmkit guest build" in capsys.readouterr().out


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMKIT_CACHE_DIR", str(tmp_path))
    assert debian_guest.default_cache_dir() == tmp_path / "debian-guest"
    monkeypatch.delenv("VMKIT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert debian_guest.default_cache_dir() == tmp_path / "home/.cache/vmkit/debian-guest"
