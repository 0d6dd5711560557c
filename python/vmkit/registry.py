"""The per-user registry of running VMMs, which ``vmkit ls`` lists.

A VMM with an API socket (``vmkit --api-socket PATH``, ``Vm.spawn``) writes
one small JSON file, ``<name>.json``, into the registry directory once its
socket listens, and removes it when it exits. A VMM killed with SIGKILL
cannot remove its file: each entry records the process's start time (from
``/proc/PID/stat``), so an entry whose process is gone, or whose pid now
belongs to another process, is known stale: the next listing removes it, and
a registration under its name replaces it.

The directory is ``$XDG_RUNTIME_DIR/vmkit`` when ``XDG_RUNTIME_DIR`` names a
directory of this user's, else ``/tmp/vmkit-<uid>``. Either must be a real
directory (no symlink) owned by this user and writable by nobody else:
otherwise another user could plant entries that send ``vmkit remote NAME``
to their socket, so it is refused (``RegistryError``).
"""

from __future__ import annotations

import os
import stat
import time

from vmkit._record import record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = [
    "Entry",
    "NameTaken",
    "Registration",
    "RegistryError",
    "VmNotFound",
    "default_name",
    "entries",
    "find",
    "register",
    "registry_dir",
    "registry_path",
    "validate_name",
]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_MAX_NAME = 63
_SUFFIX = ".json"
_LOCK = ".lock"
_TEMP_PREFIX = ".tmp-"
#: How long a registry change waits for another process's (they take microseconds).
_LOCK_WAIT = 2.0


class RegistryError(Exception):
    """The registry directory cannot be used (unsafe, or not writable)."""


class NameTaken(RegistryError):
    """Another live VMM already has this name."""

    def __init__(self, name: str, pid: int) -> None:
        super().__init__(
            f"a VM named {name!r} is already running (VMM pid {pid}); "
            "choose another name, or stop that VM first"
        )
        self.name = name
        self.pid = pid


class VmNotFound(LookupError):
    """No running VMM has this name or pid."""

    def __init__(self, name_or_pid: str | int) -> None:
        super().__init__(f"no running VM named {str(name_or_pid)!r} ('vmkit ls' lists them)")
        self.name_or_pid = name_or_pid


def validate_name(name: str) -> str:
    """``name`` if it can name a VM; else ValueError saying what a name may be.

    Not all digits, so that a pid never reads as a name; no '/', so that a
    name never reads as a path.
    """
    if (
        not name
        or len(name) > _MAX_NAME
        or not _NAME_CHARS.issuperset(name)
        or not name[0].isalnum()
        or name.isdigit()
    ):
        raise ValueError(
            f"invalid VM name {name!r}: a name has 1 to {_MAX_NAME} letters, digits, "
            "'.', '_' or '-', starts with a letter or digit and is not only digits"
        )
    return name


def default_name(pid: int) -> str:
    """The name of a VMM started without one."""
    return f"vm-{pid}"


def _check_private(path: str, what: str) -> None:
    """Raises RegistryError unless ``path`` is a directory (not a symlink)
    that this user owns and nobody else can write to."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RegistryError(f"refusing {what} {path}: it is not a directory")
    if info.st_uid != os.geteuid():
        raise RegistryError(
            f"refusing {what} {path}: it is owned by uid {info.st_uid}, not by this user "
            f"(uid {os.geteuid()}); another user could list VMs there as yours"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RegistryError(
            f"refusing {what} {path}: it is writable by its group or by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); make it 0700"
        )


def _usable_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` if set to an absolute directory of this user's."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isabs(base):
        return None
    try:
        info = os.stat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return None
    if not os.access(base, os.W_OK | os.X_OK):
        return None
    return base


def registry_path() -> str:
    """Where the registry directory is (unchecked; see ``registry_dir``)."""
    base = _usable_runtime_dir()
    return os.path.join(base, "vmkit") if base else f"/tmp/vmkit-{os.geteuid()}"


def registry_dir(create: bool = True) -> str:
    """The registry directory (made, mode 0700, with ``create``); raises
    RegistryError when it is unsafe or cannot be made, FileNotFoundError when
    it does not exist and ``create`` is false."""
    path = registry_path()
    what = "the vmkit registry directory"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise RegistryError(f"cannot make {what} {path}: {os.strerror(e.errno or 0)}") from None
    try:
        _check_private(path, what)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RegistryError(f"cannot use {what} {path}: {os.strerror(e.errno or 0)}") from None
    return path


@record(frozen=True)
class Entry:
    """One registered VMM."""

    name: str
    pid: int
    #: the process's start time, in clock ticks after boot (/proc/PID/stat field 22)
    pid_start: int
    api_socket: str
    kernel: str | None
    #: when it registered (seconds since the epoch)
    started: float
    #: the directory ``Vm.spawn`` made for it, and the spawning program
    #: (pid, start time): once both processes are gone, nobody else removes it
    spawn_dir: str | None = None
    owner: tuple[int, int] | None = None

    def to_json(self) -> str:
        """The entry as ``json.dumps`` writes it, without the json module:
        a VMM registering itself as it starts writes no other JSON, and
        importing json (with the re it loads) took longer than the rest of
        the registration."""
        kernel = "null" if self.kernel is None else _json_string(self.kernel)
        text = (
            f'{{"name": {_json_string(self.name)}, "pid": {self.pid}, '
            f'"pid_start": {self.pid_start}, "api_socket": {_json_string(self.api_socket)}, '
            f'"kernel": {kernel}, "started": {float(self.started)!r}'
        )
        if self.spawn_dir is not None and self.owner is not None:
            text += (
                f', "spawn_dir": {_json_string(self.spawn_dir)}, '
                f'"owner": [{self.owner[0]}, {self.owner[1]}]'
            )
        return text + "}"

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        """Raises ValueError for anything but an entry this module wrote."""
        import json

        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            name, pid, pid_start = data["name"], data["pid"], data["pid_start"]
            api_socket, kernel, started = data["api_socket"], data["kernel"], data["started"]
        except KeyError as e:
            raise ValueError(f"no {e.args[0]!r}") from None
        if not (
            isinstance(name, str)
            and type(pid) is int
            and type(pid_start) is int
            and isinstance(api_socket, str)
            and (kernel is None or isinstance(kernel, str))
            and isinstance(started, int | float)
        ):
            raise ValueError("a field of the wrong type")
        spawn_dir, owner = data.get("spawn_dir"), data.get("owner")
        if spawn_dir is None or owner is None:
            return cls(name, pid, pid_start, api_socket, kernel, float(started))
        if not (
            isinstance(spawn_dir, str)
            and isinstance(owner, list)
            and len(owner) == 2
            and all(type(n) is int for n in owner)
        ):
            raise ValueError("a field of the wrong type")
        return cls(
            name,
            pid,
            pid_start,
            api_socket,
            kernel,
            float(started),
            spawn_dir,
            (owner[0], owner[1]),
        )

    @property
    def alive(self) -> bool:
        """Whether the process that registered is still running (not the same
        pid reused by another process, not a zombie)."""
        return process_start(self.pid) == self.pid_start

    def uptime(self) -> float:
        """Seconds since the process started (0 when it is gone)."""
        start = process_start(self.pid)
        if start is None:
            return 0.0
        try:
            with open("/proc/uptime", "rb") as f:
                since_boot = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return max(0.0, time.time() - self.started)
        return max(0.0, since_boot - start / os.sysconf("SC_CLK_TCK"))


def _json_string(text: str) -> str:
    """``text`` as a JSON string, escaped as ``json.dumps`` escapes it."""
    try:
        from _json import encode_basestring_ascii
    except ImportError:  # a Python without the C accelerator json uses
        import json

        return json.dumps(text)
    return str(encode_basestring_ascii(text))


def process_start(pid: int) -> int | None:
    """The start time of running process ``pid`` (clock ticks after boot), or
    None when there is none (gone, or a zombie)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: fields
    # after it are counted from its closing parenthesis.
    fields = text[text.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


_own_start: tuple[int, int | None] = (0, None)  # (pid, its start), for own_start()


def own_start() -> int | None:
    """This process's ``process_start``, read once (a forked child reads its own)."""
    global _own_start
    pid = os.getpid()
    if _own_start[0] != pid:
        _own_start = (pid, process_start(pid))
    return _own_start[1]


class _RegistryLock:
    """Holds the registry's lock: a registration's check-then-write, and a
    clean-up's check-then-remove, are not interleaved with another's.

    A class rather than a generator context manager: a fleet's start and
    stop take it once per VM, and making a decorated generator per use cost
    ~20 microseconds each time."""

    __slots__ = ("_fd", "_path")

    def __init__(self, directory: str) -> None:
        self._path = os.path.join(directory, _LOCK)
        self._fd = -1

    def __enter__(self) -> None:
        import fcntl

        path = self._path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise RegistryError(f"cannot open {path}: {os.strerror(e.errno or 0)}") from None
        try:
            deadline = time.monotonic() + _LOCK_WAIT
            # Holders keep it for tens of microseconds: a fleet that starts or
            # stops at once queues here, so the first waits are short.
            pause = 0.0001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        directory = os.path.dirname(path)
                        raise RegistryError(
                            f"the vmkit registry {directory} stayed locked for "
                            f"{_LOCK_WAIT} s (is a process holding {_LOCK} stopped?)"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.005)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)  # releases the lock


def _read(path: str) -> Entry | None:
    """The entry in file ``path``; None if it is gone or unreadable."""
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        return Entry.from_json(data)
    except ValueError:
        return None


def _read_bytes(path: str) -> bytes | None:
    """The contents of entry file ``path`` (at most 64 KiB); None if it is
    gone, unreadable or larger."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        # os.read, not a file object: this runs in a VMM under its seccomp
        # filter too, and a file object asks the kernel whether it is a tty.
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > 65536:
                return None  # not an entry
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove_stale(directory: str, filename: str, seen: Entry) -> None:
    """Removes ``filename`` if it still holds the dead VMM ``seen`` (under the
    lock: a VMM registering the same name since then keeps its entry)."""
    path = os.path.join(directory, filename)
    with _RegistryLock(directory):
        current = _read(path)
        if current is not None and current == seen and not current.alive:
            _unlink(path)
            if current.spawn_dir is not None and current.owner is not None:
                owner_pid, owner_start = current.owner
                if process_start(owner_pid) != owner_start:
                    _remove_orphaned_spawn_dir(current.spawn_dir)


#: What ``Vm.spawn`` puts in the directory it makes for a VM.
SPAWN_DIR_FILES = ("api.sock", "serial.log", "vmm.log")
#: ``Vm.spawn``'s directories' name prefix; ``spawn_dir_prefix`` adds the spawner.
SPAWN_DIR_PREFIX = "vmkit-vmm-"


def spawn_dir_prefix() -> str:
    """``Vm.spawn``'s directory name prefix in this program: it names this
    process, so that a listing can tell a directory left by a spawner killed
    before the VM's entry was written (a pid taken again since only keeps a
    directory longer)."""
    return f"{SPAWN_DIR_PREFIX}{os.getpid()}-"


def remove_orphaned_spawn_dirs(parent: str, keep: Collection[str] = ()) -> None:
    """Removes the directories in ``parent`` that ``Vm.spawn`` made in
    programs that are gone, but those in ``keep`` (live VMs'). A VM process
    ends with its spawner and removes its directory itself; this is for those
    killed together (a listed VM's directory also goes with its stale entry)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(SPAWN_DIR_PREFIX):
            continue
        # Older names have no pid: only a listed VM's entry can clear those.
        pid, named, _ = name[len(SPAWN_DIR_PREFIX) :].partition("-")
        path = os.path.join(parent, name)
        if named and pid.isdigit() and process_start(int(pid)) is None and path not in keep:
            _remove_orphaned_spawn_dir(path)


def _remove_orphaned_spawn_dir(path: str) -> None:
    """Removes the directory of a spawned VM whose process and spawning
    program were killed (SIGKILL leaves no one to remove it): only one of
    this user's, named as ``Vm.spawn`` names them, with ``Vm.spawn``'s files
    and nothing else in it."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if (
        not os.path.basename(path).startswith(SPAWN_DIR_PREFIX)
        or not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
    ):
        return
    remove_spawn_dir(path)  # one with something else in it is left alone


def remove_spawn_dir(path: str) -> bool:
    """Removes ``Vm.spawn``'s files in ``path``, then the directory; false
    when something else in it kept it."""
    for name in SPAWN_DIR_FILES:
        _unlink(os.path.join(path, name))
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _scan(directory: str, clean: bool) -> list[Entry]:
    """The live entries in ``directory``; with ``clean``, the stale removed."""
    live: list[Entry] = []
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise RegistryError(f"cannot read the vmkit registry {directory}: {e.strerror}") from None
    for filename in sorted(names):
        if filename.startswith(_TEMP_PREFIX) and clean:
            # A VMM killed between writing its entry and renaming it into place.
            pid = filename[len(_TEMP_PREFIX) :].partition("-")[0]
            if pid.isdigit() and process_start(int(pid)) is None:
                _unlink(os.path.join(directory, filename))
            continue
        if not filename.endswith(_SUFFIX) or filename.startswith("."):
            continue
        entry = _read(os.path.join(directory, filename))
        if entry is None:
            continue
        if entry.alive:
            live.append(entry)
        elif clean:
            _remove_stale(directory, filename, entry)
    return live


def entries(clean: bool = True) -> list[Entry]:
    """The registered VMMs that are running, by name; with ``clean`` the
    entries of VMMs that are gone are removed. Raises RegistryError when the
    registry directory is unsafe."""
    try:
        directory = registry_dir(create=False)
    except FileNotFoundError:
        return []  # nothing ever registered
    return _scan(directory, clean)


def find(name_or_pid: str | int) -> Entry:
    """The running VMM with this name, or with this pid (an int, or a string
    of digits); raises VmNotFound, or RegistryError."""
    text = str(name_or_pid)
    for entry in entries():
        if (text.isdigit() and entry.pid == int(text)) or entry.name == text:
            return entry
    raise VmNotFound(name_or_pid)


class Registration:
    """A VMM's entry, written by ``register``; ``remove()`` takes it out
    (only if it is still this VMM's)."""

    def __init__(self, directory: str, entry: Entry, written: bytes) -> None:
        self.directory = directory
        self.entry = entry
        #: the file's contents as ``register`` wrote them
        self._written = written
        self._removed = False

    @property
    def path(self) -> str:
        """The entry's file."""
        return os.path.join(self.directory, self.entry.name + _SUFFIX)

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        path = self.path
        try:
            if not os.path.lexists(path):
                return  # removed by the VM process as it ended
            with _RegistryLock(self.directory):
                # The bytes this VMM wrote, not an equal entry parsed: a
                # fleet's close removes many, and parsing each cost more.
                if _read_bytes(path) == self._written:
                    _unlink(path)
        except (OSError, RegistryError):
            pass  # left behind: stale, and removed by the next listing


def check_name_free(name: str) -> None:
    """Raises NameTaken when a live VMM has ``name`` (registration checks
    again, atomically: this is for an early, clear error). Reads that name's
    entry only, as registration does."""
    try:
        directory = registry_dir(create=False)
    except FileNotFoundError:
        return  # nothing ever registered
    entry = _read(os.path.join(directory, name + _SUFFIX))
    if entry is not None and entry.alive:
        raise NameTaken(name, entry.pid)


def register(
    name: str | None,
    pid: int,
    api_socket: str,
    kernel: str | None,
    spawn_dir: str | None = None,
) -> Registration:
    """Writes the entry of VMM process ``pid`` serving ``api_socket``, named
    ``name`` (``default_name(pid)`` if None). ``spawn_dir``: the directory
    ``Vm.spawn`` made for the VM in this program, removed by a listing once
    the VMM and this program are gone. Raises NameTaken when a live VMM has
    that name, RegistryError when the directory cannot be used, ValueError
    for an invalid name, ProcessLookupError when ``pid`` is gone."""
    name = validate_name(default_name(pid) if name is None else name)
    pid_start = process_start(pid)
    if pid_start is None:
        raise ProcessLookupError(f"VMM process {pid} is not running")
    owner_start = own_start() if spawn_dir is not None else None
    entry = Entry(
        name=name,
        pid=pid,
        pid_start=pid_start,
        api_socket=os.path.abspath(api_socket),
        kernel=None if kernel is None else os.path.abspath(kernel),
        started=time.time(),
        spawn_dir=None if owner_start is None or spawn_dir is None else os.path.abspath(spawn_dir),
        owner=None if owner_start is None else (os.getpid(), owner_start),
    )
    directory = registry_dir()
    path = os.path.join(directory, name + _SUFFIX)
    temp = os.path.join(directory, f"{_TEMP_PREFIX}{os.getpid()}-{name}")
    # Only this name's entry is read: a registration that read every entry
    # (to clean the stale ones, which listings do) would cost a fleet started
    # at once time in the square of its size, under the lock.
    with _RegistryLock(directory):
        other = _read(path)
        if other is not None and other.alive:
            raise NameTaken(name, other.pid)
        written = entry.to_json().encode()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, written)
            finally:
                os.close(fd)
            os.rename(temp, path)  # readers see the whole entry or none
        except OSError as e:
            _unlink(temp)
            raise RegistryError(
                f"cannot write to the vmkit registry {directory}: {os.strerror(e.errno or 0)}"
            ) from None
    return Registration(directory, entry, written)
