"""VM configuration objects in Cloud Hypervisor v37's shape.

Every class is a record (``dataclasses.fields``, ``replace`` and ``asdict``
work on it, as on a ``@dataclass(kw_only=True)``) whose fields are the v37 JSON field names, in JSON
order, with v37's JSON defaults. Parsing, JSON reading, rendering and
validation all run in Rust (``vmkit._native``), which reads these objects
(and ``from_dict``'s dicts) directly: this module only holds the typed view.

    >>> disk = DiskConfig.parse("path=/images/root.img,readonly=on")
    >>> disk.readonly
    True
    >>> DiskConfig.parse(disk.to_option_string()) == disk
    True
"""

from __future__ import annotations

from vmkit import _native
from vmkit._record import field, record
from vmkit.errors import ConfigError, ParseError, ValidationError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, ClassVar, Literal, TypeVar

    ConsoleMode = Literal["Off", "Pty", "Tty", "File", "Socket", "Null"]
    HotplugMethod = Literal["Acpi", "VirtioMem"]
    VhostMode = Literal["Client", "Server"]

    _C = TypeVar("_C", bound="_Config")

__all__ = [
    "BalloonConfig",
    "ConsoleConfig",
    "ConsoleMode",
    "CpuAffinity",
    "CpuFeatures",
    "CpuTopology",
    "CpusConfig",
    "DeviceConfig",
    "DiskConfig",
    "FsConfig",
    "HotplugMethod",
    "MemoryConfig",
    "MemoryZoneConfig",
    "NetConfig",
    "NumaConfig",
    "NumaDistance",
    "PayloadConfig",
    "PlatformConfig",
    "PmemConfig",
    "RateLimiterConfig",
    "RateLimiterGroupConfig",
    "RestoreConfig",
    "RngConfig",
    "SgxEpcConfig",
    "TokenBucketConfig",
    "TpmConfig",
    "UserDeviceConfig",
    "VdpaConfig",
    "VhostMode",
    "VmConfig",
    "VsockConfig",
]

_LITERALS = {
    "ConsoleMode": ("Off", "Pty", "Tty", "File", "Socket", "Null"),
    "HotplugMethod": ("Acpi", "VirtioMem"),
    "VhostMode": ("Client", "Server"),
}


def __getattr__(name: str) -> object:
    # The Literal aliases need ``typing``, which a boot does not: made on first use.
    if name in _LITERALS:
        from typing import Literal

        alias = Literal[_LITERALS[name]]  # type: ignore[valid-type]
        globals()[name] = alias
        return alias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain(value: object) -> object:
    if isinstance(value, _Config):
        return value.to_dict()
    if isinstance(value, list) or isinstance(value, tuple):  # faster than a union
        return [_plain(item) for item in value]
    return value


class _Config:
    """JSON conversions shared by every config class."""

    __record_fields__: ClassVar[tuple[tuple[str, Any], ...]]

    def to_dict(self) -> dict[str, Any]:
        """The v37 JSON object: every field, in declaration order, None as null."""
        return {
            name: _plain(getattr(self, name)) for name, _default in type(self).__record_fields__
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """The v37 JSON text of this object."""
        import json

        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Reads a v37 JSON object (absent fields take v37's defaults).

        ``data`` is a dict of JSON values (config objects may stand for their
        dicts); Rust reads it directly. Raises ConfigError (kind ``InvalidJson``)
        naming the offending field, also when ``data`` is not a dict.
        """
        result: _C = _native.from_object(cls, data)
        return result

    @classmethod
    def from_json(cls: type[_C], text: str | bytes) -> _C:
        """Reads v37 JSON text; see ``from_dict``. Bytes are read as v37 reads a
        request body: invalid UTF-8 is an error at its place in a string."""
        if isinstance(text, bytearray):
            text = bytes(text)
        result: _C = _native.from_json(cls, text)
        return result


class _OptionConfig(_Config):
    """Config classes that have a command-line option string."""

    flag: ClassVar[str]

    @classmethod
    def parse(cls: type[_C], text: str) -> _C:
        """Parses an option string exactly as Cloud Hypervisor v37 does.

        Raises ParseError (or ValidationError for v37's console path checks).
        """
        result: _C = _native.parse_option(cls, text)
        return result

    def to_option_string(self) -> str:
        """An option string that parses back to an equal object.

        Raises ConfigError (kind ``Unrepresentable``) when a value has no
        option-string spelling, e.g. a path containing ``"``.
        """
        return _native.to_option_string(self)


@record(kw_only=True)
class CpuTopology(_Config):
    """``topology=threads_per_core:cores_per_die:dies_per_package:packages``."""

    threads_per_core: int
    cores_per_die: int
    dies_per_package: int
    packages: int


@record(kw_only=True)
class CpuAffinity(_Config):
    """Host CPUs one vCPU's thread may run on."""

    vcpu: int
    host_cpus: list[int]


@record(kw_only=True)
class CpuFeatures(_Config):
    """Optional CPU features exposed to the guest."""

    amx: bool = False


@record(kw_only=True)
class CpusConfig(_OptionConfig):
    """``--cpus``: vCPU counts, topology, affinity and features."""

    flag: ClassVar[str] = "--cpus"
    boot_vcpus: int = 1
    max_vcpus: int = 1
    topology: CpuTopology | None = None
    kvm_hyperv: bool = False
    max_phys_bits: int = 46
    affinity: list[CpuAffinity] | None = None
    features: CpuFeatures = field(default_factory=CpuFeatures)


@record(kw_only=True)
class PlatformConfig(_OptionConfig):
    """``--platform``: PCI segments, IOMMU segments and DMI strings."""

    flag: ClassVar[str] = "--platform"
    num_pci_segments: int = 1
    iommu_segments: list[int] | None = None
    serial_number: str | None = None
    uuid: str | None = None
    oem_strings: list[str] | None = None


@record(kw_only=True)
class MemoryZoneConfig(_OptionConfig):
    """``--memory-zone``: one user-defined guest memory region."""

    flag: ClassVar[str] = "--memory-zone"
    id: str
    size: int
    file: str | None = None
    shared: bool = False
    hugepages: bool = False
    hugepage_size: int | None = None
    host_numa_node: int | None = None
    hotplug_size: int | None = None
    hotplugged_size: int | None = None
    prefault: bool = False


@record(kw_only=True)
class MemoryConfig(_OptionConfig):
    """``--memory`` (sizes in bytes), with the ``--memory-zone`` regions in ``zones``."""

    flag: ClassVar[str] = "--memory"
    size: int = 512 << 20
    mergeable: bool = False
    hotplug_method: HotplugMethod = "Acpi"
    hotplug_size: int | None = None
    hotplugged_size: int | None = None
    shared: bool = False
    hugepages: bool = False
    hugepage_size: int | None = None
    prefault: bool = False
    zones: list[MemoryZoneConfig] | None = None
    thp: bool = True

    @classmethod
    def parse(cls, text: str, zones: Sequence[str] | None = None) -> MemoryConfig:
        """Parses ``--memory`` and, when given, the ``--memory-zone`` strings.

        The zones are not part of the ``--memory`` string: render them with
        ``[z.to_option_string() for z in config.zones]``.
        """
        zone_list = None if zones is None else list(zones)
        result: MemoryConfig = _native.parse_option(cls, text, zone_list)
        return result


@record(kw_only=True)
class TokenBucketConfig(_Config):
    """A token bucket: ``size`` tokens refilled every ``refill_time`` milliseconds."""

    size: int
    one_time_burst: int | None = None
    refill_time: int


@record(kw_only=True)
class RateLimiterConfig(_Config):
    """Bandwidth (bytes) and operations buckets; either may be absent."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None


@record(kw_only=True)
class RateLimiterGroupConfig(_OptionConfig):
    """``--rate-limit-group``: a limiter shared by the disks that name its id."""

    flag: ClassVar[str] = "--rate-limit-group"
    id: str = ""
    rate_limiter_config: RateLimiterConfig = field(default_factory=RateLimiterConfig)


@record(kw_only=True)
class DiskConfig(_OptionConfig):
    """``--disk``: a virtio-blk device (``vhost_socket`` is the option key ``socket``)."""

    flag: ClassVar[str] = "--disk"
    path: str | None = None
    readonly: bool = False
    direct: bool = False
    iommu: bool = False
    num_queues: int = 1
    queue_size: int = 128
    vhost_user: bool = False
    vhost_socket: str | None = None
    rate_limit_group: str | None = None
    rate_limiter_config: RateLimiterConfig | None = None
    id: str | None = None
    disable_io_uring: bool = False
    disable_aio: bool = False
    pci_segment: int = 0
    serial: str | None = None


@record(kw_only=True)
class NetConfig(_OptionConfig):
    """``--net``: a virtio-net device; ``mac`` defaults to a random 2e:... address."""

    flag: ClassVar[str] = "--net"
    tap: str | None = None
    ip: str = "192.168.249.1"
    mask: str = "255.255.255.0"
    mac: str = field(default_factory=_native.random_mac)
    host_mac: str | None = None
    mtu: int | None = None
    iommu: bool = False
    num_queues: int = 2
    queue_size: int = 256
    vhost_user: bool = False
    vhost_socket: str | None = None
    vhost_mode: VhostMode = "Client"
    id: str | None = None
    fds: list[int] | None = None
    rate_limiter_config: RateLimiterConfig | None = None
    pci_segment: int = 0
    offload_tso: bool = True
    offload_ufo: bool = True
    offload_csum: bool = True


@record(kw_only=True)
class RngConfig(_OptionConfig):
    """``--rng``: a virtio-rng device fed from ``src``."""

    flag: ClassVar[str] = "--rng"
    src: str = "/dev/urandom"
    iommu: bool = False


@record(kw_only=True)
class BalloonConfig(_OptionConfig):
    """``--balloon``: a virtio-balloon device of ``size`` bytes."""

    flag: ClassVar[str] = "--balloon"
    size: int
    deflate_on_oom: bool = False
    free_page_reporting: bool = False


@record(kw_only=True)
class FsConfig(_OptionConfig):
    """``--fs``: a virtio-fs device backed by a vhost-user daemon."""

    flag: ClassVar[str] = "--fs"
    tag: str
    socket: str
    num_queues: int = 1
    queue_size: int = 1024
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class PmemConfig(_OptionConfig):
    """``--pmem``: a virtio-pmem device backed by ``file``."""

    flag: ClassVar[str] = "--pmem"
    file: str
    size: int | None = None
    iommu: bool = False
    discard_writes: bool = False
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class ConsoleConfig(_OptionConfig):
    """``--serial`` and ``--console``: where a console's output goes.

    ``parse`` reports errors as ``--console`` for both flags, as v37 does.
    """

    flag: ClassVar[str] = "--console"
    file: str | None = None
    mode: ConsoleMode
    iommu: bool = False
    socket: str | None = None


@record(kw_only=True)
class DeviceConfig(_OptionConfig):
    """``--device``: a VFIO device assigned to the guest."""

    flag: ClassVar[str] = "--device"
    path: str
    iommu: bool = False
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class UserDeviceConfig(_OptionConfig):
    """``--user-device``: a vfio-user device served over ``socket``."""

    flag: ClassVar[str] = "--user-device"
    socket: str
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class VdpaConfig(_OptionConfig):
    """``--vdpa``: a vDPA device."""

    flag: ClassVar[str] = "--vdpa"
    path: str
    num_queues: int = 1
    iommu: bool = False
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class VsockConfig(_OptionConfig):
    """``--vsock``: a virtio-vsock device with context id ``cid``."""

    flag: ClassVar[str] = "--vsock"
    cid: int
    socket: str
    iommu: bool = False
    id: str | None = None
    pci_segment: int = 0


@record(kw_only=True)
class SgxEpcConfig(_OptionConfig):
    """``--sgx-epc``: an SGX enclave page cache section."""

    flag: ClassVar[str] = "--sgx-epc"
    id: str
    size: int = 0
    prefault: bool = False


@record(kw_only=True)
class NumaDistance(_Config):
    """The distance from a NUMA node to ``destination``."""

    destination: int = 0
    distance: int = 0


@record(kw_only=True)
class NumaConfig(_OptionConfig):
    """``--numa``: one guest NUMA node."""

    flag: ClassVar[str] = "--numa"
    guest_numa_id: int = 0
    cpus: list[int] | None = None
    distances: list[NumaDistance] | None = None
    memory_zones: list[str] | None = None
    sgx_epc_sections: list[str] | None = None
    pci_segments: list[int] | None = None


@record(kw_only=True)
class PayloadConfig(_Config):
    """``--firmware``, ``--kernel``, ``--cmdline`` and ``--initramfs``."""

    firmware: str | None = None
    kernel: str | None = None
    cmdline: str | None = None
    initramfs: str | None = None


@record(kw_only=True)
class TpmConfig(_OptionConfig):
    """``--tpm``: a TPM served by swtpm over ``socket``."""

    flag: ClassVar[str] = "--tpm"
    socket: str


@record(kw_only=True)
class RestoreConfig(_OptionConfig):
    """``--restore``: a snapshot to restore instead of booting."""

    flag: ClassVar[str] = "--restore"
    source_url: str
    prefault: bool = False


def _default_serial() -> ConsoleConfig:
    return ConsoleConfig(mode="Null")


def _default_console() -> ConsoleConfig:
    return ConsoleConfig(mode="Tty")


@record(kw_only=True)
class VmConfig(_Config):
    """A whole VM: what ``cloud-hypervisor`` builds from its command line or ``vm.create``."""

    cpus: CpusConfig = field(default_factory=CpusConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    payload: PayloadConfig | None = None
    rate_limit_groups: list[RateLimiterGroupConfig] | None = None
    disks: list[DiskConfig] | None = None
    net: list[NetConfig] | None = None
    rng: RngConfig = field(default_factory=RngConfig)
    balloon: BalloonConfig | None = None
    fs: list[FsConfig] | None = None
    pmem: list[PmemConfig] | None = None
    serial: ConsoleConfig = field(default_factory=_default_serial)
    console: ConsoleConfig = field(default_factory=_default_console)
    devices: list[DeviceConfig] | None = None
    user_devices: list[UserDeviceConfig] | None = None
    vdpa: list[VdpaConfig] | None = None
    vsock: VsockConfig | None = None
    pvpanic: bool = False
    iommu: bool = False
    sgx_epc: list[SgxEpcConfig] | None = None
    numa: list[NumaConfig] | None = None
    watchdog: bool = False
    platform: PlatformConfig | None = None
    tpm: TpmConfig | None = None

    @classmethod
    def from_cli(cls, argv: Sequence[str]) -> VmConfig:
        """Parses and validates Cloud Hypervisor v37 command-line arguments.

        ``argv`` excludes the program name. Flags that do not describe the VM
        (``--api-socket``, ``-v``, ...) are accepted and ignored here. Raises
        UsageError for a malformed command line, ParseError or
        ValidationError for a bad configuration.
        """
        from vmkit._flags import scan

        config: VmConfig
        config, _ids = _native.parse_vm(scan(argv).vm_params, True)
        return config

    def validate(self) -> set[str]:
        """Checks every v37 rule in v37's order; returns the ids in use.

        Also sets ``iommu`` when any device sits behind the IOMMU, as v37 does.
        Raises ValidationError (or ConfigError for ill-typed fields).
        """
        self.iommu, ids = _native.validate(self)
        return set(ids)


def _register() -> None:
    classes = {
        cls.__name__: cls
        for cls in (
            VmConfig,
            CpusConfig,
            CpuTopology,
            CpuAffinity,
            CpuFeatures,
            PlatformConfig,
            MemoryConfig,
            MemoryZoneConfig,
            RateLimiterGroupConfig,
            RateLimiterConfig,
            TokenBucketConfig,
            DiskConfig,
            NetConfig,
            RngConfig,
            BalloonConfig,
            FsConfig,
            PmemConfig,
            ConsoleConfig,
            DeviceConfig,
            UserDeviceConfig,
            VdpaConfig,
            VsockConfig,
            SgxEpcConfig,
            NumaConfig,
            NumaDistance,
            PayloadConfig,
            TpmConfig,
            RestoreConfig,
        )
    }
    _native.register(classes, _Config, ConfigError, ParseError, ValidationError)


_register()
