"""``vmkit remote``: Cloud Hypervisor v37's ``ch-remote``.

    vmkit remote [--api-socket <path>] <subcommand> [args...]
    vmkit remote <name|pid> <subcommand> [args...]

Every subcommand of ch-remote v37, with its arguments, the exact request
bytes it writes, its output and its exit codes (ch-reference §4.6):

- a 2xx answer's body, when it has one, is printed to stdout followed by a
  newline; exit 0;
- any other status prints ``Error running command: Server responded with an
  error: <Status>[: <body>]`` to stderr; exit 1;
- option strings (``add-disk path=...``) are parsed by ``vmkit.config`` as
  the ``vmkit`` command parses them, so the same defaults (a random MAC for
  ``add-net``) and errors apply: ``Error running command: Error parsing disk
  syntax: Error parsing --disk: unknown option: foo``; exit 1;
- ``add-net ...,fd=[3,4]`` takes the descriptors out of the JSON and passes
  them with SCM_RIGHTS (they are this process's descriptors);
- no ``--api-socket``: ``Please either provide the api-socket option or
  dbus-service-name and dbus-object-path options`` on stdout; exit 1; a
  socket that cannot be opened: ``Error opening HTTP socket: <error>`` on
  stderr; exit 1.

Differences from ch-remote:

- where ch-remote panics (a missing positional argument, or ``resize-zone``
  without ``--id`` or ``--size``), ``vmkit remote`` prints a usage error and
  exits 2, like the other usage errors (unknown subcommand or option, extra
  argument); as in ch-remote, that check comes after the socket is opened;
- an empty body (``Content-Length: 0``) counts as no body: nothing is
  printed for a 2xx, and no ``: `` follows the status in an error, where
  ch-remote would print an empty line or a dangling ``: `` (a body-less
  answer without ``Content-Length`` gives the same output in both);
- there is no D-Bus transport;
- a VM started by vmkit can be named instead of its socket (``vmkit ls``
  lists them): ``vmkit remote vm1 info``, or ``--api-socket vm1`` when no
  file ``vm1`` exists (a path with a ``/``, or one that exists, is always
  taken as the socket, as ch-remote takes it); its pid works too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmkit import _apiwire, _flags, config
from vmkit.errors import ConfigError

__all__ = ["main", "run"]

PROGRAM = "vmkit remote"
ABOUT = "Remotely control a cloud-hypervisor VMM."
NO_TARGET = (
    "Please either provide the api-socket option or dbus-service-name and dbus-object-path options"
)


class _Usage(Exception):
    """A usage error (exit 2); ``usage`` is the usage line to show."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _CommandError(Exception):
    """A command failed; ``str()`` follows ``Error running command: ``."""


@dataclass(frozen=True)
class _Option:
    name: str
    help: str
    takes_value: bool = True

    @property
    def display(self) -> str:
        return f"--{self.name} <{self.name}>" if self.takes_value else f"--{self.name}"


@dataclass(frozen=True)
class _Subcommand:
    name: str
    about: str
    positional: str | None = None
    positional_help: str = ""
    default: str | None = None
    options: tuple[_Option, ...] = ()
    required_options: tuple[str, ...] = ()

    def usage(self) -> str:
        words = [f"{PROGRAM} {self.name}"]
        if self.options:
            words.append("[OPTIONS]")
        if self.positional:
            words.append(f"[{self.positional}]")
        return " ".join(words)


def _syntax(flag: str) -> str:
    for f in _flags.FLAGS:
        if f.long == flag:
            return f.help
    raise KeyError(flag)  # pragma: no cover


_SUBCOMMANDS: tuple[_Subcommand, ...] = (
    _Subcommand("add-device", "Add VFIO device", "device_config", _syntax("--device")),
    _Subcommand("add-disk", "Add block device", "disk_config", _syntax("--disk")),
    _Subcommand("add-fs", "Add virtio-fs backed fs device", "fs_config", _syntax("--fs")),
    _Subcommand("add-pmem", "Add persistent memory device", "pmem_config", _syntax("--pmem")),
    _Subcommand("add-net", "Add network device", "net_config", _syntax("--net")),
    _Subcommand(
        "add-user-device", "Add userspace device", "device_config", _syntax("--user-device")
    ),
    _Subcommand("add-vdpa", "Add vDPA device", "vdpa_config", _syntax("--vdpa")),
    _Subcommand("add-vsock", "Add vsock device", "vsock_config", _syntax("--vsock")),
    _Subcommand("remove-device", "Remove VFIO device", "id", "<device_id>"),
    _Subcommand("info", "Info on the VM"),
    _Subcommand("counters", "Counters from the VM"),
    _Subcommand("pause", "Pause the VM"),
    _Subcommand("reboot", "Reboot the VM"),
    _Subcommand("power-button", "Trigger a power button in the VM"),
    _Subcommand(
        "resize",
        "Resize the VM",
        options=(
            _Option("cpus", "New vCPUs count"),
            _Option("memory", "New memory size in bytes (supports K/M/G suffix)"),
            _Option("balloon", "New balloon size in bytes (supports K/M/G suffix)"),
        ),
    ),
    _Subcommand(
        "resize-zone",
        "Resize a memory zone",
        options=(
            _Option("id", "Memory zone identifier"),
            _Option("size", "New memory zone size in bytes (supports K/M/G suffix)"),
        ),
        required_options=("id", "size"),
    ),
    _Subcommand("resume", "Resume the VM"),
    _Subcommand("boot", "Boot a created VM"),
    _Subcommand("delete", "Delete a VM"),
    _Subcommand("shutdown", "Shutdown the VM"),
    _Subcommand("snapshot", "Create a snapshot from VM", "snapshot_config", "<destination_url>"),
    _Subcommand("restore", "Restore VM from a snapshot", "restore_config", _syntax("--restore")),
    _Subcommand("coredump", "Create a coredump from VM", "coredump_config", "<file_path>"),
    _Subcommand(
        "send-migration",
        "Initiate a VM migration",
        "send_migration_config",
        "<destination_url>",
        options=(_Option("local", "", takes_value=False),),
    ),
    _Subcommand(
        "receive-migration", "Receive a VM migration", "receive_migration_config", "<receiver_url>"
    ),
    _Subcommand("create", "Create VM from a JSON configuration", "path", "", default="-"),
    _Subcommand("ping", "Ping the VMM to check for API server availability"),
    _Subcommand("shutdown-vmm", "Shutdown the VMM"),
)
_BY_NAME = {sub.name: sub for sub in _SUBCOMMANDS}
_TOP_USAGE = f"{PROGRAM} [OPTIONS] <COMMAND>"


def help_text() -> str:
    """``vmkit remote --help``."""
    width = max(len(sub.name) for sub in _SUBCOMMANDS) + 2
    lines = [ABOUT, "", f"Usage: {_TOP_USAGE}", "", "Commands:"]
    for sub in _SUBCOMMANDS:
        lines.append(f"  {sub.name:<{width}}{sub.about}")
    lines.append(f"  {'help':<{width}}Print this message or the help of the given subcommand(s)")
    lines += [
        "",
        "Options:",
        "      --api-socket <api-socket>  HTTP API socket path (UNIX domain socket).",
        "  -h, --help                     Print help",
        "  -V, --version                  Print version",
        "",
        "vmkit: a VM started by vmkit may be named instead of its socket ('vmkit ls' lists them):",
        f"  {PROGRAM} <name|pid> <COMMAND>",
    ]
    return "\n".join(lines)


def _subcommand_help(sub: _Subcommand) -> str:
    lines = [sub.about, "", f"Usage: {sub.usage()}"]
    if sub.positional:
        lines += ["", "Arguments:", f"  [{sub.positional}]"]
        helps = sub.positional_help.splitlines() if sub.positional_help else []
        if sub.default is not None:
            helps.append(f"[default: {sub.default}]")
        lines += [f"          {h}" for h in helps]
    lines += ["", "Options:"]
    for option in sub.options:
        lines.append(f"      {option.display}")
        if option.help:
            lines.append(f"          {option.help}")
    lines.append("  -h, --help\n          Print help")
    return "\n".join(lines)


@dataclass
class _Invocation:
    api_socket: str | None
    #: a VM's name or pid given before the subcommand (``vmkit remote vm1 info``)
    target: str | None
    sub: _Subcommand
    positional: str | None
    options: dict[str, str | bool]


def _value_error(display: str, usage: str) -> _Usage:
    return _Usage(f"a value is required for '{display}' but none was supplied", usage)


def _parse_subcommand(sub: _Subcommand, words: list[str]) -> tuple[str | None, dict[str, Any]]:
    usage = sub.usage()
    options = {o.name: o for o in sub.options}
    values: dict[str, str | bool] = {}
    positional: str | None = None
    only_positional = False
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not only_positional and word == "--":
            only_positional = True
            continue
        if not only_positional and word in ("-h", "--help"):
            print(_subcommand_help(sub))
            raise SystemExit(0)
        if not only_positional and word.startswith("-") and word != "-":
            name, eq, inline = word[2:].partition("=") if word.startswith("--") else ("", "", "")
            option = options.get(name) if word.startswith("--") else None
            if option is None:
                raise _Usage(f"unexpected argument '{word.partition('=')[0]}' found", usage)
            if name in values:
                raise _Usage(
                    f"the argument '{option.display}' cannot be used multiple times", usage
                )
            if not option.takes_value:
                if eq:
                    raise _Usage(f"unexpected value '{inline}' for '{option.display}' found", usage)
                values[name] = True
                continue
            if eq:
                values[name] = inline
            elif i < len(words) and not (words[i].startswith("-") and words[i] != "-"):
                values[name] = words[i]
                i += 1
            else:
                raise _value_error(option.display, usage)
            continue
        if sub.positional is None or positional is not None:
            raise _Usage(f"unexpected argument '{word}' found", usage)
        positional = word
    if positional is None:
        positional = sub.default
    return positional, values


def _parse(argv: Sequence[str]) -> _Invocation | None:
    """Reads the command line; None when help or the version was printed."""
    words = list(argv)
    if not words:
        print(help_text(), file=sys.stderr)
        raise SystemExit(2)
    api_socket: str | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-h", "--help"):
            print(help_text())
            return None
        if word in ("-V", "--version"):
            from vmkit import __version__

            print(f"{PROGRAM} v{__version__}")
            return None
        if word == "--api-socket" or word.startswith("--api-socket="):
            if api_socket is not None:
                raise _Usage(
                    "the argument '--api-socket <api-socket>' cannot be used multiple times",
                    _TOP_USAGE,
                )
            if word != "--api-socket":
                api_socket = word.partition("=")[2]
                i += 1
            elif i + 1 < len(words) and not words[i + 1].startswith("-"):
                api_socket = words[i + 1]
                i += 2
            else:
                raise _value_error("--api-socket <api-socket>", _TOP_USAGE)
            continue
        if word.startswith("-") and word != "-":
            raise _Usage(f"unexpected argument '{word.partition('=')[0]}' found", _TOP_USAGE)
        break
    if i >= len(words):
        names = ", ".join([*(sub.name for sub in _SUBCOMMANDS), "help"])
        raise _Usage(
            f"'{PROGRAM}' requires a subcommand but one was not provided\n  [subcommands: {names}]",
            _TOP_USAGE,
        )
    name = words[i]
    rest = words[i + 1 :]
    target: str | None = None
    if name not in _BY_NAME and name != "help" and rest and rest[0] in _BY_NAME:
        # `vmkit remote vm1 info`: a VM's name (or pid), then the subcommand.
        if api_socket is not None:
            raise _Usage(f"give a VM name ('{name}') or --api-socket, not both", _TOP_USAGE)
        target = name
        name = rest[0]
        rest = rest[1:]
    if name == "help":
        if rest and rest[0] in _BY_NAME:
            print(_subcommand_help(_BY_NAME[rest[0]]))
        elif rest and rest[0] != "help":
            raise _Usage(f"unrecognized subcommand '{rest[0]}'", _TOP_USAGE)
        else:
            print(help_text())
        return None
    sub = _BY_NAME.get(name)
    if sub is None:
        raise _Usage(f"unrecognized subcommand '{name}'", _TOP_USAGE)
    positional, options = _parse_subcommand(sub, rest)
    return _Invocation(api_socket, target, sub, positional, options)


def _check_required(inv: _Invocation) -> None:
    """The arguments whose absence makes ch-remote panic: a usage error here."""
    missing = []
    if inv.sub.positional is not None and inv.positional is None:
        missing.append(f"<{inv.sub.positional}>")
    missing += [f"--{n} <{n}>" for n in inv.sub.required_options if n not in inv.options]
    if missing:
        listed = "".join(f"\n  {m}" for m in missing)
        raise _Usage(
            f"the following required arguments were not provided:{listed}",
            inv.sub.usage().replace(f"[{inv.sub.positional}]", f"<{inv.sub.positional}>"),
        )


# -- request bodies -------------------------------------------------------------


def _json(data: object) -> bytes:
    """serde_json's compact form."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _parsed(cls: Any, text: str, what: str) -> Any:
    try:
        return cls.parse(text)
    except ConfigError as e:
        raise _CommandError(f"Error parsing {what} syntax: {e}") from None


def _add(cls: Any, what: str) -> Callable[[_Invocation], tuple[bytes | None, list[int]]]:
    def body(inv: _Invocation) -> tuple[bytes | None, list[int]]:
        assert inv.positional is not None
        parsed = _parsed(cls, inv.positional, what)
        fds: list[int] = []
        if isinstance(parsed, config.NetConfig):
            fds = list(parsed.fds or ())
            parsed.fds = None
        return _json(parsed.to_dict()), fds

    return body


def _size(text: str, what: str) -> int:
    try:
        return _apiwire.parse_byte_size(text)
    except ValueError as e:
        raise _CommandError(f"Error parsing {what} size: {e}") from None


def _resize(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    cpus = inv.options.get("cpus")
    memory = inv.options.get("memory")
    balloon = inv.options.get("balloon")
    vcpus: int | None = None
    if isinstance(cpus, str):
        try:
            vcpus = _apiwire.parse_rust_uint(cpus, 8)
        except ValueError as e:
            raise _CommandError(f"Error parsing CPU count: {e}") from None
    ram = _size(memory, "memory") if isinstance(memory, str) else None
    size = _size(balloon, "balloon") if isinstance(balloon, str) else None
    data = {"desired_vcpus": vcpus, "desired_ram": ram, "desired_balloon": size}
    return _json(data), []


def _resize_zone(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    zone = inv.options["id"]
    size = inv.options["size"]
    assert isinstance(zone, str) and isinstance(size, str)
    return _json({"id": zone, "desired_ram": _size(size, "memory")}), []


def _create(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    path = inv.positional or "-"
    if path == "-":
        try:
            data = sys.stdin.buffer.read()
        except OSError as e:
            raise _CommandError(f"Error reading from stdin: {_apiwire.io_error_text(e)}") from None
        where = "stdin"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _CommandError(f"Error reading from file: {_apiwire.io_error_text(e)}") from None
        where = "file"
    try:
        data.decode()
    except UnicodeDecodeError:
        raise _CommandError(
            f"Error reading from {where}: stream did not contain valid UTF-8"
        ) from None
    return data, []


def _field(name: str) -> Callable[[_Invocation], tuple[bytes | None, list[int]]]:
    def body(inv: _Invocation) -> tuple[bytes | None, list[int]]:
        return _json({name: inv.positional}), []

    return body


def _no_body(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    return None, []


def _restore(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    assert inv.positional is not None
    return _json(_parsed(config.RestoreConfig, inv.positional, "restore").to_dict()), []


def _send_migration(inv: _Invocation) -> tuple[bytes | None, list[int]]:
    local = bool(inv.options.get("local", False))
    return _json({"destination_url": inv.positional, "local": local}), []


_Body = Callable[[_Invocation], tuple[bytes | None, list[int]]]

#: subcommand → (HTTP method, endpoint, request body builder)
_COMMANDS: dict[str, tuple[str, str, _Body]] = {
    "add-device": ("PUT", "vm.add-device", _add(config.DeviceConfig, "device")),
    "add-disk": ("PUT", "vm.add-disk", _add(config.DiskConfig, "disk")),
    "add-fs": ("PUT", "vm.add-fs", _add(config.FsConfig, "filesystem")),
    "add-pmem": ("PUT", "vm.add-pmem", _add(config.PmemConfig, "persistent memory")),
    "add-net": ("PUT", "vm.add-net", _add(config.NetConfig, "network")),
    "add-user-device": ("PUT", "vm.add-user-device", _add(config.UserDeviceConfig, "user device")),
    "add-vdpa": ("PUT", "vm.add-vdpa", _add(config.VdpaConfig, "vDPA device")),
    "add-vsock": ("PUT", "vm.add-vsock", _add(config.VsockConfig, "vsock")),
    "remove-device": ("PUT", "vm.remove-device", _field("id")),
    "info": ("GET", "vm.info", _no_body),
    "counters": ("GET", "vm.counters", _no_body),
    "pause": ("PUT", "vm.pause", _no_body),
    "resume": ("PUT", "vm.resume", _no_body),
    "reboot": ("PUT", "vm.reboot", _no_body),
    "power-button": ("PUT", "vm.power-button", _no_body),
    "boot": ("PUT", "vm.boot", _no_body),
    "delete": ("PUT", "vm.delete", _no_body),
    "shutdown": ("PUT", "vm.shutdown", _no_body),
    "resize": ("PUT", "vm.resize", _resize),
    "resize-zone": ("PUT", "vm.resize-zone", _resize_zone),
    "snapshot": ("PUT", "vm.snapshot", _field("destination_url")),
    "restore": ("PUT", "vm.restore", _restore),
    "coredump": ("PUT", "vm.coredump", _field("destination_url")),
    "send-migration": ("PUT", "vm.send-migration", _send_migration),
    "receive-migration": ("PUT", "vm.receive-migration", _field("receiver_url")),
    "create": ("PUT", "vm.create", _create),
    "ping": ("GET", "vmm.ping", _no_body),
    "shutdown-vmm": ("PUT", "vmm.shutdown", _no_body),
}


def _execute(sock: socket.socket, inv: _Invocation) -> bytes | None:
    method, endpoint, build = _COMMANDS[inv.sub.name]
    body, fds = build(inv)
    try:
        _apiwire.send_request(sock, method, endpoint, body, fds)
        response = _apiwire.read_response(sock)
    except _apiwire.WireError as e:
        raise _CommandError(str(e)) from None
    # ch-remote has a body whenever there is a Content-Length; an empty one
    # counts as none here (see the module docstring).
    body = response.body or None
    if response.ok:
        return body
    message = f"Server responded with an error: {_apiwire.status_name(response.status)}"
    if body is not None:
        message += ": " + body.decode(errors="replace")
    raise _CommandError(message)


#: Subcommands that can take long: a line on stderr shows them running when it is a terminal.
_LONG = {"snapshot": "snapshot to", "restore": "restore from"}


def _execute_showing_progress(sock: socket.socket, inv: _Invocation) -> bytes | None:
    if inv.sub.name not in _LONG or not sys.stderr.isatty():
        return _execute(sock, inv)
    from vmkit import _progress

    url = str(inv.positional)
    probe = None
    if inv.sub.name == "snapshot" and url.startswith("file://"):
        directory = url[len("file://") :]
        probe = lambda: _progress.bytes_under(directory)  # noqa: E731
    with _progress.Progress(f"{_LONG[inv.sub.name]} {url}", unit="bytes", probe=probe):
        return _execute(sock, inv)


def _resolve(inv: _Invocation) -> tuple[str | None, int | None]:
    """The socket to connect to, and the pid that must serve it when it came
    from the registry (None for a path given as such)."""
    from vmkit import registry

    if inv.target is not None:
        try:
            entry = registry.find(inv.target)
        except (registry.VmNotFound, registry.RegistryError) as e:
            raise _CommandError(str(e)) from None
        return entry.api_socket, entry.pid
    path = inv.api_socket
    if path is None or "/" in path or os.path.lexists(path):
        return path, None  # ch-remote's meaning
    try:
        entry = registry.find(path)
    except registry.VmNotFound:
        return path, None  # connecting fails as it does in ch-remote
    except registry.RegistryError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        return path, None
    return entry.api_socket, entry.pid


def _check_served_by(sock: socket.socket, pid: int, path: str) -> None:
    """Refuses a registered socket that another process serves now."""
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer = struct.unpack("3i", creds)[0]
    if peer != pid:
        raise _CommandError(f"{path} is served by process {peer}, not by the VM's VMM (pid {pid})")


def run(argv: Sequence[str]) -> int:
    """Runs ``vmkit remote`` with ``argv`` (the words after ``remote``); returns the exit status."""
    try:
        inv = _parse(argv)
        if inv is None:
            return 0
        try:
            path, pid = _resolve(inv)
        except _CommandError as e:
            print(f"Error opening HTTP socket: {e}", file=sys.stderr)
            return 1
        if path is None:
            print(NO_TARGET)
            return 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(os.fsencode(path))
                if pid is not None:
                    _check_served_by(sock, pid, path)
            except OSError as e:
                print(f"Error opening HTTP socket: {_apiwire.io_error_text(e)}", file=sys.stderr)
                return 1
            except _CommandError as e:
                print(f"Error opening HTTP socket: {e}", file=sys.stderr)
                return 1
            _check_required(inv)
            try:
                body = _execute_showing_progress(sock, inv)
            except _CommandError as e:
                print(f"Error running command: {e}", file=sys.stderr)
                return 1
        finally:
            sock.close()
    except _Usage as e:
        print(
            f"error: {e}\n\nUsage: {e.usage}\n\nFor more information, try '--help'.",
            file=sys.stderr,
        )
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    if body is not None:
        sys.stdout.write(body.decode(errors="replace") + "\n")
        sys.stdout.flush()
    return 0


def main() -> None:
    """Entry point: ``python -m vmkit.remote`` or ``vmkit remote``."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
