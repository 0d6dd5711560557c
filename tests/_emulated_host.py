"""An emulated host: a shell script run as root on Debian's generic kernel under QEMU TCG, in a
leaf cgroup of a cgroup v2 hierarchy whose cpu controller is enabled, chrooted into this
machine's root filesystem (shared read-only over 9p).

It lets the tests check what this machine's own kernel setup cannot show (here the cpu
controller is bound to cgroup v1). With ``kvm=True`` the guest loads ``kvm_amd``: TCG's
``-cpu max`` emulates AMD SVM with nested paging, so ``/dev/kvm`` works inside (slowly) and
vmkit's real VMs run there.

The kernel (``linux-image-amd64``'s current dependency: the cloud kernel has no 9p) and
busybox-static come from Debian with ``apt-get download``; the initramfs is built once and
cached in ``<vmkit cache>/emulated-host/<kernel version>-<id>/``, the way
:mod:`vmkit.debian_guest` caches its guest (whose helpers this reuses).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import vmkit
from vmkit import debian_guest as dg

KERNEL_META_PACKAGE = "linux-image-amd64"
#: Loaded at boot, for the host root over 9p.
BASE_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
#: Loaded with ``kvm=True`` (``tun``: the taps of the VMs' networks).
KVM_MODULES = ("kvm_amd", "tun")
#: The leaf cgroup the script runs in (inside the guest).
LEAF = "/sys/fs/cgroup/test.slice/run.scope"
FORMAT = "vmkit-emulated-host/1"
_QEMU = "qemu-system-x86_64"
_RC_MARK = "EMULATED-HOST-RC="
_INITRAMFS = "initramfs.cpio.gz"

_INIT = r"""#!/bin/busybox sh
# /init of the emulated host (tests/_emulated_host.py).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "emulated-host: $*"; }
fail() { say "FAILED: $*"; echo "@RC@250"; poweroff -f; }
load() {
  for m in "$@"; do insmod "/lib/modules/@KVER@/$m" || fail "insmod $m"; done
}
load @BASE@
kvm=0
for w in $(cat /proc/cmdline); do
  case $w in emulated_host.kvm=1) kvm=1 ;; esac
done
H=/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=none,msize=262144 hostroot $H \
  || fail "mount of the host root over 9p"
mount -t proc proc $H/proc || fail "proc"
mount -t sysfs sysfs $H/sys || fail "sysfs"
mount -t devtmpfs devtmpfs $H/dev || fail "devtmpfs"
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts devpts $H/dev/pts
mount -t tmpfs tmpfs $H/dev/shm
# The host root is read-only: /tmp and /run are the guest's own, but the paths in the job's
# "keep" file (a checkout or a Python under /tmp) stay the host's, bound from /hosttmp.
mkdir -p /hosttmp
mount --bind $H/tmp /hosttmp || fail "bind of the host's /tmp"
mount -t tmpfs tmpfs $H/tmp || fail "tmpfs on /tmp"
mount -t tmpfs tmpfs $H/run
mkdir -p $H/tmp/emulated-host
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 job $H/tmp/emulated-host \
  || fail "mount of the job directory over 9p"
while IFS= read -r p; do
  mkdir -p "$H$p" && mount --bind "/hosttmp${p#/tmp}" "$H$p" || fail "bind of $p"
done < $H/tmp/emulated-host/keep
C=$H/sys/fs/cgroup
mount -t cgroup2 cgroup2 $C || fail "cgroup2"
echo +cpu > $C/cgroup.subtree_control || fail "+cpu in the root's subtree_control"
mkdir $C/test.slice && echo +cpu > $C/test.slice/cgroup.subtree_control \
  || fail "+cpu in test.slice's subtree_control"
mkdir $C/test.slice/run.scope || fail "mkdir run.scope"
[ $kvm = 1 ] && load @KVM@
(
  echo 0 > $C/test.slice/run.scope/cgroup.procs || exit 250
  exec chroot $H /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/sh -c 'cd /tmp && exec /bin/sh /tmp/emulated-host/script.sh'
)
rc=$?
echo "$rc" > $H/tmp/emulated-host/rc
echo "@RC@$rc"
sync
umount $H/tmp/emulated-host
poweroff -f
"""


@dataclass(frozen=True)
class EmulatedHost:
    """A built kernel and initramfs."""

    vmlinuz: Path
    initramfs: Path
    kernel_version: str


@dataclass(frozen=True)
class Run:
    """What a script run in the emulated host gave."""

    rc: int | None
    """The script's exit status; None when the guest reported none (see ``console``)."""
    console: str
    """The guest's console: the script's output, the kernel's and QEMU's messages."""
    seconds: float
    timed_out: bool


def default_cache_dir() -> Path:
    return dg.default_cache_dir().parent / "emulated-host"


def _build_id(pkgs: dg._Packages) -> str:
    recipe = json.dumps(
        {"format": FORMAT, "packages": pkgs.versions, "init": _INIT,
         "base": BASE_MODULES, "kvm": KVM_MODULES},
        sort_keys=True,
    )  # fmt: skip
    return f"{pkgs.kernel_version}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def _cached(directory: Path) -> EmulatedHost | None:
    try:
        manifest = json.loads((directory / dg.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or set(digests) != {"vmlinuz", _INITRAMFS}:
        return None
    for name, digest in digests.items():
        if not (directory / name).is_file() or dg._sha256(directory / name) != digest:
            return None
    return EmulatedHost(
        directory / "vmlinuz", directory / _INITRAMFS, str(manifest["kernel_version"])
    )


def _initramfs(kernel: Path, busybox: Path, kernel_version: str, out: Path) -> None:
    moddir = kernel / "lib" / "modules" / kernel_version
    base = dg._collect_modules(moddir, kernel_version, wanted=BASE_MODULES)
    kvm = [
        m
        for m in dg._collect_modules(moddir, kernel_version, wanted=KVM_MODULES)
        if m.name not in {b.name for b in base}
    ]
    init = (
        _INIT.replace("@KVER@", kernel_version)
        .replace("@BASE@", " ".join(m.relpath for m in base))
        .replace("@KVM@", " ".join(m.relpath for m in kvm))
        .replace("@RC@", _RC_MARK)
    )
    entries: dict[str, dg._CpioEntry] = {}

    def add(path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, dg._CpioEntry(parent, stat.S_IFDIR | 0o755))
        entries[path] = dg._CpioEntry(path, mode, data, rdev)

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "host"):
        add(d, stat.S_IFDIR | 0o755)
    add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    add("bin/busybox", stat.S_IFREG | 0o755, (busybox / "bin" / "busybox").read_bytes())
    applets = dg._busybox_applets(busybox / "bin" / "busybox")
    if applets is None:
        raise dg.GuestBuildError("building the emulated host: busybox does not run here")
    for applet in applets:
        if applet not in entries and applet != "linuxrc":
            add(applet, stat.S_IFLNK | 0o777, b"/bin/busybox")
    for m in [*base, *kvm]:
        add(f"lib/modules/{kernel_version}/{m.relpath}", stat.S_IFREG | 0o644, m.data)
    add("init", stat.S_IFREG | 0o755, init.encode())
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz,
    ):
        gz.write(dg._cpio_newc(list(entries.values())))


def _resolve() -> dg._Packages:
    return dg._resolve_packages(meta_package=KERNEL_META_PACKAGE, extra=(dg.BUSYBOX_PACKAGE,))


def build(cache: Path | None = None) -> EmulatedHost:
    """The kernel and initramfs, built once per package versions; GuestBuildError (naming
    the cause: no archive, no apt) when that fails."""
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    say = dg._reporter(False)
    with dg._locked(cache):
        dg._remove_stale_temps(cache)
        dg._check_tools()
        try:
            pkgs = _resolve()
        except dg._NoCandidate:
            dg._apt_update(say, "", "resolving packages")
            pkgs = _resolve()
        found = _cached(cache / _build_id(pkgs))
        if found is not None:
            return found
        try:
            return _build(cache, pkgs)
        except dg._NoCandidate:
            # The lists name versions the archive no longer has.
            dg._apt_update(say, "", "downloading packages")
            return _build(cache, _resolve())


def _build(cache: Path, pkgs: dg._Packages) -> EmulatedHost:
    build_id = _build_id(pkgs)
    final = cache / build_id
    tmp = Path(tempfile.mkdtemp(prefix=f"{dg._TMP_PREFIX}build-", dir=cache))
    try:
        (tmp / "debs").mkdir()
        debs = dg._download(pkgs, tmp / "debs", dg._reporter(False))
        roots = {name: dg._extract(deb, tmp, name) for name, deb in debs.items()}
        kernel = roots[pkgs.kernel_package]
        out = tmp / "out"
        out.mkdir()
        shutil.copyfile(kernel / "boot" / f"vmlinuz-{pkgs.kernel_version}", out / "vmlinuz")
        _initramfs(kernel, roots[dg.BUSYBOX_PACKAGE], pkgs.kernel_version, out / _INITRAMFS)
        manifest = {
            "format": FORMAT,
            "kernel_version": pkgs.kernel_version,
            "packages": dict(pkgs.versions),
            "sha256": {n: dg._sha256(out / n) for n in ("vmlinuz", _INITRAMFS)},
        }
        (out / dg.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if final.exists():
            final.rename(tmp / "old")  # removed with tmp
        out.rename(final)
        # Older builds go (about 10 MB each).
        for entry in cache.iterdir():
            if entry.name != build_id and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    built = _cached(final)
    if built is None:
        raise dg.GuestBuildError(f"the build in {final} does not match its manifest")
    return built


def run_in_emulated_host(
    script: str,
    *,
    kvm: bool,
    timeout: float,
    smp: int = 1,
    memory: str = "2G",
    keep: Sequence[Path] = (),
) -> Run:
    """Runs ``sh script`` as root in the emulated host (in cgroup ``LEAF``, cwd ``/tmp``, with
    this Python's directory first on PATH). The host's root is read-only there; /tmp, /run
    and the caches named below are tmpfs, but for the directories in ``keep``, this Python's
    and vmkit's, which are the host's wherever they are. QEMU is killed after ``timeout``
    seconds."""
    host = build()
    qemu = shutil.which(_QEMU)
    if qemu is None:
        raise FileNotFoundError(f"{_QEMU} is not installed")
    # The guest imports the vmkit this process imported (an installed one, or a checkout's).
    vmkit_path = Path(vmkit.__file__).parent.parent
    prologue = (
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH\n"
        f"export PYTHONPATH={shlex.quote(str(vmkit_path))} PYTHONDONTWRITEBYTECODE=1\n"
        # vmkit.testguest writes its image in VMKIT_CACHE_DIR; the home directory is read-only.
        "export VMKIT_CACHE_DIR=/tmp/cache/vmkit XDG_CACHE_HOME=/tmp/cache\n"
    )
    # Only what lies under /tmp needs binding: the rest of the host root is there as it is.
    wanted = [Path(path).resolve() for path in (*keep, vmkit_path, Path(sys.prefix))]
    under_tmp = {
        str(path) for path in wanted if path.is_relative_to("/tmp") and path != Path("/tmp")
    }
    if any("\n" in path for path in under_tmp):
        raise ValueError(f"a path with a newline cannot be kept: {sorted(under_tmp)!r}")
    with tempfile.TemporaryDirectory(prefix="vmkit-emulated-host-") as job:
        Path(job, "script.sh").write_text(prologue + script)
        Path(job, "keep").write_text("".join(f"{path}\n" for path in sorted(under_tmp)))
        append = "console=ttyS0 panic=-1 quiet" + (" emulated_host.kvm=1" if kvm else "")
        cmd = [
            qemu, "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", str(smp),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-nodefaults", "-kernel", str(host.vmlinuz), "-initrd", str(host.initramfs),
            "-append", append,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                       "readonly=on,multidevs=remap",
            "-virtfs", f"local,path={job},mount_tag=job,security_model=none",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            try:
                raw, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                raw, _ = proc.communicate()
        finally:
            if proc.poll() is None:  # interrupted: no QEMU is left behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - start
        console = raw.decode("utf-8", "replace").replace("\r", "")
        try:
            rc: int | None = int(Path(job, "rc").read_text())
        except (OSError, ValueError):
            rc = None
    if timed_out:
        console += f"\n[QEMU killed after {timeout:.0f} s]\n"
    return Run(rc, console, seconds, timed_out)


def collected(test_file: Path, *args: str) -> list[str]:
    """Node ids pytest collects from ``test_file`` on this machine (``args``: e.g. ``-m``)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *args, str(test_file)],
        capture_output=True, text=True, check=False, cwd=test_file.parent.parent,
    )  # fmt: skip
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert ids, f"collecting {test_file} failed:\n{result.stdout}{result.stderr}"
    return ids


def pytest_summary(console: str) -> dict[str, int]:
    """Counts of the last pytest summary line in ``console`` (``10 passed, 1 skipped in 41.2s``)."""
    word = r"(passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)"
    lines = [
        line for line in console.splitlines() if re.match(rf"^\W*\d+ {word}\b.* in [\d.]+s", line)
    ]
    if not lines:
        return {}
    counts = re.findall(rf"(\d+) {word}\b", lines[-1])
    return {("error" if kind.startswith("error") else kind): int(n) for n, kind in counts}
