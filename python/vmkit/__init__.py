"""vmkit: a KVM virtual machine monitor driven from Python.

vmkit speaks Cloud Hypervisor v37's configuration language: the same option
strings, validation rules, error texts and JSON. The config objects live in
``vmkit.config`` (importing it registers them with the Rust extension); VMs
run through ``vmkit.Vm`` (in this process) or ``vmkit.Vm.spawn`` (in a child
VMM process driven over Cloud Hypervisor's HTTP API, see ``vmkit.Client``).
"""

from vmkit import config
from vmkit._native import __version__
from vmkit.config import VmConfig
from vmkit.errors import ConfigError, ParseError, UsageError, ValidationError
from vmkit.vm import Vm, VmError, VmExit, VmInfo

from vmkit.client import ApiConnectionError, ApiError, Client, SpawnedVm, spawn  # isort: skip

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "Client",
    "ConfigError",
    "ParseError",
    "SpawnedVm",
    "UsageError",
    "ValidationError",
    "Vm",
    "VmConfig",
    "VmError",
    "VmExit",
    "VmInfo",
    "__version__",
    "config",
    "spawn",
]
