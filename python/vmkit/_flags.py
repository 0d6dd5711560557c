"""Cloud Hypervisor v37's command-line flags and how a command line is read.

The reading follows clap as v37 configures it: a flag that takes several
values takes every following word up to the next flag; giving any flag twice
is an error; unknown flags are errors (exit status 2 in the CLI).
"""

from __future__ import annotations

from vmkit._record import record
from vmkit.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal

    Arity = Literal["one", "many", "flag", "count"]


@record(frozen=True)
class Flag:
    long: str
    arity: Arity
    help: str
    param: str | None = None  # the VM parameter it feeds, if any
    default: str | None = None
    short: str | None = None
    choices: tuple[str, ...] | None = None
    value_name: str = ""


_RATE_LIMIT_GROUP = (
    'Rate Limit Group parameters "bw_size=<bytes>,bw_one_time_burst=<bytes>,'
    "bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,"
    'ops_refill_time=<ms>,id=<device_id>"'
)
_DISK = (
    'Disk parameters "path=<disk_image_path>,readonly=on|off,direct=on|off,iommu=on|off,'
    "num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,vhost_user=on|off,"
    "socket=<vhost_user_socket_path>,bw_size=<bytes>,bw_one_time_burst=<bytes>,"
    "bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,"
    'id=<device_id>,pci_segment=<segment_id>,rate_limit_group=<group_id>"'
)
_NET = (
    'Network parameters "tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,'
    "fd=<fd1,fd2...>,iommu=on|off,num_queues=<number_of_queues>,"
    "queue_size=<size_of_each_queue>,id=<device_id>,vhost_user=<vhost_user_enable>,"
    "socket=<vhost_user_socket_path>,vhost_mode=client|server,bw_size=<bytes>,"
    "bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,"
    "ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,pci_segment=<segment_id>,"
    'offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off"'
)

FLAGS: tuple[Flag, ...] = (
    Flag(
        "--cpus",
        "one",
        "boot=<boot_vcpus>,max=<max_vcpus>,topology=<threads_per_core>:<cores_per_die>:"
        "<dies_per_package>:<packages>,kvm_hyperv=on|off,"
        "max_phys_bits=<maximum_number_of_physical_bits>,"
        "affinity=<list_of_vcpus_with_their_associated_cpuset>,"
        "features=<list_of_features_to_enable>",
        param="cpus",
        default="boot=1,max_phys_bits=46",
    ),
    Flag(
        "--platform",
        "one",
        "num_pci_segments=<num_pci_segments>,iommu_segments=<list_of_segments>,"
        "serial_number=<dmi_device_serial_number>,uuid=<dmi_device_uuid>,"
        "oem_strings=<list_of_strings>",
        param="platform",
    ),
    Flag(
        "--memory",
        "one",
        'Memory parameters "size=<guest_memory_size>,mergeable=on|off,shared=on|off,'
        "hugepages=on|off,hugepage_size=<hugepage_size>,hotplug_method=acpi|virtio-mem,"
        "hotplug_size=<hotpluggable_memory_size>,hotplugged_size=<hotplugged_memory_size>,"
        'prefault=on|off,thp=on|off"',
        param="memory",
        default="size=512M",
    ),
    Flag(
        "--memory-zone",
        "many",
        'User defined memory zone parameters "size=<guest_memory_region_size>,'
        "file=<backing_file>,shared=on|off,hugepages=on|off,hugepage_size=<hugepage_size>,"
        "host_numa_node=<node_id>,id=<zone_identifier>,hotplug_size=<hotpluggable_memory_size>,"
        'hotplugged_size=<hotplugged_memory_size>,prefault=on|off"',
        param="memory_zones",
    ),
    Flag(
        "--firmware",
        "one",
        "Path to firmware that is loaded in an architectural specific way",
        param="firmware",
    ),
    Flag(
        "--kernel",
        "one",
        "Path to kernel to load. This may be a kernel or firmware that supports a PVH entry "
        "point (e.g. vmlinux) or architecture equivalent",
        param="kernel",
    ),
    Flag("--initramfs", "one", "Path to initramfs image", param="initramfs"),
    Flag("--cmdline", "one", "Kernel command line", param="cmdline"),
    Flag("--rate-limit-group", "many", _RATE_LIMIT_GROUP, param="rate_limit_groups"),
    Flag("--disk", "many", _DISK, param="disks"),
    Flag("--net", "many", _NET, param="net"),
    Flag(
        "--rng",
        "one",
        'Random number generator parameters "src=<entropy_source_path>,iommu=on|off"',
        param="rng",
        default="src=/dev/urandom",
    ),
    Flag(
        "--balloon",
        "one",
        'Balloon parameters "size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off"',
        param="balloon",
    ),
    Flag(
        "--fs",
        "many",
        'virtio-fs parameters "tag=<tag_name>,socket=<socket_path>,'
        "num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,"
        'pci_segment=<segment_id>"',
        param="fs",
    ),
    Flag(
        "--pmem",
        "many",
        'Persistent memory parameters "file=<backing_file_path>,'
        "size=<persistent_memory_size>,iommu=on|off,discard_writes=on|off,id=<device_id>,"
        'pci_segment=<segment_id>"',
        param="pmem",
    ),
    Flag(
        "--serial",
        "one",
        "Control serial port: off|null|pty|tty|file=</path/to/a/file>|socket=</path/to/a/file>",
        param="serial",
        default="null",
    ),
    Flag(
        "--console",
        "one",
        'Control (virtio) console: "off|null|pty|tty|file=</path/to/a/file>,iommu=on|off"',
        param="console",
        default="tty",
    ),
    Flag(
        "--device",
        "many",
        'Direct device assignment parameters "path=<device_path>,iommu=on|off,'
        'id=<device_id>,pci_segment=<segment_id>"',
        param="devices",
    ),
    Flag(
        "--user-device",
        "many",
        'Userspace device socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>"',
        param="user_devices",
    ),
    Flag(
        "--vdpa",
        "many",
        'vDPA device "path=<device_path>,num_queues=<number_of_queues>,iommu=on|off,'
        'id=<device_id>,pci_segment=<segment_id>"',
        param="vdpa",
    ),
    Flag(
        "--vsock",
        "one",
        'Virtio VSOCK parameters "cid=<context_id>,socket=<socket_path>,iommu=on|off,'
        'id=<device_id>,pci_segment=<segment_id>"',
        param="vsock",
    ),
    Flag("--pvpanic", "flag", "Enable pvpanic device", param="pvpanic"),
    Flag(
        "--numa",
        "many",
        'Settings related to a given NUMA node "guest_numa_id=<node_id>,cpus=<cpus_id>,'
        "distances=<list_of_distances_to_destination_nodes>,"
        "memory_zones=<list_of_memory_zones>,sgx_epc_sections=<list_of_sgx_epc_sections>,"
        'pci_segments=<list_of_pci_segments>"',
        param="numa",
    ),
    Flag("--watchdog", "flag", "Enable virtio-watchdog", param="watchdog"),
    Flag("-v", "count", "Sets the level of debugging output", short="-v"),
    Flag("--log-file", "one", "Log file. Standard error is used if not specified"),
    Flag(
        "--api-socket",
        "one",
        "HTTP API socket (UNIX domain socket): path=</path/to/a/file> or fd=<fd>.",
    ),
    Flag(
        "--event-monitor",
        "one",
        "File to report events on: path=</path/to/a/file> or fd=<fd>",
    ),
    Flag(
        "--restore",
        "one",
        "Restore from a VM snapshot.\n"
        'Restore parameters "source_url=<source_url>,prefault=on|off"\n'
        "`source_url` should be a valid URL (e.g file:///foo/bar or tcp://192.168.1.10/foo)\n"
        "`prefault` brings memory pages in when enabled (disabled by default)",
    ),
    Flag("--seccomp", "one", "", default="true", choices=("true", "false", "log")),
    Flag(
        "--cpu-groups",
        "one",
        "vmkit: put the VM's vCPU threads and its device threads in cgroups of their own, "
        "the vCPUs at an eighth of the devices' CPU weight, so that IO is served first "
        "when the host's CPUs are contended (needs a writable cpu cgroup)",
        default="false",
        choices=("true", "false"),
    ),
    Flag(
        "--name",
        "one",
        "vmkit: the VM's name in 'vmkit ls' and for 'vmkit remote <name> ...' "
        "(with --api-socket; default vm-<pid>)",
    ),
    Flag(
        "--tpm",
        "one",
        'TPM device "(UNIX Domain Socket from swtpm) socket=</path/to/a/socket>"',
        param="tpm",
    ),
    Flag(
        "--sgx-epc",
        "many",
        'SGX EPC parameters "id=<epc_section_identifier>,size=<epc_section_size>,prefault=on|off"',
        param="sgx_epc",
    ),
    Flag(
        "--print-config",
        "flag",
        "vmkit: print the validated VM configuration as JSON and exit",
    ),
    Flag("--version", "flag", "Print version", short="-V"),
    Flag("--help", "flag", "Print help", short="-h"),
)

_BY_NAME: dict[str, Flag] = {}
for _flag in FLAGS:
    if _flag.long != "-v":
        _BY_NAME[_flag.long] = _flag
    if _flag.short:
        _BY_NAME[_flag.short] = _flag


class CommandLine:
    """What a command line said.

    ``values``: the words given to each flag (by long name), in order;
    ``verbosity``: how many ``-v``; ``vm_params``: the VM parameters for
    ``vmkit._native.parse_vm`` (absent flags omitted).
    """

    __slots__ = ("values", "verbosity", "vm_params")

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self.verbosity = 0
        self.vm_params: dict[str, object] = {}

    def has(self, long: str) -> bool:
        return long in self.values

    def one(self, long: str) -> str | None:
        values = self.values.get(long)
        return values[0] if values else None


def _is_flag_word(word: str) -> bool:
    return word[:1] == "-" and word != "-"


# name → (long name, arity, VM parameter, choices): unpacked once per flag in `scan`.
_SPECS: dict[str, tuple[str, Arity, str | None, tuple[str, ...] | None]] = {
    name: (flag.long, flag.arity, flag.param, flag.choices) for name, flag in _BY_NAME.items()
}


def scan(argv: Sequence[str]) -> CommandLine:
    """Reads ``argv`` (without the program name) as clap does for v37."""
    result = CommandLine()
    values_by_flag = result.values
    params = result.vm_params
    words = argv if isinstance(argv, list) else list(argv)
    count = len(words)
    i = 0
    while i < count:
        word = words[i]
        i += 1
        spec = _SPECS.get(word)
        inline: str | None = None
        if spec is None:
            if word == "--":
                if i < count:
                    raise UsageError(f"unexpected argument '{words[i]}' found")
                break
            if word[:2] == "-v" and word.strip("v") == "-":
                result.verbosity += len(word) - 1
                continue
            if not _is_flag_word(word):
                raise UsageError(f"unexpected argument '{word}' found")
            name, _, inline = word.partition("=")
            spec = _SPECS.get(name) if name != word else None
            if spec is None or spec[0] == "-v":
                raise UsageError(f"unexpected argument '{name}' found")
        long, arity, param, choices = spec
        if long == "-v":
            result.verbosity += 1
            continue
        if long in values_by_flag:
            # clap names the flag with its value, as its help does: '--disk <disk>...'
            shown = long
            if arity == "one":
                shown += f" <{long[2:]}>"
            elif arity == "many":
                shown += f" <{long[2:]}>..."
            raise UsageError(f"the argument '{shown}' cannot be used multiple times")
        if arity == "flag":
            if inline is not None:
                raise UsageError(f"unexpected value '{inline}' for '{long}' found")
            values_by_flag[long] = []
            if param is not None:
                params[param] = True
            continue
        values: list[str] = [] if inline is None else [inline]
        if arity == "many":
            while i < count:
                value = words[i]
                if value[:1] == "-" and value != "-":
                    break
                values.append(value)
                i += 1
        elif inline is None and i < count and not _is_flag_word(words[i]):
            values.append(words[i])
            i += 1
        if not values:
            raise UsageError(f"a value is required for '{long} <{long[2:]}>' but none was supplied")
        if choices is not None and values[0] not in choices:
            raise UsageError(
                f"invalid value '{values[0]}' for '{long} <{long[2:]}>'"
                f" [possible values: {', '.join(choices)}]"
            )
        values_by_flag[long] = values
        if param is not None:
            params[param] = values if arity == "many" else values[0]
    return result


def help_text(program: str) -> str:
    """The ``--help`` page."""
    lines = [
        "Launch a vmkit VMM (Cloud Hypervisor v37 command line).",
        "",
        f"Usage: {program} [OPTIONS]",
        "",
        "Options:",
    ]
    for flag in FLAGS:
        if flag.long == "-v":
            names = "-v..."
        else:
            names = f"{flag.short}, {flag.long}" if flag.short else f"    {flag.long}"
            if flag.arity == "one":
                names += f" <{flag.long[2:]}>"
            elif flag.arity == "many":
                names += f" <{flag.long[2:]}>..."
        lines.append(f"  {names}")
        for help_line in flag.help.splitlines():
            lines.append(f"          {help_line}")
        if flag.default is not None:
            lines.append(f"          [default: {flag.default}]")
        if flag.choices:
            lines.append(f"          [possible values: {', '.join(flag.choices)}]")
        lines.append("")
    return "\n".join(lines)
