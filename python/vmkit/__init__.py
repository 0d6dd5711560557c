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
from vmkit.vm import DeviceEvent, Migration, Vm, VmError, VmExit, VmInfo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmkit.client import ApiConnectionError, ApiError, Client, SpawnedVm, close_all, spawn
    from vmkit.ls import VmListing, list_vms

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "Client",
    "ConfigError",
    "DeviceEvent",
    "Migration",
    "ParseError",
    "SpawnedVm",
    "UsageError",
    "ValidationError",
    "Vm",
    "VmConfig",
    "VmError",
    "VmExit",
    "VmInfo",
    "VmListing",
    "__version__",
    "close_all",
    "config",
    "list_vms",
    "spawn",
]

_CLIENT_NAMES = ("ApiConnectionError", "ApiError", "Client", "SpawnedVm", "close_all", "spawn")


def __getattr__(name: str) -> object:
    # The HTTP client (sockets, subprocesses) is not needed to boot a VM: loaded on first use.
    if name in _CLIENT_NAMES:
        from vmkit import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    if name in ("VmListing", "list_vms"):
        # `vmkit ls` in Python: the registry and threads, loaded on first use.
        from vmkit import ls

        value = getattr(ls, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vmkit' has no attribute {name!r}")
