"""vmkit: a KVM virtual machine monitor driven from Python.

vmkit speaks Cloud Hypervisor v37's configuration language: the same option
strings, validation rules, error texts and JSON. The config objects live in
``vmkit.config`` (importing it registers them with the Rust extension).
"""

from vmkit import config
from vmkit._native import __version__
from vmkit.config import VmConfig
from vmkit.errors import ConfigError, ParseError, UsageError, ValidationError

__all__ = [
    "ConfigError",
    "ParseError",
    "UsageError",
    "ValidationError",
    "VmConfig",
    "__version__",
    "config",
]
