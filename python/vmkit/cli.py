"""The ``vmkit`` command: Cloud Hypervisor v37's command line.

Exit status follows v37: 0 on success, 1 on a configuration or start-up
error (``Error parsing config: ...`` on stderr), 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

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


def run(argv: Sequence[str]) -> int:
    """Runs the command line ``argv`` (without the program name); returns the exit status."""
    words = list(argv)
    if "-h" in words or "--help" in words:
        print(help_text(PROGRAM))
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
    print(
        "Error booting VM: this vmkit build cannot boot VMs yet "
        "(use --print-config to check a configuration)",
        file=sys.stderr,
    )
    return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
