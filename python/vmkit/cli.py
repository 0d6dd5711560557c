"""The ``vmkit`` command: Cloud Hypervisor v37's command line.

Exit status follows v37: 0 on success, 1 on a configuration or start-up
error (``Error parsing config: ...`` on stderr), 2 on a usage error.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

from vmkit import __version__, _native, logs
from vmkit._flags import CommandLine, help_text, scan
from vmkit.config import RestoreConfig, VmConfig
from vmkit.errors import ConfigError, UsageError, ValidationError

# What only some commands need (logging, json, threading...) is imported where
# it is used: a plain boot imports little beyond the Rust extension.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import threading
    from collections.abc import Callable, Sequence
    from types import FrameType
    from typing import TextIO

    from vmkit.api import ApiServer
    from vmkit.registry import Registration
    from vmkit.vmm import Vmm

if TYPE_CHECKING:
    import signal
else:
    # `signal` is this C module plus enum wrappers for its constants, and
    # importing `enum` (with `functools` and `collections`) would be a
    # quarter of a boot's start-up; the functions used here are the same.
    import _signal as signal

PROGRAM = "vmkit"


def _usage_error(message: str) -> int:
    print(
        f"error: {message}\n\nUsage: {PROGRAM} [OPTIONS]\n\nFor more information, try '--help'.",
        file=sys.stderr,
    )
    return 2


SUBCOMMANDS = """Subcommands:
  vmkit demo [--format pvh|elf|bzimage] [--cpus N] [--memory SIZE] [--steps a,b,...]
          Boot the built-in test guest and show its console and boot time
  vmkit guest build [--cache-dir DIR] [--force] [--quiet]
          Build the Debian Linux guest (kernel + initramfs) into a cache directory
  vmkit remote --api-socket PATH <subcommand> ...
  vmkit remote NAME|PID <subcommand> ...
          Drive a VMM through its API, as Cloud Hypervisor's ch-remote does
          (vmkit remote --help lists the subcommands)
  vmkit ls [--json] [-q]
          List this user's running VMMs (started with --api-socket [--name NAME])
"""


def run(argv: Sequence[str]) -> int:
    """Runs the command line ``argv`` (without the program name); returns the exit status."""
    words = list(argv)
    if words[:1] == ["demo"]:
        return demo(words[1:])
    if words[:1] == ["remote"]:
        from vmkit import remote

        return remote.run(words[1:])
    if words[:1] == ["ls"]:
        from vmkit import ls

        return ls.run(words[1:])
    if words[:2] == ["guest", "build"]:
        from vmkit import debian_guest

        return debian_guest.main(words[2:])
    if words[:1] == ["guest"]:
        return _usage_error("unknown guest command (try 'vmkit guest build')")
    if "-h" in words or "--help" in words:
        print(help_text(PROGRAM))
        print(SUBCOMMANDS)
        return 0
    try:
        command = scan(words)
    except UsageError as e:
        return _usage_error(str(e))
    if command.has("--version"):
        print(f"{PROGRAM} v{__version__}")
        return 0
    if not command.has("--print-config"):
        refusal = _refuse_unsupported(command)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 1
    if not command.has("--print-config") and (
        command.has("--api-socket") or command.has("--event-monitor") or command.has("--restore")
    ):
        # A restored VM waits, Paused, for vm.resume: it runs under the VMM.
        return serve(command)
    try:
        sink = setup_logging(command.verbosity, command.one("--log-file"), lazy=True)
    except StartupError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        return _boot_from_command_line(command, sink)
    finally:
        close_logging()


def _refuse_unsupported(command: CommandLine) -> str | None:
    """What the command line asks for that vmkit cannot do, as the error to print; or None.

    Checked before anything starts, so that nothing asked for is silently left out.
    """
    name = command.one("--name")
    if name is not None:
        from vmkit import registry

        try:
            registry.validate_name(name)
        except ValueError as e:
            return f"Error parsing --name: {e}"
        if not command.has("--api-socket"):
            return (
                "Error parsing --name: a name is for 'vmkit ls' and 'vmkit remote', "
                "which reach a VMM through its API socket: give --api-socket too"
            )
    if command.has("--restore"):
        from vmkit._flags import FLAGS

        # The config comes from the snapshot. v37 boots a payload it is given and
        # ignores --restore, and restores ignoring the other VM options; vmkit
        # ignores no option.
        given = [f.long for f in FLAGS if f.param is not None and command.has(f.long)]
        if given:
            return (
                "Error restoring VM: --restore takes the VM's config from the snapshot; "
                f"{', '.join(given)} cannot be given with it"
            )
    return None


def _parse_config(command: CommandLine) -> VmConfig | None:
    """The command line's VmConfig, validated; None after printing v37's error."""
    try:
        config, _ids = _native.parse_vm(command.vm_params, True)
    except ValidationError as e:
        print(f"Error parsing config: Error validating configuration: {e}", file=sys.stderr)
        return None
    except ConfigError as e:
        print(f"Error parsing config: {e}", file=sys.stderr)
        return None
    assert isinstance(config, VmConfig)
    return config


def _boot_from_command_line(command: CommandLine, sink: TextIO) -> int:
    """``vmkit --kernel ...`` without an API: boots and runs until the guest stops."""
    config = _parse_config(command)
    if config is None:
        return 1
    if command.has("--print-config"):
        print(config.to_json(indent=2))
        return 0
    if config.payload is None:
        print(
            "Error booting VM: No kernel specified (give --kernel, or run "
            "'vmkit demo' to boot the built-in test guest)",
            file=sys.stderr,
        )
        return 1
    return boot_and_wait(
        config,
        verbosity=command.verbosity,
        log=sink,
        seccomp=_seccomp_mode(command),
        cpu_groups=_cpu_groups(command),
    )


def _seccomp_mode(command: CommandLine) -> str:
    return command.one("--seccomp") or "true"


def _cpu_groups(command: CommandLine) -> bool:
    return command.one("--cpu-groups") == "true"


def confine(seccomp: str) -> None:
    """Puts every thread of this process under the VMM's seccomp filter
    (``--seccomp``), once start-up is done: the VMM process as a whole is
    confined, as Cloud Hypervisor's is; threads started later add their own."""
    _native.confine_process(seccomp)


def boot_and_wait(
    config: VmConfig,
    *,
    verbosity: int = 0,
    log: TextIO | None = None,
    seccomp: str = "true",
    cpu_groups: bool = False,
) -> int:
    """Boots ``config`` and runs until the guest stops: 0 on power-off, 1 otherwise."""
    import select

    from vmkit.vm import Vm, VmError

    confine(seccomp)
    try:
        vm = Vm(config, seccomp=seccomp, cpu_groups=cpu_groups)
    except VmError as e:
        # v37 builds the VM when it boots it: what the VMM refuses is a boot error.
        print(f"Error booting VM: {e}", file=sys.stderr)
        return 1
    with vm:
        previous = signal.getsignal(signal.SIGTERM)

        def stop(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            logged = 0

            def log_debug_port() -> None:
                # Cloud Hypervisor logs each port 0x80 write at -v; so do we, as they come.
                nonlocal logged
                writes = vm.debug_port_writes()
                for w in writes[logged:]:
                    print(
                        f"Debug I/O port: {w.value:#04x} at {w.seconds * 1e3:.3f} ms "
                        f"(monotonic {w.monotonic:.6f})",
                        file=log or sys.stderr,
                        flush=True,
                    )
                logged = len(writes)

            # A signal may come as soon as the guest runs: from the boot on.
            try:
                try:
                    vm.boot()
                except VmError as e:
                    print(f"Error booting VM: {e}", file=sys.stderr)
                    return 1
                pty = vm.serial_pty
                if pty:
                    print(f"Serial console on {pty}", file=sys.stderr)
                with _SignalWakeup() as woken:
                    poller = select.poll()
                    poller.register(woken, select.POLLIN)
                    poller.register(vm.exit_fd, select.POLLIN)
                    while True:
                        exit_info = vm.wait(0)
                        if verbosity:
                            log_debug_port()
                        if exit_info is not None or vm.state == "Created":
                            break
                        # Debug-port writes are logged as they come, at -v.
                        poller.poll(100 if verbosity else None)
                        _drain(woken)  # the signal's handler runs on the way back
            except KeyboardInterrupt:
                vm.shutdown()
                exit_info = vm.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if exit_info is None or exit_info.reason in ("poweroff", "shutdown"):
        return 0
    print(f"VM stopped: {exit_info.message}", file=sys.stderr)
    return 1


def demo(argv: Sequence[str]) -> int:
    """``vmkit demo``: boots the built-in test guest with its console on stdout."""
    import argparse

    from vmkit import testguest
    from vmkit.vm import Vm, VmError

    parser = argparse.ArgumentParser(
        prog=f"{PROGRAM} demo", description="Boot the built-in vmkit test guest."
    )
    parser.add_argument("--format", choices=testguest.FORMATS, default="pvh")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--steps", default="hello,memmap,acpi,smp,timer,cpl3")
    args = parser.parse_args(list(argv))
    started = time.monotonic()
    try:
        config = VmConfig.from_cli(
            [
                "--kernel", str(testguest.image_path(args.format)),
                "--cmdline", testguest.cmdline(args.steps.split(",")),
                "--cpus", f"boot={args.cpus}",
                "--memory", f"size={args.memory}",
                "--serial", "tty",
                "--console", "off",
            ]
        )  # fmt: skip
        confine("true")  # the test guest is built (if need be) by now
        with Vm(config) as vm:
            vm.boot()
            exit_info = vm.wait(timeout=120)
            writes = vm.debug_port_writes()
    except (ConfigError, VmError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    total = time.monotonic() - started
    first = min((w.seconds for w in writes if w.value in (0x01, 0x02)), default=None)
    ready = min((w.seconds for w in writes if w.value == 0x7F), default=None)
    print()
    if first is not None and ready is not None:
        print(
            f"Booted the {args.format} test guest: first guest instruction "
            f"{first * 1e3:.2f} ms and ready line {ready * 1e3:.2f} ms after VM creation"
        )
    reason = exit_info.reason if exit_info else "still running after 120 s"
    print(f"Stopped ({reason}) after {total * 1e3:.0f} ms in all")
    return 0 if exit_info is not None and exit_info.reason == "poweroff" else 1


class StartupError(Exception):
    """A start-up step failed; ``str(error)`` is what v37 prints before exiting with 1."""


# -- -v and --log-file (ref §3.2) ---------------------------------------------------------

TRACE = logs.TRACE
# logging's CRITICAL, ERROR, WARNING, INFO, DEBUG and TRACE as v37 names them.
_LEVEL_NAMES = {50: "ERROR", 40: "ERROR", 30: "WARN", 20: "INFO", 10: "DEBUG", TRACE: "TRACE"}
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rust_duration(seconds: float) -> str:
    """``seconds`` as Rust prints a Duration with ``{:.6?}``."""
    nanos = max(0, round(seconds * 1e9))
    if nanos >= 1_000_000_000:
        return f"{nanos / 1e9:.6f}s"
    if nanos >= 1_000_000:
        return f"{nanos / 1e6:.6f}ms"
    if nanos >= 1_000:
        return f"{nanos / 1e3:.6f}\u00b5s"
    return f"{nanos}.000000ns"


def _log_handler(stream: TextIO, start: float) -> logging.StreamHandler[TextIO]:
    """A handler writing v37's log lines to ``stream``:
    ``vmkit: <elapsed>: <<thread>> <LEVEL>:<file>:<line> -- <message>``."""
    import logging

    class LogFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            thread = record.threadName or "anonymous"
            if thread == "MainThread":
                thread = "main"
            level = _LEVEL_NAMES.get(record.levelno, record.levelname)
            if record.pathname and record.lineno:
                # Rust records carry workspace-relative paths already.
                path = record.pathname
                if os.path.isabs(path):
                    path = os.path.relpath(path, _PACKAGE_PARENT)
                where = f"{path}:{record.lineno}"
            else:
                where = record.name
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            elapsed = rust_duration(record.created - start)
            return f"{PROGRAM}: {elapsed}: <{thread}> {level}:{where} -- {message}"

    handler = logging.StreamHandler(stream)
    handler.terminator = "\r\n"
    handler.setFormatter(LogFormatter())
    return handler


def _io_error(e: OSError) -> str:
    """An OSError as Rust's io::Error Display prints it."""
    if e.errno is None:
        return str(e)
    return f"{os.strerror(e.errno)} (os error {e.errno})"


_ERROR_KINDS = {
    errno.ENOENT: "NotFound",
    errno.EACCES: "PermissionDenied",
    errno.EPERM: "PermissionDenied",
    errno.ECONNREFUSED: "ConnectionRefused",
    errno.ECONNRESET: "ConnectionReset",
    errno.EADDRINUSE: "AddrInUse",
    errno.EADDRNOTAVAIL: "AddrNotAvailable",
    errno.EEXIST: "AlreadyExists",
    errno.EINVAL: "InvalidInput",
    errno.ENOTDIR: "NotADirectory",
    errno.EISDIR: "IsADirectory",
    errno.EROFS: "ReadOnlyFilesystem",
    errno.ENAMETOOLONG: "InvalidFilename",
    errno.ELOOP: "FilesystemLoop",
    errno.ENOSPC: "StorageFull",
    errno.ENOTSOCK: "Uncategorized",
}


def _io_error_debug(e: OSError) -> str:
    """An OSError as Rust's io::Error Debug prints it."""
    import json

    if e.errno is None:
        text = str(e)
        if "too long" in text:
            return 'Error { kind: InvalidInput, message: "path must be shorter than SUN_LEN" }'
        return f"Custom {{ kind: Other, error: {json.dumps(text)} }}"
    kind = _ERROR_KINDS.get(e.errno, "Uncategorized")
    message = json.dumps(os.strerror(e.errno))
    return f"Os {{ code: {e.errno}, kind: {kind}, message: {message} }}"


def setup_logging(verbosity: int, log_file: str | None, *, lazy: bool = False) -> TextIO:
    """Sends the ``vmkit`` loggers to ``log_file`` (created or truncated) or stderr.

    ``verbosity`` is the ``-v`` count: 0 warnings, 1 info, 2 debug, 3+ trace.
    Returns the stream. Raises StartupError (``Error creating log file: ...``).
    With ``lazy``, warnings to stderr (no ``-v``, no file) are set up only
    when the first Rust record arrives: a quiet boot never imports ``logging``.
    """
    stream: TextIO
    if log_file is not None:
        stream = open(_open_log_file(log_file), "w", encoding="utf-8", newline="")
    else:
        stream = sys.stderr
    start = time.time()
    close_logging()
    if lazy and verbosity == 0 and log_file is None:
        logs.when_logging_imported(lambda: _attach_handler(stream, start, 30))
        return stream
    level = (30, 20, 10)[verbosity] if verbosity < 3 else TRACE  # WARNING, INFO, DEBUG
    _attach_handler(stream, start, level)
    return stream


def _attach_handler(stream: TextIO, start: float, level: int) -> None:
    import logging

    handler = _log_handler(stream, start)
    logger = logging.getLogger("vmkit")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    _log_handlers.append(handler)


def _create_output(path: str, *, truncate: bool, error: str, option: str) -> int:
    """Opens ``path`` to write, creating it owner-only (0600, whatever the
    umask); O_NONBLOCK, so that a FIFO no process reads is refused at once
    (ENXIO) instead of holding up start-up. ``error`` and ``option`` word
    the StartupError."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if truncate:
        flags |= os.O_TRUNC
    try:
        return os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ENXIO and _is_fifo(path):
            raise StartupError(
                f"{error}: {path} ({option}) is a FIFO that no process has open for reading"
            ) from None
        raise StartupError(f"{error}: {_io_error(e)}") from None


def _open_log_file(path: str) -> int:
    """Creates or truncates ``path`` for the log (see ``_create_output``)."""
    fd = _create_output(path, truncate=True, error="Error creating log file", option="--log-file")
    os.set_blocking(fd, True)  # log lines are not dropped: a reader gets them all
    return fd


_log_handlers: list[logging.StreamHandler[TextIO]] = []


def close_logging() -> None:
    """Detaches what ``setup_logging`` attached and closes its log file."""
    logs.when_logging_imported(None)
    if not _log_handlers:
        return
    import logging

    logger = logging.getLogger("vmkit")
    while _log_handlers:
        handler = _log_handlers.pop()
        logger.removeHandler(handler)
        handler.flush()
        if handler.stream is not sys.stderr:
            handler.stream.close()


# -- option strings of --api-socket and --event-monitor (ref §1.2) -----------------------


class _OptionError(Exception):
    pass


def _split_commas(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    for ch in text.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _OptionError(f"invalid syntax:{text}")
        elif ch == '"':
            quoted = not quoted
            continue
        elif ch == "," and depth == 0 and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    if depth != 0 or quoted:
        raise _OptionError(f"invalid syntax:{text}")
    return items


def parse_options(text: str, names: Sequence[str], into: dict[str, str]) -> None:
    """Parses an option string with v37's option_parser into ``into``.

    Values stored before an error stay in ``into``; the error is raised as
    _OptionError with v37's text (``unknown option: x``).
    """
    if not text.strip():
        return
    for item in _split_commas(text):
        name, equals, value = item.partition("=")
        if name not in names:
            raise _OptionError(f"unknown option: {name}")
        if not equals:
            raise _OptionError(f"invalid syntax:{item}")
        into[name] = value.strip()


def _parse_i32(text: str) -> int:
    """Rust's ``i32::from_str``; raises _OptionError with the ParseIntError text."""
    if text == "":
        raise _OptionError("cannot parse integer from empty string")
    digits = text[1:] if text[0] in "+-" else text
    if not digits or not all("0" <= c <= "9" for c in digits):
        raise _OptionError("invalid digit found in string")
    value = int(text)
    if value > 0x7FFF_FFFF:
        raise _OptionError("number too large to fit in target type")
    if value < -0x8000_0000:
        raise _OptionError("number too small to fit in target type")
    return value


def api_socket_option(text: str) -> tuple[str | None, int | None]:
    """``--api-socket``: (path, None) or (None, fd). Parse errors are ignored, as in v37."""
    values: dict[str, str] = {}
    try:
        parse_options(text, ("path", "fd"), values)
    except _OptionError:
        pass
    if values.get("fd"):
        try:
            return None, _parse_i32(values["fd"])
        except _OptionError as e:
            raise StartupError(f"Error parsing --api-socket: {e}") from None
    if values.get("path"):
        return values["path"], None
    return text, None


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def event_monitor_option(text: str) -> int:
    """``--event-monitor``: opens the file (or takes the fd) and returns the descriptor."""
    values: dict[str, str] = {}
    try:
        parse_options(text, ("path", "fd"), values)
    except _OptionError as e:
        raise StartupError(f"Error parsing --event-monitor: {e}") from None
    if values.get("fd"):
        try:
            fd = _parse_i32(values["fd"])
        except _OptionError:
            raise StartupError(
                f"Error parsing --event-monitor: unable to convert {values['fd']} for fd"
            ) from None
        try:
            os.set_inheritable(fd, False)  # the VMM's now: not for its children
        except OSError:
            pass  # a bad fd fails at the first event, as in v37
        return fd
    if values.get("path"):
        path = values["path"]
        # Left non-blocking: a reader that stalls must not hold up the VMM
        # (EventMonitor drops what the pipe cannot take).
        return _create_output(
            path,
            truncate=False,
            error="Error doing event monitor I/O",
            option="--event-monitor path",
        )
    raise StartupError("Error parsing --event-monitor: path or fd required")


# -- the VMM with its API (ref §3.3) -------------------------------------------------------


def serve(command: CommandLine) -> int:
    """Runs the VMM as v37 does with ``--api-socket`` or ``--event-monitor``.

    Start-up order (ref §3.3): umask 077, logger, ``--api-socket``, KVM,
    ``--event-monitor``, the API server, then the VM config (only with
    ``--kernel`` or ``--firmware``), create and boot. Runs until
    ``vmm.shutdown``, SIGTERM/SIGINT, or the guest stopping; returns the
    exit status.
    """
    os.umask(0o077)
    try:
        return _serve(command)
    finally:
        close_logging()


def _serve(command: CommandLine) -> int:
    from vmkit.vmm import EventMonitor, Vmm

    try:
        setup_logging(command.verbosity, command.one("--log-file"), lazy=True)
        socket_text = command.one("--api-socket")
        api = api_socket_option(socket_text) if socket_text is not None else None
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            raise StartupError(
                "Failed to open hypervisor interface (is hypervisor interface available?): "
                f"{_io_error(e)}"
            ) from None
        monitor_text = command.one("--event-monitor")
        events = (
            EventMonitor(event_monitor_option(monitor_text)) if monitor_text is not None else None
        )
    except StartupError as e:
        print(e, file=sys.stderr)
        return 1
    vmm = Vmm(events=events, seccomp=_seccomp_mode(command), cpu_groups=_cpu_groups(command))

    def stop(signum: int, frame: FrameType | None) -> None:
        vmm.request_exit(0)

    # From here on SIGTERM asks the VMM to exit, during start-up too: the
    # guest may run (and someone signal the process) before the wait begins.
    previous_sigterm = signal.signal(signal.SIGTERM, stop)
    orphaned = _watch_lifeline(vmm)
    server: ApiServer | None = None
    early: tuple[str, int, tuple[int, int]] | None = None  # path, listening fd, file identity
    registration: Registration | None = None
    try:
        if events is not None:
            events.log_errors = False
        vmm.emit("vmm", "starting")
        if events is not None:
            if events.error is not None:
                # v37 exits when it cannot write its first event (a closed --event-monitor fd)
                print(events.error, file=sys.stderr)
                return 1
            events.log_errors = True
        # API requests wait until the command line's VM is created and booted:
        # Cloud Hypervisor queues them behind its create and boot, so that a
        # client never sees the moment before.
        with vmm.lock:
            if api is not None:
                path, fd = api
                try:
                    _check_name(command)
                except StartupError as e:
                    print(e, file=sys.stderr)
                    return 1
                try:
                    if path is not None and _boots(command):
                        # Bound now, served once the VM has booted: the API's
                        # modules then load while the guest starts on its vCPU.
                        # Clients wait in the backlog meanwhile, as they wait
                        # for the boot in v37.
                        from vmkit._unixsocket import listen_private

                        early = (path, *listen_private(path))
                    else:
                        server = _api_server(vmm, path, fd)
                        server.bind()
                except OSError as e:
                    server = None
                    print(
                        "Failed to start the VMM thread: Error creation API server's socket "
                        f"{_io_error_debug(e)}",
                        file=sys.stderr,
                    )
                    return 1
                if server is not None:
                    server.start()
                where: str | None
                if path is not None:
                    where = os.path.abspath(path)
                else:
                    assert server is not None
                    where = server.socket_path()
                try:
                    registration = _register(command, where)
                except StartupError as e:
                    print(e, file=sys.stderr)
                    return 1
            confine(_seccomp_mode(command))
            _tell_spawner_ready()
            code = _start_vm(command, vmm)
            if code is not None:
                if server is not None:
                    server.path = None  # v37 leaves the socket file on the error path
                if early is not None:
                    _, listening, _ = early
                    early = None
                    os.close(listening)
                return code
            if early is not None:
                server = _api_server(vmm, early[0], None)
                server.adopt(early[1], early[2])
                early = None  # the server's now
                server.start()
        code = _run_until_exit(vmm)
        if vmm.exit_message:
            print(vmm.exit_message, file=sys.stderr)
        return code
    except KeyboardInterrupt:  # SIGINT during start-up
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if registration is not None:
            registration.remove()
        vmm.close()
        if server is not None:
            if server.listening:
                early = None  # the server took it (a SIGINT came before `early = None`)
            server.close()
        if early is not None:
            from vmkit._unixsocket import remove_if_same

            os.close(early[1])
            remove_if_same(early[0], early[2])
        if events is not None:
            events.close()
        spawn_dir = os.environ.pop("VMKIT_SPAWN_DIR", None)
        if orphaned.is_set() and spawn_dir:
            import shutil

            shutil.rmtree(spawn_dir, ignore_errors=True)


def _check_name(command: CommandLine) -> None:
    """Refuses a ``--name`` that a running VMM has before the socket is made
    (``_register`` checks again as it writes the entry); this also loads the
    registry before the API answers, so that registering adds little to the
    time between the first answer and the VM's creation."""
    from vmkit import registry

    name = command.one("--name")
    if name is None:
        return
    try:
        registry.check_name_free(name)
    except registry.NameTaken as e:
        raise StartupError(f"Error starting the VMM: {e}") from None
    except (registry.RegistryError, OSError) as e:
        raise StartupError(f"Error registering VM {name!r}: {e}") from None


def _api_server(vmm: Vmm, path: str | None, fd: int | None) -> ApiServer:
    from vmkit import _reactor
    from vmkit.api import ApiServer

    # Accepting on the shared reactor's thread (the one that waits for the
    # VM's stop) leaves a VMM a thread fewer to start and end.
    return ApiServer(vmm, path, fd=fd, reactor=_reactor.shared())


def _boots(command: CommandLine) -> bool:
    """Whether the command line gives a VM to boot (see ``_start_vm``)."""
    return any(command.has(option) for option in ("--restore", "--kernel", "--firmware"))


def _register(command: CommandLine, path: str | None) -> Registration | None:
    """Lists this VMM, serving its API at ``path``, in the registry (``vmkit
    ls``). Raises StartupError when the name is taken, or (for a name the user
    gave) the registry cannot be used; without ``--name`` a broken registry
    only costs the listing."""
    from vmkit import registry

    if path is None:
        return None  # an unnamed socket (fd=): nothing for others to connect to
    name = command.one("--name")
    kernel = command.one("--kernel")
    try:
        return registry.register(name, os.getpid(), path, kernel)
    except registry.NameTaken as e:
        raise StartupError(f"Error starting the VMM: {e}") from None
    except (registry.RegistryError, OSError) as e:
        if name is not None:
            raise StartupError(f"Error registering VM {name!r}: {e}") from None
        logs.LazyLogger("vmkit.registry").warning("not listed in 'vmkit ls': %s", e)
        return None


def _spawner_fd(variable: str) -> int | None:
    """The descriptor ``Vm.spawn`` passed in ``variable`` (removed from the
    environment, so the VMM's own children do not see it), or None."""
    text = os.environ.pop(variable, None)
    return int(text) if text is not None and text.isdigit() else None


def _tell_spawner_ready() -> None:
    """For a VMM started by ``Vm.spawn``: says on the ready pipe that the API
    socket is listening, so the spawner needs no polling to know."""
    fd = _spawner_fd("VMKIT_READY_FD")
    if fd is None:
        return
    try:
        os.write(fd, b"r")
    except OSError:
        pass  # the spawner gave up waiting; it sees the socket anyway
    try:
        os.close(fd)
    except OSError:
        pass


class _NeverSet:
    """``_watch_lifeline``'s event for a VMM without a lifeline."""

    @staticmethod
    def is_set() -> bool:
        return False


_NEVER_ORPHANED = _NeverSet()


def _watch_lifeline(vmm: Vmm) -> threading.Event | _NeverSet:
    """For a VMM started by ``Vm.spawn``: when the parent's end of the lifeline
    pipe closes (the parent exited or was killed), the VMM shuts down. The
    event is set then."""
    fd = _spawner_fd("VMKIT_LIFELINE_FD")
    if fd is None:
        return _NEVER_ORPHANED
    import threading  # only here: other VMMs boot before they load it

    orphaned = threading.Event()
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return orphaned

    def watch() -> None:
        while True:
            try:
                if os.read(fd, 1):
                    continue
            except InterruptedError:
                continue
            except OSError:
                return
            orphaned.set()
            vmm.request_exit(1, "The process that started this VMM went away")
            return

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
    return orphaned


def _start_vm(command: CommandLine, vmm: Vmm) -> int | None:
    """Creates and boots the VM the command line gives; an exit status on failure."""
    restore = command.one("--restore")
    if restore is not None:
        try:
            restore_config = RestoreConfig.parse(restore)
        except ConfigError as e:
            print(f"Error parsing restore: {e}", file=sys.stderr)
            return 1

        def restore_vm() -> None:
            if not sys.stderr.isatty():
                return vmm.restore(restore_config)
            from vmkit._progress import Progress

            with Progress(f"restore from {restore_config.source_url}"):  # cleared before errors
                return vmm.restore(restore_config)

        if not _api_call(restore_vm, "Error restoring VM"):
            return 1
        return None
    if command.has("--kernel") or command.has("--firmware"):
        config = _parse_config(command)
        if config is None:
            return 1
        if not _api_call(lambda: vmm.create(config), "Error creating VM"):
            return 1
        if not _api_call(vmm.boot, "Error booting VM"):
            return 1
        with vmm.lock:
            vm = vmm.vm
            pty = vm.serial_pty if vm is not None else None
        if pty:
            print(f"Serial console on {pty}", file=sys.stderr)
    return None


def _api_call(action: Callable[[], None], failure: str) -> bool:
    """Runs one API action; false, with ``failure`` and the error printed, if it failed."""
    from vmkit.vmm import ApiError

    try:
        action()
    except ApiError as e:
        print(f"{failure}: {e}", file=sys.stderr)
        return False
    return True


def _run_until_exit(vmm: Vmm) -> int:
    """Waits for an exit request (``vmm.shutdown``, the guest stopping, SIGTERM
    through the handler ``_serve`` installs) or SIGINT."""
    import select

    try:
        with _SignalWakeup() as woken:
            poller = select.poll()
            poller.register(woken, select.POLLIN)
            poller.register(vmm.exit_fd(), select.POLLIN)
            while True:
                code = vmm.wait_exit(0)
                if code is not None:
                    return code
                poller.poll()
                _drain(woken)  # the signal's handler runs on the way back
    except KeyboardInterrupt:
        return 0


class _SignalWakeup:
    """``with _SignalWakeup() as fd``: a descriptor that turns readable when
    a signal arrives, for the main thread to poll.

    Python runs a signal's handler in the main thread, but only once that
    thread is back in Python code: a signal the kernel delivers to another
    thread (a vCPU, the API server) does not interrupt the main thread's
    ``poll``. ``signal.set_wakeup_fd`` makes every signal write a byte here,
    whichever thread takes it.
    """

    def __enter__(self) -> int:
        self._read_end, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._previous = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        except BaseException:
            self._close()
            raise
        return self._read_end

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous)
        self._close()

    def _close(self) -> None:
        os.close(self._read_end)
        os.close(self._write_end)


def _drain(fd: int) -> None:
    """Empties the non-blocking wake-up pipe ``fd``."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main() -> None:
    """Console-script entry point.

    Ends the process once the exit handlers have run and the output is
    flushed, without tearing the interpreter down (freeing every module and
    object takes tens of milliseconds of CPU, which would delay the exit that
    SIGTERM asked for and, with many VMMs stopping at once, add up).
    """
    import atexit

    # Cloud Hypervisor ends cleanly on SIGINT even when it was started with
    # SIGINT ignored (a background job of a script, whose shell ignores it
    # for its children): so does vmkit, which Python would leave ignoring it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = run(sys.argv[1:])
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can be written
    os._exit(code)
