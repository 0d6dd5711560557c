"""Builds the Debian Linux guest: a stock Debian cloud kernel and a busybox initramfs.

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; nothing is installed on the host and nothing is compiled:

- ``linux-image-<version>-cloud-amd64`` (the current dependency of ``linux-image-cloud-amd64``)
  gives ``vmlinuz`` (the bzImage as shipped) and the virtio modules;
- ``vmlinux`` (an ELF carrying the PVH entry note) is recovered from the bzImage's LZ4 payload
  with the ``lz4`` binary of Debian's ``lz4`` package;
- ``busybox-static`` and the modules make a gzip-compressed newc initramfs, written here in
  Python so that it is byte-for-byte reproducible for fixed package versions.

The guest's ``/init`` prints ``VMKIT-GUEST-READY uptime=<s>`` and a few ``VMKIT-GUEST ...``
report lines on the console (CPUs, virtio devices, ``/dev/vda`` with its serial and queues,
the hwrng, ``/dev/hvc0``), then powers off, reboots or runs a shell as the kernel command line
word ``vmkit.exit=poweroff|reboot|shell`` says (default ``poweroff``). ``vmkit.vdawrite=<text>``
writes the text at byte 4096 of ``/dev/vda`` (flushed); ``vmkit.ip=<addr/len>`` with
``vmkit.peer=<addr>`` configures ``eth0`` and pings the peer once.

A finished build lives in ``<cache>/<kernel version>-<id>/`` with a ``manifest.json`` (package
versions, file hashes) written last; builds happen in a temporary directory inside the cache
and are renamed into place, so an interrupted build never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmkit import _progress

__all__ = [
    "MODULES",
    "DebianGuest",
    "GuestBuildError",
    "build_debian_guest",
    "default_cache_dir",
    "main",
]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
LZ4_PACKAGE = "lz4"

#: Modules put in the initramfs (their dependencies come along); module names as modinfo
#: spells them (``virtio_rng`` is the file ``virtio-rng.ko``).
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_mmio",
)

#: Bumped whenever the builder's output for the same packages changes.
FORMAT = "vmkit-debian-guest/1"
MANIFEST = "manifest.json"
VMLINUX = "vmlinux"
VMLINUZ = "vmlinuz"
INITRAMFS = "initramfs.cpio.gz"
_TMP_PREFIX = ".tmp-"
_LOCK = ".lock"
_CURRENT = "current"
#: Free space asked for before building: downloads (~28 MB), the unpacked kernel package
#: (~110 MB), vmlinux (~53 MB), the outputs (~70 MB) and some margin.
_DISK_NEEDED = 400 * 1024 * 1024

_XEN_ELFNOTE_PHYS32_ENTRY = 0x12
_PT_NOTE = 4
_EM_X86_64 = 62
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"

Progress = Callable[[str], None]


class GuestBuildError(RuntimeError):
    """Building the Debian guest failed; the message names the step and the cause."""


@dataclass(frozen=True)
class DebianGuest:
    """A built Debian guest: the files a VMM boots, all inside ``directory``."""

    vmlinux: Path
    """Uncompressed ELF kernel with the PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``)."""
    vmlinuz: Path
    """The bzImage exactly as Debian ships it."""
    initramfs: Path
    """gzip-compressed newc cpio: busybox, the virtio modules and ``/init``."""
    kernel_version: str
    """``uname -r`` of the kernel, e.g. ``6.1.0-56-cloud-amd64``."""
    directory: Path
    """The build directory holding the files and ``manifest.json``."""
    pvh_entry: int = 0
    """The 32-bit PVH entry point (physical address) from the vmlinux note."""
    packages: tuple[tuple[str, str], ...] = ()
    """The Debian packages (name, version) the guest was built from."""
    modules: tuple[str, ...] = ()
    """Module files (relative to ``/lib/modules/<version>``) in the order ``/init`` loads them."""


def default_cache_dir() -> Path:
    """``$VMKIT_CACHE_DIR/debian-guest`` if set, else ``~/.cache/vmkit/debian-guest``."""
    base = os.environ.get("VMKIT_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "debian-guest"
    return Path.home() / ".cache" / "vmkit" / "debian-guest"


# --------------------------------------------------------------------------------------------
# Small helpers


def _reporter(progress: bool | Progress) -> Progress:
    if callable(progress):
        return progress
    if progress:

        def to_stderr(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        return to_stderr

    def silent(line: str) -> None:
        del line

    return silent


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _tail(text: str, lines: int = 3, limit: int = 400) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    if len(joined) > limit:
        joined = "..." + joined[-limit:]
    return joined or "(no output)"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["LANGUAGE"] = "C"
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _run(
    step: str,
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd``; a failure to start, or a non-zero exit when ``check``, is a GuestBuildError."""
    try:
        result = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=dict(env) if env is not None else _env(),
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        raise GuestBuildError(f"{step}: cannot run {cmd[0]}: {e.strerror or e}") from e
    if check and result.returncode != 0:
        raise GuestBuildError(
            f"{step}: `{shlex.join(cmd)}` failed (exit {result.returncode}): "
            f"{_tail(result.stderr or result.stdout)}"
        )
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# apt: resolving and downloading packages


@dataclass(frozen=True)
class _Packages:
    meta_version: str
    kernel_package: str
    kernel_version: str  # uname -r
    versions: tuple[tuple[str, str], ...]  # (package, version) of what is downloaded

    @property
    def build_id(self) -> str:
        recipe = json.dumps(
            {"format": FORMAT, "packages": self.versions, "init": _INIT_TEMPLATE, "mods": MODULES},
            sort_keys=True,
        )
        return f"{self.kernel_version}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


class _NoCandidate(GuestBuildError):
    """apt knows no installable version of a package (lists missing or stale)."""


def _candidates(names: Sequence[str]) -> dict[str, str]:
    out = _run("resolving packages", ["apt-cache", "policy", *names]).stdout
    found: dict[str, str] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
        elif current is not None and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            if value and value != "(none)":
                found[current] = value
    missing = [n for n in names if n not in found]
    if missing:
        raise _NoCandidate(
            f"resolving packages: apt has no installable version of {', '.join(missing)}"
        )
    return found


def _resolve_packages(
    *,
    meta_package: str = KERNEL_META_PACKAGE,
    extra: Sequence[str] = (BUSYBOX_PACKAGE, LZ4_PACKAGE),
) -> _Packages:
    """The kernel ``meta_package`` depends on now, and the ``extra`` packages' candidates."""
    found = _candidates([meta_package, *extra])
    meta_version = found[meta_package]
    show = _run(
        "resolving packages", ["apt-cache", "show", f"{meta_package}={meta_version}"]
    ).stdout
    depends = ""
    for line in show.splitlines():
        if line.startswith("Depends:"):
            depends = line.split(":", 1)[1]
            break
    kernel_package = ""
    pinned = ""
    for alternative in re.split(r"[,|]", depends):
        m = re.match(r"\s*(linux-image-\d\S*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alternative)
        if m:
            kernel_package, pinned = m.group(1), m.group(2) or ""
            break
    if not kernel_package:
        raise GuestBuildError(
            f"resolving packages: {meta_package} {meta_version} depends on no "
            f"linux-image-<version> package (Depends: {depends.strip() or 'none'})"
        )
    kernel_version = pinned or _candidates([kernel_package])[kernel_package]
    versions = ((kernel_package, kernel_version), *((name, found[name]) for name in extra))
    return _Packages(
        meta_version=meta_version,
        kernel_package=kernel_package,
        kernel_version=kernel_package.removeprefix("linux-image-"),
        versions=versions,
    )


def _lists_problem(stderr: str) -> bool:
    """Whether an apt-get download failure means the package lists are missing or stale."""
    patterns = (
        r"\b404\b",
        r"Unable to locate package",
        r"has no installation candidate",
        r"Can't find a source to download",
        r"Version '.*' for '.*' was not found",
        r"Can't select",
    )
    return any(re.search(p, stderr) for p in patterns)


def _network_problem(stderr: str) -> bool:
    patterns = (
        r"Temporary failure resolving",
        r"Could not resolve",
        r"Could not connect",
        r"Connection (failed|timed out|refused)",
        r"Network is unreachable",
        r"Failed to fetch",
    )
    return any(re.search(p, stderr) for p in patterns)


def _apt_update(say: Progress, label: str, step: str) -> str:
    """Runs ``apt-get update``; returns a note about fetch failures it only warned about."""
    if not _is_root():
        raise GuestBuildError(
            f"{step}: apt's package lists are missing or stale and `apt-get update` needs "
            "root; run `sudo apt-get update` and try again"
        )
    say(f"{label} running apt-get update (package lists missing or stale)")
    deadline = time.monotonic() + 180
    while True:
        result = _run(
            step, ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=30", "update"], check=False
        )
        text = result.stderr or result.stdout
        if result.returncode == 0:
            if _network_problem(result.stderr):
                return f" (apt-get update warned: {_tail(result.stderr, lines=2)})"
            return ""
        if "Could not get lock" in text and time.monotonic() < deadline:
            time.sleep(2)  # another apt-get is updating the lists
            continue
        hint = "; is the Debian archive reachable?" if _network_problem(text) else ""
        raise GuestBuildError(f"{step}: `apt-get update` failed{hint}: {_tail(text, lines=2)}")


def _download_cmd(pkgs: _Packages) -> list[str]:
    cmd = ["apt-get", "-q", "download"]
    if _is_root():
        # The download directory is private to us; do not try to hand it to user _apt.
        cmd[2:2] = ["-o", "APT::Sandbox::User=root"]
    return cmd + [f"{name}={version}" for name, version in pkgs.versions]


def _sizes(pkgs: _Packages) -> dict[str, int]:
    result = _run(
        "resolving packages",
        ["apt-cache", "show", *(f"{n}={v}" for n, v in pkgs.versions)],
        check=False,
    )
    sizes: dict[str, int] = {}
    name = ""
    for line in result.stdout.splitlines():
        if line.startswith("Package:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Size:") and name and name not in sizes:
            with contextlib.suppress(ValueError):
                sizes[name] = int(line.split(":", 1)[1])
    return sizes


def _download(
    pkgs: _Packages, dest: Path, say: Progress, meter: _progress.Progress | None = None
) -> dict[str, Path]:
    sizes = _sizes(pkgs)
    for name, version in pkgs.versions:
        size = f" ({_mb(sizes[name])})" if name in sizes else ""
        say(f"[2/6] downloading {name} {version}{size}")
    if meter is not None and all(name in sizes for name, _ in pkgs.versions):
        meter.track(sum(sizes.values()), "bytes", lambda: _progress.bytes_under(dest))
    try:
        result = _run("downloading packages", _download_cmd(pkgs), cwd=dest, check=False)
    finally:
        if meter is not None:
            meter.track(None)
    if result.returncode != 0:
        err = result.stderr or result.stdout
        if _lists_problem(err):
            raise _NoCandidate(f"downloading packages: {_tail(err)}")
        hint = "; is the Debian archive reachable?" if _network_problem(err) else ""
        raise GuestBuildError(
            f"downloading packages: `apt-get download` failed (exit {result.returncode}{hint}): "
            f"{_tail(err, lines=2)}"
        )
    debs: dict[str, Path] = {}
    for deb in sorted(dest.glob("*.deb")):
        fields = _run("downloading packages", ["dpkg-deb", "-f", str(deb), "Package", "Version"])
        info = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        debs[info.get("Package", "")] = deb
        expected = dict(pkgs.versions).get(info.get("Package", ""))
        if expected is not None and info.get("Version") != expected:
            raise GuestBuildError(
                f"downloading packages: {deb.name} is version {info.get('Version')}, "
                f"expected {expected}"
            )
    missing = [name for name, _ in pkgs.versions if name not in debs]
    if missing:
        raise GuestBuildError(
            f"downloading packages: apt-get download did not produce {', '.join(missing)}"
        )
    total = sum(debs[name].stat().st_size for name, _ in pkgs.versions)
    say(f"[2/6] downloaded {len(pkgs.versions)} packages ({_mb(total)})")
    return {name: debs[name] for name, _ in pkgs.versions}


# --------------------------------------------------------------------------------------------
# ELF: the kernel's PVH note and the modules' .modinfo


def _elf64_header(data: bytes, what: str) -> tuple[int, int, int, int, int, int, int]:
    """Returns (e_entry, e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum)."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise GuestBuildError(f"{what} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise GuestBuildError(f"{what} is not a little-endian ELF64 file")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != _EM_X86_64:
        raise GuestBuildError(f"{what} is not an x86-64 ELF file (e_machine {machine})")
    entry, phoff, shoff = struct.unpack_from("<QQQ", data, 24)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    return entry, phoff, shoff, phentsize, phnum, shentsize, shnum


def _pvh_entry(path: Path) -> int:
    """The XEN_ELFNOTE_PHYS32_ENTRY value of an ELF64 kernel; GuestBuildError if absent."""
    what = f"recovered vmlinux {path}"
    with path.open("rb") as f:
        head = f.read(64)
        _entry, phoff, _shoff, phentsize, phnum, _she, _shn = _elf64_header(head, what)
        f.seek(phoff)
        phdrs = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                "<IIQQQQ", phdrs, i * phentsize
            )
            if p_type != _PT_NOTE:
                continue
            f.seek(p_offset)
            notes = f.read(p_filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                pos += 12
                name = notes[pos : pos + namesz].rstrip(b"\0")
                pos += (namesz + 3) & ~3
                desc = notes[pos : pos + descsz]
                pos += (descsz + 3) & ~3
                if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                    if descsz == 4:
                        return int(struct.unpack("<I", desc)[0])
                    if descsz == 8:
                        return int(struct.unpack("<Q", desc)[0])
                    raise GuestBuildError(f"{what}: PVH note has a {descsz}-byte value")
    raise GuestBuildError(f"{what} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")


def _modinfo(data: bytes, what: str) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (first value per key)."""
    _entry, _phoff, shoff, _phe, _phn, shentsize, shnum = _elf64_header(data, what)
    (shstrndx,) = struct.unpack_from("<H", data, 62)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _n, str_off, str_size = section(shstrndx)
    strtab = data[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = strtab.find(b"\0", name_off)
        if strtab[name_off:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep and key not in info:
                    info[key] = value
            return info
    raise GuestBuildError(f"{what} has no .modinfo section")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz`` and ``.ko.gz``."""
    raw = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise GuestBuildError(f"building initramfs: cannot decompress {path.name}: {e}") from e
    if path.name.endswith(".ko"):
        return raw
    raise GuestBuildError(
        f"building initramfs: {path.name} is compressed in a format this builder cannot read"
    )


def _module_name(filename: str) -> str:
    return filename.split(".ko", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class _Module:
    name: str
    relpath: str  # relative to lib/modules/<version>, always ending in .ko
    data: bytes
    depends: tuple[str, ...]


def _collect_modules(
    moddir: Path, kernel_version: str, *, wanted: Sequence[str] = MODULES
) -> list[_Module]:
    """Reads ``wanted`` and their dependencies; returns them in load (dependency) order."""
    files: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if re.search(r"\.ko(\.(xz|gz|zst))?$", path.name):
            files.setdefault(_module_name(path.name), path)
    builtin: set[str] = set()
    builtin_list = moddir / "modules.builtin"
    if builtin_list.is_file():
        for line in builtin_list.read_text().splitlines():
            builtin.add(_module_name(line.rsplit("/", 1)[-1]))

    loaded: dict[str, _Module] = {}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        if name in loaded or name in builtin:
            return
        if name in visiting:
            raise GuestBuildError(f"building initramfs: module dependency cycle at {name}")
        path = files.get(name)
        if path is None:
            raise GuestBuildError(
                f"building initramfs: module {name}{wanted_by} is not in the kernel package "
                "(neither a module file nor built in)"
            )
        visiting.add(name)
        data = _read_module(path)
        info = _modinfo(data, f"module {path.name}")
        vermagic = info.get("vermagic", "")
        if vermagic.split(" ", 1)[0] != kernel_version:
            raise GuestBuildError(
                f"building initramfs: module {path.name} is for kernel "
                f"{vermagic.split(' ', 1)[0] or '?'}, not {kernel_version}"
            )
        depends = tuple(d for d in info.get("depends", "").split(",") if d)
        for dep in depends:
            visit(_module_name(dep), f" (needed by {name})")
        visiting.discard(name)
        rel = path.relative_to(moddir).as_posix()
        rel = rel[: rel.index(".ko") + 3]
        loaded[name] = _Module(name, rel, data, depends)
        order.append(name)

    for name in wanted:
        visit(name, "")
    return [loaded[name] for name in order]


# --------------------------------------------------------------------------------------------
# vmlinux from the bzImage


def _bzimage_payload(vmlinuz: Path) -> tuple[bytes, int]:
    """The LZ4 legacy stream of a bzImage (without its size trailer) and the unpacked size."""
    data = vmlinuz.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise GuestBuildError(f"recovering vmlinux: {vmlinuz.name} has no bzImage setup header")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise GuestBuildError(f"recovering vmlinux: {vmlinuz.name}'s payload lies past its end")
    if payload[:4] != _LZ4_LEGACY_MAGIC:
        raise GuestBuildError(
            f"recovering vmlinux: {vmlinuz.name}'s payload is not LZ4 (magic "
            f"{payload[:4].hex(' ')}, expected 02 21 4c 18)"
        )
    (size,) = struct.unpack("<I", payload[-4:])
    return payload[:-4], size


def _recover_vmlinux(vmlinuz: Path, lz4_root: Path, work: Path, out: Path) -> int:
    """Writes vmlinux to ``out``; returns the PVH entry."""
    stream, size = _bzimage_payload(vmlinuz)
    lz4 = lz4_root / "usr" / "bin" / "lz4"
    if not lz4.is_file():
        raise GuestBuildError("recovering vmlinux: the lz4 package has no usr/bin/lz4")
    compressed = work / "payload.lz4"
    compressed.write_bytes(stream)
    env = _env()
    libdirs = [
        str(p) for p in (lz4_root / "usr/lib/x86_64-linux-gnu", lz4_root / "lib") if p.is_dir()
    ]
    if libdirs:
        env["LD_LIBRARY_PATH"] = ":".join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    cmd = [str(lz4), "-d", "-c", str(compressed)]
    try:
        with out.open("wb") as sink:
            result = subprocess.run(
                cmd,
                stdout=sink,
                stderr=subprocess.PIPE,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
    except OSError as e:
        raise GuestBuildError(f"recovering vmlinux: cannot run {lz4}: {e.strerror or e}") from e
    finally:
        compressed.unlink(missing_ok=True)
    if result.returncode != 0:
        raise GuestBuildError(
            f"recovering vmlinux: `{shlex.join(cmd)}` failed (exit {result.returncode}): "
            f"{_tail(result.stderr.decode('utf-8', 'replace'))}"
        )
    got = out.stat().st_size
    if got != size:
        raise GuestBuildError(
            f"recovering vmlinux: lz4 produced {got} bytes, the bzImage says {size}"
        )
    return _pvh_entry(out)


# --------------------------------------------------------------------------------------------
# The initramfs

_INIT_TEMPLATE = r"""#!/bin/busybox sh
# /init of the vmkit Debian guest (written by vmkit.debian_guest).
# Kernel command line: vmkit.exit=poweroff|reboot|shell (default poweroff),
# vmkit.vdawrite=<text>, vmkit.ip=<addr/len> vmkit.peer=<addr>.
[ -x /bin/mount ] || /bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc || echo "VMKIT-GUEST error mount proc failed"
mount -t sysfs sysfs /sys || echo "VMKIT-GUEST error mount sysfs failed"
mount -t devtmpfs devtmpfs /dev || echo "VMKIT-GUEST error mount devtmpfs failed"

for m in @MODULES@; do
  insmod "/lib/modules/@KVER@/$m" || echo "VMKIT-GUEST error insmod ${m##*/} failed"
done

read -r up _ < /proc/uptime
echo "VMKIT-GUEST-READY uptime=$up"

cpus=0
for r in $(tr ',' ' ' < /sys/devices/system/cpu/online); do
  case $r in
    *-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1)) ;;
    *) cpus=$((cpus + 1)) ;;
  esac
done
echo "VMKIT-GUEST cpus=$cpus"
echo "VMKIT-GUEST cmdline=$(cat /proc/cmdline)"

for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] || continue
  echo "VMKIT-GUEST virtio ${d##*/} $(cat "$d/device")"
done

mode=poweroff
ip=
peer=
vdawrite=
set -f
for w in $(cat /proc/cmdline); do
  case $w in
    vmkit.exit=*) mode=${w#vmkit.exit=} ;;
    vmkit.ip=*) ip=${w#vmkit.ip=} ;;
    vmkit.peer=*) peer=${w#vmkit.peer=} ;;
    vmkit.vdawrite=*) vdawrite=${w#vmkit.vdawrite=} ;;
  esac
done
set +f

if [ -b /dev/vda ]; then
  serial=$(cat /sys/block/vda/serial 2>/dev/null)
  queues=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)
  echo "VMKIT-GUEST vda sectors=$(cat /sys/block/vda/size) serial=${serial:-none} queues=$queues"
  if [ -n "$vdawrite" ]; then
    # vmkit.vdawrite=<text>: the text at byte 4096 of the disk, flushed.
    printf '%s' "$vdawrite" | dd of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null &&
      echo "VMKIT-GUEST vda wrote ${#vdawrite} bytes" || echo "VMKIT-GUEST error vda write failed"
  fi
fi
if [ -c /dev/hwrng ]; then
  n=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)
  echo "VMKIT-GUEST hwrng $(cat /sys/class/misc/hw_random/rng_current) bytes=$n"
fi
if [ -c /dev/hvc0 ]; then
  echo "VMKIT-GUEST hvc0 hello" > /dev/hvc0 && echo "VMKIT-GUEST hvc0 written"
fi
if [ -n "$ip" ] && [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add "$ip" dev eth0
  if ping -c 1 -W 5 "$peer" > /dev/null 2>&1; then
    echo "VMKIT-GUEST ping $peer ok"
  else
    echo "VMKIT-GUEST ping $peer failed"
  fi
fi
case $mode in
  poweroff|reboot|shell) ;;
  *) echo "VMKIT-GUEST error unknown vmkit.exit=$mode, using poweroff"; mode=poweroff ;;
esac
echo "VMKIT-GUEST exit=$mode"

case $mode in
  shell)
    setsid cttyhack sh || sh
    poweroff -f
    ;;
  reboot) reboot -f ;;
  *) poweroff -f ;;
esac
sleep 1
echo "VMKIT-GUEST error $mode -f returned; trying reboot -f"
reboot -f
sleep 1
echo "VMKIT-GUEST error reboot -f returned"
exit 1
"""


def _init_script(kernel_version: str, modules: Sequence[_Module]) -> bytes:
    text = _INIT_TEMPLATE.replace("@KVER@", kernel_version).replace(
        "@MODULES@", " ".join(m.relpath for m in modules)
    )
    return text.encode()


def _modules_dep(modules: Sequence[_Module]) -> bytes:
    """A ``modules.dep`` for the modules in the initramfs (so busybox modprobe works too)."""
    by_name = {m.name: m for m in modules}

    def closure(m: _Module, seen: list[str]) -> list[str]:
        for dep in m.depends:
            d = by_name.get(_module_name(dep))
            if d is not None and d.relpath not in seen:
                seen.append(d.relpath)
                closure(d, seen)
        return seen

    lines = []
    for m in sorted(modules, key=lambda m: m.relpath):
        deps = closure(m, [])
        lines.append(f"{m.relpath}:{''.join(' ' + d for d in deps)}\n")
    return "".join(lines).encode()


@dataclass(frozen=True)
class _CpioEntry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _cpio_newc(entries: Sequence[_CpioEntry]) -> bytes:
    """A newc cpio archive of ``entries`` sorted by path, zero mtimes, uid/gid 0."""
    out = io.BytesIO()

    def put(ino: int, mode: int, nlink: int, data: bytes, rdev: tuple[int, int], name: str) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.write(b"070701" + "".join(f"{v:08x}" for v in fields).encode() + encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    seen: set[str] = set()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path.split("/")), start=1):
        if entry.path in seen:
            raise GuestBuildError(f"building initramfs: {entry.path} added twice")
        seen.add(entry.path)
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        put(ino, entry.mode, nlink, entry.data, entry.rdev, entry.path)
    put(0, 0, 1, b"", (0, 0), "TRAILER!!!")
    return out.getvalue()


def _busybox_applets(busybox: Path) -> list[str] | None:
    """Applet paths (``bin/sh``, ``usr/bin/awk`` ...) or None if busybox cannot run here."""
    try:
        result = subprocess.run(
            [str(busybox), "--list-full"],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=_env(),
        )
    except OSError:
        return None
    if result.returncode != 0:
        return None
    return sorted({line.strip().lstrip("/") for line in result.stdout.splitlines() if line.strip()})


def _build_initramfs(
    kernel_root: Path, busybox_root: Path, kernel_version: str, out: Path, say: Progress
) -> list[_Module]:
    moddir = kernel_root / "lib" / "modules" / kernel_version
    if not moddir.is_dir():
        raise GuestBuildError(
            f"building initramfs: the kernel package has no lib/modules/{kernel_version}"
        )
    modules = _collect_modules(moddir, kernel_version)
    say(f"[5/6] modules in load order: {' '.join(m.name for m in modules)}")
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError("building initramfs: busybox-static has no bin/busybox")

    dir_mode = stat.S_IFDIR | 0o755
    entries: dict[str, _CpioEntry] = {}

    def add_dir(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            entries.setdefault(sub, _CpioEntry(sub, dir_mode))

    def add(entry: _CpioEntry) -> None:
        parent = entry.path.rpartition("/")[0]
        if parent:
            add_dir(parent)
        entries[entry.path] = entry

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys", "tmp", "run"):
        add_dir(d)
    add(_CpioEntry("root", stat.S_IFDIR | 0o700))
    add(_CpioEntry("tmp", stat.S_IFDIR | 0o1777))
    add(_CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    add(_CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    add(_CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    applets = _busybox_applets(busybox)
    if applets is None:
        say("[5/6] busybox does not run on this host; /init will install its applet links")
    else:
        for applet in applets:
            if applet and applet not in entries and applet != "linuxrc":
                add(_CpioEntry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    base = f"lib/modules/{kernel_version}"
    for m in modules:
        add(_CpioEntry(f"{base}/{m.relpath}", stat.S_IFREG | 0o644, m.data))
    add(_CpioEntry(f"{base}/modules.dep", stat.S_IFREG | 0o644, _modules_dep(modules)))
    add(_CpioEntry("init", stat.S_IFREG | 0o755, _init_script(kernel_version, modules)))

    archive = _cpio_newc(list(entries.values()))
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        gz.write(archive)
    say(
        f"[5/6] initramfs: {len(entries)} entries, {_mb(len(archive))} -> {_mb(out.stat().st_size)}"
    )
    return modules


# --------------------------------------------------------------------------------------------
# The cache: manifest, lock, atomic install


def _read_manifest(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _guest_from(
    directory: Path, manifest: Mapping[str, object], verify: bool
) -> DebianGuest | None:
    """The guest in ``directory`` if every file matches the manifest (hashes when ``verify``)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    for name in (VMLINUX, VMLINUZ, INITRAMFS):
        info = files.get(name)
        path = directory / name
        if not isinstance(info, dict) or not path.is_file() or path.is_symlink():
            return None
        if path.stat().st_size != info.get("size"):
            return None
        if verify and _sha256(path) != info.get("sha256"):
            return None
    packages = manifest.get("packages")
    modules = manifest.get("modules")
    kernel_version = manifest.get("kernel_version")
    pvh = manifest.get("pvh_entry")
    if not (
        isinstance(packages, dict)
        and isinstance(modules, list)
        and isinstance(kernel_version, str)
        and isinstance(pvh, int)
    ):
        return None
    return DebianGuest(
        vmlinux=directory / VMLINUX,
        vmlinuz=directory / VMLINUZ,
        initramfs=directory / INITRAMFS,
        kernel_version=kernel_version,
        directory=directory,
        pvh_entry=pvh,
        packages=tuple((str(k), str(v)) for k, v in packages.items()),
        modules=tuple(str(m) for m in modules),
    )


def _cached(directory: Path, pkgs: _Packages | None) -> DebianGuest | None:
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    if pkgs is not None and (
        manifest.get("packages") != dict(pkgs.versions) or manifest.get("build_id") != pkgs.build_id
    ):
        return None
    return _guest_from(directory, manifest, verify=True)


def _current_build(cache: Path) -> DebianGuest | None:
    """The build ``current`` points to, if it is complete (for use when apt cannot answer)."""
    try:
        target = os.readlink(cache / _CURRENT)
    except OSError:
        return None
    if "/" in target or target.startswith("."):
        return None
    return _cached(cache / target, None)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / _LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_temps(cache: Path) -> None:
    """Removes temp dirs left by killed builds (we hold the lock, so none is in use)."""
    for entry in cache.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _set_current(cache: Path, build_id: str) -> None:
    link = cache / _CURRENT
    with contextlib.suppress(OSError):
        if os.readlink(link) == build_id:
            return
    tmp = cache / f"{_TMP_PREFIX}current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(build_id, tmp)
    os.replace(tmp, link)


def _prune(cache: Path, keep: str) -> None:
    """Removes older builds (directories with our manifest) other than ``keep``."""
    for entry in cache.iterdir():
        if entry.name == keep or entry.name.startswith(".") or entry.is_symlink():
            continue
        if entry.is_dir() and (entry / MANIFEST).is_file() and _read_manifest(entry) is not None:
            shutil.rmtree(entry, ignore_errors=True)


def _check_disk(cache: Path) -> None:
    free = shutil.disk_usage(cache).free
    if free < _DISK_NEEDED:
        raise GuestBuildError(
            f"not enough disk space in {cache}: {free // 2**20} MiB free, the build needs "
            f"about {_DISK_NEEDED // 2**20} MiB"
        )


def _extract(deb: Path, dest: Path, name: str) -> Path:
    root = dest / name
    root.mkdir()
    _run(f"extracting {name}", ["dpkg-deb", "-x", str(deb), str(root)])
    return root


def _build(
    cache: Path, pkgs: _Packages, say: Progress, meter: _progress.Progress | None = None
) -> DebianGuest:
    _check_disk(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}build-", dir=cache))
    try:
        downloads = tmp / "debs"
        downloads.mkdir()
        debs = _download(pkgs, downloads, say, meter)
        say(f"[3/6] extracting {', '.join(debs)}")
        unpacked = tmp / "unpacked"
        unpacked.mkdir()
        roots = {name: _extract(deb, unpacked, name) for name, deb in debs.items()}
        kernel_root = roots[pkgs.kernel_package]
        for deb in debs.values():
            deb.unlink()

        out = tmp / "out"
        out.mkdir()
        vmlinuz_src = kernel_root / "boot" / f"vmlinuz-{pkgs.kernel_version}"
        if not vmlinuz_src.is_file():
            raise GuestBuildError(
                f"extracting {pkgs.kernel_package}: no boot/vmlinuz-{pkgs.kernel_version}"
            )
        shutil.copyfile(vmlinuz_src, out / VMLINUZ)
        say(f"[4/6] recovering vmlinux from vmlinuz ({_mb((out / VMLINUZ).stat().st_size)})")
        pvh = _recover_vmlinux(out / VMLINUZ, roots[LZ4_PACKAGE], tmp, out / VMLINUX)
        say(f"[4/6] vmlinux: ELF64, {_mb((out / VMLINUX).stat().st_size)}, PVH entry {pvh:#x}")

        say("[5/6] building initramfs")
        modules = _build_initramfs(
            kernel_root, roots[BUSYBOX_PACKAGE], pkgs.kernel_version, out / INITRAMFS, say
        )
        shutil.rmtree(unpacked)

        say("[6/6] writing manifest")
        manifest = {
            "format": FORMAT,
            "build_id": pkgs.build_id,
            "kernel_version": pkgs.kernel_version,
            "kernel_meta_package": {KERNEL_META_PACKAGE: pkgs.meta_version},
            "packages": dict(pkgs.versions),
            "pvh_entry": pvh,
            "modules": [m.relpath for m in modules],
            "files": {
                name: {"size": (out / name).stat().st_size, "sha256": _sha256(out / name)}
                for name in (VMLINUX, VMLINUZ, INITRAMFS)
            },
        }
        for name in (VMLINUX, VMLINUZ, INITRAMFS):
            (out / name).chmod(0o644)
        with (out / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

        final = cache / pkgs.build_id
        if final.exists() or final.is_symlink():
            final.rename(tmp / "old")  # removed with tmp
        out.rename(final)
        _set_current(cache, pkgs.build_id)
        _prune(cache, pkgs.build_id)
        guest = _guest_from(final, json.loads((final / MANIFEST).read_text()), verify=False)
        if guest is None:  # pragma: no cover - we just wrote it
            raise GuestBuildError(f"the build in {final} does not match its manifest")
        return guest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_tools() -> None:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"{', '.join(missing)} not found: building the Debian guest needs a Debian-based "
            "host with apt and dpkg"
        )


def build_debian_guest(
    cache_dir: Path | None = None,
    *,
    progress: bool | Progress = True,
    force: bool = False,
) -> DebianGuest:
    """Builds (or finds in the cache) the Debian Linux guest and returns its files.

    ``cache_dir`` defaults to :func:`default_cache_dir`. A finished build whose packages are
    still the ones apt offers is returned at once, untouched (its files are checked against
    the manifest's hashes); ``force`` rebuilds anyway. ``progress`` ``True`` prints progress
    lines on stderr, a callable receives them instead, ``False`` is silent. Raises
    :class:`GuestBuildError` on failure, leaving no temporary files behind.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GuestBuildError(f"cannot create the cache directory {cache}: {e.strerror}") from e
    try:
        if progress is not True:
            return _build_locked(cache, _reporter(progress), force)
        # On a terminal the step lines stay, and a line below them shows the step
        # running (the download as a bar); elsewhere only the step lines.
        from vmkit import _progress

        with _progress.Progress("vmkit guest build") as meter:
            if not meter.active:
                return _build_locked(cache, _reporter(True), force)

            def say(line: str) -> None:
                meter.note(line)
                meter.update(label=f"vmkit guest build {line.split(' ', 1)[0]}")

            return _build_locked(cache, say, force, meter)
    except OSError as e:  # disk full, permissions, ...: name the file concerned
        where = f" ({e.filename})" if e.filename else ""
        raise GuestBuildError(f"building in {cache}: {e.strerror or e}{where}") from e


def _build_locked(
    cache: Path, say: Progress, force: bool, meter: _progress.Progress | None = None
) -> DebianGuest:
    with _locked(cache):
        _remove_stale_temps(cache)
        say("[1/6] resolving packages")
        try:
            _check_tools()
            try:
                pkgs = _resolve_packages()
            except _NoCandidate:
                note = _apt_update(say, "[1/6]", "resolving packages")
                try:
                    pkgs = _resolve_packages()
                except _NoCandidate as e:
                    raise GuestBuildError(f"{e}{note}") from e
        except GuestBuildError as e:
            fallback = None if force else _current_build(cache)
            if fallback is None:
                raise
            say(f"[1/6] {e}; using the cached build in {fallback.directory}")
            return fallback
        say(
            f"[1/6] {KERNEL_META_PACKAGE} {pkgs.meta_version} -> "
            + ", ".join(f"{n} {v}" for n, v in pkgs.versions)
        )
        if not force:
            cached = _cached(cache / pkgs.build_id, pkgs)
            if cached is not None:
                say(f"[6/6] up to date: {cached.directory}")
                _set_current(cache, pkgs.build_id)
                return cached
        try:
            guest = _build(cache, pkgs, say, meter)
        except _NoCandidate:
            # The lists name versions the archive no longer has: refresh and start over.
            _apt_update(say, "[2/6]", "downloading packages")
            pkgs = _resolve_packages()
            cached = None if force else _cached(cache / pkgs.build_id, pkgs)
            if cached is not None:
                return cached
            guest = _build(cache, pkgs, say, meter)
        say(f"[6/6] done: {guest.directory}")
        return guest


# --------------------------------------------------------------------------------------------
# Command line: vmkit guest build [--cache-dir DIR] [--force] [--quiet]

_USAGE = "Usage: vmkit guest build [--cache-dir DIR] [--force] [--quiet]"
_HELP = f"""{_USAGE}

Builds the Debian Linux guest (kernel from linux-image-cloud-amd64, busybox initramfs with the
virtio modules) from Debian packages, or finds it already built in the cache, and prints its
paths.

Options:
  --cache-dir DIR  cache directory (default: $VMKIT_CACHE_DIR/debian-guest or
                   ~/.cache/vmkit/debian-guest)
  --force          rebuild even if the cached build is up to date
  --quiet          print no progress on stderr
  -h, --help       print this help
"""


def main(argv: list[str]) -> int:
    """``vmkit guest build`` (``argv`` without the words ``guest build``); returns the status.

    0 after printing ``name=path`` lines on stdout; 1 on a build failure; 2 on a usage error.
    """
    cache_dir: Path | None = None
    force = False
    quiet = False
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-h", "--help"):
            print(_HELP, end="")
            return 0
        if word == "--force":
            force = True
        elif word == "--quiet":
            quiet = True
        elif word == "--cache-dir" or word.startswith("--cache-dir="):
            if word == "--cache-dir":
                if i + 1 >= len(words):
                    print(f"error: --cache-dir needs a value\n{_USAGE}", file=sys.stderr)
                    return 2
                i += 1
                value = words[i]
            else:
                value = word.split("=", 1)[1]
            if not value:
                print(f"error: --cache-dir needs a value\n{_USAGE}", file=sys.stderr)
                return 2
            cache_dir = Path(value)
        else:
            print(f"error: unexpected argument '{word}'\n{_USAGE}", file=sys.stderr)
            return 2
        i += 1
    try:
        guest = build_debian_guest(cache_dir, progress=not quiet, force=force)
    except GuestBuildError as e:
        print(f"error: building the Debian guest failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: building the Debian guest was interrupted", file=sys.stderr)
        return 1
    for key, value in (
        ("vmlinux", str(guest.vmlinux)),
        ("vmlinuz", str(guest.vmlinuz)),
        ("initramfs", str(guest.initramfs)),
        ("kernel_version", guest.kernel_version),
        ("directory", str(guest.directory)),
    ):
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
