//! Option strings to config structs, key by key in v37's conversion order
//! (the first failing key is the one reported).

use crate::error::{Error, ValidationError};
use crate::option_parser::{OptionParser, OptionParserError, OptionParserResult};
use crate::types::*;
use crate::values::{ByteSized, IntegerList, MacAddr, PairList, StringList, Toggle, TopologyParts};

type Result<T> = std::result::Result<T, Error>;

const RATE_LIMITER_KEYS: [&str; 6] = [
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

fn parser<'a>(keys: &[&'static str], input: &'a str) -> OptionParserResult<OptionParser<'a>> {
    let mut parser = OptionParser::new();
    parser.add_all(keys);
    parser.parse(input)?;
    Ok(parser)
}

fn toggle(parser: &OptionParser, key: &str) -> OptionParserResult<Option<bool>> {
    Ok(parser.convert::<Toggle>(key)?.map(|t| t.0))
}

fn bytes(parser: &OptionParser, key: &str) -> OptionParserResult<Option<u64>> {
    Ok(parser.convert::<ByteSized>(key)?.map(|b| b.0))
}

fn int_list<T: TryFrom<u64>>(
    parser: &OptionParser,
    key: &str,
) -> OptionParserResult<Option<Vec<T>>> {
    parser.convert_with(key, |v| v.parse::<IntegerList>().ok()?.narrow())
}

fn string_list(parser: &OptionParser, key: &str) -> OptionParserResult<Option<Vec<String>>> {
    Ok(parser.convert::<StringList>(key)?.map(|l| l.0))
}

/// Buckets exist only with a non-zero size and refill time (v37's rule).
fn rate_limiter(parser: &OptionParser) -> OptionParserResult<RateLimiterConfig> {
    let mut values = [0u64; 6];
    for (value, key) in values.iter_mut().zip(RATE_LIMITER_KEYS) {
        *value = parser.convert::<u64>(key)?.unwrap_or(0);
    }
    let bucket = |size: u64, burst: u64, refill: u64| {
        (size != 0 && refill != 0).then_some(TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time: refill,
        })
    };
    Ok(RateLimiterConfig {
        bandwidth: bucket(values[0], values[1], values[2]),
        ops: bucket(values[3], values[4], values[5]),
    })
}

fn optional_rate_limiter(rl: RateLimiterConfig) -> Option<RateLimiterConfig> {
    (rl.bandwidth.is_some() || rl.ops.is_some()).then_some(rl)
}

impl CpusConfig {
    pub fn parse(input: &str) -> Result<Self> {
        Self::parse_inner(input).map_err(|e| match e {
            Inner::Parser(e) => Error::ParseCpus(e),
            Inner::Config(e) => e,
        })
    }

    fn parse_inner(input: &str) -> std::result::Result<Self, Inner> {
        let p = parser(
            &[
                "boot",
                "max",
                "topology",
                "kvm_hyperv",
                "max_phys_bits",
                "affinity",
                "features",
            ],
            input,
        )?;
        let boot_vcpus = p.convert::<u8>("boot")?.unwrap_or(DEFAULT_VCPUS);
        let max_vcpus = p.convert::<u8>("max")?.unwrap_or(boot_vcpus);
        let topology = p
            .convert::<TopologyParts>("topology")?
            .map(|t| CpuTopology {
                threads_per_core: t.0[0],
                cores_per_die: t.0[1],
                dies_per_package: t.0[2],
                packages: t.0[3],
            });
        let kvm_hyperv = toggle(&p, "kvm_hyperv")?.unwrap_or(false);
        let max_phys_bits = p
            .convert::<u8>("max_phys_bits")?
            .unwrap_or(DEFAULT_MAX_PHYS_BITS);
        let affinity = p
            .convert::<PairList<u8, Vec<usize>>>("affinity")?
            .map(|list| {
                list.0
                    .into_iter()
                    .map(|(vcpu, host_cpus)| CpuAffinity { vcpu, host_cpus })
                    .collect()
            });
        let mut features = CpuFeatures::default();
        for name in string_list(&p, "features")?.unwrap_or_default() {
            match name.as_str() {
                "amx" => features.amx = true,
                _ => return Err(Inner::Config(Error::InvalidCpuFeatures(name))),
            }
        }
        Ok(CpusConfig {
            boot_vcpus,
            max_vcpus,
            topology,
            kvm_hyperv,
            max_phys_bits,
            affinity,
            features,
        })
    }
}

/// Lets one function report both parser errors (wrapped by the caller) and
/// config errors of its own (missing keys, unknown features).
enum Inner {
    Parser(OptionParserError),
    Config(Error),
}

impl From<OptionParserError> for Inner {
    fn from(e: OptionParserError) -> Self {
        Inner::Parser(e)
    }
}

fn wrap<T>(
    result: std::result::Result<T, Inner>,
    variant: fn(OptionParserError) -> Error,
) -> Result<T> {
    result.map_err(|e| match e {
        Inner::Parser(e) => variant(e),
        Inner::Config(e) => e,
    })
}

fn required(value: Option<String>, missing: Error) -> std::result::Result<String, Inner> {
    value.ok_or(Inner::Config(missing))
}

impl PlatformConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let p = parser(
                &[
                    "num_pci_segments",
                    "iommu_segments",
                    "serial_number",
                    "uuid",
                    "oem_strings",
                ],
                input,
            )?;
            Ok(PlatformConfig {
                num_pci_segments: p
                    .convert::<u16>("num_pci_segments")?
                    .unwrap_or(DEFAULT_NUM_PCI_SEGMENTS),
                iommu_segments: int_list(&p, "iommu_segments")?,
                serial_number: p.get("serial_number"),
                uuid: p.get("uuid"),
                oem_strings: string_list(&p, "oem_strings")?,
            })
        };
        inner().map_err(Error::ParsePlatform)
    }
}

impl MemoryConfig {
    /// `--memory` plus the strings of `--memory-zone` (None or empty when the
    /// flag is absent: the flag itself needs at least one value).
    pub fn parse(input: &str, zones: Option<&[String]>) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let p = parser(
                &[
                    "size",
                    "file",
                    "mergeable",
                    "hotplug_method",
                    "hotplug_size",
                    "hotplugged_size",
                    "shared",
                    "hugepages",
                    "hugepage_size",
                    "prefault",
                    "thp",
                ],
                input,
            )?;
            let size = bytes(&p, "size")?.unwrap_or(DEFAULT_MEMORY_SIZE);
            let mergeable = toggle(&p, "mergeable")?.unwrap_or(false);
            let hotplug_method = p
                .convert_with("hotplug_method", |v| {
                    if v.eq_ignore_ascii_case("acpi") {
                        Some(HotplugMethod::Acpi)
                    } else if v.eq_ignore_ascii_case("virtio-mem") {
                        Some(HotplugMethod::VirtioMem)
                    } else {
                        None
                    }
                })?
                .unwrap_or_default();
            Ok(MemoryConfig {
                size,
                mergeable,
                hotplug_method,
                hotplug_size: bytes(&p, "hotplug_size")?,
                hotplugged_size: bytes(&p, "hotplugged_size")?,
                shared: toggle(&p, "shared")?.unwrap_or(false),
                hugepages: toggle(&p, "hugepages")?.unwrap_or(false),
                hugepage_size: bytes(&p, "hugepage_size")?,
                prefault: toggle(&p, "prefault")?.unwrap_or(false),
                zones: None,
                thp: toggle(&p, "thp")?.unwrap_or(true),
            })
        };
        let mut config = inner().map_err(Error::ParseMemory)?;
        if let Some(zones) = zones.filter(|z| !z.is_empty()) {
            config.zones = Some(
                zones
                    .iter()
                    .map(|z| MemoryZoneConfig::parse(z))
                    .collect::<Result<_>>()?,
            );
        }
        Ok(config)
    }
}

impl MemoryZoneConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(
                &[
                    "id",
                    "size",
                    "file",
                    "shared",
                    "hugepages",
                    "hugepage_size",
                    "host_numa_node",
                    "hotplug_size",
                    "hotplugged_size",
                    "prefault",
                ],
                input,
            )?;
            let id = required(p.get("id"), Error::ParseMemoryZoneIdMissing)?;
            Ok(MemoryZoneConfig {
                id,
                size: bytes(&p, "size")?.unwrap_or(DEFAULT_MEMORY_SIZE),
                file: p.get("file"),
                shared: toggle(&p, "shared")?.unwrap_or(false),
                hugepages: toggle(&p, "hugepages")?.unwrap_or(false),
                hugepage_size: bytes(&p, "hugepage_size")?,
                host_numa_node: p.convert::<u32>("host_numa_node")?,
                hotplug_size: bytes(&p, "hotplug_size")?,
                hotplugged_size: bytes(&p, "hotplugged_size")?,
                prefault: toggle(&p, "prefault")?.unwrap_or(false),
            })
        };
        wrap(inner(), Error::ParseMemoryZone)
    }
}

impl RateLimiterGroupConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let mut keys = RATE_LIMITER_KEYS.to_vec();
            keys.push("id");
            let p = parser(&keys, input)?;
            let rate_limiter_config = rate_limiter(&p)?;
            Ok(RateLimiterGroupConfig {
                id: p.get("id").unwrap_or_default(),
                rate_limiter_config,
            })
        };
        inner().map_err(Error::ParseRateLimiterGroup)
    }
}

impl DiskConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let mut keys = vec![
                "path",
                "readonly",
                "direct",
                "iommu",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
            ];
            keys.extend(RATE_LIMITER_KEYS);
            keys.extend([
                "id",
                "_disable_io_uring",
                "_disable_aio",
                "pci_segment",
                "serial",
                "rate_limit_group",
            ]);
            let p = parser(&keys, input)?;
            let path = p.get("path");
            let readonly = toggle(&p, "readonly")?.unwrap_or(false);
            let direct = toggle(&p, "direct")?.unwrap_or(false);
            let iommu = toggle(&p, "iommu")?.unwrap_or(false);
            let queue_size = p
                .convert::<u16>("queue_size")?
                .unwrap_or(DEFAULT_DISK_QUEUE_SIZE);
            let num_queues = p
                .convert::<usize>("num_queues")?
                .unwrap_or(DEFAULT_DISK_NUM_QUEUES);
            let vhost_user = toggle(&p, "vhost_user")?.unwrap_or(false);
            let vhost_socket = p.get("socket");
            let rate_limiter_config = optional_rate_limiter(rate_limiter(&p)?);
            Ok(DiskConfig {
                path,
                readonly,
                direct,
                iommu,
                num_queues,
                queue_size,
                vhost_user,
                vhost_socket,
                rate_limiter_config,
                id: p.get("id"),
                disable_io_uring: toggle(&p, "_disable_io_uring")?.unwrap_or(false),
                disable_aio: toggle(&p, "_disable_aio")?.unwrap_or(false),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
                serial: p.get("serial"),
                rate_limit_group: p.get("rate_limit_group"),
            })
        };
        inner().map_err(Error::ParseDisk)
    }
}

impl NetConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let mut keys = vec![
                "tap",
                "ip",
                "mask",
                "mac",
                "host_mac",
                "offload_tso",
                "offload_ufo",
                "offload_csum",
                "mtu",
                "iommu",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
                "vhost_mode",
                "id",
                "fd",
            ];
            keys.extend(RATE_LIMITER_KEYS);
            keys.push("pci_segment");
            let p = parser(&keys, input)?;
            let tap = p.get("tap");
            let ip = p.convert("ip")?.unwrap_or(DEFAULT_NET_IP);
            let mask = p.convert("mask")?.unwrap_or(DEFAULT_NET_MASK);
            let mac = p.convert::<MacAddr>("mac")?.unwrap_or_else(MacAddr::random);
            let host_mac = p.convert::<MacAddr>("host_mac")?;
            let offload_tso = toggle(&p, "offload_tso")?.unwrap_or(true);
            let offload_ufo = toggle(&p, "offload_ufo")?.unwrap_or(true);
            let offload_csum = toggle(&p, "offload_csum")?.unwrap_or(true);
            let mtu = p.convert::<u16>("mtu")?;
            let iommu = toggle(&p, "iommu")?.unwrap_or(false);
            let queue_size = p
                .convert::<u16>("queue_size")?
                .unwrap_or(DEFAULT_NET_QUEUE_SIZE);
            let num_queues = p
                .convert::<usize>("num_queues")?
                .unwrap_or(DEFAULT_NET_NUM_QUEUES);
            let vhost_user = toggle(&p, "vhost_user")?.unwrap_or(false);
            let vhost_socket = p.get("socket");
            let vhost_mode = p
                .convert_with("vhost_mode", |v| {
                    if v.eq_ignore_ascii_case("client") {
                        Some(VhostMode::Client)
                    } else if v.eq_ignore_ascii_case("server") {
                        Some(VhostMode::Server)
                    } else {
                        None
                    }
                })?
                .unwrap_or_default();
            let id = p.get("id");
            let fds = int_list::<i32>(&p, "fd")?;
            let rate_limiter_config = optional_rate_limiter(rate_limiter(&p)?);
            let pci_segment = p.convert::<u16>("pci_segment")?.unwrap_or(0);
            Ok(NetConfig {
                tap,
                ip,
                mask,
                mac,
                host_mac,
                mtu,
                iommu,
                num_queues,
                queue_size,
                vhost_user,
                vhost_socket,
                vhost_mode,
                id,
                fds,
                rate_limiter_config,
                pci_segment,
                offload_tso,
                offload_ufo,
                offload_csum,
            })
        };
        inner().map_err(Error::ParseNetwork)
    }
}

impl RngConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let p = parser(&["src", "iommu"], input)?;
            Ok(RngConfig {
                src: p
                    .get("src")
                    .unwrap_or_else(|| DEFAULT_RNG_SOURCE.to_owned()),
                iommu: toggle(&p, "iommu")?.unwrap_or(false),
            })
        };
        inner().map_err(Error::ParseRng)
    }
}

impl BalloonConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let p = parser(&["size", "deflate_on_oom", "free_page_reporting"], input)?;
            Ok(BalloonConfig {
                size: bytes(&p, "size")?.unwrap_or(0),
                deflate_on_oom: toggle(&p, "deflate_on_oom")?.unwrap_or(false),
                free_page_reporting: toggle(&p, "free_page_reporting")?.unwrap_or(false),
            })
        };
        inner().map_err(Error::ParseBalloon)
    }
}

impl FsConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(
                &[
                    "tag",
                    "queue_size",
                    "num_queues",
                    "socket",
                    "id",
                    "pci_segment",
                ],
                input,
            )?;
            let tag = required(p.get("tag"), Error::ParseFsTagMissing)?;
            let queue_size = p
                .convert::<u16>("queue_size")?
                .unwrap_or(DEFAULT_FS_QUEUE_SIZE);
            let num_queues = p
                .convert::<usize>("num_queues")?
                .unwrap_or(DEFAULT_FS_NUM_QUEUES);
            let socket = required(p.get("socket"), Error::ParseFsSockMissing)?;
            Ok(FsConfig {
                tag,
                socket,
                num_queues,
                queue_size,
                id: p.get("id"),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParseFileSystem)
    }
}

impl PmemConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(
                &[
                    "size",
                    "file",
                    "iommu",
                    "discard_writes",
                    "id",
                    "pci_segment",
                ],
                input,
            )?;
            let size = bytes(&p, "size")?;
            let file = required(p.get("file"), Error::ParsePmemFileMissing)?;
            Ok(PmemConfig {
                file,
                size,
                iommu: toggle(&p, "iommu")?.unwrap_or(false),
                discard_writes: toggle(&p, "discard_writes")?.unwrap_or(false),
                id: p.get("id"),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParsePersistentMemory)
    }
}

impl ConsoleConfig {
    /// Parses `--serial` and `--console` alike (v37 reports both as `--console`).
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let mut p = OptionParser::new();
            p.add_valueless("off")
                .add_valueless("pty")
                .add_valueless("tty")
                .add_valueless("null")
                .add_all(&["file", "socket", "iommu"]);
            p.parse(input)?;
            let mut config = ConsoleConfig::with_mode(ConsoleOutputMode::Off);
            // Precedence off > pty > tty > null > file > socket, whatever the order given.
            if p.is_set("off") {
            } else if p.is_set("pty") {
                config.mode = ConsoleOutputMode::Pty;
            } else if p.is_set("tty") {
                config.mode = ConsoleOutputMode::Tty;
            } else if p.is_set("null") {
                config.mode = ConsoleOutputMode::Null;
            } else if p.is_set("file") {
                config.mode = ConsoleOutputMode::File;
                config.file = Some(required(
                    p.get("file"),
                    ValidationError::ConsoleFileMissing.into(),
                )?);
            } else if p.is_set("socket") {
                config.mode = ConsoleOutputMode::Socket;
                config.socket = Some(required(
                    p.get("socket"),
                    ValidationError::ConsoleSocketPathMissing.into(),
                )?);
            } else {
                return Err(Inner::Config(Error::ParseConsoleInvalidModeGiven));
            }
            config.iommu = toggle(&p, "iommu")?.unwrap_or(false);
            Ok(config)
        };
        wrap(inner(), Error::ParseConsole)
    }
}

impl DeviceConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["path", "id", "iommu", "pci_segment"], input)?;
            let path = required(p.get("path"), Error::ParseDevicePathMissing)?;
            Ok(DeviceConfig {
                path,
                id: p.get("id"),
                iommu: toggle(&p, "iommu")?.unwrap_or(false),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParseDevice)
    }
}

impl UserDeviceConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["socket", "id", "pci_segment"], input)?;
            let socket = required(p.get("socket"), Error::ParseUserDeviceSocketMissing)?;
            Ok(UserDeviceConfig {
                socket,
                id: p.get("id"),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParseUserDevice)
    }
}

impl VdpaConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["path", "num_queues", "iommu", "id", "pci_segment"], input)?;
            let path = required(p.get("path"), Error::ParseVdpaPathMissing)?;
            Ok(VdpaConfig {
                path,
                num_queues: p
                    .convert::<usize>("num_queues")?
                    .unwrap_or(DEFAULT_VDPA_NUM_QUEUES),
                iommu: toggle(&p, "iommu")?.unwrap_or(false),
                id: p.get("id"),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParseVdpa)
    }
}

impl VsockConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["socket", "cid", "iommu", "id", "pci_segment"], input)?;
            let socket = required(p.get("socket"), Error::ParseVsockSockMissing)?;
            let cid = p
                .convert::<u32>("cid")?
                .ok_or(Inner::Config(Error::ParseVsockCidMissing))?;
            Ok(VsockConfig {
                cid,
                socket,
                iommu: toggle(&p, "iommu")?.unwrap_or(false),
                id: p.get("id"),
                pci_segment: p.convert::<u16>("pci_segment")?.unwrap_or(0),
            })
        };
        wrap(inner(), Error::ParseVsock)
    }
}

impl SgxEpcConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["id", "size", "prefault"], input)?;
            let id = required(p.get("id"), Error::ParseSgxEpcIdMissing)?;
            Ok(SgxEpcConfig {
                id,
                size: bytes(&p, "size")?.unwrap_or(0),
                prefault: toggle(&p, "prefault")?.unwrap_or(false),
            })
        };
        wrap(inner(), Error::ParseSgxEpc)
    }
}

impl NumaConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> OptionParserResult<Self> {
            let p = parser(
                &[
                    "guest_numa_id",
                    "cpus",
                    "distances",
                    "memory_zones",
                    "sgx_epc_sections",
                    "pci_segments",
                ],
                input,
            )?;
            let guest_numa_id = p.convert::<u32>("guest_numa_id")?.unwrap_or(0);
            let cpus = int_list::<u8>(&p, "cpus")?;
            let distances = p.convert_with("distances", |v| {
                let pairs = v.parse::<PairList<u64, u64>>().ok()?;
                pairs
                    .0
                    .into_iter()
                    .map(|(destination, distance)| {
                        Some(NumaDistance {
                            destination: u32::try_from(destination).ok()?,
                            distance: u8::try_from(distance).ok()?,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
            })?;
            Ok(NumaConfig {
                guest_numa_id,
                cpus,
                distances,
                memory_zones: string_list(&p, "memory_zones")?,
                sgx_epc_sections: string_list(&p, "sgx_epc_sections")?,
                pci_segments: int_list(&p, "pci_segments")?,
            })
        };
        inner().map_err(Error::ParseNuma)
    }
}

impl RestoreConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["source_url", "prefault"], input)?;
            let source_url = required(p.get("source_url"), Error::ParseRestoreSourceUrlMissing)?;
            Ok(RestoreConfig {
                source_url,
                prefault: toggle(&p, "prefault")?.unwrap_or(false),
            })
        };
        wrap(inner(), Error::ParseRestore)
    }
}

impl TpmConfig {
    pub fn parse(input: &str) -> Result<Self> {
        let inner = || -> std::result::Result<Self, Inner> {
            let p = parser(&["socket"], input)?;
            let socket = required(p.get("socket"), Error::ParseTpmPathMissing)?;
            Ok(TpmConfig { socket })
        };
        wrap(inner(), Error::ParseTpm)
    }
}

/// The raw strings of a v37 command line, one field per flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmParams {
    pub cpus: String,
    pub memory: String,
    pub memory_zones: Option<Vec<String>>,
    pub firmware: Option<String>,
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: Option<String>,
    pub rate_limit_groups: Option<Vec<String>>,
    pub disks: Option<Vec<String>>,
    pub net: Option<Vec<String>>,
    pub rng: String,
    pub balloon: Option<String>,
    pub fs: Option<Vec<String>>,
    pub pmem: Option<Vec<String>>,
    pub serial: String,
    pub console: String,
    pub devices: Option<Vec<String>>,
    pub user_devices: Option<Vec<String>>,
    pub vdpa: Option<Vec<String>>,
    pub vsock: Option<String>,
    pub pvpanic: bool,
    pub numa: Option<Vec<String>>,
    pub watchdog: bool,
    pub platform: Option<String>,
    pub sgx_epc: Option<Vec<String>>,
    pub tpm: Option<String>,
}

impl Default for VmParams {
    /// The CLI defaults of v37 for flags that have one.
    fn default() -> Self {
        VmParams {
            cpus: "boot=1,max_phys_bits=46".to_owned(),
            memory: "size=512M".to_owned(),
            memory_zones: None,
            firmware: None,
            kernel: None,
            initramfs: None,
            cmdline: None,
            rate_limit_groups: None,
            disks: None,
            net: None,
            rng: "src=/dev/urandom".to_owned(),
            balloon: None,
            fs: None,
            pmem: None,
            serial: "null".to_owned(),
            console: "tty".to_owned(),
            devices: None,
            user_devices: None,
            vdpa: None,
            vsock: None,
            pvpanic: false,
            numa: None,
            watchdog: false,
            platform: None,
            sgx_epc: None,
            tpm: None,
        }
    }
}

fn parse_list<T>(items: &Option<Vec<String>>, f: fn(&str) -> Result<T>) -> Result<Option<Vec<T>>> {
    items
        .as_ref()
        .map(|items| items.iter().map(|s| f(s)).collect())
        .transpose()
}

fn parse_one<T>(item: &Option<String>, f: fn(&str) -> Result<T>) -> Result<Option<T>> {
    item.as_deref().map(f).transpose()
}

impl VmConfig {
    /// Parses a whole command line in v37's order (the first error in that
    /// order is reported). Does not validate.
    pub fn parse(params: &VmParams) -> Result<Self> {
        let rate_limit_groups =
            parse_list(&params.rate_limit_groups, RateLimiterGroupConfig::parse)?;
        let disks = parse_list(&params.disks, DiskConfig::parse)?;
        let net = parse_list(&params.net, NetConfig::parse)?;
        let rng = RngConfig::parse(&params.rng)?;
        let balloon = parse_one(&params.balloon, BalloonConfig::parse)?;
        let fs = parse_list(&params.fs, FsConfig::parse)?;
        let pmem = parse_list(&params.pmem, PmemConfig::parse)?;
        let console = ConsoleConfig::parse(&params.console)?;
        let serial = ConsoleConfig::parse(&params.serial)?;
        let devices = parse_list(&params.devices, DeviceConfig::parse)?;
        let user_devices = parse_list(&params.user_devices, UserDeviceConfig::parse)?;
        let vdpa = parse_list(&params.vdpa, VdpaConfig::parse)?;
        let vsock = parse_one(&params.vsock, VsockConfig::parse)?;
        let platform = parse_one(&params.platform, PlatformConfig::parse)?;
        let sgx_epc = parse_list(&params.sgx_epc, SgxEpcConfig::parse)?;
        let numa = parse_list(&params.numa, NumaConfig::parse)?;
        let payload =
            (params.kernel.is_some() || params.firmware.is_some()).then(|| PayloadConfig {
                firmware: params.firmware.clone(),
                kernel: params.kernel.clone(),
                cmdline: params.cmdline.clone(),
                initramfs: params.initramfs.clone(),
            });
        let tpm = parse_one(&params.tpm, TpmConfig::parse)?;
        let cpus = CpusConfig::parse(&params.cpus)?;
        let memory = MemoryConfig::parse(&params.memory, params.memory_zones.as_deref())?;
        Ok(VmConfig {
            cpus,
            memory,
            payload,
            rate_limit_groups,
            disks,
            net,
            rng,
            balloon,
            fs,
            pmem,
            serial,
            console,
            devices,
            user_devices,
            vdpa,
            vsock,
            pvpanic: params.pvpanic,
            iommu: false,
            sgx_epc,
            numa,
            watchdog: params.watchdog,
            platform,
            tpm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn cpus() {
        let c = CpusConfig::parse("").unwrap();
        assert_eq!(c, CpusConfig::default());
        let c = CpusConfig::parse("boot=8,topology=2:2:1:2").unwrap();
        assert_eq!((c.boot_vcpus, c.max_vcpus), (8, 8));
        assert_eq!(c.topology.unwrap().packages, 2);
        assert_eq!(
            text(CpusConfig::parse("boot=8,topology=2:2:1").unwrap_err()),
            "Error parsing --cpus: unable to convert 2:2:1 for topology"
        );
        assert_eq!(
            text(CpusConfig::parse("features=[amx,foo]").unwrap_err()),
            "Invalid feature in --cpus features list: foo"
        );
        assert_eq!(
            text(CpusConfig::parse("boot=1,core_scheduling=vm").unwrap_err()),
            "Error parsing --cpus: unknown option: core_scheduling"
        );
    }

    #[test]
    fn memory_and_zones() {
        let m = MemoryConfig::parse("hugepages=on,size=1G,hugepage_size=2M", None).unwrap();
        assert_eq!(
            (m.size, m.hugepages, m.hugepage_size),
            (1 << 30, true, Some(2 << 20))
        );
        assert!(m.thp);
        let zones = vec!["id=mem0,size=1G".to_owned()];
        let m = MemoryConfig::parse("size=0,mergeable=on", Some(&zones)).unwrap();
        assert_eq!(m.zones.unwrap()[0].size, 1 << 30);
        assert_eq!(
            text(MemoryConfig::parse("size=0", Some(&["size=1G".to_owned()])).unwrap_err()),
            "Error parsing --memory-zone: id missing"
        );
        assert_eq!(
            text(MemoryConfig::parse("size=17179869184G", None).unwrap_err()),
            "Error parsing --memory: unable to convert 17179869184G for size"
        );
        // `key=` reads as absent, so the default applies.
        assert_eq!(
            MemoryConfig::parse("size=", None).unwrap().size,
            DEFAULT_MEMORY_SIZE
        );
    }

    #[test]
    fn disk_keys_convert_in_table_order() {
        let d =
            DiskConfig::parse("path=/path/to_file,iommu=on,queue_size=256,num_queues=4").unwrap();
        assert_eq!((d.iommu, d.queue_size, d.num_queues), (true, 256, 4));
        // readonly comes before queue_size in v37's order.
        assert_eq!(
            text(DiskConfig::parse("queue_size=x,readonly=maybe").unwrap_err()),
            "Error parsing --disk: unable to convert maybe for readonly"
        );
        let d =
            DiskConfig::parse("bw_size=10,bw_refill_time=0,ops_size=5,ops_refill_time=7").unwrap();
        let rl = d.rate_limiter_config.unwrap();
        assert!(rl.bandwidth.is_none());
        assert_eq!(rl.ops.unwrap().one_time_burst, Some(0));
    }

    #[test]
    fn net() {
        let n = NetConfig::parse("mac=de:ad:be:ef:12:34,fd=[3,7],num_queues=4").unwrap();
        assert_eq!(n.fds, Some(vec![3, 7]));
        assert_eq!(n.ip, DEFAULT_NET_IP);
        assert_eq!(n.mac.to_string(), "de:ad:be:ef:12:34");
        let random = NetConfig::parse("").unwrap();
        assert_eq!(random.mac.0[0], 0x2e);
        assert_eq!(
            text(NetConfig::parse("fd=[2147483648]").unwrap_err()),
            "Error parsing --net: unable to convert [2147483648] for fd"
        );
    }

    #[test]
    fn console_precedence_and_errors() {
        let c = ConsoleConfig::parse("file=/x,tty").unwrap();
        assert_eq!((c.mode, c.file), (ConsoleOutputMode::Tty, None));
        assert_eq!(
            text(ConsoleConfig::parse("").unwrap_err()),
            "Error parsing --console: invalid console mode given"
        );
        assert_eq!(
            text(ConsoleConfig::parse("badmode").unwrap_err()),
            "Error parsing --console: unknown option: badmode"
        );
        assert_eq!(
            ConsoleConfig::parse("file=").unwrap_err(),
            Error::Validation(ValidationError::ConsoleFileMissing)
        );
    }

    #[test]
    fn required_keys() {
        assert_eq!(
            text(PmemConfig::parse("size=128M").unwrap_err()),
            "Error parsing --pmem: file missing"
        );
        assert_eq!(
            FsConfig::parse("socket=/s").unwrap_err(),
            Error::ParseFsTagMissing
        );
        assert_eq!(
            VsockConfig::parse("cid=3").unwrap_err(),
            Error::ParseVsockSockMissing
        );
        assert_eq!(
            VsockConfig::parse("socket=/s").unwrap_err(),
            Error::ParseVsockCidMissing
        );
        assert_eq!(
            DeviceConfig::parse("").unwrap_err(),
            Error::ParseDevicePathMissing
        );
        assert_eq!(
            TpmConfig::parse("").unwrap_err(),
            Error::ParseTpmPathMissing
        );
    }

    #[test]
    fn numa_narrowing_is_refused() {
        let n = NumaConfig::parse(
            "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=[mem0],pci_segments=[0]",
        )
        .unwrap();
        assert_eq!(n.distances.unwrap()[0].distance, 20);
        for bad in [
            "cpus=[256]",
            "distances=[0@256]",
            "distances=[4294967296@1]",
            "pci_segments=[65536]",
        ] {
            assert!(NumaConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn whole_command_line_reports_first_error_in_v37_order() {
        let params = VmParams {
            cpus: "boot=x".into(),
            disks: Some(vec!["bogus=1".into()]),
            ..VmParams::default()
        };
        // Disks are parsed before cpus.
        assert_eq!(VmConfig::parse(&params).unwrap_err().kind(), "ParseDisk");
        let params = VmParams {
            kernel: Some("/k".into()),
            ..VmParams::default()
        };
        let config = VmConfig::parse(&params).unwrap();
        assert_eq!(config.payload.unwrap().kernel.as_deref(), Some("/k"));
        let params = VmParams {
            cmdline: Some("quiet".into()),
            ..VmParams::default()
        };
        assert!(VmConfig::parse(&params).unwrap().payload.is_none());
    }
}
