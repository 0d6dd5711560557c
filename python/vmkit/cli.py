"""The ``vmkit`` command: Cloud Hypervisor v37's command line.

Exit status follows v37: 0 on success, 1 on a configuration or start-up
error (``Error parsing config: ...`` on stderr), 2 on a usage error.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from vmkit import __version__, _native
from vmkit._flags import help_text, scan
from vmkit.config import VmConfig
from vmkit.errors import ConfigError, UsageError, ValidationError

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
"""


def run(argv: Sequence[str]) -> int:
    """Runs the command line ``argv`` (without the program name); returns the exit status."""
    words = list(argv)
    if words[:1] == ["demo"]:
        return demo(words[1:])
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
    try:
        config, _ids = _native.parse_vm(command.vm_params, True)
    except ValidationError as e:
        print(f"Error parsing config: Error validating configuration: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"Error parsing config: {e}", file=sys.stderr)
        return 1
    assert isinstance(config, VmConfig)
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
    return boot_and_wait(config, verbosity=command.verbosity)


def boot_and_wait(config: VmConfig, *, verbosity: int = 0) -> int:
    """Boots ``config`` and runs until the guest stops: 0 on power-off, 1 otherwise."""
    from vmkit.vm import Vm, VmError

    try:
        vm = Vm(config)
    except VmError as e:
        print(f"Error creating VM: {e}", file=sys.stderr)
        return 1
    with vm:
        previous = signal.getsignal(signal.SIGTERM)

        def stop(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            try:
                vm.boot()
            except VmError as e:
                print(f"Error booting VM: {e}", file=sys.stderr)
                return 1
            pty = vm.info()["vmkit"]["serial_pty"]
            if pty:
                print(f"Serial console on {pty}", file=sys.stderr)
            logged = 0

            def log_debug_port() -> None:
                # Cloud Hypervisor logs each port 0x80 write at -v; so do we, as they come.
                nonlocal logged
                writes = vm.debug_port_writes()
                for w in writes[logged:]:
                    print(
                        f"Debug I/O port: {w.value:#04x} at {w.seconds * 1e3:.3f} ms "
                        f"(monotonic {w.monotonic:.6f})",
                        file=sys.stderr,
                    )
                logged = len(writes)

            try:
                while True:
                    exit_info = vm.wait(0.1 if verbosity else None)
                    if verbosity:
                        log_debug_port()
                    if exit_info is not None or vm.state == "Created":
                        break
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


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
