"""Type stubs of the Rust extension module (see rust/vmkit-py)."""

from collections.abc import Callable, Mapping
from typing import Literal, TypedDict, TypeVar, overload

from vmkit.config import VmConfig, _Config

__version__: str

_C = TypeVar("_C", bound=_Config)

def register(
    classes: Mapping[str, type[_Config]],
    config_base: type[_Config],
    config_error: type[BaseException],
    parse_error: type[BaseException],
    validation_error: type[BaseException],
) -> None: ...
def parse_option(cls: type[_C], text: str, zones: list[str] | None = None) -> _C: ...
def from_json(cls: type[_C], text: str | bytes, positions: bool = True) -> _C: ...
def from_object(cls: type[_C], value: object) -> _C: ...
def to_option_string(config: _Config) -> str: ...
def validate(config: VmConfig) -> tuple[bool, list[str]]: ...
def parse_vm(
    params: Mapping[str, object], validate: bool = True
) -> tuple[VmConfig, list[str] | None]: ...
def random_mac() -> str: ...

# API action bodies (v37's vmm/src/api/mod.rs structs), read by serde_json:
# a bad body raises ConfigError (kind InvalidJson) with serde_json's text.
class VmResizeData(TypedDict):
    desired_vcpus: int | None
    desired_ram: int | None
    desired_balloon: int | None

class VmResizeZoneData(TypedDict):
    id: str
    desired_ram: int

class VmRemoveDeviceData(TypedDict):
    id: str

class VmSnapshotConfig(TypedDict):
    destination_url: str

class VmReceiveMigrationData(TypedDict):
    receiver_url: str

class VmSendMigrationData(TypedDict):
    destination_url: str
    local: bool

@overload
def parse_api_body(name: Literal["VmResizeData"], body: bytes) -> VmResizeData: ...
@overload
def parse_api_body(name: Literal["VmResizeZoneData"], body: bytes) -> VmResizeZoneData: ...
@overload
def parse_api_body(name: Literal["VmRemoveDeviceData"], body: bytes) -> VmRemoveDeviceData: ...
@overload
def parse_api_body(name: Literal["VmSnapshotConfig"], body: bytes) -> VmSnapshotConfig: ...
@overload
def parse_api_body(
    name: Literal["VmReceiveMigrationData"], body: bytes
) -> VmReceiveMigrationData: ...
@overload
def parse_api_body(name: Literal["VmSendMigrationData"], body: bytes) -> VmSendMigrationData: ...
def register_vm_error(cls: type[BaseException]) -> None: ...
def test_guest_image(format: str) -> bytes: ...

_LogRecord = tuple[int, str, str, str | None, int | None, str]

def install_logging(emit: Callable[[list[_LogRecord], int], None]) -> None: ...
def set_log_level(level: int) -> None: ...
def flush_logs(timeout: float) -> bool: ...
def stop_logging() -> None: ...
def test_hook_log(level: str, message: str, count: int) -> None: ...

class PciBar(TypedDict):
    index: int
    base: int
    size: int
    type_: str
    prefetchable: bool

class Resource(TypedDict):
    PciBar: PciBar

class DeviceNode(TypedDict):
    """A node of Cloud Hypervisor's device tree."""

    id: str
    resources: list[Resource]
    parent: str | None
    children: list[str]
    pci_bdf: str | None

class RuntimeInfo(TypedDict):
    state: str
    boots: int
    kernel_format: str | None
    serial_pty: str | None
    console_pty: str | None
    memory_size: int
    #: Cloud Hypervisor's device tree ({id: DeviceNode JSON}), None when no boot runs.
    device_tree: dict[str, DeviceNode] | None

def confine_process(mode: str) -> None: ...
def fork_sibling() -> int: ...
def fork_vm_process(
    control: int,
    log: int,
    cwd: int | None,
    api_socket: str,
    spawn_dir: str | None,
    affinity: list[int],
    nice: int,
    verbosity: int,
    seccomp: str,
) -> int: ...

class VmHandle:
    @property
    def state(self) -> str: ...
    @property
    def iommu(self) -> bool: ...
    def __init__(
        self,
        config: VmConfig,
        watchdog_timeout: float | None = None,
        lock_disks: bool = True,
        seccomp: str = "true",
    ) -> None: ...
    def boot(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def shutdown(self) -> None: ...
    def reboot(self) -> None: ...
    def power_button(self) -> None: ...
    def device_events(self, since: int) -> list[tuple[str, str]]: ...
    def close(self) -> None: ...
    def release(self) -> None: ...
    @property
    def exit_fd(self) -> int: ...
    def wait(self, timeout: float | None = None) -> tuple[str, str] | None: ...
    def serial_read(self, offset: int) -> tuple[int, bytes]: ...
    def serial_wait(self, offset: int, timeout: float) -> bool: ...
    def debug_port_writes(self) -> list[tuple[int, float, float]]: ...
    def runtime_info(self) -> RuntimeInfo: ...
    def live_config(self) -> VmConfig | None: ...
    def counters(self) -> dict[str, dict[str, int]]: ...
