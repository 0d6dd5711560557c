"""vmkit: a KVM virtual machine monitor driven from Python.

vmkit speaks Cloud Hypervisor v37's configuration language: the same option
strings, validation rules, error texts and JSON. The config objects live in
``vmkit.config``.
"""

from vmkit._native import __version__
from vmkit.errors import ConfigError, ParseError, UsageError, ValidationError

from vmkit import config  # noqa: I001  (registers the config classes with the extension)
from vmkit.config import VmConfig

__all__ = [
    "ConfigError",
    "ParseError",
    "UsageError",
    "ValidationError",
    "VmConfig",
    "__version__",
    "config",
]
